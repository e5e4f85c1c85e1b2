"""The cluster's secrets on a Raft member: the CA key and the join token's secret.

Every Raft member (voter or learner) holds them, so that every voter can issue
certificates (``mesh-join/1``) and no node is special; watchers never do (see
"Secrets" in :mod:`mesh.raft.state`). The vault is filled from committed
:class:`~mesh.raft.state.CaSet` and :class:`~mesh.raft.state.TokenSet` entries
that the node's Raft feed applies, in log order and only when the state machine
accepted them, so that the vault follows exactly the record
(:class:`~mesh.raft.state.ClusterCa`) every replica agrees on. It travels in
Raft snapshots (:meth:`section`, :meth:`restore`), so a member caught up by
InstallSnapshot, or restarted from its own snapshot, holds it too.

Sans I/O; the node layer turns the material into a join server
(:mod:`mesh.node.trust`) and checks that the key matches the certificate.
"""

from __future__ import annotations

from collections.abc import Sequence

from mesh.raft.state import Applied, CaSet, Result, ResultCode, TokenSet


class Vault:
    """The CA certificate and key, and the join token's secret (each empty until
    a committed entry gave it)."""

    def __init__(self) -> None:
        self.cert_pem = b""
        self.key_pem = b""
        self.token_secret = b""
        self.version = 0
        """Bumped by every change (a node compares it to see one)."""

    @property
    def complete(self) -> bool:
        """Whether it holds all this node needs to issue certificates."""
        return bool(self.cert_pem and self.key_pem and self.token_secret)

    def take(self, command: CaSet | TokenSet, result: Applied) -> None:
        """Keep the secret of a committed command if the state machine accepted it
        (``result`` is what :meth:`MeshState.apply` returned for it)."""
        if not isinstance(result, Result) or result.code is not ResultCode.OK:
            return
        if isinstance(command, CaSet):
            # The state accepts only the first certificate; the first key given with
            # it stays (a later CaSet cannot swap the key under the certificate).
            if command.key_pem and not (self.key_pem and self.cert_pem == command.cert_pem):
                self.cert_pem, self.key_pem = command.cert_pem, command.key_pem
                self.version += 1
        elif command.secret and command.secret != self.token_secret:
            self.token_secret = command.secret
            self.version += 1

    def section(self) -> list[bytes] | None:
        """What a Raft snapshot carries (``None``: nothing yet)."""
        if not (self.cert_pem or self.token_secret):
            return None
        return [self.cert_pem, self.key_pem, self.token_secret]

    def restore(self, section: Sequence[bytes] | None) -> None:
        """Take the vault of a Raft snapshot (``None``: it had none), validated by
        :meth:`MeshState.restore`."""
        cert, key, secret = section if section is not None else (b"", b"", b"")
        if (cert, key, secret) != (self.cert_pem, self.key_pem, self.token_secret):
            self.cert_pem, self.key_pem, self.token_secret = cert, key, secret
            self.version += 1
