"""TOML configuration, parsed once into a frozen settings object.

Every error names the key and quotes the value; unknown keys are errors, never ignored.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .models import split_reference

if TYPE_CHECKING:
    from .disk import Watermark

if sys.version_info >= (3, 11):  # noqa: UP036 - tomli kept for older Pythons
    import tomllib
else:  # pragma: no cover - Python 3.10 and older
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/snapagentd/snapagentd.toml")


class ConfigError(Exception):
    """One or more problems in the configuration; each line names a key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ApiSettings:
    socket: Path = Path("/run/snapagentd/snapagentd.sock")
    socket_mode: int = 0o660
    socket_group: str = ""
    # Besides root and the daemon's own user, only members of these groups are served.
    allowed_groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class DockerTimeouts:
    """Deadlines per kind of Docker call, in seconds ([docker] *_timeout)."""

    inspect: float = 5.0  # one image, a ping, `docker info`
    list: float = 30.0  # every image or container (large hosts have thousands)
    remove: float = 120.0  # deleting a large image can take a while on a busy disk
    lookup: float = 0.5  # a lookup's check of its tag, then it answers from the registry

    @property
    def longest(self) -> float:
        return max(self.inspect, self.list, self.remove, self.lookup)

    def to_json(self) -> dict[str, float]:
        return {
            "inspect": self.inspect,
            "list": self.list,
            "remove": self.remove,
            "lookup": self.lookup,
        }


@dataclass(frozen=True)
class DockerSettings:
    url: str = "unix:///run/docker.sock"
    image_prefixes: tuple[str, ...] = ("cascade-snapshot-",)
    # Where the disk watermarks look; "" asks Docker (`docker info`'s DockerRootDir).
    data_root: str = ""
    # Dangling images carrying this label ("key" or "key=value") are removed too; "": none.
    dangling_label: str = ""
    # Another agent may run on this engine, if both say so and their prefixes are disjoint.
    shared_engine: bool = False
    # How long each kind of Docker call may take before the agent stops waiting.
    timeouts: DockerTimeouts = field(default_factory=lambda: DockerTimeouts())

    def is_managed(self, reference: str) -> bool:
        """True when `reference` (repo:tag) lies in a repository the agent manages."""
        if "@" in reference:  # digests and ids are never managed references
            return False
        repository, _tag = split_reference(reference)
        return any(repository.startswith(prefix) for prefix in self.image_prefixes)


@dataclass(frozen=True)
class Limits:
    """The limits one pool of snapshots lives under: the global pool or one project's."""

    ttl_seconds: int
    max_count: int
    max_size_bytes: int

    def to_json(self) -> dict[str, int]:
        return {
            "ttl_seconds": self.ttl_seconds,
            "max_count": self.max_count,
            "max_size_bytes": self.max_size_bytes,
        }


def _default_watermark(text: str) -> Watermark:
    from .disk import parse_watermark

    return parse_watermark(text)


@dataclass(frozen=True)
class PolicySettings:
    ttl_seconds: int = 24 * 3600
    max_count: int = 5
    max_size_bytes: int = 10 * 1024**3
    interval_seconds: int = 5 * 60
    min_age_seconds: int = 0
    # Disk pressure on the filesystem of Docker's data root; None (disk_high = "off"): never.
    disk_high: Watermark | None = field(default_factory=lambda: _default_watermark("85%"))
    disk_low: Watermark | None = field(default_factory=lambda: _default_watermark("80%"))
    disk_interval_seconds: int = 30
    size_accounting: str = "unique"  # or "virtual": Docker's Size, shared layers and all
    # Projects with limits of their own, each a pool apart from the global one.
    projects: tuple[tuple[str, Limits], ...] = ()

    @property
    def global_limits(self) -> Limits:
        return Limits(self.ttl_seconds, self.max_count, self.max_size_bytes)

    def limits_for(self, project: str) -> Limits:
        """The limits `project`'s snapshots live under (its own, or the global ones)."""
        for name, limits in self.projects:
            if name == project:
                return limits
        return self.global_limits

    def to_json(self) -> dict[str, Any]:
        return {
            **self.global_limits.to_json(),
            "interval_seconds": self.interval_seconds,
            "min_age_seconds": self.min_age_seconds,
            "disk_high": self.disk_high.describe() if self.disk_high else "off",
            "disk_low": self.disk_low.describe() if self.disk_low else "off",
            "disk_interval_seconds": self.disk_interval_seconds,
            "size_accounting": self.size_accounting,
            "projects": {name: limits.to_json() for name, limits in self.projects},
        }


