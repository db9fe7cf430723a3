"""The BPF loader (sluicegate/bpf/libbpf.py) against the real kernel: the shipped object
loads, maps answer, sockets go into a SOCKMAP, sk_lookup steers, pins outlive processes and
unpinned links do not. Anything attached is attached inside a test namespace (the
gateway host of a rig), by a child process started there."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
from pathlib import Path

import pytest

from net.bpffs import bpffs_fixture  # noqa: F401  (the `bpffs` fixture)
from net.conftest import rig_fixture  # noqa: F401  (the `rig` fixture)
from net.rig import PYTHON
from sluicegate.bpf import libbpf, object_path
from sluicegate.intercept.ebpf import MAPS, PROGRAMS, port_bitmap

SO_COOKIE = 57  # <asm-generic/socket.h>; Python 3.11's socket module lacks it
ZERO = struct.pack("<I", 0)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root")


@pytest.fixture(name="obj")
def loaded_object():
    """The shipped sk_lookup object, loaded (nothing attached), closed afterwards."""
    obj = libbpf.BpfObject(object_path("sk_lookup"))
    yield obj
    obj.close()


def lpm4(network: str) -> bytes:
    net = ipaddress.ip_network(network)
    return struct.pack("<I", net.prefixlen) + net.network_address.packed


def test_shipped_object_loads_with_every_program_and_map(obj):
    for name in PROGRAMS:
        assert libbpf.describe(obj.program(name).fd)["name"] == name
    for name in MAPS:
        assert libbpf.describe(obj.map(name).fd)["name"] == name
    assert libbpf.describe(obj.program("sg_sk_lookup").fd)["type"] == "sk_lookup"
    assert libbpf.describe(obj.map("sg_sockets").fd)["type"] == "sockmap"


def test_unknown_program_or_map_is_a_one_line_error(obj):
    with pytest.raises(libbpf.BpfError) as caught:
        obj.program("nope")
    assert "has no program nope" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(libbpf.BpfError, match="has no map nope"):
        obj.map("nope")


def test_missing_object_file_says_how_to_get_it(tmp_path: Path):
    with pytest.raises(libbpf.BpfError) as caught:
        libbpf.BpfObject(tmp_path / "gone.bpf.o")
    assert "make bpf" in str(caught.value) and caught.value.errno == 2


def test_lpm_trie_matches_addresses_inside_a_prefix_until_it_is_deleted(obj):
    trie = obj.map("sg_dst4")
    trie.update(lpm4("10.9.0.0/16"), b"\x01")
    assert trie.lookup(lpm4("10.9.8.7/32"), 1) == b"\x01"
    assert trie.lookup(lpm4("10.10.0.1/32"), 1) is None
    assert [key for key in trie.keys(8)] == [lpm4("10.9.0.0/16")]
    assert trie.delete(lpm4("10.9.0.0/16")) is True
    assert trie.delete(lpm4("10.9.0.0/16")) is False
    assert trie.lookup(lpm4("10.9.8.7/32"), 1) is None


def test_port_bitmap_round_trips_through_the_array_map(obj):
    ports = obj.map("sg_ports")
    value = port_bitmap([(80, 80), (8000, 8099)])
    ports.update(ZERO, value)
    words = struct.unpack("<1024Q", ports.lookup(ZERO, len(value)))
    assert words[80 >> 6] >> (80 & 63) & 1 == 1
    assert sum(bin(word).count("1") for word in words) == 101


def test_per_cpu_counters_read_one_value_per_possible_cpu(obj):
    values = obj.map("sg_stats").lookup_percpu(ZERO, 8)
    assert len(values) >= os.cpu_count() and set(values) == {bytes(8)}


def test_sockmap_takes_a_listening_socket_and_reads_back_its_cookie(obj):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        sockmap = obj.map("sg_sockets")
        sockmap.update(ZERO, struct.pack("<Q", listener.fileno()))
        cookie = struct.unpack("<Q", listener.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
        assert struct.unpack("<Q", sockmap.lookup(ZERO, 8))[0] == cookie
    # Closing the socket takes it out of the map.
    assert sockmap.lookup(ZERO, 8) is None


def test_a_socket_that_is_not_listening_is_refused_by_the_sockmap_with_one_line(obj):
    with socket.socket() as unbound, pytest.raises(libbpf.BpfError) as caught:
        obj.map("sg_sockets").update(ZERO, struct.pack("<Q", unbound.fileno()))
    assert str(caught.value).startswith("updating map sg_sockets failed")
    assert "\n" not in str(caught.value)


# Runs in the rig's gateway namespace: attach sk_lookup, steer 127.0.0.1:7000-7999 to a
# listener on 127.0.0.1:PORT, connect to 7777, and report what the listener accepted.
STEER = """
import json, os, socket, struct, sys
from sluicegate.bpf import libbpf, object_path
from sluicegate.intercept.ebpf import port_bitmap
obj = libbpf.BpfObject(object_path("sk_lookup"))
zero = struct.pack("<I", 0)
obj.map("sg_config").update(zero, struct.pack("<II", 1 | 4, 1))  # tcp, ipv4
obj.map("sg_ports").update(zero, port_bitmap([(7000, 7999)]))
obj.map("sg_dst4").update(struct.pack("<I", 8) + bytes([127, 0, 0, 0]), b"\\1")
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
obj.map("sg_sockets").update(zero, struct.pack("<Q", listener.fileno()))
netns = os.open("/proc/self/ns/net", os.O_RDONLY)
link = obj.program("sg_sk_lookup").attach_netns(netns)
client = socket.create_connection(("127.0.0.1", 7777), timeout=5)
accepted, _ = listener.accept()
print(json.dumps({"listener": listener.getsockname()[1], "accepted": accepted.getsockname(),
                  "link": libbpf.describe(link.fd),
                  "netns": os.fstat(netns).st_ino}))
