"""`snapagentd`: parse the command line, set up logging, run the daemon."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .config import DEFAULT_CONFIG_PATH, ConfigError, load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapagentd",
        description="Host agent that owns Docker snapshot images and evicts them by policy.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        help=f"configuration file (default: {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration and exit 0 (valid) or 1 (invalid)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument("--version", action="version", version=f"snapagentd {__version__}")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def setup_logging(level: str) -> None:
    """One line per event on stderr; journald adds its own timestamps."""
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    # The docker SDK's urllib3 logs every retry; not news for an operator.
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    if args.check_config:
        try:
            load_settings(args.config)
        except ConfigError as error:
            for problem in error.problems:
                print(problem, file=sys.stderr)
            return 1
        print(f"{args.config}: configuration is valid")
        return 0
    from .daemon import run  # imported late: --check-config stays fast and dependency-light

    return run(args.config)


if __name__ == "__main__":
    sys.exit(main())
