"""`python -m bench [--smoke] [--json PATH] [--only B1,B3]`: run the benchmarks, print one table.

Starts its own private dockerd (under /tmp/sab-*) and its own agents; needs root and dockerd,
like the test suite. `--smoke` runs tiny sizes without verdicts, to keep the bench from rotting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import b1_register, b2_lookup, b3_startup, b4_evict, b5_memory
from .harness import REPO, Bench, Row, Sizes, machine

ALL = ("B1", "B2", "B3", "B4", "B5")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no verdicts")
    parser.add_argument(
        "--json",
        type=Path,
        help="write the results here (default .run/bench.json, with --smoke .run/bench-smoke.json)",
    )
    parser.add_argument("--only", default=",".join(ALL), help="comma-separated, e.g. B1,B3")
    args = parser.parse_args(argv)
    if args.json is None:
        args.json = REPO / ".run" / ("bench-smoke.json" if args.smoke else "bench.json")
    args.only = [name.strip().upper() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(ALL))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    return args


def run(bench: Bench, only: list[str]) -> list[Row]:
    rows: list[Row] = []
    if "B1" in only:
        rows += b1_register.run(bench)
    if "B2" in only or "B5" in only:
        agent = b2_lookup.populate(bench)
        try:
            if "B2" in only:
                rows += b2_lookup.run(bench, agent)
            if "B5" in only:
                rows += b5_memory.run(bench, agent)
        finally:
            bench.stop_agent(agent)
    if "B3" in only:
        rows += b3_startup.run(bench)
    if "B4" in only:
        rows += b4_evict.run(bench)
    return rows


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def table(rows: list[Row]) -> str:
    header = ("#", "benchmark", "agent", "floor", "ratio", "target", "verdict")
    lines = [header]
    for row in rows:
        lines.append(
            (
                row.bench,
                row.what,
                f"{_number(row.agent)} {row.unit}",
                f"{_number(row.floor)} {row.unit}" if row.floor is not None else "-",
                f"{row.ratio:.2f}" if row.ratio is not None else "-",
                row.target,
                row.verdict,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in lines
    ]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def machine_line(facts: dict[str, Any]) -> str:
    return (
        "machine: {cores} cores ({cpu}), Linux {kernel}, Python {python}, aiohttp {aiohttp}, "
        "docker SDK {docker_sdk}, dockerd {dockerd}, load average {load_average_at_start:.2f}"
    ).format(**facts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = Sizes.smoke() if args.smoke else Sizes()
    facts: dict[str, Any] = machine()
    began = time.time()
    bench = Bench(sizes, smoke=args.smoke)
    with bench.running():
        facts["dockerd"] = bench.dockerd_version()
        print(machine_line(facts), flush=True)
        rows = run(bench, args.only)
    facts["load_average_at_end"] = os.getloadavg()[0]
    for row in rows:
        if not args.smoke:
            row.judge()
    print(table(rows))
    document = {
        "command": " ".join(["python", "-m", "bench", *(argv or sys.argv[1:])]),
        "smoke": args.smoke,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(began)),
        "seconds": round(time.time() - began, 1),
        "machine": facts,
        "sizes": {k: v for k, v in vars(sizes).items()},
        "rows": [row.to_json() for row in rows],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results written to {args.json} ({document['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
