"""Every exception meshd raises on purpose lives here, under :class:`MeshError`.

Operating errors (bad remote input, a full disk, a port in use) are handled and
reported; programmer errors are ``assert``-ed and crash. Messages shown to a person
say what to do next.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base class of every error meshd raises deliberately."""


class ConfigError(MeshError):
    """A configuration value, or a relation between values, is invalid."""


class ProtocolError(MeshError):
    """A protocol rule was broken (base of the local/remote pair, as in h11)."""


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol forbids (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """A peer sent bytes we cannot accept: malformed, oversized, foreign or of
    another major version. Adapters drop the packet, count it and carry on."""


class StreamClosed(RemoteProtocolError):
    """The peer closed the stream before a whole frame arrived (it stopped, or
    gave up on the connection)."""


class NotLeader(MeshError):
    """A proposal reached a Raft node that is not the leader.

    Attributes:
        leader_hint: the node this one believes leads, or ``None`` if unknown.
    """

    def __init__(self, leader_hint: str | None) -> None:
        super().__init__(f"not the leader (leader hint: {leader_hint or 'unknown'})")
        self.leader_hint = leader_hint


class ProposalDropped(MeshError):
    """A proposal was dropped (e.g. during a leadership transfer); retry it."""


class StorageError(MeshError):
    """Persistent storage failed (full disk, corruption, permissions)."""


class DriverError(MeshError):
    """A workload driver (docker, process) failed to do what was asked."""


class StartupError(MeshError):
    """``meshd`` cannot start (port in use, unreachable join address, unwritable
    data dir). The message is the one line printed before exiting non-zero."""
