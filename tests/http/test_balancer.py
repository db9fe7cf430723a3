import random
from collections import Counter

import pytest

from sluicegate.http.balancer import (
    EwmaBalancer,
    UpstreamNode,
    make_balancer,
)


class Ctx:
    """The runtime contract: nginx-style variables and the consumer name."""

    def __init__(self, consumer_name: str | None = None, **variables: str) -> None:
        self.consumer_name = consumer_name
        self._vars = variables

    def var(self, name: str) -> str | None:
        return self._vars.get(name)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def nodes_with(*weights: int) -> list[UpstreamNode]:
    return [UpstreamNode(f"10.0.0.{i + 1}", 80, w) for i, w in enumerate(weights)]


def picks(balancer, count: int, ctx=None) -> Counter:
    ctx = ctx or Ctx(remote_addr="192.0.2.1")
    return Counter(balancer.pick(ctx).address for _ in range(count))


def chash_owner(balancer, key: str) -> str:
    return balancer.pick(Ctx(remote_addr=key)).address


# --- nodes and construction ---------------------------------------------------------------


def test_node_address_joins_host_and_port_and_brackets_ipv6():
    assert UpstreamNode("10.0.0.1", 8080, 1).address == "10.0.0.1:8080"
    assert UpstreamNode("::1", 80, 1).address == "[::1]:80"
    assert UpstreamNode("[::1]", 80, 1).address == "[::1]:80"
    assert UpstreamNode("example.com", 443, 1).priority == 0


def test_unknown_balancer_type_is_rejected():
    with pytest.raises(ValueError, match="unknown balancer type 'random'"):
        make_balancer("random", nodes_with(1))


def test_empty_node_list_is_rejected():
    with pytest.raises(ValueError, match="at least one node"):
        make_balancer("roundrobin", [])


def test_negative_weight_is_rejected():
    with pytest.raises(ValueError, match="negative weight"):
        make_balancer("roundrobin", nodes_with(1, -1))


def test_chash_unknown_hash_on_or_missing_key_is_rejected():
    with pytest.raises(ValueError, match="unknown chash hash_on 'body'"):
        make_balancer("chash", nodes_with(1, 1), hash_on="body", key="x")
    with pytest.raises(ValueError, match="needs a key"):
        make_balancer("chash", nodes_with(1, 1), hash_on="header", key=None)
    # Rejected even on the single-node fast path, so adding a node cannot break config.
    with pytest.raises(ValueError, match="needs a key"):
        make_balancer("chash", nodes_with(1), hash_on="vars")
    with pytest.raises(ValueError, match="no \\$variable"):
        make_balancer("chash", nodes_with(1, 1), hash_on="vars_combinations", key="host")


@pytest.mark.parametrize("kind", ["roundrobin", "chash", "least_conn", "ewma"])
def test_single_node_upstream_always_returns_its_node(kind):
    node = UpstreamNode("10.0.0.1", 80, 3)
    balancer = make_balancer(kind, [node], key="remote_addr")
    ctx = Ctx(remote_addr="192.0.2.1")
    assert all(balancer.pick(ctx) is node for _ in range(10))
    assert balancer.pick(ctx, {node}) is None
    balancer.on_request_start(node)
    balancer.on_request_end(node, 0.01, failed=False)


@pytest.mark.parametrize("kind", ["roundrobin", "chash", "least_conn", "ewma"])
def test_zero_weight_node_never_picked(kind):
    nodes = nodes_with(0, 1, 2)
    balancer = make_balancer(kind, nodes, key="remote_addr")
    seen = Counter()
    for i in range(3000):
        node = balancer.pick(Ctx(remote_addr=f"198.51.100.{i % 250}/{i}"))
        balancer.on_request_start(node)
        balancer.on_request_end(node, 0.01, failed=False)
        seen[node.address] += 1
    assert "10.0.0.1:80" not in seen
    assert set(seen) == {"10.0.0.2:80", "10.0.0.3:80"}


