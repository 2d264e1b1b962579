"""The provider itself: the SDK's blocking calls in worker threads, the event stream
and the resyncs, starting and stopping containers (the rules are in ``__init__``)."""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from functools import partial
from typing import Any, ClassVar, TypeVar

import anyio
import docker
import docker.errors
import docker.tls
import docker.utils
from loguru import logger

from discoproxy.provider import LoadResult, ProviderSettings, ProxyConfig, Publish
from providers.docker import mc_router
from providers.docker.containers import (
    ContainerRecord,
    ContainerScan,
    as_mapping,
    as_text,
    detect_own_container_id,
    inspection_target,
    is_labelled,
    is_relevant_event,
    merge_inspected,
    network_event_container,
    record_from_inspect,
    same_state,
    servers_from_containers,
)
from providers.docker.labels import LabelProblem
from providers.docker.settings import DockerSettings, SwarmSettings
from providers.docker.swarm import servers_from_services

# ``available()`` decides at start whether the provider runs in ``auto`` mode: an engine
# that has not answered /version and /_ping within this is treated as absent.
AVAILABLE_TIMEOUT_S = 3
# One thread follows the event stream for the provider's lifetime; one more runs API
# calls (resyncs are sequential). A private limiter keeps the long-lived thread from
# holding a token of anyio's shared default limiter.
WORKER_THREADS = 2
# How long an inspection made for an event outranks the container list: a listing asked
# for less than this after the inspection (or before it) does not replace it. The list is
# a separate in-memory view that the engine updates after it announces some changes: right
# after ``die`` or ``pause`` it still says "running" (5-60 ms on dockerd 20.10, measured),
# after a network ``connect``/``disconnect`` it shows the old networks. Inspect waits for
# the container's lock, so it returns the settled state.
FRESH_OVERRIDE_S = 2.0
# Every publish parses the whole listing (~50 us per container), and a burst of starts
# (``docker compose up`` of a large project) brings an event per container: parsed per
# event, 300 containers at once kept the loop busy 4.5 s. Publishes may spend
# PARSE_BUDGET_S of parsing in any PARSE_WINDOW_S; past it, events wait and go together
# in the next publish the budget allows (resyncs wait for it too). Containers started one
# at a time, or a small project's burst, never wait.
PARSE_WINDOW_S = 1.0
PARSE_BUDGET_S = 0.25

# Container actions that can change what is routable. ``die`` covers crashes and kills,
# ``stop`` a clean stop; ``rename`` changes the server id; ``create`` adds a stopped
# container (routed as sleeping with ``auto_start``). ``connect``/``disconnect`` are
# network events (a container joined or left a network, which may change its address).
CONTAINER_ACTIONS = (
    "create",
    "start",
    "die",
    "stop",
    "destroy",
    "pause",
    "unpause",
    "rename",
    "health_status",  # matches "health_status: healthy" and the others (engine filter)
)
NETWORK_ACTIONS = ("connect", "disconnect")
EVENT_FILTERS: dict[str, list[str]] = {
    "type": ["container", "network"],
    "event": [*CONTAINER_ACTIONS, *NETWORK_ACTIONS],
}

# Seconds a container gets to stop before it is killed (auto_stop_after).
STOP_TIMEOUT_S = 30

T = TypeVar("T")


class DockerProviderError(Exception):
    """Root of the Docker provider's failures; the supervisor logs them and retries."""


class EngineUnavailable(DockerProviderError):
    """Raised when the engine cannot be reached or an API call to it fails."""


class EventStreamEnded(DockerProviderError):
    """Raised when the engine's event stream ends (the engine stopped or restarted)."""


@contextmanager
def _engine_errors(endpoint: str) -> Iterator[None]:
    """The SDK raises ``DockerException`` and ``requests`` errors (``OSError``s); the
    supervisor gets one type that names the endpoint."""
    try:
        yield
    except (docker.errors.DockerException, OSError) as exc:
        raise EngineUnavailable(f"Docker engine at {endpoint}: {exc}") from exc


