"""The node's configuration: one frozen object that groups the subpackage configs.

Only the ``meshd`` entry point builds it (from flags and the data dir); everything
else receives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mesh.dns.config import DnsConfig
from mesh.errors import ConfigError
from mesh.gossip.config import GossipConfig
from mesh.types import Addr, NodeId

DEFAULT_PORT = 7946
"""The gossip port, UDP and TCP."""

DEFAULT_METRICS_PORT = 9946
"""The Prometheus metrics port, on loopback by default."""

DRIVERS = ("auto", "docker", "process")
"""``meshd start --driver`` choices."""

RESERVED_LABEL_PREFIX = "meshd."
"""Node labels meshd sets itself (``meshd.driver``)."""

GOSSIP_PROFILES = {"lan": GossipConfig.lan, "wan": GossipConfig.wan, "local": GossipConfig.local}


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything one ``meshd`` needs to run.

    Attributes:
        data_dir: where the node keeps its identity, peers and (later) state.
        name: the node's unique name (its id).
        bind: the address the gossip UDP socket and TCP listener bind.
        advertise: the address other members use to reach this node.
        join: seeds to join through; empty starts a new cluster (or rejoins the
            peers remembered in the data dir).
        labels: ``--label K=V`` pairs, sorted.
        cpu_millis: schedulable CPU announced to the cluster (thousandths of a core).
        memory_bytes: schedulable memory announced to the cluster.
        role: free-form role announced to the cluster.
        metrics_bind: where the Prometheus endpoint listens; ``None`` disables it.
        gossip: SWIM timing and sizes.
        dns: the DNS server's configuration; ``None`` disables it.
        driver: the workload driver: ``auto`` (docker if an engine answers, else
            process), ``docker`` or ``process``.
        docker_pull: let the docker driver pull images it does not have.
    """

    data_dir: Path
    name: NodeId
    bind: Addr
    advertise: Addr
    join: tuple[Addr, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    cpu_millis: int = 0
    memory_bytes: int = 0
    role: str = "worker"
    metrics_bind: Addr | None = None
    gossip: GossipConfig = field(default_factory=GossipConfig.lan)
    dns: DnsConfig | None = None
    driver: str = "auto"
    docker_pull: bool = False

    def __post_init__(self) -> None:
        if self.driver not in DRIVERS:
            raise ConfigError(f"driver {self.driver!r} is not one of {', '.join(DRIVERS)}")
        for key, _ in self.labels:
            if key.startswith(RESERVED_LABEL_PREFIX):
                raise ConfigError(f"label {key!r}: labels starting with "
                                  f"{RESERVED_LABEL_PREFIX!r} are meshd's own")
        if not self.name or len(self.name) > 128 or not self.name.isprintable() \
                or " " in self.name:
            raise ConfigError(f"node name {self.name!r} must be 1-128 printable characters "
                              "without spaces")
        if self.advertise.host in ("0.0.0.0", "::"):
            raise ConfigError("cannot advertise a wildcard address: pass --advertise IP:PORT "
                              "with an address other nodes can reach")

    @property
    def socket_path(self) -> Path:
        """The local API's unix socket (owner-only)."""
        return self.data_dir / "meshd.sock"

    @property
    def allocs_dir(self) -> Path:
        """Where the drivers keep their workloads' state and output (the docker
        driver: the output of containers it removed)."""
        return self.data_dir / "allocs"


def parse_label(text: str) -> tuple[str, str]:
    """Parse ``K=V`` (``--label zone=a``).

    Raises:
        ConfigError: no ``=`` or an empty key.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"label {text!r} is not KEY=VALUE (e.g. --label zone=a)")
    return key, value.strip()


def default_route_interfaces(route_table: str) -> list[str]:
    """The interfaces of the IPv4 default routes in ``/proc/net/route`` text, lowest
    metric first (a malformed line is skipped)."""
    found: list[tuple[int, str]] = []
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        iface, destination, flags, metric, mask = (fields[0], fields[1], fields[3],
                                                   fields[6], fields[7])
        try:
            up = int(flags, 16) & 0x1
            default = int(destination, 16) == 0 and int(mask, 16) == 0
            order = int(metric)
        except ValueError:
            continue
        if up and default:
            found.append((order, iface))
    return [iface for _, iface in sorted(found)]


def choose_advertise(default_ifaces: list[str], addresses: dict[str, str]) -> str:
    """The address to advertise when ``--bind`` is a wildcard and ``--advertise`` is
    not given, as Swarm and Nomad pick it: the IPv4 address of the interface of the
    default route; without a default route, the only non-loopback address there is.

    Args:
        default_ifaces: from :func:`default_route_interfaces`.
        addresses: interface -> its IPv4 address (interfaces without one left out).

    Raises:
        ConfigError: no address, or several and no default route to choose by.
    """
    for iface in default_ifaces:
        if iface in addresses:
            return addresses[iface]
    candidates = sorted({ip for iface, ip in addresses.items() if not ip.startswith("127.")})
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ConfigError("no address to advertise: this host has no IPv4 address but "
                          "loopback; pass --advertise IP:PORT")
    raise ConfigError(f"cannot choose an address to advertise among {', '.join(candidates)} "
                      "(no default route): pass --advertise IP:PORT")
