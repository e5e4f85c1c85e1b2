"""Deterministic simulation of many nodes' real protocol cores in one thread.

``net.FaultyNetwork`` decides the fate of every packet (drop, delay, duplicate,
reorder, partition) from a seeded RNG; ``sim.GossipSimulator`` runs SWIM cores on a
virtual clock over it. The same seed replays the same run exactly.
"""
