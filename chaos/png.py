"""A tiny RGB raster and PNG encoder (zlib + struct), enough for the run timeline.

Why not matplotlib: it is not installed and would be the harness's only heavy
dependency, for one figure of rectangles, ticks and a step line. This draws
filled rectangles, horizontal and vertical lines and text in a 3x5 pixel font
(digits, upper-case letters and a few signs), and encodes the result as an
8-bit RGB PNG (filter 0 on every row).

Pure: :meth:`Canvas.png` returns bytes; the caller writes the file.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

Color = tuple[int, int, int]

_FONT: Final[dict[str, str]] = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001010010010", "8": "111101111101111",
    "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111",
    "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101",
    "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011",
    "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101",
    "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    "-": "000000111000000", "_": "000000000000111", ".": "000000000000010",
    ":": "000010000010000", "/": "001001010100100", "=": "000111000111000",
    "+": "000010111010000", "(": "010100100100010", ")": "010001001001010",
    "%": "101001010100101", " ": "000000000000000",
}
"""3 wide x 5 high glyphs, rows top to bottom, ``1`` = ink."""

GLYPH_W: Final = 3
GLYPH_H: Final = 5


class Canvas:
    """A width x height RGB image, white to start with.

    Args:
        width: pixels.
        height: pixels.
    """

    def __init__(self, width: int, height: int) -> None:
        assert width > 0
        assert height > 0
        self.width = width
        self.height = height
        self._px = bytearray(b"\xff" * (width * height * 3))

    def pixel(self, x: int, y: int) -> Color:
        """The colour at (x, y)."""
        i = (y * self.width + x) * 3
        return self._px[i], self._px[i + 1], self._px[i + 2]

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Fill [x0, x1) x [y0, y1), clipped to the canvas."""
        x0, x1 = max(0, min(x0, x1)), min(self.width, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.height, max(y0, y1))
        if x0 >= x1:
            return
        row = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            i = (y * self.width + x0) * 3
            self._px[i:i + len(row)] = row

    def hline(self, x0: int, x1: int, y: int, color: Color) -> None:
        """A one-pixel horizontal line from x0 to x1 inclusive."""
        self.rect(min(x0, x1), y, max(x0, x1) + 1, y + 1, color)

    def vline(self, x: int, y0: int, y1: int, color: Color) -> None:
        """A one-pixel vertical line from y0 to y1 inclusive."""
        self.rect(x, min(y0, y1), x + 1, max(y0, y1) + 1, color)

    def text(self, x: int, y: int, text: str, color: Color, scale: int = 2) -> int:
        """Draw ``text`` (upper-cased; unknown characters as blanks) with its top-left
        at (x, y); returns the x after the last glyph."""
        for ch in text.upper():
            glyph = _FONT.get(ch, _FONT[" "])
            for k, bit in enumerate(glyph):
                if bit == "1":
                    gx, gy = x + (k % GLYPH_W) * scale, y + (k // GLYPH_W) * scale
                    self.rect(gx, gy, gx + scale, gy + scale, color)
            x += (GLYPH_W + 1) * scale
        return x

    def png(self) -> bytes:
        """The image as PNG bytes."""
        stride = self.width * 3
        raw = b"".join(b"\x00" + bytes(self._px[y * stride:(y + 1) * stride])
                       for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return (struct.pack(">I", len(data)) + kind + data
                    + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
