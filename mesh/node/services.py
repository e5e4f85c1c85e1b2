"""The workload API: services, allocations and node overrides, from any node.

Writes (``service_apply``, ``service_scale``, ``service_rollback``, ``service_rm``,
``node_drain``/``node_activate``/``node_label``) become state commands committed
through the leader (forwarded if this node does not lead). Reads are linearizable
(a ReadIndex round) unless ``stale`` is set, and then come from this node's replica.
Placement explanations rebuild the scheduler from the same inputs the leader uses,
so every node explains a placement the same way.

The JSON documents returned are contracts (``meshctl ls --json``, ``ps --json``):
``service_ls`` objects have at least ``name``, ``desired``, ``running``,
``healthy``; ``service_ps`` objects at least ``id``, ``service``, ``node``,
``state``, ``healthy``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from mesh.dns.catalog import Catalog, CatalogBuilder, Endpoint
from mesh.errors import ConfigError, MeshError
from mesh.gossip.core import Membership, MemberView
from mesh.node import api
from mesh.node.orchestrate import (
    DRIVER_LABEL,
    ServiceView,
    decode_services,
    driver_of,
    node_infos,
    scheduler_for,
    spec_for,
    user_labels,
)
from mesh.node.replica import Replica
from mesh.node.spec import WorkloadSpec, needs_restart, spec_diff
from mesh.raft.state import (
    AllocRecord,
    Change,
    MeshState,
    NodeSet,
    ResultCode,
    ServiceDelete,
    ServicePut,
    ServiceRecord,
    Table,
)
from mesh.raft.storage import Compacted
from mesh.types import AllocId, NodeId, ServiceId

LOGGER = logging.getLogger(__name__)

CAS_RETRIES = 5
"""Attempts of a read-modify-write of a service racing another writer."""

_CATALOG_TABLES = (Table.ALLOC, Table.SERVICE)
"""The tables whose changes :class:`EndpointIndex` reads (key-value writes dropped
from the change list do not force a full catalogue build)."""

LogsFn = Callable[[AllocId, int], Awaitable[bytes]]
"""Reads the last lines of a local allocation's output: ``(alloc, tail)``."""


