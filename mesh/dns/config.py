"""DNS configuration: the zone, TTLs, sizes, limits and where to listen.

Defaults serve a LAN: short TTLs so that a dead endpoint leaves client caches within
``ttl_s`` of leaving the catalogue, the DNS Flag Day 2020 EDNS buffer size (1232
bytes, which fits any IPv6 path without fragmentation), and bounds on everything a
client can make the server hold (cache entries, TCP connections, forwarded queries).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mesh.errors import ConfigError
from mesh.types import Addr

DEFAULT_PORT = 53
"""The standard DNS port, used when this process may bind it."""

FALLBACK_PORT = 8600
"""The port used when 53 cannot be bound (not root, or taken by a local resolver);
the same as Consul's, so operators recognise it."""

MAX_TTL_S = 2**31 - 1
"""RFC 2181 §8: a TTL is an unsigned 32-bit number whose top bit is zero."""


def normalize_zone(zone: str) -> str:
    """Lower-case ``zone`` and give it its trailing dot.

    Raises:
        ConfigError: a label is empty, longer than 63 bytes or not a letter, digit,
            hyphen or underscore; or the name is longer than 253 characters.
    """
    text = zone.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise ConfigError("the DNS zone cannot be the root: pass --dns-domain NAME (e.g. mesh)")
    if len(text) > 253:
        raise ConfigError(f"DNS zone {zone!r} is longer than 253 characters")
    for label in text.split("."):
        if not label or len(label) > 63 or not all(c.isascii() and (c.isalnum() or c in "-_")
                                                   for c in label):
            raise ConfigError(f"DNS zone {zone!r} has an invalid label {label!r}: use letters, "
                              "digits and hyphens, 1-63 of them per label")
    return text + "."


