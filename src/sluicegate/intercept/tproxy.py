"""TPROXY interception: the nftables table, the fwmark policy rules and the local routes.

`TproxyInterceptor` owns exactly three kinds of kernel objects, all in the network
namespace of the calling process (run it under `ip netns exec NS` to act on NS):

1. the nftables table `inet sluicegate` (one chain, `prerouting`, hook prerouting,
   priority mangle), replaced atomically by one `nft -j -f -` transaction;
2. the policy rules `fwmark MARK lookup TABLE` (IPv4 and IPv6);
3. the routes `local 0.0.0.0/0 dev lo table TABLE` and `local ::/0 dev lo table TABLE`.

Rules and routes carry the routing protocol number `RT_PROTO` (`proto 171` in `ip rule` /
`ip route`), which is how `remove()` finds what a crashed earlier process left even when
that process used another mark or table. Nothing else is touched: no sysctl, no other
table, no listener (the gateway opens its listeners with `sluicegate.intercept.sockets`) —
except that `remove()` destroys the TIME_WAIT sockets intercepted connections left, which
would otherwise black-hole reused 4-tuples after the rules are gone (intercept/timewait.py).

The chain, in order (each rule counts packets and bytes; `status()` reports them):

    [preserve_source] meta l4proto {tcp, udp} socket transparent 1 meta mark set MARK accept
    [else, with tcp] tcp dport {PORTS} socket transparent 1 socket wildcard 0 \
        meta mark set MARK accept
    meta l4proto {PROTOS} th dport {PORTS} fib daddr type local return  # own addresses
    ip daddr {EXCLUDED} return / ip6 daddr {EXCLUDED} return
    [iifname {IFS}] tcp dport {PORTS} ip daddr {CIDRS} tproxy ip to :PORT meta mark set MARK accept
    ... one capture rule per (protocol, family)

`tproxy` before `meta mark set` makes the rule fail open: when no listener is bound yet the
tproxy statement stops the rule, nothing is marked, and the packet is forwarded untouched
(instead of being routed locally to no socket and reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sluicegate.intercept.spec import ANY_V4, ANY_V6, InterceptSpec, Network, check_loop
from sluicegate.intercept.timewait import clear_transparent_timewait

TABLE_FAMILY = "inet"
TABLE_NAME = "sluicegate"
CHAIN_NAME = "prerouting"
# nftables' named priority "mangle": before conntrack-independent filtering, where TPROXY
# must run (the statement is only valid in prerouting).
CHAIN_PRIORITY = -150
# Routing protocol number tagging our policy rules and routes (rtnetlink rtm_protocol /
# FRA_PROTOCOL, 0-255). Unassigned in /etc/iproute2/rt_protos; 0-4 are the kernel's own and
# 8-192 partly taken by routing daemons (bird 12, zebra 11, babel 42, bgp 186...).
RT_PROTO = 171
# Policy-rule priority: before `lookup main` (32766), after `lookup local` (0).
RULE_PRIORITY = 32000
# `nft` gets this long to apply or list a ruleset.
NFT_TIMEOUT = 15.0
RT_SCOPE_HOST = 254  # KERNEL.md: the IPv4 local route is refused (EINVAL) without it
RTN_LOCAL = 2
IFF_UP = 0x1


T = TypeVar("T")


class InterceptError(Exception):
    """Interception could not be installed or removed. `str()` is one line for users."""


def build_ruleset(spec: InterceptSpec) -> dict[str, Any]:
    """The nftables JSON document that (re)creates `inet sluicegate` for `spec` in one
    transaction: add (so the delete cannot fail), delete, add, chain, rules."""
    table = {"family": TABLE_FAMILY, "name": TABLE_NAME}
    where = {"family": TABLE_FAMILY, "table": TABLE_NAME, "chain": CHAIN_NAME}
    commands: list[dict[str, Any]] = [
        {"metainfo": {"json_schema_version": 1}},
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
        {"add": {"chain": {"family": TABLE_FAMILY, "table": TABLE_NAME, "name": CHAIN_NAME,
                           "type": "filter", "hook": "prerouting", "prio": CHAIN_PRIORITY,
                           "policy": "accept"}}},
    ]
    for comment, expr in rule_expressions(spec):
        commands.append({"add": {"rule": {**where, "comment": comment, "expr": expr}}})
    return {"nftables": commands}


def rule_expressions(spec: InterceptSpec) -> list[tuple[str, list[dict[str, Any]]]]:
    """(comment, expressions) per rule, in chain order. Comments name the rules for
    `status()`."""
    mark = {"mangle": {"key": {"meta": {"key": "mark"}}, "value": spec.fwmark}}
    counter = {"counter": None}
    rules: list[tuple[str, list[dict[str, Any]]]] = []
    if spec.preserve_source:
        # Replies from the server to the client's (spoofed) address belong to the gateway's
        # transparent upstream socket: route them locally (KERNEL.md: else they time out).
        rules.append(("preserve-source replies", [
            _match({"meta": {"key": "l4proto"}}, _set(list(spec.protocols))),
            _match({"socket": {"key": "transparent"}}, 1),
            counter, mark, {"accept": None}]))
    ports = [lo if lo == hi else {"range": [lo, hi]} for lo, hi in spec.port_ranges]
    if not spec.preserve_source and "tcp" in spec.protocols:
        # Packets of connections already intercepted find their (transparent) socket here
        # and skip the FIB lookup and the destination set below: with 100,000 prefixes
        # that set's lookup on every packet cost 8 % of the connection rate
        # (docs/tproxy-vs-ebpf.md). preserve_source's rule above does the same for both.
        # `socket wildcard 0`: an intercepted connection's socket, bound to the original
        # destination; never the transparent listener on a wildcard address, which a SYN to
        # any destination on its port would find (and skip the exclusions and prefixes).
        rules.append(("intercepted connections", [
            _match({"payload": {"protocol": "tcp", "field": "dport"}}, _set(ports)),
            _match({"socket": {"key": "transparent"}}, 1),
            _match({"socket": {"key": "wildcard"}}, 0),
            counter, mark, {"accept": None}]))
    # The FIB lookup only for packets to a captured port: the server's replies (and all
    # other forwarded traffic) skip it (docs/benchmarks.md: per-packet TPROXY cost).
    rules.append(("own addresses", [
        _match({"meta": {"key": "l4proto"}}, _set(list(spec.protocols))),
        _match({"payload": {"protocol": "th", "field": "dport"}}, _set(ports)),
        _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"),
        counter, {"return": None}]))
    for version, proto in ((4, "ip"), (6, "ip6")):
        excluded = [n for n in spec.exclude if n.version == version]
        if excluded:
            rules.append((f"excluded ipv{version}", [
                _match({"payload": {"protocol": proto, "field": "daddr"}},
                       _set([_prefix(n) for n in excluded])),
                counter, {"return": None}]))
    for version, proto in ((4, "ip"), (6, "ip6")):
        destinations = [n for n in spec.destinations if n.version == version]
        if not destinations:
            continue
        if destinations in ([ANY_V4], [ANY_V6]):
            daddr = _match({"meta": {"key": "nfproto"}}, f"ipv{version}")
        else:
            daddr = _match({"payload": {"protocol": proto, "field": "daddr"}},
                           _set([_prefix(n) for n in destinations]))
        target: dict[str, Any] = {"family": proto, "port": spec.listen_port}
        if spec.listen_address is not None:
            if ipaddress.ip_address(spec.listen_address).version != version:
                continue  # that family has no listener
            target["addr"] = spec.listen_address
        for protocol in spec.protocols:
            expr: list[dict[str, Any]] = []
            if spec.interfaces:
                expr.append(_match({"meta": {"key": "iifname"}}, _set(list(spec.interfaces))))
            expr += [_match({"payload": {"protocol": protocol, "field": "dport"}}, _set(ports)),
                     daddr, counter, {"tproxy": target}, mark, {"accept": None}]
            rules.append((f"capture {protocol} ipv{version}", expr))
    return rules


def _match(left: dict[str, Any], right: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def _set(items: list[Any]) -> Any:
    return items[0] if len(items) == 1 else {"set": items}


def _prefix(network: Network) -> Any:
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def off_loop(function: Callable[[], T]) -> T:
    """Run netlink work where pyroute2 can run it. pyroute2's synchronous `IPRoute` drives
    an asyncio loop of its own and fails in a thread whose loop is already running
    ("this event loop is already running") — and the gateway calls install/remove from
    inside uvloop. There, the work runs in a short-lived thread (same network namespace:
    it is per process) and this call waits for it (milliseconds)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return function()
    with ThreadPoolExecutor(1, thread_name_prefix="sluicegate-netlink") as pool:
        return pool.submit(function).result()


