"""``GET /api/routes`` against table size: it must grow linearly (issue 15, item 8).

    uv run python -m bench.api_routes
    uv run python -m bench.api_routes --sizes 10000 --requests 5

An in-process proxy (reactor thread, no listener traffic) and its admin listener on
loopback, with 1,000 and 10,000 routes of two names each (one exact, one wildcard), as
``bench.route_lookup`` builds them. Each request is the whole endpoint: the snapshot
taken on the reactor thread, one row per route, the JSON, the HTTP exchange. The
dashboard polls it every 2 s on the loop that also carries TLS termination and status
pings, so its time is time those wait. Prints ms per request (best and median) and the
body size. No assertion: numbers only, as every benchmark here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial

import anyio
from loguru import logger

from bench.route_lookup import make_table
from discoproxy.admin.client import fetch
from discoproxy.admin.server import Admin, serve_admin
from discoproxy.config import ProxyConfig
from discoproxy.proxy.server import ProxyContext, run_proxy
from discoproxy.routing import Registry

SIZES = (1_000, 10_000)
REQUESTS = 10


async def measure(size: int, requests: int) -> tuple[list[float], int]:
    registry = Registry()
    table = make_table(size)
    registry.apply_snapshot("bench", [route.server for route in table.routes])
    config = ProxyConfig.model_validate({"bind": ["127.0.0.1:0"]})
    ctx = ProxyContext(config, registry)
    admin = Admin(ctx, registry)
    seconds: list[float] = []
    size_bytes = 0
    async with anyio.create_task_group() as tg:
        await tg.start(partial(run_proxy, config, registry, context=ctx))
        host, port = await tg.start(partial(serve_admin, admin, "127.0.0.1:0"))
        url = f"http://{host}:{port}"
        for _ in range(requests + 1):  # the first one warms up
            started = time.perf_counter()
            status, body = await anyio.to_thread.run_sync(fetch, url, "/api/routes")
            seconds.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"/api/routes answered {status}: {body[:200]!r}")
            size_bytes = len(body)
        tg.cancel_scope.cancel()
    return seconds[1:], size_bytes


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.api_routes")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="route counts")
    parser.add_argument("--requests", type=int, default=REQUESTS, help="per size")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    print(f"{'routes':>8} {'best ms':>9} {'median ms':>10} {'body KiB':>9}")
    for size in (int(text) for text in args.sizes.split(",")):
        seconds, body = anyio.run(measure, size, args.requests)
        best, median = min(seconds) * 1000, statistics.median(seconds) * 1000
        print(f"{size:>8} {best:>9.1f} {median:>10.1f} {body / 1024:>9.0f}")


if __name__ == "__main__":
    main()
