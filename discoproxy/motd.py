"""What the server list shows: the :class:`Motd` model and status-document rendering.

Rules for this file:

1. No sockets and no logging: values in, values (or a ``ValueError`` from validation)
   out. The I/O side decides what to do with a bad backend document.
2. Validation happens once, when the config is loaded: a favicon is read, checked and
   stored as its ``data:`` URI, a JSON text is parsed once to report errors early.
3. Rendering never fails on what a backend sent: a malformed status document is patched
   into a valid one, never rejected. Any JSON value may stand anywhere (a number where a
   list belongs, a list where a string does): what is not of the expected type is
   ignored. Documents come as ``status.parse_status_document`` accepts them (strict
   JSON, nesting bounded), so the walks here may recurse once per level.
4. Legacy (pre-1.7) text is bounded (:data:`MAX_LEGACY_MOTD_CHARS`,
   :data:`MAX_LEGACY_VERSION_CHARS`) while it is built, not after: a translation may
   repeat its arguments.

Spec: https://minecraft.wiki/w/Java_Edition_protocol/Server_List_Ping (status document),
https://minecraft.wiki/w/Text_component_format (text components),
https://minecraft.wiki/w/Formatting_codes (legacy ``§`` codes).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A server-list icon is a 64x64 PNG; even uncompressed RGBA that is 16 KiB of pixels
# (plus row filters and chunk headers), so 64 KiB decoded leaves room for metadata while
# keeping every status answer we send (the icon rides in each one) small.
MAX_FAVICON_BYTES = 64 * 1024
FAVICON_SIZE = 64
FAVICON_PREFIX = "data:image/png;base64,"
# What ``favicon`` accepts, said by every favicon error that does not already name what
# was expected (a file that cannot be read, a data URI that is not base64).
FAVICON_FORMS = (
    f"expected the path of a readable {FAVICON_SIZE}x{FAVICON_SIZE} PNG file or a "
    f"'{FAVICON_PREFIX}...' URI"
)

# First protocol version whose clients render "#rrggbb" colours: 1.16 (20w17a onwards).
HEX_COLOR_PROTOCOL = 735

SECTION = "\u00a7"

# A pre-1.7 answer is one UTF-16 string of at most 0xFFFF units (a 16-bit length,
# minecraft.MAX_LEGACY_KICK_UNITS) and the server list shows a line of its MOTD. These
# caps keep every legacy answer far under that limit (astral characters are two units)
# whatever the backend's document holds, and bound the work of flattening one: a
# translation that repeats an argument ("%1$s%1$s...", "with" nested in "with") would
# otherwise grow a 256 KiB document into gigabytes.
MAX_LEGACY_MOTD_CHARS = 8192
MAX_LEGACY_VERSION_CHARS = 256
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR = struct.Struct(">I4sII")  # chunk length, chunk type, width, height
_MAX_FAVICON_BASE64 = 4 * -(-MAX_FAVICON_BYTES // 3)

# https://minecraft.wiki/w/Formatting_codes#Color_codes: name -> (code, RGB).
NAMED_COLORS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "black": ("0", (0x00, 0x00, 0x00)),
    "dark_blue": ("1", (0x00, 0x00, 0xAA)),
    "dark_green": ("2", (0x00, 0xAA, 0x00)),
    "dark_aqua": ("3", (0x00, 0xAA, 0xAA)),
    "dark_red": ("4", (0xAA, 0x00, 0x00)),
    "dark_purple": ("5", (0xAA, 0x00, 0xAA)),
    "gold": ("6", (0xFF, 0xAA, 0x00)),
    "gray": ("7", (0xAA, 0xAA, 0xAA)),
    "dark_gray": ("8", (0x55, 0x55, 0x55)),
    "blue": ("9", (0x55, 0x55, 0xFF)),
    "green": ("a", (0x55, 0xFF, 0x55)),
    "aqua": ("b", (0x55, 0xFF, 0xFF)),
    "red": ("c", (0xFF, 0x55, 0x55)),
    "light_purple": ("d", (0xFF, 0x55, 0xFF)),
    "yellow": ("e", (0xFF, 0xFF, 0x55)),
    "white": ("f", (0xFF, 0xFF, 0xFF)),
}
# Component boolean key -> legacy format code, in the order codes are emitted.
FORMAT_CODES: dict[str, str] = {
    "obfuscated": "k",
    "bold": "l",
    "strikethrough": "m",
    "underlined": "n",
    "italic": "o",
}
RESET_CODE = "r"

_HEX_COLOR = re.compile(r"#[0-9a-fA-F]{6}")
_CODE_PAIR = re.compile(f"{SECTION}.?", re.DOTALL)
# Java's Formatter syntax as Minecraft's TranslatableContents reads it: ASCII digits only
_FORMAT_ARG = re.compile(r"%(?:([0-9]+)\$)?([sd%])")
# a longer argument index names no argument (and Python's int() refuses 4300 digits)
_MAX_ARG_INDEX_DIGITS = 9
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

# A player count's largest value: a Java int, which is what Minecraft clients read the
# status answer's "online" and "max" into (a larger one breaks their server list).
MAX_PLAYER_COUNT = 2**31 - 1


class Motd(BaseModel):
    """What one server-list entry shows. Every field left unset keeps the backend's value
    (or the default when discoproxy answers by itself)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    text: str | None = Field(
        default=None,
        description=(
            "The message of the day. Either legacy text with § formatting codes "
            '(e.g. "§aWelcome\\n§7second line"; "\\n" starts the second line), or a JSON '
            'text component: a string starting with "{" or "[" is parsed as JSON, e.g. '
            '\'{"text": "Welcome", "color": "#ff8800"}\'. Hex colours are turned into the '
            "nearest named colour for clients older than 1.16. To show plain text that "
            'starts with "{" or "[", begin it with "§r".'
        ),
    )
    version_name: str | None = Field(
        default=None,
        description=(
            'The version text the client shows (e.g. "Paper 1.21"). Clients display it '
            "in place of the ping bars when the protocol version differs from theirs."
        ),
    )
    max_players: int | None = Field(
        default=None,
        ge=0,
        le=MAX_PLAYER_COUNT,
        description='The "max" of the "online/max" player count.',
    )
    online_players: int | None = Field(
        default=None,
        ge=0,
        le=MAX_PLAYER_COUNT,
        description='The "online" of the "online/max" player count.',
    )
    protocol_version: int | None = Field(
        default=None,
        description=(
            "The protocol number answered to the client. Unset: the backend's, or when "
            "discoproxy answers by itself the client's own, so the server shows as "
            "joinable. -1 (or any number no client has) makes clients show version_name "
            "in red as incompatible."
        ),
    )
    favicon: str | None = Field(
        default=None,
        description=(
            "The server icon: a path to a 64x64 PNG file, or a "
            '"data:image/png;base64,..." URI. Checked when the config is loaded (PNG, '
            f"64x64, at most {MAX_FAVICON_BYTES // 1024} KiB) and stored as a data URI."
        ),
    )

    @field_validator("text")
    @classmethod
    def _check_text(cls, value: str | None) -> str | None:
        if value is None or not _looks_like_json(value):
            return value
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"text starts with {value[0]!r} so it is read as a JSON text component, but "
                f"it is not valid JSON: {exc}; to show it as plain text, start it with §r"
            ) from None
        if not isinstance(parsed, dict | list):
            raise ValueError(f"JSON text must be an object or an array, not {type(parsed)}")
        return value

    @field_validator("favicon")
    @classmethod
    def _check_favicon(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return _favicon(value)
        except ValueError as exc:
            message = str(exc)
            if "expected" not in message:
                message += f"; {FAVICON_FORMS}"
            raise ValueError(message) from None


def _favicon(value: str) -> str:
    """*value* (a PNG file's path or a data URI) as a checked data URI."""
    if value.startswith("data:"):
        return favicon_data_uri(_decode_data_uri(value), "favicon data URI")
    path = Path(value).expanduser()
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FAVICON_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"favicon {value} cannot be read: {exc.strerror or exc}") from None
    return favicon_data_uri(data, f"favicon {value}")


