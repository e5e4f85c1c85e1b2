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

:class:`CatalogBuilder` numbers the snapshots: the generation only moves when the
content changes, so rebuilding after a membership event that DNS does not care about
(an incarnation bump, a metadata change) keeps the answer cache warm.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
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


@dataclass(frozen=True, slots=True)
class Catalog:
    """A frozen snapshot of everything DNS answers from. Build it with
    :func:`build_catalog` or :class:`CatalogBuilder`, never by hand.

    Attributes:
        generation: increases whenever the content changes; the answer cache is
            dropped when it changes. It is also the SOA serial.
        nodes: every node membership knows, sorted by name.
        endpoints: the endpoints on alive nodes (ready or not), sorted.
        local_node: the node answering; the SOA and NS name it.
        skipped: why some inputs were left out (one line each, for a log).
        node_index: alive nodes by lower-case name (``b"n1"``).
        service_index: ready endpoints by lower-case service name.
        alloc_index: ready endpoints by lower-case allocation id.
    """

    generation: int
    nodes: tuple[NodeRecord, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    local_node: NodeId | None = None
    skipped: tuple[str, ...] = field(default=(), compare=False)
    node_index: Mapping[bytes, NodeRecord] = field(default_factory=dict, compare=False,
                                                   repr=False)
    service_index: Mapping[bytes, tuple[Endpoint, ...]] = field(default_factory=dict,
                                                                compare=False, repr=False)
    alloc_index: Mapping[bytes, Endpoint] = field(default_factory=dict, compare=False,
                                                  repr=False)

    def same_content(self, other: Catalog) -> bool:
        """Whether ``other`` would answer every query the same way (generation aside)."""
        return (self.nodes == other.nodes and self.endpoints == other.endpoints
                and self.local_node == other.local_node)

    @property
    def services(self) -> dict[ServiceId, tuple[Endpoint, ...]]:
        """Endpoints (ready or not) of alive nodes, by service name."""
        out: dict[ServiceId, list[Endpoint]] = {}
        for ep in self.endpoints:
            out.setdefault(ep.service, []).append(ep)
        return {k: tuple(v) for k, v in out.items()}


def _ip_text(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


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
        endpoints: the service endpoints of the local replica, in any order.
        generation: the snapshot's number (see :class:`CatalogBuilder`).
        local_node: the answering node, named by the SOA and NS records.

    Returns:
        The snapshot. Inputs that cannot be answered are listed in ``skipped``.
    """
    skipped: list[str] = []
    nodes: list[NodeRecord] = []
    node_index: dict[bytes, NodeRecord] = {}
    alive: set[NodeId] = set()
    for m in sorted(members, key=lambda m: m.node):
        ip = _ip_text(m.addr.host)
        record = NodeRecord(m.node, (ip,) if ip else (), m.status <= Status.SUSPECT)
        nodes.append(record)
        if not record.alive:
            continue
        alive.add(m.node)
        key = name_key(m.node)
        if key is None:
            skipped.append(f"node {m.node!r}: its name is not a DNS name")
        elif key in node_index:
            skipped.append(f"node {m.node!r}: differs from {node_index[key].name!r} only "
                           "in case")
        else:
            node_index[key] = record

    kept: list[Endpoint] = []
    for ep in sorted(set(endpoints), key=_endpoint_order):
        if ep.node not in alive:
            continue  # freshness: a dead, left or unknown node's endpoints vanish
        ip = _ip_text(ep.ip)
        if ip is not None and ip != ep.ip:
            ep = Endpoint(ep.alloc, ep.service, ep.node, ip, ep.port, ep.port_name,
                          ep.protocol, ep.tags, ep.ready)
        problem = _endpoint_problem(ep)
        if problem is not None:
            skipped.append(f"endpoint {ep.alloc!r} of {ep.service!r}: {problem}")
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
            skipped.append(f"endpoint {ep.alloc!r} of {ep.service!r}: another ready "
                           "endpoint has the same allocation id; only the first is answered")
        else:
            alloc_index[akey] = ep
    return Catalog(
        generation=generation,
        nodes=tuple(nodes),
        endpoints=tuple(kept),
        local_node=local_node,
        skipped=tuple(skipped),
        node_index=node_index,
        service_index={k: tuple(v) for k, v in service_lists.items()},
        alloc_index=alloc_index,
    )


def _endpoint_order(ep: Endpoint) -> tuple[str, str, str, str, int, str, str,
                                           tuple[str, ...], bool]:
    return (ep.service, ep.alloc, ep.node, ep.ip, ep.port, ep.port_name, ep.protocol,
            ep.tags, ep.ready)


class CatalogBuilder:
    """Numbers snapshots: the generation moves only when the content changes.

    Call :meth:`build` after every membership or endpoint change; it returns the
    previous snapshot itself when nothing DNS answers differs, so the server keeps
    its answer cache.
    """

    def __init__(self, local_node: NodeId | None = None) -> None:
        self._local_node = local_node
        self._current = Catalog(generation=0, local_node=local_node)

    @property
    def current(self) -> Catalog:
        """The newest snapshot (generation 0 and empty before the first build)."""
        return self._current

    def build(self, members: Iterable[MemberView], endpoints: Iterable[Endpoint]) -> Catalog:
        """Build a snapshot; the same object as before if the content is unchanged."""
        candidate = build_catalog(members, endpoints, generation=self._current.generation + 1,
                                  local_node=self._local_node)
        if candidate.same_content(self._current):
            return self._current
        self._current = candidate
        return candidate
