"""TPROXY interception on a real kernel: client — gateway — server network namespaces
(tests/net), nftables and policy routing installed in the gateway namespace by
`TproxyInterceptor` (run there with `ip netns exec`, since everything it does is per
namespace), nginx and a UDP echo server as the real servers, curl as the unaware client.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from net.conftest import rig_fixture  # noqa: F401  (the `rig` fixture)
from net.rig import GATEWAY_PROGRAM, PYTHON, Namespace, Rig, read_line
from sluicegate.intercept import InterceptSpec, check_loop, is_listener_destination
from sluicegate.intercept.tproxy import build_ruleset, explain_nft_error, rule_expressions

GATEWAY = [PYTHON, str(GATEWAY_PROGRAM)]
UDP_PORT = 5300  # the captured UDP service port (the echo server's)
UDP_LISTEN_PORT = 15300  # the gateway's transparent UDP listener

UDP_CLIENT = textwrap.dedent("""
    import json, socket, sys
    host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.sendto(payload, (host, port))
    data, peer = sock.recvfrom(65535)
    print(json.dumps({"data": data.decode(), "from": list(peer[:2])}))
""")


# -- helpers ------------------------------------------------------------------------------

def install(rig: Rig, **options: object) -> dict:
    result = rig.gateway.run([*GATEWAY, "install", json.dumps(options)])
    return json.loads(result.stdout)


def remove(rig: Rig) -> None:
    rig.gateway.run([*GATEWAY, "remove"])


def status(rig: Rig) -> dict:
    return json.loads(rig.gateway.run([*GATEWAY, "status"]).stdout)


def sluicegate_tables(ns: Namespace | None) -> list[str]:
    command = ["nft", "list", "tables"]
    result = ns.run(command) if ns is not None else subprocess.run(
        command, capture_output=True, text=True, check=True)
    return [line for line in result.stdout.splitlines() if "sluicegate" in line]


def policy_routing(ns: Namespace, table: int = 100) -> dict[str, list[str]]:
    """Our rules and routes as `ip` prints them (tagged `proto 171`)."""
    def lines(*argv: str) -> list[str]:
        # (`ip route show table N` fails when table N does not exist: no lines then.)
        return [line.strip() for line in ns.run(["ip", *argv], check=False).stdout
                .splitlines() if "proto 171" in line]
    def rules(*argv: str) -> list[str]:
        return [line for line in lines(*argv) if f"lookup {table} " in line]
    return {"rules4": rules("rule"), "rules6": rules("-6", "rule"),
            "routes4": lines("route", "show", "table", str(table)),
            "routes6": lines("-6", "route", "show", "table", str(table))}


def nothing_installed(ns: Namespace) -> bool:
    """No sluicegate table, and no rule or route of ours in any routing table."""
    tagged = [line for argv in (["rule"], ["-6", "rule"], ["route", "show", "table", "all"],
                                ["-6", "route", "show", "table", "all"])
              for line in ns.run(["ip", *argv]).stdout.splitlines() if "proto 171" in line]
    return not sluicegate_tables(ns) and not tagged


def start_relay(rig: Rig, port: int, proto: str, preserve_source: bool = False
                ) -> subprocess.Popen[str]:
    argv = [*GATEWAY, "relay", str(port), proto]
    if preserve_source:
        argv.append("--preserve-source")
    relay = rig.start_in(rig.gateway, argv)
    assert read_line(relay) == "ready"
    return relay


def curl(rig: Rig, host: str) -> tuple[str, str]:
    """GET http://host/ from the client namespace: (body, the address curl talked to)."""
    url_host = f"[{host}]" if ":" in host else host
    result = rig.client.run(["curl", "-sS", "-m", "5", "-w", "\n%{remote_ip}",
                             f"http://{url_host}/"])
    body, _, remote_ip = result.stdout.rpartition("\n")
    return body.strip(), remote_ip


