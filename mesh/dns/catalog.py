"""The catalogue the DNS answers are computed from: a frozen snapshot, pure.

Theory of operation
-------------------
DNS never reads live state. Whoever owns the state (the daemon) builds a
:class:`Catalog` snapshot from what this node knows, SWIM membership and the service
endpoints of its local replica, and hands it to the server, which answers every
query from one snapshot at a time. A snapshot never changes; a new one replaces it.

The freshness rules are applied here, once per snapshot, not per query:

* a node is *alive* for DNS while SWIM says ``alive`` or ``suspect`` (a suspicion is
  not a death: Lifeguard refutes most of them within a probe round, and dropping a
  suspect's endpoints would make answers flap); ``dead`` and ``left`` nodes are kept
  with ``alive=False`` and never answered;
* an endpoint whose node is not alive, or unknown to membership, is dropped at build
  time, so a dead node's endpoints vanish from answers the moment SWIM declares it
  dead and a new snapshot is built;
* an endpoint that is not ``ready`` (its readiness check has not passed) stays in
  the snapshot but is never answered.

Names must be usable as DNS labels (letters, digits, ``-`` and ``_``, 1-63 of them,
matched case-insensitively); service names, tags, port names and allocation ids are
one label each, node names may hold dots. Anything else is left out and reported in
:attr:`Catalog.skipped`, so the daemon can log it once.

:class:`CatalogBuilder` makes the snapshots: in full (:meth:`CatalogBuilder.build`)
or by applying only the members and allocations that changed
(:meth:`CatalogBuilder.update`), with the same result. The generation only moves
when the content changes, so a membership event that DNS does not care about (an
incarnation bump, a metadata change) keeps the answer cache warm; and each new
snapshot carries a :class:`CatalogDelta` naming the services, allocations and
nodes whose answers may differ, so the answer cache keeps every other answer.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from mesh.gossip.core import MemberView
from mesh.gossip.messages import Status
from mesh.types import AllocId, NodeId, ServiceId

_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def label_key(text: str) -> bytes | None:
    """The lower-case wire form of a one-label name, or ``None`` if it is not one."""
    if not 0 < len(text) <= 63 or not _LABEL_CHARS.issuperset(text):
        return None
    return text.lower().encode("ascii")


def name_key(text: str) -> bytes | None:
    """The lower-case dotted form of a name of one or more labels, or ``None``."""
    if not 0 < len(text) <= 253:
        return None
    parts = [label_key(p) for p in text.split(".")]
    if any(p is None for p in parts):
        return None
    return text.lower().encode("ascii")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One reachable instance of a service.

    Attributes:
        alloc: the allocation this endpoint belongs to (``<alloc>.alloc.<zone>``).
        service: the service it serves (``<service>.service.<zone>``).
        node: the node it runs on; its liveness decides whether it is answered.
        ip: the IPv4 or IPv6 address clients connect to.
        port: the port clients connect to (1-65535).
        port_name: the name of the port (``_<port_name>._<protocol>.<service>...``);
            empty when the port has no name.
        protocol: ``tcp`` or ``udp`` (the RFC 2782 ``_proto`` label).
        tags: free-form tags (``<tag>.<service>.service.<zone>``).
        ready: whether its readiness check passed; unready endpoints are never
            answered.
    """

    alloc: AllocId
    service: ServiceId
    node: NodeId
    ip: str
    port: int
    port_name: str = ""
    protocol: str = "tcp"
    tags: tuple[str, ...] = ()
    ready: bool = True


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node as DNS sees it.

    Attributes:
        name: the node's id (``<name>.node.<zone>``).
        ips: its addresses (from its advertised gossip address), sorted.
        alive: SWIM says alive or suspect; dead and left nodes are never answered.
    """

    name: NodeId
    ips: tuple[str, ...]
    alive: bool


ProblemKey = tuple[int, str] | tuple[int, tuple[str, str, str, str, int, str, str,
                                                tuple[str, ...], bool]]
"""Orders :attr:`Catalog.problems`: ``(0, node)`` for nodes, ``(1, endpoint order)``
for endpoints that cannot be answered, ``(2, endpoint order)`` for endpoints that
share an allocation id with an earlier one."""


@dataclass(frozen=True, slots=True)
class CatalogDelta:
    """Which names may answer differently in a snapshot than in the one it was
    derived from; every other cached answer stays valid.

    A change of an endpoint names its service (every name below
    ``<service>.service``: tags, ports, the ``_<proto>`` parent) and its allocation;
    a change of a node's record names ``<node>.node`` and also the services and
    allocations with ready endpoints on it (their SRV targets and glue). Negative
    answers are covered the same way: a name that starts to exist is one whose
    service, allocation or node is listed.

    Attributes:
        base: the generation of the snapshot this one was derived from.
        nodes: lower-case node names (``b"n1"``).
        services: lower-case service names.
        allocs: lower-case allocation ids.
    """

    base: int
    nodes: frozenset[bytes] = frozenset()
    services: frozenset[bytes] = frozenset()
    allocs: frozenset[bytes] = frozenset()


@dataclass(frozen=True, slots=True)
class Catalog:
    """A frozen snapshot of everything DNS answers from. Build it with
    :func:`build_catalog` or :class:`CatalogBuilder`, never by hand.

    Attributes:
        generation: increases whenever the content changes; it is also the SOA
            serial.
        nodes: every node membership knows, sorted by name.
        endpoints: the endpoints on alive nodes (ready or not), sorted.
        local_node: the node answering; the SOA and NS name it.
        problems: why some inputs were left out, keyed in the order
            :attr:`skipped` lists them.
        node_index: alive nodes by lower-case name (``b"n1"``).
        service_index: ready endpoints by lower-case service name.
        alloc_index: ready endpoints by lower-case allocation id.
        delta: what changed since the snapshot of generation ``delta.base`` of the
            same builder (``lineage``); ``None`` when unknown (a first or full
            build, or the local node's record changed, which the SOA and NS of
            every answer name): the answer cache is then dropped whole.
        lineage: the builder that made this snapshot (compared by identity), so a
            delta is only applied to its own base.
    """

    generation: int
    nodes: tuple[NodeRecord, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    local_node: NodeId | None = None
    problems: Mapping[ProblemKey, str] = field(default_factory=dict, compare=False,
                                               repr=False)
    node_index: Mapping[bytes, NodeRecord] = field(default_factory=dict, compare=False,
                                                   repr=False)
    service_index: Mapping[bytes, tuple[Endpoint, ...]] = field(default_factory=dict,
                                                                compare=False, repr=False)
    alloc_index: Mapping[bytes, Endpoint] = field(default_factory=dict, compare=False,
                                                  repr=False)
    delta: CatalogDelta | None = field(default=None, compare=False, repr=False)
    lineage: object = field(default=None, compare=False, repr=False)

    def same_content(self, other: Catalog) -> bool:
        """Whether ``other`` would answer every query the same way (generation aside)."""
        return (self.nodes == other.nodes and self.endpoints == other.endpoints
                and self.local_node == other.local_node)

    @property
    def skipped(self) -> tuple[str, ...]:
        """Why some inputs were left out, one line each (for a log): nodes by name,
        then endpoints in :attr:`endpoints` order."""
        return tuple(self.problems[k] for k in sorted(self.problems))

    @property
    def services(self) -> dict[ServiceId, tuple[Endpoint, ...]]:
        """Endpoints (ready or not) of alive nodes, by service name."""
        out: dict[ServiceId, list[Endpoint]] = {}
        for ep in self.endpoints:
            out.setdefault(ep.service, []).append(ep)
        return {k: tuple(v) for k, v in out.items()}


@functools.lru_cache(maxsize=4096)
def _ip_text(host: str) -> str | None:
    """The canonical text of an IP address literal (``None``: not one). Memoised:
    every endpoint of a node has its address, and a full build asks twice per
    endpoint (about half of its time in ``ipaddress`` before)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _normalised(ep: Endpoint) -> Endpoint:
    """``ep`` with its address in canonical form (when it is an address)."""
    ip = _ip_text(ep.ip)
    if ip is None or ip == ep.ip:
        return ep
    return Endpoint(ep.alloc, ep.service, ep.node, ip, ep.port, ep.port_name, ep.protocol,
                    ep.tags, ep.ready)