class ServiceApi:
    """API handlers for workloads (see the module docstring).

    Args:
        replica: the node's replica.
        core: membership (node addresses and liveness).
        local_logs: reads an allocation's output on this node.
    """

    def __init__(self, replica: Replica, core: Membership, local_logs: LogsFn) -> None:
        self._replica = replica
        self._core = core
        self._local_logs = local_logs

    def handlers(self) -> dict[str, api.Handler]:
        """The API methods."""
        return {
            "service_apply": self.apply,
            "service_rm": self.remove,
            "service_scale": self.scale,
            "service_rollback": self.rollback,
            "service_ls": self.ls,
            "service_ps": self.ps,
            "service_inspect": self.inspect,
            "service_explain": self.explain,
            "service_logs": self.logs,
            "alloc_logs": self.alloc_logs,
            "nodes": self.nodes,
            "node_drain": self.drain,
            "node_activate": self.activate,
            "node_label": self.label,
        }

    # ------------------------------------------------------------------ writes

    async def apply(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Create or change services from stored-form specs (``to_dict``);
        applying the same specs twice changes nothing."""
        raw = params.get("specs")
        if not isinstance(raw, list) or not raw:
            raise api.ApiError("give at least one spec")
        try:
            specs = [WorkloadSpec.from_dict(s) if isinstance(s, dict) else _not_spec(s)
                     for s in raw]
        except ConfigError as exc:
            raise api.ApiError(str(exc)) from None
        return [await self._put(spec) for spec in specs]

    async def _put(self, spec: WorkloadSpec, *, restart: bool | None = None) -> dict[str, Any]:
        for _ in range(CAS_RETRIES):
            await self._replica.read_point({})
            rec = self._replica.state.service(spec.name)
            old = _decode(rec.spec) if rec is not None else None
            if old == spec:
                return {"name": spec.name, "created": False, "changed": False,
                        "version": rec.version if rec else 0,
                        "generation": rec.generation if rec else 0, "diff": []}
            bump = restart if restart is not None else (old is None or needs_restart(old, spec))
            command = ServicePut(spec.name, spec.encode(), bump,
                                 cas=rec.mod_index if rec is not None else 0)
            try:
                await self._replica.write_command(command)
            except api.ApiError as exc:
                if ResultCode.CAS_FAILED.value in str(exc) or "read it again" in str(exc):
                    continue
                raise
            # the CAS held, so the new record follows from the old one (this node's
            # replica may not have applied the write yet when it was forwarded)
            return {"name": spec.name, "created": old is None, "changed": True,
                    "version": rec.version + 1 if rec else 1,
                    "generation": (rec.generation + int(bump)) if rec else 1,
                    "restart": bump,
                    "diff": spec_diff(old, spec) if old is not None else []}
        raise api.ApiError(f"service {spec.name} kept changing under this write; retry")

    async def _current(self, params: dict[str, Any]) -> tuple[WorkloadSpec, ServiceRecord]:
        name = _name(params)
        await self._replica.read_point({})
        rec = self._replica.state.service(name)
        spec = _decode(rec.spec) if rec is not None else None
        if rec is None or spec is None:
            raise api.ApiError(f"no service {name!r}; `meshctl ls` lists the services")
        return spec, rec

    async def scale(self, params: dict[str, Any]) -> dict[str, Any]:
        """Set a service's replica count (no rolling restart)."""
        spec, _ = await self._current(params)
        replicas = params.get("replicas")
        if type(replicas) is not int or replicas < 0:
            raise api.ApiError("replicas must be an integer >= 0")
        if spec.mode == "global":
            raise api.ApiError(f"service {spec.name} is global: it runs one replica per "
                               "eligible node and cannot be scaled")
        try:
            scaled = spec.with_replicas(replicas)
        except ConfigError as exc:
            raise api.ApiError(str(exc)) from None
        return await self._put(scaled, restart=False)

    async def rollback(self, params: dict[str, Any]) -> dict[str, Any]:
        """Return a service to its previous spec (a new generation)."""
        _, rec = await self._current(params)
        previous = _decode(rec.previous) if rec.previous else None
        if previous is None:
            raise api.ApiError(f"service {rec.name} has no previous version to return to")
        return await self._put(previous, restart=True)

    async def remove(self, params: dict[str, Any]) -> dict[str, Any]:
        """Delete a service; its replicas stop."""
        name = _name(params)
        await self._replica.read_point({})
        if self._replica.state.service(name) is None:
            raise api.ApiError(f"no service {name!r}; `meshctl ls` lists the services")
        result = await self._replica.write_command(ServiceDelete(name))
        return {"name": name, "index": int(result["index"])}

    async def drain(self, params: dict[str, Any]) -> dict[str, Any]:
        """``meshctl node drain``: move everything off a node, place nothing new."""
        node = self._node(params)
        result = await self._replica.write_command(NodeSet.build(node, drain=True))
        return {"node": node, "drain": True, "index": result["index"]}

    async def activate(self, params: dict[str, Any]) -> dict[str, Any]:
        """``meshctl node activate``: let a drained node take work again."""
        node = self._node(params)
        result = await self._replica.write_command(NodeSet.build(node, drain=False))
        return {"node": node, "drain": False, "index": result["index"]}

    async def label(self, params: dict[str, Any]) -> dict[str, Any]:
        """``meshctl node label``: add (``set``) and remove (``rm``) operator labels;
        they replace the labels the node announces for itself."""
        node = self._node(params)
        add, rm = params.get("set", {}), params.get("rm", [])
        if not isinstance(add, dict) or not isinstance(rm, list):
            raise api.ApiError("set must map labels to values and rm list label keys")
        await self._replica.read_point({})
        override = self._replica.state.node_override(node)
        if override is not None and override.labels:
            labels = dict(override.labels)
        else:
            view = self._core.member(node)
            labels = user_labels(view.meta) if view is not None else {}
        labels.update({str(k): str(v) for k, v in add.items()})
        for key in rm:
            labels.pop(str(key), None)
        try:
            command = NodeSet.build(node, labels=labels)
        except MeshError as exc:
            raise api.ApiError(str(exc)) from None
        result = await self._replica.write_command(command)
        return {"node": node, "labels": labels, "index": result["index"]}

    def _node(self, params: dict[str, Any]) -> NodeId:
        name = params.get("name")
        if not isinstance(name, str) or not name:
            raise api.ApiError("name the node")
        if self._core.member(NodeId(name)) is None:
            raise api.ApiError(f"no node {name!r}; `meshctl nodes` lists them")
        return NodeId(name)

    # ------------------------------------------------------------------ reads

    def _views_and_allocs(self) -> tuple[dict[ServiceId, Any], dict[ServiceId, list[AllocRecord]]]:
        state = self._replica.state
        views = decode_services(state)
        by_service: dict[ServiceId, list[AllocRecord]] = {}
        for a in state.allocs():
            by_service.setdefault(a.service, []).append(a)
        return views, by_service

    def _scheduler(self, views: Mapping[ServiceId, Any],
                   by_service: Mapping[ServiceId, list[AllocRecord]]) -> Any:
        overrides = {o.node: o for o in self._replica.state.node_overrides()}
        nodes = node_infos(self._core.members(), overrides)
        return scheduler_for(views, by_service, nodes)

    async def ls(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Services with desired, running and healthy replica counts."""
        await self._replica.read_point(params)
        views, by_service = self._views_and_allocs()
        plan = self._scheduler(views, by_service).plan
        out = []
        for name, view in views.items():
            spec, rec = view.spec, view.record
            allocs = [a for a in by_service.get(name, []) if a.desired == "run"]
            if spec.mode == "global":
                desired = len([n for n in plan.assignments.get(name, ()) if n is not None])
            else:
                desired = spec.replicas
            running = sum(1 for a in allocs if a.state == "running")
            healthy = sum(1 for a in allocs if a.ready)
            complete = sum(1 for a in allocs if a.state == "complete")
            current = sum(1 for a in allocs if a.ready and a.generation == rec.generation)
            # why replicas are not ready, in their nodes' words (failed ones first)
            troubled = sorted((a for a in allocs if not a.ready and a.message
                               and a.state != "complete"),
                              key=lambda a: (a.state != "failed", a.id))
            if spec.kind == "job":  # a job has converged when every slot ran to completion
                converged = complete == desired
            else:
                converged = healthy == desired and current == desired and len(allocs) == desired
            out.append({
                "name": name, "kind": spec.kind, "mode": spec.mode,
                "desired": desired, "running": running, "healthy": healthy,
                "updated": current, "version": rec.version, "generation": rec.generation,
                "rollout": rec.rollout, "rollout_message": rec.rollout_message,
                "driver": driver_of(spec) or "any", "labels": dict(spec.labels),
                "image": spec.image, "command": list(spec.command),
                "ports": [{"name": p.name, "host_port": p.host_port,
                           "container_port": p.container_port, "protocol": p.protocol}
                          for p in spec.ports],
                "pending": plan.explain_unplaced(name) or "",
                "failures": [f"{a.id} on {a.node}: {a.message}" for a in troubled][:5],
                "complete": complete, "converged": converged,
            })
        return out

    def _alloc_json(self, a: AllocRecord) -> dict[str, Any]:
        view = self._core.member(a.node)
        doc = a.as_dict()
        doc["address"] = view.addr.host if view is not None else ""
        doc["node_status"] = view.status.label if view is not None else "unknown"
        return doc

    async def ps(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Allocations (of one service, or all), with node, state and health."""
        await self._replica.read_point(params)
        service = params.get("service")
        state = self._replica.state
        if service is not None:
            if not isinstance(service, str) or state.service(ServiceId(service)) is None:
                raise api.ApiError(f"no service {service!r}; `meshctl ls` lists the services")
            allocs = state.allocs(service=ServiceId(service))
        else:
            allocs = state.allocs()
        return [self._alloc_json(a) for a in allocs]

    async def inspect(self, params: dict[str, Any]) -> dict[str, Any]:
        """A service's spec, versions and allocations."""
        spec, rec = await self._current(params)
        doc = rec.as_dict()
        doc.pop("spec")
        doc["spec"] = spec.to_dict()
        previous = _decode(rec.previous) if rec.previous else None
        doc["previous_spec"] = previous.to_dict() if previous is not None else None
        doc["allocations"] = [self._alloc_json(a)
                              for a in self._replica.state.allocs(service=rec.name)]
        return doc

    async def explain(self, params: dict[str, Any]) -> dict[str, Any]:
        """Why each replica of a service runs where it does, or why it cannot run."""
        spec, rec = await self._current(params)
        views, by_service = self._views_and_allocs()
        sched = self._scheduler(views, by_service)
        plan = sched.plan
        lines: list[str] = []
        try:
            if spec.mode == "global":
                for node in plan.assignments.get(rec.name, ()):
                    if node is not None:
                        lines.append(sched.explain(rec.name, node=node))
            else:
                for slot in range(spec.replicas):
                    lines.append(sched.explain(rec.name, slot))
        except ConfigError as exc:
            lines.append(str(exc))
        return {"name": rec.name, "lines": lines, "pending": plan.explain_unplaced(rec.name)
                or "", "rollout": rec.rollout, "rollout_message": rec.rollout_message}

    async def nodes(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Members with role, drain state, labels and allocation counts."""
        state = self._replica.state
        counts: dict[str, int] = {}
        for a in state.allocs():
            if a.desired == "run":
                counts[a.node] = counts.get(a.node, 0) + 1
        leader = self._replica.leader
        voters = set(self._replica.status()["voters"])
        out = []
        for m in self._core.members():
            override = state.node_override(m.node)
            labels = user_labels(m.meta)
            driver = m.meta.labels_dict.get(DRIVER_LABEL, "")
            if override is not None and override.labels:
                labels = dict(override.labels)
            out.append({
                "name": m.node, "address": str(m.addr), "status": m.status.label,
                "role": m.meta.role, "driver": driver,
                "raft": "leader" if m.node == leader else
                        ("voter" if m.node in voters else "replica"),
                "availability": "drain" if override is not None and override.drain
                else "active",
                "labels": labels, "allocations": counts.get(m.node, 0),
                "cpu_millis": m.meta.cpu_millis, "memory_bytes": m.meta.memory_bytes,
            })
        return out

    async def logs(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The last lines of output of a service's allocations (or one allocation),
        fetched from the nodes that run them."""
        target = params.get("target")
        tail = params.get("tail", 100)
        if not isinstance(target, str) or not target:
            raise api.ApiError("name a service or an allocation")
        if type(tail) is not int or not 0 < tail <= 100_000:
            raise api.ApiError("--tail must be 1-100000")
        state = self._replica.state
        alloc = state.alloc(AllocId(target))
        if alloc is not None:
            allocs = [alloc]
        elif state.service(ServiceId(target)) is not None:
            allocs = state.allocs(service=ServiceId(target))
        else:
            raise api.ApiError(f"no service or allocation {target!r}; see `meshctl ps`")
        out = []
        for a in allocs:
            try:
                if a.node == self._replica.raft.me:
                    text = await self._local_logs(a.id, tail)
                else:
                    text = await self._replica.call_node(a.node, "alloc_logs",
                                                         {"alloc": a.id, "tail": tail})
                out.append({"alloc": a.id, "node": a.node, "output": text, "error": ""})
            except (api.ApiError, MeshError) as exc:
                out.append({"alloc": a.id, "node": a.node, "output": b"", "error": str(exc)})
        return out

    async def alloc_logs(self, params: dict[str, Any]) -> bytes:
        """The last lines of a local allocation's output (called by :meth:`logs`)."""
        alloc, tail = params.get("alloc"), params.get("tail", 100)
        if not isinstance(alloc, str) or type(tail) is not int or not 0 < tail <= 100_000:
            raise api.ApiError("alloc_logs needs alloc and tail")
        return await self._local_logs(AllocId(alloc), tail)


def service_endpoints(state: MeshState, members: Iterable[MemberView],
                      cache: dict[tuple[ServiceId, int], ServiceView] | None = None
                      ) -> list[Endpoint]:
    """What DNS answers for services: one endpoint per port of every allocation that
    should run (its address is its node's), ready when it runs and passes its checks.

    The catalogue drops endpoints of nodes SWIM does not call alive, and DNS never
    answers unready ones, so this only has to say what the replica knows.
    """
    hosts = {m.node: m.addr.host for m in members}
    views = decode_services(state, cache)
    out: list[Endpoint] = []
    for a in state.allocs():
        out.extend(_alloc_endpoints(a, views.get(a.service), hosts.get(a.node)))
    return out


def _alloc_endpoints(a: AllocRecord, view: ServiceView | None,
                     host: str | None) -> tuple[Endpoint, ...]:
    """The endpoints of one allocation (see :func:`service_endpoints`)."""
    if a.desired != "run" or view is None or host is None:
        return ()
    spec = spec_for(view, a.generation) or view.spec
    ports = dict(a.ports)
    out = []
    for p in spec.ports:
        port = ports.get(p.name) or p.host_port
        if port:
            out.append(Endpoint(a.id, a.service, a.node, host, port, p.name, p.protocol,
                                spec.tags, a.ready))
    return tuple(out)


class EndpointIndex:
    """The endpoints of :func:`service_endpoints`, kept by allocation and brought up
    to date from the replica's change feed and membership, so that one change costs
    work for the allocations it concerns, not for all of them (pure).

    An allocation's endpoints depend on its record, its service's spec and its
    node's address: an ALLOC change recomputes that allocation, a SERVICE change
    every allocation of the service, a node's new address every allocation on it.
    """

    def __init__(self) -> None:
        self._hosts: dict[NodeId, str] = {}
        self._views: dict[ServiceId, ServiceView] = {}
        self._view_cache: dict[tuple[ServiceId, int], ServiceView] = {}
        self._endpoints: dict[AllocId, tuple[Endpoint, ...]] = {}
        self._where: dict[AllocId, tuple[ServiceId, NodeId]] = {}
        self._of_service: dict[ServiceId, set[AllocId]] = {}
        self._on_node: dict[NodeId, set[AllocId]] = {}

    def rebuild(self, state: MeshState, members: Iterable[MemberView]) -> list[Endpoint]:
        """Index everything again (at start, or when the state was replaced) and
        return every endpoint, as :func:`service_endpoints` does."""
        self._hosts = {m.node: m.addr.host for m in members}
        self._views = decode_services(state, self._view_cache)
        self._endpoints.clear()
        self._where.clear()
        self._of_service.clear()
        self._on_node.clear()
        out: list[Endpoint] = []
        for a in state.allocs():
            self._place(a.id, a)
            out.extend(self._endpoints.get(a.id, ()))
        return out

    def update(self, state: MeshState, changes: Iterable[Change],
               members: Iterable[MemberView]) -> dict[AllocId, tuple[Endpoint, ...]]:
        """Apply changes (those applied since the last call, any table) and the
        current membership.

        Args:
            state: the replica's state, which the changes led to.
            changes: the changes since the index of the last call.
            members: every member now (their addresses are compared).

        Returns:
            The new endpoints of every allocation whose endpoints changed (empty:
            it has none any more), for :meth:`CatalogBuilder.update`.
        """
        touched: set[AllocId] = set()
        services: set[ServiceId] = set()
        for change in changes:
            if change.table is Table.ALLOC:
                touched.add(AllocId(change.key))
            elif change.table is Table.SERVICE:
                services.add(ServiceId(change.key))
        if services:
            self._views = decode_services(state, self._view_cache)
            for name in services:
                touched.update(self._of_service.get(name, ()))
        hosts = {m.node: m.addr.host for m in members}
        if hosts != self._hosts:
            for node in hosts.keys() | self._hosts.keys():
                if hosts.get(node) != self._hosts.get(node):
                    touched.update(self._on_node.get(node, ()))
            self._hosts = hosts
        out: dict[AllocId, tuple[Endpoint, ...]] = {}
        for alloc in sorted(touched):
            before = self._endpoints.get(alloc, ())
            self._place(alloc, state.alloc(alloc))
            after = self._endpoints.get(alloc, ())
            if after != before:
                out[alloc] = after
        return out

    def _place(self, alloc: AllocId, record: AllocRecord | None) -> None:
        where = self._where.pop(alloc, None)
        if where is not None:
            _discard(self._of_service, where[0], alloc)
            _discard(self._on_node, where[1], alloc)
        self._endpoints.pop(alloc, None)
        if record is None:
            return
        self._where[alloc] = (record.service, record.node)
        self._of_service.setdefault(record.service, set()).add(alloc)
        self._on_node.setdefault(record.node, set()).add(alloc)
        endpoints = _alloc_endpoints(record, self._views.get(record.service),
                                     self._hosts.get(record.node))
        if endpoints:
            self._endpoints[alloc] = endpoints


_K = TypeVar("_K")


def _discard(index: dict[_K, set[AllocId]], key: _K, alloc: AllocId) -> None:
    allocs = index[key]
    allocs.discard(alloc)
    if not allocs:
        del index[key]


class CatalogFeed:
    """Keeps a DNS catalogue in step with the replica and membership (pure; the
    daemon calls :meth:`refresh` whenever either may have changed).

    A refresh applies the replica's changes since the last one
    (``MeshState.changes_since`` of the tables it reads) and the membership
    difference incrementally. It builds everything again at the first call and
    whenever that history is not available: changes of those tables were dropped
    from the change list since the last index seen, or the
    state was replaced by a snapshot restore (a learner catching up: the restore
    empties the change list and moves its floor to the snapshot's index, beyond
    what was seen, so ``changes_since`` raises ``Compacted``; an applied index
    that went backwards counts the same).

    Args:
        builder: makes the snapshots (its local node names the SOA).
    """

    def __init__(self, builder: CatalogBuilder) -> None:
        self._builder = builder
        self._endpoints = EndpointIndex()
        self._seen: int | None = None
        self._rebuilds = 0
        self._updates = 0

    @property
    def rebuilds(self) -> int:
        """Full builds so far (the first one included)."""
        return self._rebuilds

    @property
    def updates(self) -> int:
        """Incremental refreshes so far."""
        return self._updates

    def refresh(self, state: MeshState, members: Sequence[MemberView]) -> Catalog:
        """The catalogue for ``state`` and ``members`` now.

        Returns:
            The builder's newest snapshot (the previous object if nothing DNS
            answers from changed).
        """
        changes: list[Change] | None = None
        if self._seen is not None and state.applied_index >= self._seen:
            try:
                changes = state.changes_since(self._seen, table=_CATALOG_TABLES)
            except Compacted:
                changes = None
        if changes is None:
            if self._seen is not None:
                LOGGER.info("dns_catalog_rebuild node=%s seen=%d applied=%d first_change=%d",
                            self._builder.current.local_node, self._seen,
                            state.applied_index, state.first_change_index)
            self._rebuilds += 1
            catalog = self._builder.build(members, self._endpoints.rebuild(state, members))
        else:
            self._updates += 1
            catalog = self._builder.update(members,
                                           self._endpoints.update(state, changes, members))
        self._seen = state.applied_index
        return catalog


def _name(params: dict[str, Any]) -> ServiceId:
    name = params.get("name")
    if not isinstance(name, str) or not name:
        raise api.ApiError("name the service")
    return ServiceId(name)


def _decode(data: bytes) -> WorkloadSpec | None:
    try:
        return WorkloadSpec.decode(data)
    except MeshError as exc:
        LOGGER.warning("service_spec_unreadable reason=%s", exc)
        return None


def _not_spec(value: object) -> WorkloadSpec:
    raise ConfigError(f"a spec is a mapping, got {type(value).__name__}")
