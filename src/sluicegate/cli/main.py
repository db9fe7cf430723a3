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
                Argument(("--store",), {"metavar": "URL", "help":
                                        "where routes, upstreams... live, followed live: "
                                        "etcd://host:port[,host:port][/prefix] (etcd v3; "
                                        "prefix default /sluicegate; gateway settings still "
                                        "from -c). Default: the -c file, watched for edits"}),
            ]),
    Command("validate", "check a config file; lists every error as path.to.field: reason",
            "sluicegate validate examples/quickstart.yaml", "cmd_validate", [
                Argument(("file",), {"metavar": "FILE", "help": "YAML config file"}),
            ]),
    Command("schema", "print the JSON Schema of the config file (for editors)",
            "sluicegate schema > sluicegate.schema.json", "cmd_schema"),
    Command("hash-secret", "read a secret from stdin (or a prompt) and print the form to "
            "store in a consumer: a pbkdf2-sha256 hash for basic-auth `password`, "
            "sha256:<hex> for key-auth `key`",
            "printf %s \"$PASSWORD\" | sluicegate hash-secret --kind password",
            "cmd_hash_secret", [
                Argument(("--kind",), {"choices": ["password", "key"], "default": "password",
                                       "help": "password (basic-auth, default) or key "
                                               "(key-auth)"}),
            ]),
    Command("admin", "read or change resources through a running gateway's Admin API "
            "(key: --key or SLUICEGATE_ADMIN_KEY; URL: --url or SLUICEGATE_ADMIN_URL, "
            "default http://127.0.0.1:9180)",
            "sluicegate admin put routes r1 -f route.yaml   # or: admin get routes r1",
            "cmd_admin", [
                Argument(("action",), {"choices": ["get", "put", "post", "patch", "delete"],
                                       "help": "get: one resource, or the list without ID; "
                                               "put: create or replace; post: create with a "
                                               "generated id; patch: merge-patch; delete"}),
                Argument(("resource",), {"metavar": "RESOURCE", "help": "routes, services, "
                                         "upstreams, consumers, consumer_groups, "
                                         "plugin_configs, global_rules, stream_routes, ssls"}),
                Argument(("id",), {"nargs": "?", "metavar": "ID",
                                   "help": "the resource's id (consumers: username)"}),
                Argument(("-f", "--file"), {"metavar": "FILE", "help":
                                            "the body, YAML or JSON (- for stdin)"}),
                Argument(("--url",), {"help": "Admin API base URL"}),
                Argument(("--key",), {"help": "Admin API key (prefer SLUICEGATE_ADMIN_KEY: "
                                              "arguments show in the process list)"}),
            ]),
    Command("config", "show the running gateway's config (from its Admin API; secrets "
            "redacted)", "sluicegate config dump > running.yaml", "cmd_config", [
                Argument(("action",), {"choices": ["dump"],
                                       "help": "dump: print it as YAML"}),
                Argument(("--url",), {"help": "Admin API base URL"}),
                Argument(("--key",), {"help": "Admin API key (prefer SLUICEGATE_ADMIN_KEY)"}),
            ]),
    Command("intercept", "show or remove the transparent interception installed in this "
            "network namespace: TPROXY (nftables table `inet sluicegate`, fwmark rules, local "
            "routes) or eBPF (links and pins under $SLUICEGATE_BPFFS, default "
            "/sys/fs/bpf/sluicegate, and the same routing)",
            "sluicegate intercept status    # or: sluicegate intercept down", "cmd_intercept", [
                Argument(("action",), {"choices": ["status", "down"],
                                       "help": "status: what is installed, with counters; "
                                               "down: remove it all, either mode (also after "
                                               "a crash)"}),
            ]),
    Command("bpf", "list sluicegate's pinned BPF programs, maps and links (ids and names, as "
            "bpftool shows them) in $SLUICEGATE_BPFFS (default /sys/fs/bpf/sluicegate)",
            "sluicegate bpf status    # then e.g.: bpftool map dump id ID", "cmd_bpf", [
                Argument(("action",), {"choices": ["status"],
                                       "help": "status: pinned objects, the links "
                                               "running the pinned programs, and the "
                                               "`kernel:` block's counters (XDP verdicts "
                                               "per interface, reason and deny rule; flow "
                                               "totals, ports, remotes, retransmits)"}),
            ]),
    Command("bench", "benchmarks in network namespaces (root). interception: explicit proxy vs "
            "TPROXY vs eBPF sk_lookup side by side (connection rate, keep-alive req/s, p50/p99, "
            "bulk Gbit/s per copy path and haproxy-tcp, rule scaling, flood drop rates); prints "
            "a table, writes PNG plots and the Markdown report",
            "sluicegate bench interception --parts core --duration 3 --runs 1    # as root",
            "cmd_bench", [
                Argument(("action",), {"choices": ["interception"],
                                       "help": "interception: TPROXY vs eBPF (issue 4)"}),
                Argument(("--parts",), {"default": "core,copy,scaling,flood",
                                        "metavar": "LIST",
                                        "help": "comma-separated parts to measure: core, "
                                                "copy, scaling, flood (default: all); a part "
                                                "not measured is reported as such"}),
                Argument(("--duration",), {"type": int, "default": 10, "metavar": "S",
                                           "help": "measured seconds per window (default 10)"}),
                Argument(("--runs",), {"type": int, "default": 3, "metavar": "N",
                                       "help": "runs per measurement; medians are reported "
                                               "(default 3)"}),
                Argument(("--out",), {"metavar": "DIR", "help": "results: <part>.json, raw "
                                      "files, PNGs (default /tmp/sluicegate-bench/"
                                      "interception-<UTC time>)"}),
                Argument(("--doc",), {"default": "docs/tproxy-vs-ebpf.md", "metavar": "PATH",
                                      "help": "the Markdown report; its plots go to img/ next "
                                              "to it (default docs/tproxy-vs-ebpf.md)"}),
                Argument(("--no-plots",), {"action": "store_true",
                                           "help": "no PNGs (matplotlib not needed)"}),
            ]),
    Command("worker", "internal: one worker process started by `run --workers N`",
            "", "cmd_worker", [
                Argument(("-c", "--config"), {"required": True}),
                Argument(("--index",), {"type": int, "default": 0}),
                Argument(("--control-fd",), {"type": int, "required": True}),
                Argument(("--store",), {"default": None}),
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


def _load_store(url: str, path: str) -> tuple[Any, int]:
    """The first config from a `--store`: (validated, OK) or (None, exit code)."""
    import asyncio

    from sluicegate.config.load import ConfigError, validate_config
    from sluicegate.store.base import StoreError
    from sluicegate.store.open import open_store

    try:
        store = open_store(url, path)
    except ValueError as exc:
        print(f"error: --store {exc}", file=sys.stderr)
        return None, ExitCode.USAGE

    async def first_state() -> Any:
        try:
            return await store.load()
        finally:
            await store.close()

    try:
        validated = validate_config(asyncio.run(first_state()).document())
    except StoreError as exc:
        print(f"error: cannot load the config from {url}: {exc}", file=sys.stderr)
        return None, ExitCode.RUNTIME_ERROR
    except ConfigError as exc:
        print(f"{url}: invalid config:", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return None, ExitCode.INVALID_CONFIG
    return validated, ExitCode.OK


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
    if args.store is not None:
        validated, code = _load_store(args.store, args.config)
        if validated is None:
            return code
    if not _check_available(validated):
        return ExitCode.NOT_AVAILABLE
    workers = args.workers if args.workers is not None else validated.config.gateway.workers
    if workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return ExitCode.USAGE
    import uvloop

    try:
        if workers == 1:
            from sluicegate.store.open import open_store
            from sluicegate.worker import Worker

            return uvloop.run(Worker(args.config, validated,
                                     store=open_store(args.store, args.config)).run())
        from sluicegate.supervisor import Supervisor

        return uvloop.run(Supervisor(args.config, validated, workers, args.log_level,
                                     store_url=args.store).run())
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

    from sluicegate.store.open import open_store
    from sluicegate.worker import Worker

    control = socket.socket(fileno=args.control_fd)
    try:
        return uvloop.run(Worker(args.config, validated, reuse_port=True, control=control,
                                 index=args.index, owns_interception=False,
                                 store=open_store(args.store, args.config)).run())
    except OSError as exc:
        print(f"error: worker {args.index} cannot start: {exc.strerror or exc}",
              file=sys.stderr)
        return ExitCode.RUNTIME_ERROR


def cmd_intercept(args: argparse.Namespace) -> int:
    from sluicegate.intercept.ebpf import SK_LOOKUP_PROGRAM, EbpfInterceptor
    from sluicegate.intercept.tproxy import InterceptError, TproxyInterceptor

    ebpf, tproxy = EbpfInterceptor(), TproxyInterceptor()
    try:
        if args.action == "down":
            # Both modes: they share the tagged policy routing, and a crash of either may
            # have left its objects.
            failures = []
            for interceptor in (ebpf, tproxy):
                try:
                    interceptor.remove()
                except InterceptError as exc:
                    failures.append(exc)
            if failures:
                raise failures[0]
            print("interception removed")
        else:
            # The folder may hold only the `kernel:` block's pins (any mode): eBPF
            # interception is what pinned its sk_lookup program.
            ebpf_mode = (ebpf.folder / SK_LOOKUP_PROGRAM).exists()
            shown = ebpf.status() if ebpf_mode else tproxy.status()
            print(json.dumps(shown, indent=2, default=str))
    except InterceptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.RUNTIME_ERROR
    return ExitCode.OK


def cmd_bpf(args: argparse.Namespace) -> int:
    from sluicegate.bpf.kernel import kernel_status
    from sluicegate.bpf.libbpf import BpfError
    from sluicegate.intercept.ebpf import bpf_status

    try:
        shown = bpf_status()
        counters = kernel_status()  # the `kernel:` block's XDP filter and flow counters
        if counters:
            shown["kernel"] = counters
        print(json.dumps(shown, indent=2))
    except BpfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.RUNTIME_ERROR
    return ExitCode.OK


def cmd_hash_secret(args: argparse.Namespace) -> int:
    import getpass

    from sluicegate.plugins.basic_auth import hash_password
    from sluicegate.plugins.key_auth import hash_key

    if sys.stdin.isatty():
        secret = getpass.getpass(f"{args.kind}: ")
        if getpass.getpass(f"{args.kind} again: ") != secret:
            print("error: the two entries differ", file=sys.stderr)
            return ExitCode.USAGE
    else:
        # One trailing newline is the `echo` that delivered it, not part of the secret.
        secret = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    if not secret:
        print(f"error: empty {args.kind}", file=sys.stderr)
        return ExitCode.USAGE
    print(hash_password(secret) if args.kind == "password" else hash_key(secret))
    return ExitCode.OK


def _admin_target(args: argparse.Namespace) -> tuple[str, str] | None:
    from sluicegate.admin.client import admin_key, admin_url

    key = admin_key(args.key)
    if key is None:
        print("error: no Admin API key: set SLUICEGATE_ADMIN_KEY or give --key",
              file=sys.stderr)
        return None
    return admin_url(args.url), key


def _admin_failed(reply: Any) -> int:
    for line in reply.problems():
        print(f"error: {line}" if not line.startswith(" ") else line, file=sys.stderr)
    # A refused change is an invalid config, as `validate` would say; anything else
    # (auth, not found, unreachable) is a runtime failure.
    return ExitCode.INVALID_CONFIG if reply.status == 400 else ExitCode.RUNTIME_ERROR


def cmd_admin(args: argparse.Namespace) -> int:
    from sluicegate.admin.client import AdminCallError, call, read_body

    needs_body = args.action in ("put", "post", "patch")
    if needs_body != (args.file is not None):
        print(f"error: admin {args.action} " + ("needs -f FILE" if needs_body else
                                                "takes no -f FILE"), file=sys.stderr)
        return ExitCode.USAGE
    if args.action in ("delete", "patch") and args.id is None:
        print(f"error: admin {args.action} needs an ID", file=sys.stderr)
        return ExitCode.USAGE
    if args.action == "post" and args.id is not None:
        print("error: admin post picks the id: leave ID out (or use put)", file=sys.stderr)
        return ExitCode.USAGE
    target = _admin_target(args)
    if target is None:
        return ExitCode.USAGE
    path = args.resource + (f"/{args.id}" if args.id is not None else "")
    try:
        body = read_body(args.file) if needs_body else None
        reply = call(*target, args.action.upper(), path, body)
    except AdminCallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.RUNTIME_ERROR
    if not reply.ok:
        return _admin_failed(reply)
    print(json.dumps(reply.body, indent=2))
    return ExitCode.OK


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from sluicegate.admin.client import AdminCallError, call

    target = _admin_target(args)
    if target is None:
        return ExitCode.USAGE
    try:
        reply = call(*target, "GET", "config")
    except AdminCallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.RUNTIME_ERROR
    if not reply.ok:
        return _admin_failed(reply)
    print(yaml.safe_dump(reply.body["value"], sort_keys=False, allow_unicode=True), end="")
    return ExitCode.OK


def _run_part(command: list[str]) -> int | None:
    """Run one benchmark part to its end: its exit code, None when interrupted. Ctrl-C reaches
    the part too (same process group) and SIGTERM is passed on; either way we wait while it
    removes its namespaces, rather than leave it orphaned."""
    import signal
    import subprocess

    child = subprocess.Popen(command)
    interrupted = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                rc = child.wait()
                break
            except KeyboardInterrupt:
                interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    return None if interrupted else rc


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib.util
    import os
    import time
    from pathlib import Path

    from sluicegate.benchrig import PARTS

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        print(f"error: --parts: unknown part {', '.join(unknown) or '(none given)'} "
              f"(choose from {', '.join(PARTS)})", file=sys.stderr)
        return ExitCode.USAGE
    if args.duration < 1 or args.runs < 1:
        print("error: --duration and --runs must be at least 1", file=sys.stderr)
        return ExitCode.USAGE
    if os.geteuid() != 0:
        print("error: sluicegate bench interception needs root (network namespaces, "
              "nftables, BPF): run it with sudo", file=sys.stderr)
        return ExitCode.NOT_AVAILABLE
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        print("error: the plots need matplotlib: pip install 'sluicegate[bench]' (or give "
              "--no-plots)", file=sys.stderr)
        return ExitCode.NOT_AVAILABLE
    out = Path(args.out or f"/tmp/sluicegate-bench/interception-"
               f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    # Each part in its own process: it owns its namespaces and cleans them up on its own exit.
    for part in parts:
        module = f"sluicegate.benchrig.{part}"
        if importlib.util.find_spec(module) is None:
            print(f"[bench] part {part}: not available in this install ({module})",
                  file=sys.stderr)
            failed.append(part)
            continue
        print(f"[bench] part {part} -> {out}/{part}.json", file=sys.stderr)
        rc = _run_part([sys.executable, "-m", module, "--out", str(out),
                        "--duration", str(args.duration), "--runs", str(args.runs)])
        if rc is None:
            print("[bench] interrupted", file=sys.stderr)
            return ExitCode.RUNTIME_ERROR
        if rc != 0:
            print(f"[bench] part {part} failed (exit {rc}); reported as not measured",
                  file=sys.stderr)
            failed.append(part)

    from sluicegate.benchrig.report import ReportError, write_report

    try:
        print(write_report(out, Path(args.doc), plots=not args.no_plots))
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.RUNTIME_ERROR
    print(f"[bench] results in {out}; report {args.doc}", file=sys.stderr)
    return ExitCode.RUNTIME_ERROR if failed else ExitCode.OK
