"""A real systemd, booted as PID 1 in a container of the private test dockerd.

The root file system is a minimal Debian 12 made by ``debootstrap`` (cached as a tarball
between runs, see ``root_tarball``) and imported into the test engine. The container gets
the test engine's socket as ``/run/docker.sock``, so the agent installed inside manages the
same engine the tests inspect. What works and what does not on these machines is written
up in ../shared/notes/systemd-e2e.md: ``--privileged`` fails here; a private cgroup
namespace, CAP_SYS_ADMIN and tmpfs on /run do boot.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.models.containers
import pytest

from ..engine import DockerEngine, in_ci, wait_until

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
ROOT_PACKAGES = ("systemd", "systemd-sysv", "dbus")
CACHE_DIR = Path(os.environ.get("SNAPAGENTD_E2E_CACHE", "/var/cache/snapagentd-tests"))
IMAGE = "snapagentd-e2e/debian-systemd:bookworm"  # outside the agent's managed prefixes
DEBOOTSTRAP_TIMEOUT = 600
BOOT_TIMEOUT = 120
# What `systemctl is-system-running --wait` prints once boot is over.
FINAL_STATES = {"running", "degraded", "maintenance", "stopping", "offline"}


def root_tarball() -> Path:
    """The debootstrapped root as a tarball, made once per machine (about 30-50 s)."""
    name = f"{SUITE}-minbase-{'-'.join(ROOT_PACKAGES)}.tar"
    tarball = CACHE_DIR / name
    if tarball.exists():
        return tarball
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.access(debootstrap, os.X_OK):
        problem = "debootstrap is not installed (apt-get install debootstrap)"
        if in_ci():
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="root-", dir=CACHE_DIR) as scratch:
        root = Path(scratch) / "root"
        command = [
            debootstrap, "--variant=minbase", f"--include={','.join(ROOT_PACKAGES)}",
            SUITE, str(root), MIRROR,
        ]  # fmt: skip
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT, check=False
        )
        if result.returncode != 0:
            pytest.fail(
                f"{shlex.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}"
                f"{result.stderr[-3000:]}",
                pytrace=False,
            )
        partial = Path(scratch) / name
        subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True)
        partial.rename(tarball)  # atomic: a killed run never leaves half a cache
    return tarball


def import_root(engine: DockerEngine) -> str:
    """Import the cached root into ``engine`` as IMAGE, with /sbin/init as its command."""
    repository, tag = IMAGE.split(":")
    engine.client(timeout=300).import_image_from_file(
        str(root_tarball()), repository=repository, tag=tag, changes=['CMD ["/sbin/init"]']
    )
    return IMAGE


@dataclass
class Result:
    exit_code: int
    output: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class SystemdHost:
    """A booted container: run commands in it, ask its systemd about units."""

    def __init__(self, container: docker.models.containers.Container) -> None:
        self.container = container

    @classmethod
    def boot(cls, engine: DockerEngine, image: str) -> SystemdHost:
        client = docker.DockerClient(base_url=engine.url, timeout=300)
        socket_path = engine.url.removeprefix("unix://")
        container = client.containers.run(
            image,
            ["/sbin/init"],
            detach=True,
            cgroupns="private",
            cap_add=["SYS_ADMIN"],
            tmpfs={"/run": "", "/run/lock": ""},
            stop_signal="SIGRTMIN+3",
            network_mode="host",  # apt reaches Debian's mirror through the host
            volumes={socket_path: {"bind": "/run/docker.sock", "mode": "rw"}},
        )
        host = cls(container)

        # Fails with "Failed to connect to bus" until PID 1 is up: retry until it answers.
        def booted() -> str | None:
            state = host.run("systemctl is-system-running --wait").output.strip()
            return state if state in FINAL_STATES else None

        state = wait_until(
            booted,
            timeout=BOOT_TIMEOUT,
            interval=0.2,
            message="systemd in the container to finish booting",
        )
        if state != "running":
            failed = host.run("systemctl --failed --no-legend").output
            raise AssertionError(f"systemd booted to {state!r}; failed units:\n{failed}")
        return host

    def run(self, command: str, user: str = "root") -> Result:
        """Run a shell command inside; returns its exit code and combined output."""
        exit_code, output = self.container.exec_run(
            ["/bin/sh", "-c", command], user=user, environment={"LC_ALL": "C.UTF-8"}
        )
        return Result(exit_code, output.decode(errors="replace"))

    def spawn(self, command: str, user: str = "root") -> None:
        """Start a shell command inside and return at once (it keeps running)."""
        self.container.exec_run(
            ["/bin/sh", "-c", command], user=user, environment={"LC_ALL": "C.UTF-8"}, detach=True
        )

    def check(self, command: str, user: str = "root") -> str:
        """Run a command that must succeed; return its output."""
        result = self.run(command, user=user)
        assert result.ok, f"`{command}` as {user} failed ({result.exit_code}):\n{result.output}"
        return result.output

    def copy_in(self, source: Path, directory: str) -> str:
        """Copy a file into ``directory`` (not a tmpfs: files put there stay invisible)."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            archive.add(source, arcname=source.name)
        assert self.container.put_archive(directory, buffer.getvalue())
        return f"{directory}/{source.name}"

    def unit(self, name: str, *properties: str) -> dict[str, str]:
        """``systemctl show`` properties of a unit, as a dict."""
        output = self.check(f"systemctl show {name} -p {','.join(properties)}")
        pairs = (line.split("=", 1) for line in output.splitlines() if "=" in line)
        return dict(pairs)

    def remove(self) -> None:
        self.container.remove(force=True, v=True)
