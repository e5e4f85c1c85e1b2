"""Concurrent KV clients that record a history for the linearizability checker.

Each client talks to its own node's API socket (moving to the next responsive
node when its own is down or frozen) and loops: pick a key among the current
epoch's keys, then get, put, compare-and-swap or delete it. Every operation is
recorded in a :class:`~mesh.testing.linearizability.History` with its invoke and
return times on the run clock:

* answered: completed with its output;
* refused before it was sent (nothing listens on the socket): forgotten
  (``History.fail``), it cannot have taken effect;
* anything else for a write (an error from the node, a timeout, a broken
  connection): left open, an *unknown* outcome, because the write may have been
  committed after all. Errors are not trusted to mean "not applied": only the
  checker decides.

meshd's compare-and-swap compares the key's ``mod_index``; the checker's model
compares values. They agree because every written value is unique (client id and
sequence number): the key holds the value a client read if and only if no write
happened since, i.e. its ``mod_index`` is unchanged. A CAS is therefore recorded
as ``CasInput(expected=value read, new=value written)``, after the get that
read the value and its ``mod_index``.

Keys change every ``key_epoch_s`` (``chaos/e<epoch>/k<j>``), so the checker,
which checks each key on its own, sees short histories.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import trio

from chaos.nodes import Unreachable
from chaos.scenario import Workload
from mesh.errors import MeshError
from mesh.testing.linearizability import CasInput, ClientId, History, OpKind

_CAS_FAILED: Final = re.compile(r"cas \d+ expects|is at mod_index \d+, not \d+")
"""meshd's messages for a compare-and-swap whose index did not match (a definite
"no": the state machine refused it)."""

_NOT_FOUND: Final = re.compile(r"key '.*' not found")


class ApiNode(Protocol):
    """What a client needs of a node (:class:`chaos.nodes.NodeProc` in a run)."""

    name: str

    def responsive(self) -> bool:
        """Running and not frozen."""
        ...

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout_s: float = 2.0) -> Any:
        """One API call; raises :class:`~chaos.nodes.Unreachable` if it was not sent,
        ``MeshError`` for an error answer, ``trio.TooSlowError`` on timeout."""
        ...


def is_cas_failure(message: str) -> bool:
    """True if an error message is meshd refusing a CAS because the index moved."""
    return _CAS_FAILED.search(message) is not None


@dataclass(slots=True)
class WorkloadStats:
    """Counts of the operations issued."""

    ops: int = 0
    ok: int = 0
    failed: int = 0
    unknown: int = 0
    acked_writes: int = 0
    keys: set[str] = field(default_factory=set)


class KvWorkload:
    """The clients, their shared history and counts.

    Args:
        spec: clients, keys, epochs, timeouts.
        nodes: every node (clients pick responsive ones).
        rng: decides keys and operations.
        now: the run clock.
    """

    def __init__(self, spec: Workload, nodes: Sequence[ApiNode], rng: random.Random,
                 now: Callable[[], float]) -> None:
        self.spec = spec
        self.nodes = list(nodes)
        self.rng = rng
        self.now = now
        self.history = History()
        self.stats = WorkloadStats()

    def _node_for(self, client: int) -> ApiNode | None:
        n = len(self.nodes)
        for k in range(n):
            node = self.nodes[(client + k) % n]
            if node.responsive():
                return node
        return None

    async def _call(self, node: ApiNode, method: str, params: dict[str, Any]) -> Any:
        return await node.call(method, params, timeout_s=self.spec.op_timeout_s)

    async def _get(self, client: ClientId, node: ApiNode, key: str
                   ) -> tuple[bool, str | None, int]:
        """A linearizable read; returns (answered, value, mod_index)."""
        h = self.history.invoke(client, OpKind.GET, key, None, self.now())
        self.stats.ops += 1
        try:
            entry = await self._call(node, "kv_get", {"key": key})
        except MeshError as exc:
            if _NOT_FOUND.search(str(exc)):
                self.history.complete(h, None, self.now())
                self.stats.ok += 1
                return True, None, 0
            self.history.fail(h)  # an unanswered read constrains nothing
            self.stats.failed += 1
            return False, None, 0
        except (trio.TooSlowError, trio.BrokenResourceError, OSError):
            self.history.fail(h)
            self.stats.failed += 1
            return False, None, 0
        value = entry["value"]
        text = value.decode() if isinstance(value, bytes) else str(value)
        self.history.complete(h, text, self.now())
        self.stats.ok += 1
        return True, text, int(entry["mod_index"])

    async def _write(self, client: ClientId, node: ApiNode, kind: OpKind, key: str,
                     op_input: str | CasInput | None, method: str,
                     params: dict[str, Any]) -> None:
        h = self.history.invoke(client, kind, key, op_input, self.now())
        self.stats.ops += 1
        try:
            await self._call(node, method, params)
        except Unreachable:
            self.history.fail(h)
            self.stats.failed += 1
            return
        except MeshError as exc:
            if kind is OpKind.CAS and is_cas_failure(str(exc)):
                self.history.complete(h, False, self.now())
                self.stats.ok += 1
                return
            self.stats.unknown += 1  # left open: it may have been committed
            return
        except (trio.TooSlowError, trio.BrokenResourceError, OSError):
            self.stats.unknown += 1
            return
        self.history.complete(h, True if kind is OpKind.CAS else None, self.now())
        self.stats.ok += 1
        self.stats.acked_writes += 1

    async def run_client(self, index: int) -> None:
        """One client's loop, until cancelled."""
        client = ClientId(f"c{index}")
        seq = 0
        while True:
            await trio.sleep(self.spec.pause_s)
            node = self._node_for(index)
            if node is None:
                continue
            epoch = int(self.now() // self.spec.key_epoch_s)
            key = f"chaos/e{epoch}/k{self.rng.randrange(self.spec.keys)}"
            self.stats.keys.add(key)
            seq += 1
            value = f"{client}-{seq}"
            rid = f"{client}-{seq}".encode()
            roll = self.rng.random()
            if roll < 0.4:
                await self._get(client, node, key)
            elif roll < 0.75:
                await self._write(client, node, OpKind.PUT, key, value, "kv_put",
                                  {"key": key, "value": value, "request_id": rid})
            elif roll < 0.95:
                answered, current, mod_index = await self._get(client, node, key)
                if answered:
                    await self._write(client, node, OpKind.CAS, key,
                                      CasInput(current, value), "kv_put",
                                      {"key": key, "value": value, "request_id": rid,
                                       "cas": mod_index})
            else:
                await self._write(client, node, OpKind.DELETE, key, None, "kv_del",
                                  {"key": key, "request_id": rid})

    async def final_reads(self, attempts: int = 20) -> list[str]:
        """Read every key used, after healing, so a lost acknowledged write shows up as
        a linearizability failure; returns the keys that could not be read."""
        unread = []
        client = ClientId("final")
        for key in sorted(self.stats.keys):
            for k in range(attempts):
                node = self._node_for(k)
                if node is not None and (await self._get(client, node, key))[0]:
                    break
                await trio.sleep(0.2)
            else:
                unread.append(key)
        return unread