def udp_exchange(rig: Rig, host: str, port: int, payload: str) -> dict:
    return json.loads(rig.client.python(UDP_CLIENT, host, str(port), payload).stdout)


def rule(state: dict, comment: str) -> dict:
    return next(r for r in state["rules"] if r["comment"] == comment)


# -- install / remove / crash recovery ----------------------------------------------------

def test_install_creates_one_table_fwmark_rules_and_local_routes(rig):
    installed = install(rig, listen_port=80)
    assert sluicegate_tables(rig.gateway) == ["table inet sluicegate"]
    routing = policy_routing(rig.gateway)
    assert routing["rules4"] == ["32000:\tfrom all fwmark 0x1 lookup 100 proto 171"]
    assert routing["rules6"] == ["32000:\tfrom all fwmark 0x1 lookup 100 proto 171"]
    assert routing["routes4"] == ["local default dev lo proto 171 scope host"]
    assert routing["routes6"][0].startswith("local default dev lo proto 171")
    assert installed["installed"] is True
    assert [r["comment"] for r in installed["rules"]] == [
        "intercepted connections", "own addresses", "capture tcp ipv4", "capture tcp ipv6"]
    # Only the gateway namespace changed.
    assert sluicegate_tables(None) == []
    assert nothing_installed(rig.client) and nothing_installed(rig.server)


def test_remove_deletes_table_rules_and_routes(rig):
    install(rig, listen_port=80, protocols=["tcp", "udp"], preserve_source=True)
    remove(rig)
    assert nothing_installed(rig.gateway)
    assert status(rig)["installed"] is False
    remove(rig)  # removing nothing is fine
    assert nothing_installed(rig.gateway)


def test_install_twice_leaves_one_table_and_one_rule_per_family(rig):
    install(rig, listen_port=80)
    install(rig, listen_port=8080, ports=["80", "8000-8099"], fwmark=0x2, route_table=200)
    assert sluicegate_tables(rig.gateway) == ["table inet sluicegate"]
    assert nothing_installed(rig.gateway) is False
    assert not any(policy_routing(rig.gateway, 100).values())  # the first install's are gone
    routing = policy_routing(rig.gateway, 200)
    assert routing["rules4"] == ["32000:\tfrom all fwmark 0x2 lookup 200 proto 171"]
    assert len(routing["rules6"]) == len(routing["routes4"]) == len(routing["routes6"]) == 1
    ruleset = rig.gateway.run(["nft", "list", "table", "inet", "sluicegate"]).stdout
    assert "tcp dport { 80, 8000-8099 }" in ruleset and "tproxy ip to :8080" in ruleset


def test_install_after_sigkill_leaves_one_table_and_remove_cleans_everything(rig):
    crashed = rig.start_in(rig.gateway, [*GATEWAY, "install-and-wait",
                                         json.dumps({"listen_port": 80})])
    assert read_line(crashed) == "installed"
    crashed.send_signal(signal.SIGKILL)
    assert crashed.wait(5) == -signal.SIGKILL
    assert sluicegate_tables(rig.gateway) == ["table inet sluicegate"]  # left behind
    install(rig, listen_port=80)
    assert sluicegate_tables(rig.gateway) == ["table inet sluicegate"]
    routing = policy_routing(rig.gateway)
    assert all(len(lines) == 1 for lines in routing.values()), routing
    remove(rig)
    assert nothing_installed(rig.gateway)


def test_remove_after_crash_finds_another_mark_and_table(rig):
    crashed = rig.start_in(rig.gateway, [*GATEWAY, "install-and-wait", json.dumps(
        {"listen_port": 80, "fwmark": 0x7, "route_table": 333})])
    assert read_line(crashed) == "installed"
    crashed.send_signal(signal.SIGKILL)
    crashed.wait(5)
    remove(rig)  # a fresh process that knows nothing of mark 0x7 / table 333
    assert nothing_installed(rig.gateway)
    assert not any(policy_routing(rig.gateway, 333).values())