# JSON text starts like this; "{server} is down" or "[EU] Survival" are legacy text
_JSON_STARTS = re.compile(r'^\s*(?:\{\s*"|\[\s*[\[{"]|\{\s*\}|\[\s*\])')


def _looks_like_json(text: str) -> bool:
    return _JSON_STARTS.match(text) is not None


def _decode_data_uri(value: str) -> bytes:
    if not value.startswith(FAVICON_PREFIX):
        raise ValueError(
            f"favicon data URI starts with {value[: len(FAVICON_PREFIX)]!r};"
            f" expected {FAVICON_PREFIX!r}"
        )
    encoded = value[len(FAVICON_PREFIX) :]
    if len(encoded) > _MAX_FAVICON_BASE64:
        raise ValueError(
            f"favicon data URI carries {len(encoded)} base64 characters, over the"
            f" {MAX_FAVICON_BYTES}-byte cap"
        )
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"favicon data URI is not valid base64: {exc}") from None


def favicon_data_uri(data: bytes, what: str = "favicon") -> str:
    """Check *data* is a 64x64 PNG within :data:`MAX_FAVICON_BYTES`; return its data URI.

    Raises ``ValueError`` naming *what* (e.g. ``"favicon /srv/icon.png"``).
    """
    if len(data) > MAX_FAVICON_BYTES:
        raise ValueError(f"{what} is over the {MAX_FAVICON_BYTES}-byte cap")
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError(f"{what} is not a PNG (no PNG signature)")
    if len(data) < len(_PNG_SIGNATURE) + _IHDR.size:
        raise ValueError(f"{what} is a truncated PNG ({len(data)} bytes)")
    _, chunk, width, height = _IHDR.unpack_from(data, len(_PNG_SIGNATURE))
    if chunk != b"IHDR":
        raise ValueError(f"{what} is not a valid PNG: first chunk {chunk!r}, expected b'IHDR'")
    if (width, height) != (FAVICON_SIZE, FAVICON_SIZE):
        raise ValueError(
            f"{what} is {width}x{height}; expected a {FAVICON_SIZE}x{FAVICON_SIZE} PNG"
        )
    return FAVICON_PREFIX + base64.b64encode(data).decode("ascii")


