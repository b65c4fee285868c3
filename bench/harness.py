"""What every benchmark shares: the private dockerd, images, agents, the load client, statistics
and the result rows. The engine and the agent come from the test suite (tests/engine.py,
tests/agent.py), so the benchmarks run the agent exactly as the tests and systemd do.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import docker

from tests.agent import Agent
from tests.engine import DockerEngine, NotifySocket, make_image, make_short_tmpdir

REPO = Path(__file__).resolve().parent.parent
PREFIX = "cascade-snapshot-bench-"
# The bench's default policy: nothing is evicted unless a benchmark asks for it.
QUIET_POLICY = {"ttl": "3650d", "max_count": 10_000_000, "max_size": "1000TiB", "interval": "24h"}


@dataclass
class Sizes:
    """How big each benchmark is; --smoke shrinks everything."""

    repetitions: int = 5
    images: int = 200  # distinct image ids made for B1-B3/B5 ...
    tags_per_image: int = 5  # ... each tagged this often: 1,000 managed tags
    entries: int = 10_000  # B2/B5
    journal_records: int = 100_000  # B3
    evict_images: int = 200  # B4
    concurrency: tuple[int, ...] = (1, 16, 64)
    seconds: float = 2.0  # per load repetition
    warmup: float = 0.5

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(
            repetitions=2,
            images=5,
            tags_per_image=2,
            entries=20,
            journal_records=200,
            evict_images=5,
            concurrency=(1, 4),
            seconds=0.3,
            warmup=0.1,
        )


@dataclass
class Row:
    """One line of the result table."""

    bench: str
    what: str
    agent: float
    floor: float | None
    unit: str
    target: str
    # ("min_ratio", x): agent/floor >= x (throughput); ("max_ratio", x): agent/floor <= x;
    # ("max", x): agent <= x in `unit`; None: reported only.
    goal: tuple[str, float] | None = None
    verdict: str = "-"
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.floor in (None, 0):
            return None
        return self.agent / self.floor

    def judge(self) -> None:
        if self.goal is None:
            self.verdict = "-"
            return
        kind, limit = self.goal
        value = self.agent if kind == "max" else self.ratio
        if value is None:
            self.verdict = "?"
        elif kind == "min_ratio":
            self.verdict = "met" if value >= limit else "NOT MET"
        else:
            self.verdict = "met" if value <= limit else "NOT MET"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


# --- statistics -----------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (p99 of 100 samples is the 99th smallest)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "aiohttp": aiohttp.__version__,
        "docker_sdk": docker.__version__,
        "load_average_at_start": os.getloadavg()[0],
    }


# --- processes ------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "DOCKER_"))}
    env["PYTHONPATH"] = str(REPO)
    return env


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def drive(
    socket_path: Path,
    requests: list[tuple[str, str, Any]],
    concurrency: int,
    duration: float | None,
    warmup: float = 0.0,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Run the load generator (a separate process) against a socket; returns its result plus
    p50/p99 and the server's CPU use during the run (1.0 = one core saturated)."""
    job = {
        "socket": str(socket_path),
        "requests": requests,
        "concurrency": concurrency,
        "duration": duration,
        "warmup": warmup,
        "server_pid": server_pid,
    }
    done = subprocess.run(
        [sys.executable, "-m", "bench.loadgen"],
        input=json.dumps(job).encode(),
        capture_output=True,
        env=child_env(),
        cwd=REPO,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr.decode(errors='replace')}")
    result = json.loads(done.stdout)
    latencies = result.pop("latencies_ms")
    result["p50_ms"] = percentile(latencies, 0.50)
    result["p99_ms"] = percentile(latencies, 0.99)
    return result


# --- the bench context ----------------------------------------------------------------------


