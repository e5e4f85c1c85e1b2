"""Ready-made members and catalogues for tests, benchmarks and demos (pure).

Shipped in the package (STYLE 1.3) so that tests, ``bench/dns.py`` and the chaos
harness build the same shapes.
"""

from __future__ import annotations

from mesh.dns.catalog import Catalog, Endpoint, build_catalog
from mesh.gossip.core import MemberView
from mesh.gossip.messages import Meta, Status
from mesh.types import Addr, AllocId, NodeId, ServiceId


def member(name: str, ip: str, status: Status = Status.ALIVE) -> MemberView:
    """A member as ``Membership.members()`` would list it."""
    return MemberView(NodeId(name), Addr(ip, 7946), 1, status, Meta(), 0.0)


def endpoint(alloc: str, service: str, node: str, ip: str, port: int = 8080, *,
             port_name: str = "http", protocol: str = "tcp", tags: tuple[str, ...] = (),
             ready: bool = True) -> Endpoint:
    """An endpoint with string arguments."""
    return Endpoint(AllocId(alloc), ServiceId(service), NodeId(node), ip, port, port_name,
                    protocol, tags, ready)


def synthetic_catalog(services: int = 100, endpoints_per_service: int = 3, nodes: int = 10,
                      *, generation: int = 1) -> Catalog:
    """``services`` services ``svc<i>`` with ``endpoints_per_service`` ready endpoints
    each, spread round-robin over ``nodes`` alive nodes ``n<j>`` (10.0.0.j); each
    endpoint listens on its node's address, port 8000 + i, tagged ``v1``."""
    members = [member(f"n{j}", f"10.0.{j // 250}.{j % 250 + 1}") for j in range(nodes)]
    eps = []
    k = 0
    for i in range(services):
        for e in range(endpoints_per_service):
            m = members[k % nodes]
            eps.append(endpoint(f"svc{i}-{e}", f"svc{i}", m.node, m.addr.host, 8000 + i,
                                tags=("v1",)))
            k += 1
    return build_catalog(members, eps, generation=generation, local_node=members[0].node)
