"""itzg/mc-router's container labels, routed as mc-router routes them (issue 18).

Rules for this file:
- A container labelled ``mc-router.*`` and no ``<prefix>.*`` label is read as if it had
  the equivalent discoproxy labels (:data:`LABELS`), so one set of rules (networks,
  pools, wake, problems) applies to both. A container with both is reported and not
  routed: which set would win is not something to guess.
- mc-router's own rules where they differ from ours: a container without
  ``mc-router.host`` is not routed (``mc-router.default`` alone does nothing); booleans
  are Go's ``strconv.ParseBool`` forms; ``auto-scale-down`` stops after mc-router's
  default idle time (:data:`AUTO_SCALE_DOWN_AFTER`). Its global flags
  (``-auto-scale-up``, ``-auto-scale-down``, ``-auto-scale-down-after``) are the
  provider's ``mc_router_auto_scale_*`` settings (:class:`McRouterDefaults`): a
  container's own label wins, as in mc-router.
- Pure, as containers.py: records in, records and problems out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from providers.docker.labels import LabelProblem, parse_port
from providers.docker.settings import DockerSettings

PREFIX = "mc-router."
# mc-router's -auto-scale-down-after default.
AUTO_SCALE_DOWN_AFTER = "10m"
# strconv.ParseBool's accepted forms.
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def _go_bool(label: str, value: str) -> str:
    text = value.strip()
    if text in _TRUE:
        return "true"
    if text in _FALSE:
        return "false"
    raise ValueError(f"expected one of 1, t, true, TRUE, 0, f, false, FALSE, got {value!r}")


def _hosts(label: str, value: str) -> str:
    hosts = [h.strip() for h in value.split(",") if h.strip()]  # SplitExternalHosts
    if not hosts:
        raise ValueError("expected one or more host names separated by commas")
    return ",".join(hosts)


def _same(label: str, value: str) -> str:
    return value


def _port(label: str, value: str) -> str:
    return str(parse_port(value))  # checked here, so the problem names mc-router.port


@dataclass(frozen=True)
class McRouterDefaults:
    """mc-router's global auto-scale flags, for containers without their own label."""

    up: bool = False  # -auto-scale-up
    down: bool = False  # -auto-scale-down
    down_after: str = AUTO_SCALE_DOWN_AFTER  # -auto-scale-down-after (also for a label's true)


NO_DEFAULTS = McRouterDefaults()


def defaults_of(settings: DockerSettings) -> McRouterDefaults:
    """The mc-router global flags the provider's ``mc_router_auto_scale_*`` stand for."""
    return McRouterDefaults(
        up=settings.mc_router_auto_scale_up,
        down=settings.mc_router_auto_scale_down,
        # plain decimals: the label parser takes no exponent (1e+06), and :g rounds
        down_after=f"{settings.mc_router_auto_scale_down_after:.6f}".rstrip("0").rstrip("."),
    )


@dataclass(frozen=True)
class McRouterLabel:
    label: str  # after "mc-router."
    ours: str  # our label key (after "<prefix>.")
    what: str  # for the migration table
    convert: Callable[[str, str], str]


LABELS: tuple[McRouterLabel, ...] = (
    McRouterLabel("host", "domains", "comma-separated, each a route", _hosts),
    McRouterLabel("port", "port", "default 25565", _port),
    McRouterLabel("default", "default", "needs `mc-router.host` too", _go_bool),
    McRouterLabel("network", "docker_network", "", _same),
    McRouterLabel("auto-scale-up", "auto_start", "", _go_bool),
    McRouterLabel(
        "auto-scale-down",
        "auto_stop_after",
        f"`{AUTO_SCALE_DOWN_AFTER}` when true: mc-router's default idle time",
        lambda label, value: AUTO_SCALE_DOWN_AFTER if _go_bool(label, value) == "true" else "",
    ),
    McRouterLabel("auto-scale-asleep-motd", "motds.sleeping.text", "", _same),
)
_BY_LABEL = {spec.label: spec for spec in LABELS}


def translate(
    record: Mapping[str, object],
    name: str,
    prefix: str,
    defaults: McRouterDefaults = NO_DEFAULTS,
) -> tuple[Mapping[str, object] | None, list[LabelProblem]]:
    """``record`` as discoproxy reads it: unchanged without mc-router labels, with its
    mc-router labels turned into ours (and mc-router's global ``defaults`` where it has
    no auto-scale label of its own), or None (not routed) with the problems."""
    labels = record.get("Labels")
    if not isinstance(labels, Mapping) or not any(
        isinstance(k, str) and k.startswith(PREFIX) for k in labels
    ):
        return record, []
    ours = sorted(k for k in labels if isinstance(k, str) and k.startswith(prefix + "."))
    if ours:
        return None, [
            LabelProblem(
                name,
                ours[0],
                "the container has mc-router.* labels too; use one set (not routed)",
            )
        ]
    if PREFIX + "host" not in labels:
        return None, []  # mc-router ignores it too ("probably not minecraft related")
    translated = {
        k: v for k, v in labels.items() if not (isinstance(k, str) and k.startswith(PREFIX))
    }
    problems: list[LabelProblem] = []
    for key, raw in sorted(
        (k, v) for k, v in labels.items() if isinstance(k, str) and k.startswith(PREFIX)
    ):
        spec = _BY_LABEL.get(key[len(PREFIX) :])
        if spec is None:
            known = ", ".join(PREFIX + s.label for s in LABELS)
            # refused, as unknown discoproxy labels are: not guessed around
            problems.append(LabelProblem(name, key, f"unknown mc-router label (known: {known})"))
            continue
        try:
            value = spec.convert(key, str(raw))
        except ValueError as exc:
            problems.append(LabelProblem(name, key, str(exc)))
            continue
        if spec.label == "auto-scale-down" and value:
            value = defaults.down_after  # mc-router's idle time for it, global or default
        if value:
            translated[f"{prefix}.{spec.ours}"] = value
    if defaults.up and PREFIX + "auto-scale-up" not in labels:
        translated[f"{prefix}.auto_start"] = "true"
    if defaults.down and PREFIX + "auto-scale-down" not in labels:
        translated[f"{prefix}.auto_stop_after"] = defaults.down_after
    if any(p.dropped for p in problems):
        return None, problems
    return {**record, "Labels": translated}, problems


def wants_auto_start(
    record: Mapping[str, object], defaults: McRouterDefaults = NO_DEFAULTS
) -> bool:
    """Does the container ask to be started by a login (``mc-router.auto-scale-up``, or
    mc-router's global default for an mc-router container without that label)?"""
    labels = record.get("Labels")
    if not isinstance(labels, Mapping):
        return False
    value = labels.get(PREFIX + "auto-scale-up")
    if value is None:
        return defaults.up and PREFIX + "host" in labels
    return isinstance(value, str) and value.strip() in _TRUE


def as_written(problems: list[LabelProblem], prefix: str) -> list[LabelProblem]:
    """Problems found in a translated container's labels, naming the mc-router label the
    container has instead of the discoproxy label it was read as."""
    theirs = {f"{prefix}.{spec.ours}": PREFIX + spec.label for spec in LABELS}
    return [
        dataclasses.replace(p, label=theirs[p.label]) if p.label in theirs else p for p in problems
    ]


def migration_rows(prefix: str) -> list[str]:
    """labels.md's rows for mc-router's labels, from :data:`LABELS`."""
    rows = []
    for spec in LABELS:
        note = f" ({spec.what})" if spec.what else ""
        rows.append(f"| `{PREFIX}{spec.label}` | `{prefix}.{spec.ours}`{note} |")
    return rows
