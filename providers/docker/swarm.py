"""Swarm services to servers: each labelled service is one pooled server, each of its
running tasks one backend, reached by the task's IP on the service's overlay network.
Pure: it takes the engine's ``/services`` and ``/tasks`` records and does no I/O.

Rules for this file:
- A service's labels are its own (``deploy.labels`` in a stack file), read with the same
  specs as container labels (:data:`~providers.docker.labels.LABELS`); problems name the
  service. Its running tasks are turned into container-shaped records (one per task,
  named after the service, in the service's pool) and go through
  :func:`~providers.docker.containers.servers_from_containers`: one set of rules for
  labels, networks, pools and replicas, whatever the engine object.
- A task is reached on its own IP, never the service VIP (without IPVS in the kernel the
  VIP routes nowhere); the ``ingress`` network is never used (its addresses live in the
  routing mesh's sandbox, not on a network discoproxy can join).
- Global and replicated services alike: every task that runs (and is meant to) is a
  backend, on whichever node.
- Waking: a replicated service labelled ``auto_start`` with no task running is one
  stopped record (the service itself), so its pool sleeps; a login scales it to one
  replica (``SwarmProvider.start_server``) and ``auto_stop_after`` back to zero. A global
  service cannot be scaled, so ``auto_start`` on one is refused, never ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from providers.docker.containers import (
    ContainerRecord,
    ContainerScan,
    as_mapping,
    as_text,
    servers_from_containers,
)
from providers.docker.labels import LabelProblem
from providers.docker.settings import DockerSettings

ServiceRecord = Mapping[str, object]
TaskRecord = Mapping[str, object]

# Labels a global service may not carry, and why (see the module's rules).
GLOBAL_SERVICE_REFUSES = {
    "auto_start": "a global service runs one task per node and cannot be scaled to 0 and "
    "back; use a replicated service (deploy.mode: replicated) or remove it",
    "auto_stop_after": "a global service runs one task per node and cannot be scaled to 0; "
    "use a replicated service (deploy.mode: replicated) or remove it",
}


def service_name(service: ServiceRecord) -> str:
    return as_text(as_mapping(service.get("Spec")).get("Name")) or as_text(service.get("ID"))


def service_labels(service: ServiceRecord) -> Mapping[str, object]:
    return as_mapping(as_mapping(service.get("Spec")).get("Labels"))


def is_global(service: ServiceRecord) -> bool:
    return "Global" in as_mapping(as_mapping(service.get("Spec")).get("Mode"))


def task_networks(task: TaskRecord) -> dict[str, str]:
    """Network name → the task's address on it (no prefix length), ingress left out."""
    found: dict[str, str] = {}
    attachments = task.get("NetworksAttachments")
    for item in attachments if isinstance(attachments, list) else []:
        attachment = as_mapping(item)
        network = as_mapping(attachment.get("Network"))
        spec = as_mapping(network.get("Spec"))
        if spec.get("Ingress") is True or as_text(spec.get("Name")) == "ingress":
            continue
        addresses = attachment.get("Addresses")
        first = (
            next((a for a in addresses if isinstance(a, str)), "")
            if isinstance(addresses, list)
            else ""
        )
        name = as_text(spec.get("Name")) or as_text(network.get("ID"))
        if name:
            found[name] = first.split("/", 1)[0]
    return found


def task_is_running(task: TaskRecord) -> bool:
    state = as_text(as_mapping(task.get("Status")).get("State"))
    return state == "running" and as_text(task.get("DesiredState")) == "running"


def records_from_services(
    services: Sequence[ServiceRecord], tasks: Sequence[TaskRecord], prefix: str
) -> tuple[list[ContainerRecord], list[LabelProblem]]:
    """One container-shaped record per running task of a labelled service, and the
    problems of services refused before that."""
    by_service: dict[str, list[TaskRecord]] = {}
    for task in tasks:
        if task_is_running(task):
            by_service.setdefault(as_text(task.get("ServiceID")), []).append(task)
    records: list[ContainerRecord] = []
    problems: list[LabelProblem] = []
    dotted = prefix + "."
    for service in services:
        labels = service_labels(service)
        if not any(isinstance(k, str) and k.startswith(dotted) for k in labels):
            continue
        name = service_name(service)
        refused = [k for k in GLOBAL_SERVICE_REFUSES if dotted + k in labels]
        if refused and is_global(service):
            problems += [
                LabelProblem(name, dotted + k, GLOBAL_SERVICE_REFUSES[k], kind="service")
                for k in refused
            ]
            continue
        pooled = {**labels}
        pooled.setdefault(dotted + "group", name)  # the service is the pool
        running = sorted(
            by_service.get(as_text(service.get("ID")), ()), key=lambda t: as_text(t.get("ID"))
        )
        records += [
            _record(as_text(task.get("ID")), name, pooled, task_networks(task)) for task in running
        ]
        if not running:  # asleep (auto_start: a login scales it up) or not routed
            records.append(_record(as_text(service.get("ID")), name, pooled, None))
    return records, problems


def _record(
    record_id: str, name: str, labels: Mapping[str, object], networks: Mapping[str, str] | None
) -> ContainerRecord:
    """A container-shaped record: a running task (its networks), or with ``networks``
    None the service itself, stopped (no task runs)."""
    running = networks is not None
    return {
        "Id": record_id,
        "Names": [f"/{name}"],
        "Labels": labels,
        "State": "running" if running else "exited",
        "Status": "Up" if running else "Exited",
        "HostConfig": {"NetworkMode": "default"},
        "NetworkSettings": {
            "Networks": {net: {"IPAddress": ip} for net, ip in (networks or {}).items()}
        },
    }


def servers_from_services(
    services: Sequence[ServiceRecord], tasks: Sequence[TaskRecord], settings: DockerSettings
) -> ContainerScan:
    """The servers and problems of a swarm's services and tasks."""
    records, refused = records_from_services(services, tasks, settings.label_prefix)
    scan = servers_from_containers(records, settings)
    problems = {dataclasses.replace(p, kind="service") for p in scan.problems}
    problems.update(refused)
    # an auto_start pool → the services a login scales up (their records' names)
    return ContainerScan(scan.servers, tuple(sorted(problems)), scan.members)
