"""The ``keygate`` command: serve, check-config and key management."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from redis.exceptions import RedisClusterException, RedisError

from gateway import __version__
from gateway.config import ConfigError, Settings, load
from gateway.config.reader import redact_url
from gateway.demo import command as demo
from gateway.embedded import EmbeddedError
from gateway.store.connection import describe

from . import keys

DEFAULT_CONFIG = Path("config/gateway.yaml")


def _config_path(given: str | None) -> Path | None:
    if given:
        return Path(given)
    if env := os.environ.get("KEYGATE_CONFIG"):
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(given: str | None) -> Settings:
    """Settings from --config, $KEYGATE_CONFIG or ./config/gateway.yaml; defaults if none."""
    return load(_config_path(given))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keygate", description="API-key gateway.")
    parser.add_argument("--version", action="version", version=f"keygate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        help="config file (default: $KEYGATE_CONFIG, else ./config/gateway.yaml)",
    )
    serve = commands.add_parser("serve", parents=[common], help="run the gateway")
    serve.add_argument(
        "--workers",
        type=_positive,
        metavar="N",
        help="worker processes sharing the ports (default: the config's workers, 1)",
    )
    serve.set_defaults(run=_serve)
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("path", metavar="PATH")
    check.set_defaults(run=_check_config)
    keys.add_commands(commands, common)
    demo.add_command(commands)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (got {text!r})")
    return value


def _serve(args: argparse.Namespace) -> int:
    # aiohttp and the servers load only for `serve`, not for every CLI command.
    from gateway import logs, runtime, server, workers

    settings = load_settings(args.config)
    if args.workers is not None:
        settings = dataclasses.replace(settings, workers=args.workers)
    logs.setup(settings.log)
    if settings.workers > 1 and not workers.is_worker():
        config = workers.config_path(args.config)
        return runtime.with_redis(
            settings,
            lambda url: workers.Supervisor(settings, config, url).run(),
            attach=False,
        )
    reuse_port = workers.is_worker()  # the supervisor's workers share every port
    runtime.with_redis(
        settings, lambda url: server.serve(settings, url, reuse_port=reuse_port), attach=False
    )
    return 0


def _check_config(args: argparse.Namespace) -> int:
    settings = load(Path(args.path))
    print(
        f"{args.path}: ok ({len(settings.upstreams)} upstreams, {len(settings.routes)} routes, "
        f"redis {redact_url(settings.redis.url)})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
    except EmbeddedError as exc:
        print(f"keygate: {exc}", file=sys.stderr)
        return 1
    except keys.CommandError as exc:  # raised before a command reaches the store
        print(f"keygate: {exc}", file=sys.stderr)
        return exc.code
    except (RedisError, RedisClusterException) as exc:
        print(f"keygate: Redis failed: {describe(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a listener's address already in use
        print(f"keygate: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
