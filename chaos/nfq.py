"""The nfnetlink_queue wire format, for delaying, duplicating and reordering packets.

The kernel here has no netem, so :mod:`chaos.netem` does what netem would in user
space: an iptables rule sends a node's outgoing cluster packets to an NFQUEUE,
the program receives each one over a netlink socket, and answers with a verdict
(accept) when it chooses, which delays it and, with jitter, reorders it. This
module builds and parses the messages (``linux/netfilter/nfnetlink_queue.h``):

* ``nlmsghdr`` (host byte order) + ``nfgenmsg`` (family, version, queue number in
  network byte order) + attributes (``nlattr``: length and type in host order,
  payload padded to 4 bytes; the structs inside are in network byte order);
* config: ``NFQA_CFG_CMD`` (bind/unbind a queue) and ``NFQA_CFG_PARAMS`` (copy
  whole packets);
* packet: ``NFQA_PACKET_HDR`` (packet id, protocol, hook) and ``NFQA_PAYLOAD``
  (the IP packet);
* verdict: ``NFQA_VERDICT_HDR`` (verdict, packet id).

It also recomputes TCP/UDP checksums, for duplicates sent again through a raw
socket: a packet queued on OUTPUT may still carry a partial checksum that the
network card would have completed (checksum offload).

Pure: bytes in, bytes out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

NETLINK_NETFILTER: Final = 12
NFNL_SUBSYS_QUEUE: Final = 3
NFQNL_MSG_PACKET: Final = 0
NFQNL_MSG_VERDICT: Final = 1
NFQNL_MSG_CONFIG: Final = 2
NFQA_PACKET_HDR: Final = 1
NFQA_VERDICT_HDR: Final = 2
NFQA_PAYLOAD: Final = 10
NFQA_CFG_CMD: Final = 1
NFQA_CFG_PARAMS: Final = 2
NFQNL_CFG_CMD_BIND: Final = 1
NFQNL_CFG_CMD_UNBIND: Final = 2
NFQNL_COPY_PACKET: Final = 2
NF_DROP: Final = 0
NF_ACCEPT: Final = 1
NLM_F_REQUEST: Final = 1
NLM_F_ACK: Final = 4
NLMSG_ERROR: Final = 2
AF_UNSPEC: Final = 0
AF_INET: Final = 2

_NLMSGHDR: Final = struct.Struct("=IHHII")
_NFGENMSG: Final = struct.Struct("!BBH")
_NLATTR: Final = struct.Struct("=HH")


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def _message(msg: int, queue: int, attrs: bytes, seq: int, flags: int = NLM_F_REQUEST,
             family: int = AF_UNSPEC) -> bytes:
    body = _NFGENMSG.pack(family, 0, queue) + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def bind_queue(queue: int, seq: int = 1) -> bytes:
    """Ask for the packets of ``queue`` (acknowledged)."""
    cmd = struct.pack("!BxH", NFQNL_CFG_CMD_BIND, AF_INET)
    return _message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_CMD, cmd), seq,
                    NLM_F_REQUEST | NLM_F_ACK)


def copy_packets(queue: int, copy_range: int = 0xFFFF, seq: int = 2) -> bytes:
    """Ask for whole packets (up to ``copy_range`` bytes) with each message."""
    params = struct.pack("!IB", copy_range, NFQNL_COPY_PACKET)
    return _message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_PARAMS, params), seq,
                    NLM_F_REQUEST | NLM_F_ACK)


def verdict(queue: int, packet_id: int, decision: int = NF_ACCEPT, seq: int = 0) -> bytes:
    """Release (``NF_ACCEPT``) or drop a queued packet."""
    return _message(NFQNL_MSG_VERDICT, queue,
                    _attr(NFQA_VERDICT_HDR, struct.pack("!II", decision, packet_id)), seq)


@dataclass(frozen=True, slots=True)
class QueuedPacket:
    """One packet the kernel handed over."""

    packet_id: int
    payload: bytes
    """The IP packet (empty if the kernel did not copy it)."""


class NetlinkError(OSError):
    """The kernel refused a request (an ``NLMSG_ERROR`` with a non-zero code)."""


def parse(data: bytes) -> list[QueuedPacket]:
    """Every queued packet in a datagram from the netlink socket.

    Raises:
        NetlinkError: the datagram holds an error answer to a request.
    """
    out = []
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size or pos + length > len(data):
            break
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, pos + _NLMSGHDR.size)
            if code != 0:
                raise NetlinkError(-code, f"nfnetlink refused a request (errno {-code})")
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            packet_id, payload = None, b""
            apos = pos + _NLMSGHDR.size + _NFGENMSG.size
            end = pos + length
            while apos + _NLATTR.size <= end:
                alen, akind = _NLATTR.unpack_from(data, apos)
                if alen < _NLATTR.size:
                    break
                value = data[apos + _NLATTR.size:apos + alen]
                akind &= 0x7FFF  # strip NLA_F_NESTED / NLA_F_NET_BYTEORDER
                if akind == NFQA_PACKET_HDR:
                    (packet_id,) = struct.unpack_from("!I", value)
                elif akind == NFQA_PAYLOAD:
                    payload = value
                apos += _align(alen)
            if packet_id is not None:
                out.append(QueuedPacket(packet_id, payload))
        pos += _align(length)
    return out


def _ones_complement_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def with_l4_checksum(packet: bytes) -> bytes:
    """An IPv4 packet with its TCP or UDP checksum recomputed (other packets as they are)."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return packet
    ihl = (packet[0] & 0x0F) * 4
    proto = packet[9]
    offsets = {6: 16, 17: 6}  # where TCP and UDP keep their checksum
    if proto not in offsets or len(packet) < ihl + offsets[proto] + 2:
        return packet
    total_len = struct.unpack_from("!H", packet, 2)[0]
    segment = bytearray(packet[ihl:total_len])
    at = offsets[proto]
    segment[at:at + 2] = b"\0\0"
    pseudo = packet[12:20] + struct.pack("!BBH", 0, proto, len(segment))
    csum = 0xFFFF - _ones_complement_sum(pseudo + bytes(segment))
    if proto == 17 and csum == 0:
        csum = 0xFFFF  # UDP: zero means "no checksum"
    segment[at:at + 2] = struct.pack("!H", csum)
    return packet[:ihl] + bytes(segment) + packet[total_len:]
