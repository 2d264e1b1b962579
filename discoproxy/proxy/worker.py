"""One worker process of ``workers = N`` (``python -m discoproxy.proxy.worker FD``): a data
plane (its reactor, its connections, its guard and pools, its loop for name resolution,
TLS termination and status answers) fed by the control plane over the channel on FD.

Rules for this file:
- Everything it routes by comes from the control plane (``workers.py``): sockets,
  config, table, bans; it reads no file and asks no Docker (certificates: the control
  plane reads them and sends their bytes, :class:`RemoteFiles`). A status miss asks the
  control plane's cache (one backend ping for all workers), a wake asks the control
  plane's provider, webhook events go to the control plane's outbox.
- It stops when told (SIGTERM: drain within ``shutdown_timeout``, as one process does)
  or when the control plane is gone (end of file on the channel: the same drain). SIGHUP
  is the control plane's: it reloads and sends the new config here.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import sys
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from loguru import logger

from discoproxy.guard import BanList
from discoproxy.logwriter import writer
from discoproxy.proxy.channel import Channel, ChannelError, TableDecoder
from discoproxy.proxy.connection import HandedClient, HandoffFailed, adopt_client
from discoproxy.proxy.player_counts import PlayerCounts
from discoproxy.proxy.ports import UDP_SWEEP_S, sweep_udp
from discoproxy.proxy.reactor import Reactor
from discoproxy.proxy.server import ProxyContext
from discoproxy.proxy.stats import take_snapshot, take_totals
from discoproxy.proxy.steering import steer_index
from discoproxy.proxy.tls_termination import FileContents, Stamp
from discoproxy.proxy.workers import WorkerInit
from discoproxy.routing import Registry, Route
from discoproxy.status import StatusError, StatusService
from discoproxy.webhooks import wanted_events

# Webhook events are handed to the control plane this often (a batch per interval).
EVENTS_FORWARD_S = 0.1
# The drain waits this long at most for the answers to its hand-offs still asked (a
# failed one's close line is written here): they come within a round trip or two, and
# the control plane kills a worker shutdown_timeout + 5 s after its SIGTERM.
HANDOFF_ANSWER_S = 2.0
UVLOOP = importlib.util.find_spec("uvloop") is not None


class RemoteControl:
    """A provider's start/stop, asked of the control plane (which holds the provider)."""

    def __init__(self, channel: Channel, provider: str) -> None:
        self._channel = channel
        self._provider = provider

    async def start_server(self, server_id: str) -> None:
        await self._ask("start", server_id)

    async def stop_server(self, server_id: str) -> None:
        await self._ask("stop", server_id)

    async def _ask(self, action: str, server_id: str) -> None:
        try:
            await self._channel.request("control", (self._provider, action, server_id))
        except ChannelError as exc:
            raise RuntimeError(str(exc)) from exc