"""


def test_sk_lookup_hands_connections_to_captured_ports_to_the_listener(rig):
    shown = json.loads(rig.gateway.python(STEER).stdout)
    # Nothing listens on 7777: the program assigned the listener, and the accepted
    # socket still carries the address the client connected to.
    assert shown["accepted"] == ["127.0.0.1", 7777]
    assert shown["listener"] != 7777
    assert shown["link"]["type"] == "netns" and shown["link"]["program"] == "sg_sk_lookup"
    assert shown["link"]["netns_ino"] == shown["netns"]


# Attaches sk_lookup in the namespace, optionally pins the link, prints its id, exits.
ATTACH = """
import os, sys
from sluicegate.bpf import libbpf, object_path
obj = libbpf.BpfObject(object_path("sk_lookup"))
netns = os.open("/proc/self/ns/net", os.O_RDONLY)
link = obj.program("sg_sk_lookup").attach_netns(netns)
if len(sys.argv) > 1:
    link.pin(sys.argv[1])
print(libbpf.describe(link.fd)["id"])
"""


def link_ids() -> set[int]:
    ids = set()
    for fd, described in libbpf.links():
        os.close(fd)
        ids.add(described["id"])
    return ids


def test_an_unpinned_link_is_detached_when_its_process_exits(rig):
    link_id = int(rig.gateway.python(ATTACH).stdout)
    assert link_id not in link_ids()


def test_a_pinned_link_outlives_its_process_until_detached_and_unpinned(rig, bpffs: Path):
    bpffs.mkdir()
    pin = bpffs / "link"
    link_id = int(rig.gateway.python(ATTACH, str(pin)).stdout)
    assert link_id in link_ids()
    fd = libbpf.open_pinned(pin)
    try:
        assert libbpf.describe(fd)["id"] == link_id
        libbpf.detach_link(fd)
        assert libbpf.describe(fd)["netns_ino"] == 0  # still pinned, no longer attached
    finally:
        os.close(fd)
    pin.unlink()
    assert link_id not in link_ids()


def test_pinned_maps_are_listed_by_describe_pins(obj, bpffs: Path):
    bpffs.mkdir()
    libbpf.pin(obj.map("sg_config").fd, bpffs / "sg_config")
    libbpf.pin(obj.program("sg_tc_mark").fd, bpffs / "sg_tc_mark")
    listed = {Path(item["pin"]).name: item for item in libbpf.describe_pins(bpffs)}
    assert listed["sg_config"]["kind"] == "map" and listed["sg_config"]["type"] == "array"
    assert listed["sg_tc_mark"]["kind"] == "program"
    assert listed["sg_tc_mark"]["type"] == "sched_cls"


def test_bpf_status_command_lists_nothing_when_nothing_is_pinned(bpffs: Path):
    import subprocess

    result = subprocess.run([PYTHON, "-m", "sluicegate", "bpf", "status"], capture_output=True,
                            text=True, timeout=30, check=True)
    assert json.loads(result.stdout) == {"folder": str(bpffs), "pinned": [], "links": []}
