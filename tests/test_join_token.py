"""The join token text form: format, parse, errors, rotation."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import ConfigError
from mesh.security.token import JoinToken, new_token

FP = "0123456789abcdef" * 4
SECRET = bytes(range(32))


@given(
    fp=st.text("0123456789abcdef", min_size=64, max_size=64),
    secret=st.binary(min_size=32, max_size=32),
)
def test_roundtrip(fp: str, secret: bytes) -> None:
    token = JoinToken(fp, secret)
    text = str(token)
    assert text.startswith("MESH1-")
    assert text.count("-") == 2
    assert JoinToken.parse(text) == token
    assert JoinToken.parse(f"  {text.upper()}\n") == token  # pasted, shouted


def test_repr_hides_secret() -> None:
    token = JoinToken(FP, SECRET)
    assert str(token).split("-")[2] not in repr(token)
    assert "secret" not in repr(token)


def _good() -> str:
    return str(JoinToken(FP, SECRET))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("hello", "not a meshd join token"),
        ("SWMTKN-1-abc-def", "not a meshd join token"),
        ("MESH2-" + _good()[6:], "MESH2.*not supported"),
        ("MESH1-" + FP, "3 parts"),
        (_good() + "-extra", "3 parts"),
        ("MESH1-" + FP[:-1] + "-" + _good().split("-")[2], "64 hex digits"),
        ("MESH1-" + FP[:-1] + "g-" + _good().split("-")[2], "64 hex digits"),
        (_good()[:-1], "52 base32"),
        (_good()[:-1] + "1", "52 base32"),
        (_good()[:-1] + "b", "damaged"),  # non-zero trailing bits: a second spelling
    ],
)
def test_malformed_tokens_have_clear_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        JoinToken.parse(text)
    message = str(info.value)
    assert "MESH2" in message or "meshctl token" in message  # says what to do


def test_rotation_makes_a_different_secret_same_ca() -> None:
    first = new_token(FP, os.urandom)
    second = new_token(FP, os.urandom)
    assert first.ca_fingerprint == second.ca_fingerprint == FP
    assert first.secret != second.secret


def test_constructor_validates() -> None:
    with pytest.raises(ConfigError):
        JoinToken("XYZ", SECRET)
    with pytest.raises(ConfigError):
        JoinToken(FP, b"short")
