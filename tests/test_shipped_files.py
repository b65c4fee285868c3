"""The files the Debian package ships beside the code: the default configuration and the
manual pages. They must track the code, so each test derives what to expect from it."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from snapagentd import cli, config, ctl

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "etc" / "snapagentd" / "snapagentd.toml"
MAN = ROOT / "man"
PAGES = ["snapagentd.8", "snapagentctl.1", "snapagentd.toml.5"]


def roff(text: str) -> str:
    """`text` as the pages write it: every hyphen escaped (\\-)."""
    return text.replace("-", "\\-")


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings if s.startswith("--")}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the parser has no subcommands")


def test_shipped_config_is_the_defaults_with_the_package_group() -> None:
    """The conffile must not change behaviour behind the operator's back: it states the
    built-in defaults, except the group the package creates for socket clients."""
    default = config.Settings()
    api = replace(default.api, socket_group="snapagent", allowed_groups=("snapagent",))
    expected = replace(default, api=api)
    assert config.load_settings(CONFIG) == expected


def test_shipped_config_sets_every_key() -> None:
    """Every key is spelled out (and commented) in the file, so a key added to the schema
    without being added to the conffile fails here."""
    document = tomllib.loads(CONFIG.read_text(encoding="utf-8"))
    in_file = {(section, key) for section, table in document.items() for key in table}
    in_schema = {(section, key) for section, keys in config._SCHEMA.items() for key in keys}
    assert in_file == in_schema


def test_every_config_key_is_documented_in_its_section_of_the_manual() -> None:
    """snapagentd.toml(5) has a tagged paragraph (`.BR key ...`) for each key, under the
    `.SH SECTION [name]` of its own section."""
    page = (MAN / "snapagentd.toml.5").read_text(encoding="utf-8")
    for section, keys in config._SCHEMA.items():
        match = re.search(rf"^\.SH SECTION \[{section}\]\n(.*?)(?=^\.SH )", page, re.M | re.S)
        assert match, f"no section [{section}] in snapagentd.toml.5"
        for key in keys:
            assert re.search(rf"^\.BR? {key}\b", match[1], re.M), f"{section}.{key} undocumented"


def test_every_snapagentctl_command_and_option_is_in_its_manual() -> None:
    """snapagentctl(1) covers each subcommand (in bold at the start of a line, as its tagged
    paragraph has it) and every long option, global or per command."""
    page = (MAN / "snapagentctl.1").read_text(encoding="utf-8")
    parser = ctl.build_parser()
    commands = subcommands(parser)
    in_bold = set(re.findall(r"^(?:\.B |\\fB)([a-z]+)", page, re.M))
    assert sorted(set(commands) - in_bold) == []
    options = long_options(parser).union(*(long_options(sub) for sub in commands.values()))
    assert [option for option in sorted(options) if roff(option) not in page] == []


def test_every_snapagentd_option_is_in_its_manual() -> None:
    """snapagentd(8) documents each long option the daemon's command line accepts."""
    page = (MAN / "snapagentd.8").read_text(encoding="utf-8")
    options = long_options(cli.build_parser())
    assert "--config" in options
    assert [option for option in sorted(options) if roff(option) not in page] == []


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
@pytest.mark.parametrize("name", PAGES)
def test_manual_page_formats_without_warnings(name: str) -> None:
    """lintian flags pages that groff warns about; all warnings on (-ww) must stay silent."""
    result = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(MAN / name)], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_the_debian_test_packages_agree_with_the_build_depends_and_the_test_extra() -> None:
    """The Debian pass of scripts/test.sh installs every test-only Build-Depends (so the tests
    run there as they do in dh_auto_test), and both carry each pytest plugin of the test extra
    (pyproject.toml's options for one, such as `timeout`, need it on both stacks)."""
    control = (ROOT / "debian" / "control").read_text(encoding="utf-8")
    nocheck = set(re.findall(r"^ (python3-[a-z0-9-]+) <!nocheck>,$", control, re.M))
    script = (ROOT / "scripts" / "test.sh").read_text(encoding="utf-8")
    listed = re.search(r"^DEBIAN_PYTHON_PACKAGES=\((.*?)\)$", script, re.M | re.S)
    assert listed, "no DEBIAN_PYTHON_PACKAGES=( ... ) in scripts/test.sh"
    debian_pass = set(listed[1].split())
    assert sorted(nocheck - debian_pass) == []
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    requirements = extra["project"]["optional-dependencies"]["test"]
    plugins = {re.split(r"[<>=!~ ]", r, maxsplit=1)[0] for r in requirements}
    plugins = {p for p in plugins if p.startswith("pytest-")}
    assert "pytest-timeout" in plugins
    for plugin in sorted(plugins):
        assert f"python3-{plugin}" in nocheck, plugin
        assert f"python3-{plugin}" in debian_pass, plugin
