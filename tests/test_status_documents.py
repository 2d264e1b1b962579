"""A backend's status document, hostile or broken: ``parse_status_document`` accepts it or
raises :class:`StatusError`, ``render_status`` and ``legacy_fields`` answer whatever it
accepted, and a document the service cannot use is a failed fetch (the stale answer,
then the unreachable MOTD), never an internal error of the connection that asked."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discoproxy.config import ProxyConfig
from discoproxy.motd import (
    MAX_LEGACY_MOTD_CHARS,
    MAX_LEGACY_VERSION_CHARS,
    Motd,
    legacy_fields,
    render_status,
    strip_codes,
)
from discoproxy.protocol import minecraft
from discoproxy.protocol.errors import NeedData
from discoproxy.routing import Registry, Route
from discoproxy.status import (
    MAX_DOCUMENT_DEPTH,
    MAX_STATUS_BYTES,
    StatusError,
    StatusService,
    StatusState,
    parse_status_document,
)
from discoproxy.wake import Waker
from tests.proxy.helpers import Backend, backend, receive_all, running_proxy, server
from tests.support import FakeClock

GOOD = {
    "version": {"name": "Paper 1.21", "protocol": 767},
    "players": {"max": 20, "online": 3, "sample": []},
    "description": {"text": "backend-A"},
}


def payload(text: str | bytes) -> bytes:
    """A Status Response payload carrying ``text`` (no 32767-character cap: a hostile
    backend does not keep to it)."""
    data = text.encode() if isinstance(text, str) else text
    return minecraft.encode_varint(len(data)) + data


def nested(depth: int) -> str:
    """An object whose "a" holds arrays nested so that the document is ``depth`` deep."""
    return '{"a":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def strict_json(text: str) -> Any:
    """``json.loads`` refusing NaN and Infinity, as a strict client does."""

    def refuse(name: str) -> None:
        raise ValueError(name)

    return json.loads(text, parse_constant=refuse)


# --- parse_status_document ------------------------------------------------------------


def test_a_document_nested_500_deep_is_refused_not_a_recursion_error() -> None:
    with pytest.raises(StatusError, match=f"deeper than {MAX_DOCUMENT_DEPTH} levels"):
        parse_status_document(payload(nested(500)))


def test_brackets_past_jsons_own_limit_are_refused_as_too_deep() -> None:
    text = '{"a":' + "[" * 200_000  # fits MAX_STATUS_BYTES; json.loads gives up first
    assert len(text) < MAX_STATUS_BYTES
    with pytest.raises(StatusError, match="deeper than"):
        parse_status_document(payload(text))


def test_a_document_exactly_at_the_depth_cap_is_accepted() -> None:
    document = parse_status_document(payload(nested(MAX_DOCUMENT_DEPTH)))
    assert json.loads(render_status(document, None, 47))["a"] == document["a"]
    with pytest.raises(StatusError, match="deeper than"):
        parse_status_document(payload(nested(MAX_DOCUMENT_DEPTH + 1)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": NaN}', "NaN is not a JSON number"),
        ('{"a": -Infinity}', "-Infinity is not a JSON number"),
        ('{"a": 1e400}', "out of range"),
        ('{"a": ' + "1" * 5000 + "}", "not JSON"),  # past Python's int digit limit
        ('{"a": "\xff"}'.encode("latin-1"), "not JSON"),  # not UTF-8
        ("[1, 2]", "not a JSON object"),
        ('{"a": 1', "not JSON"),
    ],
)
def test_what_is_not_a_strict_json_object_is_a_status_error(
    text: str | bytes, message: str
) -> None:
    with pytest.raises(StatusError, match=message):
        parse_status_document(payload(text))


def test_a_string_length_varint_over_five_bytes_is_a_status_error() -> None:
    with pytest.raises(StatusError, match="longer than 5 bytes"):
        parse_status_document(b"\xff\xff\xff\xff\xff\xff{}")


@pytest.mark.parametrize("data", [b"", b"\x05{}", b"\x01{}", b"\x7f"])
def test_a_string_length_that_does_not_fit_is_a_status_error(data: bytes) -> None:
    with pytest.raises(StatusError):
        parse_status_document(data)


# --- property: whatever a backend sends -------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["%s", "%1$s%2$s", "%9999999999$s", "#ff00aa", "#zz", "red", "reset"])
)
COMPONENT_KEYS = ["text", "translate", "with", "extra", "fallback", "keybind", "color", "bold"]


def json_values(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=5) | st.dictionaries(
        st.text(max_size=5), children, max_size=4
    )


def components(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Text components whose every key may hold any value: a number for "with", an
    object for "extra", a list for "color"."""
    anything = children | SCALARS
    keys = {key: anything for key in COMPONENT_KEYS}
    translation = {"translate": st.sampled_from(["%s", "a %s b %2$s", "k"]), "with": anything}
    return (
        st.lists(children, max_size=4)
        | st.fixed_dictionaries({}, optional=keys)
        | st.fixed_dictionaries(translation, optional={"extra": anything, "color": anything})
    )