def test_install_status_remove_work_inside_a_running_event_loop(rig):
    # The gateway calls the interceptor from inside uvloop; pyroute2's synchronous API
    # cannot run there, so the interceptor moves its netlink work off the loop.
    result = rig.gateway.run([*GATEWAY, "install", json.dumps({"listen_port": 80}),
                              "--in-event-loop"])
    assert json.loads(result.stdout)["installed"] is True
    assert json.loads(rig.gateway.run([*GATEWAY, "status", "--in-event-loop"]).stdout)[
        "routes"]
    rig.gateway.run([*GATEWAY, "remove", "--in-event-loop"])
    assert nothing_installed(rig.gateway)


# -- end to end ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_curl_to_server_is_intercepted_and_relayed_client_unaware(rig, family):
    server, gateway_side = ((rig.server_v4, rig.gateway_server_v4) if family == "ipv4"
                            else (rig.server_v6, rig.gateway_server_v6))
    client = rig.client_v4 if family == "ipv4" else rig.client_v6
    rig.start_nginx()
    install(rig, listen_port=80)
    relay = start_relay(rig, 80, "tcp")
    body, talked_to = curl(rig, server)
    assert talked_to == server  # the client only ever saw the server's address
    assert body == f"server={server} remote={gateway_side}"  # the relay connected
    flow = json.loads(read_line(relay))
    assert flow["client"][0] == client
    assert flow["original_destination"] == [server, 80]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_udp_listener_sees_original_destination_and_answers_from_it(rig, family):
    server = rig.server_v4 if family == "ipv4" else rig.server_v6
    gateway_side = rig.gateway_server_v4 if family == "ipv4" else rig.gateway_server_v6
    rig.start_udp_echo(UDP_PORT)
    install(rig, listen_port=UDP_LISTEN_PORT, protocols=["udp"], ports=[UDP_PORT])
    relay = start_relay(rig, UDP_LISTEN_PORT, "udp")
    for payload in ("first", "second"):
        answer = udp_exchange(rig, server, UDP_PORT, payload)
        assert answer == {"data": f"echo {payload} seen-from={gateway_side}",
                          "from": [server, UDP_PORT]}
        flow = json.loads(read_line(relay))
        assert flow["original_destination"] == [server, UDP_PORT]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_preserve_source_server_sees_the_client_address(rig, family):
    server = rig.server_v4 if family == "ipv4" else rig.server_v6
    client = rig.client_v4 if family == "ipv4" else rig.client_v6
    rig.start_nginx()
    install(rig, listen_port=80, preserve_source=True)
    relay = start_relay(rig, 80, "tcp", preserve_source=True)
    body, talked_to = curl(rig, server)
    assert talked_to == server
    assert body == f"server={server} remote={client}"
    flow = json.loads(read_line(relay))  # it did go through the relay, as the client
    assert flow["upstream_local"][0] == client
    assert flow["original_destination"] == [server, 80]
    assert rule(status(rig), "preserve-source replies")["packets"] > 0


def test_preserve_source_udp_server_sees_the_client_address(rig):
    rig.start_udp_echo(UDP_PORT)
    install(rig, listen_port=UDP_LISTEN_PORT, protocols=["udp"], ports=[UDP_PORT],
            preserve_source=True)
    relay = start_relay(rig, UDP_LISTEN_PORT, "udp", preserve_source=True)
    answer = udp_exchange(rig, rig.server_v4, UDP_PORT, "hello")
    assert answer == {"data": f"echo hello seen-from={rig.client_v4}",
                      "from": [rig.server_v4, UDP_PORT]}
    assert json.loads(read_line(relay))["upstream_local"][0] == rig.client_v4