class RemoteFiles:
    """A worker's :data:`~discoproxy.proxy.tls_termination.FileReader`: certificate and
    CA files are read by the control plane, which sends their bytes."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    async def __call__(self, paths: tuple[Path, ...], known: Stamp | None) -> FileContents | None:
        try:
            answer: FileContents | OSError | None = await self._channel.request(
                "files", (paths, known)
            )
        except ChannelError as exc:
            raise OSError(str(exc)) from exc
        if isinstance(answer, OSError):
            raise answer
        return answer


class SharedStatus(StatusService):
    """A worker's status cache: a miss asks the control plane, whose cache (and single
    flight) means one backend ping per server for every worker together."""

    channel: Channel

    async def _fetch(
        self,
        route: Route,
        protocol: int,
        domain: str,
        port: int,
        client: Any,
        addresses: tuple[tuple[str, int], ...],
    ) -> tuple[dict[str, Any], float]:
        try:
            answer: tuple[dict[str, Any], float] = await self.channel.request(
                "status", (route, protocol, domain, port, client, addresses)
            )
        except ChannelError as exc:
            raise StatusError(str(exc).removeprefix("StatusError: ")) from exc
        return answer


class Worker:
    """The worker's side of the channel: applies what the control plane sends."""

    def __init__(self, sock: socket.socket) -> None:
        self.channel = Channel(sock, self.handle)
        self.ctx: ProxyContext | None = None
        self.stop = anyio.Event()
        self.ready = False
        self._tables = TableDecoder()
        self._tg: anyio.abc.TaskGroup | None = None
        self._first_binds: tuple[list[tuple[str, str]], list[int]] = ([], [])
        self._handing: set[asyncio.Task[Any]] = set()  # hand-offs awaiting their answer

    async def handle(self, kind: str, payload: Any, fds: list[int]) -> Any:
        if kind == "init":
            return await self._init(payload, fds)
        ctx = self.ctx
        if ctx is None:
            for fd in fds:
                os.close(fd)
            raise RuntimeError(f"{kind} before init")
        if kind == "bind" and not self.ready:  # with the first table, in order
            self._first_binds[0].extend(payload)
            self._first_binds[1].extend(fds)
        elif kind == "bind":
            self._adopt(payload, fds)
        elif kind == "unbind" and not self.ready:  # not adopted yet: never will be
            binds, bind_fds = self._first_binds
            for n in reversed(range(len(binds))):
                if binds[n][0] == payload:
                    del binds[n]
                    os.close(bind_fds.pop(n))
        elif kind == "unbind":
            ctx.binds.close(payload)
        elif kind == "rename" and not self.ready:
            old, new = payload
            binds = self._first_binds[0]
            binds[:] = [(new if bind == old else bind, label) for bind, label in binds]
        elif kind == "rename":
            ctx.binds.rename(*payload)
        elif kind == "port":
            (fd,) = fds
            ctx.ports.inherit(payload, socket.socket(fileno=fd))
        elif kind == "players":  # the capped routes' slots, before the table that needs them
            slots: dict[str, int] = payload
            shared = ctx.shared_players
            assert shared is not None
            await ctx.reactor.run(
                lambda: shared.adopt(slots, {q: s.players for q, s in ctx.stats.routes.items()})
            )
        elif kind == "table":
            table = self._tables.decode(*payload)
            ctx.registry.install(table)
            if not self.ready:  # the first table: serving now
                self._adopt(*self._first_binds)
                self.ready = True
                await self.channel.send("ready", os.getpid())
        elif kind == "config":
            config = payload
            if config.log_level != ctx.config.log_level:  # as the control plane did
                from discoproxy.cli import configure_logging

                configure_logging(config.log_level, config.log_format)
            ctx.status.config = config
            ctx.events.wanted = wanted_events(config.webhooks)  # a reload may change them
            listeners = ctx.binds.listeners()
            await ctx.reactor.run(lambda: ctx.apply_config(config, listeners))
        elif kind == "bans":
            bans: BanList = payload
            return await ctx.reactor.run(lambda: ctx.apply_bans(bans))
        elif kind == "kick":
            target: str = payload
            return await ctx.reactor.run(lambda: ctx.kick(target))
        elif kind == "adopt":  # another worker's connection, whose client is ours
            (fd,) = fds
            number: int = payload[0]
            handed: HandedClient = payload[1]
            try:
                await ctx.reactor.run(lambda: adopt_client(ctx, fd, handed))
            except RuntimeError:  # the reactor has stopped (drained): never taken, and
                os.close(fd)  # the control plane tells the other worker once we exit
                return None
            with contextlib.suppress(ChannelError):  # ours now: its close line is ours
                await self.channel.send("adopted", number)
        elif kind == "call":
            fn, args = payload
            ctx.reactor.call(lambda: fn(ctx, *args))
        elif kind == "snapshot":
            connections: int = payload
            snap = await ctx.reactor.run(lambda: take_snapshot(ctx, connections))
            status = ctx.status
            snap.status = (snap.status[0] + status.hits, status.misses, status.stale)
            return snap
        elif kind == "totals":
            return await ctx.reactor.run(lambda: take_totals(ctx))
        elif kind == "alive":  # the control plane's watchdog: through the reactor and back
            with contextlib.suppress(RuntimeError):  # stopped (drained): alive enough
                await ctx.reactor.run(lambda: None)
            return True
        else:
            raise ValueError(f"unknown message {kind}")
        return None

    async def _init(self, init: WorkerInit, fds: list[int]) -> None:
        """Build the data plane: context, reactor, the loop's task set, listeners."""
        from discoproxy.cli import configure_logging

        configure_logging(init.log_level, init.log_format)
        registry = Registry()
        ctx = ProxyContext(
            init.config,
            registry,
            {name: RemoteControl(self.channel, name) for name in init.controls},
            worker=init.index,
        )
        status = SharedStatus(init.config, ctx.waker)
        status.channel = self.channel
        ctx.status = status
        ctx.certs.reader = RemoteFiles(self.channel)
        ctx.waker.backend_players = status.online_players
        ctx.waker.sees_every_player = False  # the other workers' players count too
        ctx.events.wanted = init.events
        # ids unique over the workers and over restarts: index + 1 + count * k
        ctx.number_ids(init.generation * 1_000_000_000 * init.count + init.index + 1, init.count)
        ctx.ports.inherited = {}
        ctx.shared_players = PlayerCounts(fds.pop(), init.count, init.index)  # the last fd
        if init.count > 1:  # every group is steered by client address: see _hand_off
            ctx.steer = partial(steer_index, workers=init.count)
            ctx.hand_off = self._hand_off
        ctx.loop = asyncio.get_running_loop()
        ctx.reactor = Reactor()
        ctx.reactor.call(ctx.start_sweeps)
        ctx.reactor.call(lambda: ctx.reactor.every(UDP_SWEEP_S, lambda: sweep_udp(ctx)))
        ctx.reactor.start()
        tg = self._tg
        assert tg is not None
        await tg.start(ctx.tasks.run, ctx.reactor)
        registry.add_listener(ctx.ports.sync)
        registry.add_listener(ctx.prune_stats)
        registry.add_listener(ctx.status.table_changed)
        registry.add_listener(ctx.waker.table_changed)
        self.ctx = ctx
        # accepted from once the first table is in: until then they wait in the backlog
        self._first_binds = (list(init.binds), fds)
        if ctx.waker.controls:
            tg.start_soon(ctx.waker.run)
        tg.start_soon(self._forward_events, ctx)
        tg.start_soon(self._watch_reactor, ctx)

    async def _hand_off(self, worker: int, handed: HandedClient, fd: int) -> None:
        """A connection whose PROXY header names a client of ``worker``: its socket goes
        there through the control plane (one hop each way, only for such connections;
        ours closed once sent), which answers once ``worker`` took it. One it could not
        hand (``worker`` restarting or gone before it took it, or the control plane gone)
        raises :class:`HandoffFailed`, its text the reason: the connection ends here."""
        task = asyncio.current_task()
        assert task is not None
        self._handing.add(task)
        try:
            failure = await self.channel.request("handoff", (worker, handed), [fd], close_fds=True)
        except ChannelError as exc:
            failure = "control plane gone" if self.channel.closed else str(exc)
        finally:
            self._handing.discard(task)
        if failure is not None:
            raise HandoffFailed(f"handoff failed: {failure}")

    def _adopt(self, binds: list[tuple[str, str]], fds: list[int]) -> None:
        assert self.ctx is not None
        for (bind, label), fd in zip(binds, fds, strict=True):
            self.ctx.binds.adopt(bind, label, socket.socket(fileno=fd))

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._channel_then_stop)
            # held to the end: a SIGTERM during the drain (the control plane's, after it
            # hung up) must not end the process before its connections do
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                tg.start_soon(self._stop_on, signals)
                await self.stop.wait()
                await self._drain()
            tg.cancel_scope.cancel()

    async def _drain(self) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        ctx.closing = True
        ctx.binds.close_all()
        ctx.ports.close_all()
        with anyio.CancelScope(shield=True):
            try:
                await ctx.drain(ctx.config.shutdown_timeout)
                if self._handing:  # a failed one's close line is ours, before the end
                    await asyncio.wait(set(self._handing), timeout=HANDOFF_ANSWER_S)
            finally:
                ctx.tasks.stop()
                await ctx.reactor.stop()
                await self._forward_events(ctx, once=True)

    async def _stop_on(self, signals: Any) -> None:
        async for _ in signals:  # the first starts the drain; later ones change nothing
            self.stop.set()

    async def _channel_then_stop(self) -> None:
        await self.channel.run()
        self.stop.set()  # the control plane is gone: drain and exit

    async def _watch_reactor(self, ctx: ProxyContext) -> None:
        await ctx.reactor.wait_stopped()
        if not ctx.closing:
            logger.error("worker {}: the reactor thread stopped unexpectedly", ctx.worker)
            os._exit(70)  # the control plane starts a new worker

    async def _forward_events(self, ctx: ProxyContext, once: bool = False) -> None:
        while True:
            events = ctx.events.drain()
            if events and not self.channel.closed:
                try:
                    await self.channel.send("events", events)
                except ChannelError:
                    return
            if once:
                return
            await anyio.sleep(EVENTS_FORWARD_S)


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the control plane reloads, then tells us
    sock = socket.socket(fileno=int(argv[1]))
    worker = Worker(sock)
    try:
        anyio.run(worker.run, backend="asyncio", backend_options={"use_uvloop": UVLOOP})
    finally:
        # what is queued is written (the drain's close lines), as the control plane's
        # cli does, unless stderr stays stalled
        writer().close()
    if worker.ctx is None:
        sys.exit(1)  # the control plane hung up before it said what to serve


if __name__ == "__main__":
    main(sys.argv)
