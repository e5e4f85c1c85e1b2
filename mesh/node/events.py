"""The node's event feed: what ``meshctl events`` shows.

Theory of operation
===================

A node already learns of everything worth an event: membership changes from SWIM,
leader changes from Raft, and every change of services, allocations and node
overrides from the replicated state's change list. :class:`EventLog` turns those
observations into events (one line each, for people) and keeps the last
:data:`MAX_EVENTS` in a ring, numbered by a sequence so that a follower (``meshctl
events -f``) asks for what came after the last one it saw. It is pure: the daemon
feeds it and stamps the wall-clock time.

Allocation events compare a record with the one this log saw before, so one
committed report yields the events people care about: ``placed``, ``running``,
``healthy``/``unhealthy``, ``exited``, ``failed``, ``complete``, ``stopping``,
``stopped``, ``removed``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from mesh.raft.state import AllocRecord, Change, NodeOverride, ServiceRecord, Table

MAX_EVENTS: Final = 2000
"""Events kept per node (older ones are forgotten)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One event.

    Attributes:
        seq: increases by one per event on this node.
        time: wall-clock seconds when this node learnt of it.
        kind: ``member``, ``leader``, ``service``, ``alloc`` or ``node``.
        subject: what it is about (a node, a service, an allocation id).
        action: what happened (``dead``, ``elected``, ``updated``, ``running``...).
        detail: more words for people (may be empty).
    """

    seq: int
    time: float
    kind: str
    subject: str
    action: str
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {"seq": self.seq, "time": self.time, "kind": self.kind,
                "subject": self.subject, "action": self.action, "detail": self.detail}


class EventLog:
    """A bounded ring of events, fed with observations (see the module docstring)."""

    def __init__(self, max_events: int = MAX_EVENTS) -> None:
        self._events: deque[Event] = deque(maxlen=max_events)
        self._seq = 0
        self._allocs: dict[str, AllocRecord] = {}
        self._services: dict[str, ServiceRecord] = {}

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest event (0: none yet)."""
        return self._seq

    def since(self, seq: int, limit: int = 500) -> list[Event]:
        """Events after ``seq``, oldest first, at most ``limit``."""
        return [e for e in self._events if e.seq > seq][:limit]

    def add(self, time: float, kind: str, subject: str, action: str, detail: str = "") -> None:
        """Record one event."""
        self._seq += 1
        self._events.append(Event(self._seq, time, kind, subject, action, detail))

    def member(self, time: float, node: str, status: str, addr: str) -> None:
        """SWIM changed a member's status."""
        self.add(time, "member", node, status, addr)

    def leader(self, time: float, leader: str | None, term: int) -> None:
        """This node learnt of a new Raft leader (or lost it)."""
        if leader is None:
            self.add(time, "leader", "-", "lost", f"term {term}: no leader known")
        else:
            self.add(time, "leader", leader, "elected", f"term {term}")

    def seed(self, records: Iterable[AllocRecord | ServiceRecord]) -> None:
        """Remember records as they are now, without events (start-up, or after the
        change list was compacted)."""
        for r in records:
            if isinstance(r, AllocRecord):
                self._allocs[r.id] = r
            else:
                self._services[r.name] = r

    def changes(self, time: float, changes: Iterable[Change]) -> None:
        """Committed changes of the replicated state."""
        for ch in changes:
            if ch.table is Table.ALLOC:
                self._alloc(time, ch.key, ch.record)
            elif ch.table is Table.SERVICE:
                self._service(time, ch.key, ch.record)
            elif ch.table is Table.NODE:
                rec = ch.record
                if rec is None:
                    self.add(time, "node", ch.key, "cleared", "overrides removed")
                elif isinstance(rec, NodeOverride):
                    labels = ",".join(f"{k}={v}" for k, v in rec.labels)
                    self.add(time, "node", ch.key, "drain" if rec.drain else "active",
                             f"labels {labels or '-'}")

    def _service(self, time: float, name: str, rec: object) -> None:
        old = self._services.pop(name, None)
        if not isinstance(rec, ServiceRecord):
            self.add(time, "service", name, "removed")
            return
        self._services[name] = rec
        if old is None:
            self.add(time, "service", name, "created", f"version {rec.version}")
        elif old.version != rec.version:
            kind = "rolling update" if rec.generation != old.generation else "no restart"
            self.add(time, "service", name, "updated", f"version {rec.version} ({kind})")
        elif (old.rollout, old.rollout_message) != (rec.rollout, rec.rollout_message) \
                and rec.rollout:
            self.add(time, "service", name, f"update_{rec.rollout}", rec.rollout_message)

    def _alloc(self, time: float, aid: str, rec: object) -> None:
        old = self._allocs.pop(aid, None)
        if not isinstance(rec, AllocRecord):
            self.add(time, "alloc", aid, "removed", old.node if old else "")
            return
        self._allocs[aid] = rec
        where = f"{rec.service} on {rec.node}"
        if old is None:
            self.add(time, "alloc", aid, "placed", f"{where} (generation {rec.generation})")
            return
        if old.desired != rec.desired and rec.desired == "stop":
            self.add(time, "alloc", aid, "stopping", where)
        if old.state != rec.state:
            detail = f"{where}: {rec.message}" if rec.message else where
            self.add(time, "alloc", aid, rec.state, detail)
        if old.health != rec.health and rec.health in ("healthy", "unhealthy") \
                and rec.state == "running":
            self.add(time, "alloc", aid, rec.health, where)
        if rec.restarts > old.restarts:
            self.add(time, "alloc", aid, "restarted", f"{where}: restart {rec.restarts}")