JSON_VALUES = st.recursive(SCALARS, json_values, max_leaves=30)
COMPONENTS = st.recursive(SCALARS, components, max_leaves=20)
# what a backend's document holds where it matters: any value in each place
DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "version": JSON_VALUES
        | st.fixed_dictionaries({}, optional=dict.fromkeys(["name", "protocol"], JSON_VALUES)),
        "players": JSON_VALUES
        | st.fixed_dictionaries(
            {}, optional=dict.fromkeys(["max", "online", "sample"], JSON_VALUES)
        ),
        "description": COMPONENTS,
        "favicon": JSON_VALUES,
    },
) | st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=5)
# deep components: "extra" and "with" chains past every cap
DEEP = st.integers(1, 600).map(
    lambda depth: (
        {"description": json.loads('{"translate":"%s","with":[' * depth + '"x"' + "]}" * depth)}
        if depth % 2
        else {"description": json.loads('{"text":"a","extra":[' * depth + "1" + "]}" * depth)}
    )
)
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_answers(payload_bytes: bytes) -> None:
    """The property: a document, or a StatusError; then a valid answer of every kind."""
    try:
        document = parse_status_document(payload_bytes)
    except StatusError:
        return
    assert isinstance(document, dict)
    for protocol in (5, 47, 767):
        for motd in (None, Motd(text="§aHi {server}", max_players=5, protocol_version=-1)):
            rendered = render_status(document, motd, protocol)
            minecraft.encode_status_response(rendered)  # what the cache entry holds
            answer = strict_json(rendered)
            assert isinstance(answer, dict)
            assert isinstance(answer["version"], dict) and "protocol" in answer["version"]
            assert isinstance(answer["players"], dict) and "max" in answer["players"]
            assert "description" in answer
            text, name, protocol_number, online, most = legacy_fields(answer)
            assert len(text) <= MAX_LEGACY_MOTD_CHARS and len(name) <= MAX_LEGACY_VERSION_CHARS
            assert all(isinstance(n, int) for n in (protocol_number, online, most))
            # what connection.py builds from them: both legacy answers encode
            minecraft.encode_legacy_kick(text, protocol_number, name, online, most)
            minecraft.encode_legacy_beta_kick(strip_codes(text), online, most)


@PROPERTY
@given(DOCUMENTS)
def test_any_json_document_gets_a_valid_answer_or_a_status_error(document: Any) -> None:
    check_answers(payload(json.dumps(document)))


@PROPERTY
@given(JSON_VALUES | COMPONENTS)
def test_any_json_value_gets_a_valid_answer_or_a_status_error(value: Any) -> None:
    check_answers(payload(json.dumps(value)))


@PROPERTY
@given(DEEP)
def test_deep_component_chains_get_a_valid_answer_or_a_status_error(document: Any) -> None:
    check_answers(payload(json.dumps(document)))