def _inspect(client: Any, container_id: str) -> ContainerRecord | None:
    """The container in listing form, or None when it is gone."""
    try:
        info = client.inspect_container(container_id)
    except docker.errors.NotFound:
        return None
    return record_from_inspect(info) if isinstance(info, Mapping) else None


def _load_result(scan: ContainerScan, source: str) -> LoadResult:
    """A scan as ``load_once`` reports it: dropped problems are errors, others warnings."""
    return LoadResult(
        scan.servers,
        errors=tuple(f"{problem}; not routed" for problem in scan.problems if problem.dropped),
        warnings=tuple(str(problem) for problem in scan.problems if not problem.dropped),
        source=source,
    )


def _posted(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` for an event thread to call: queued on this loop, not waited for. A thread
    that waited (``anyio.from_thread.run_sync``) hung for good when its loop stopped
    with the call queued (the thread is abandoned on cancel, and the engine's events
    keep coming): a non-daemon thread that kept the whole process from exiting. Raises
    RuntimeError once the loop is closed."""
    loop = asyncio.get_running_loop()

    def post(*args: Any) -> None:
        loop.call_soon_threadsafe(fn, *args)

    return post


def _close_stream(events: Any) -> None:
    # The stream may already be closed by the engine, or be an SSH channel the SDK
    # cannot cancel; either way nothing is left to release here.
    with suppress(docker.errors.DockerException, OSError, AttributeError, ValueError):
        events.close()


class DirectAPIClient(docker.APIClient):
    """The SDK's client, reaching the engine directly and with exactly the TLS
    configured: requests would otherwise send a tcp:// engine through HTTP(S)_PROXY and
    let REQUESTS_CA_BUNDLE replace ``tls_ca`` (its environment wins over a session's CA),
    from the first call on (``version="auto"`` asks the engine in the constructor)."""

    @property
    def trust_env(self) -> bool:
        return False

    @trust_env.setter
    def trust_env(self, value: bool) -> None:
        pass  # requests.Session sets True in its constructor


class DockerProvider:
    """Publishes one server per labelled running container, resynced on every event."""

    Settings: ClassVar[type[ProviderSettings]] = DockerSettings
    ROUTED: ClassVar[str] = "containers"  # what the routed-servers log line counts

    def __init__(self, name: str, settings: DockerSettings, config: ProxyConfig) -> None:
        self.name = name
        self.settings = settings
        self._log = logger.bind(provider=name)
        self._limiter = anyio.CapacityLimiter(WORKER_THREADS)
        self._control_limiter = anyio.CapacityLimiter(WORKER_THREADS)
        self._unavailable = f"no Docker engine answers at {settings.endpoint}"
        self._own_id: str | None = None
        self._own_id_known = False
        self._reported: frozenset[LabelProblem] = frozenset()
        self._routed: tuple[str, ...] | None = None
        # Touched only on the event loop's thread: the last full listing, and per
        # container the newest inspection made for an event, with its loop time.
        self._listing: list[ContainerRecord] | None = None
        self._listed_at = -math.inf  # loop time the last listing was asked for
        # the last scan's auto_start pools → their replicas (start_server starts them all)
        self._members: Mapping[str, tuple[str, ...]] = {}
        self._fresh: dict[str, tuple[float, ContainerRecord | None]] = {}
        # (loop time, seconds) of the parses of the last PARSE_WINDOW_S
        self._parses: collections.deque[tuple[float, float]] = collections.deque()

    @classmethod
    def instances(cls, name: str, settings: ProviderSettings) -> list[tuple[str, ProviderSettings]]:
        """One provider per engine of ``engines`` (``docker.<engine>``), else this one."""
        assert isinstance(settings, DockerSettings)
        return [
            (name if engine is None else f"{name}.{engine}", engine_settings)
            for engine, engine_settings in settings.per_engine()
        ]

    async def available(self) -> bool:
        try:
            with anyio.fail_after(AVAILABLE_TIMEOUT_S + 1):
                client = await self._call(partial(self._connect, AVAILABLE_TIMEOUT_S))
                try:
                    await self._call(client.ping)
                finally:
                    client.close()
        except (EngineUnavailable, TimeoutError) as exc:
            reason = str(exc.__cause__ or exc) or f"no answer within {AVAILABLE_TIMEOUT_S}s"
            self._unavailable = f"no Docker engine answers at {self.settings.endpoint}: {reason}"
            return False
        return True

    def unavailable_reason(self) -> str:
        return self._unavailable

    async def load_once(self) -> LoadResult:
        """The servers of one container listing, as the first resync of :meth:`run`
        publishes them. Raises :class:`EngineUnavailable` when the engine does not answer."""
        await self._detect_own_id()
        client = await self._call(partial(self._connect, self.settings.api_timeout))
        try:
            listing = await self._list(client)
        finally:
            client.close()
        return _load_result(
            servers_from_containers(listing, self.settings, self._own_id), self.settings.endpoint
        )

    async def _detect_own_id(self) -> None:
        if not self._own_id_known:
            self._own_id = await anyio.to_thread.run_sync(detect_own_container_id)
            self._own_id_known = True

    async def run(self, publish: Publish) -> None:
        await self._detect_own_id()
        self._listing = None  # a new connection starts from a full listing
        self._listed_at = -math.inf
        self._fresh.clear()
        client = await self._call(partial(self._connect, self.settings.api_timeout))
        # the event thread inspects with a client of its own (same API version, no call)
        inspector = self._connect(self.settings.api_timeout, client.api_version)
        try:
            events = await self._call(partial(client.events, decode=True, filters=EVENT_FILTERS))
            try:
                await self._follow(client, inspector, events, publish)
            finally:
                _close_stream(events)
        finally:
            inspector.close()
            client.close()

    async def _follow(
        self, client: Any, inspector: Any, events: Iterable[Any], publish: Publish
    ) -> None:
        """Resync now and after every relevant event, until the stream ends (then raise)."""
        send, receive = anyio.create_memory_object_stream[None](1)
        why: list[BaseException] = []
        following = True
        deferred = anyio.Event()  # set: events wait for the publish after the window

        def on_event(inspection: tuple[str, ContainerRecord | None] | None, network: bool) -> None:
            """On the loop, for each relevant event: apply the event thread's inspection
            at once, then ask for a full resync (one already pending covers this event).
            A network event's inspection is published at once only when it moves routes:
            every container's network events count, and a scan per event costs the loop
            a whole listing's parse. Past the parse budget (``PARSE_BUDGET_S``) the
            inspection waits for the next publish it allows, with those of the others."""
            if not following:
                return  # an abandoned event thread's last word
            if inspection is not None:
                container_id, record = inspection
                before = self._fresh.get(container_id)
                self._fresh[container_id] = (anyio.current_time(), record)
                moves = not network or self._moves_routes(container_id, before, record)
                if self._listing is not None and moves:
                    if self._parse_allowed_at() <= anyio.current_time():
                        self._publish(self._listing, publish, prune=False)
                    else:
                        deferred.set()
            with suppress(anyio.WouldBlock):
                send.send_nowait(None)

        async def publish_deferred() -> None:
            nonlocal deferred
            while True:
                await deferred.wait()
                await anyio.sleep_until(self._parse_allowed_at())
                deferred = anyio.Event()  # events from now on wait for the next one
                if self._listing is not None:
                    self._publish(self._listing, publish, prune=False)

        async def pump() -> None:
            nonlocal following
            with send:
                try:
                    await anyio.to_thread.run_sync(
                        self._pump_events,
                        events,
                        inspector,
                        _posted(on_event),
                        abandon_on_cancel=True,
                        limiter=self._limiter,
                    )
                except Exception as exc:
                    why.append(exc)
                finally:
                    following = False

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pump)
                tg.start_soon(publish_deferred)
                await self.resync(client, publish)
                with receive:
                    async for _ in receive:
                        await self.resync(client, publish)
                tg.cancel_scope.cancel()  # the stream ended: so does the deferred publisher
        except ExceptionGroup as group:
            # pump() never raises: a lone error is a resync's, give the supervisor that one
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        raise EventStreamEnded(
            f"event stream from {self.settings.endpoint} ended (engine stopped or restarted)"
            + (f": {why[0]}" if why else "")
        )

    def _moves_routes(
        self,
        container_id: str,
        before: tuple[float, ContainerRecord | None] | None,
        record: ContainerRecord | None,
    ) -> bool:
        """Can this inspection change the routes the last publish made? Not when the
        container is not labelled, nor when the routes saw it so already (its previous
        inspection, else the listing)."""
        prefix = self.settings.label_prefix
        if record is not None and not is_labelled(record, prefix):
            return False
        if before is not None:
            previous = before[1]
        else:
            listing = self._listing or []
            previous = next((r for r in listing if as_text(r.get("Id")) == container_id), None)
        return not same_state(previous, record, prefix, mc_router.defaults_of(self.settings))

    def _pump_events(
        self,
        events: Iterable[Any],
        inspector: Any,
        on_event: Callable[[tuple[str, ContainerRecord | None] | None, bool], None],
    ) -> None:
        """Worker thread: read events until the stream ends or is closed. A labelled
        container's event, and a network connect/disconnect, is followed by an inspection
        of its container, here, so the route changes without waiting for a full listing
        (which is slow on a busy engine, and lags these events)."""
        prefix = self.settings.label_prefix
        for event in events:
            if not isinstance(event, Mapping) or not is_relevant_event(event, prefix):
                continue
            container_id = inspection_target(event) or network_event_container(event)
            inspection = None
            if container_id is not None:
                # on failure, the full resync this event triggers will tell
                with suppress(docker.errors.DockerException, OSError):
                    inspection = (container_id, _inspect(inspector, container_id))
            try:
                on_event(inspection, event.get("Type") == "network")
            except RuntimeError:
                return  # the provider is gone (its loop closed)

    async def start_server(self, server_id: str) -> None:
        """Start the container ``server_id`` (a stopped ``auto_start`` server), or every
        replica of the pool ``server_id``, as ``docker compose start`` would."""
        names = await self._control(server_id, lambda client, name: client.start(name))
        self._log_controlled(server_id, "started", names)

    async def stop_server(self, server_id: str) -> None:
        """Stop the container ``server_id``, or every replica of that pool
        (``auto_stop_after``)."""
        names = await self._control(
            server_id, lambda client, name: client.stop(name, timeout=STOP_TIMEOUT_S)
        )
        self._log_controlled(server_id, "stopped", names)

    def _log_controlled(self, server_id: str, done: str, names: tuple[str, ...]) -> None:
        if names == (server_id,):
            self._log.info("container {} {}", server_id, done)
        else:
            self._log.info("pool {} {}: {}", server_id, done, ", ".join(names))

    async def _control(
        self,
        server_id: str,
        action: Callable[[Any, str], object],
        extra_timeout_s: int = STOP_TIMEOUT_S,
    ) -> tuple[str, ...]:
        """Run ``action`` on each engine object of ``server_id`` (each replica of a pool,
        each service of a Swarm pool: one that fails does not keep the others from it)
        in threads of its own, since a stop may take ``STOP_TIMEOUT_S`` and resyncs must
        not wait behind it; the names acted on."""
        names = self._members.get(server_id, (server_id,))

        def call() -> None:
            client = self._connect(self.settings.api_timeout + extra_timeout_s)
            failure: Exception | None = None
            try:
                for name in names:
                    try:
                        action(client, name)
                    except Exception as exc:  # the first is raised once all were tried
                        failure = failure or exc
            finally:
                client.close()
            if failure is not None:
                raise failure

        with _engine_errors(self.settings.endpoint):
            await anyio.to_thread.run_sync(call, limiter=self._control_limiter)
        return names

    async def resync(self, client: Any, publish: Publish) -> ContainerScan:
        """List containers once and publish the complete snapshot (within the parse
        budget: ``PARSE_BUDGET_S``)."""
        await anyio.sleep_until(self._parse_allowed_at())
        listed_at = anyio.current_time()
        self._listing = await self._list(client)
        self._listed_at = listed_at
        return self._publish(self._listing, publish, prune=True)

    async def _list(self, client: Any) -> list[ContainerRecord]:
        """Every container, stopped ones too (``auto_start`` servers sleep in them)."""
        listed = await self._call(partial(client.containers, all=True))
        return [r for r in listed if isinstance(r, Mapping)]

    def _publish(
        self, listing: list[ContainerRecord], publish: Publish, *, prune: bool
    ) -> ContainerScan:
        """Publish ``listing`` as corrected by inspections it may lag. With ``prune`` (a
        new listing), inspections it already shows, or made long enough before it was
        asked for, are forgotten. An inspection's age counts to the listing, not to now: a
        listing older than an inspection never outranks it (an event's publish uses the
        last listing, however long ago that was)."""
        began = anyio.current_time()
        by_id = {as_text(r.get("Id")): r for r in listing}
        overrides: dict[str, ContainerRecord | None] = {}
        for container_id, (seen_at, record) in list(self._fresh.items()):
            if self._listed_at - seen_at > FRESH_OVERRIDE_S or same_state(
                by_id.get(container_id),
                record,
                self.settings.label_prefix,
                mc_router.defaults_of(self.settings),
            ):
                if prune:
                    del self._fresh[container_id]
                continue
            overrides[container_id] = record
        records = merge_inspected(listing, overrides) if overrides else listing
        scan = servers_from_containers(records, self.settings, self._own_id)
        # the budget counts the parse only: what the registry then does with the
        # snapshot is the same however many events it carries
        self._parses.append((began, anyio.current_time() - began))
        self._report(scan)
        self._members = scan.members
        publish(scan.servers)
        return scan

    def _parse_allowed_at(self) -> float:
        """Loop time from which one more parse keeps within ``PARSE_BUDGET_S`` per
        ``PARSE_WINDOW_S`` (now, unless a burst spent it)."""
        now = anyio.current_time()
        parses = self._parses
        while parses and parses[0][0] <= now - PARSE_WINDOW_S:
            parses.popleft()
        spent = sum(cost for _, cost in parses)
        allowed = now
        for began, cost in parses:  # oldest first: each leaving the window frees its cost
            if spent < PARSE_BUDGET_S:
                break
            spent -= cost
            allowed = began + PARSE_WINDOW_S
        return allowed

    def _report(self, scan: ContainerScan) -> None:
        for problem in sorted(set(scan.problems) - self._reported):
            if problem.dropped:
                self._log.error("{}; not routed", problem)
            else:
                self._log.warning("{}", problem)
        self._reported = frozenset(scan.problems)
        routed = tuple(server.id for server in scan.servers)
        if routed != self._routed:
            before = set(self._routed or ())
            changes = [f"+{i}" for i in routed if i not in before]
            changes += [f"-{i}" for i in sorted(before - set(routed))]
            self._log.info(
                "routed {}: {}{}",
                self.ROUTED,
                len(routed),
                f" ({' '.join(changes)})" if changes else "",
            )
            self._routed = routed

    def _connect(self, timeout: int, version: str = "auto") -> Any:
        """A low-level API client; ``version="auto"`` asks the engine (one /version call)."""
        endpoint = self.settings.endpoint
        tls: Any = None
        settings = self.settings
        if settings.tls_ca or settings.tls_cert:
            tls = docker.tls.TLSConfig(
                client_cert=(str(settings.tls_cert), str(settings.tls_key))
                if settings.tls_cert
                else None,
                ca_cert=str(settings.tls_ca) if settings.tls_ca else None,
                verify=settings.tls_verify,
            )
        elif endpoint.startswith(("tcp://", "https://")):
            tls = docker.utils.kwargs_from_env().get("tls")
        return DirectAPIClient(
            base_url=endpoint, version=version, timeout=timeout, tls=tls or False
        )

    async def _call(self, func: Callable[[], T]) -> T:
        with _engine_errors(self.settings.endpoint):
            return await anyio.to_thread.run_sync(
                func, abandon_on_cancel=True, limiter=self._limiter
            )


# What a manager's event stream says about a swarm: services created, updated (scaled,
# relabelled) or removed, and nodes joining, leaving or drained. Tasks raise no event
# (their containers' events stay on their own node): those are found by the poll.
SWARM_EVENT_FILTERS: dict[str, list[str]] = {"type": ["service", "node"]}
# After a service or node event, list this often for this long: the tasks it creates or
# stops change state over the next seconds, sooner than the next poll would see them.
SWARM_EVENT_LIST_EVERY_S = 0.25
SWARM_EVENT_FOLLOW_FOR_S = 10.0


class SwarmProvider(DockerProvider):
    """Publishes one pooled server per labelled Swarm service, a backend per running
    task (any node), from a listing of services and tasks after every service or node
    event and every ``poll_interval`` (a manager raises no event for a task on another
    node). Wakes ``auto_start`` services by scaling them. Talks to a manager."""

    Settings: ClassVar[type[ProviderSettings]] = SwarmSettings
    ROUTED: ClassVar[str] = "services"

    def __init__(self, name: str, settings: SwarmSettings, config: ProxyConfig) -> None:
        super().__init__(name, settings, config)
        self.poll_interval = settings.poll_interval
        self._published: tuple[object, ...] | None = None

    async def available(self) -> bool:
        if not await super().available():
            return False
        try:
            with anyio.fail_after(AVAILABLE_TIMEOUT_S + 1):
                client = await self._call(partial(self._connect, AVAILABLE_TIMEOUT_S))
                try:
                    info = await self._call(client.info)
                finally:
                    client.close()
        except (EngineUnavailable, TimeoutError):
            return False
        swarm = info.get("Swarm") if isinstance(info, Mapping) else None
        swarm = swarm if isinstance(swarm, Mapping) else {}
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            self._unavailable = (
                f"the Docker engine at {self.settings.endpoint} is not a manager of an "
                f"active swarm (node state {swarm.get('LocalNodeState') or 'unknown'})"
            )
            return False
        return True

    async def load_once(self) -> LoadResult:
        client = await self._call(partial(self._connect, self.settings.api_timeout))
        try:
            return _load_result(await self._scan_swarm(client), self.settings.endpoint)
        finally:
            client.close()

    async def run(self, publish: Publish) -> None:
        """List and publish after every service or node event and every
        ``poll_interval``, until the event stream ends or a listing fails (then raise:
        the supervisor retries, and the next run starts with a full publish)."""
        self._published = None
        client = await self._call(partial(self._connect, self.settings.api_timeout))
        try:
            events = await self._call(
                partial(client.events, decode=True, filters=SWARM_EVENT_FILTERS)
            )
            try:
                await self._poll(client, events, publish)
            finally:
                _close_stream(events)
        finally:
            client.close()

    async def _poll(self, client: Any, events: Iterable[Any], publish: Publish) -> None:
        send, receive = anyio.create_memory_object_stream[None](1)
        why: list[BaseException] = []

        def on_event() -> None:
            with suppress(anyio.WouldBlock, anyio.ClosedResourceError):
                send.send_nowait(None)

        post = _posted(on_event)

        def pump_events() -> None:
            """Worker thread: one wake-up per event, until the stream ends or closes."""
            for _ in events:
                try:
                    post()
                except RuntimeError:
                    return  # the provider is gone (its loop closed)

        async def pump() -> None:
            with send:
                try:
                    await anyio.to_thread.run_sync(
                        pump_events, abandon_on_cancel=True, limiter=self._limiter
                    )
                except Exception as exc:
                    why.append(exc)

        fast_until = -math.inf  # list often until then: an event's tasks are moving
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            with receive:
                while True:
                    await self.resync(client, publish)
                    fast = anyio.current_time() < fast_until
                    with anyio.move_on_after(
                        min(SWARM_EVENT_LIST_EVERY_S, self.poll_interval)
                        if fast
                        else self.poll_interval
                    ):
                        try:
                            await receive.receive()
                        except anyio.EndOfStream:
                            break
                        fast_until = anyio.current_time() + SWARM_EVENT_FOLLOW_FOR_S
            tg.cancel_scope.cancel()
        raise EventStreamEnded(
            f"event stream from {self.settings.endpoint} ended (engine stopped or restarted)"
            + (f": {why[0]}" if why else "")
        )

    async def resync(self, client: Any, publish: Publish) -> ContainerScan:
        scan = await self._scan_swarm(client)
        self._report(scan)
        self._members = scan.members
        if scan.servers != self._published:  # an unchanged swarm rebuilds no table
            self._published = scan.servers
            publish(scan.servers)
        return scan

    async def _scan_swarm(self, client: Any) -> ContainerScan:
        """One listing of the swarm's services and running tasks, as servers."""
        services = await self._call(client.services)
        tasks = await self._call(partial(client.tasks, filters={"desired-state": "running"}))
        assert isinstance(self.settings, SwarmSettings)
        return servers_from_services(
            [s for s in services if isinstance(s, Mapping)],
            [t for t in tasks if isinstance(t, Mapping)],
            self.settings,
        )

    async def start_server(self, server_id: str) -> None:
        """Scale the sleeping service ``server_id`` (each service of that pool) to one
        replica; one already scaled up (its task still starting) is left as it is."""
        await self._scale(server_id, up=True)

    async def stop_server(self, server_id: str) -> None:
        """Scale the service ``server_id`` (each service of that pool) to 0 replicas
        (``auto_stop_after``)."""
        await self._scale(server_id, up=False)

    async def _scale(self, server_id: str, *, up: bool) -> None:
        names = await self._control(
            server_id, lambda client, name: scale_service(client, name, up=up), 0
        )
        self._log.info(
            "service {} scaled to {}{}",
            server_id,
            "1" if up else "0",
            f": {', '.join(names)}" if names != (server_id,) else "",
        )


# An update made between our read of a service's version and our write ("update out
# of sequence") is retried with the newer version this many times.
SCALE_ATTEMPTS = 3


def scale_service(client: Any, name: str, *, up: bool) -> None:
    """Worker thread: scale the replicated service ``name`` to 1 (when at 0) or to 0."""
    for attempt in range(SCALE_ATTEMPTS):
        spec = client.inspect_service(name)
        mode = as_mapping(as_mapping(spec.get("Spec")).get("Mode"))
        if "Replicated" not in mode:
            raise DockerProviderError(f"service {name} is not replicated: it cannot be scaled")
        replicas = as_mapping(mode.get("Replicated")).get("Replicas", 1)
        wanted = (max(1, replicas) if isinstance(replicas, int) else 1) if up else 0
        if replicas == wanted:
            return
        try:  # the rest of the spec as it is (fetch_current_spec)
            client.update_service(
                name,
                version=as_mapping(spec.get("Version")).get("Index"),
                mode={"Replicated": {"Replicas": wanted}},
                fetch_current_spec=True,
            )
            return
        except docker.errors.APIError as exc:
            if "out of sequence" not in str(exc) or attempt == SCALE_ATTEMPTS - 1:
                raise
