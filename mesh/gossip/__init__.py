"""SWIM membership with Lifeguard's refinements.

``core.Membership`` is the sans-I/O protocol; ``adapter`` runs it over trio UDP+TCP.
"""
