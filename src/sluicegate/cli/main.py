"""The `sluicegate` command. The command set is data (COMMANDS); `main(argv)` returns an
exit code from `ExitCode`."""

from __future__ import annotations

import argparse
import enum
import json
import logging
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sluicegate import __version__


class ExitCode(enum.IntEnum):
    OK = 0
    INVALID_CONFIG = 1
    USAGE = 2
    NOT_AVAILABLE = 3
    RUNTIME_ERROR = 4


@dataclass
class Argument:
    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Command:
    name: str
    help: str
    example: str
    handler: str  # name of a function in this module
    arguments: list[Argument] = field(default_factory=list)
    hidden: bool = False


COMMANDS = [
    Command("run", "start the gateway", "sluicegate run -c examples/quickstart.yaml --workers 2",
            "cmd_run", [
                Argument(("-c", "--config"), {"required": True, "metavar": "FILE",
                                              "help": "YAML config file"}),
                Argument(("--workers",), {"type": int, "metavar": "N", "help":
                                          "worker processes sharing the port with SO_REUSEPORT"
                                          " (default: gateway.workers, 1)"}),
            ]),
    Command("validate", "check a config file; lists every error as path.to.field: reason",
            "sluicegate validate examples/quickstart.yaml", "cmd_validate", [
                Argument(("file",), {"metavar": "FILE", "help": "YAML config file"}),
            ]),
    Command("schema", "print the JSON Schema of the config file (for editors)",
            "sluicegate schema > sluicegate.schema.json", "cmd_schema"),
    Command("intercept", "show or remove the transparent interception installed in this "
            "network namespace (nftables table `inet sluicegate`, fwmark rules, local routes)",
            "sluicegate intercept status    # or: sluicegate intercept down", "cmd_intercept", [
                Argument(("action",), {"choices": ["status", "down"],
                                       "help": "status: what is installed, with counters; "
                                               "down: remove it all (also after a crash)"}),
            ]),
    Command("worker", "internal: one worker process started by `run --workers N`",
            "", "cmd_worker", [
                Argument(("-c", "--config"), {"required": True}),
                Argument(("--index",), {"type": int, "default": 0}),
                Argument(("--control-fd",), {"type": int, "required": True}),
            ], hidden=True),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluicegate", description="Linux API gateway and transparent traffic manager.",
        epilog="example: sluicegate run -c examples/quickstart.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sluicegate {__version__}")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        options: dict[str, Any] = {"description": command.help,
                                   "formatter_class": argparse.RawDescriptionHelpFormatter}
        if command.example:
            options["epilog"] = f"example:\n  {command.example}"
        if not command.hidden:
            options["help"] = command.help
        command_parser = sub.add_parser(command.name, **options)
        for argument in command.arguments:
            command_parser.add_argument(*argument.flags, **argument.options)
        command_parser.set_defaults(handler=command.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else ExitCode.USAGE
    if not getattr(args, "handler", None):
        parser.print_help()
        return ExitCode.USAGE
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    handler: Callable[[argparse.Namespace], int] = globals()[args.handler]
    return handler(args)


def entry() -> None:
    sys.exit(main(sys.argv[1:]))


def _load(path: str) -> Any:
    from sluicegate.config.load import ConfigError, load_config_file

    try:
        validated = load_config_file(path)
    except ConfigError as exc:
        print(f"{path}: invalid config ({len(exc.errors)} error"
              f"{'s' if len(exc.errors) != 1 else ''}):", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return None
    for line in validated.warnings:
        print(f"warning: {line}", file=sys.stderr)
    return validated


def cmd_validate(args: argparse.Namespace) -> int:
    validated = _load(args.file)
    if validated is None:
        return ExitCode.INVALID_CONFIG
    config = validated.config
    print(f"{args.file}: ok ({len(config.routes)} routes, {len(config.services)} services, "
          f"{len(config.upstreams)} upstreams, {len(config.consumers)} consumers, "
          f"{len(config.plugins)} plugin entries)")
    return ExitCode.OK


def cmd_schema(args: argparse.Namespace) -> int:
    from sluicegate.config.schema import config_json_schema

    print(json.dumps(config_json_schema(), indent=2))
    return ExitCode.OK


def _check_available(validated: Any) -> bool:
    from sluicegate.intercept.entries import intercept_entries, unsupported
    from sluicegate.plugins.base import load_plugins

    registry = load_plugins()
    ok = True
    for index, entry in enumerate(validated.config.plugins):
        cls = registry[entry.name]
        if not cls.available:
            print(f"error: plugins[{index}] ({entry.name}) is not available: "
                  f"{cls.unavailable_reason}", file=sys.stderr)
            ok = False
    for line in unsupported(intercept_entries(validated.config)):
        print(f"error: {line}", file=sys.stderr)
        ok = False
    return ok


def cmd_run(args: argparse.Namespace) -> int:
    from sluicegate.worker import capture_stop_signals

    capture_stop_signals()
    validated = _load(args.config)
    if validated is None:
        return ExitCode.INVALID_CONFIG
    if not _check_available(validated):
        return ExitCode.NOT_AVAILABLE
    workers = args.workers if args.workers is not None else validated.config.gateway.workers
    if workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return ExitCode.USAGE
    import uvloop

    try:
        if workers == 1:
            from sluicegate.worker import Worker

            return uvloop.run(Worker(args.config, validated).run())
        from sluicegate.supervisor import Supervisor

        return uvloop.run(Supervisor(args.config, validated, workers, args.log_level).run())
    except OSError as exc:
        print(f"error: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.RUNTIME_ERROR


def cmd_worker(args: argparse.Namespace) -> int:
    from sluicegate.worker import capture_stop_signals

    capture_stop_signals()
    validated = _load(args.config)
    if validated is None:
        return ExitCode.INVALID_CONFIG
    import uvloop

    from sluicegate.worker import Worker

    control = socket.socket(fileno=args.control_fd)
    try:
        return uvloop.run(Worker(args.config, validated, reuse_port=True, control=control,
                                 index=args.index, owns_interception=False).run())
    except OSError as exc:
        print(f"error: worker {args.index} cannot start: {exc.strerror or exc}",
              file=sys.stderr)
        return ExitCode.RUNTIME_ERROR


def cmd_intercept(args: argparse.Namespace) -> int:
    from sluicegate.intercept.tproxy import InterceptError, TproxyInterceptor

    interceptor = TproxyInterceptor()
    try:
        if args.action == "down":
            interceptor.remove()
            print("interception removed")
        else:
            print(json.dumps(interceptor.status(), indent=2, default=str))
    except InterceptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.RUNTIME_ERROR
    return ExitCode.OK