def _endpoint_problem(ep: Endpoint) -> str | None:
    if label_key(ep.service) is None:
        return f"service name {ep.service!r} is not a DNS label"
    if label_key(ep.alloc) is None:
        return f"allocation id {ep.alloc!r} is not a DNS label"
    if _ip_text(ep.ip) is None:
        return f"address {ep.ip!r} is not an IP address"
    if not 0 < ep.port < 65536:
        return f"port {ep.port} is out of range 1-65535"
    if ep.port_name and label_key(ep.port_name) is None:
        return f"port name {ep.port_name!r} is not a DNS label"
    if ep.protocol not in ("tcp", "udp"):
        return f"protocol {ep.protocol!r} is neither tcp nor udp"
    for tag in ep.tags:
        if label_key(tag) is None or tag.startswith("_"):
            return f"tag {tag!r} is not a DNS label (or starts with '_')"
    return None


def _problem_line(ep: Endpoint, problem: str) -> str:
    return f"endpoint {ep.alloc!r} of {ep.service!r}: {problem}"


def _duplicate_line(ep: Endpoint) -> str:
    return (f"endpoint {ep.alloc!r} of {ep.service!r}: another ready endpoint has the "
            "same allocation id; only the first is answered")


def _case_line(node: NodeId, first: NodeId) -> str:
    return f"node {node!r}: differs from {first!r} only in case"


