"""The DNS server's statistics record and its Prometheus metric families (pure).

The daemon adds :func:`dns_metrics` of ``DnsServer.statistics()`` to its page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from mesh.dns.answer import AnswerStatistics
from mesh.node.metrics import Metric, counter, gauge

LATENCY_BUCKETS_S: Final = (0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
                            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Upper bounds of the answer latency histogram (seconds, from a message read to its
answer sent; forwarded queries include the upstream's time)."""


@dataclass(frozen=True, slots=True)
class DnsServerStatistics:
    """Counters since start (``DnsServer.statistics()``).

    Attributes:
        answers: the responder's counters (queries by type, answers by rcode, cache).
        udp_in: datagrams received.
        udp_out: datagrams sent.
        tcp_connections: TCP connections accepted and served.
        tcp_refused: TCP connections closed at once because too many were open.
        tcp_queries: messages received over TCP.
        send_failures: answers the network refused or that would have blocked.
        receive_errors: socket errors while receiving (e.g. ICMP port unreachable).
        internal_errors: messages dropped because the responder raised (a bug).
        forward_failures: forwarded queries answered SERVFAIL (timeout, error, or
            too many in flight).
        latency_buckets_s: histogram upper bounds (the last bucket, +Inf, is implied).
        latency_counts: answers per bucket, not cumulative; one more than the bounds.
        latency_sum_s: total latency of all answers.
    """

    answers: AnswerStatistics
    udp_in: int
    udp_out: int
    tcp_connections: int
    tcp_refused: int
    tcp_queries: int
    send_failures: int
    receive_errors: int
    internal_errors: int
    forward_failures: int
    latency_buckets_s: tuple[float, ...]
    latency_counts: tuple[int, ...]
    latency_sum_s: float

    def latency_quantile_s(self, q: float) -> float:
        """The upper bound of the bucket holding quantile ``q`` (0-1) of the answer
        latency; ``inf`` if it lies beyond the last bound, 0 with no answers."""
        total = sum(self.latency_counts)
        if total == 0:
            return 0.0
        rank = q * total
        seen = 0
        for bound, count in zip(self.latency_buckets_s + (float("inf"),),
                                self.latency_counts, strict=True):
            seen += count
            if seen >= rank:
                return bound
        return float("inf")


def dns_metrics(stats: DnsServerStatistics, prefix: str = "meshd_dns_") -> list[Metric]:
    """The metric families of one DNS server.

    The latency histogram is rendered as its three conventional series
    (``_bucket`` with cumulative ``le`` labels, ``_sum``, ``_count``), each typed as a
    counter, since :class:`~mesh.node.metrics.Metric` holds one name per family;
    ``histogram_quantile()`` works on them as on a native histogram.
    """
    a = stats.answers
    cumulative: list[tuple[tuple[tuple[str, str], ...], float]] = []
    seen = 0
    for bound, count in zip(stats.latency_buckets_s + (float("inf"),), stats.latency_counts,
                            strict=True):
        seen += count
        cumulative.append(((("le", "+Inf" if bound == float("inf") else repr(bound)),),
                           float(seen)))
    return [
        Metric(prefix + "queries_total", "counter", "DNS queries by question type.",
               tuple(((("qtype", t),), float(n)) for t, n in a.queries_by_type)),
        Metric(prefix + "responses_total", "counter", "DNS answers by response code.",
               tuple(((("rcode", r),), float(n)) for r, n in a.responses_by_rcode)),
        counter(prefix + "dropped_total", "Messages that got no answer (responses, runts, "
                "silent refusals, internal errors).", a.dropped + stats.internal_errors),
        counter(prefix + "forwarded_total", "Queries forwarded to the upstream.",
                a.forwarded),
        counter(prefix + "forward_failures_total",
                "Forwarded queries answered SERVFAIL (upstream timeout or error).",
                stats.forward_failures),
        counter(prefix + "truncated_total", "UDP answers sent with the TC bit.", a.truncated),
        counter(prefix + "cache_hits_total", "Answers assembled from the wire-form cache.",
                a.cache_hits),
        counter(prefix + "cache_misses_total", "Answers built from the catalogue.",
                a.cache_misses),
        counter(prefix + "cache_evictions_total", "Cached answers evicted (cache full).",
                a.cache_evictions),
        counter(prefix + "cache_flushes_total", "Whole-cache drops for a new catalogue.",
                a.cache_flushes),
        counter(prefix + "cache_invalidated_total",
                "Cached answers dropped because a new catalogue changed their name.",
                a.cache_invalidated),
        counter(prefix + "cache_kept_total",
                "Cached answers that outlived a catalogue change (summed over changes).",
                a.cache_kept),
        gauge(prefix + "cache_entries", "Answers held in the cache.", a.cache_entries),
        gauge(prefix + "catalog_generation", "Generation of the catalogue answered from.",
              a.generation),
        counter(prefix + "udp_packets_in_total", "Datagrams received.", stats.udp_in),
        counter(prefix + "udp_packets_out_total", "Datagrams sent.", stats.udp_out),
        counter(prefix + "tcp_connections_total", "TCP connections served.",
                stats.tcp_connections),
        counter(prefix + "tcp_refused_total", "TCP connections closed: too many open.",
                stats.tcp_refused),
        counter(prefix + "tcp_queries_total", "Messages received over TCP.",
                stats.tcp_queries),
        counter(prefix + "send_failures_total", "Answers the network refused.",
                stats.send_failures),
        counter(prefix + "receive_errors_total", "Socket errors while receiving.",
                stats.receive_errors),
        counter(prefix + "internal_errors_total",
                "Messages dropped because answering raised (a bug: report it).",
                stats.internal_errors),
        Metric(prefix + "latency_seconds_bucket", "counter",
               "Answer latency histogram (cumulative buckets).", tuple(cumulative)),
        counter(prefix + "latency_seconds_sum", "Total answer latency.", stats.latency_sum_s),
        counter(prefix + "latency_seconds_count", "Answers timed.",
                float(sum(stats.latency_counts))),
    ]