def test_status_reports_rule_counters_going_up_after_traffic(rig):
    rig.start_nginx()
    install(rig, listen_port=80)
    start_relay(rig, 80, "tcp")
    before = rule(status(rig), "capture tcp ipv4")
    assert (before["packets"], before["bytes"]) == (0, 0)
    curl(rig, rig.server_v4)
    after = status(rig)
    captured = rule(after, "capture tcp ipv4")
    assert captured["packets"] >= 1 and captured["bytes"] > 0  # the SYN
    # The rest of the connection (ACK, request...) finds its socket first.
    assert rule(after, "intercepted connections")["packets"] >= 2
    assert rule(after, "capture tcp ipv6")["packets"] == 0
    assert "tproxy ip to :80" in captured["rule"]
    assert after["policy_rules"] == [
        {"family": "ipv4", "priority": 32000, "fwmark": "0x1", "table": 100},
        {"family": "ipv6", "priority": 32000, "fwmark": "0x1", "table": 100}]
    assert after["routes"] == [
        {"family": "ipv4", "type": "local", "dst": "0.0.0.0/0", "dev": "lo", "table": 100},
        {"family": "ipv6", "type": "local", "dst": "::/0", "dev": "lo", "table": 100}]


def test_traffic_passes_untouched_while_no_listener_is_bound(rig):
    # The rule is `tproxy ... meta mark set ... accept`: without a listener the tproxy
    # statement stops the rule before the mark, so the packet is forwarded (fail open).
    rig.start_nginx()
    install(rig, listen_port=80)
    body, _ = curl(rig, rig.server_v4)
    assert body == f"server={rig.server_v4} remote={rig.client_v4}"  # routed, not relayed


def test_connections_to_the_gateways_own_address_are_not_captured(rig):
    # A plain service of the gateway host on its own address, port 80; the transparent
    # listener is elsewhere (15080). Captured, the connection would land on the relay.
    rig.start_in(rig.gateway, [PYTHON, "-m", "http.server", "80", "--bind",
                               rig.gateway_client_v4, "--directory", str(rig.workdir)])
    rig.gateway.wait_listening(80)
    install(rig, listen_port=15080, ports=[80])
    start_relay(rig, 15080, "tcp")
    result = rig.client.run(["curl", "-s", "-m", "5", "-o", "/dev/null", "-w",
                             "%{http_code}", f"http://{rig.gateway_client_v4}/"])
    assert result.stdout == "200"  # http.server's listing, not a relay to nowhere
    state = status(rig)
    assert rule(state, "own addresses")["packets"] > 0
    assert rule(state, "capture tcp ipv4")["packets"] == 0


def test_excluded_destination_is_not_intercepted(rig):
    rig.start_nginx()
    install(rig, listen_port=80, exclude=[f"{rig.server_v4}/32"])
    start_relay(rig, 80, "tcp")
    body, _ = curl(rig, rig.server_v4)
    assert body == f"server={rig.server_v4} remote={rig.client_v4}"
    body, _ = curl(rig, rig.server_v6)  # v6 still intercepted
    assert body == f"server={rig.server_v6} remote={rig.gateway_server_v6}"
    assert rule(status(rig), "excluded ipv4")["packets"] > 0


def test_ingress_interface_limits_capture(rig):
    rig.start_nginx()
    install(rig, listen_port=80, interfaces=[rig.gateway_server_if])  # not the client's
    start_relay(rig, 80, "tcp")
    body, _ = curl(rig, rig.server_v4)
    assert body == f"server={rig.server_v4} remote={rig.client_v4}"
    install(rig, listen_port=80, interfaces=[rig.gateway_client_if])
    body, _ = curl(rig, rig.server_v4)
    assert body == f"server={rig.server_v4} remote={rig.gateway_server_v4}"


# -- refusals and one-line errors ---------------------------------------------------------

