"""``discoproxy serve | check | routes``: the only place that exits the process.

Exit codes: 0 ok, 1 invalid configuration or server files, 2 usage error (argparse),
3 the proxy could not start (e.g. a port cannot be bound).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import signal
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import yaml
from anyio.abc import TaskGroup
from loguru import logger

from discoproxy.admin.client import AdminUnreachable, admin_token, admin_url, fetch, fetch_json
from discoproxy.config import ConfigError, ProxyConfig, load_config, read_document
from discoproxy.guard import (
    Ban,
    ban_target,
    edit_bans,
    load_bans,
    parse_duration,
)
from discoproxy.logwriter import writer
from discoproxy.model import ServerDefinition
from discoproxy.provider import (
    Enabled,
    Provider,
    ProviderStatus,
    ServerStore,
    load_providers,
    provider_settings,
    snapshot_once,
    supervise,
)
from discoproxy.proxy.listener import ListenError
from discoproxy.proxy.takeover import READY_TIMEOUT_S as TAKEOVER_READY_TIMEOUT_S
from discoproxy.proxy.takeover import TakeoverError
from discoproxy.routing import (
    Registry,
    RoutingTable,
    SnapshotInbox,
    build_table,
    missing_fallbacks,
)
from discoproxy.wake import ServerControl

if TYPE_CHECKING:
    from discoproxy.admin.server import Admin
    from discoproxy.importers import Imported

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_UNHEALTHY = 1  # `health`: what HEALTHCHECK counts as unhealthy
EXIT_UNREACHABLE = 2  # `routes`/`connections`: no admin API answered
EXIT_START = 3
# Listeners open once every enabled provider has published, or after this long: a
# connection arriving in the first instant should not see an empty table.
STARTUP_WAIT_S = 10.0
# `check` and `routes --offline` wait this long for each provider's servers.
SNAPSHOT_WAIT_S = 10.0

TEXT_FORMAT = "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}"


def configure_logging(level: str, fmt: str) -> None:
    """loguru formats in the caller's thread and hands the line to the log writer, whose
    own thread writes it: a stalled stderr never blocks the data plane or the loop."""
    logger.remove()
    out = writer()

    def sink(message: str) -> None:
        out.put(str(message))

    if fmt == "json":
        logger.add(sink, level=level, serialize=True, catch=True)
    else:
        logger.add(sink, level=level, format=TEXT_FORMAT, colorize=out.isatty(), catch=True)


def _config_path(args: argparse.Namespace) -> Path | None:
    path = args.config or os.environ.get("DISCOPROXY_CONFIG")
    return Path(path) if path else None


def _load(args: argparse.Namespace) -> ProxyConfig:
    config = load_config(_config_path(args), os.environ)
    overrides: dict[str, Any] = {}
    if getattr(args, "bind", None):
        overrides["bind"] = tuple(args.bind)
    if args.servers_dir is not None:
        overrides["servers_dir"] = args.servers_dir
    if args.log_level is not None:
        overrides["log_level"] = args.log_level.upper()
    if args.log_format is not None:
        overrides["log_format"] = args.log_format
    if overrides:
        config = ProxyConfig.model_validate({**config.model_dump(), **overrides})
    return config


def _reload(args: argparse.Namespace) -> ProxyConfig:
    """The config as a reload reads it: refused whole, as at the start, when a
    ``[providers.X]`` table does not validate (a reload applies none of them, but a file
    that would not start must not report as reloaded)."""
    config = _load(args)
    provider_settings(config, path=_config_path(args), environ=os.environ)
    return config


def _load_providers(
    args: argparse.Namespace, config: ProxyConfig
) -> list[tuple[Provider, Enabled]]:
    """The providers of *config*, loaded as :func:`_load` loaded it: a bad table is
    reported naming the file (and line) or the environment it came from."""
    return load_providers(config, path=_config_path(args), environ=os.environ)


async def _offline_snapshots(
    providers: list[tuple[Provider, Enabled]],
) -> tuple[dict[str, tuple[ServerDefinition, ...]], list[str]]:
    """Every enabled provider asked once for its servers, as ``serve`` would start it
    (``enabled``, then ``available()`` in auto mode); with the report lines for stderr."""
    snapshots: dict[str, tuple[ServerDefinition, ...]] = {}
    lines: list[str] = []
    for provider, enabled in providers:
        name = provider.name
        if enabled is Enabled.FALSE:
            lines.append(f"note: provider {name} disabled in the config")
            continue
        if enabled is Enabled.AUTO and not await provider.available():
            lines.append(f"note: provider {name} off: {provider.unavailable_reason()}")
            continue
        try:
            result = await snapshot_once(provider, SNAPSHOT_WAIT_S)
        except Exception as exc:  # a provider's failure is reported, not fatal
            lines.append(f"error: provider {name} failed: {type(exc).__name__}: {exc}")
            continue
        snapshots[name] = result.servers
        lines += [f"error: {error}" for error in result.errors]
        lines += [f"warning: {warning}" for warning in result.warnings]
        source = f" from {result.source}" if result.source else ""
        lines.append(f"note: provider {name}: {len(result.servers)} servers{source}")
    return snapshots, lines


def _load_table(providers: list[tuple[Provider, Enabled]]) -> tuple[RoutingTable, list[str]]:
    """The table every enabled provider would give now, and its report (printed to
    stderr): an ``error:`` line for each provider or item that failed."""
    configure_logging("ERROR", "text")  # providers without load_once() run and may log
    snapshots, lines = anyio.run(_offline_snapshots, providers)
    for line in lines:
        print(line, file=sys.stderr)
    return build_table(snapshots), lines


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = _load(args)
        providers = _load_providers(args, config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("config NOT ok: the config itself does not load", file=sys.stderr)
        return EXIT_CONFIG
    table, reports = _load_table(providers)
    failed = any(line.startswith("error:") for line in reports)
    for conflict in table.conflicts:
        print(f"warning: route conflict: {conflict}", file=sys.stderr)
    for line in missing_fallbacks(config.fallbacks, table).values():
        print(f"warning: {line}", file=sys.stderr)
    counts = f"{len(config.bind)} listeners, {len(table)} servers"
    if failed:  # the last line is the verdict, and says what the exit code says
        errors = sum(1 for line in reports if line.startswith("error:"))
        print(
            f"config NOT ok: {errors} error{'s' if errors != 1 else ''} above; "
            f"{counts} would be routed without them",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    print(f"config ok: {counts}", file=sys.stderr)
    return EXIT_OK


def table_rows(table: RoutingTable) -> list[dict[str, Any]]:
    """The table as ``/api/routes`` shapes it (without the live numbers)."""
    from discoproxy.admin.server import route_row

    return [route_row(table, route, live=False) for route in table.routes]


def _print_table(headers: Sequence[str], lines: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(headers)]
    for line in [headers, *lines]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def _backends_cell(row: dict[str, Any]) -> str:
    """Each backend, with its weight when not 1, its open connections when any, and
    its state when not plainly up, with why (the last check's or dial's failure)."""
    parts = []
    for backend in row.get("pool") or [{"address": a} for a in row["backends"]]:
        text = str(backend["address"])
        if backend.get("weight", 1) != 1:
            text += f" x{backend['weight']}"
        if backend.get("active"):
            text += f" {backend['active']} open"
        state = backend.get("state", "up")
        if state not in ("up", "unknown"):
            check = backend.get("last_check") or ""
            why = (check if check != "ok" else "") or backend.get("last_error") or ""
            text += f" ({state}: {why})" if why else f" ({state})"
        parts.append(text)
    return ", ".join(parts)


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count}{unit}" if unit == "B" else f"{count:.1f}{unit}"
        count /= 1024  # type: ignore[assignment]
    raise AssertionError


def _api(args: argparse.Namespace, path: str) -> Any:
    """GET ``path`` from the running instance's admin API (config, --admin, --token)."""
    config = _load(args)
    return fetch_json(admin_url(config, args.admin), path, admin_token(config, args.token))


