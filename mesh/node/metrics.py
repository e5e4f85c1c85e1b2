"""Prometheus text exposition of a node's counters (pure formatting, no I/O)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric family with its samples.

    Attributes:
        name: the full metric name (``meshd_gossip_probes_total``).
        kind: ``counter`` or ``gauge``.
        help: one line of documentation.
        samples: ``(labels, value)`` pairs; labels are ``(key, value)`` tuples.
    """

    name: str
    kind: str
    help: str
    samples: tuple[tuple[tuple[tuple[str, str], ...], float], ...]


def counter(name: str, help_text: str, value: float) -> Metric:
    """A counter with one unlabelled sample."""
    return Metric(name, "counter", help_text, (((), value),))


def gauge(name: str, help_text: str, value: float) -> Metric:
    """A gauge with one unlabelled sample."""
    return Metric(name, "gauge", help_text, (((), value),))


def summary(name: str, help_text: str, quantiles: tuple[tuple[float, float], ...]) -> Metric:
    """A summary's quantile samples (``quantile`` label), e.g. of a recent window."""
    return Metric(name, "summary", help_text,
                  tuple(((("quantile", f"{q:g}"),), v) for q, v in quantiles))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def render(metrics: Iterable[Metric], const_labels: dict[str, str]) -> str:
    """Render the text format (version 0.0.4), adding ``const_labels`` to every sample."""
    lines: list[str] = []
    for m in metrics:
        lines.append(f"# HELP {m.name} {m.help}")
        lines.append(f"# TYPE {m.name} {m.kind}")
        for labels, value in m.samples:
            pairs = sorted(const_labels.items()) + list(labels)
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
            lines.append(f"{m.name}{{{label_text}}} {_number(value)}" if label_text
                         else f"{m.name} {_number(value)}")
    return "\n".join(lines) + "\n"