@pytest.mark.parametrize("kind", ["roundrobin", "chash", "least_conn", "ewma"])
def test_all_zero_weight_upstream_picks_nothing(kind):
    balancer = make_balancer(kind, nodes_with(0, 0), key="remote_addr")
    assert balancer.pick(Ctx(remote_addr="192.0.2.1")) is None


@pytest.mark.parametrize("kind", ["roundrobin", "chash", "least_conn", "ewma"])
def test_pick_returns_none_when_all_excluded(kind):
    nodes = nodes_with(1, 2, 3)
    balancer = make_balancer(kind, nodes, key="remote_addr")
    assert balancer.pick(Ctx(remote_addr="192.0.2.1"), set(nodes)) is None


@pytest.mark.parametrize("kind", ["roundrobin", "chash", "least_conn", "ewma"])
def test_retries_visit_every_node_once(kind):
    nodes = nodes_with(1, 2, 3, 4)
    balancer = make_balancer(kind, nodes, key="remote_addr")
    ctx = Ctx(remote_addr="192.0.2.7")
    tried: set[UpstreamNode] = set()
    for _ in nodes:
        node = balancer.pick(ctx, tried)
        assert node is not None and node not in tried
        tried.add(node)
    assert balancer.pick(ctx, tried) is None


# --- roundrobin ---------------------------------------------------------------------------


def test_roundrobin_smooth_weighted_sequence():
    a, b, c = (UpstreamNode(h, 80, w) for h, w in (("a", 5), ("b", 1), ("c", 1)))
    balancer = make_balancer("roundrobin", [a, b, c])
    sequence = [balancer.pick(Ctx()).host for _ in range(14)]
    assert sequence == list("aabacaa") * 2


def test_roundrobin_distribution_matches_weights():
    balancer = make_balancer("roundrobin", nodes_with(1, 2, 3, 4))
    counts = picks(balancer, 10_000)
    assert counts == {
        "10.0.0.1:80": 1000,
        "10.0.0.2:80": 2000,
        "10.0.0.3:80": 3000,
        "10.0.0.4:80": 4000,
    }


def test_roundrobin_skips_excluded_nodes():
    nodes = nodes_with(5, 1, 1)
    balancer = make_balancer("roundrobin", nodes)
    excluded = {nodes[0]}
    counts = Counter(balancer.pick(Ctx(), excluded).address for _ in range(1000))
    assert counts == {"10.0.0.2:80": 500, "10.0.0.3:80": 500}
    # The excluded node's turns resume afterwards in proportion to its weight.
    assert picks(balancer, 7000)["10.0.0.1:80"] == pytest.approx(5000, abs=10)


# --- chash --------------------------------------------------------------------------------


def test_chash_same_key_same_node():
    balancer = make_balancer("chash", nodes_with(1, 1, 1, 1), key="remote_addr")
    for i in range(200):
        key = f"203.0.113.{i}"
        assert len({chash_owner(balancer, key) for _ in range(5)}) == 1


def test_chash_same_ring_whatever_the_node_order():
    nodes = nodes_with(1, 2, 3, 1, 1)
    forward = make_balancer("chash", nodes, key="remote_addr")
    shuffled = nodes[:]
    random.Random(7).shuffle(shuffled)
    backward = make_balancer("chash", shuffled, key="remote_addr")
    keys = [f"user-{i}" for i in range(2000)]
    assert [chash_owner(forward, k) for k in keys] == [chash_owner(backward, k) for k in keys]


def test_chash_spreads_keys_by_weight():
    balancer = make_balancer("chash", nodes_with(1, 1, 2, 4), key="remote_addr")
    keys = 40_000
    counts = Counter(
        chash_owner(balancer, f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}") for i in range(keys)
    )
    expected = {
        "10.0.0.1:80": 1 / 8,
        "10.0.0.2:80": 1 / 8,
        "10.0.0.3:80": 2 / 8,
        "10.0.0.4:80": 4 / 8,
    }
    for address, share in expected.items():
        assert counts[address] / keys == pytest.approx(share, rel=0.15), counts


