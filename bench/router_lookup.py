"""Route lookup cost against the number of routes (10 → 10,000), exact and prefix routes.

    .venv/bin/python bench/router_lookup.py

Prints µs per lookup for each table size; the lookup cost must stay flat as routes grow
(exact paths are one dict lookup; prefixes one dict lookup per distinct prefix length).
A linear scan over the same routes is measured alongside as the peer.
"""

from __future__ import annotations

import timeit
from functools import partial

from sluicegate.http.router import RouteTable


class Ctx:
    remote_addr = "127.0.0.1"

    def var(self, name: str) -> None:
        return None


def build(count: int) -> tuple[RouteTable, list[tuple[str, bool]]]:
    table = RouteTable()
    routes = []
    for index in range(count):
        if index % 2:
            uri = f"/api/v1/service{index}/items"
            routes.append((uri, False))
        else:
            uri = f"/static/bundle{index}/*"
            routes.append((uri[:-1], True))
        table.add(index, [uri], None, 0, index)
    return table.freeze(), routes


def linear(routes: list[tuple[str, bool]], path: str) -> int | None:
    for index, (uri, prefix) in enumerate(routes):
        if path == uri or (prefix and path.startswith(uri)):
            return index
    return None


def main() -> None:
    ctx = Ctx()
    print(f"{'routes':>7} {'exact µs':>9} {'prefix µs':>10} {'linear exact µs':>16}")
    for count in (10, 100, 1000, 10_000):
        table, routes = build(count)
        exact = f"/api/v1/service{count - 1}/items"
        prefix = f"/static/bundle{count - 2}/app.js"
        assert table.match("GET", exact, "", ctx) == count - 1
        assert table.match("GET", prefix, "", ctx) == count - 2
        number = 20_000
        match = table.match
        t_exact = min(timeit.repeat(partial(match, "GET", exact, "", ctx),
                                    number=number, repeat=5)) / number * 1e6
        t_prefix = min(timeit.repeat(partial(match, "GET", prefix, "", ctx),
                                     number=number, repeat=5)) / number * 1e6
        t_linear = min(timeit.repeat(partial(linear, routes, exact), number=200,
                                     repeat=3)) / 200 * 1e6
        print(f"{count:>7} {t_exact:>9.2f} {t_prefix:>10.2f} {t_linear:>16.1f}")


if __name__ == "__main__":
    main()
