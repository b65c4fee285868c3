"""Table tests for the TOML configuration: converters, error messages, files and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from snapagentd.config import (
    ApiSettings,
    ConfigError,
    DockerSettings,
    JournalSettings,
    Limits,
    PolicySettings,
    SentrySettings,
    Settings,
    load_settings,
    parse_settings,
)
from snapagentd.disk import Watermark

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3


def only_problem(document: dict[str, Any]) -> str:
    """The single problem `document` has."""
    with pytest.raises(ConfigError) as caught:
        parse_settings(document)
    assert len(caught.value.problems) == 1, caught.value.problems
    assert str(caught.value) == caught.value.problems[0]
    return caught.value.problems[0]


# --- defaults -------------------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    settings = parse_settings({})
    assert settings == Settings()
    assert settings.api.socket == Path("/run/snapagentd/snapagentd.sock")
    assert settings.api.socket_mode == 0o660
    assert settings.api.socket_group == ""
    assert settings.docker.url == "unix:///run/docker.sock"
    assert settings.docker.image_prefixes == ("cascade-snapshot-",)
    assert settings.policy.ttl_seconds == 24 * 3600
    assert settings.policy.max_count == 5
    assert settings.policy.max_size_bytes == 10 * GiB
    assert settings.policy.interval_seconds == 5 * 60
    assert settings.policy.min_age_seconds == 0
    assert settings.journal.path == Path("/var/lib/snapagentd/journal.jsonl")
    assert settings.sentry.dsn == ""
    assert settings.sentry.environment == ""
    assert settings.policy.disk_high == Watermark(used_percent=85)
    assert settings.policy.disk_low == Watermark(used_percent=80)
    assert settings.policy.disk_interval_seconds == 30
    assert settings.policy.size_accounting == "unique"
    assert settings.policy.projects == ()
    assert settings.docker.data_root == ""
    assert settings.docker.dangling_label == ""
    assert settings.docker.shared_engine is False
    assert settings.metrics.listen == ""


# --- rules between keys, and per-project tables ---------------------------------------------


def test_free_space_watermarks_are_accepted() -> None:
    policy = parse_settings({"policy": {"disk_high": "20GiB", "disk_low": "30GiB"}}).policy
    assert policy.disk_high == Watermark(free_bytes=20 * GiB)
    assert policy.disk_low == Watermark(free_bytes=30 * GiB)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"disk_high": "80%", "disk_low": "85%"}, "policy.disk_low"),
        ({"disk_high": "20GiB", "disk_low": "10GiB"}, "policy.disk_low"),
        ({"disk_high": "70%"}, "policy.disk_high"),  # below the default low of 80%
        ({"disk_low": "off"}, "policy.disk_low"),  # high still on
    ],
)
def test_watermarks_must_stop_below_where_they_start(values: dict[str, Any], key: str) -> None:
    problem = only_problem({"policy": values})
    assert problem.startswith(f"{key}: ")


def test_both_watermarks_off_disable_disk_pressure() -> None:
    policy = parse_settings({"policy": {"disk_high": "off", "disk_low": "off"}}).policy
    assert policy.disk_high is None and policy.disk_low is None


def test_project_tables_override_the_global_limits_key_by_key() -> None:
    policy = parse_settings(
        {
            "policy": {
                "ttl": "2h",
                "max_count": 7,
                "projects": {"Proj A": {"ttl": "30m"}, "b": {"max_count": 1, "max_size": "1GB"}},
            }
        }
    ).policy
    assert policy.limits_for("Proj A") == Limits(1800, 7, policy.max_size_bytes)
    assert policy.limits_for("b") == Limits(7200, 1, 10**9)
    assert policy.limits_for("other") == policy.global_limits == Limits(7200, 7, 10 * GiB)
    assert policy.to_json()["projects"]["Proj A"]["ttl_seconds"] == 1800


@pytest.mark.parametrize(
    ("projects", "expected"),
    [
        ({"p": {"ttl": "soon"}}, "policy.projects.\"p\".ttl: invalid duration 'soon'"),
        ({"p": {"interval": "5m"}}, 'policy.projects."p".interval: unknown key'),
        ({"p": 5}, 'policy.projects."p": expected a table'),
        ({"": {"ttl": "1h"}}, 'policy.projects."": the project name must not be empty'),
        ("p", "policy.projects: expected a table of projects"),
    ],
)
def test_project_table_errors_name_the_project_and_key(projects: Any, expected: str) -> None:
    assert only_problem({"policy": {"projects": projects}}).startswith(expected)


def test_project_tables_from_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "snapagentd.toml"
    path.write_text('[policy]\nttl = "1d"\n\n[policy.projects."ci"]\nttl = "1h"\n')
    assert load_settings(path).policy.limits_for("ci").ttl_seconds == 3600


def test_empty_sections_keep_the_defaults() -> None:
    document: dict[str, Any] = {name: {} for name in ("api", "docker", "policy", "journal")}
    document["sentry"] = {}
    assert parse_settings(document) == Settings()


def test_a_set_key_leaves_the_other_keys_of_its_section_at_their_defaults() -> None:
    settings = parse_settings({"policy": {"max_count": 9}})
    assert settings.policy == PolicySettings(max_count=9)
    assert settings.api == ApiSettings()


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_bytes(b"")
    assert load_settings(path) == Settings()


def test_full_file_is_parsed_into_every_section(tmp_path: Path) -> None:
    path = tmp_path / "snapagentd.toml"
    path.write_text(
        """
