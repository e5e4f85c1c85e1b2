"""Constraint parsing and evaluation.

Grammar (whitespace around operators is optional for ``==``/``!=``)::

    constraint := KEY "==" VALUE | KEY "!=" VALUE
                | KEY "in" LIST | KEY "not in" LIST
                | KEY "exists" | KEY "not exists"
    KEY        := node.id | node.<attribute> | node.labels.<label> | <label>
    LIST       := "(" VALUE {"," VALUE} ")" | "[" ... "]" | VALUE {"," VALUE}
    VALUE      := text without commas, optionally in single or double quotes

A bare key is a label, so ``zone==a`` and Swarm's ``node.labels.zone==a`` mean the
same. Every malformed constraint raises :class:`~mesh.errors.ConfigError` with the
text, what is wrong and a spelling that works.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from mesh.errors import ConfigError
from mesh.placement.model import Constraint, NodeInfo, Op

_FORMS: Final = "KEY==VALUE, KEY!=VALUE, KEY in (A, B), KEY not in (A, B), KEY exists or KEY not exists"
_EQ_RE: Final = re.compile(r"(?P<key>.*?)\s*(?P<op>==|!=)\s*(?P<value>.*)", re.DOTALL)
_IN_RE: Final = re.compile(r"(?P<key>\S+)\s+(?P<op>not\s+in|in)(?:\s+|(?=[(\[]))(?P<values>.*)", re.I)
_EXISTS_RE: Final = re.compile(r"(?P<key>\S+)\s+(?P<op>not\s+exists|exists)", re.I)
_KEY_CHARS: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")


def parse_constraint(text: str) -> Constraint:
    """Parse one constraint such as ``"zone==a"`` or ``"node.platform.os in (linux)"``.

    Raises:
        ConfigError: the text is empty, has no operator or an unknown one, or a
            malformed key or value; the message shows a spelling that works.
    """
    if not isinstance(text, str):
        raise ConfigError(f"constraint {text!r} is not text")
    src = text.strip()
    if not src:
        raise ConfigError(f"empty constraint; expected {_FORMS}")
    match = _EQ_RE.fullmatch(src)
    if match is not None:
        op = Op.EQ if match["op"] == "==" else Op.NE
        value = _value(match["value"], src)
        if "==" in value or "!=" in value:
            raise ConfigError(f"constraint {src!r} has more than one operator")
        return Constraint(_key(match["key"], src), op, (value,))
    match = _IN_RE.fullmatch(src)
    if match is not None:
        op = Op.NOT_IN if match["op"].lower() != "in" else Op.IN
        return Constraint(_key(match["key"], src), op, _values(match["values"], src))
    match = _EXISTS_RE.fullmatch(src)
    if match is not None:
        op = Op.EXISTS if match["op"].lower() == "exists" else Op.NOT_EXISTS
        return Constraint(_key(match["key"], src), op, ())
    single = re.fullmatch(r"([^=!<>\s]+)\s*(=|<>|=>|>=|<=|>|<|~=)\s*(.*)", src)
    if single is not None:
        hint = "!=" if single[2] == "<>" else "=="
        if single[2] in ("=", "<>"):
            raise ConfigError(
                f"constraint {src!r} uses '{single[2]}'; write {single[1]}{hint}{single[3]}"
            )
        raise ConfigError(
            f"constraint {src!r} uses '{single[2]}', which placement does not support; "
            f"expected {_FORMS}"
        )
    raise ConfigError(f"constraint {src!r} has no operator; expected {_FORMS}")


def parse_constraints(texts: Iterable[str]) -> tuple[Constraint, ...]:
    """Parse several constraints (see :func:`parse_constraint`).

    Raises:
        ConfigError: the first malformed one.
    """
    if isinstance(texts, str):
        raise ConfigError(f"expected a list of constraints, got the text {texts!r}")
    return tuple(parse_constraint(t) for t in texts)


def matches(constraint: Constraint, node: NodeInfo) -> bool:
    """True if ``node`` satisfies ``constraint`` (a missing key satisfies only the
    negative operators)."""
    value = node.value_of(constraint.key)
    op = constraint.op
    if op is Op.EQ:
        return value == constraint.values[0]
    if op is Op.NE:
        return value != constraint.values[0]
    if op is Op.IN:
        return value is not None and value in constraint.values
    if op is Op.NOT_IN:
        return value is None or value not in constraint.values
    if op is Op.EXISTS:
        return value is not None
    return value is None


def first_failed(constraints: Iterable[Constraint], node: NodeInfo) -> Constraint | None:
    """The first constraint ``node`` fails, in the order given, or ``None``."""
    for constraint in constraints:
        if not matches(constraint, node):
            return constraint
    return None


def canonical_key(key: str) -> str:
    """The canonical form of a key people wrote: ``zone`` -> ``node.labels.zone``.

    Raises:
        ConfigError: the key is empty, malformed or names an unsupported namespace.
    """
    raw = key.strip()
    if not raw:
        raise ConfigError("constraint key is empty")
    if not _KEY_CHARS.fullmatch(raw):
        raise ConfigError(
            f"constraint key {raw!r} has characters a key cannot contain "
            "(letters, digits, '_', '.', '/', '-')"
        )
    if raw.startswith("engine.labels."):
        raise ConfigError(
            f"constraint key {raw!r}: engine labels are not supported; "
            f"use node.labels.{raw[len('engine.labels.'):]}"
        )
    if raw == "node" or raw == "node.labels" or raw == "node.labels.":
        raise ConfigError(f"constraint key {raw!r} names nothing; use e.g. node.labels.zone or node.id")
    if raw.startswith("node."):
        return raw
    return "node.labels." + raw


def _key(text: str, src: str) -> str:
    try:
        return canonical_key(text)
    except ConfigError as exc:
        raise ConfigError(f"constraint {src!r}: {exc}") from None


def _value(text: str, src: str) -> str:
    value = text.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    elif any(ch in value for ch in "'\""):
        raise ConfigError(f"constraint {src!r} has an unbalanced quote")
    if not value:
        raise ConfigError(f"constraint {src!r} has an empty value")
    return value


def _values(text: str, src: str) -> tuple[str, ...]:
    body = text.strip()
    if body[:1] in "([":
        closing = ")" if body[0] == "(" else "]"
        if not body.endswith(closing):
            raise ConfigError(f"constraint {src!r}: list opened with {body[0]!r} is not closed")
        body = body[1:-1]
    if not body.strip():
        raise ConfigError(f"constraint {src!r} has an empty list; write e.g. zone in (a, b)")
    return tuple(_value(part, src) for part in body.split(","))
