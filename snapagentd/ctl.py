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
EVICT_COLUMNS = [*SNAPSHOT_COLUMNS, "REASON", "RESULT"]


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


def _when(iso: str | None, now: datetime) -> str:
    return "-" if iso is None else f"{clean(iso)} ({human_age(iso, now)})"


def snapshot_pairs(entry: dict[str, Any], now: datetime) -> list[tuple[str, str]]:
    size = entry["size_bytes"]
    return [
        ("project", clean(entry["project"])),
        ("work item", clean(entry["work_item"])),
        ("image", clean(entry["image"])),
        ("id", clean(entry["image_id"])),
        ("size", "-" if size is None else f"{human_size(size)} ({size} bytes)"),
        ("created", _when(entry["created_at"], now)),
        ("last used", _when(entry["last_used_at"], now)),
        ("source", clean(entry["source"])),
    ]


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
    pairs = [
        ("version", clean(body["version"])),
        ("docker", docker_text),
        (
            "snapshots",
            f"{count(snaps, 'count')}, {human_size(snaps['total_size_bytes'])} total, "
            f"{count(snaps, 'pending_removal')} pending removal",
        ),
        (
            "policy",
            f"ttl {duration('ttl_seconds')}, max {count(policy, 'max_count')} snapshots, "
            f"max {human_size(policy['max_size_bytes'])}, every {duration('interval_seconds')}, "
            f"min age {duration('min_age_seconds')}",
        ),
    ]
    if last is None:
        pairs.append(("last eviction", "never"))
    else:
        counts = ", ".join(
            f"{count(last, key)} {key.replace('_', ' ')}"
            for key in ("removed", "in_use", "already_gone", "failed")
        )
        text = f"{human_age(last['started_at'], now)} ({clean(last['trigger'])}): {counts}"
        if last["finished_at"] is None:
            text += ", still running"
        if last["error"]:
            text += f", error: {clean(last['error'])}"
        pairs.append(("last eviction", text))
    pairs.append(("journal", f"{clean(journal['path'])} ({count(journal, 'records')} records)"))
    return pairs


def render(command: str, body: Any, now: datetime) -> str:
    """Human output for `command`'s successful answer; MalformedAnswer if it breaks the API."""
    try:
        if command == "status":
            return format_pairs(status_pairs(body, now))
        if command == "list":
            rows = [snapshot_row(entry, now) for entry in body["snapshots"]]
            return format_table(rows, SNAPSHOT_COLUMNS) if rows else "no snapshots"
        if command in ("lookup", "register"):
            return format_pairs(snapshot_pairs(body["snapshot"], now))
        if command == "remove":
            pairs = snapshot_pairs(body["snapshot"], now)
            return format_pairs([*pairs, ("result", clean(body["result"]))])
        if command == "evict":
            rows = [
                [*snapshot_row(entry, now), clean(entry["reason"]), clean(entry["result"])]
                for entry in body["evicted"]
            ]
            return format_table(rows, EVICT_COLUMNS) if rows else "nothing to evict"
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
        return "POST", "/v1/snapshots/lookup", body
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
    p = sub.add_parser("register", help="register a committed snapshot image")
    p.add_argument("project")
    p.add_argument("work_item", metavar="work-item")
    p.add_argument("image")
    p.add_argument("--size", type=_non_negative_int, metavar="N", help="image size in bytes")
    p = sub.add_parser("remove", help="invalidate and remove a snapshot")
    p.add_argument("project")
    p.add_argument("work_item", metavar="work-item")
    p = sub.add_parser("evict", help="run the eviction policy now")
    p.add_argument("--dry-run", action="store_true", help="only show what would be removed")
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
