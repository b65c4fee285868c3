"""Runnable test images without a registry: a static busybox imported as a base, and
snapshots committed on top of it (a file of known size each), as a router would make them."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import docker
import pytest

from .engine import in_ci

KIB = 1024

NO_NETWORK: dict[str, Any] = {"network_mode": "none"}


def busybox_path() -> str:
    """Debian's static busybox, or skip (fail under CI=true) when it is not installed."""
    for path in ("/bin/busybox", "/usr/bin/busybox"):
        if os.access(path, os.X_OK) and b"/ld-linux" not in Path(path).read_bytes():
            return path
    message = "needs a static busybox: apt-get install busybox-static"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
    raise AssertionError("unreachable")  # pragma: no cover - skip() raises


def make_busybox_image(client: docker.APIClient, reference: str) -> str:
    """`docker import` a runnable image holding only /bin/busybox and its applet links."""
    data = Path(busybox_path()).read_bytes()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("bin", "tmp"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
        for applet in ("sh", "dd", "rm", "touch", "true"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    repository, _, tag = reference.partition(":")
    client.import_image_from_data(buffer.getvalue(), repository=repository, tag=tag or "latest")
    return client.inspect_image(reference)["Id"]


def commit(client: docker.APIClient, image: str, script: str, reference: str) -> str:
    """Run `sh -c script` in a container of `image`, commit it as `reference`, return the id."""
    container = client.create_container(
        image, command=["sh", "-c", script], host_config=client.create_host_config(**NO_NETWORK)
    )["Id"]
    try:
        client.start(container)
        status = client.wait(container, timeout=60)
        assert status["StatusCode"] == 0, client.logs(container)
        repository, _, tag = reference.partition(":")
        return client.commit(container, repository=repository, tag=tag or "latest")["Id"]
    finally:
        client.remove_container(container, force=True)


def write(path: str, size: int) -> str:
    return f"dd if=/dev/urandom of={path} bs={KIB} count={size // KIB} 2>/dev/null"
