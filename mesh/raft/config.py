"""Raft tuning knobs: one frozen, validated dataclass with named presets.

Time inside the core is counted in logical *ticks*; the adapter calls
:meth:`mesh.raft.core.RaftCore.tick` every :attr:`RaftConfig.tick_interval_s`
seconds. Everything else in the core is a count or a byte size.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.errors import ConfigError

MAX_NODE_ID_BYTES = 255
"""Longest node id (UTF-8 bytes) the wire codec accepts; a DNS name fits."""


@dataclass(frozen=True, slots=True)
class RaftConfig:
    """Configuration of one :class:`~mesh.raft.core.RaftCore` (etcd ``raft.Config``).

    The defaults are the :meth:`lan` preset. ``__post_init__`` validates every
    field and every relation between fields and raises :class:`ConfigError`
    naming the field and what to change.
    """

    tick_interval_s: float = 0.05
    """Seconds between two ticks; read by the adapter only, never by the core.
    Default 0.05 s. Failover time is roughly
    ``(election_ticks .. 2 * election_ticks) * tick_interval_s`` plus one round trip."""

    election_ticks: int = 10
    """Ticks a follower waits without hearing from a leader before it starts an
    election. Each node draws its timeout uniformly from
    ``[election_ticks, 2 * election_ticks)`` with its injected RNG (Raft §5.2).
    Also the CheckQuorum period of a leader. Default 10 (0.5 s at the LAN tick)."""

    heartbeat_ticks: int = 1
    """Ticks between two heartbeats of a leader. Must be smaller than
    ``election_ticks``; etcd recommends ``election_ticks = 10 * heartbeat_ticks``.
    Default 1."""

    max_size_per_msg: int = 1024 * 1024
    """Upper bound in bytes of the entry payloads in one AppendEntries message
    (at least one entry is always sent, whatever its size). Default 1 MiB, well
    under the 8 MiB TCP frame limit."""

    max_inflight_msgs: int = 256
    """AppendEntries messages a leader keeps in flight to one follower while
    replicating optimistically (the pipelining window). Default 256."""

    max_inflight_bytes: int = 16 * 1024 * 1024
    """Bytes of entry payloads a leader keeps in flight to one follower; 0 means
    no byte limit (only ``max_inflight_msgs``). Default 16 MiB."""

    max_uncommitted_bytes: int = 64 * 1024 * 1024
    """Bytes of proposed but not yet committed entry payloads a leader accepts
    before it drops new proposals with ``ProposalDropped`` (backpressure);
    0 means no limit. Default 64 MiB."""

    max_committed_bytes_per_ready: int = 16 * 1024 * 1024
    """Bytes of committed entries handed out in one ``Ready`` for applying (at
    least one entry always). Default 16 MiB."""

    max_entry_bytes: int = 4 * 1024 * 1024
    """Largest payload of one proposal; larger ones raise ``ProposalDropped``.
    Default 4 MiB (must fit in one TCP frame with its envelope)."""

    snapshot_chunk_bytes: int = 1024 * 1024
    """Bytes of snapshot data in one InstallSnapshot chunk. Default 1 MiB."""

    max_snapshot_bytes: int = 1024 * 1024 * 1024
    """Largest snapshot a follower accepts from a leader (it buffers the chunks
    in memory until the last one). Default 1 GiB."""

    max_read_context_bytes: int = 256
    """Largest request context of a ReadIndex request. Default 256 bytes."""

    max_pending_reads: int = 4096
    """ReadIndex requests a leader keeps waiting for a heartbeat quorum before
    it drops new ones. Default 4096."""

    pre_vote: bool = True
    """Run a PreVote round before a real election (Raft thesis §9.6), so that a
    node rejoining after a partition cannot disrupt a healthy leader by bumping
    the term. Default on."""

    check_quorum: bool = True
    """A leader steps down when it has not heard from a quorum of voters within
    ``election_ticks``, and followers ignore vote requests while they believe a
    leader is alive (thesis §6.2 leader lease for votes). Default on."""

    step_down_on_removal: bool = True
    """A leader that applies its own removal (or demotion) hands leadership to
    the most up-to-date voter and steps down. Default on."""

    # --- adapter (mesh.raft.adapter) ------------------------------------------------

    send_queue_msgs: int = 1024
    """Messages queued for one peer before new ones are dropped (Raft resends what
    matters; a full queue also tells the core the peer is unreachable). Default 1024."""

    send_batch_bytes: int = 256 * 1024
    """Queued frames for one peer written with one ``send_all``, up to this many
    bytes. Default 256 KiB."""

    dial_timeout_s: float = 2.0
    """Seconds to open a stream to a peer before giving up. Default 2 s."""

    send_timeout_s: float = 5.0
    """Seconds one write to a peer may block before the stream is dropped and
    reopened (checked at every tick). Default 5 s."""

    reconnect_min_s: float = 0.05
    """First wait after a failed dial or send; doubles per failure up to
    ``reconnect_max_s`` (frames for the peer are dropped meanwhile). Default 50 ms."""

    reconnect_max_s: float = 2.0
    """Longest wait between two dials of an unreachable peer. Default 2 s."""

    stream_idle_timeout_s: float = 30.0
    """A peer stream with no frame for this long is closed (it is reopened on
    demand; a leader's heartbeats keep its streams busy). Outbound streams are
    checked at every tick; an inbound one closes at most a quarter later. Default
    30 s."""

    propose_timeout_s: float = 10.0
    """Seconds :meth:`~mesh.raft.adapter.RaftAdapter.propose` and ``read_index``
    wait for their entry to be applied before raising ``ProposalDropped`` (the
    outcome is then unknown: retry with the same request id). Default 10 s."""

    snapshot_entries: int = 10_000
    """Applied entries since the last snapshot after which the adapter snapshots
    the state machine and compacts the log. Default 10,000."""

    snapshot_keep_entries: int = 5_000
    """Entries kept before the snapshot index when compacting, so a follower a
    little behind catches up from the log instead of a snapshot. Default 5,000."""

    storage_retry_max_s: float = 5.0
    """Longest wait between two attempts to save a Ready after a storage error
    (a full disk): writes stop, nothing acknowledged is lost. Default 5 s."""

    def __post_init__(self) -> None:
        for name in (
            "election_ticks",
            "heartbeat_ticks",
            "max_size_per_msg",
            "max_inflight_msgs",
            "max_committed_bytes_per_ready",
            "max_entry_bytes",
            "snapshot_chunk_bytes",
            "max_snapshot_bytes",
            "max_read_context_bytes",
            "max_pending_reads",
            "send_queue_msgs",
            "send_batch_bytes",
            "snapshot_entries",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"raft {name} must be a positive integer, got {value!r}")
        for name in ("max_inflight_bytes", "max_uncommitted_bytes", "snapshot_keep_entries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"raft {name} must be >= 0 (0 = unlimited), got {value!r}")
        for name in (
            "tick_interval_s",
            "dial_timeout_s",
            "send_timeout_s",
            "reconnect_min_s",
            "reconnect_max_s",
            "stream_idle_timeout_s",
            "propose_timeout_s",
            "storage_retry_max_s",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"raft {name} must be > 0 seconds, got {value!r}")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ConfigError(
                f"raft reconnect_max_s ({self.reconnect_max_s}) must be at least "
                f"reconnect_min_s ({self.reconnect_min_s})"
            )
        if self.election_ticks <= self.heartbeat_ticks:
            raise ConfigError(
                f"raft election_ticks ({self.election_ticks}) must be greater than "
                f"heartbeat_ticks ({self.heartbeat_ticks}); use about 10x"
            )
        if self.max_entry_bytes > self.max_uncommitted_bytes > 0:
            raise ConfigError(
                "raft max_uncommitted_bytes must be 0 or at least max_entry_bytes "
                f"({self.max_entry_bytes}), got {self.max_uncommitted_bytes}"
            )

    @classmethod
    def lan(cls) -> RaftConfig:
        """Defaults for hosts on one LAN: 50 ms ticks, 0.5-1.0 s election timeout."""
        return cls(
            tick_interval_s=0.05,  # heartbeat every 50 ms
            election_ticks=10,  # 0.5 s .. 1.0 s randomized election timeout
            heartbeat_ticks=1,
        )

    @classmethod
    def local(cls) -> RaftConfig:
        """Defaults for nodes on one machine (loopback tests): 20 ms ticks."""
        return cls(
            tick_interval_s=0.02,  # heartbeat every 20 ms
            election_ticks=10,  # 0.2 s .. 0.4 s randomized election timeout
            heartbeat_ticks=1,
        )

    @classmethod
    def wan(cls) -> RaftConfig:
        """Defaults for voters spread over a WAN: 100 ms ticks, 2-4 s elections."""
        return cls(
            tick_interval_s=0.1,  # tick every 100 ms
            election_ticks=20,  # 2 s .. 4 s randomized election timeout
            heartbeat_ticks=2,  # heartbeat every 200 ms
            max_inflight_msgs=512,  # longer pipes need a bigger window
            snapshot_chunk_bytes=512 * 1024,
        )