@dataclass(frozen=True)
class JournalSettings:
    path: Path = Path("/var/lib/snapagentd/journal.jsonl")


@dataclass(frozen=True)
class SentrySettings:
    dsn: str = ""
    environment: str = ""


@dataclass(frozen=True)
class MetricsSettings:
    # Also serve GET /metrics on this loopback TCP address ("127.0.0.1:9465"); "": socket only.
    listen: str = ""


@dataclass(frozen=True)
class Settings:
    api: ApiSettings = field(default_factory=ApiSettings)
    docker: DockerSettings = field(default_factory=DockerSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    journal: JournalSettings = field(default_factory=JournalSettings)
    sentry: SentrySettings = field(default_factory=SentrySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


# --- value converters: each raises ValueError with a phrase that completes "<key>: ..." ---

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip


MAX_DURATION_SECONDS = 100 * 365 * 86400  # datetime arithmetic stays in range; more is a typo


def duration_seconds(value: Any) -> int:
    """`30s`, `5m`, `24h`, `7d` or a non-negative integer number of seconds, at most 100 years."""
    seconds = None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        seconds = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]{1,12})\s*([smhd]?)\s*", value)
        if match:
            seconds = int(match[1]) * _DURATION_UNITS[match[2] or "s"]
    if seconds is not None and seconds <= MAX_DURATION_SECONDS:
        return seconds
    raise ValueError(
        f"invalid duration {value!r} (use 30s, 5m, 24h, 7d or integer seconds; at most 100 years)"
    )


MAX_TIMEOUT_SECONDS = 3600


def timeout_seconds(value: Any) -> float:
    """A deadline: `500ms`, `5s`, `2m` or a number of seconds; above 0, at most an hour."""
    seconds = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]{1,7}(?:\.[0-9]{1,3})?)\s*(ms|s|m)?\s*", value)
        if match:
            seconds = float(match[1]) * {"ms": 0.001, "s": 1, "m": 60}[match[2] or "s"]
    if seconds is not None and 0 < seconds <= MAX_TIMEOUT_SECONDS:
        return seconds
    raise ValueError(
        f"invalid timeout {value!r} (use 500ms, 5s, 2m or seconds; above 0, at most 1 hour)"
    )


def positive_duration_seconds(value: Any) -> int:
    """A duration of at least one second (a timer period)."""
    seconds = duration_seconds(value)
    if seconds == 0:
        raise ValueError(f"invalid duration {value!r} (must be at least 1s)")
    return seconds