def local_addresses() -> list[str]:
    """Every address configured in this network namespace (for `check_loop`)."""
    return off_loop(_local_addresses)


def _local_addresses() -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        addresses = (message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS")
                     for message in ipr.get_addr())
        return [address for address in addresses if address]


class TproxyInterceptor:
    """The TPROXY implementation of the Interceptor contract (see DESIGN.md).

    `install(spec)` first removes whatever an earlier run left, then adds the routes, the
    policy rules and the nftables table; it is idempotent. `remove()` deletes all of it, also
    when an earlier (crashed) process installed it. `status()` describes what is installed,
    with packet and byte counters per nftables rule. All three act on the caller's network
    namespace and raise `InterceptError` with a one-line reason.
    """

    mode = "tproxy"

    def __init__(self, nft: str = "nft") -> None:
        self.nft = nft
        self.spec: InterceptSpec | None = None
        self.cleared_timewait = 0  # TIME_WAIT sockets the last remove() destroyed

    # -- contract ---------------------------------------------------------------------

    def install(self, spec: InterceptSpec) -> None:
        nft = self._nft_binary()
        try:
            addresses = local_addresses()
        except Exception as error:  # NetlinkError is not an OSError
            raise InterceptError(_explain_os_error(error, "reading this host's addresses")) \
                from None
        reasons = check_loop(spec, addresses)
        if reasons:
            raise InterceptError("refusing the interception spec: " + "; ".join(reasons))
        self.remove()
        try:
            off_loop(lambda: self._add_routing(spec))
            self._nft_apply(nft, build_ruleset(spec))
        except InterceptError:
            with contextlib.suppress(InterceptError):
                self.remove()
            raise
        self.spec = spec

    def remove(self) -> None:
        failures: list[InterceptError] = []
        nft = shutil.which(self.nft)
        # Without nft there is no table of ours to delete (we only ever create it with nft).
        if nft is not None:
            # add + delete in one transaction: no error when the table is absent.
            table = {"family": TABLE_FAMILY, "name": TABLE_NAME}
            try:
                self._nft_apply(nft, {"nftables": [
                    {"metainfo": {"json_schema_version": 1}},
                    {"add": {"table": table}}, {"delete": {"table": table}}]})
            except InterceptError as error:
                failures.append(error)
        try:
            off_loop(self._remove_routing)  # also when nft failed: remove what we can
        except InterceptError as error:
            failures.append(error)
        if not failures:
            # With the rules gone, traffic flows to its destinations: clear the TIME_WAIT
            # sockets that would black-hole reused 4-tuples (intercept/timewait.py).
            with contextlib.suppress(Exception):
                self.cleared_timewait = clear_transparent_timewait(local_addresses())
        if failures:
            raise failures[0]
        self.spec = None

    def status(self) -> dict[str, Any]:
        rules, policy_rules, routes = self._nft_rules(), *off_loop(self._routing)
        return {
            "mode": self.mode,
            "installed": rules is not None and bool(policy_rules) and bool(routes),
            "table": f"{TABLE_FAMILY} {TABLE_NAME}",
            "rules": rules or [],
            "policy_rules": policy_rules,
            "routes": routes,
            "spec": self.spec.to_dict() if self.spec is not None else None,
        }

    # -- nftables ----------------------------------------------------------------------

    def _nft_binary(self) -> str:
        path = shutil.which(self.nft)
        if path is None:
            raise InterceptError(f"the nft command ({self.nft}) is not installed: install "
                                 "nftables (Debian: apt-get install nftables)")
        return path

    def _nft(self, nft: str, args: list[str], document: str | None = None
             ) -> subprocess.CompletedProcess[str]:
        try:
            if document is None:
                return subprocess.run([nft, *args], stdin=subprocess.DEVNULL,
                                      capture_output=True, text=True, timeout=NFT_TIMEOUT,
                                      check=False)
            return subprocess.run([nft, *args], input=document, capture_output=True,
                                  text=True, timeout=NFT_TIMEOUT, check=False)
        except FileNotFoundError:
            raise InterceptError(f"the nft command ({nft}) is not installed") from None
        except PermissionError:
            raise InterceptError(f"the nft command ({nft}) cannot be run: permission "
                                 "denied") from None
        except subprocess.TimeoutExpired:
            raise InterceptError(f"nft did not answer within {NFT_TIMEOUT:g}s") from None

    def _nft_apply(self, nft: str, document: dict[str, Any]) -> None:
        result = self._nft(nft, ["-j", "-f", "-"], json.dumps(document))
        if result.returncode != 0:
            raise InterceptError(self._explain_nft_failure(nft, result.stderr))

    def _explain_nft_failure(self, nft: str, stderr: str) -> str:
        reason = explain_nft_error(stderr)
        if reason is None:
            missing = self._missing_kernel_features(nft)
            if missing:
                return ("this kernel lacks nftables support for " + ", ".join(missing))
            reason = "nft failed: " + _first_error_line(stderr)
        return reason

    def _missing_kernel_features(self, nft: str) -> list[str]:
        """Probe each expression the ruleset uses with `nft --check` (the kernel validates
        the batch, then it is aborted), to name what an ENOENT was about."""
        missing = []
        for feature, expr in KERNEL_FEATURES:
            probe = {"nftables": [
                {"add": {"table": {"family": "inet", "name": "sluicegate_probe"}}},
                {"add": {"chain": {"family": "inet", "table": "sluicegate_probe",
                                   "name": "p", "type": "filter", "hook": "prerouting",
                                   "prio": CHAIN_PRIORITY}}},
                {"add": {"rule": {"family": "inet", "table": "sluicegate_probe",
                                  "chain": "p", "expr": expr}}}]}
            result = self._nft(nft, ["-c", "-j", "-f", "-"], json.dumps(probe))
            if result.returncode != 0 and "No such file or directory" in result.stderr:
                missing.append(feature)
        return missing

    def _nft_rules(self) -> list[dict[str, Any]] | None:
        """Our rules with their counters, or None when the table does not exist."""
        nft = shutil.which(self.nft)
        if nft is None:
            return None
        listing = self._nft(nft, ["-j", "list", "table", TABLE_FAMILY, TABLE_NAME])
        if listing.returncode != 0:
            if "No such file or directory" in listing.stderr:
                return None
            raise InterceptError(explain_nft_error(listing.stderr)
                                 or "nft failed: " + _first_error_line(listing.stderr))
        texts = self._rule_texts(nft)
        rules = []
        for item in json.loads(listing.stdout).get("nftables", []):
            rule = item.get("rule")
            if rule is None:
                continue
            counter = next((e["counter"] for e in rule.get("expr", []) if "counter" in e), {})
            rules.append({"comment": rule.get("comment", ""), "handle": rule.get("handle"),
                          "packets": counter.get("packets", 0),
                          "bytes": counter.get("bytes", 0),
                          "rule": texts.get(rule.get("handle"), "")})
        return rules

    def _rule_texts(self, nft: str) -> dict[int, str]:
        listing = self._nft(nft, ["-a", "list", "table", TABLE_FAMILY, TABLE_NAME])
        texts = {}
        for line in listing.stdout.splitlines():
            found = re.match(r"\s*(.*?)\s+# handle (\d+)$", line)
            if found and not found.group(1).startswith(("table ", "chain ")):
                texts[int(found.group(2))] = found.group(1)
        return texts

    # -- policy routing (module functions shared with the eBPF mode) ---------------------

    def _add_routing(self, spec: InterceptSpec) -> None:
        add_policy_routing(spec)

    def _remove_routing(self) -> None:
        remove_policy_routing()

    def _routing(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return policy_routing()


# -- policy routing (both modes) ---------------------------------------------------------


def add_policy_routing(spec: InterceptSpec) -> None:
    """The policy rules `fwmark MARK lookup TABLE` and the `local` default routes of
    TABLE for the spec's families, tagged `proto RT_PROTO`. Shared by both modes: TPROXY
    and the eBPF tc program mark the packets, these rules deliver them locally."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    families = [socket.AF_INET if v == 4 else socket.AF_INET6 for v in spec.families]
    try:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")
            if not lo:
                raise InterceptError("this network namespace has no loopback interface")
            if not ipr.get_links(lo[0])[0]["flags"] & IFF_UP:
                # The local routes point at lo; captured packets would be dropped.
                raise InterceptError("the loopback interface (lo) is down: bring it up "
                                     "(ip link set lo up)")
            for family in families:
                route = {"family": family, "dst": "0.0.0.0/0" if family == socket.AF_INET
                         else "::/0", "type": "local", "oif": lo[0],
                         "table": spec.route_table, "proto": RT_PROTO}
                if family == socket.AF_INET:
                    route["scope"] = RT_SCOPE_HOST
                _add_tolerating_existing(ipr.route, route)
                _add_tolerating_existing(ipr.rule, {
                    "family": family, "fwmark": spec.fwmark, "table": spec.route_table,
                    "priority": RULE_PRIORITY, "protocol": RT_PROTO})
    except (NetlinkError, OSError) as error:
        raise InterceptError(_explain_os_error(error, "adding the policy routing")) \
            from None

def remove_policy_routing() -> None:
    """Delete every policy rule and route tagged `proto RT_PROTO` (whichever mode, mark or
    table added them, also when a crashed process did)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                for rule in ipr.get_rules(family=family):
                    if rule.get("protocol") == RT_PROTO:
                        with contextlib.suppress(NetlinkError):
                            ipr.rule("del", family=family,
                                     priority=rule.get("priority"),
                                     fwmark=rule.get("fwmark"),
                                     table=rule.get("table"), protocol=RT_PROTO)
                for route in ipr.route("dump", family=family):
                    if route.get("proto") == RT_PROTO:
                        with contextlib.suppress(NetlinkError):
                            ipr.route("del", family=family, table=route.get("table"),
                                      dst=route.get("dst") or None,
                                      dst_len=route["dst_len"],
                                      type=route["type"], proto=RT_PROTO,
                                      scope=route["scope"])
    except (NetlinkError, OSError) as error:
        raise InterceptError(_explain_os_error(error, "removing the policy routing")) \
            from None

def policy_routing() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rules, routes) tagged `proto RT_PROTO`, JSON-ready for status."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    rules, routes = [], []
    try:
        with IPRoute() as ipr:
            names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
            for family, name in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
                for rule in ipr.get_rules(family=family):
                    if rule.get("protocol") == RT_PROTO:
                        rules.append({"family": name, "priority": rule.get("priority"),
                                      "fwmark": f"{rule.get('fwmark') or 0:#x}",
                                      "table": rule.get("table")})
                for route in ipr.route("dump", family=family):
                    if route.get("proto") == RT_PROTO:
                        any_dst = "0.0.0.0" if family == socket.AF_INET else "::"
                        routes.append({
                            "family": name, "type": "local" if route["type"] == RTN_LOCAL
                            else route["type"],
                            "dst": f"{route.get('dst') or any_dst}/{route['dst_len']}",
                            "dev": names.get(route.get("oif"), route.get("oif")),
                            "table": route.get("table")})
    except (NetlinkError, OSError) as error:
        raise InterceptError(_explain_os_error(error, "reading the policy routing")) \
            from None
    return rules, routes