[api]
socket = "/tmp/agent.sock"
socket_mode = "0600"
socket_group = "docker"

[docker]
url = "tcp://127.0.0.1:2375"
image_prefixes = ["cascade-snapshot-", "other-snap/"]

[policy]
ttl = "7d"
max_count = 3
max_size = "500MB"
interval = "30s"
min_age = "5m"

[journal]
path = "/srv/journal.jsonl"

[sentry]
dsn = "https://key@sentry.example/1"
environment = "staging"
""",
        encoding="utf-8",
    )
    assert load_settings(path) == Settings(
        api=ApiSettings(Path("/tmp/agent.sock"), 0o600, "docker"),
        docker=DockerSettings("tcp://127.0.0.1:2375", ("cascade-snapshot-", "other-snap/")),
        policy=PolicySettings(7 * 86400, 3, 500_000_000, 30, 300),
        journal=JournalSettings(Path("/srv/journal.jsonl")),
        sentry=SentrySettings("https://key@sentry.example/1", "staging"),
    )


# --- accepted values ------------------------------------------------------------------------

ACCEPTED = [
    # durations
    ("policy", "ttl", "30s", 30),
    ("policy", "ttl", "5m", 300),
    ("policy", "ttl", "24h", 86400),
    ("policy", "ttl", "7d", 7 * 86400),
    ("policy", "ttl", 45, 45),
    ("policy", "ttl", "90", 90),  # a bare number in a string is seconds
    ("policy", "ttl", 0, 0),
    ("policy", "min_age", "0s", 0),
    ("policy", "interval", "1s", 1),
    ("policy", "interval", 3600, 3600),
    # sizes
    ("policy", "max_size", 123, 123),
    ("policy", "max_size", 0, 0),
    ("policy", "max_size", "500MB", 500_000_000),
    ("policy", "max_size", "10GiB", 10 * GiB),
    ("policy", "max_size", "1kib", 1024),
    ("policy", "max_size", "1KIB", 1024),
    ("policy", "max_size", "2mB", 2_000_000),
    ("policy", "max_size", "7B", 7),
    ("policy", "max_size", "1TiB", 1024**4),
    # The pattern allows blanks between the number and its unit: "10 GB" is 10 * 10**9.
    ("policy", "max_size", "10 GB", 10_000_000_000),
    # counts
    ("policy", "max_count", 0, 0),
    ("policy", "max_count", 12, 12),
    # modes
    ("api", "socket_mode", "0660", 0o660),
    ("api", "socket_mode", "600", 0o600),
    ("api", "socket_mode", "0777", 0o777),
    # strings, paths, URLs
    ("api", "socket_group", "docker", "docker"),
    ("api", "allowed_groups", [], ()),
    ("api", "allowed_groups", ["snapagent", "ci_runners"], ("snapagent", "ci_runners")),
    ("api", "socket", "/run/x.sock", Path("/run/x.sock")),
    ("docker", "url", "tcp://10.0.0.1:2375", "tcp://10.0.0.1:2375"),
    ("docker", "url", "unix:///var/run/docker.sock", "unix:///var/run/docker.sock"),
    ("docker", "image_prefixes", ["abc"], ("abc",)),
    ("docker", "image_prefixes", ["cascade-", "my.reg/snap_"], ("cascade-", "my.reg/snap_")),
    ("journal", "path", "/var/tmp/j.jsonl", Path("/var/tmp/j.jsonl")),
    ("sentry", "dsn", "", ""),
    ("sentry", "environment", "prod", "prod"),
    ("policy", "disk_high", "off", None),
    ("policy", "disk_interval", "10s", 10),
    ("policy", "size_accounting", "virtual", "virtual"),
    ("policy", "size_accounting", "unique", "unique"),
    ("docker", "data_root", "/srv/docker", "/srv/docker"),
    ("docker", "dangling_label", "cascade.managed=true", "cascade.managed=true"),
    ("docker", "dangling_label", "cascade.managed", "cascade.managed"),
    ("docker", "dangling_label", "", ""),
    ("docker", "shared_engine", True, True),
    ("docker", "shared_engine", False, False),
    ("metrics", "listen", "", ""),
    ("metrics", "listen", "127.0.0.1:9465", "127.0.0.1:9465"),
]

ATTRIBUTE = {
    ("policy", "disk_interval"): "disk_interval_seconds",
    ("policy", "ttl"): "ttl_seconds",
    ("policy", "min_age"): "min_age_seconds",
    ("policy", "interval"): "interval_seconds",
    ("policy", "max_size"): "max_size_bytes",
}


@pytest.mark.parametrize(
    ("section", "key", "raw", "expected"),
    ACCEPTED,
    ids=[f"{s}.{k}={v!r}" for s, k, v, _ in ACCEPTED],
)
def test_accepted_value(section: str, key: str, raw: Any, expected: Any) -> None:
    settings = parse_settings({section: {key: raw}})
    attribute = ATTRIBUTE.get((section, key), key)
    value = getattr(getattr(settings, section), attribute)
    assert value == expected
    assert type(value) is type(expected)


# --- rejected values ------------------------------------------------------------------------

# (section, key, raw value, the quoted text the message must contain)
REJECTED = [
    ("policy", "ttl", "5 minutes", "'5 minutes'"),
    ("policy", "ttl", "-1s", "'-1s'"),
    ("policy", "ttl", -1, "-1"),
    ("policy", "ttl", 1.5, "1.5"),
    ("policy", "ttl", True, "True"),
    ("policy", "ttl", "", "''"),
    ("policy", "ttl", "10x", "'10x'"),
    ("policy", "ttl", "1.5h", "'1.5h'"),
    ("policy", "min_age", "3w", "'3w'"),
    ("policy", "interval", "soon", "'soon'"),
    ("policy", "max_size", "ten", "'ten'"),
    ("policy", "max_size", -5, "-5"),
    ("policy", "max_size", "1.5GB", "'1.5GB'"),
    ("policy", "max_size", "10XB", "'10XB'"),
    ("policy", "max_size", "GB", "'GB'"),
    ("policy", "max_size", True, "True"),
    ("policy", "max_size", 2.0, "2.0"),
    ("policy", "max_count", -1, "-1"),
    ("policy", "max_count", "5", "'5'"),
    ("policy", "max_count", True, "True"),
    ("api", "socket_mode", "0999", "'0999'"),
    ("api", "socket_mode", 660, "660"),
    ("api", "socket_mode", "rw", "'rw'"),
    ("api", "socket_mode", "00660", "'00660'"),
    ("api", "socket_group", 5, "5"),
    ("api", "allowed_groups", "snapagent", "'snapagent'"),
    ("api", "allowed_groups", ["snapagent", "bad name"], "'bad name'"),
    ("api", "allowed_groups", ["-dash"], "'-dash'"),
    ("api", "allowed_groups", [0], "0"),
    ("api", "socket", "relative.sock", "'relative.sock'"),
    ("docker", "url", "/run/docker.sock", "'/run/docker.sock'"),
    ("docker", "url", "ftp://host", "'ftp://host'"),
    ("docker", "image_prefixes", [], "[]"),
    ("docker", "image_prefixes", ["ab"], "'ab'"),
    ("docker", "image_prefixes", "cascade-", "'cascade-'"),
    ("docker", "image_prefixes", ["Cascade-"], "'Cascade-'"),
    ("docker", "image_prefixes", ["cascade-", "-dash"], "'-dash'"),
    ("docker", "image_prefixes", ["cascade-", 7], "7"),
    ("journal", "path", "journal.jsonl", "'journal.jsonl'"),
    ("sentry", "dsn", 1, "1"),
    ("policy", "disk_high", "150%", "'150%'"),
    ("policy", "disk_high", "lots", "'lots'"),
    ("policy", "disk_low", "-5%", "'-5%'"),
    ("policy", "disk_interval", "0s", "'0s'"),
    ("policy", "size_accounting", "shared", "'shared'"),
    ("docker", "dangling_label", "a b", "'a b'"),
    ("docker", "shared_engine", "yes", "'yes'"),
    ("docker", "shared_engine", 1, "1"),
    ("metrics", "listen", "0.0.0.0:9465", "'0.0.0.0:9465'"),
    ("metrics", "listen", "127.0.0.1:http", "'127.0.0.1:http'"),
]


@pytest.mark.parametrize(
    ("section", "key", "raw", "quoted"),
    REJECTED,
    ids=[f"{s}.{k}={v!r}" for s, k, v, _ in REJECTED],
)
def test_rejected_value_names_the_key_and_quotes_the_value(
    section: str, key: str, raw: Any, quoted: str
) -> None:
    problem = only_problem({section: {key: raw}})
    assert problem.startswith(f"{section}.{key}: invalid ")
    assert quoted in problem


def test_message_for_a_bad_duration_is_exact() -> None:
    assert only_problem({"policy": {"ttl": "5 minutes"}}) == (
        "policy.ttl: invalid duration '5 minutes' "
        "(use 30s, 5m, 24h, 7d or integer seconds; at most 100 years)"
    )


@pytest.mark.parametrize("raw", [0, "0s", "0m", "0d"])
def test_zero_interval_is_rejected(raw: Any) -> None:
    problem = only_problem({"policy": {"interval": raw}})
    assert problem.startswith("policy.interval: invalid duration ")
    assert "at least 1s" in problem


def test_zero_interval_message_quotes_the_value_written() -> None:
    assert "'0m'" in only_problem({"policy": {"interval": "0m"}})


def test_zero_interval_is_reported_together_with_other_problems() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"policy": {"interval": 0, "ttl": "soon"}})
    keys = sorted(problem.split(":")[0] for problem in caught.value.problems)
    assert keys == ["policy.interval", "policy.ttl"]


# --- unknown names, several problems --------------------------------------------------------


def test_unknown_section_is_an_error_naming_it() -> None:
    problem = only_problem({"polcy": {"ttl": "1h"}})
    assert problem.startswith("polcy: unknown section")
    assert "policy" in problem  # lists the known sections


def test_unknown_key_is_an_error_naming_it() -> None:
    problem = only_problem({"policy": {"ttl_seconds": 60}})
    assert problem.startswith("policy.ttl_seconds: unknown key")
    assert "ttl" in problem.split("known:")[1]


def test_section_that_is_not_a_table_is_an_error() -> None:
    problem = only_problem({"policy": "24h"})
    assert problem.startswith("policy: expected a table")
    assert "'24h'" in problem


def test_all_problems_are_reported_at_once() -> None:
    document = {
        "api": {"socket_mode": "rw", "sockett": "/x"},
        "policy": {"ttl": "5 minutes", "max_size": "ten", "max_count": 3},
        "docker": {"image_prefixes": ["ab"]},
        "nonsense": {"a": 1},
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(document)
    problems = caught.value.problems
    assert [problem.split(":")[0] for problem in problems] == [
        "api.socket_mode",
        "api.sockett",
        "policy.ttl",
        "policy.max_size",
        "docker.image_prefixes",
        "nonsense",
    ]
    assert str(caught.value).splitlines() == problems


# --- files ----------------------------------------------------------------------------------


def test_load_settings_prefixes_every_problem_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[policy]\nttl = "5 minutes"\nmax_size = "ten"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.problems == [
        f"{path}: policy.ttl: invalid duration '5 minutes' (use 30s, 5m, 24h, 7d or integer "
        "seconds; at most 100 years)",
        f"{path}: policy.max_size: invalid size 'ten' (use integer bytes or 500MB, 10GiB)",
    ]


def test_load_settings_on_a_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"{path}: cannot read configuration")
    assert "No such file" in caught.value.problems[0]


def test_load_settings_on_a_directory_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path)
    assert caught.value.problems[0].startswith(f"{tmp_path}: cannot read configuration")


@pytest.mark.parametrize(
    "content",
    [b"[policy\nttl = 1\n", b"ttl = \n", b"[policy]\nttl = 1\nttl = 2\n"],
    ids=["unclosed-table", "missing-value", "duplicate-key"],
)
def test_load_settings_on_invalid_toml_names_the_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"{path}: not valid TOML")


def test_load_settings_on_invalid_utf8_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[sentry]\nenvironment = "prod-ü"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"{path}: not valid TOML")
    assert "utf-8" in caught.value.problems[0]


# --- managed references ---------------------------------------------------------------------

MANAGED = [
    ("cascade-snapshot-a:latest", True),
    ("cascade-snapshot-a", True),
    ("cascade-snapshot-proj-item:v2", True),
    ("registry:5000/cascade-snapshot-a:1", False),  # the repository starts with the host
    ("registry:5000/cascade-snapshot-a", False),
    ("cascade-snapshot-a@sha256:" + "0" * 64, False),
    ("cascade-snapshot-a:latest@sha256:" + "0" * 64, False),
    ("foreign:latest", False),
    ("xcascade-snapshot-a", False),
    ("cascade-snapshot", False),  # shorter than the prefix
]


@pytest.mark.parametrize(("reference", "managed"), MANAGED, ids=[r for r, _ in MANAGED])
def test_is_managed(reference: str, managed: bool) -> None:
    assert DockerSettings().is_managed(reference) is managed


def test_is_managed_with_several_prefixes() -> None:
    docker = parse_settings({"docker": {"image_prefixes": ["snap-a-", "snap-b-"]}}).docker
    assert docker.is_managed("snap-a-x:latest")
    assert docker.is_managed("snap-b-y")
    assert not docker.is_managed("cascade-snapshot-x:latest")


# --- the CLI --------------------------------------------------------------------------------


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapagentd", "--check-config", "--config", str(path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_check_config_accepts_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text('[policy]\nttl = "12h"\nmax_size = "10GiB"\n', encoding="utf-8")
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: configuration is valid"


def test_cli_check_config_rejects_a_bad_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[policy]\nttl = "5 minutes"\n', encoding="utf-8")
    result = check_config(path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "policy.ttl" in result.stderr
    assert "'5 minutes'" in result.stderr
    assert str(path) in result.stderr


def test_cli_check_config_rejects_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    result = check_config(path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"{path}: cannot read configuration" in result.stderr