@PROPERTY
@given(st.binary(max_size=200))
def test_random_bytes_get_a_valid_answer_or_a_status_error(data: bytes) -> None:
    check_answers(data)
    check_answers(payload(data))


@PROPERTY
@given(st.text(alphabet='{}[]",:0123456789.eE-+ tfnrulasNIy\\', max_size=80))
def test_random_json_looking_text_gets_a_valid_answer_or_a_status_error(text: str) -> None:
    check_answers(payload(text))


def test_the_document_is_not_changed_by_rendering() -> None:
    document = parse_status_document(payload(json.dumps({"version": {"name": "x"}, "a": [1]})))
    before = json.dumps(document)
    render_status(document, Motd(version_name="y", max_players=3), 47)
    assert json.dumps(document) == before


# --- the status service: a document it cannot use is a failed fetch ---------------------


def mc_status_backend(answers: list[bytes]) -> Any:
    """A backend answering each status request with the next payload of ``answers``
    (the last one repeated)."""

    async def handler(stream: SocketStream, info: Backend) -> None:
        buffer = bytearray(await stream.receive())
        while isinstance(hs := minecraft.parse_handshake(buffer), NeedData):
            buffer += await stream.receive()
        del buffer[: hs.length]
        while isinstance(minecraft.parse_packet(buffer), NeedData):  # the status request
            buffer += await stream.receive()
        index = min(len(info.received), len(answers) - 1)
        info.received.append(bytes(buffer))
        await stream.send(minecraft.encode_packet(0x00, answers[index]))

    return handler


@asynccontextmanager
async def service_for(
    answers: list[bytes], clock: FakeClock
) -> AsyncIterator[tuple[StatusService, Route]]:
    async with backend(mc_status_backend(answers)) as info:
        registry = Registry()
        route = server("a", "a.example.com", addresses=[info.address], status_cache_ttl=1)
        registry.apply_snapshot("test", [route])
        config = ProxyConfig.model_validate({"status_stale_for": 10, "status_timeout": 2})
        service = StatusService(config, Waker(registry, {}), clock=clock)
        (live,) = registry.table.routes
        yield service, live


@pytest.mark.anyio
async def test_a_too_deep_answer_serves_the_stale_one_then_unreachable() -> None:
    clock = FakeClock()
    deep = payload(nested(500))
    async with service_for([payload(json.dumps(GOOD)), deep], clock) as (service, route):
        with anyio.fail_after(10):
            text, state = await service.answer(route, 765, "a.example.com", 25565, None)
            assert state is StatusState.ONLINE and json.loads(text)["description"] == {
                "text": "backend-A"
            }
            clock.advance(1)  # stale: the refresh gets the deep answer
            text, state = await service.answer(route, 765, "a.example.com", 25565, None)
            assert state is StatusState.STALE
            assert json.loads(text)["description"] == {"text": "backend-A"}
            clock.advance(10)  # past status_stale_for
            text, state = await service.answer(route, 765, "a.example.com", 25565, None)
            assert state is StatusState.UNREACHABLE
            assert "unreachable" in json.loads(text)["description"]["text"]


class _Unrenderable(StatusService):
    """A backend document that passed no parse (a worker's comes over its channel):
    nested past every recursion limit."""

    async def _ping_backend(self, *args: Any) -> dict[str, Any]:
        deep: list[Any] = []
        for _ in range(100_000):
            deep = [deep]
        return {"description": {"text": "x"}, "a": deep}


