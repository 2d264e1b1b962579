from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from discoproxy.motd import (
    FAVICON_FORMS,
    FAVICON_PREFIX,
    MAX_FAVICON_BYTES,
    MAX_LEGACY_MOTD_CHARS,
    Motd,
    component_to_legacy,
    downgrade_component,
    legacy_fields,
    nearest_color,
    render_status,
    strip_codes,
    text_to_component,
)
from discoproxy.protocol.minecraft import encode_legacy_beta_kick, encode_legacy_kick


def png(width: int, height: int, extra: bytes = b"") -> bytes:
    """A real RGBA PNG of *width* x *height* transparent pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    rows = b"".join(b"\x00" + b"\x00" * 4 * width for _ in range(height))
    chunks = [chunk(b"IHDR", header)]
    if extra:
        chunks.append(chunk(b"tEXt", extra))
    chunks += [chunk(b"IDAT", zlib.compress(rows)), chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def data_uri(data: bytes) -> str:
    return FAVICON_PREFIX + base64.b64encode(data).decode()


# --- Favicon -------------------------------------------------------------------------


def test_favicon_path_is_normalised_to_a_data_uri(tmp_path: Path) -> None:
    icon = tmp_path / "icon.png"
    icon.write_bytes(png(64, 64))
    motd = Motd(favicon=str(icon))
    assert motd.favicon == data_uri(png(64, 64))


def test_favicon_of_the_wrong_size_names_the_file(tmp_path: Path) -> None:
    icon = tmp_path / "small.png"
    icon.write_bytes(png(32, 32))
    with pytest.raises(ValidationError, match=f"favicon {icon} is 32x32; expected a 64x64 PNG"):
        Motd(favicon=str(icon))


def test_unreadable_favicon_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(ValidationError, match=f"favicon {missing} cannot be read"):
        Motd(favicon=str(missing))


def test_favicon_that_is_not_a_png(tmp_path: Path) -> None:
    icon = tmp_path / "icon.gif"
    icon.write_bytes(b"GIF89a" + b"\x00" * 40)
    with pytest.raises(ValidationError, match="not a PNG"):
        Motd(favicon=str(icon))


def test_favicon_over_the_cap(tmp_path: Path) -> None:
    big = png(64, 64, extra=b"comment\x00" + b"x" * MAX_FAVICON_BYTES)
    icon = tmp_path / "big.png"
    icon.write_bytes(big)
    with pytest.raises(ValidationError, match="cap"):
        Motd(favicon=str(icon))
    with pytest.raises(ValidationError, match="cap"):
        Motd(favicon=data_uri(big))


def test_favicon_data_uri_ok() -> None:
    uri = data_uri(png(64, 64))
    assert Motd(favicon=uri).favicon == uri


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("data:image/gif;base64,R0lGOD", "expected 'data:image/png;base64,'"),
        (FAVICON_PREFIX + "not base64!", "not valid base64"),
        (data_uri(png(16, 64)), "is 16x64; expected a 64x64 PNG"),
        (data_uri(b"\x89PNG\r\n\x1a\n" + b"\x00" * 4), "truncated PNG"),
        (
            data_uri(b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sII", 13, b"IDAT", 64, 64)),
            "first chunk b'IDAT'",
        ),
    ],
)
def test_bad_favicon_data_uri(uri: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Motd(favicon=uri)


def test_a_favicon_error_says_the_accepted_forms_unless_it_names_what_was_expected(
    tmp_path: Path,
) -> None:
    """The forms are motd.py's to say: config, server-file and label errors show the
    validator's message as it is."""
    assert FAVICON_FORMS == (
        "expected the path of a readable 64x64 PNG file or a 'data:image/png;base64,...' URI"
    )
    gif = tmp_path / "icon.gif"
    gif.write_bytes(b"GIF89a" + b"\x00" * 40)
    small = tmp_path / "small.png"
    small.write_bytes(png(32, 32))
    for value, message in [
        (str(tmp_path / "nope.png"), f"favicon {tmp_path}/nope.png cannot be read: "),
        (str(gif), f"favicon {gif} is not a PNG (no PNG signature); {FAVICON_FORMS}"),
        (FAVICON_PREFIX + "!", "favicon data URI is not valid base64: "),
        (str(small), f"favicon {small} is 32x32; expected a 64x64 PNG"),
    ]:
        with pytest.raises(ValidationError) as info:
            Motd(favicon=value)
        (error,) = info.value.errors()
        said = str(error["msg"]).removeprefix("Value error, ")
        assert said.startswith(message)
        assert said.endswith("expected a 64x64 PNG" if value == str(small) else FAVICON_FORMS)
        assert said.count("expected") == 1


# --- Text and model --------------------------------------------------------------------