def test_chash_weight_gcd_does_not_change_the_ring():
    keys = [f"k{i}" for i in range(2000)]
    small = make_balancer("chash", nodes_with(1, 2, 3), key="remote_addr")
    large = make_balancer("chash", nodes_with(100, 200, 300), key="remote_addr")
    assert [chash_owner(small, k) for k in keys] == [chash_owner(large, k) for k in keys]


def test_chash_remove_node_remaps_only_its_keys():
    nodes = nodes_with(1, 2, 1, 3, 1)
    before = make_balancer("chash", nodes, key="remote_addr")
    removed = nodes[1]
    after = make_balancer("chash", [n for n in nodes if n is not removed], key="remote_addr")
    moved = 0
    for i in range(5000):
        key = f"session-{i}"
        old, new = chash_owner(before, key), chash_owner(after, key)
        if old == removed.address:
            moved += 1
            assert new != removed.address
        else:
            assert new == old
    assert moved > 0


def test_chash_large_upstream_keeps_weights_and_minimal_remapping():
    # 450 weight units * 160 points exceed the ring cap, so points per unit are reduced.
    nodes = [UpstreamNode(f"10.1.{i >> 8}.{i & 255}", 80, 1 + i % 2) for i in range(300)]
    before = make_balancer("chash", nodes, key="remote_addr")
    heavy = {n.address for n in nodes if n.weight == 2}
    keys = [f"user-{i}" for i in range(30_000)]
    owners = [chash_owner(before, k) for k in keys]
    assert sum(o in heavy for o in owners) / len(keys) == pytest.approx(2 / 3, rel=0.05)
    removed = nodes[17]
    after = make_balancer("chash", [n for n in nodes if n is not removed], key="remote_addr")
    for key, old in zip(keys, owners, strict=True):
        if old != removed.address:
            assert chash_owner(after, key) == old


def test_chash_retry_walks_to_the_next_node_on_the_ring():
    nodes = nodes_with(1, 1, 1, 1)
    balancer = make_balancer("chash", nodes, key="remote_addr")
    for i in range(100):
        ctx = Ctx(remote_addr=f"key-{i}")
        first = balancer.pick(ctx)
        second = balancer.pick(ctx, {first})
        assert second is not first
        # Deterministic too: every instance retries the same key on the same node.
        assert balancer.pick(ctx, {first}) is second


def test_chash_hash_on_header_cookie_consumer_and_vars_combinations():
    nodes = nodes_with(1, 1, 1, 1, 1, 1, 1, 1)

    def owners(hash_on, key, make_ctx):
        balancer = make_balancer("chash", nodes, hash_on=hash_on, key=key)
        return [balancer.pick(make_ctx(i)).address for i in range(300)]

    # Each source of the key must route exactly like the same string taken from remote_addr.
    by_addr = owners("vars", "remote_addr", lambda i: Ctx(remote_addr=f"v{i}"))
    assert owners("vars", "arg_id", lambda i: Ctx(arg_id=f"v{i}", remote_addr="x")) == by_addr
    assert (
        owners("header", "X-User-Id", lambda i: Ctx(http_x_user_id=f"v{i}", remote_addr="x"))
        == by_addr
    )
    assert owners("cookie", "sid", lambda i: Ctx(cookie_sid=f"v{i}", remote_addr="x")) == by_addr
    assert (
        owners("consumer", None, lambda i: Ctx(consumer_name=f"v{i}", remote_addr="x")) == by_addr
    )
    assert (
        owners(
            "vars_combinations", "$host$uri", lambda i: Ctx(host="v", uri=f"{i}", remote_addr="x")
        )
        == by_addr
    )
    assert (
        owners("vars_combinations", "v${arg_n}", lambda i: Ctx(arg_n=f"{i}", remote_addr="x"))
        == by_addr
    )
    # A missing variable in a combination counts as empty.
    assert (
        owners("vars_combinations", "$uri$host", lambda i: Ctx(uri=f"v{i}", remote_addr="x"))
        == by_addr
    )
    # The key really comes from the configured source, not from remote_addr.
    assert (
        len(
            set(
                owners(
                    "header", "X-User-Id", lambda i: Ctx(http_x_user_id=f"v{i}", remote_addr="x")
                )
            )
        )
        > 1
    )


