"""The Docker provider: one server per labelled running container, followed live.

Modules: :mod:`.labels` (the label specs, their parsers, ``labels.md``), :mod:`.settings`
(``[providers.docker]``), :mod:`.containers` (records → servers, pure) and :mod:`.engine`
(the SDK: :class:`DockerProvider`). Only ``engine`` imports the ``docker`` SDK, and this
package loads a module when one of its names is first asked for, so ``discoproxy
labels``, ``check`` of a config with the provider off, and the label tests never import it.

Rules for this package:
- Label parsing is pure: :func:`servers_from_containers` takes the engine's
  ``/containers/json`` records (one API call lists them all) and returns the servers and
  the problems, with no I/O, so it is table-tested without an engine. One spec,
  :data:`LABELS`, drives both the parser and the generated ``labels.md``.
- The docker SDK blocks, so every call runs in a worker thread under this provider's own
  :class:`anyio.CapacityLimiter`; the event stream holds one thread for its whole life and
  pokes the loop through a size-1 memory stream: events that arrive while a resync is
  pending only leave it pending (a burst costs one or two resyncs, not one each).
- Every relevant event triggers a full resync and a complete snapshot, as Traefik's
  ``pkg/provider/docker`` does: no diffs, nothing to drift. Events are subscribed to
  *before* the first listing, so nothing that happens in between is lost.
- The event thread also inspects the container of each container event (and of each
  network connect/disconnect) and the loop publishes at once (last listing + that
  inspection: still a complete snapshot), so a route does not wait for a listing that a
  busy engine answers in hundreds of ms. The inspection also outranks a listing that
  lags the event (see FRESH_OVERRIDE_S).
- The SDK's event stream ends silently when the engine stops (its iterator turns socket
  errors into ``StopIteration``); :meth:`DockerProvider.run` then raises and the
  supervisor retries with backoff. A reconnect is a full resync.
- A container is routed only when exactly one backend address follows from its labels and
  networks. Infrarust and mc-router take "the first network" of an unordered map; here the
  choice is deterministic or the container is reported with the reason and dropped.
- A bad label drops that container only. Each distinct problem is logged once, when it
  first appears, not on every resync.
- ``load_once`` (``check``, ``routes --offline``) needs an engine that answers: it lists
  the containers once, as a resync does, and returns the problems instead of logging them
  (a dropped container is an error, a remark a warning); no event stream.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from providers.docker.containers import (
        SLEEPING_STATES,
        ContainerRecord,
        ContainerScan,
        container_name,
        detect_own_container_id,
        inspection_target,
        is_relevant_event,
        merge_inspected,
        network_event_container,
        own_id_from_cgroup,
        own_id_from_mountinfo,
        record_from_inspect,
        same_state,
        servers_from_containers,
    )
    from providers.docker.engine import (
        DockerProvider,
        DockerProviderError,
        EngineUnavailable,
        EventStreamEnded,
        SwarmProvider,
    )
    from providers.docker.labels import (
        LABELS,
        LABELS_BY_KEY,
        LabelProblem,
        LabelSpec,
        labels_markdown,
        parse_bool,
        parse_int,
        parse_network,
        parse_port,
        parse_seconds,
        parse_text,
    )
    from providers.docker.settings import (
        DEFAULT_ENDPOINT,
        DEFAULT_LABEL_PREFIX,
        DockerSettings,
        SwarmSettings,
    )
    from providers.docker.swarm import servers_from_services

# name → the module of this package that defines it
_HOMES = {
    "LABELS": "labels",
    "LABELS_BY_KEY": "labels",
    "LabelProblem": "labels",
    "LabelSpec": "labels",
    "labels_markdown": "labels",
    "parse_bool": "labels",
    "parse_int": "labels",
    "parse_network": "labels",
    "parse_port": "labels",
    "parse_seconds": "labels",
    "parse_text": "labels",
    "DEFAULT_ENDPOINT": "settings",
    "DEFAULT_LABEL_PREFIX": "settings",
    "DockerSettings": "settings",
    "SLEEPING_STATES": "containers",
    "ContainerRecord": "containers",
    "ContainerScan": "containers",
    "container_name": "containers",
    "detect_own_container_id": "containers",
    "inspection_target": "containers",
    "is_relevant_event": "containers",
    "merge_inspected": "containers",
    "network_event_container": "containers",
    "own_id_from_cgroup": "containers",
    "own_id_from_mountinfo": "containers",
    "record_from_inspect": "containers",
    "same_state": "containers",
    "servers_from_containers": "containers",
    "DockerProvider": "engine",
    "DockerProviderError": "engine",
    "EngineUnavailable": "engine",
    "EventStreamEnded": "engine",
    "SwarmProvider": "engine",
    "SwarmSettings": "settings",
    "servers_from_services": "swarm",
}

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_LABEL_PREFIX",
    "LABELS",
    "LABELS_BY_KEY",
    "SLEEPING_STATES",
    "ContainerRecord",
    "ContainerScan",
    "DockerProvider",
    "DockerProviderError",
    "DockerSettings",
    "EngineUnavailable",
    "EventStreamEnded",
    "LabelProblem",
    "LabelSpec",
    "SwarmProvider",
    "SwarmSettings",
    "container_name",
    "detect_own_container_id",
    "inspection_target",
    "is_relevant_event",
    "labels_markdown",
    "merge_inspected",
    "network_event_container",
    "own_id_from_cgroup",
    "own_id_from_mountinfo",
    "parse_bool",
    "parse_int",
    "parse_network",
    "parse_port",
    "parse_seconds",
    "parse_text",
    "record_from_inspect",
    "same_state",
    "servers_from_containers",
    "servers_from_services",
]


def __getattr__(name: str) -> Any:
    """Load the module that defines ``name`` on first use (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