def test_json_text_is_validated() -> None:
    assert Motd(text='{"text": "hi", "color": "red"}').text == '{"text": "hi", "color": "red"}'
    assert Motd(text='["a", {"text": "b"}]').text is not None
    with pytest.raises(ValidationError, match="not valid JSON: Expecting"):
        Motd(text='{"text": "hi",}')
    # text that only starts with a bracket is legacy text, placeholders too
    assert Motd(text="[EU] Survival").text == "[EU] Survival"
    assert Motd(text="{server} is down").text == "{server} is down"
    assert Motd(text="§r[EU] Survival").text == "§r[EU] Survival"
    assert Motd(text="§aplain §lbold\nline two").text == "§aplain §lbold\nline two"


def test_motd_model_rules() -> None:
    with pytest.raises(ValidationError, match="extra"):
        Motd(txt="typo")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        Motd(max_players=-1)
    with pytest.raises(ValidationError, match="frozen"):
        Motd().text = "x"
    for name, field in Motd.model_fields.items():
        assert field.description, name


def test_text_to_component() -> None:
    assert text_to_component("§aHi\nthere") == {"text": "§aHi\nthere"}
    assert text_to_component('{"text": "x", "bold": true}') == {"text": "x", "bold": True}
    assert text_to_component('["a", "b"]') == ["a", "b"]
    assert text_to_component("[]") == {"text": ""}
    # Text that skipped validation (model_copy) and is not JSON is shown as is.
    assert text_to_component("{server} is down") == {"text": "{server} is down"}


def test_strip_codes() -> None:
    assert strip_codes("§a§lHello §rworld§") == "Hello world"
    assert strip_codes("no codes") == "no codes"


# --- Components ------------------------------------------------------------------------


def test_nearest_color() -> None:
    assert nearest_color("#ff4040") == "red"
    assert nearest_color("#ff0000") == "dark_red"  # plain RGB distance: 85 vs 120
    assert nearest_color("#FF5555") == "red"
    assert nearest_color("#000001") == "black"
    assert nearest_color("#ffaa10") == "gold"


def test_downgrade_replaces_hex_colours_below_1_16() -> None:
    component = {
        "text": "a",
        "color": "#ff5555",
        "extra": [{"text": "b", "color": "#5555ff"}, "c", {"text": "d", "color": "gold"}],
        "with": [{"text": "e", "color": "#55ff55"}],
    }
    down = downgrade_component(component, 734)
    assert down == {
        "text": "a",
        "color": "red",
        "extra": [{"text": "b", "color": "blue"}, "c", {"text": "d", "color": "gold"}],
        "with": [{"text": "e", "color": "green"}],
    }
    assert component["color"] == "#ff5555"  # the input is not modified
    assert downgrade_component([component], 47)[0]["color"] == "red"
    for unknown in (-1, 0):
        assert downgrade_component(component, unknown) == down


@pytest.mark.parametrize("protocol", [735, 767, 10_000])
def test_downgrade_keeps_hex_colours_from_1_16(protocol: int) -> None:
    component = {"text": "a", "color": "#123456", "extra": [{"text": "b", "color": "#abcdef"}]}
    assert downgrade_component(component, protocol) is component


def test_downgrade_drops_malformed_hex_colours() -> None:
    assert downgrade_component({"text": "a", "color": "#12"}, 340) == {"text": "a"}


@pytest.mark.parametrize(
    ("component", "legacy"),
    [
        ("plain", "plain"),
        ({"text": "§aalready legacy"}, "§aalready legacy"),
        ({"text": "Hi", "color": "gold", "bold": True}, "§6§lHi"),
        ({"text": "x", "color": "#ff5555"}, "§cx"),
        (
            {"text": "A", "color": "red", "extra": [{"text": "B", "bold": True}, "C"]},
            "§cA§lB§cC",
        ),
        (
            {"text": "", "extra": [{"text": "A", "color": "red"}, {"text": "B"}]},
            "§cA§rB",
        ),
        (
            {"text": "A", "bold": True, "extra": [{"text": "B", "bold": False}]},
            "§lA§rB",
        ),
        (
            [
                "",
                {"text": "Big ", "color": "gold", "bold": True},
                {"text": "server", "italic": True},
            ],
            "§6§lBig §r§oserver",
        ),
        (
            {
                "text": "",
                "extra": [
                    {
                        "text": "a",
                        "color": "aqua",
                        "extra": [{"text": "b", "underlined": True, "extra": ["c"]}],
                    },
                    {"text": "d", "strikethrough": True, "obfuscated": True},
                ],
            },
            "§ba§nbc§r§k§md",
        ),
        ({"translate": "menu.x", "fallback": "Hello %s!", "with": ["Steve"]}, "Hello Steve!"),
        ({"translate": "a %2$s %1$s %%", "with": [{"text": "x"}, "y"]}, "a y x %"),
        ({"translate": "multiplayer.title"}, "multiplayer.title"),
        ({"keybind": "key.jump"}, "key.jump"),
        ({"text": "A", "color": "red", "extra": [{"text": "B", "color": "reset"}]}, "§cA§rB"),
        ([], ""),
        ({"score": {"name": "x"}}, ""),
    ],
)
def test_component_to_legacy(component: Any, legacy: str) -> None:
    assert component_to_legacy(component) == legacy