# Expressions of the ruleset that need a kernel module, for naming what is missing.
KERNEL_FEATURES: tuple[tuple[str, list[dict[str, Any]]], ...] = (
    ("TPROXY (CONFIG_NFT_TPROXY)", [
        _match({"meta": {"key": "l4proto"}}, "tcp"),
        _match({"meta": {"key": "nfproto"}}, "ipv4"),
        {"tproxy": {"family": "ip", "port": 1}}]),
    ("socket matching (CONFIG_NFT_SOCKET)", [
        _match({"socket": {"key": "transparent"}}, 1)]),
    ("fib lookups (CONFIG_NFT_FIB_INET)", [
        _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")]),
)


def explain_nft_error(stderr: str) -> str | None:
    """A one-line reason for an nft failure we recognise, else None."""
    if "Operation not permitted" in stderr or "Permission denied" in stderr:
        return "permission denied: nftables needs root or CAP_NET_ADMIN for interception"
    if "Protocol not supported" in stderr or "Address family not supported" in stderr:
        return "this kernel has no nftables support (CONFIG_NF_TABLES)"
    return None


def _first_error_line(stderr: str) -> str:
    for line in stderr.splitlines():
        if line.strip().startswith("Error"):
            return line.strip()
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def _explain_os_error(error: Exception, doing: str) -> str:
    code = getattr(error, "code", None) or getattr(error, "errno", None)  # NetlinkError: .code
    if code in (errno.EPERM, errno.EACCES):
        return (f"permission denied {doing}: interception needs root or CAP_NET_ADMIN")
    name = errno.errorcode.get(code or 0, str(code))
    return f"{doing} failed: {os.strerror(code) if code else error} ({name})"


def _add_tolerating_existing(call: Any, arguments: dict[str, Any]) -> None:
    """Add a rule or route; one that already exists (added by hand, without our tag) is
    fine: it does the same job, and remove() leaves it alone."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        call("add", **arguments)
    except NetlinkError as error:
        if error.code != errno.EEXIST:
            raise
