"""meshd: a decentralized container orchestrator.

Every host runs the same daemon. Subpackages: ``gossip`` (SWIM + Lifeguard membership),
``raft`` (desired state), ``placement`` (the scheduler), ``dns`` (discovery), ``node``
(the daemon, its API and CLIs) and ``testing`` (the deterministic simulator).
"""

__version__ = "0.1.0"
