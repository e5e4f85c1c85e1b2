"""Fixtures for tests that need a Docker engine and the offline test image.

``scripts/docker-setup`` (run by CI) starts ``dockerd --bridge=none`` and imports
:data:`IMAGE` from a busybox-static rootfs. Without them the tests that use these
fixtures skip and say why. Containers use host networking and listen on 127.0.0.1.

Every test gets a node name of its own (:func:`docker_node`), so that its containers
(labelled ``mesh.node=<name>``, named ``mesh-<alloc>``) never meet another test's or
another run's; whatever is left of them is removed at teardown, even on failure.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import uuid
from collections.abc import Iterator

import docker
import docker.errors
import pytest
import trio

from mesh.types import NodeId

IMAGE = "meshd-test/busybox:latest"
"""The image ``scripts/docker-setup`` imports (busybox applets, no registry)."""


@functools.cache
def _unavailable() -> str | None:
    """Why the docker tests cannot run here, or ``None`` when they can."""
    address = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if address.startswith("unix://"):
        # Try the socket first: the SDK leaks its socket when the connect fails.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            try:
                sock.connect(address.removeprefix("unix://"))
            except OSError as exc:
                return (f"no Docker engine answers at {address} ({exc.strerror}); "
                        "run scripts/docker-setup as root")
    try:
        client = docker.from_env(timeout=5)
    except docker.errors.DockerException as exc:
        return f"no Docker engine answers at {address} ({exc}); run scripts/docker-setup"
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        return f"image {IMAGE} is missing; run scripts/docker-setup to import it"
    finally:
        client.close()
    return None


def open_client() -> docker.DockerClient:
    """A client for the engine of this machine (the caller closes it)."""
    return docker.from_env(timeout=30)


@pytest.fixture
def docker_client() -> Iterator[docker.DockerClient]:
    """A docker client; skips the test when there is no engine or no test image."""
    reason = _unavailable()
    if reason is not None:
        pytest.skip(reason)
    client = open_client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def docker_node(docker_client: docker.DockerClient) -> Iterator[NodeId]:
    """A node name unique to this test; its containers are removed at teardown."""
    node = NodeId(f"t{uuid.uuid4().hex[:10]}")
    try:
        yield node
    finally:
        for container in docker_client.containers.list(
                all=True, filters={"label": f"mesh.node={node}"}):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True, v=True)


async def http_get(host: str, port: int, path: str = "/") -> bytes:
    """The body of ``GET path`` (HTTP/1.0, so the server closes the connection)."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        response = bytearray()
        while chunk := await stream.receive_some(65536):
            response += chunk
    head, _, body = bytes(response).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1."), head
    return body
