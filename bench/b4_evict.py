"""B4: evicting 200 images with one `POST /v1/evict` after lowering `max_count` to 0 (SIGHUP).

Each repetition makes 200 images with distinct ids (so removal really deletes layers), starts
an agent that manages only their prefix (it discovers them at start; the policy then allows
them all), waits until it has measured their layers (right after READY=1, off the start-up
path; status then shows `unique_bytes`), rewrites the config with `max_count = 0`, sends
SIGHUP, waits for READY=1 and times the request. The floor is one `docker rmi` CLI call
naming another 200 such images.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

from tests.agent import call
from tests.engine import wait_until

from .harness import Bench, Row, median


def time_agent(bench: Bench, round_: int) -> float:
    prefix = f"cascade-snapshot-evict{round_}-"
    count = bench.sizes.evict_images
    tags = bench.distinct_images(f"evict{round_}", count)
    agent = bench.new_agent()
    agent.extra = {"docker": {"url": bench.docker_url, "image_prefixes": [prefix]}}
    agent.write_config()
    try:
        bench.start_agent(agent)
        # The measurement after start-up holds the run lock: time the eviction, not it.
        wait_until(
            lambda: agent.status()["snapshots"]["unique_bytes"] is not None,
            timeout=120,
            message="the agent to measure the images' layers after start-up",
        )
        agent.policy["max_count"] = 0
        agent.write_config()
        assert agent.process is not None
        agent.process.send_signal(signal.SIGHUP)
        agent.notify.wait_for(lambda line: line == "READY=1", timeout=30)
        began = time.perf_counter()
        status, answer = call(agent.socket_path, "POST", "/v1/evict", {}, timeout=600)
        elapsed = time.perf_counter() - began
    finally:
        bench.stop_agent(agent)
    results = [item["result"] for item in answer.get("evicted", [])]
    if status != 200 or len(results) != count or set(results) != {"removed"}:
        raise RuntimeError(f"eviction did not remove all {count} images: {status} {answer}")
    assert bench.client is not None
    left = [t for t in tags if bench.client.images(name=t.split(":")[0])]
    if left:
        raise RuntimeError(f"images left after eviction: {left[:3]}")
    return elapsed


def time_floor(bench: Bench, round_: int) -> float:
    tags = bench.distinct_images(f"rmi{round_}", bench.sizes.evict_images)
    docker_cli = shutil.which("docker")
    if docker_cli is None:
        raise RuntimeError("the B4 floor needs the docker CLI (Debian's docker.io)")
    began = time.perf_counter()
    subprocess.run(
        [docker_cli, "-H", bench.docker_url, "rmi", *tags],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - began


def run(bench: Bench) -> list[Row]:
    floor, agent = [], []
    for round_ in range(bench.sizes.repetitions):
        floor.append(time_floor(bench, round_))
        agent.append(time_agent(bench, round_))
    return [
        Row(
            "B4",
            f"evict {bench.sizes.evict_images} images (POST /v1/evict)",
            median(agent) * 1000,
            median(floor) * 1000,
            "ms",
            "<= 0.8 x floor",
            ("max_ratio", 0.8),
        )
    ]
