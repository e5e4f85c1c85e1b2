"""Cluster security building blocks that do no I/O.

- :mod:`mesh.security.pki`: the cluster CA, node and admin certificates, CSRs,
  fingerprints and the renewal schedule (``cryptography``; wall clock injected).
- :mod:`mesh.security.token`: the join token ``MESH1-<CA fingerprint>-<secret>``.
- :mod:`mesh.security.messages`: the ``mesh-join/1`` messages and the link status
  messages (wire type tags 32-47).
- :mod:`mesh.security.join`: the join/renewal exchange as sans-I/O client and server.
- :mod:`mesh.security.ratelimit`: the rate limits on join attempts (token buckets per
  source address and in total).

The trio glue (contexts, the ALPN-routing listener, ``request_join``, credential
files) lives in :mod:`mesh.tls`; the gossip datagram key ring in
:mod:`mesh.gossip.keyring`. ``docs/security.md`` is the threat model.
"""
