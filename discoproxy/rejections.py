"""Why the data plane refused a connection or a datagram: one fixed set of causes.

Rules for this file:
- A cause is the ``reason`` label of ``discoproxy_connections_rejected_total`` and the
  key of the rejection log's rate limit, so it never carries anything taken from input or
  from the routing table (a route id, an address, a ban's target): a label value per
  route would grow /metrics, and every scraper's memory, with each container ever seen.
  What is particular to one refusal goes into its log line instead.
- The global ``ip_filter`` causes are the texts ``guard.filter_refusal`` answers, so
  ``Rejection(why)`` names them; a server's own filter is one cause whatever the route.
"""

from __future__ import annotations

import enum


class Rejection(enum.StrEnum):
    """A cause of refusal (its value is the metric label)."""

    MAX_CONNECTIONS = "max_connections reached"
    MAX_CONNECTIONS_PER_IP = "max_connections_per_ip reached"
    IP_FILTER_DENIED = "denied by ip_filter"
    IP_FILTER_NOT_ALLOWED = "not in ip_filter allow"
    SERVER_IP_FILTER = "server ip_filter"
    BANNED = "banned"
    PLAYER_NOT_ALLOWED = "player not allowed"
    WAKE_NOT_ALLOWED = "player may not wake the server"
    SERVER_FULL = "server full"
    RATE_LIMIT_CONNECTIONS = "rate_limit connections exceeded"
    RATE_LIMIT_STATUS = "rate_limit status exceeded"
    HANDSHAKE_TIMEOUT = "handshake timeout"
    PROTOCOL_ERROR = "protocol error"
    ACCEPT_FAILED = "accept failed"
    NO_ROUTE = "no route"
    UDP_PACKET_RATE = "per-IP packet rate exceeded"
    UDP_BYTE_RATE = "per-IP byte rate exceeded"
    UDP_MAX_SESSIONS = "udp_max_sessions reached"
    BACKEND_CONNECT_FAILED = "backend connect failed"