class Bench:
    """A private dockerd, the images on it, and a scratch directory for agents."""

    def __init__(self, sizes: Sizes, smoke: bool) -> None:
        self.sizes = sizes
        self.smoke = smoke
        self.directory = make_short_tmpdir("sab-")
        self.engine: DockerEngine | None = None
        self.client: docker.APIClient | None = None
        self.tags: list[str] = []  # the shared managed tags (B1-B3, B5)
        self._agents = 0

    @contextmanager
    def running(self) -> Iterator[Bench]:
        try:
            self.engine = DockerEngine.start(self.directory / "d", dockerd=dockerd_path())
            self.client = self.engine.client(timeout=300)
            yield self
        finally:
            if self.client is not None:
                self.client.close()
            if self.engine is not None:
                self.engine.stop()
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def docker_url(self) -> str:
        assert self.engine is not None
        return self.engine.url

    def dockerd_version(self) -> str:
        assert self.client is not None
        return str(self.client.version().get("Version"))

    def inspect_requests(self, tags: list[str]) -> list[tuple[str, str, Any]]:
        """GET /images/<tag>/json for each tag: what register and lookup ask Docker."""
        assert self.client is not None
        version = self.client.version()["ApiVersion"]
        return [("GET", f"/v{version}/images/{tag}/json", None) for tag in tags]

    def drive_dockerd(
        self, tags: list[str], concurrency: int, seconds: float, warmup: float
    ) -> dict[str, Any]:
        """The second floor of B1/B2: dockerd answering the same inspects with no agent."""
        assert self.engine is not None and self.engine.pid is not None
        socket_path = Path(self.engine.socket_path)
        requests = self.inspect_requests(tags)
        return drive(socket_path, requests, concurrency, seconds, warmup, self.engine.pid)

    def shared_tags(self) -> list[str]:
        """`images` distinct tiny images, each under `tags_per_image` managed tags (made once)."""
        if not self.tags:
            assert self.client is not None
            for number in range(self.sizes.images):
                first = f"{PREFIX}{number}-0:latest"
                make_image(self.client, first, size=256)
                self.tags.append(first)
                for copy in range(1, self.sizes.tags_per_image):
                    self.client.tag(first, f"{PREFIX}{number}-{copy}", "latest")
                    self.tags.append(f"{PREFIX}{number}-{copy}:latest")
        return self.tags

    def distinct_images(self, name: str, count: int) -> list[str]:
        """`count` images with distinct ids (each its own layer), one managed tag each."""
        assert self.client is not None
        tags = [f"cascade-snapshot-{name}-{number}:latest" for number in range(count)]
        for tag in tags:
            make_image(self.client, tag, size=256)
        return tags

    def new_agent(self, **policy: Any) -> Agent:
        """An agent (not started) with its own directory, notify socket and the quiet policy."""
        self._agents += 1
        directory = self.directory / f"a{self._agents}"
        directory.mkdir()
        notify = NotifySocket(directory / "n.sock")
        return Agent(directory, self.docker_url, notify, **{**QUIET_POLICY, **policy})

    def start_agent(self, agent: Agent, timeout: float = 120.0) -> float:
        """Spawn the agent and return the seconds from spawn to READY=1."""
        seen = len(agent.notify.messages)
        began = time.perf_counter()
        agent.spawn(env=child_env())
        agent.notify.wait_for(lambda line: line == "READY=1", timeout=timeout)
        elapsed = time.perf_counter() - began
        del agent.notify.messages[seen:]  # keep wait_for's bookkeeping simple for the next start
        agent.notify._returned.clear()
        return elapsed

    def stop_agent(self, agent: Agent) -> None:
        if agent.process is not None:
            agent.stop(signal.SIGTERM, timeout=60)
        agent.notify.close()
        agent.remove_marker()  # the next agent, with a journal of its own, may then start


@contextmanager
def floor_server(directory: Path, journalled: bool = False) -> Iterator[tuple[Path, int]]:
    """The no-op aiohttp server in its own process: yields (socket path, pid). `journalled`:
    its lookups append to a journal in `directory` and fsync first (see floors.py)."""
    path = directory / ("floor-journalled.sock" if journalled else "floor.sock")
    journal = [str(directory / "floor-journal.jsonl")] if journalled else []
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.floors", str(path), *journal],
        stdout=subprocess.PIPE,
        env=child_env(),
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            raise RuntimeError("the floor server did not start")
        yield path, process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)
        path.unlink(missing_ok=True)


def repeat(times: int, run: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
    return [run() for _ in range(times)]


def median_of(results: list[dict[str, Any]], key: str) -> float:
    return median([result[key] for result in results])


def dockerd_path() -> str:
    """The bench starts a private dockerd: it needs root and Debian's docker.io."""
    path = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if os.geteuid() != 0 or not os.access(path, os.X_OK):
        raise SystemExit("the bench starts a private dockerd: run it as root with docker.io")
    return path