@pytest.mark.anyio
async def test_a_document_that_cannot_be_rendered_is_a_failed_fetch() -> None:
    registry = Registry()
    registry.apply_snapshot("test", [server("a", "a.example.com", addresses=["127.0.0.1:1"])])
    service = _Unrenderable(ProxyConfig(), Waker(registry, {}))
    (route,) = registry.table.routes
    with anyio.fail_after(10):
        text, state = await service.answer(route, 765, "a.example.com", 25565, None)
    assert state is StatusState.UNREACHABLE
    assert "unreachable" in json.loads(text)["description"]["text"]
    assert service.cached(route, 765, "a.example.com") is None  # nothing stored
    with pytest.raises(StatusError, match="cannot be rendered: RecursionError"):
        service.offer(route, 765, "a.example.com", await service._ping_backend())


@pytest.mark.anyio
async def test_a_too_deep_answer_reaches_the_client_as_unreachable_not_an_empty_reply() -> None:
    async with backend(mc_status_backend([payload(nested(500))])) as info:
        routes = [server("a", "a.example.com", addresses=[info.address])]
        async with running_proxy(routes) as proxy:
            stream = await proxy.connect()
            async with stream:
                hello = minecraft.encode_handshake(765, "a.example.com", 25565, 1)
                ping = minecraft.encode_packet(0x01, b"12345678")
                await stream.send(hello + minecraft.encode_packet(0x00, b"") + ping)
                reply = await receive_all(stream)
            packet = minecraft.parse_packet(reply)
            assert isinstance(packet, minecraft.Packet), reply
            document = parse_status_document(packet.payload)
            assert "unreachable" in document["description"]["text"]
            assert await proxy.on_reactor(lambda ctx: ctx.stats.internal_errors) == 0


@pytest.mark.anyio
async def test_a_legacy_ping_with_a_non_list_translation_argument_gets_its_kick() -> None:
    description = {"translate": "Hi %s", "with": 1, "extra": {"text": "no"}}
    document = {**GOOD, "description": description}
    async with backend(mc_status_backend([payload(json.dumps(document))])) as info:
        routes = [server("a", "a.example.com", addresses=[info.address])]
        async with running_proxy(routes) as proxy:
            stream = await proxy.connect()
            async with stream:
                await stream.send(minecraft.encode_legacy_ping_1_6("a.example.com", 25565))
                reply = await receive_all(stream)
            assert reply[:1] == b"\xff", reply
            fields = reply[3:].decode("utf-16-be").split("\0")
            assert fields[3] == "Hi " and (fields[4], fields[5]) == ("3", "20"), fields
            assert await proxy.on_reactor(lambda ctx: ctx.stats.internal_errors) == 0


def test_infinite_floats_never_reach_an_answer() -> None:
    assert math.isinf(json.loads("1e400"))  # what json.loads alone lets through
    with pytest.raises(StatusError):
        parse_status_document(payload('{"players": {"online": 1e400}}'))


def test_a_long_domain_past_the_strings_cap_gets_the_answer_as_fetched() -> None:
    """[motds.online] with {domain}: the answer is rendered per ping, so a long domain
    can make a document near the 32767-character cap too long to send; the answer as
    fetched is sent then (it encoded), never an internal error."""
    from discoproxy.protocol import minecraft as mc
    from discoproxy.routing import build_table
    from tests.proxy.helpers import server

    motd = "{domain} " * 40
    pinged = server("a", "a.example.com", addresses=["10.0.0.1"], motds={"online": {"text": motd}})
    route = build_table({"test": [pinged]}).by_id["a@test"]
    service = StatusService(ProxyConfig())
    padding = "x" * (mc.MAX_STRING_CHARS - 2000)  # leaves room for a short domain only
    document = {
        "version": {"name": "x", "protocol": 765},
        "players": {"max": 20, "online": 1},
        "favicon": "data:image/png;base64," + padding,
    }
    service.offer(route, 765, "a.example.com", document)
    long_domain = ".".join(["d" * 60] * 4)  # 243 characters, 40 times in the MOTD
    packet = service.cached(route, 765, long_domain)
    assert packet is not None
    parsed = mc.parse_packet(bytearray(packet), max_bytes=1 << 20)
    assert isinstance(parsed, mc.Packet) and b"a.example.com" in parsed.payload