# --- Text components ---------------------------------------------------------------


def text_to_component(text: str) -> Any:
    """A :attr:`Motd.text` as a JSON text component (dict, list or str).

    JSON text is parsed; legacy text becomes ``{"text": text}`` (vanilla clients render
    ``§`` codes inside ``"text"``). Text that looks like JSON but does not parse (it
    skipped validation) is shown as legacy text.
    """
    if _looks_like_json(text):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return {"text": text}
        if isinstance(parsed, dict) or (isinstance(parsed, list) and parsed):
            return parsed
        return {"text": "" if parsed == [] else text}
    return {"text": text}


def strip_codes(text: str) -> str:
    """*text* without ``§x`` formatting pairs (a trailing lone ``§`` is dropped too)."""
    return _CODE_PAIR.sub("", text)


def nearest_color(hex_color: str) -> str:
    """The named colour closest (in RGB) to ``"#rrggbb"``."""
    value = int(hex_color[1:], 16)
    rgb = (value >> 16, (value >> 8) & 0xFF, value & 0xFF)
    return min(
        NAMED_COLORS,
        key=lambda name: sum((a - b) ** 2 for a, b in zip(NAMED_COLORS[name][1], rgb, strict=True)),
    )


def downgrade_component(component: Any, protocol: int) -> Any:
    """*component* with ``"#rrggbb"`` colours replaced by the nearest named colour for
    clients before 1.16 (:data:`HEX_COLOR_PROTOCOL`); unknown versions (``<= 0``) too.

    Returns *component* itself when nothing needs changing, a new value otherwise.
    """
    if protocol >= HEX_COLOR_PROTOCOL:
        return component
    return _downgrade(component)