def _parse_bind(text: str, default_host: str) -> tuple[str, int | None]:
    """``HOST``, ``HOST:PORT``, ``[V6]``, ``[V6]:PORT``, ``V6`` or ``:PORT``; port 0
    is allowed (a free port), a missing port is ``None`` (53 else 8600)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"--dns-bind {text!r} is not [IPV6] or [IPV6]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if port_text and not (port_text.isdigit() and int(port_text) < 65536):
        raise ConfigError(f"--dns-bind {text!r}: port {port_text!r} is not a number "
                          "between 0 and 65535")
    if text.endswith(":") or text.endswith("]:"):
        raise ConfigError(f"--dns-bind {text!r}: the port is missing after ':'")
    return host or default_host, int(port_text) if port_text else None


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """How the embedded DNS server answers. Build with :meth:`lan` or :meth:`local`
    and adjust with :func:`dataclasses.replace`; the zone is normalised (lower case,
    trailing dot) on construction."""

    zone: str = "mesh."
    """The zone this server is authoritative for (``--dns-domain``). Default ``mesh.``."""

    ttl_s: int = 5
    """TTL in seconds of every positive answer. It bounds how long a client may keep
    using an endpoint after it left the catalogue (a dead node's endpoints leave it
    the moment SWIM declares the node dead). Default 5; 0 disables client caching."""

    negative_ttl_s: int = 1
    """TTL in seconds of negative answers: the SOA ``minimum`` field and the TTL of the
    SOA in the authority section (RFC 2308 §5). It bounds how long a client keeps
    believing a name does not exist, so a new service is visible to a client that
    asked too early within this time. Default 1."""

    bind_host: str = "0.0.0.0"
    """Address the UDP socket and the TCP listener bind (``--dns-bind``). It must be
    reachable from containers. Default all IPv4 addresses."""

    bind_port: int | None = None
    """Port to bind; ``None`` means 53 when this process may bind it, else 8600
    (``bind_dns_sockets`` tries them in that order). 0 picks a free port (tests)."""

    max_udp_payload_bytes: int = 512
    """Largest UDP answer to a query without EDNS (RFC 1035 §4.2.1: 512). Larger
    answers are truncated (TC bit) and the client retries over TCP."""

    edns_udp_payload_bytes: int = 1232
    """UDP payload size advertised in our OPT record and the most we send to an EDNS
    client: ``limit = max(max_udp_payload_bytes, min(client's size, this))``.
    Default 1232 (DNS Flag Day 2020: no IP fragmentation on any common path)."""

    upstream: Addr | None = None
    """Resolver that names outside the zone are forwarded to (``--dns-upstream``), over
    UDP (TCP when the upstream truncates an answer to a TCP client). ``None``: no
    forwarding, see :attr:`refuse_outside_zone`."""

    upstream_timeout_s: float = 2.0
    """Seconds to wait for the upstream before answering SERVFAIL. Default 2."""

    max_forwards_in_flight: int = 256
    """Forwarded queries awaiting the upstream at once; more are answered SERVFAIL
    at once rather than queued without bound. Default 256."""

    refuse_outside_zone: bool = True
    """With no upstream, how to treat names outside the zone: ``True`` answers
    REFUSED (RFC 8906 §3.1.5: what an authoritative-only server says), so a stub
    resolver moves on to its next nameserver at once; ``False`` sends no answer at
    all, for a server that should stay invisible to scanners. Default ``True``."""

    cache_max_entries: int = 10_000
    """Answers kept in wire form, one per (name, type, class, EDNS size, DO bit). The
    oldest entry is evicted when full; the whole cache is dropped when the catalogue
    changes. 0 disables the cache. Default 10,000 (a few MiB)."""

    tcp_idle_timeout_s: float = 10.0
    """Seconds a TCP connection may stay idle (no complete query) before it is
    closed (RFC 7766 §6.2.3 recommends seconds, not minutes). Default 10."""

    tcp_max_connections: int = 256
    """TCP connections served at once; a connection beyond this is closed as soon as
    it is accepted. Default 256."""

    tcp_max_queries_per_connection: int = 10_000
    """Queries answered on one TCP connection before it is closed, so that one client
    cannot hold a connection slot for ever. Default 10,000."""

    soa_refresh_s: int = 3600
    """SOA ``refresh`` (seconds). No secondaries exist; kept at a conventional value."""

    soa_retry_s: int = 600
    """SOA ``retry`` (seconds). Conventional value; nothing transfers the zone."""

    soa_expire_s: int = 86_400
    """SOA ``expire`` (seconds). Conventional value; nothing transfers the zone."""

    hostmaster: str = "hostmaster"
    """First label of the SOA ``rname`` (the zone contact): ``hostmaster.<zone>``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "zone", normalize_zone(self.zone))
        for name in ("ttl_s", "negative_ttl_s", "soa_refresh_s", "soa_retry_s",
                     "soa_expire_s"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_TTL_S:
                raise ConfigError(f"{name} must be between 0 and {MAX_TTL_S} seconds, "
                                  f"not {value}")
        if self.bind_port is not None and not 0 <= self.bind_port < 65536:
            raise ConfigError(f"DNS port {self.bind_port} is out of range 0-65535")
        if not 512 <= self.max_udp_payload_bytes <= 65_535:
            raise ConfigError("max_udp_payload_bytes must be between 512 and 65535 "
                              "(RFC 1035 requires at least 512)")
        if not self.max_udp_payload_bytes <= self.edns_udp_payload_bytes <= 65_535:
            raise ConfigError(f"edns_udp_payload_bytes ({self.edns_udp_payload_bytes}) must "
                              f"be between max_udp_payload_bytes "
                              f"({self.max_udp_payload_bytes}) and 65535")
        if self.upstream_timeout_s <= 0:
            raise ConfigError("upstream_timeout_s must be positive")
        if self.max_forwards_in_flight < 1:
            raise ConfigError("max_forwards_in_flight must be at least 1")
        if self.cache_max_entries < 0:
            raise ConfigError("cache_max_entries must be >= 0 (0 disables the cache)")
        if self.tcp_idle_timeout_s <= 0:
            raise ConfigError("tcp_idle_timeout_s must be positive")
        if self.tcp_max_connections < 1 or self.tcp_max_queries_per_connection < 1:
            raise ConfigError("tcp_max_connections and tcp_max_queries_per_connection "
                              "must be at least 1")
        if not self.hostmaster or len(self.hostmaster) > 63 or "." in self.hostmaster:
            raise ConfigError(f"hostmaster {self.hostmaster!r} must be one DNS label")
        if not self.bind_host:
            raise ConfigError("the DNS bind address is empty: pass --dns-bind HOST[:PORT]")

    @classmethod
    def lan(cls) -> DnsConfig:
        """Defaults for a cluster: all addresses, port 53 if allowed else 8600."""
        return cls()

    @classmethod
    def local(cls) -> DnsConfig:
        """Defaults for loopback tests and demos: 127.0.0.1, a free port, 1 s TTLs."""
        return cls(
            bind_host="127.0.0.1",
            bind_port=0,  # the kernel picks a free port; read it from the socket
            ttl_s=1,
            negative_ttl_s=1,
            upstream_timeout_s=1.0,
            tcp_idle_timeout_s=5.0,
            tcp_max_connections=64,
        )

    @classmethod
    def from_flags(cls, bind: str | None, domain: str = "mesh", upstream: str | None = None,
                   *, default_host: str = "0.0.0.0", base: DnsConfig | None = None
                   ) -> DnsConfig | None:
        """The config that ``meshd start --dns-bind/--dns-domain/--dns-upstream`` ask for.

        Args:
            bind: ``HOST``, ``HOST:PORT``, ``[V6]:PORT``, ``:PORT``, ``off`` (no DNS
                server) or ``None`` (``default_host``, port 53 if allowed else 8600).
                Without a port, the 53-else-8600 rule applies to ``HOST``.
            domain: the zone (``--dns-domain``).
            upstream: ``HOST[:PORT]`` of the resolver for other names, or ``None``.
            default_host: the host when ``bind`` names none (meshd passes the host of
                ``--bind``, so local clusters on 127.0.0.x do not collide).
            base: the preset the flags adjust (default :meth:`lan`).

        Raises:
            ConfigError: a flag is malformed; the message names the flag.
        """
        if bind is not None and bind.strip().lower() == "off":
            return None
        host, port = default_host, None
        if bind is not None and bind.strip():
            host, port = _parse_bind(bind.strip(), default_host)
        up: Addr | None = None
        if upstream:
            try:
                up = Addr.parse(upstream, 53)
            except ValueError as exc:
                raise ConfigError(f"--dns-upstream {upstream!r}: {exc}") from None
        preset = base if base is not None else cls.lan()
        return replace(preset, zone=domain, bind_host=host, bind_port=port, upstream=up)

    @property
    def bind(self) -> Addr | None:
        """The configured address, or ``None`` when the port is chosen at bind time."""
        return None if self.bind_port is None else Addr(self.bind_host, self.bind_port)


MAX_RESOLVERS = 3
"""Name servers a resolv.conf may list that the C library uses (glibc's MAXNS)."""


def container_resolvers(dns: Addr, advertise_host: str, host_resolv_conf: str) -> list[str]:
    """The name servers to give the node's containers: this node's DNS server first
    (service names), then the host's own name servers (names outside the cluster
    zone, which meshd refuses unless ``--dns-upstream`` is set; resolvers move on to
    the next server after a REFUSED). At most :data:`MAX_RESOLVERS`.

    Args:
        dns: where this node's DNS server listens (a wildcard host means every
            address: ``advertise_host`` is given to containers).
        advertise_host: the node's advertised address.
        host_resolv_conf: the text of the host's ``/etc/resolv.conf``.

    Returns:
        The list, or ``[]`` when the server is not on port 53 (a resolv.conf cannot
        name another port: containers then keep the host's resolvers).
    """
    if dns.port != DEFAULT_PORT:
        return []
    first = advertise_host if dns.host in ("", "0.0.0.0", "::") else dns.host
    servers = [first]
    for line in host_resolv_conf.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver" and fields[1] not in servers:
            servers.append(fields[1])
    return servers[:MAX_RESOLVERS]