def _bad_node_line(node: NodeId) -> str:
    return f"node {node!r}: its name is not a DNS name"


def _node_record(node: NodeId, host: str, alive: bool) -> NodeRecord:
    ip = _ip_text(host)
    return NodeRecord(node, (ip,) if ip else (), alive)


def build_catalog(
    members: Iterable[MemberView],
    endpoints: Iterable[Endpoint],
    *,
    generation: int,
    local_node: NodeId | None = None,
) -> Catalog:
    """Build a snapshot from membership and endpoints, applying the freshness rules.

    Args:
        members: every member this node knows (``Membership.members()``).
        endpoints: the service endpoints of the local replica, in any order
            (duplicates, also in another spelling of the address, count once).
        generation: the snapshot's number (see :class:`CatalogBuilder`).
        local_node: the answering node, named by the SOA and NS records.

    Returns:
        The snapshot. Inputs that cannot be answered are listed in ``skipped``.
    """
    return _build_catalog(members, endpoints, generation, local_node)[0]


def _build_catalog(members: Iterable[MemberView], endpoints: Iterable[Endpoint],
                   generation: int, local_node: NodeId | None
                   ) -> tuple[Catalog, list[Endpoint]]:
    """:func:`build_catalog`, and the endpoints given, normalised, without
    duplicates, in endpoint order (what :class:`CatalogBuilder` indexes)."""
    problems: dict[ProblemKey, str] = {}
    nodes: list[NodeRecord] = []
    node_index: dict[bytes, NodeRecord] = {}
    alive: set[NodeId] = set()
    for m in sorted(members, key=lambda m: m.node):
        record = _node_record(m.node, m.addr.host, m.status <= Status.SUSPECT)
        nodes.append(record)
        if not record.alive:
            continue
        alive.add(m.node)
        key = name_key(m.node)
        if key is None:
            problems[(0, m.node)] = _bad_node_line(m.node)
        elif key in node_index:
            problems[(0, m.node)] = _case_line(m.node, node_index[key].name)
        else:
            node_index[key] = record

    kept: list[Endpoint] = []
    given = sorted({_normalised(ep) for ep in endpoints}, key=_endpoint_order)
    for ep in given:
        if ep.node not in alive:
            continue  # freshness: a dead, left or unknown node's endpoints vanish
        problem = _endpoint_problem(ep)
        if problem is not None:
            problems[(1, _endpoint_order(ep))] = _problem_line(ep, problem)
            continue
        kept.append(ep)

    service_lists: dict[bytes, list[Endpoint]] = {}
    alloc_index: dict[bytes, Endpoint] = {}
    for ep in kept:
        if not ep.ready:
            continue
        service_lists.setdefault(label_key(ep.service) or b"", []).append(ep)
        akey = label_key(ep.alloc) or b""
        if akey in alloc_index:
            problems[(2, _endpoint_order(ep))] = _duplicate_line(ep)
        else:
            alloc_index[akey] = ep
    return Catalog(
        generation=generation,
        nodes=tuple(nodes),
        endpoints=tuple(kept),
        local_node=local_node,
        problems=problems,
        node_index=node_index,
        service_index={k: tuple(v) for k, v in service_lists.items()},
        alloc_index=alloc_index,
    ), given