@pytest.mark.parametrize(
    ("hash_on", "key", "present"),
    [
        ("vars", "arg_id", {"arg_id": ""}),
        ("header", "X-User-Id", {}),
        ("cookie", "sid", {}),
        ("consumer", None, {}),
        ("vars_combinations", "user-$arg_a$arg_b", {}),
    ],
)
def test_chash_missing_key_falls_back_to_remote_addr(hash_on, key, present):
    nodes = nodes_with(1, 1, 1, 1, 1, 1, 1, 1)
    balancer = make_balancer("chash", nodes, hash_on=hash_on, key=key)
    by_addr = make_balancer("chash", nodes, key="remote_addr")
    for i in range(300):
        ctx = Ctx(remote_addr=f"192.0.2.{i}", **present)
        assert balancer.pick(ctx) is by_addr.pick(ctx)


# --- least_conn ---------------------------------------------------------------------------


def test_least_conn_prefers_fewest_active():
    nodes = nodes_with(1, 1, 1)
    balancer = make_balancer("least_conn", nodes)
    for node, in_flight in zip(nodes, (3, 1, 2), strict=True):
        for _ in range(in_flight):
            balancer.on_request_start(node)
    assert balancer.pick(Ctx()) is nodes[1]
    balancer.on_request_start(nodes[1])
    balancer.on_request_start(nodes[1])  # now 3, 3, 2
    assert balancer.pick(Ctx()) is nodes[2]
    balancer.on_request_end(nodes[0], 0.1, failed=False)
    balancer.on_request_end(nodes[0], 0.1, failed=True)  # now 1, 3, 2
    assert balancer.pick(Ctx()) is nodes[0]


def test_least_conn_equal_nodes_share_load():
    balancer = make_balancer("least_conn", nodes_with(1, 1, 1))
    # Sequential requests: every node is idle at each pick, so ties decide.
    assert picks(balancer, 300) == {"10.0.0.1:80": 100, "10.0.0.2:80": 100, "10.0.0.3:80": 100}


def test_least_conn_respects_weights():
    nodes = nodes_with(1, 3)
    balancer = make_balancer("least_conn", nodes)
    # Idle: ties follow the weights.
    assert picks(balancer, 400) == {"10.0.0.1:80": 100, "10.0.0.2:80": 300}
    # Loaded (requests never finish): in-flight counts grow in proportion to the weights.
    loaded = Counter()
    for _ in range(400):
        node = balancer.pick(Ctx())
        balancer.on_request_start(node)
        loaded[node.address] += 1
    assert loaded == {"10.0.0.1:80": 100, "10.0.0.2:80": 300}


def test_least_conn_open_requests_steer_new_ones():
    nodes = nodes_with(1, 1)
    balancer = make_balancer("least_conn", nodes)
    slow = nodes[0]
    for _ in range(5):
        balancer.on_request_start(slow)
    counts = Counter()
    for _ in range(4):
        node = balancer.pick(Ctx())
        balancer.on_request_start(node)
        counts[node.address] += 1
    assert counts == {"10.0.0.2:80": 4}


# --- ewma ---------------------------------------------------------------------------------


def make_ewma(nodes, seed=1):
    clock = FakeClock()
    return EwmaBalancer(nodes, clock=clock, rng=random.Random(seed)), clock