def size_bytes(value: Any) -> int:
    """Integer bytes, or a number with a unit: `500MB`, `10GiB`."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]{1,20})\s*([A-Za-z]*)\s*", value)
        if match and match[2].lower() in _SIZE_UNITS:
            return int(match[1]) * _SIZE_UNITS[match[2].lower()]
    raise ValueError(f"invalid size {value!r} (use integer bytes or 500MB, 10GiB)")


def count(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"invalid count {value!r} (use a non-negative integer)")


def octal_mode(value: Any) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    raise ValueError(f'invalid mode {value!r} (use an octal string such as "0660")')


def boolean(value: Any) -> bool:
    """A TOML boolean (a string such as "yes" is refused: it would hide a typo)."""
    if isinstance(value, bool):
        return value
    raise ValueError(f"invalid value {value!r} (use true or false)")


def text(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"invalid value {value!r} (expected a string)")


def absolute_path(value: Any) -> Path:
    if isinstance(value, str) and value.startswith("/"):
        return Path(value)
    raise ValueError(f"invalid path {value!r} (expected an absolute path)")


def group_names(value: Any) -> tuple[str, ...]:
    """A list of Unix group names (whether they exist is checked when the daemon starts)."""
    if not isinstance(value, list):
        raise ValueError(f"invalid value {value!r} (expected a list of group names)")
    for name in value:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", name):
            raise ValueError(f"invalid group name {name!r}")
    return tuple(value)


def optional_absolute_path(value: Any) -> str:
    """An absolute path, or "" for none."""
    if value == "":
        return ""
    return str(absolute_path(value))


def docker_url(value: Any) -> str:
    if isinstance(value, str) and re.match(r"(unix|tcp|http|https)://.+", value):
        return value
    raise ValueError(f"invalid URL {value!r} (expected unix:///path or tcp://host:port)")


def image_prefixes(value: Any) -> tuple[str, ...]:
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        for prefix in value:
            # A short prefix would let the agent claim (and delete) images it does not own.
            if not re.fullmatch(r"[a-z0-9][a-z0-9._/-]{2,}", prefix):
                raise ValueError(
                    f"invalid prefix {prefix!r} (at least 3 characters of a-z 0-9 . _ / -)"
                )
        return tuple(value)
    raise ValueError(f"invalid value {value!r} (expected a non-empty list of strings)")


def watermark(value: Any) -> Watermark | None:
    """A disk watermark ("85%", "20GiB"), or "off"."""
    if value == "off":
        return None
    from .disk import parse_watermark

    return parse_watermark(value)


def size_accounting(value: Any) -> str:
    if value in ("unique", "virtual"):
        return str(value)
    raise ValueError(f'invalid value {value!r} (use "unique" or "virtual")')


def label_selector(value: Any) -> str:
    """A Docker label filter, "key" or "key=value"."""
    if isinstance(value, str) and re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._/-]*(=[^\s]*)?)?", value):
        return value
    raise ValueError(f'invalid label {value!r} (use "key" or "key=value")')


def listen_address(value: Any) -> str:
    """A loopback host:port for the metrics endpoint, or "" for none."""
    if value == "":
        return ""
    from .metrics import parse_listen

    parse_listen(value)
    return str(value)


# The keys a [policy.projects."<name>"] table may override: key -> (attribute, converter).
_PROJECT_KEYS: dict[str, tuple[str, Any]] = {
    "ttl": ("ttl_seconds", duration_seconds),
    "max_count": ("max_count", count),
    "max_size": ("max_size_bytes", size_bytes),
}


def _project_limits(
    table: Any, defaults: dict[str, Any], problems: list[str]
) -> tuple[tuple[str, Limits], ...]:
    """Parse [policy.projects]: each project's limits, unset keys taken from the global ones."""
    if not isinstance(table, dict):
        problems.append(f"policy.projects: expected a table of projects, got {table!r}")
        return ()
    parsed = []
    for name, overrides in table.items():
        where = f'policy.projects."{name}"'
        if not name:
            problems.append(f"{where}: the project name must not be empty")
            continue
        if not isinstance(overrides, dict):
            problems.append(f"{where}: expected a table, got {overrides!r}")
            continue
        values = {
            "ttl_seconds": defaults.get("ttl_seconds", PolicySettings.ttl_seconds),
            "max_count": defaults.get("max_count", PolicySettings.max_count),
            "max_size_bytes": defaults.get("max_size_bytes", PolicySettings.max_size_bytes),
        }
        for key, raw in overrides.items():
            if key not in _PROJECT_KEYS:
                problems.append(f"{where}.{key}: unknown key (known: {', '.join(_PROJECT_KEYS)})")
                continue
            attribute, convert = _PROJECT_KEYS[key]
            try:
                values[attribute] = convert(raw)
            except ValueError as error:
                problems.append(f"{where}.{key}: {error}")
        parsed.append((name, Limits(**values)))
    return tuple(sorted(parsed))


def _check_policy(values: dict[str, Any], problems: list[str]) -> None:
    """Rules between [policy] keys: the low watermark must stop below where high starts."""
    high = values.get("disk_high", PolicySettings().disk_high)
    low = values.get("disk_low", PolicySettings().disk_low)
    if high is not None and low is None:
        problems.append('policy.disk_low: "off" needs disk_high = "off" too')
    elif high is not None and low is not None:
        from .disk import check_watermarks

        try:
            check_watermarks(high, low)
        except ValueError as error:
            if "disk_low" in values:
                problems.append(f"policy.disk_low: {error}")
            else:
                problems.append(
                    f"policy.disk_high: {error} (disk_low is at its default; set it too)"
                )