def _downgrade(node: Any) -> Any:
    if isinstance(node, list):
        return [_downgrade(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "color" and isinstance(value, str) and value.startswith("#"):
            if _HEX_COLOR.fullmatch(value):
                out[key] = nearest_color(value)
            # else: a malformed hex colour an old client cannot read either: drop it
        else:
            out[key] = _downgrade(value)
    return out


_Style = tuple[str | None, frozenset[str]]  # legacy colour code, format codes
_NO_STYLE: _Style = (None, frozenset())
_UNKNOWN_STYLE: _Style = ("?", frozenset())  # after text carrying its own § codes


def component_to_legacy(component: Any, max_chars: int = MAX_LEGACY_MOTD_CHARS) -> str:
    """Flatten a JSON text component into legacy text with ``§`` codes.

    Handles strings, lists (the first element is the parent of the rest), ``text``,
    ``translate`` (its ``fallback``, else the key, with ``%s`` arguments filled in as
    plain text), ``keybind``, ``extra``, named and hex colours (hex -> nearest named) and
    the five formats. Styles are inherited from parents; ``§r`` is emitted when a
    sibling drops a colour or format. Good enough for a server list, not a renderer.

    Values of the wrong type are skipped (a ``with`` or ``extra`` that is not a list, a
    ``color`` that is not a string). The result has at most *max_chars* characters.
    """
    return _to_legacy(component, 0, _Budget(max_chars))[:max_chars]


# Text a flattening may build per character of its result: translation arguments are
# built before they are placed, and a placed one is built again at every level above.
# A real MOTD builds each character once or twice.
_WORK_PER_RESULT_CHAR = 4


class _Budget:
    """What one flattening may still build, shared by its nested translation arguments:
    every piece is cut at ``cap`` (the result's cap) and, once ``left`` is spent, no
    further node is read (the nodes already being read finish, each piece still cut), so
    the work stays bounded whatever the document repeats."""

    __slots__ = ("cap", "left")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.left = cap * _WORK_PER_RESULT_CHAR

    def spend(self, text: str) -> str:
        text = text[: self.cap]
        self.left -= len(text)
        return text


def _to_legacy(component: Any, depth: int, budget: _Budget) -> str:
    segments: list[tuple[str, _Style]] = []
    _flatten(component, _NO_STYLE, segments, depth, budget)
    out: list[str] = []
    current = _NO_STYLE
    for text, style in segments:
        if not text:
            continue
        if style != current:
            out.append(_style_codes(current, style))
            current = style
        out.append(text)
        if SECTION in text:
            current = _UNKNOWN_STYLE
    return "".join(out)


# Deeper nesting than any real MOTD; stops a hostile backend document from recursing
# us into a RecursionError.
_MAX_COMPONENT_DEPTH = 64


def _flatten(
    node: Any, inherited: _Style, out: list[tuple[str, _Style]], depth: int, budget: _Budget
) -> None:
    if depth > _MAX_COMPONENT_DEPTH or budget.left <= 0:
        return
    if isinstance(node, str):
        out.append((budget.spend(node), inherited))
        return
    if isinstance(node, list):
        if not node:
            return
        parent = node[0]
        _flatten(parent, inherited, out, depth + 1, budget)
        style = _own_style(parent, inherited) if isinstance(parent, dict) else inherited
        for child in itertools.islice(node, 1, None):
            _flatten(child, style, out, depth + 1, budget)
        return
    if not isinstance(node, dict):
        if isinstance(node, int | float | bool):
            out.append((budget.spend(json.dumps(node)), inherited))
        return
    style = _own_style(node, inherited)
    out.append((budget.spend(_own_text(node, depth, budget)), style))
    extra = node.get("extra")
    if isinstance(extra, list):
        for child in extra:
            _flatten(child, style, out, depth + 1, budget)


def _own_text(node: Mapping[str, Any], depth: int, budget: _Budget) -> str:
    if "text" in node:
        text = node["text"]
        return text if isinstance(text, str) else json.dumps(text)
    if isinstance(node.get("translate"), str):
        pattern = node.get("fallback")
        if not isinstance(pattern, str):
            pattern = node["translate"]
        args = node.get("with")
        plain = [
            strip_codes(_to_legacy(arg, depth + 1, budget))
            for arg in (args if isinstance(args, list) else ())
        ]
        return _fill_translation(pattern, plain, budget.cap)
    if isinstance(node.get("keybind"), str):
        return str(node["keybind"])
    return ""


def _fill_translation(pattern: str, args: list[str], max_chars: int) -> str:
    """*pattern* with its ``%s``, ``%d``, ``%N$s`` filled from *args* (missing ones
    empty), cut at *max_chars*: built piece by piece, so a pattern that repeats a long
    argument costs no more than the cut."""
    position = itertools.count()
    pieces: list[str] = []
    size = 0
    last = 0
    for match in _FORMAT_ARG.finditer(pattern):
        if size >= max_chars:
            break
        digits = match.group(1)
        if match.group(2) == "%":
            value = "%"
        else:
            if digits is None:
                index = next(position)
            elif len(digits) <= _MAX_ARG_INDEX_DIGITS:
                index = int(digits) - 1
            else:
                index = -1
            value = args[index] if 0 <= index < len(args) else ""
        for piece in (pattern[last : match.start()], value):
            pieces.append(piece[: max_chars - size])
            size += len(pieces[-1])
        last = match.end()
    pieces.append(pattern[last:][: max(max_chars - size, 0)])
    return "".join(pieces)


def _own_style(node: Mapping[str, Any], inherited: _Style) -> _Style:
    color, formats = inherited
    value = node.get("color")
    if isinstance(value, str):
        if value == "reset":
            color = None
        elif _HEX_COLOR.fullmatch(value):
            color = NAMED_COLORS[nearest_color(value)][0]
        elif value in NAMED_COLORS:
            color = NAMED_COLORS[value][0]
    changed = set(formats)
    for key, code in FORMAT_CODES.items():
        flag = node.get(key)
        if flag is True:
            changed.add(code)
        elif flag is False:
            changed.discard(code)
    return color, frozenset(changed)


def _style_codes(current: _Style, target: _Style) -> str:
    """The codes that take legacy text from *current* style to *target*."""
    color, formats = target
    if color == current[0] and formats >= current[1]:
        return "".join(SECTION + code for code in _ordered(formats - current[1]))
    # A colour code resets formats in legacy text; without a colour only §r does.
    head = SECTION + (color if color is not None else RESET_CODE)
    return head + "".join(SECTION + code for code in _ordered(formats))


def _ordered(formats: frozenset[str]) -> list[str]:
    return [code for code in FORMAT_CODES.values() if code in formats]


# --- Status documents ----------------------------------------------------------------


def _default_status(protocol: int) -> dict[str, Any]:
    return {
        "version": {"name": "discoproxy", "protocol": protocol},
        "players": {"max": 0, "online": 0, "sample": []},
        "description": {"text": ""},
    }


def _section(document: dict[str, Any], key: str) -> dict[str, Any]:
    value = document.get(key)
    if not isinstance(value, dict):
        value = {}
        document[key] = value
    return value


def render_status(base: Mapping[str, Any] | None, motd: Motd | None, protocol: int) -> str:
    """The JSON of a status response for a client speaking *protocol*.

    *base* is the backend's parsed status document, or ``None`` to synthesize one (whose
    version protocol is then the client's own unless *motd* sets it). The fields *motd*
    sets replace the backend's; the description is downgraded for the client's version
    (:func:`downgrade_component`).
    """
    if base is None:
        document = _default_status(protocol)
    else:
        # copies of what is written (the top object, "version", "players"); the rest is
        # only read (the downgrade builds new values), so *base* is never changed
        document = dict(base)
        defaults = _default_status(protocol)
        for key in ("version", "players"):
            value = document.get(key)
            section = dict(value) if isinstance(value, dict) else {}
            for field, default in defaults[key].items():
                section.setdefault(field, default)
            document[key] = section
        document.setdefault("description", defaults["description"])
    version = _section(document, "version")
    players = _section(document, "players")
    if motd is not None:
        if motd.text is not None:
            document["description"] = text_to_component(motd.text)
        if motd.version_name is not None:
            version["name"] = motd.version_name
        if motd.protocol_version is not None:
            version["protocol"] = motd.protocol_version
        if motd.max_players is not None:
            players["max"] = motd.max_players
        if motd.online_players is not None:
            players["online"] = motd.online_players
        if motd.favicon is not None:
            document["favicon"] = motd.favicon
    document["description"] = downgrade_component(document["description"], protocol)
    return json.dumps(document)


def _as_int(value: Any, default: int) -> int:
    """*value* as the int32 a legacy client reads (``Integer.parseInt``), else *default*."""
    number = default
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and len(value) <= 16:
        try:
            number = int(value)
        except ValueError:
            return default
    return number if _INT32_MIN <= number <= _INT32_MAX else default


def _legacy_text(text: str, max_chars: int) -> str:
    """*text* as a legacy answer can carry it: one line, no NUL (the 1.4+ separator), no
    lone surrogate (not UTF-16), at most *max_chars* characters."""
    text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").replace("\0", "")
    return _LONE_SURROGATE.sub("\ufffd", text)[:max_chars]


def legacy_fields(status: Mapping[str, Any]) -> tuple[str, str, int, int, int]:
    """``(motd, version name, protocol, online, max)`` of a status document, for the
    legacy (pre-1.7) ping answers.

    The MOTD is flattened to one line of legacy text (newlines become spaces); NULs,
    the separator of the 1.4+ answer, are removed from the texts, lone surrogates
    replaced, and each text cut to its cap (:data:`MAX_LEGACY_MOTD_CHARS`,
    :data:`MAX_LEGACY_VERSION_CHARS`). Numbers outside int32 give the default.
    """
    version = status.get("version")
    version = version if isinstance(version, Mapping) else {}
    players = status.get("players")
    players = players if isinstance(players, Mapping) else {}
    motd = _legacy_text(component_to_legacy(status.get("description", "")), MAX_LEGACY_MOTD_CHARS)
    name = version.get("name")
    name = _legacy_text(name if isinstance(name, str) else "", MAX_LEGACY_VERSION_CHARS)
    return (
        motd,
        name,
        _as_int(version.get("protocol"), -1),
        _as_int(players.get("online"), 0),
        _as_int(players.get("max"), 0),
    )