def test_ewma_prefers_faster_node():
    nodes = nodes_with(1, 1, 1)
    balancer, clock = make_ewma(nodes)
    latency = {nodes[0].address: 0.010, nodes[1].address: 0.200, nodes[2].address: 0.400}
    counts = Counter()
    for _ in range(3000):
        node = balancer.pick(Ctx())
        counts[node.address] += 1
        balancer.on_request_start(node)
        clock.now += 0.005
        balancer.on_request_end(node, latency[node.address], failed=False)
    fast, middle, slow = (counts[n.address] for n in nodes)
    # Two random choices: the fastest wins every pairing it is in (~2/3 of picks).
    assert fast > 0.6 * 3000
    assert fast > middle > slow


def test_ewma_tries_new_node():
    nodes = nodes_with(1, 1, 1, 1)
    balancer, _clock = make_ewma(nodes)
    # Three nodes have served traffic; the fourth was just added and has no history.
    for node in nodes[:3]:
        balancer.on_request_start(node)
        balancer.on_request_end(node, 0.05, failed=False)
    counts = picks(balancer, 200)
    # Unmeasured (score 0), it wins every pairing it is drawn into: half of all picks.
    assert counts[nodes[3].address] == pytest.approx(100, abs=25)


def test_ewma_counts_in_flight_requests():
    nodes = nodes_with(1, 1)
    balancer, _clock = make_ewma(nodes)
    for node in nodes:
        balancer.on_request_start(node)
        balancer.on_request_end(node, 0.1, failed=False)
    for _ in range(3):
        balancer.on_request_start(nodes[0])
    assert all(balancer.pick(Ctx()) is nodes[1] for _ in range(20))


def test_ewma_unmeasured_nodes_share_by_in_flight():
    nodes = nodes_with(1, 1)
    balancer, _clock = make_ewma(nodes)
    balancer.on_request_start(nodes[0])
    assert all(balancer.pick(Ctx()) is nodes[1] for _ in range(20))


def test_ewma_penalizes_fast_failures():
    nodes = nodes_with(1, 1)
    balancer, clock = make_ewma(nodes)
    for node in nodes:
        balancer.on_request_start(node)
        balancer.on_request_end(node, 0.1, failed=False)
    clock.now += 1
    # Connection refused comes back in a millisecond; it must not look like speed.
    balancer.on_request_start(nodes[0])
    balancer.on_request_end(nodes[0], 0.001, failed=True)
    assert all(balancer.pick(Ctx()) is nodes[1] for _ in range(20))


def test_ewma_retries_a_slow_node_once_its_latency_decays():
    nodes = nodes_with(1, 1)
    balancer, clock = make_ewma(nodes)
    balancer.on_request_start(nodes[0])
    balancer.on_request_end(nodes[0], 2.0, failed=False)
    chosen = []
    for _ in range(40):  # one request a second while the slow node sits idle
        clock.now += 1
        node = balancer.pick(Ctx())
        chosen.append(node)
        balancer.on_request_start(node)
        balancer.on_request_end(node, 0.2, failed=False)
    # 2.0 s decays below 0.2 s after 10 * ln(10) = 23 s; then the slow node gets a turn.
    assert chosen[:22] == [nodes[1]] * 22
    assert nodes[0] in chosen[22:26]


# --- priority -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["roundrobin", "chash", "least_conn", "ewma"])
def test_lower_priority_nodes_used_only_after_higher_ones_tried(kind):
    primary = [
        UpstreamNode("10.0.0.1", 80, 1, priority=10),
        UpstreamNode("10.0.0.2", 80, 1, priority=10),
    ]
    backup = [UpstreamNode("10.0.1.1", 80, 1, priority=-1)]
    balancer = make_balancer(kind, [*backup, *primary], key="remote_addr")
    ctx = Ctx(remote_addr="192.0.2.1")
    assert {balancer.pick(ctx).address for _ in range(50)} <= {n.address for n in primary}
    assert balancer.pick(ctx, set(primary)) is backup[0]
    assert balancer.pick(ctx, {*primary, *backup}) is None
    balancer.on_request_start(backup[0])
    balancer.on_request_end(backup[0], 0.01, failed=False)
