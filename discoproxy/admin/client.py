"""Reading a running instance's admin API from the command line (``discoproxy routes``,
``connections``, ``health``): where it is, and one GET with the bearer token."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from discoproxy.config import ProxyConfig, parse_bind

TIMEOUT_S = 5.0


class AdminUnreachable(Exception):
    """The admin API did not answer, or answered with an error; the message says which,
    and ``status`` the HTTP status of an answer (None when nothing answered)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def admin_url(config: ProxyConfig, override: str | None = None) -> str:
    """``--admin``, else ``$DISCOPROXY_ADMIN_URL``, else the config's ``admin.listen``
    (a wildcard bind is reached on loopback)."""
    url = override or os.environ.get("DISCOPROXY_ADMIN_URL")
    if url:
        url = url if "://" in url else f"http://{url}"
        return url.rstrip("/")
    if not config.admin.listen:
        raise AdminUnreachable("the admin listener is off (admin.listen = ''); nothing to ask")
    host, port = parse_bind(config.admin.listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def admin_token(config: ProxyConfig, override: str | None = None) -> str:
    return override or os.environ.get("DISCOPROXY_ADMIN_TOKEN") or config.admin.bearer_token()


def fetch(
    url: str, path: str, token: str = "", method: str = "GET", body: Any = None
) -> tuple[int, bytes]:
    """``method url + path`` (``body``, when given, sent as JSON): (status, body). Raises
    :class:`AdminUnreachable` when nothing answers."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminUnreachable(f"no admin API at {url}: {reason}") from exc


def fetch_json(url: str, path: str, token: str = "", method: str = "GET", body: Any = None) -> Any:
    """The JSON answer of a 200; :class:`AdminUnreachable` with the API's own error text
    otherwise (401 says which token to give)."""
    status, raw = fetch(url, path, token, method, body)
    body = raw
    if status == 401:
        raise AdminUnreachable(
            f"{url}{path}: 401, the admin API wants a token (--token or $DISCOPROXY_ADMIN_TOKEN)",
            status,
        )
    if status != 200:
        try:
            message = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            message = body[:200].decode(errors="replace")
        raise AdminUnreachable(f"{url}{path}: HTTP {status}: {message}", status)
    return json.loads(body)