# section -> key -> (attribute, converter)
_SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "api": {
        "socket": ("socket", absolute_path),
        "socket_mode": ("socket_mode", octal_mode),
        "socket_group": ("socket_group", text),
        "allowed_groups": ("allowed_groups", group_names),
    },
    "docker": {
        "url": ("url", docker_url),
        "image_prefixes": ("image_prefixes", image_prefixes),
        "data_root": ("data_root", optional_absolute_path),
        "dangling_label": ("dangling_label", label_selector),
        "shared_engine": ("shared_engine", boolean),
        "inspect_timeout": ("timeouts.inspect", timeout_seconds),
        "list_timeout": ("timeouts.list", timeout_seconds),
        "remove_timeout": ("timeouts.remove", timeout_seconds),
        "lookup_timeout": ("timeouts.lookup", timeout_seconds),
    },
    "policy": {
        "ttl": ("ttl_seconds", duration_seconds),
        "max_count": ("max_count", count),
        "max_size": ("max_size_bytes", size_bytes),
        "interval": ("interval_seconds", positive_duration_seconds),
        "min_age": ("min_age_seconds", duration_seconds),
        "disk_high": ("disk_high", watermark),
        "disk_low": ("disk_low", watermark),
        "disk_interval": ("disk_interval_seconds", positive_duration_seconds),
        "size_accounting": ("size_accounting", size_accounting),
        # "projects" is a table of tables, parsed by _project_limits
    },
    "journal": {"path": ("path", absolute_path)},
    "sentry": {"dsn": ("dsn", text), "environment": ("environment", text)},
    "metrics": {"listen": ("listen", listen_address)},
}
_SECTION_TYPES = {
    "api": ApiSettings,
    "docker": DockerSettings,
    "policy": PolicySettings,
    "journal": JournalSettings,
    "sentry": SentrySettings,
    "metrics": MetricsSettings,
}


def parse_settings(document: dict[str, Any]) -> Settings:
    """Turn a parsed TOML document into Settings, collecting every problem before failing."""
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for section, table in document.items():
        if section not in _SCHEMA:
            problems.append(f"{section}: unknown section (known: {', '.join(_SCHEMA)})")
            continue
        if not isinstance(table, dict):
            problems.append(f"{section}: expected a table, got {table!r}")
            continue
        values: dict[str, Any] = {}
        for key, raw in table.items():
            if section == "policy" and key == "projects":
                continue  # needs the global limits: parsed below
            if key not in _SCHEMA[section]:
                known = ", ".join(
                    [*_SCHEMA[section], *(["projects"] if section == "policy" else [])]
                )
                problems.append(f"{section}.{key}: unknown key (known: {known})")
                continue
            attribute, convert = _SCHEMA[section][key]
            try:
                values[attribute] = convert(raw)
            except ValueError as error:
                problems.append(f"{section}.{key}: {error}")
        if section == "docker":
            timeouts = {k.split(".")[1]: values.pop(k) for k in list(values) if "." in k}
            if timeouts:
                values["timeouts"] = DockerTimeouts(**timeouts)
        if section == "policy":
            if "projects" in table:
                values["projects"] = _project_limits(table["projects"], values, problems)
            _check_policy(values, problems)
        sections[section] = values
    if problems:
        raise ConfigError(problems)
    return Settings(**{name: _SECTION_TYPES[name](**values) for name, values in sections.items()})


def load_settings(path: Path) -> Settings:
    """Read and validate the configuration file at `path`."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError([f"{path}: cannot read configuration: {error.strerror}"]) from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # TOMLDecodeError, UnicodeDecodeError, ...
        raise ConfigError([f"{path}: not valid TOML: {error}"]) from None
    try:
        return parse_settings(document)
    except ConfigError as error:
        raise ConfigError([f"{path}: {problem}" for problem in error.problems]) from None