def test_loop_guard_refuses_a_spec_capturing_the_gateway_listener(rig):
    spec = {"listen_port": 80, "destinations": [f"{rig.gateway_client_v4}/32"]}
    result = rig.gateway.run([*GATEWAY, "install", json.dumps(spec)], check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1  # one line, no traceback
    assert result.stderr.startswith(
        f"error: refusing the interception spec: destination {rig.gateway_client_v4}/32 "
        f"holds only the gateway's own addresses")
    assert "loop" in result.stderr
    assert nothing_installed(rig.gateway)


def test_missing_nft_binary_gives_one_line_reason(rig):
    result = rig.gateway.run([*GATEWAY, "install", json.dumps({"listen_port": 80}),
                              "--nft", "/nonexistent/nft"], check=False)
    assert result.returncode == 2
    assert result.stderr == ("error: the nft command (/nonexistent/nft) is not installed: "
                             "install nftables (Debian: apt-get install nftables)\n")
    assert nothing_installed(rig.gateway)


def test_missing_privileges_give_one_line_reason(rig):
    unprivileged = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                    "--inh-caps=-all"]
    result = rig.gateway.run([*unprivileged, *GATEWAY, "install",
                              json.dumps({"listen_port": 80})], check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: permission denied")
    assert "CAP_NET_ADMIN" in result.stderr


def test_kernel_without_tproxy_gives_one_line_reason(rig, tmp_path: Path):
    # A stand-in for nft that answers like nft on a kernel without nft_tproxy: every batch
    # holding a tproxy statement fails with ENOENT.
    fake = tmp_path / "nft"
    fake.write_text(textwrap.dedent("""\
        #!/bin/sh
        case " $* " in *" -f "*) input=$(cat) ;; *) exec NFT "$@" ;; esac
        case "$input" in
          *tproxy*) echo "Error: Could not process rule: No such file or directory" >&2
                    exit 1 ;;
        esac
        printf '%s' "$input" | exec NFT "$@"
    """).replace("NFT", shutil.which("nft") or "/usr/sbin/nft"))
    fake.chmod(0o755)
    result = rig.gateway.run([*GATEWAY, "install", json.dumps({"listen_port": 80}),
                              "--nft", str(fake)], check=False)
    assert result.returncode == 2
    assert result.stderr == ("error: this kernel lacks nftables support for TPROXY "
                             "(CONFIG_NFT_TPROXY)\n")
    assert nothing_installed(rig.gateway)  # the routing added before nft was rolled back


# -- pure logic ---------------------------------------------------------------------------

def test_loop_guard_accepts_broad_prefixes_containing_the_gateway():
    local = ["10.0.0.1/24", "fd00::1/64", "127.0.0.1/8", "::1/128"]
    assert check_loop(InterceptSpec(listen_port=80), local) == []
    assert check_loop(InterceptSpec.from_options(80, destinations=["10.0.0.0/24"]), local) == []


def test_loop_guard_refuses_own_addresses_and_loopback_on_the_listen_port():
    local = ["10.0.0.1/24", "10.0.0.2"]
    reasons = check_loop(InterceptSpec.from_options(
        80, destinations=["10.0.0.1", "127.0.0.0/8", "::1", "192.0.2.0/24"]), local)
    assert len(reasons) == 3
    assert reasons[0].startswith("destination 10.0.0.1/32 holds only the gateway's own "
                                 "addresses (10.0.0.1/32) and port 80 is the listener's own "
                                 "port")
    # Excluding the rest of a prefix leaves only own addresses: refused too.
    assert check_loop(InterceptSpec.from_options(
        80, destinations=["10.0.0.0/30"], exclude=["10.0.0.0/32", "10.0.0.3/32"]), local)
    # Not the listen port, or excluded: no loop.
    assert check_loop(InterceptSpec.from_options(80, ports=["81"],
                                                 destinations=["10.0.0.1"]), local) == []
    assert check_loop(InterceptSpec.from_options(80, destinations=["10.0.0.1", "10.9.0.0/16"],
                                                 exclude=["10.0.0.1"]), local) == []


def test_connection_to_the_listener_itself_is_recognised():
    local = ["10.0.0.1/24", "fd00::1/64"]
    assert is_listener_destination(("10.0.0.1", 80), 80, local)
    assert is_listener_destination(("::ffff:10.0.0.1", 80), 80, local)
    assert is_listener_destination(("127.0.0.1", 80), 80, local)
    assert not is_listener_destination(("10.0.0.9", 80), 80, local)
    assert not is_listener_destination(("10.0.0.1", 81), 80, local)


def test_spec_defaults_and_validation():
    spec = InterceptSpec(listen_port=80)
    assert spec.port_ranges == ((80, 80),)
    assert [str(n) for n in spec.destinations] == ["0.0.0.0/0", "::/0"]
    assert (spec.protocols, spec.fwmark, spec.route_table) == (("tcp",), 0x1, 100)
    spec = InterceptSpec.from_options(15300, protocols=["UDP", "tcp"],
                                      ports=[53, "8000-8099", "9000:9001"],
                                      destinations=["10.1.2.3/8", "fd00::/8"])
    assert spec.port_ranges == ((53, 53), (8000, 8099), (9000, 9001))
    assert spec.families == (4, 6) and spec.protocols == ("udp", "tcp")
    assert [str(n) for n in spec.destinations_v4] == ["10.0.0.0/8"]
    bad = [({"listen_port": 0}, "listen_port"),
           ({"listen_port": 80, "protocols": ("sctp",)}, "protocols"),
           ({"listen_port": 80, "port_ranges": ("90-80",)}, "port range"),
           ({"listen_port": 80, "destinations": ("10.0.0.300/8",)}, "destination"),
           ({"listen_port": 80, "destinations": ()}, "destinations"),
           ({"listen_port": 80, "interfaces": ("a" * 16,)}, "interfaces"),
           ({"listen_port": 80, "fwmark": 0}, "fwmark"),
           ({"listen_port": 80, "route_table": 254}, "route_table")]
    for options, field in bad:
        with pytest.raises(ValueError, match=field):
            InterceptSpec(**options)


def test_ruleset_order_preserve_source_own_addresses_exclusions_captures():
    spec = InterceptSpec.from_options(
        15300, protocols=["tcp", "udp"], ports=[53, "8000-8099"],
        destinations=["10.0.0.0/8", "fd00::/8"], exclude=["10.9.0.0/16", "fd00:9::/32"],
        interfaces=["eth1"], preserve_source=True, fwmark=0x10)
    assert [comment for comment, _ in rule_expressions(spec)] == [
        "preserve-source replies", "own addresses", "excluded ipv4", "excluded ipv6",
        "capture tcp ipv4", "capture udp ipv4", "capture tcp ipv6", "capture udp ipv6"]
    document = build_ruleset(spec)["nftables"]
    assert [next(iter(c)) for c in document[:4]] == ["metainfo", "add", "delete", "add"]
    capture = dict(rule_expressions(spec))["capture udp ipv6"]
    assert capture[0] == {"match": {"op": "==", "left": {"meta": {"key": "iifname"}},
                                    "right": "eth1"}}
    assert {"tproxy": {"family": "ip6", "port": 15300}} in capture
    assert capture[-2:] == [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 0x10}},
                            {"accept": None}]
    # A listener on one address: only its family is captured, to that address.
    spec = InterceptSpec.from_options(80, listen_address="10.0.0.1")
    assert spec.families == (4,)
    capture = dict(rule_expressions(spec))
    assert list(capture) == ["intercepted connections", "own addresses", "capture tcp ipv4"]
    assert {"tproxy": {"family": "ip", "port": 80, "addr": "10.0.0.1"}} in capture[
        "capture tcp ipv4"]


def test_nft_permission_errors_are_explained_in_one_line():
    reason = explain_nft_error("netlink: Error: cache initialization failed: "
                               "Operation not permitted\n")
    assert reason is not None and "\n" not in reason and "CAP_NET_ADMIN" in reason
    assert explain_nft_error("Error: syntax error\n") is None
