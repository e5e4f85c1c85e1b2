"""The chaos harness: real meshd daemons, real faults, invariants checked while they run.

Run it with ``python -m chaos`` (see ``docs/chaos.md``). Pure modules
(:mod:`chaos.scenario`, :mod:`chaos.invariants`, :mod:`chaos.report`,
:mod:`chaos.png`) hold the logic that unit tests exercise; :mod:`chaos.topology`,
:mod:`chaos.nodes`, :mod:`chaos.workload` and :mod:`chaos.runner` do the I/O.
"""
