"""``tripwire worker``: run the detector as a Faust worker on Kafka."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from tripwire.config import load_settings

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``worker`` subcommand to the top-level parser."""
    parser = subparsers.add_parser(
        "worker",
        help="run the detector as a Faust worker on Kafka",
        description=(
            "Consume spans from Kafka, keep per-session and per-user state in "
            "Faust tables, and publish kill commands (Kafka and Redis) and alerts. "
            "Every flag overrides its TRIPWIRE_* variable; see docs/worker.md."
        ),
    )
    parser.add_argument("--config", help="TOML file with a [worker] table")
    parser.add_argument("--broker", help="Kafka brokers, host:port[,host:port]")
    parser.add_argument("--redis", help="Redis URL for the kill-flag mirror, '' = off")
    parser.add_argument("--web-host", help="address of the web server (/metrics)")
    parser.add_argument("--web-port", help="port of the web server (default 6066)")
    parser.add_argument("--store", help="table store: memory:// or rocksdb://")
    parser.add_argument("--app-id", help="Faust app id = consumer group id")
    parser.add_argument("--partitions", help="partitions of the spans topic")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the settings, build the detector and run the worker.

    Returns:
        The process exit code.

    Raises:
        ConfigError: a setting is invalid; the message names it.
    """
    settings = load_settings(
        config_file=args.config,
        overrides={
            "broker": args.broker,
            "redis_url": args.redis,
            "web_host": args.web_host,
            "web_port": args.web_port,
            "store": args.store,
            "app_id": args.app_id,
            "partitions": args.partitions,
        },
    )
    from tripwire.streams.app import run_worker
    from tripwire.streams.core import Detector
    from tripwire.streams.policy import Policy
    from tripwire.streams.pricing import PriceBook

    prices = PriceBook.load(settings.prices_file)
    policy = Policy.from_env(os.environ, settings.policy_file)
    for name, value in settings.describe().items():
        logger.info("%s: %s", name, value)
    return run_worker(settings, Detector(policy, prices), log_level=args.log_level)
