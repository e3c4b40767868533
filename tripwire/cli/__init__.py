"""The ``tripwire`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from tripwire import __version__
from tripwire.errors import TripwireError

logger = logging.getLogger(__name__)

# Each subcommand lives in its own module, which provides
# ``register(subparsers) -> None`` and sets ``func`` on its parser.
_COMMAND_MODULES: tuple[str, ...] = ("replay", "demo", "worker")


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="tripwire",
        description=(
            "Catch runaway LLM agents while they run. Tripwire reads LLM and tool "
            "spans (from Kafka or from files), keeps per-session cost, steps, tool "
            "errors and loop signals, and issues kill commands and alerts."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        module = importlib.import_module(f"tripwire.cli.{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2

    try:
        code: int = args.func(args)
    except TripwireError as exc:
        print(f"tripwire: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