def cmd_routes(args: argparse.Namespace) -> int:
    try:
        if args.offline:
            config = _load(args)
            table, _ = _load_table(_load_providers(args, config))
            data: Any = {
                "routes": table_rows(table),
                "conflicts": [str(c) for c in table.conflicts],
            }
        else:
            data = _api(args, "/api/routes")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AdminUnreachable as exc:
        print(
            f"error: {exc}; 'routes --offline' shows what the config would route", file=sys.stderr
        )
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    live = not args.offline
    headers = ["SERVER", "DOMAINS", "BACKENDS", "PORTS", "PROXY-PROTOCOL", "STATE"]
    if live:
        headers += ["ACTIVE", "TOTAL", "UP", "DOWN"]
    lines = []
    for row in data["routes"]:
        line = [
            row["id"],
            ", ".join(row["domains"] + (["(default)"] if row["default"] else [])) or "-",
            _backends_cell(row)
            or ("(sleeping: a login starts it)" if row["state"] == "sleeping" else "-"),
            ", ".join(row["ports"]) or "-",
            "v2" if row["send_proxy_protocol"] else "-",
            row["state"],
        ]
        if live:
            line += [
                str(row["active"]),
                str(row["connections_total"]),
                _size(row["bytes_up"]),
                _size(row["bytes_down"]),
            ]
        lines.append(line)
    _print_table(headers, lines)
    for conflict in data["conflicts"]:
        print(f"conflict: {conflict}")
    return EXIT_OK