def _endpoint_order(ep: Endpoint) -> tuple[str, str, str, str, int, str, str,
                                           tuple[str, ...], bool]:
    return (ep.service, ep.alloc, ep.node, ep.ip, ep.port, ep.port_name, ep.protocol,
            ep.tags, ep.ready)


def _remove_sorted(items: list[Endpoint], ep: Endpoint) -> None:
    """Remove ``ep`` from ``items`` (sorted by endpoint order, without duplicates)."""
    i = bisect.bisect_left(items, _endpoint_order(ep), key=_endpoint_order)
    assert items[i] == ep, f"{ep} is not in the list it was added to"
    del items[i]


class CatalogBuilder:
    """Makes the snapshots one after the other: in full (:meth:`build`) or by
    applying only what changed (:meth:`update`).

    Theory of operation: the builder keeps the inputs (member liveness and
    addresses, endpoints by allocation) and the answerable indexes, and updates
    them in place for each changed member or allocation, noting the index keys it
    touched. A snapshot copies the indexes that changed (a C-level copy; the Python
    work is proportional to the change) and carries a :class:`CatalogDelta`, found
    by comparing the touched keys with the previous snapshot, so the answer cache
    drops only the answers of the names involved. The generation moves only when
    the content changes: rebuilding after a membership event DNS does not care
    about (an incarnation bump, a metadata change) returns the previous snapshot
    itself and keeps the cache warm.

    An :meth:`update` gives exactly the snapshot that :func:`build_catalog` would
    build from the same members and endpoints
    (``tests/test_dns_incremental.py`` checks it on random sequences).
    """

    def __init__(self, local_node: NodeId | None = None) -> None:
        self._local_node = local_node
        self._local_key = name_key(local_node) if local_node is not None else None
        self._lineage = object()
        self._current = Catalog(generation=0, local_node=local_node, lineage=self._lineage)
        self._load(self._current, (), ())

    @property
    def current(self) -> Catalog:
        """The newest snapshot (generation 0 and empty before the first build)."""
        return self._current

    # --- full builds ----------------------------------------------------------------

    def build(self, members: Iterable[MemberView], endpoints: Iterable[Endpoint]) -> Catalog:
        """Build a snapshot from everything (at start, or when the inputs were
        replaced wholesale); the same object as before if the content is unchanged
        (a copy with the same generation if only :attr:`Catalog.skipped` changed).
        The cached answers of names whose records differ are dropped, as after an
        :meth:`update`."""
        members = list(members)
        old = self._current
        candidate, given = _build_catalog(members, endpoints, old.generation + 1,
                                          self._local_node)
        self._load(candidate, members, given)
        if candidate.same_content(old):
            if candidate.problems != old.problems:  # what to log changed, not answers
                self._current = dataclasses.replace(old, problems=candidate.problems)
            return self._current
        changes = _index_changes(
            old, candidate.node_index, candidate.service_index, candidate.alloc_index,
            old.node_index.keys() | candidate.node_index.keys(),
            old.service_index.keys() | candidate.service_index.keys(),
            old.alloc_index.keys() | candidate.alloc_index.keys())
        delta = self._delta(old.generation, *changes)
        self._current = dataclasses.replace(candidate, delta=delta, lineage=self._lineage)
        return self._current

    def _load(self, catalog: Catalog, members: Iterable[MemberView],
              endpoints: Sequence[Endpoint]) -> None:
        """Take ``catalog`` as the state to update from; it was built from
        ``members`` and ``endpoints`` (normalised, unique, in endpoint order)."""
        self._members: dict[NodeId, tuple[str, bool]] = {
            m.node: (m.addr.host, m.status <= Status.SUSPECT) for m in members}
        self._records: dict[NodeId, NodeRecord] = {r.name: r for r in catalog.nodes}
        self._alive: set[NodeId] = {r.name for r in catalog.nodes if r.alive}
        self._names: dict[bytes, set[NodeId]] = {}
        """Every member name by lower-case name (to find who shares a key)."""
        self._groups: dict[bytes, list[NodeId]] = {}
        """Alive members by lower-case name, sorted: the first one is answered."""
        for record in catalog.nodes:
            key = name_key(record.name)
            if key is None:
                continue
            self._names.setdefault(key, set()).add(record.name)
            if record.alive:
                self._groups.setdefault(key, []).append(record.name)
        grouped: dict[AllocId, list[Endpoint]] = {}
        self._on_node: dict[NodeId, set[AllocId]] = {}
        for ep in endpoints:
            grouped.setdefault(ep.alloc, []).append(ep)
            self._on_node.setdefault(ep.node, set()).add(ep.alloc)
        self._inputs: dict[AllocId, tuple[Endpoint, ...]] = {
            alloc: tuple(eps) for alloc, eps in grouped.items()}
        """Endpoints as given, normalised, by allocation (sorted, no duplicates)."""
        kept: dict[AllocId, list[Endpoint]] = {}
        self._ready_by_alloc: dict[bytes, list[Endpoint]] = {}
        """Ready endpoints by lower-case allocation id, sorted: the first is answered."""
        for ep in catalog.endpoints:
            kept.setdefault(ep.alloc, []).append(ep)
            if ep.ready:
                self._ready_by_alloc.setdefault(label_key(ep.alloc) or b"", []).append(ep)
        self._kept = {alloc: tuple(eps) for alloc, eps in kept.items()}
        """The endpoints of each allocation in the snapshot (alive node, valid)."""
        self._problem_keys: dict[AllocId, list[ProblemKey]] = {}
        """The problems of each allocation's endpoints (kind 1)."""
        self._case_nodes: dict[bytes, list[NodeId]] = {}
        """Alive nodes not answered because another has the same lower-case name."""
        self._duplicates: dict[bytes, list[ProblemKey]] = {}
        """The problems of ready endpoints hidden by another with the same id (kind 2)."""
        for problem in catalog.problems:
            kind, subject = problem
            if kind == 0:
                assert isinstance(subject, str)
                lower = name_key(subject)
                if lower is not None:
                    self._case_nodes.setdefault(lower, []).append(NodeId(subject))
            else:
                assert isinstance(subject, tuple)
                if kind == 1:
                    self._problem_keys.setdefault(AllocId(subject[1]), []).append(problem)
                else:
                    self._duplicates.setdefault(label_key(subject[1]) or b"",
                                                []).append(problem)
        self._sorted = list(catalog.endpoints)
        self._by_service = {k: list(v) for k, v in catalog.service_index.items()}
        self._problems = dict(catalog.problems)
        self._node_index = dict(catalog.node_index)
        self._service_index = dict(catalog.service_index)
        self._alloc_index = dict(catalog.alloc_index)
        self._touched_nodes: set[bytes] = set()
        self._touched_services: set[bytes] = set()
        self._touched_allocs: set[bytes] = set()
        self._nodes_changed = False
        self._endpoints_changed = False

    # --- updates --------------------------------------------------------------------

    def update(self, members: Iterable[MemberView] | None = None,
               endpoints: Mapping[AllocId, Sequence[Endpoint]] | None = None) -> Catalog:
        """Apply what changed and return the next snapshot (the same object if
        nothing DNS answers from changed).

        Args:
            members: every member this node knows now (compared with the last
                ones), or ``None`` if membership did not change.
            endpoints: the new endpoints of each allocation that changed (all of
                them, ready or not; empty: it has none any more). Each endpoint's
                ``alloc`` is the key it is given under.

        Returns:
            The snapshot, equal to :func:`build_catalog` of the same members and
            endpoints, with a :class:`CatalogDelta` against the previous one. When
            only :attr:`Catalog.skipped` changed, a copy of the previous snapshot
            with the same generation.
        """
        if members is not None:
            self._update_members(members)
        for alloc, eps in (endpoints or {}).items():
            assert all(ep.alloc == alloc for ep in eps), f"endpoints given as {alloc!r}"
            new = tuple(sorted({_normalised(ep) for ep in eps}, key=_endpoint_order))
            old = self._inputs.get(alloc, ())
            if new == old:
                continue
            kept = self._kept.get(alloc, ())
            self._drop(alloc)
            for node in {ep.node for ep in old}:
                on = self._on_node[node]
                on.discard(alloc)
                if not on:
                    del self._on_node[node]
            if new:
                self._inputs[alloc] = new
                for ep in new:
                    self._on_node.setdefault(ep.node, set()).add(alloc)
            else:
                self._inputs.pop(alloc, None)
            self._add(alloc)
            if self._kept.get(alloc, ()) != kept:
                self._endpoints_changed = True
        return self._publish()

    def _update_members(self, members: Iterable[MemberView]) -> None:
        seen: set[NodeId] = set()
        for m in members:
            seen.add(m.node)
            now = (m.addr.host, m.status <= Status.SUSPECT)
            if self._members.get(m.node) != now:
                self._set_member(m.node, now)
        if len(seen) != len(self._members):
            for node in sorted(set(self._members) - seen):
                self._set_member(node, None)  # forgotten (reaped): as if never known

    def _set_member(self, node: NodeId, now: tuple[str, bool] | None) -> None:
        was_alive = node in self._alive
        alive = now is not None and now[1]
        key = name_key(node)
        if now is None:
            del self._members[node]
            record = self._records.pop(node)
            self._nodes_changed = True
            if key is not None:
                self._names[key].discard(node)
                if not self._names[key]:
                    del self._names[key]
        else:
            self._members[node] = now
            record = _node_record(node, now[0], alive)
            if self._records.get(node) != record:
                self._records[node] = record
                self._nodes_changed = True
            if key is not None:
                self._names.setdefault(key, set()).add(node)
        if key is None:
            if alive:
                self._problems[(0, node)] = _bad_node_line(node)
            else:
                self._problems.pop((0, node), None)
        else:
            self._touched_nodes.add(key)
            group = self._groups.setdefault(key, [])
            if was_alive:
                group.remove(node)
            if alive:
                bisect.insort(group, node)
            if not group:
                del self._groups[key]
        if alive != was_alive:
            allocs = sorted(self._on_node.get(node, ()))
            before = [self._kept.get(alloc, ()) for alloc in allocs]
            for alloc in allocs:
                self._drop(alloc)
            if alive:
                self._alive.add(node)
            else:
                self._alive.discard(node)
            for alloc in allocs:
                self._add(alloc)
            if before != [self._kept.get(alloc, ()) for alloc in allocs]:
                self._endpoints_changed = True

    def _drop(self, alloc: AllocId) -> None:
        """Take ``alloc``'s endpoints and problems out of the snapshot state."""
        for key in self._problem_keys.pop(alloc, ()):
            del self._problems[key]
        for ep in self._kept.pop(alloc, ()):
            _remove_sorted(self._sorted, ep)
            if not ep.ready:
                continue
            skey = label_key(ep.service) or b""
            akey = label_key(ep.alloc) or b""
            _remove_sorted(self._by_service[skey], ep)
            _remove_sorted(self._ready_by_alloc[akey], ep)
            self._touched_services.add(skey)
            self._touched_allocs.add(akey)

    def _add(self, alloc: AllocId) -> None:
        """Put ``alloc``'s endpoints (on alive nodes) and problems into the state."""
        kept: list[Endpoint] = []
        for ep in self._inputs.get(alloc, ()):
            if ep.node not in self._alive:
                continue
            problem = _endpoint_problem(ep)
            if problem is not None:
                key: ProblemKey = (1, _endpoint_order(ep))
                self._problems[key] = _problem_line(ep, problem)
                self._problem_keys.setdefault(alloc, []).append(key)
                continue
            kept.append(ep)
        if not kept:
            return
        self._kept[alloc] = tuple(kept)
        for ep in kept:
            bisect.insort(self._sorted, ep, key=_endpoint_order)
            if not ep.ready:
                continue
            skey = label_key(ep.service) or b""
            akey = label_key(ep.alloc) or b""
            bisect.insort(self._by_service.setdefault(skey, []), ep, key=_endpoint_order)
            bisect.insort(self._ready_by_alloc.setdefault(akey, []), ep, key=_endpoint_order)
            self._touched_services.add(skey)
            self._touched_allocs.add(akey)

    def _settle(self) -> None:
        """Bring the indexes and the problems of the touched keys up to date."""
        for key in self._touched_nodes:
            for node in self._case_nodes.pop(key, ()):
                del self._problems[(0, node)]
            group = self._groups.get(key)
            if group:
                self._node_index[key] = self._records[group[0]]
                if len(group) > 1:
                    self._case_nodes[key] = group[1:]
                    for node in group[1:]:
                        self._problems[(0, node)] = _case_line(node, group[0])
            else:
                self._node_index.pop(key, None)
        for key in self._touched_services:
            eps = self._by_service.get(key)
            if eps:
                self._service_index[key] = tuple(eps)
            else:
                self._by_service.pop(key, None)
                self._service_index.pop(key, None)
        for key in self._touched_allocs:
            for problem in self._duplicates.pop(key, ()):
                del self._problems[problem]
            ready = self._ready_by_alloc.get(key)
            if ready:
                self._alloc_index[key] = ready[0]
                if len(ready) > 1:
                    dups: list[ProblemKey] = []
                    for ep in ready[1:]:
                        dups.append((2, _endpoint_order(ep)))
                        self._problems[dups[-1]] = _duplicate_line(ep)
                    self._duplicates[key] = dups
            else:
                self._ready_by_alloc.pop(key, None)
                self._alloc_index.pop(key, None)

    def _publish(self) -> Catalog:
        """The next snapshot: the previous one if the content did not change."""
        self._settle()
        touched = (self._touched_nodes, self._touched_services, self._touched_allocs)
        self._touched_nodes, self._touched_services, self._touched_allocs = set(), set(), set()
        nodes_changed, endpoints_changed = self._nodes_changed, self._endpoints_changed
        self._nodes_changed = self._endpoints_changed = False
        old = self._current
        if not (nodes_changed or endpoints_changed):
            if self._problems != old.problems:  # what to log changed, not what to answer
                self._current = dataclasses.replace(old, problems=dict(self._problems))
            return self._current
        nodes, services, allocs = _index_changes(old, self._node_index, self._service_index,
                                                 self._alloc_index, *touched)
        self._current = Catalog(
            generation=old.generation + 1,
            nodes=tuple(self._records[n] for n in sorted(self._records)) if nodes_changed
            else old.nodes,
            endpoints=tuple(self._sorted) if endpoints_changed else old.endpoints,
            local_node=self._local_node,
            problems=dict(self._problems),
            node_index=dict(self._node_index) if nodes else old.node_index,
            service_index=dict(self._service_index) if services else old.service_index,
            alloc_index=dict(self._alloc_index) if allocs else old.alloc_index,
            delta=self._delta(old.generation, nodes, services, allocs),
            lineage=self._lineage,
        )
        return self._current

    def _delta(self, base: int, nodes: frozenset[bytes], services: frozenset[bytes],
               allocs: frozenset[bytes]) -> CatalogDelta | None:
        """The delta of these index changes, adding the services and allocations
        whose SRV answers name a changed node (target and glue)."""
        if self._local_key is not None and self._local_key in nodes:
            return None  # the SOA and NS of every answer name the local node
        more_services: set[bytes] = set()
        more_allocs: set[bytes] = set()
        for key in nodes:
            for node in self._names.get(key, ()):
                for alloc in self._on_node.get(node, ()):
                    for ep in self._kept.get(alloc, ()):
                        if ep.ready:
                            more_services.add(label_key(ep.service) or b"")
                            more_allocs.add(label_key(ep.alloc) or b"")
        return CatalogDelta(base, nodes, services | more_services, allocs | more_allocs)


def _index_changes(old: Catalog, node_index: Mapping[bytes, NodeRecord],
                   service_index: Mapping[bytes, tuple[Endpoint, ...]],
                   alloc_index: Mapping[bytes, Endpoint], nodes: Iterable[bytes],
                   services: Iterable[bytes], allocs: Iterable[bytes]
                   ) -> tuple[frozenset[bytes], frozenset[bytes], frozenset[bytes]]:
    """The keys among those given whose entry differs from ``old``'s."""
    return (frozenset(k for k in nodes if old.node_index.get(k) != node_index.get(k)),
            frozenset(k for k in services if old.service_index.get(k) != service_index.get(k)),
            frozenset(k for k in allocs if old.alloc_index.get(k) != alloc_index.get(k)))
