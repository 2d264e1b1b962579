"""Sans-IO protocol code: bytes in, values or bytes out.

Rules for this package: stdlib imports only (no sockets, anyio, logging or pydantic);
parsers return a frozen result, :data:`NEED_DATA`, or raise a :class:`ProtocolError`
subclass whose message says what was seen and what was expected; every limit is a
named module constant with its reasoning.
"""

from __future__ import annotations

from ._types import Buffer as Buffer
from .errors import NEED_DATA as NEED_DATA
from .errors import ClientHelloTooLarge as ClientHelloTooLarge
from .errors import HandshakeTooLarge as HandshakeTooLarge
from .errors import Hint as Hint
from .errors import HttpHeadTooLarge as HttpHeadTooLarge
from .errors import InvalidProxyHeader as InvalidProxyHeader
from .errors import LocalProtocolError as LocalProtocolError
from .errors import MalformedClientHello as MalformedClientHello
from .errors import MalformedHandshake as MalformedHandshake
from .errors import MalformedHttpHead as MalformedHttpHead
from .errors import ProtocolError as ProtocolError
from .errors import RemoteProtocolError as RemoteProtocolError
from .http import MAX_HTTP_HEAD_BYTES as MAX_HTTP_HEAD_BYTES
from .http import HttpHead as HttpHead
from .http import encode_response as encode_response
from .http import looks_like_http as looks_like_http
from .http import parse_request_head as parse_request_head
from .minecraft import MAX_HANDSHAKE_PACKET_BYTES as MAX_HANDSHAKE_PACKET_BYTES
from .minecraft import MAX_LEGACY_HOST_UNITS as MAX_LEGACY_HOST_UNITS
from .minecraft import MAX_PACKET_BYTES as MAX_PACKET_BYTES
from .minecraft import MAX_VARINT_BYTES as MAX_VARINT_BYTES
from .minecraft import Handshake as Handshake
from .minecraft import LegacyPing as LegacyPing
from .minecraft import LoginStart as LoginStart
from .minecraft import Packet as Packet
from .minecraft import encode_handshake as encode_handshake
from .minecraft import encode_legacy_beta_kick as encode_legacy_beta_kick
from .minecraft import encode_legacy_kick as encode_legacy_kick
from .minecraft import encode_legacy_ping_1_6 as encode_legacy_ping_1_6
from .minecraft import encode_login_disconnect as encode_login_disconnect
from .minecraft import encode_login_start as encode_login_start
from .minecraft import encode_packet as encode_packet
from .minecraft import encode_pong as encode_pong
from .minecraft import encode_status_response as encode_status_response
from .minecraft import encode_string as encode_string
from .minecraft import encode_varint as encode_varint
from .minecraft import is_legacy_ping as is_legacy_ping
from .minecraft import parse_handshake as parse_handshake
from .minecraft import parse_legacy_ping as parse_legacy_ping
from .minecraft import parse_login_start as parse_login_start
from .minecraft import parse_packet as parse_packet
from .minecraft import read_varint as read_varint
from .minecraft import status_json as status_json
from .minecraft import text_component as text_component
from .names import minecraft_host as minecraft_host
from .names import normalize_host as normalize_host
from .names import strip_port as strip_port
from .proxy_protocol import MAX_PROXY_HEADER_BYTES as MAX_PROXY_HEADER_BYTES
from .proxy_protocol import SIGNATURE_DEADLINE_BYTES as SIGNATURE_DEADLINE_BYTES
from .proxy_protocol import V2_SIGNATURE as V2_SIGNATURE
from .proxy_protocol import ProxyHeader as ProxyHeader
from .proxy_protocol import encode_v1 as encode_v1
from .proxy_protocol import encode_v2 as encode_v2
from .proxy_protocol import encode_v2_local as encode_v2_local
from .proxy_protocol import parse_proxy_header as parse_proxy_header
from .sniff import Sniffed as Sniffed
from .sniff import detect_protocol as detect_protocol
from .tls import ALERT_HANDSHAKE_FAILURE as ALERT_HANDSHAKE_FAILURE
from .tls import ALERT_UNRECOGNIZED_NAME as ALERT_UNRECOGNIZED_NAME
from .tls import MAX_CLIENT_HELLO_BYTES as MAX_CLIENT_HELLO_BYTES
from .tls import ClientHello as ClientHello
from .tls import encode_alert as encode_alert
from .tls import is_tls as is_tls
from .tls import parse_client_hello as parse_client_hello