def cmd_connections(args: argparse.Namespace) -> int:
    try:
        data = _api(args, f"/api/connections?limit={args.limit}")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AdminUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    headers = [
        "ID",
        "WORKER",
        "PROTO",
        "CLIENT",
        "PLAYER",
        "LISTENER",
        "ROUTE",
        "BACKEND",
        "STATE",
        "AGE",
        "UP",
        "DOWN",
    ]
    lines = [
        [
            str(c["id"]) if c["id"] else "-",
            str(c["worker"]) if c.get("worker") is not None else "-",
            c["protocol"],
            c["client"],
            c.get("player") or "-",
            c["listener"],
            c["route"] or "-",
            c["backend"] or "-",
            c["state"],
            f"{c['age_s']:.1f}s",
            _size(c["bytes_up"]),
            _size(c["bytes_down"]),
        ]
        for c in data["connections"]
    ]
    _print_table(headers, lines)
    more = " (list truncated; --limit shows more)" if data["truncated"] else ""
    print(f"{data['total']} open{more}")
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the running instance's /healthz (or /readyz with --ready) says so."""
    path = "/readyz" if args.ready else "/healthz"
    try:
        config = _load(args)
        url = admin_url(config, args.admin)
        status, body = fetch(url, path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AdminUnreachable as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return EXIT_UNHEALTHY
    text = body.decode(errors="replace").strip()
    if status != 200:
        print(f"unhealthy: {url}{path}: HTTP {status} {text}", file=sys.stderr)
        return EXIT_UNHEALTHY
    print(f"{url}{path}: {text}")
    return EXIT_OK


async def _start_providers(
    tg: TaskGroup, providers: list[tuple[Provider, Enabled]], inbox: SnapshotInbox
) -> dict[str, ProviderStatus]:
    statuses: dict[str, ProviderStatus] = {}
    for provider, enabled in providers:
        name = provider.name
        if enabled is Enabled.FALSE:
            logger.info("provider {} disabled in the config", name)
            statuses[name] = ProviderStatus(name, "disabled")
            continue
        if enabled is Enabled.AUTO and not await provider.available():
            reason = provider.unavailable_reason()
            logger.info("provider {} off: {}", name, reason)
            statuses[name] = ProviderStatus(name, "off", reason)
            continue
        logger.info("provider {} on", name)
        status = statuses[name] = ProviderStatus(name)
        publish = inbox.publisher(name)
        tg.start_soon(supervise, name, provider, publish, status, name=f"provider {name}")
    return statuses


async def _serve(
    config: ProxyConfig,
    providers: list[tuple[Provider, Enabled]],
    load: Callable[[], ProxyConfig],
    take: bool = False,
) -> None:
    """Run the providers, the proxy and the admin listener until SIGTERM/SIGINT; SIGHUP
    (or ``POST /api/reload``) reloads the global config with ``load``. With ``take``,
    start on the listening sockets of the process on ``takeover_socket``, which drains
    and exits once this one is ready (``proxy/takeover.py``)."""
    from discoproxy.admin.server import Admin, serve_admin
    from discoproxy.proxy.server import ProxyContext, reconfigure, run_proxy
    from discoproxy.proxy.takeover import TakeoverServer, take_over
    from discoproxy.proxy.workers import worker_count

    workers = worker_count(config)
    path = config.takeover_socket
    inherited = await take_over(path, workers) if take and path is not None else None
    registry = Registry()
    inbox = SnapshotInbox()
    failed_takeover: list[TakeoverError] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(inbox.run, registry)
        statuses = await _start_providers(tg, providers, inbox)
        with anyio.move_on_after(STARTUP_WAIT_S) as waited:
            await inbox.wait_first_snapshots()
        if waited.cancelled_caught and inherited is not None:
            # a takeover ends the old process: not before every route is back
            with anyio.move_on_after(TAKEOVER_READY_TIMEOUT_S - STARTUP_WAIT_S) as longer:
                await inbox.wait_first_snapshots()
            if longer.cancelled_caught:
                inherited.abandon()
                raise TakeoverError(
                    "takeover abandoned: not every provider published its routes within "
                    f"{TAKEOVER_READY_TIMEOUT_S:.0f}s; the old process serves on"
                )
            waited = longer
        if waited.cancelled_caught:
            logger.warning("starting before every provider has published its first routes")
        stop_signals = (signal.SIGTERM, signal.SIGINT)
        with anyio.open_signal_receiver(*stop_signals, signal.SIGHUP) as received:
            # read from the start: a stop asked for during a takeover's start cancels it
            stopping = anyio.Event()
            signals_in, signals = anyio.create_memory_object_stream[int](16)

            async def read_signals() -> None:
                async for signum in received:
                    if signum != signal.SIGHUP:
                        stopping.set()
                    await signals_in.send(signum)

            tg.start_soon(read_signals)
            controls = {
                provider.name: provider
                for provider, _ in providers
                if provider.name in inbox.publishing and isinstance(provider, ServerControl)
            }
            ctx = ProxyContext(config, registry, controls)
            ctx.inherited = inherited
            await tg.start(partial(run_proxy, config, registry, context=ctx, workers=workers))
            reloading = anyio.Lock()
            token = config.admin.bearer_token()  # the admin listener's, for its lifetime

            async def reload() -> str:
                async with reloading:  # SIGHUP and the API, one at a time
                    try:
                        new = load()
                        new_token = new.admin.bearer_token()
                    except ConfigError as exc:
                        logger.error("config reload failed, keeping the current one: {}", exc)
                        return f"failed: {exc}"
                    if new.log_level != ctx.config.log_level:
                        configure_logging(new.log_level, config.log_format)
                    problems = await reconfigure(ctx, new)
                    rotated = new.admin == config.admin and new_token != token
                    if rotated and config.admin.listen:  # the listener's token: its file
                        problems.append(
                            "admin.token_file changed: the new token takes effect at the next "
                            "restart"
                        )
                        logger.warning("config reload: {}", problems[-1])
                    return "reloaded" + "".join(f"; not applied: {p}" for p in problems)

            if config.admin.listen:
                admin = Admin(
                    ctx,
                    registry,
                    token=token,
                    read_only=config.admin.read_only,
                    providers=statuses,
                    inbox=inbox,
                    reload=reload,
                    store=next(
                        (
                            provider
                            for provider, _ in providers
                            if isinstance(provider, ServerStore)
                            and provider.name in inbox.publishing
                        ),
                        None,
                    ),
                )
                await tg.start(serve_admin, admin, config.admin.listen)
                admin.ready = not waited.cancelled_caught
                if not admin.ready:
                    tg.start_soon(_ready_when_published, admin, inbox)
            if inherited is not None and stopping.is_set():
                logger.warning("stopped while taking over: the old process serves on")
                inherited.abandon()
            elif inherited is not None:  # listening, workers ready: the old process drains
                try:
                    await inherited.finish(path)  # type: ignore[arg-type]  # set with inherited
                except TakeoverError as exc:
                    # it serves on, with every socket: this one stops (exit 3)
                    failed_takeover.append(exc)
                    tg.cancel_scope.cancel()
            ctx.inherited = None
            if path is not None and not failed_takeover:
                takeover = TakeoverServer(ctx, path, tg.cancel_scope.cancel)
                if takeover.open():
                    tg.start_soon(takeover.run)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    logger.info("SIGHUP received: reloading the config")
                    await reload()
                    continue
                logger.info(
                    "{} received: no new connections; open ones get up to {}s",
                    signal.Signals(signum).name,
                    ctx.config.shutdown_timeout,
                )
                tg.cancel_scope.cancel()
                break
    if failed_takeover:
        raise failed_takeover[0]


async def _ready_when_published(admin: Admin, inbox: SnapshotInbox) -> None:
    await inbox.wait_first_snapshots()
    admin.ready = True


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        providers = _load_providers(args, config)
        config.admin.bearer_token()  # an unreadable token_file stops the start, not a request
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.take_over and config.takeover_socket is None:
        print("error: --take-over needs takeover_socket in the config", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.log_level, config.log_format)
    raise_nofile_limit()
    try:
        anyio.run(
            _serve,
            config,
            providers,
            partial(_reload, args),
            args.take_over,
            backend="asyncio",
            backend_options={"use_uvloop": UVLOOP},
        )
    except (TakeoverError, ListenError, BaseExceptionGroup) as exc:
        takeover = _takeover_error(exc)
        if takeover is not None:
            logger.error("{}", takeover)
            return EXIT_START
        failures = listen_errors(exc)
        if not failures:
            raise  # a bug, not a start failure: its traceback is what to report
        for failure in failures:
            logger.error("{}", failure)
        return EXIT_START
    except KeyboardInterrupt:
        pass
    logger.info("stopped")
    return EXIT_OK


def _takeover_error(exc: BaseException) -> TakeoverError | None:
    """A takeover that could not be done, however deep in the task groups' wrapping."""
    if isinstance(exc, TakeoverError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _takeover_error(inner)
            if found is not None:
                return found
    return None


def listen_errors(exc: BaseException) -> list[ListenError]:
    """The listeners that could not be opened, when that is all that went wrong: the task
    groups of ``_serve`` and ``run_proxy`` wrap them in (nested) ExceptionGroups."""
    if isinstance(exc, ListenError):
        return [exc]
    if not isinstance(exc, BaseExceptionGroup):
        return []
    failures = [listen_errors(inner) for inner in exc.exceptions]
    return [f for found in failures for f in found] if all(failures) else []


# uvloop when installed (a runtime dependency except on Windows): TLS termination and
# backend status pings run on the asyncio loop; the data plane's reactor does not.
UVLOOP = importlib.util.find_spec("uvloop") is not None


def raise_nofile_limit() -> None:
    """Two fds per connection: take the hard RLIMIT_NOFILE, not the (often 1024) soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-file limit from {} to {}: {}", soft, hard, exc)
            return
    logger.debug("open-file limit: {}", max(soft, hard))


def cmd_labels(args: argparse.Namespace) -> int:
    from providers.docker import labels_markdown

    sys.stdout.write(labels_markdown(args.prefix))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="discoproxy",
        description=(
            "Service-discovery L4 proxy: routes TCP connections by Minecraft handshake "
            "domain, TLS SNI or HTTP Host to servers defined in files (and Docker labels)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="global config file (.toml or .yaml); $DISCOPROXY_CONFIG if unset; "
        "without either, the embedded default (bind 0.0.0.0:25565, servers_dir ./servers)",
    )
    common.add_argument(
        "--servers-dir", type=Path, metavar="DIR", help="override servers_dir from the config"
    )
    common.add_argument(
        "--log-level",
        choices=["trace", "debug", "info", "warning", "error"],
        help="override log_level",
    )
    common.add_argument("--log-format", choices=["text", "json"], help="override log_format")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run the proxy",
        description="Run the proxy until SIGTERM/SIGINT, then drain open connections.",
    )
    serve.add_argument(
        "--bind",
        action="append",
        metavar="HOST:PORT",
        help="listen address, repeatable; overrides bind from the config",
    )
    serve.add_argument(
        "--take-over",
        action="store_true",
        help="take the listening sockets of the discoproxy running on takeover_socket "
        "(same config): it drains and exits once this one is ready, no connection refused",
    )
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser(
        "check",
        parents=[common],
        help="validate the config and server files",
        description="Validate the config and every server file; exit 1 on any error.",
    )
    check.set_defaults(func=cmd_check)

    admin = argparse.ArgumentParser(add_help=False)
    admin.add_argument(
        "--admin",
        metavar="URL",
        help="admin API of the running instance; $DISCOPROXY_ADMIN_URL, else from the "
        "config's admin.listen (default http://127.0.0.1:8404)",
    )
    admin.add_argument(
        "--token", help="bearer token; $DISCOPROXY_ADMIN_TOKEN, else the config's admin.token"
    )

    routes = sub.add_parser(
        "routes",
        parents=[common, admin],
        help="print the live routing table of a running instance",
        description="Print the routing table of the running instance (its admin API), with "
        "each route's state, open and total connections and bytes; --offline prints "
        "what the config and providers would route, without asking a running instance.",
    )
    routes.add_argument("--json", action="store_true", help="print JSON instead of a table")
    routes.add_argument(
        "--offline", action="store_true", help="build the table from the config and providers"
    )
    routes.set_defaults(func=cmd_routes)

    connections = sub.add_parser(
        "connections",
        parents=[common, admin],
        help="print the open connections of a running instance",
        description="Print the open TCP connections and UDP sessions of the running instance "
        "(its admin API), oldest first.",
    )
    connections.add_argument("--json", action="store_true", help="print JSON instead of a table")
    connections.add_argument("--limit", type=int, default=500, help="list at most this many")
    connections.set_defaults(func=cmd_connections)

    health = sub.add_parser(
        "health",
        parents=[common],
        help="exit 0 if the running instance is healthy (for HEALTHCHECK)",
        description="Ask the running instance's admin listener: exit 0 when /healthz (with "
        "--ready: /readyz) answers 200, else 1 with the reason.",
    )
    health.add_argument("--admin", metavar="URL", help="as for 'routes'")
    health.add_argument("--ready", action="store_true", help="ask /readyz instead")
    health.set_defaults(func=cmd_health)

    labels = sub.add_parser(
        "labels",
        help="print the Docker label reference",
        description="Print every Docker label discoproxy reads, as Markdown generated from "
        "the model (this is labels.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    labels.add_argument("--prefix", default="infrarust", help="label prefix to document")
    labels.set_defaults(func=cmd_labels)

    ban = sub.add_parser(
        "ban",
        help="manage bans (by IP/CIDR or username)",
        description="Add, remove or list bans in the config's bans_file. A running proxy "
        "applies the change within a moment (it watches the file).",
    )
    ban_sub = ban.add_subparsers(dest="ban_command", required=True, metavar="ACTION")
    ban_add = ban_sub.add_parser(
        "add",
        parents=[common, admin],
        help="ban an address, a network or a username",
        description="Ban through the running instance's admin API when it takes writes "
        "(token, admin.read_only = false): it writes bans_file and ends the open "
        "connections the ban matches at once, and says how many. Otherwise the file is "
        "written here and the instance applies it within a second.",
    )
    ban_add.add_argument("target", help="IP, CIDR (203.0.113.0/24) or Minecraft username")
    ban_add.add_argument("--reason", default="", help="shown to the banned player")
    ban_add.add_argument("--duration", metavar="D", help="e.g. 30m, 12h, 7d; default: forever")
    ban_add.set_defaults(func=cmd_ban_add)
    ban_remove = ban_sub.add_parser("remove", parents=[common], help="lift the bans on a target")
    ban_remove.add_argument("target", help="as given to 'ban add'")
    ban_remove.set_defaults(func=cmd_ban_remove)
    ban_list = ban_sub.add_parser("list", parents=[common], help="print the bans in force")
    ban_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ban_list.set_defaults(func=cmd_ban_list)

    server_cmd = sub.add_parser(
        "server",
        help="store or delete servers through the admin API (the api provider)",
        description="Store, delete or list the api provider's servers through the running "
        "instance's admin API (admin.token and admin.read_only = false). A stored server is "
        "validated exactly as a server file, persisted in [providers.api] state_file, and "
        "routed at once as ID@api.",
    )
    server_sub = server_cmd.add_subparsers(dest="server_command", required=True, metavar="ACTION")
    server_put = server_sub.add_parser(
        "put", parents=[common, admin], help="store a server file's server (TOML, YAML, JSON)"
    )
    server_put.add_argument("file", help="a server file; its stem is the id unless --id")
    server_put.add_argument("--id", help="the server id (default: the file's id or stem)")
    server_put.set_defaults(func=cmd_server_put)
    server_delete = server_sub.add_parser("delete", parents=[common, admin], help="delete one")
    server_delete.add_argument("id", help="the server id")
    server_delete.set_defaults(func=cmd_server_delete)
    server_list = server_sub.add_parser("list", parents=[common, admin], help="print them as JSON")
    server_list.set_defaults(func=cmd_server_list)

    kick = sub.add_parser(
        "kick",
        parents=[common, admin],
        help="end a player's connections, or one connection",
        description="End the open connections of a player (by username, any case) or the "
        "connection with this id (as `connections` lists it), through the admin API of the "
        "running instance (it needs admin.token and admin.read_only = false). Exit 1 when "
        "nothing matched, 2 when the API did not answer or refused.",
    )
    kick.add_argument("target", help="a Minecraft username or a connection id")
    kick.set_defaults(func=cmd_kick)

    importer = sub.add_parser(
        "import",
        help="write discoproxy's config from a peer's (Gate Lite, Infrarust, mc-router)",
        description="Read a peer's config and write the equivalent discoproxy config "
        "(OUT/discoproxy.yaml) and server files (OUT/servers/*.yaml), printing every key "
        "that could not be carried over and why. Existing files are not overwritten "
        "without --force.",
    )
    importer.add_argument(
        "kind",
        choices=["gate", "infrarust", "mc-router"],
        help="gate: config.yml; infrarust: infrarust.toml (or 1.x's config.yaml); "
        "mc-router: the Compose file "
        "that runs it (its environment and command) or an env file of its settings",
    )
    importer.add_argument("source", type=Path, help="its config file")
    importer.add_argument(
        "--service", help="mc-router: the Compose service (default: the one running its image)"
    )
    importer.add_argument("--out", type=Path, required=True, help="directory to write into")
    importer.add_argument("--force", action="store_true", help="overwrite existing files")
    importer.set_defaults(func=cmd_import)
    return parser


def cmd_import(args: argparse.Namespace) -> int:
    from discoproxy.importers import import_gate_lite, import_infrarust, import_infrarust_v1

    out: Path = args.out
    servers_dir = out / "servers"
    try:
        text = args.source.read_text(encoding="utf-8")
        if args.kind == "infrarust" and args.source.suffix in (".yml", ".yaml"):
            document = yaml.safe_load(text)  # Infrarust 1.x's config.yaml
            imported = import_infrarust_v1(document if isinstance(document, dict) else {})
            if imported.servers:  # its top-level route: loaded from where it is written
                imported.config.setdefault("servers_dir", str(servers_dir))
        elif args.kind == "infrarust":
            imported = import_infrarust(tomllib.loads(text))
        elif args.kind == "mc-router":
            imported = _import_mc_router(args.source, text, args.service)
            imported.config.setdefault("servers_dir", str(servers_dir))
        else:
            document = yaml.safe_load(text)
            imported = import_gate_lite(
                document if isinstance(document, dict) else {}, str(servers_dir)
            )
    except (OSError, yaml.YAMLError, tomllib.TOMLDecodeError, ValueError) as exc:
        print(f"error: {args.source}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    targets = {out / "discoproxy.yaml": imported.config}
    targets |= {servers_dir / f"{stem}.yaml": doc for stem, doc in imported.servers.items()}
    existing = sorted(str(p) for p in targets if p.exists())
    if existing and not args.force:
        print(f"error: {existing[0]} exists; pass --force to overwrite", file=sys.stderr)
        return EXIT_CONFIG
    servers_dir.mkdir(parents=True, exist_ok=True)
    for path, doc in targets.items():
        path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
        print(f"wrote {path}")
    for note in imported.not_carried:
        print(f"not carried: {note}", file=sys.stderr)
    print(
        f"imported {len(imported.servers)} routes; {len(imported.not_carried)} keys not "
        f"carried over; run: discoproxy serve --config {out / 'discoproxy.yaml'}",
        file=sys.stderr,
    )
    return EXIT_OK


def _import_mc_router(source: Path, text: str, service: str | None) -> Imported:
    from discoproxy.import_mc_router import (
        import_mc_router,
        settings_from_compose,
        settings_from_env_file,
    )

    if source.suffix in (".yml", ".yaml"):
        settings = settings_from_compose(yaml.safe_load(text), service)
    else:
        settings = settings_from_env_file(text)
    return import_mc_router(settings)


def _bans_path(args: argparse.Namespace) -> Path:
    return _load(args).bans_file


def cmd_ban_add(args: argparse.Namespace) -> int:
    """Ban through the running instance when its admin API takes writes (it writes the
    file and ends the open connections the ban matches, and says how many); else write
    the file here, which the instance follows within a second."""
    try:
        config = _load(args)
        path = config.bans_file
        network, username = ban_target(args.target)
        duration = parse_duration(args.duration) if args.duration else None
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    request = {"target": args.target, "reason": args.reason, "duration": duration}
    try:
        url = admin_url(config, args.admin)
        answer = fetch_json(url, "/api/bans", admin_token(config, args.token), "POST", request)
    except AdminUnreachable as exc:
        asked = (
            f"the running instance was not asked ({exc}); it ends what matches when it "
            "reads the file"
        )
    else:
        expires = answer["expires"]
        until = f" until {_when(expires)}" if expires is not None else ""
        print(
            f"banned {answer['target']}{until} ({path}); ended {answer['ended']} open connections"
        )
        return EXIT_OK
    expires = time.time() + duration if duration is not None else None
    ban = Ban(args.reason, time.time(), expires, network=network, username=username)
    try:
        edit_bans(path, lambda kept, _removed: [*kept, ban], network, username)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    until = f" until {_when(expires)}" if expires is not None else ""
    print(f"banned {ban.target}{until} ({path}); {asked}")
    return EXIT_OK


def cmd_ban_remove(args: argparse.Namespace) -> int:
    try:
        path = _bans_path(args)
        network, username = ban_target(args.target)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    def unban(kept: list[Ban], removed: int) -> list[Ban]:
        if not removed:
            raise ValueError(f"no ban on {args.target} in {path}")
        return kept

    try:
        edit_bans(path, unban, network, username)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"unbanned {args.target} ({path})")
    return EXIT_OK


def _ask(args: argparse.Namespace, path: str, method: str = "GET", body: Any = None) -> Any:
    """The running instance's admin API answer; None after printing why not (the exit
    code in ``args.exit``: 1 for a bad config or a refused document, 2 when the API did
    not answer or refused the request)."""
    try:
        config = _load(args)
        token = admin_token(config, args.token)
        return fetch_json(admin_url(config, args.admin), path, token, method, body)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        args.exit = EXIT_CONFIG
    except AdminUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)  # 400: the server does not load, as a file
        args.exit = EXIT_CONFIG if exc.status == 400 else EXIT_UNREACHABLE
    return None


def cmd_server_put(args: argparse.Namespace) -> int:
    """Store a server file's server through the admin API (the api provider)."""
    path = Path(args.file)
    try:
        if path.suffix.lower() == ".json":
            document = json.loads(path.read_text(encoding="utf-8"))
        else:
            document = read_document(path)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    server_id = args.id or str(document.get("id") or path.stem)
    answer = _ask(args, f"/api/servers/{server_id}", "PUT", document)
    if answer is None:
        return int(args.exit)
    for warning in answer.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    domains = ", ".join(answer["domains"]) or "no domains"
    print(f"stored {answer['id']}@api ({domains})")
    return EXIT_OK


def cmd_server_delete(args: argparse.Namespace) -> int:
    if _ask(args, f"/api/servers/{args.id}", "DELETE") is None:
        return int(args.exit)
    print(f"deleted {args.id}@api")
    return EXIT_OK


def cmd_server_list(args: argparse.Namespace) -> int:
    answer = _ask(args, "/api/servers")
    if answer is None:
        return int(args.exit)
    print(json.dumps(answer["servers"], indent=2))
    return EXIT_OK


def cmd_kick(args: argparse.Namespace) -> int:
    """End a player's open connections (by username) or one connection (by its id)
    through the admin API of the running instance."""
    answer = _ask(args, "/api/kick", "POST", {"target": args.target})
    if answer is None:
        return int(args.exit)
    ended = int(answer["ended"])
    print(f"kicked {args.target}: ended {ended} open connections")
    return EXIT_OK if ended else EXIT_CONFIG  # 1: nothing matched


def cmd_ban_list(args: argparse.Namespace) -> int:
    try:
        path = _bans_path(args)
        bans = load_bans(path)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    now = time.time()
    active = [b for b in bans.bans if b.active(now)]
    if args.json:
        print(json.dumps([b.to_json() for b in active], indent=2))
        return EXIT_OK
    if not active:
        print(f"no bans ({path})")
        return EXIT_OK
    for ban in active:
        until = _when(ban.expires) if ban.expires is not None else "forever"
        print(f"{ban.target:<32}  until {until:<20}  {ban.reason}")
    return EXIT_OK


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stamp))


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    finally:
        writer().close()  # what is queued is written, unless stderr stays stalled
    raise SystemExit(code)
