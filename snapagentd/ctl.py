"""snapagentctl: command-line client of snapagentd over its Unix-socket HTTP+JSON API.

Standard library only, so it starts fast: the requests go through the blocking client of
snapagentd.client (which also retries while the agent restarts), and the output is rendered
from the agent's JSON answer as sent, which `--json` prints unchanged. The formatting
functions are pure (no I/O, `now` passed in) so they can be unit-tested; `main` does the
parsing, the request and the exit codes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import unicodedata
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from .client import AgentUnreachable, Client, ProtocolError, SnapagentdError

DEFAULT_SOCKET = "/run/snapagentd/snapagentd.sock"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
SNAPSHOT_COLUMNS = ["PROJECT", "WORK ITEM", "IMAGE", "ID", "SIZE", "CREATED", "LAST USED", "SOURCE"]
LIST_COLUMNS = [*SNAPSHOT_COLUMNS[:5], "UNIQUE", *SNAPSHOT_COLUMNS[5:]]
EVICT_COLUMNS = [*SNAPSHOT_COLUMNS, "REASON", "RESULT"]
# A real run's outcomes, when Docker said something about one: its refusal, or the failure.
DETAIL_COLUMN = "DETAIL"
# A dry run's explanation (an agent that sends `skipped`): eviction order, then what was spared.
PLAN_COLUMNS = ["REASON", "IMAGE", "AGE", "LAST USE", "UNIQUE", "RESULT"]
SKIPPED_COLUMNS = ["REASON", "IMAGE", "AGE", "LAST USE", "UNIQUE", "PROTECTED BY"]
MAX_LEASE_SECONDS = 86400  # the API's bound on a lease (docs/api.md)


class MalformedAnswer(Exception):
    """The agent answered, but not with what the API promises."""


# --- pure formatting -------------------------------------------------------------------------


def clean(value: Any) -> str:
    """Text for the terminal: None and "" become '-', control characters are escaped."""
    if value is None or value == "":
        return "-"
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp")
        else ch
        for ch in str(value)
    )


def display_width(text: str) -> int:
    """Terminal columns `text` takes: wide East Asian characters count 2, combining marks 0."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def format_table(rows: list[list[str]], columns: list[str]) -> str:
    """Left-aligned columns two spaces apart, header first, no trailing spaces."""
    table = [columns, *rows]
    widths = [max(display_width(row[i]) for row in table) for i in range(len(columns))]
    lines = []
    for row in table:
        cells = [
            cell + " " * (width - display_width(cell))
            for cell, width in zip(row, widths, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_pairs(pairs: list[tuple[str, str]]) -> str:
    """`key: value` lines with the values aligned."""
    width = max(display_width(key) for key, _ in pairs) + 2
    return "\n".join(f"{key + ':':<{width}}{value}".rstrip() for key, value in pairs)


def _integer(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} is not a non-negative integer: {value!r}")
    return value


def human_size(n: int | None) -> str:
    """Decimal units as Docker prints them: 999 B, 1.0 kB, 1.2 GB; '-' for unknown."""
    if n is None:
        return "-"
    value = float(_integer(n, "size"))
    if value < 1000:
        return f"{int(value)} B"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if round(value, 1) < 1000 or unit == "PB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def human_duration(seconds: int, parts: int = 2) -> str:
    """Whole seconds in their largest `parts` units: 0s, 90 -> 1m30s, 86400 -> 1d."""
    seconds = _integer(seconds, "duration")
    out = []
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= length and len(out) < parts:
            out.append(f"{seconds // length}{unit}")
            seconds %= length
    return "".join(out) or "0s"


def parse_time(text: str) -> datetime:
    """RFC 3339 (with a Z or an offset; no zone means UTC) as an aware datetime."""
    if not isinstance(text, str):
        raise ValueError(f"time is not a string: {text!r}")
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def human_age(iso: str | None, now: datetime) -> str:
    """How long before `now` the RFC 3339 time `iso` was, in its largest unit: '3h ago'."""
    if iso is None:
        return "-"
    delta = (now - parse_time(iso)).total_seconds()
    if abs(delta) < 1:
        return "just now"
    text = human_duration(int(abs(delta)), parts=1)
    return f"{text} ago" if delta > 0 else f"in {text}"


def short_id(image_id: str) -> str:
    """The first 12 hex characters of a `sha256:...` id."""
    return clean(image_id.removeprefix("sha256:")[:12])


def snapshot_row(entry: dict[str, Any], now: datetime) -> list[str]:
    return [
        clean(entry["project"]),
        clean(entry["work_item"]),
        clean(entry["image"]),
        short_id(entry["image_id"]),
        human_size(entry["size_bytes"]),
        human_age(entry["created_at"], now),
        human_age(entry["last_used_at"], now),
        clean(entry["source"]),
    ]


def list_row(entry: dict[str, Any], now: datetime) -> list[str]:
    """A `list` row: the snapshot row with its unique bytes after the size ('-' when the agent
    has not measured them, or is too old to send them)."""
    row = snapshot_row(entry, now)
    return [*row[:5], human_size(entry.get("unique_bytes")), *row[5:]]


def plan_row(entry: dict[str, Any], last: str) -> list[str]:
    """One row of a dry run's explanation; `last` is its RESULT or PROTECTED BY."""
    idle = human_duration(entry["idle_seconds"], parts=1)
    return [
        clean(entry["reason"]),
        clean(entry["image"]),
        human_duration(entry["age_seconds"], parts=1),
        "never" if entry["last_used_at"] is None else f"{idle} ago",
        human_size(entry["unique_bytes"]),
        clean(last),
    ]


def explanation(body: dict[str, Any]) -> str:
    """A dry run: what would go, in eviction order; what a rule wanted but a protection kept;
    and how much the disk wants back, when it does."""
    planned = [plan_row(entry, entry["result"]) for entry in body["evicted"]]
    spared = [plan_row(entry, entry["protected_by"]) for entry in body["skipped"]]
    parts = [format_table(planned, PLAN_COLUMNS) if planned else "nothing to evict"]
    if spared:
        parts.append("skipped:\n" + format_table(spared, SKIPPED_COLUMNS))
    to_free = _integer(body["disk_bytes_to_free"], "disk_bytes_to_free")
    if to_free:
        parts.append(f"disk: above the high watermark, {human_size(to_free)} to free")
    return "\n\n".join(parts)


def _when(iso: str | None, now: datetime) -> str:
    return "-" if iso is None else f"{clean(iso)} ({human_age(iso, now)})"


def _bytes(size: int | None) -> str:
    return "-" if size is None else f"{human_size(size)} ({size} bytes)"


def snapshot_pairs(entry: dict[str, Any], now: datetime) -> list[tuple[str, str]]:
    pairs = [
        ("project", clean(entry["project"])),
        ("work item", clean(entry["work_item"])),
        ("image", clean(entry["image"])),
        ("id", clean(entry["image_id"])),
        ("size", _bytes(entry["size_bytes"])),
        ("created", _when(entry["created_at"], now)),
        ("last used", _when(entry["last_used_at"], now)),
        ("source", clean(entry["source"])),
    ]
    if "unique_bytes" in entry:  # bytes only this image holds; absent from older agents
        pairs.insert(5, ("unique", _bytes(entry["unique_bytes"])))
    return pairs


def lease_pairs(lease: dict[str, Any], now: datetime) -> list[tuple[str, str]]:
    return [
        ("lease", clean(lease["id"])),
        ("project", clean(lease["project"])),
        ("work item", clean(lease["work_item"])),
        ("id", clean(lease["image_id"])),
        ("expires", _when(lease["expires_at"], now)),
    ]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def eviction_counts(last: dict[str, Any]) -> str:
    """The last eviction's results: the four every agent sends, then `leased`; the results
    newer agents count (untagged, has children, referenced) when any happened; the bytes
    reclaimed; and the alarms (wrong removals, odd images) when there were any."""
    keys = ["removed", "in_use", "already_gone", "failed"]
    keys += [key for key in ("leased",) if key in last]
    keys += [key for key in ("untagged", "has_children", "referenced") if last.get(key)]
    counts = ", ".join(f"{_integer(last[key], key)} {key.replace('_', ' ')}" for key in keys)
    if "reclaimed_bytes" in last:
        counts += f", {human_size(last['reclaimed_bytes'])} reclaimed"
    for key, word in (("wrong_removals", "wrong removal"), ("odd_images", "odd image")):
        if last.get(key):
            counts += f", {_plural(_integer(last[key], key), word)}"
    return counts


def disk_pairs(disk: dict[str, Any] | None, policy: dict[str, Any]) -> list[tuple[str, str]]:
    """The `status` lines of the disk: how full it is and whether it is above the high
    watermark, then the watermarks in free bytes (what eviction starts below and stops at)."""
    if disk is None:
        return [("disk", "watermarks off")]
    if disk["error"]:
        where = "" if disk["path"] is None else f" {clean(disk['path'])}"
        return [("disk", f"cannot measure{where}: {clean(disk['error'])}")]
    total, free = _integer(disk["total_bytes"], "total_bytes"), disk["free_bytes"]
    ratio = disk["used_ratio"]
    if not isinstance(ratio, int | float) or isinstance(ratio, bool):
        raise ValueError(f"used_ratio is not a number: {ratio!r}")
    state = "ABOVE the high watermark" if disk["above_high"] else "below the high watermark"
    usage = f"{ratio * 100:.1f}% used, {human_size(free)} free of {human_size(total)}"
    marks = (
        f"high {clean(policy.get('disk_high'))} (evict below "
        f"{human_size(disk['high_free_bytes'])} free), low {clean(policy.get('disk_low'))} "
        f"(until {human_size(disk['low_free_bytes'])} free)"
    )
    if policy.get("disk_interval_seconds") is not None:
        marks += f", checked every {human_duration(policy['disk_interval_seconds'])}"
    return [("disk", f"{usage} ({clean(disk['path'])}): {state}"), ("watermarks", marks)]


def status_pairs(body: dict[str, Any], now: datetime) -> list[tuple[str, str]]:
    docker, snaps, policy = body["docker"], body["snapshots"], body["policy"]
    last, journal = body["last_eviction"], body["journal"]

    def count(section: dict[str, Any], key: str) -> int:
        return _integer(section[key], key)

    def duration(key: str) -> str:
        return human_duration(policy[key])

    url = clean(docker["url"])
    if docker["reachable"]:
        docker_text = f"reachable ({url})"
    else:
        docker_text = f"unreachable ({url}): {clean(docker['error'])}"
    events = docker.get("events")
    if events is not None:  # null: the agent does not follow Docker's events
        reconnects = count(events, "reconnects")
        state = "connected" if events["connected"] else "not connected"
        docker_text += f", events {state}" + (
            f" ({_plural(reconnects, 'reconnect')})" if reconnects else ""
        )
    if "unique_bytes" in snaps:  # an agent that measures layers: virtual and unique bytes
        unique = snaps["unique_bytes"]
        snapshots_text = (
            f"{count(snaps, 'count')}, {human_size(snaps['total_size_bytes'])} virtual, "
            + ("unique not measured yet" if unique is None else f"{human_size(unique)} unique")
            + f", {count(snaps, 'pending_removal')} pending removal"
        )
    else:
        snapshots_text = (
            f"{count(snaps, 'count')}, {human_size(snaps['total_size_bytes'])} total, "
            f"{count(snaps, 'pending_removal')} pending removal"
        )
    if "leases" in snaps:
        snapshots_text += f", {_plural(count(snaps, 'leases'), 'lease')}"
    policy_text = (
        f"ttl {duration('ttl_seconds')}, max {count(policy, 'max_count')} snapshots, "
        f"max {human_size(policy['max_size_bytes'])}, every {duration('interval_seconds')}, "
        f"min age {duration('min_age_seconds')}"
    )
    if "size_accounting" in policy:
        policy_text += f", sizes {clean(policy['size_accounting'])}"
    pairs = [
        ("version", clean(body["version"])),
        ("docker", docker_text),
        ("snapshots", snapshots_text),
    ]
    if "disk" in body:  # absent from agents without watermarks
        pairs += disk_pairs(body["disk"], policy)
    pairs.append(("policy", policy_text))
    projects = policy.get("projects") or {}
    if projects:  # projects with limits of their own
        pairs.append(
            (
                "projects",
                "; ".join(
                    f"{clean(name)}: ttl {human_duration(limits['ttl_seconds'])}, "
                    f"max {count(limits, 'max_count')} snapshots, "
                    f"max {human_size(limits['max_size_bytes'])}"
                    for name, limits in sorted(projects.items())
                ),
            )
        )
    if last is None:
        pairs.append(("last eviction", "never"))
    else:
        counts = eviction_counts(last)
        text = f"{human_age(last['started_at'], now)} ({clean(last['trigger'])}): {counts}"
        if last["finished_at"] is None:
            text += ", still running"
        if last["error"]:
            text += f", error: {clean(last['error'])}"
        pairs.append(("last eviction", text))
    pairs.append(("journal", f"{clean(journal['path'])} ({count(journal, 'records')} records)"))
    engine = body.get("engine")
    if isinstance(engine, dict):  # absent from agents older than ownership markers
        engine_id = clean(engine.get("id") or "not reached yet")
        owner = f"instance {clean(engine.get('instance'))}, marker {clean(engine.get('marker'))}"
        pairs.append(("engine", f"{engine_id} ({owner})"))
    return pairs


def render(command: str, body: Any, now: datetime) -> str:
    """Human output for `command`'s successful answer; MalformedAnswer if it breaks the API."""
    try:
        if command == "status":
            return format_pairs(status_pairs(body, now))
        if command == "list":
            rows = [list_row(entry, now) for entry in body["snapshots"]]
            return format_table(rows, LIST_COLUMNS) if rows else "no snapshots"
        if command == "lookup":
            pairs = snapshot_pairs(body["snapshot"], now)
            if body.get("confirmed") is False:  # Docker did not answer in time
                pairs.append(("confirmed", "no: Docker did not answer in time, from the registry"))
            if body.get("lease") is not None:  # --lease: the lease taken with the lookup
                lease = body["lease"]
                pairs += [
                    ("lease", clean(lease["id"])),
                    ("expires", _when(lease["expires_at"], now)),
                ]
            return format_pairs(pairs)
        if command == "register":
            return format_pairs(snapshot_pairs(body["snapshot"], now))
        if command == "lease":
            return format_pairs(lease_pairs(body["lease"], now))
        if command == "release":
            if body["released"] is not True:
                raise ValueError(f"released is not true: {body['released']!r}")
            return format_pairs([*lease_pairs(body["lease"], now), ("released", "yes")])
        if command == "remove":
            pairs = [*snapshot_pairs(body["snapshot"], now), ("result", clean(body["result"]))]
            if body.get("detail") is not None:  # what Docker's refusal said; older agents: none
                pairs.append(("detail", clean(body["detail"])))
            return format_pairs(pairs)
        if command == "evict" and body.get("skipped") is not None:
            return explanation(body)
        if command == "evict":  # a real run, or a dry run of an agent that does not explain
            rows = [
                [*snapshot_row(entry, now), clean(entry["reason"]), clean(entry["result"])]
                for entry in body["evicted"]
            ]
            if not rows:
                return "nothing to evict"
            details = [entry.get("detail") for entry in body["evicted"]]
            if all(detail is None for detail in details):
                return format_table(rows, EVICT_COLUMNS)
            rows = [[*row, clean(detail)] for row, detail in zip(rows, details, strict=True)]
            return format_table(rows, [*EVICT_COLUMNS, DETAIL_COLUMN])
    except KeyError as error:
        raise MalformedAnswer(f"missing field {error}") from None
    except ValueError as error:
        raise MalformedAnswer(str(error)) from None
    except (TypeError, AttributeError) as error:
        raise MalformedAnswer(f"unexpected structure ({error})") from None
    raise ValueError(f"unknown command {command!r}")


def format_error(status: int, reason: str, body: bytes) -> str:
    """The stderr line for a non-2xx answer: the server's code and message when it sent them."""
    try:
        error = json.loads(body)["error"]
        code, message = error["code"], error["message"]
        if isinstance(code, str) and isinstance(message, str):
            return f"snapagentctl: {clean(code)}: {clean(message)}"
    except (ValueError, KeyError, TypeError):
        pass
    detail = clean(body[:200].decode(errors="replace").strip())
    return f"snapagentctl: HTTP {status} {clean(reason)}" + ("" if detail == "-" else f": {detail}")


# --- I/O -------------------------------------------------------------------------------------


def build_request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    """(method, path, JSON body or None) for the parsed command line."""
    c = args.command
    if c == "status":
        return "GET", "/v1/status", None
    if c == "list":
        query = "" if args.project is None else "?" + urlencode({"project": args.project})
        return "GET", "/v1/snapshots" + query, None
    if c == "lookup":
        body: dict[str, Any] = {"project": args.project, "work_item": args.work_item}
        if args.ttl is not None:
            body["ttl_seconds"] = args.ttl
        if args.lease is not None:
            body["lease_seconds"] = args.lease
        return "POST", "/v1/snapshots/lookup", body
    if c == "lease":
        body = {"project": args.project, "work_item": args.work_item, "seconds": args.seconds}
        return "POST", "/v1/snapshots/lease", body
    if c == "release":
        return "DELETE", "/v1/snapshots/lease?" + urlencode({"id": args.lease_id}), None
    if c == "register":
        body = {"project": args.project, "work_item": args.work_item, "image": args.image}
        if args.size is not None:
            body["size_bytes"] = args.size
        return "POST", "/v1/snapshots", body
    if c == "remove":
        query = urlencode({"project": args.project, "work_item": args.work_item})
        return "DELETE", "/v1/snapshots?" + query, None
    return "POST", "/v1/evict", {"dry_run": args.dry_run}


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a non-negative integer: {text!r}")
    return int(text)


def _lease_seconds(text: str) -> int:
    """A lease's length: whole seconds from 1 to a day, as the API takes it."""
    if not text.isdigit() or not 1 <= int(text) <= MAX_LEASE_SECONDS:
        raise argparse.ArgumentTypeError(f"not a number of seconds from 1 to 86400: {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    value = float(text) if text.replace(".", "", 1).isdigit() else 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapagentctl", description="Talk to snapagentd, the snapshot image agent."
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=os.environ.get("SNAPAGENTD_SOCKET") or DEFAULT_SOCKET,
        help=f"agent socket (default: $SNAPAGENTD_SOCKET or {DEFAULT_SOCKET})",
    )
    parser.add_argument("--json", action="store_true", help="print the agent's JSON answer")
    parser.add_argument("--timeout", type=_positive_float, default=30.0, metavar="SECONDS")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", help="agent, Docker and policy state")
    p = sub.add_parser("list", help="list snapshots")
    p.add_argument("--project", help="only this project's snapshots")
    p = sub.add_parser("lookup", help="find a work item's snapshot")
    p.add_argument("project")
    p.add_argument("work_item", metavar="work-item")
    p.add_argument("--ttl", type=_non_negative_int, metavar="SECONDS")
    p.add_argument(
        "--lease",
        type=_lease_seconds,
        metavar="SECONDS",
        help="also lease the snapshot found, so no eviction removes it for this long",
    )
    p = sub.add_parser("lease", help="protect a snapshot's image from eviction for a while")
    p.add_argument("project")
    p.add_argument("work_item", metavar="work-item")
    p.add_argument("seconds", type=_lease_seconds, help="1 to 86400")
    p = sub.add_parser("release", help="release a lease before it expires")
    p.add_argument("lease_id", metavar="lease-id")
    p = sub.add_parser("register", help="register a committed snapshot image")
    p.add_argument("project")
    p.add_argument("work_item", metavar="work-item")
    p.add_argument("image")
    p.add_argument("--size", type=_non_negative_int, metavar="N", help="image size in bytes")
    p = sub.add_parser("remove", help="invalidate and remove a snapshot")
    p.add_argument("project")
    p.add_argument("work_item", metavar="work-item")
    p = sub.add_parser("evict", help="run the eviction policy now")
    p.add_argument(
        "--dry-run", action="store_true", help="only explain what would be removed, and why not"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: --help is 0, usage errors are 2
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    method, path, payload = build_request(args)
    client = Client(args.socket, timeout=args.timeout)
    try:
        body = client.request(method, path, json_body=payload)
    except AgentUnreachable as error:  # missing socket, refused, timeout, reset before an answer
        print(f"snapagentctl: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except SnapagentdError as error:
        print(f"snapagentctl: {clean(error.code)}: {clean(error.message)}", file=sys.stderr)
        return EXIT_ERROR
    except ProtocolError as error:
        if error.status is not None and not 200 <= error.status < 300:
            print(format_error(error.status, error.reason, error.body), file=sys.stderr)
        else:  # malformed HTTP, or a 2xx answer that is not a JSON object
            print(f"snapagentctl: {clean(str(error))}", file=sys.stderr)
        return EXIT_ERROR
    try:
        if args.json:
            output = json.dumps(body, indent=2, ensure_ascii=False)
        else:
            output = render(args.command, body, datetime.now(UTC))
    except (ValueError, MalformedAnswer) as error:
        print(f"snapagentctl: malformed answer from snapagentd: {error}", file=sys.stderr)
        return EXIT_ERROR
    try:
        print(output)
        sys.stdout.flush()
    except BrokenPipeError:  # `snapagentctl ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second EPIPE at exit
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
