"""Route lookup cost against table size: it must stay flat (dict probes, not a scan).

    uv run python -m bench.route_lookup

Prints µs per lookup for exact hits, wildcard hits (3 labels deep) and misses, with
100, 1,000 and 10,000 routes. No assertion: numbers only, as every benchmark here.
"""

from __future__ import annotations

import random
import timeit

from discoproxy.model import ServerDefinition
from discoproxy.routing import RoutingTable, build_table

SIZES = (100, 1_000, 10_000)
LOOKUPS = 200_000


def make_table(size: int) -> RoutingTable:
    servers = [
        ServerDefinition(
            id=f"s{i}",
            domains=(f"s{i}.example.com", f"*.w{i}.example.org"),
            addresses=("10.0.0.1:25565",),  # type: ignore[arg-type]
        )
        for i in range(size)
    ]
    return build_table({"bench": servers})


def measure(table: RoutingTable, names: list[str]) -> float:
    lookup = table.lookup_host
    timer = timeit.Timer(lambda: [lookup(n) for n in names])
    best = min(timer.repeat(repeat=5, number=1))
    return best / len(names) * 1e6


def main() -> None:
    rng = random.Random(1)
    print(f"{'routes':>8} {'exact µs':>10} {'wildcard µs':>12} {'miss µs':>10}")
    for size in SIZES:
        table = make_table(size)
        exact = [f"s{rng.randrange(size)}.example.com" for _ in range(LOOKUPS // 10)]
        wild = [f"a.b.w{rng.randrange(size)}.example.org" for _ in range(LOOKUPS // 10)]
        miss = [f"x{rng.randrange(size)}.example.net" for _ in range(LOOKUPS // 10)]
        row = (measure(table, exact), measure(table, wild), measure(table, miss))
        print(f"{size:>8} {row[0]:>10.3f} {row[1]:>12.3f} {row[2]:>10.3f}")


if __name__ == "__main__":
    main()
