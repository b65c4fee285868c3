"""Helpers for a PRIVATE, real Docker engine used by the tests.

Every test session starts its own ``dockerd`` with its own data-root, exec-root, pidfile
and socket under a short directory in /tmp, so the tests never touch the machine's
Docker (if it has one) and the machine's Docker never sees the tests' images.

No registry is reachable from here: test images are made with ``docker import`` of a
tarball built in memory (:func:`make_image`), each with unique content so that each import
gives a distinct image id.

Works with docker-py 5.0.3 (Debian 12) and 7.x (PyPI), and with Debian 12's dockerd 20.10.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import docker
import docker.constants
import docker.errors
import pytest

__all__ = [
    "CLEANUP_PREFIXES",
    "INSTALL_HINT",
    "DockerEngine",
    "NotifySocket",
    "create_stopped_container",
    "image_exists",
    "image_tags",
    "in_ci",
    "make_image",
    "make_short_tmpdir",
    "remove_test_artifacts",
    "require_dockerd",
    "split_reference",
    "unmount_under",
    "wait_until",
]

INSTALL_HINT = "dockerd not installed: run scripts/test.sh, which installs Debian's docker.io"

# Tags (repository:tag) that clean-up removes between tests.
CLEANUP_PREFIXES: tuple[str, ...] = ("cascade-snapshot-", "foreign-")

# Unix socket paths are limited to 107 bytes; containerd puts its sockets under exec-root
# ("<exec-root>/containerd/containerd.sock.ttrpc"), so keep the base directory short.
_MAX_SOCKET_PATH = 107
_LONGEST_SOCKET_SUFFIX = "/exec/containerd/containerd.sock.ttrpc"

_MNT_DETACH = 2


# --------------------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------------------


def in_ci() -> bool:
    """True when running under CI (``CI=true``): there, nothing may be skipped."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "",
) -> Any:
    """Poll ``predicate()`` until it returns a truthy value, and return that value.

    Raises AssertionError (naming ``message``, the last value and the last exception the
    predicate raised, if any) when ``timeout`` seconds pass first. Exceptions from the
    predicate count as "not yet"; the predicate is always tried at least once, and once
    more at the deadline.
    """
    deadline = time.monotonic() + timeout
    last_value: Any = None
    last_error: BaseException | None = None
    while True:
        expired = time.monotonic() >= deadline
        try:
            last_value = predicate()
            last_error = None
        except Exception as error:  # any failure means "not yet"
            last_value, last_error = None, error
        if last_value:
            return last_value
        if expired:
            break
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
    detail = f"last value {last_value!r}"
    if last_error is not None:
        detail += f", last error {last_error!r}"
    what = message or getattr(predicate, "__name__", repr(predicate))
    raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what} ({detail})")


def make_short_tmpdir(prefix: str = "sa-") -> Path:
    """A new private directory directly under /tmp (short, for Unix socket paths)."""
    base = "/tmp" if os.path.isdir("/tmp") else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def require_dockerd() -> str:
    """Path of ``dockerd``, or skip (outside CI) / fail (under CI=true) when unusable.

    The tests need a real dockerd and root to run it. Under CI a missing dockerd or a
    non-root user is a hard failure, never a silent skip.
    """
    problem = None
    path = shutil.which("dockerd") or next(
        (p for p in ("/usr/sbin/dockerd", "/usr/bin/dockerd") if os.access(p, os.X_OK)), None
    )
    if path is None:
        problem = INSTALL_HINT
    elif os.geteuid() != 0:
        problem = (
            "the Docker tests start a private dockerd and must run as root "
            "(run scripts/test.sh as root)"
        )
    if problem is None:
        assert path is not None
        return path
    if in_ci():
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem)
    raise AssertionError("unreachable")  # pragma: no cover - skip() raises


def split_reference(reference: str) -> tuple[str, str]:
    """``"repo:tag"`` -> ``("repo", "tag")``; a missing tag is ``"latest"``.

    A colon before the last ``/`` belongs to a registry host:port, not a tag.
    """
    slash = reference.rfind("/")
    colon = reference.rfind(":")
    if colon > slash:
        return reference[:colon], reference[colon + 1 :]
    return reference, "latest"