def test_component_to_legacy_after_embedded_codes_restates_the_style() -> None:
    component = {"text": "", "extra": [{"text": "§cA", "bold": True}, {"text": "B", "bold": True}]}
    assert component_to_legacy(component) == "§l§cA§r§lB"


def test_component_to_legacy_survives_deep_nesting() -> None:
    component: Any = {"text": "x"}
    for _ in range(5000):
        component = {"text": "", "extra": [component]}
    assert component_to_legacy(component) == ""


# --- Status documents ------------------------------------------------------------------

BACKEND = {
    "version": {"name": "Paper 1.21", "protocol": 767},
    "players": {"max": 20, "online": 3, "sample": [{"name": "Steve", "id": "0" * 32}]},
    "description": {"text": "Backend", "color": "#ff5555"},
    "favicon": "data:image/png;base64,AAAA",
    "enforcesSecureChat": True,
}


def test_render_status_synthesized_uses_the_clients_protocol() -> None:
    document = json.loads(render_status(None, None, 767))
    assert document == {
        "version": {"name": "discoproxy", "protocol": 767},
        "players": {"max": 0, "online": 0, "sample": []},
        "description": {"text": ""},
    }
    document = json.loads(render_status(None, Motd(text="§cOff", protocol_version=-1), 47))
    assert document["version"]["protocol"] == -1
    assert document["description"] == {"text": "§cOff"}


def test_render_status_without_motd_keeps_the_backend_document() -> None:
    assert json.loads(render_status(BACKEND, None, 767)) == BACKEND
    assert BACKEND["description"] == {"text": "Backend", "color": "#ff5555"}  # not modified


@pytest.mark.parametrize(
    ("motd", "path", "value"),
    [
        (Motd(text="§aNew"), ("description",), {"text": "§aNew"}),
        (Motd(text='{"text": "J", "bold": true}'), ("description",), {"text": "J", "bold": True}),
        (Motd(version_name="Maintenance"), ("version", "name"), "Maintenance"),
        (Motd(protocol_version=-1), ("version", "protocol"), -1),
        (Motd(max_players=100), ("players", "max"), 100),
        (Motd(online_players=0), ("players", "online"), 0),
        (Motd(favicon=data_uri(png(64, 64))), ("favicon",), data_uri(png(64, 64))),
    ],
)
def test_render_status_patches_each_field(motd: Motd, path: tuple[str, ...], value: Any) -> None:
    document = json.loads(render_status(BACKEND, motd, 767))
    node: Any = document
    for key in path:
        node = node[key]
    assert node == value
    # Everything else is the backend's.
    expected: Any = json.loads(json.dumps(BACKEND))
    target = expected
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert document == expected


def test_render_status_downgrades_the_description_for_old_clients() -> None:
    assert json.loads(render_status(BACKEND, None, 340))["description"]["color"] == "red"
    assert json.loads(render_status(BACKEND, None, 735))["description"]["color"] == "#ff5555"
    motd = Motd(text='{"text": "x", "color": "#5555ff"}')
    assert json.loads(render_status(None, motd, 47))["description"]["color"] == "blue"


def test_render_status_accepts_a_string_description_and_repairs_a_broken_document() -> None:
    document = json.loads(render_status({"description": "plain §a text"}, None, 5))
    assert document["description"] == "plain §a text"
    assert document["version"] == {"name": "discoproxy", "protocol": 5}
    assert document["players"] == {"max": 0, "online": 0, "sample": []}
    document = json.loads(
        render_status({"version": "junk", "players": None}, Motd(max_players=5), 5)
    )
    assert document["players"]["max"] == 5
    assert document["version"]["protocol"] == 5


@settings(max_examples=200, deadline=None)
@given(text=st.text(), protocol=st.integers(-(2**31), 2**31 - 1), synthesized=st.booleans())
def test_render_status_is_always_a_status_document(
    text: str, protocol: int, synthesized: bool
) -> None:
    # model_copy skips validation, as status.fill() does: any text must still render.
    motd = Motd().model_copy(update={"text": text})
    rendered = render_status(None if synthesized else BACKEND, motd, protocol)
    rendered.encode("utf-8")  # what encode_string does with it
    document = json.loads(rendered)
    assert isinstance(document["version"]["name"], str)
    assert isinstance(document["version"]["protocol"], int)
    assert isinstance(document["players"]["max"], int)
    assert isinstance(document["players"]["online"], int)
    assert "description" in document
    motd_line, *_ = legacy_fields(document)
    assert "\n" not in motd_line


