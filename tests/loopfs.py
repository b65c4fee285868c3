"""A small, real ext4 file system on a loop device, and a private dockerd whose data root is one.

Disk-pressure eviction reacts to the free space of the file system holding Docker's data root.
The machine's own disk is far too big (and shared) to fill in a test, and a tmpfs is not what
Docker runs on, so the tests make a file system of a few hundred MiB of their own: a sparse image
file, ``mkfs.ext4 -m 0`` (no root reserve), ``mount -o loop``. Everything is undone on exit, also
when the test fails: unmount (lazily when still busy), detach the loop device, delete the image.

Loop devices need root and ``/dev/loop-control``; without them the tests are skipped with the
exact reason, except under CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from snapagentd.disk import disk_usage

from .engine import (
    DockerEngine,
    in_ci,
    make_short_tmpdir,
    require_dockerd,
    unmount_under,
    wait_until,
)

__all__ = [
    "LOOP_CONTROL",
    "SMALL_DISK_MIB",
    "fill_to",
    "loop_filesystem",
    "mount_source",
    "small_disk_docker",
    "small_disk_engine",
]

LOOP_CONTROL = Path("/dev/loop-control")
SMALL_DISK_MIB = 512
MiB = 1024**2

# mount(8)'s words when the kernel or the sandbox refuses loop devices or mounting (EPERM...).
_UNAVAILABLE_HINTS = (
    "permission denied",
    "operation not permitted",
    "must be superuser",
    "failed to setup loop device",
    "could not find any free loop device",
    "no such device",
)
_SBIN_PATH = os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"


def _unavailable(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _tool(name: str) -> str:
    path = shutil.which(name, path=_SBIN_PATH)
    if path is None:
        _unavailable(f"loop file systems unavailable: {name} is not installed")
    return path


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _is_mount_point(path: Path) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as file:
        return any(line.split()[4] == os.path.realpath(path) for line in file)


def mount_source(path: str | os.PathLike[str]) -> str | None:
    """The device mounted at ``path`` (the last mount there), e.g. ``/dev/loop3``, or None."""
    target = os.path.realpath(path)
    source = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as file:
        for line in file:
            fields = line.split()
            if fields[4] == target:
                # After the optional fields comes "-", then fstype and source.
                source = fields[fields.index("-") + 2]
    return source


def _attached_devices(image: Path) -> list[str]:
    result = _run(
        [_tool("losetup"), "--list", "--noheadings", "--output", "NAME", "--associated", str(image)]
    )
    return result.stdout.split()


@contextlib.contextmanager
def loop_filesystem(size_mib: int, directory: Path | None = None) -> Iterator[Path]:
    """Mount a new ``size_mib`` MiB ext4 file system and yield its mount point.

    ``directory`` is where to mount it (created if missing, left in place afterwards); by
    default a new short directory under /tmp. The image file lives in a private directory of
    its own, never on the mounted file system. On exit everything is undone, whatever happened.
    """
    if not LOOP_CONTROL.exists():
        _unavailable(f"loop devices unavailable: {LOOP_CONTROL} does not exist")
    mkfs, mount, umount = _tool("mkfs.ext4"), _tool("mount"), _tool("umount")
    workdir = make_short_tmpdir("sa-loop-")
    image = workdir / "fs.img"
    mountpoint = Path(directory) if directory is not None else workdir / "mnt"
    try:
        with image.open("wb") as file:
            file.truncate(size_mib * MiB)  # sparse: costs the host nothing until written
        # -m 0: no root reserve; -E nodiscard: nothing to discard on a fresh sparse file.
        made = _run([mkfs, "-q", "-F", "-m", "0", "-E", "nodiscard", str(image)])
        if made.returncode != 0:
            raise RuntimeError(f"mkfs.ext4 failed: {made.stderr.strip()}")
        mountpoint.mkdir(parents=True, exist_ok=True)
        mounted = _run([mount, "-t", "ext4", "-o", "loop", str(image), str(mountpoint)])
        if mounted.returncode != 0:
            message = mounted.stderr.strip()
            if os.geteuid() != 0 or any(h in message.lower() for h in _UNAVAILABLE_HINTS):
                _unavailable(f"cannot mount a loop file system (needs root): {message}")
            raise RuntimeError(f"mount -o loop {image} {mountpoint} failed: {message}")
        yield mountpoint
    finally:
        _tear_down(image, mountpoint, umount)
        shutil.rmtree(workdir, ignore_errors=True)


def _tear_down(image: Path, mountpoint: Path, umount: str) -> None:
    busy = False
    if image.exists() and _is_mount_point(mountpoint):
        busy = _run([umount, str(mountpoint)]).returncode != 0
        if busy:
            # A process still holds a file there (or something is mounted below): detach the
            # whole tree now; the kernel lets go of the file system when its last user does.
            unmount_under(mountpoint)
    if not image.exists():
        return
    # `mount -o loop` sets autoclear: the device goes with the file system, a moment after
    # the unmount (the kernel releases it asynchronously). `losetup -d` makes sure of it.
    for device in _attached_devices(image):
        _run([_tool("losetup"), "--detach", device])
    if busy:
        # Still in use, so the device is only marked to go (autoclear) when its last user
        # closes the file; waiting here would only hang a test that already failed.
        remaining = _attached_devices(image)
        if remaining:
            warnings.warn(
                f"{mountpoint} was busy: lazily unmounted; {', '.join(remaining)} detaches "
                "when the last file on it is closed",
                stacklevel=1,
            )
        return
    wait_until(
        lambda: not _attached_devices(image),
        timeout=15.0,
        interval=0.05,
        message=f"the loop device of {image} to be detached",
    )


def fill_to(path: Path, used_ratio: float) -> Path:
    """Write one ballast file under ``path`` so that its file system's used ratio (as
    :func:`snapagentd.disk.disk_usage` counts it) reaches at least ``used_ratio``.

    The blocks are allocated (``posix_fallocate``, else zeros are written) and synced before
    this returns; delete the returned file to relieve the pressure. OSError (ENOSPC) when the
    file system cannot get that full; the partial ballast is removed then.
    """
    if not 0 < used_ratio <= 1:
        raise ValueError(f"used_ratio must be in (0, 1], got {used_ratio!r}")
    ballast = Path(path) / f"ballast-{uuid.uuid4().hex[:12]}"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        size = 0
        while (usage := disk_usage(path)).used_ratio < used_ratio:
            wanted_free = math.floor(usage.total_bytes * (1 - used_ratio))
            grow = max(4096, -(-(usage.free_bytes - wanted_free) // 4096) * 4096)
            _allocate(fd, size, grow)
            size += grow
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        ballast.unlink(missing_ok=True)
        raise
    os.close(fd)
    return ballast


def _allocate(fd: int, offset: int, length: int) -> None:
    try:
        os.posix_fallocate(fd, offset, length)
        return
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    os.lseek(fd, offset, os.SEEK_SET)
    chunk = b"\0" * MiB
    while length > 0:
        length -= os.write(fd, chunk[: min(length, len(chunk))])


# --------------------------------------------------------------------------------------
# a private dockerd whose data root is a small loop file system
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk_docker(size_mib: int = SMALL_DISK_MIB) -> Iterator[DockerEngine]:
    """A private dockerd whose ``--data-root`` (``engine.data_root``) is the mount point of a
    new ``size_mib`` MiB ext4 loop file system, using the overlay2 storage driver."""
    dockerd = require_dockerd()  # skip outside CI, fail under CI=true
    base = make_short_tmpdir("sa-ld-")
    engine = DockerEngine(base, dockerd=dockerd)  # not started: only its layout, for the mount
    try:
        with loop_filesystem(size_mib, directory=engine.data_root) as data_root:
            try:
                engine = DockerEngine.start(base, dockerd=dockerd)
            except Exception as error:
                pytest.fail(f"could not start a private dockerd: {error}", pytrace=False)
            try:
                _check_storage(engine, data_root)
                yield engine
            finally:
                # Stop dockerd before the file system goes, so that it unmounts its layers
                # itself and the loop file system is not busy.
                engine.halt()
    finally:
        engine.stop()  # unmounts leftovers (lazily) and removes base


def _check_storage(engine: DockerEngine, data_root: Path) -> None:
    client = engine.client()
    try:
        info = client.info()
    finally:
        client.close()
    driver, root = info.get("Driver"), info.get("DockerRootDir")
    if driver != "overlay2" or os.path.realpath(root or "") != os.path.realpath(data_root):
        pytest.fail(
            f"dockerd on the loop file system uses driver {driver!r} and root {root!r} "
            f"(want overlay2 in {data_root}); log {engine.log_path}:\n{engine.log_tail()}",
            pytrace=False,
        )


@pytest.fixture
def small_disk_engine() -> Iterator[DockerEngine]:
    """A private dockerd (about 1 s to start) whose data root, ``engine.data_root``, is the
    mount point of its own 512 MiB ext4 loop file system (overlay2). Everything is stopped,
    unmounted and detached afterwards."""
    with small_disk_docker(SMALL_DISK_MIB) as engine:
        yield engine
