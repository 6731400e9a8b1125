"""The ``keygate`` command: serve, check-config and key management."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from redis.exceptions import RedisClusterException, RedisError

from gateway import __version__
from gateway.config import ConfigError
from gateway.config.model import Settings
from gateway.demo import command as demo
from gateway.embedded import EmbeddedError
from gateway.store.connection import describe

from . import keys, prices, workspaces
from .source import Loaded, load_config, not_found, store_target

CONFIG_HELP = (
    "config file (default: $KEYGATE_CONFIG, else ./gateway.yaml, else ./config/gateway.yaml, "
    "else none: every option at its default)"
)
log = logging.getLogger("keygate")


class UsageError(Exception):
    """The command line contradicts itself; exit 2 with the message."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keygate", description="API-key gateway.")
    parser.add_argument("--version", action="version", version=f"keygate {__version__}")
    # Accepted before the subcommand too (keygate -c x.yaml serve); a dest of its own, as
    # a subcommand's default would overwrite it.
    parser.add_argument("--config", "-c", dest="global_config", metavar="PATH", help=CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="PATH", help=CONFIG_HELP)
    serve = commands.add_parser("serve", parents=[common], help="run the gateway")
    serve.add_argument(
        "--workers",
        type=_positive,
        metavar="N",
        help="worker processes sharing the ports (default: the config's workers, 1)",
    )
    serve.set_defaults(run=_serve)
    check = commands.add_parser(
        "check-config", parents=[common], help="validate a config file and exit"
    )
    check.add_argument("path", metavar="PATH", nargs="?", help="the file (as --config)")
    check.set_defaults(run=_check_config)
    keys.add_commands(commands, common)
    workspaces.add_commands(commands, common)
    prices.add_command(commands, common)
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


def _for_serving(given: str | None) -> Loaded:
    """The config, also refused when a route would lose requests to a dialect (a check
    that needs the dialects, so only serve and check-config make it)."""
    from gateway.dialects.mount import shadowed_routes

    loaded = load_config(given)
    problems = shadowed_routes(loaded.settings)
    if problems:
        raise ConfigError(problems)
    return loaded


def _serve(args: argparse.Namespace) -> int:
    # aiohttp and the servers load only for `serve`, not for every CLI command.
    from gateway import logs, runtime, server, sockets, workers

    loaded = _for_serving(args.config)
    settings = loaded.settings
    if args.workers is not None:
        settings = dataclasses.replace(settings, workers=args.workers)
    logs.setup(settings.log)
    if not workers.is_worker():  # the supervisor has said it for its workers
        said = log.info if loaded.source.path is not None else log.warning
        said("%s", loaded.summary(upstreams=True))
    # Until the event loop handles it (a reload), a SIGHUP must not kill the gateway; the
    # workers inherit this until theirs do, and read the file as it is when they start.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # The listeners first, before Redis or any worker: a taken port is one line, exit 1.
    # A worker serves on the sockets its supervisor bound.
    listening = sockets.inherited(os.environ) or sockets.bind(settings)
    try:
        if settings.workers > 1 and not workers.is_worker():
            # Workers read the file this process found, wherever they look.
            path = loaded.source.path
            config = workers.config_path(None if path is None else str(path))
            return runtime.with_redis(
                settings,
                lambda url: workers.Supervisor(
                    settings, config, url, listening, check=_rereader(loaded, args.workers)
                ).run(),
                attach=False,
            )
        reread = _rereader(loaded, args.workers)
        runtime.with_redis(
            settings,
            lambda url: server.serve(settings, url, listening=listening, reread=reread),
            attach=False,
        )
    finally:
        sockets.close(listening)
    return 0


def _rereader(loaded: Loaded, workers: int | None) -> Callable[[], Settings]:
    """How a reload reads the config: the file found at start (its absolute path, so a
    reload never picks another file), with this command line's --workers."""
    path = None if loaded.source.path is None else str(loaded.source.path.resolve())

    def reread() -> Settings:
        settings = _for_serving(path).settings
        return settings if workers is None else dataclasses.replace(settings, workers=workers)

    return reread


def _check_config(args: argparse.Namespace) -> int:
    loaded = _for_serving(args.config)
    settings = loaded.settings
    if loaded.source.path is None:
        print(f"keygate: {not_found()}; running on defaults", file=sys.stderr)
    name = "defaults" if loaded.source.path is None else str(loaded.source.path)
    print(
        f"{name}: ok ({len(settings.upstreams)} upstreams, {len(settings.routes)} routes; "
        f"key store: {store_target(settings.redis)})"
    )
    return 0


def _one_config(args: argparse.Namespace) -> str | None:
    """The config file named on the command line: --config before or after the
    subcommand, or check-config's PATH; naming two different files is an error."""
    named = (args.global_config, getattr(args, "config", None), getattr(args, "path", None))
    given = list(dict.fromkeys(value for value in named if value is not None))
    if len(given) > 1:
        raise UsageError(f"--config given twice ({given[0]} and {given[1]}): give it once")
    if given and not hasattr(args, "config"):  # keygate demo makes its own settings
        raise UsageError(f"{args.command} takes no --config")
    return given[0] if given else None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.config = _one_config(args)
        return int(args.run(args))
    except UsageError as exc:
        print(f"keygate: {exc}", file=sys.stderr)
        return 2
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