def test_legacy_fields() -> None:
    document = {
        "version": {"name": "Paper 1.21", "protocol": 767},
        "players": {"max": 20, "online": 3},
        "description": {"text": "Line one\n", "color": "gold", "extra": ["two"]},
    }
    assert legacy_fields(document) == ("§6Line one two", "Paper 1.21", 767, 3, 20)
    assert legacy_fields({"description": "§aHi\nthere"}) == ("§aHi there", "", -1, 0, 0)
    assert legacy_fields({"version": {"name": "a\0b", "protocol": "x"}}) == ("", "ab", -1, 0, 0)


# --- Backend documents of any shape (legacy answers) -------------------------------------


@pytest.mark.parametrize(
    ("component", "legacy"),
    [
        ({"translate": "x %s", "with": 1}, "x "),
        ({"translate": "x %s", "with": "abc"}, "x "),  # not its characters as arguments
        ({"translate": "x %s", "with": {"text": "a"}}, "x "),  # not its keys
        ({"translate": "x %s", "with": None, "extra": 5}, "x "),
        ({"text": "a", "extra": "bc"}, "a"),
        ({"text": "a", "extra": {"text": "b"}}, "a"),
        ({"text": ["a"], "color": 7, "bold": "yes", "extra": [None, {}, [], 2]}, '["a"]2'),
        ({"translate": 5, "keybind": ["k"], "fallback": 1}, ""),
        ({"translate": "x", "fallback": None, "with": [[], [1], {"text": 2}]}, "x"),
        ([{"text": "a", "color": "red"}, 1.5, True, None, "b"], "§ca1.5trueb"),
        ({"translate": "%" + "9" * 5000 + "$s|%s", "with": ["a"]}, "|a"),  # past int()'s digits
        ({"translate": "%99999999999999$s|%2$s", "with": ["a", "b"]}, "|b"),
        ({"translate": "%\u0663$s", "with": ["a", "b", "c"]}, "%\u0663$s"),  # ASCII digits only
    ],
)
def test_component_to_legacy_skips_values_of_the_wrong_type(component: Any, legacy: str) -> None:
    assert component_to_legacy(component) == legacy


def test_translation_arguments_nested_past_the_depth_cap_do_not_recurse_forever() -> None:
    component: Any = "x"
    for _ in range(5000):
        component = {"translate": "%s", "with": [component]}
    assert component_to_legacy(component) == ""


def test_a_translation_repeating_its_argument_is_cut_while_it_is_built() -> None:
    component = {"translate": "%1$s" * 3000, "with": ["x" * 3000]}  # 9 M characters
    assert component_to_legacy(component) == "x" * MAX_LEGACY_MOTD_CHARS
    nested: Any = "y" * 100
    for _ in range(40):  # doubling at each level: 2**40 * 100 characters uncut
        nested = {"translate": "%1$s%1$s", "with": [nested]}
    assert component_to_legacy(nested) == "y" * MAX_LEGACY_MOTD_CHARS
    assert component_to_legacy(nested, max_chars=10) == "y" * 10


@pytest.mark.parametrize(
    ("document", "fields"),
    [
        ({"description": "a\ud800b"}, ("a\ufffdb", "", -1, 0, 0)),  # a lone surrogate
        ({"version": {"name": "\udfff" + "n" * 1000}}, ("", "\ufffd" + "n" * 255, -1, 0, 0)),
        ({"players": {"online": 2**31, "max": -(2**31) - 1}}, ("", "", -1, 0, 0)),
        ({"players": {"online": "9" * 5000, "max": 1e300}}, ("", "", -1, 0, 0)),
        (
            {"version": {"protocol": 2**31 - 1}, "players": {"max": "12"}},
            ("", "", 2**31 - 1, 0, 12),
        ),
        ({"description": "z" * 100_000}, ("z" * MAX_LEGACY_MOTD_CHARS, "", -1, 0, 0)),
    ],
)
def test_legacy_fields_are_what_a_legacy_answer_can_carry(
    document: dict[str, Any], fields: tuple[str, str, int, int, int]
) -> None:
    assert legacy_fields(document) == fields
    motd, name, protocol, online, most = fields
    encode_legacy_kick(motd, protocol, name, online, most)
    encode_legacy_beta_kick(strip_codes(motd), online, most)
