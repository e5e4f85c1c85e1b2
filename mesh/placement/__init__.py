"""Placement: a deterministic consistent-hashing scheduler (pure functions, no I/O).

The public API (see ``docs/placement.md``)::

    plan = place(specs, nodes, current)            # pure: same inputs, same plan
    plan.assignments[service][slot] -> NodeId | None
    plan.unplaced[service].text                    # why replicas could not run

    scheduler = Scheduler(specs, nodes, current)   # the same, kept up to date
    changes = scheduler.remove_node(node_id)       # touches only that node's slots
    scheduler.explain(service, slot)               # why this node
"""

from mesh.placement.config import PlacementConfig
from mesh.placement.constraints import matches, parse_constraint, parse_constraints
from mesh.placement.model import (
    MAX_REPLICAS,
    Availability,
    Change,
    Constraint,
    Mode,
    NodeInfo,
    NodeState,
    Op,
    Plan,
    Reason,
    Resources,
    ServiceSpec,
    Strategy,
    Unplaced,
    format_cpu,
    format_memory,
    parse_cpu,
    parse_memory,
)
from mesh.placement.scheduler import Current, Scheduler, explain, place

__all__ = [
    "MAX_REPLICAS",
    "Availability",
    "Change",
    "Constraint",
    "Current",
    "Mode",
    "NodeInfo",
    "NodeState",
    "Op",
    "Plan",
    "PlacementConfig",
    "Reason",
    "Resources",
    "Scheduler",
    "ServiceSpec",
    "Strategy",
    "Unplaced",
    "explain",
    "format_cpu",
    "format_memory",
    "matches",
    "parse_constraint",
    "parse_constraints",
    "parse_cpu",
    "parse_memory",
    "place",
]