# --------------------------------------------------------------------------------------
# the private engine
# --------------------------------------------------------------------------------------


class DockerEngine:
    """A private dockerd with its own data-root, exec-root, pidfile, socket and log.

    Layout under ``base_dir``: ``docker.sock``, ``root/`` (data-root), ``exec/``
    (exec-root), ``docker.pid`` and ``dockerd.log``.

    ``DockerEngine.start(dir)`` starts it and waits until it answers; ``halt()`` stops the
    process but keeps every directory, so ``start_again()`` brings the same engine (same
    images, same socket) back; ``restart()`` does both; ``stop()`` stops it and removes
    ``base_dir``.
    """

    START_TIMEOUT = 30.0
    STOP_TIMEOUT = 20.0

    def __init__(
        self, base_dir: str | os.PathLike[str], dockerd: str | None = None, debug: bool = False
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.dockerd = dockerd or shutil.which("dockerd") or "/usr/sbin/dockerd"
        self.debug = debug  # --debug: the log names every API call ("Calling GET /v1.41/...")
        self.socket_path = str(self.base_dir / "docker.sock")
        self.data_root = self.base_dir / "root"
        self.exec_root = self.base_dir / "exec"
        self.pidfile = self.base_dir / "docker.pid"
        self.log_path = self.base_dir / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None
        longest = str(self.base_dir) + _LONGEST_SOCKET_SUFFIX
        if len(longest.encode()) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"engine directory {self.base_dir} is too long for Unix socket paths "
                f"({longest!r} exceeds {_MAX_SOCKET_PATH} bytes): use a short dir under /tmp"
            )

    # -- public API -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @classmethod
    def start(
        cls,
        base_dir: str | os.PathLike[str],
        *,
        dockerd: str | None = None,
        timeout: float = START_TIMEOUT,
        debug: bool = False,
    ) -> DockerEngine:
        """Start a new private engine in ``base_dir`` and wait until it answers /_ping."""
        engine = cls(base_dir, dockerd=dockerd, debug=debug)
        engine._launch(timeout)
        return engine

    def start_again(self, timeout: float = START_TIMEOUT) -> DockerEngine:
        """Start the engine again on the same directories and socket (after ``halt()``)."""
        if self.is_running():
            raise RuntimeError(f"dockerd (pid {self.pid}) is still running")
        self._launch(timeout)
        return self

    def restart(self, timeout: float = START_TIMEOUT) -> DockerEngine:
        """``halt()`` then ``start_again()``: "Docker stopped and started again"."""
        self.halt()
        return self.start_again(timeout)

    def client(self, timeout: int = 60) -> docker.APIClient:
        """A new ``docker.APIClient`` to this engine (API version negotiated)."""
        return docker.APIClient(base_url=self.url, version="auto", timeout=timeout)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ping(self) -> bool:
        """True when the engine answers /_ping now."""
        return _ping(self.url)

    def halt(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop dockerd (SIGTERM, then SIGKILL after ``timeout``); keep its directories."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        # dockerd runs in its own session; its containerd is in the same process group.
        # Give it a moment to go with dockerd, then make sure nothing is left.
        _reap_process_group(process.pid, timeout=5.0)
        self._close_log()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop dockerd, unmount whatever it left mounted under base_dir, remove base_dir."""
        self.halt(timeout)
        unmount_under(self.base_dir)
        _rmtree(self.base_dir)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> DockerEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"DockerEngine({str(self.base_dir)!r}, pid={self.pid}, url={self.url!r})"

    # -- internals ------------------------------------------------------------------------

    _log_file: Any = None

    def _launch(self, timeout: float) -> None:
        for directory in (self.base_dir, self.data_root, self.exec_root):
            directory.mkdir(parents=True, exist_ok=True)
        if os.path.exists(self.socket_path):
            if _ping(self.url):
                raise RuntimeError(f"another dockerd already answers on {self.url}")
            os.unlink(self.socket_path)
        self._close_log()
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in halt()
        self._log_file.write(f"\n--- starting {self.dockerd} at {time.ctime()}\n".encode())
        self._log_file.flush()
        command = [
            self.dockerd,
            "--host", self.url,
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.pidfile),
            "--iptables=false",
            "--bridge=none",
            *(["--debug"] if self.debug else []),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        # /usr/sbin holds containerd/runc helpers on some systems; keep it on PATH.
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C in pytest must not kill it before teardown
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                self._close_log()
                raise RuntimeError(
                    f"dockerd exited with status {code} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if _ping(self.url):
                return
            if time.monotonic() >= deadline:
                self.halt()
                raise RuntimeError(
                    f"dockerd did not answer on {self.url} within {timeout:.0f}s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            # Poll; readiness is detected by /_ping, not by this pause.
            time.sleep(0.05)

    def _close_log(self) -> None:
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None


def _ping(url: str) -> bool:
    try:
        client = docker.APIClient(
            base_url=url, version=docker.constants.MINIMUM_DOCKER_API_VERSION, timeout=2
        )
    except docker.errors.DockerException:
        return False
    try:
        return bool(client.ping())
    except Exception:  # connection refused, socket missing, 5xx...
        return False
    finally:
        with contextlib.suppress(Exception):
            client.close()


def _reap_process_group(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            return
        time.sleep(0.05)


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as file:
        for line in file:
            fields = line.split()
            if len(fields) > 4:
                # Octal escapes: \040 space, \011 tab, \012 newline, \134 backslash.
                points.append(
                    fields[4].encode("latin-1", "surrogateescape").decode("unicode_escape")
                )
    return points


def unmount_under(directory: str | os.PathLike[str]) -> list[str]:
    """Lazily unmount every mount point at or under ``directory``, deepest first."""
    root = os.path.realpath(directory)
    targets = [p for p in _mount_points() if p == root or p.startswith(root + "/")]
    targets.sort(key=lambda p: p.count("/"), reverse=True)
    if not targets:
        return []
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    for target in targets:
        if libc.umount2(os.fsencode(target), _MNT_DETACH) != 0:
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)
    return targets


def _rmtree(directory: Path) -> None:
    if not directory.exists():
        return
    try:
        shutil.rmtree(directory)
    except OSError:
        unmount_under(directory)
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------------------
# images and containers
# --------------------------------------------------------------------------------------


def _payload_tar(content: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("payload")
        info.size = len(content)
        info.mode = 0o755
        info.mtime = int(time.time())
        info.type = tarfile.REGTYPE
        tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _unique_content(size: int) -> bytes:
    head = uuid.uuid4().hex.encode()  # unique even when size is small
    return (head + os.urandom(max(0, size - len(head))))[:size]


def _import_errors(result: Any) -> list[str]:
    """Errors in import_image_from_data's answer (a dict, or a JSON-lines string)."""
    items: list[Any] = []
    if isinstance(result, dict):
        items = [result]
    elif isinstance(result, (str, bytes)):
        text = result.decode(errors="replace") if isinstance(result, bytes) else result
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                items.append(json.loads(line))
    return [
        str(item.get("error") or item.get("errorDetail"))
        for item in items
        if isinstance(item, dict) and (item.get("error") or item.get("errorDetail"))
    ]


def make_image(
    client: docker.APIClient,
    reference: str,
    size: int = 1024,
    content: bytes | None = None,
) -> str:
    """Import a one-file image (``/payload``) as ``reference`` and return its ``sha256:`` id.

    With ``content=None`` the payload is ``size`` bytes of unique random data, so every
    call gives a distinct image id (and an image of about ``size`` bytes).
    """
    if content is None:
        content = _unique_content(size)
    repository, tag = split_reference(reference)
    result = client.import_image_from_data(_payload_tar(content), repository=repository, tag=tag)
    errors = _import_errors(result)
    if errors:
        raise RuntimeError(f"docker import of {reference} failed: {'; '.join(errors)}")
    return client.inspect_image(f"{repository}:{tag}")["Id"]


def create_stopped_container(
    client: docker.APIClient, image: str, name: str | None = None, **kwargs: Any
) -> str:
    """Create (never start) a container of ``image``; return its id.

    A created container marks its image as in use, and needs no runnable binary. Extra
    keyword arguments go to ``create_container`` (``labels=...`` for example).
    """
    kwargs.setdefault("host_config", client.create_host_config(network_mode="none"))
    return client.create_container(image, command=["/payload"], name=name, **kwargs)["Id"]


def image_exists(client: docker.APIClient, ref_or_id: str) -> bool:
    try:
        client.inspect_image(ref_or_id)
    except docker.errors.NotFound:  # ImageNotFound is a subclass
        return False
    return True


def image_tags(client: docker.APIClient) -> dict[str, str]:
    """Every tag on the engine: ``{"repo:tag": "sha256:..."}``."""
    tags = {}
    for image in client.images(all=False):
        for tag in image.get("RepoTags") or ():
            if tag != "<none>:<none>":
                tags[tag] = image["Id"]
    return tags


def remove_test_artifacts(
    client: docker.APIClient, prefixes: Iterable[str] = CLEANUP_PREFIXES
) -> None:
    """Remove all containers (forced: test clean-up only), every tag starting with one of
    ``prefixes``, all dangling images, and the agents' ownership markers (a test's agent
    with a journal of its own would refuse to start beside an earlier test's)."""
    prefixes = tuple(prefixes)
    volumes = client.volumes(filters={"label": ["snapagentd.instance"]}).get("Volumes") or []
    for volume in volumes:
        with contextlib.suppress(docker.errors.NotFound):
            client.remove_volume(volume["Name"])
    for container in client.containers(all=True, quiet=True):
        with contextlib.suppress(docker.errors.NotFound):
            client.remove_container(container["Id"], force=True, v=True)
    for tag in image_tags(client):
        if tag.startswith(prefixes):
            with contextlib.suppress(docker.errors.NotFound):
                client.remove_image(tag)
    for image in client.images(filters={"dangling": True}, quiet=True):
        image_id = image["Id"] if isinstance(image, dict) else image
        with contextlib.suppress(docker.errors.NotFound):
            client.remove_image(image_id)


# --------------------------------------------------------------------------------------
# sd_notify receiver
# --------------------------------------------------------------------------------------


class NotifySocket:
    """A real ``AF_UNIX``/``SOCK_DGRAM`` socket standing in for systemd's NOTIFY_SOCKET.

    Each datagram is split into lines; every line received is kept in ``.messages`` in
    order of arrival. ``wait_for`` returns the first line not yet returned by an earlier
    ``wait_for`` that matches, reading more datagrams until the deadline.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if len(self.path.encode()) > _MAX_SOCKET_PATH:
            raise ValueError(f"notify socket path too long: {self.path!r}")
        self.messages: list[str] = []
        self._returned: set[int] = set()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.setblocking(False)

    def env(self) -> dict[str, str]:
        """``{"NOTIFY_SOCKET": path}``, to merge into a child's environment."""
        return {"NOTIFY_SOCKET": self.path}

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self, timeout: float = 0.0) -> list[str]:
        """Read whatever datagrams arrive within ``timeout`` s; return the new lines."""
        readable, _, _ = select.select([self._sock], [], [], max(0.0, timeout))
        return self._receive_ready() if readable else []

    def wait_for(
        self, predicate_or_prefix: str | Callable[[str], bool], timeout: float = 10.0
    ) -> str:
        """Return the first unreturned line that starts with the prefix (or satisfies the
        predicate), reading datagrams until ``timeout`` s pass; then AssertionError."""
        if isinstance(predicate_or_prefix, str):
            prefix = predicate_or_prefix

            def matches(line: str) -> bool:
                return line.startswith(prefix)

            what = f"a line starting with {prefix!r}"
        else:
            matches = predicate_or_prefix
            what = f"a line matching {getattr(matches, '__name__', repr(matches))}"
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for index in range(checked, len(self.messages)):
                if index not in self._returned and matches(self.messages[index]):
                    self._returned.add(index)
                    return self.messages[index]
            checked = len(self.messages)  # lines seen here did not match: skip them next time
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no sd_notify message: waited {timeout:.1f}s on {self.path} for {what}; "
                    f"received {self.messages!r}"
                )
            readable, _, _ = select.select([self._sock], [], [], remaining)
            if readable:
                self._receive_ready()

    def _receive_ready(self) -> list[str]:
        new: list[str] = []
        while True:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return new
            lines = [line for line in data.decode("utf-8", "replace").split("\n") if line]
            self.messages.extend(lines)
            new.extend(lines)

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NotifySocket({self.path!r}, {len(self.messages)} messages)"
