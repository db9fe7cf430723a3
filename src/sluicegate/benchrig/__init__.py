"""The benchmark rig of `sluicegate bench interception`: explicit proxy vs TPROXY vs eBPF
sk_lookup in network namespaces.

Each measured part is a module runnable on its own,
`python -m sluicegate.benchrig.<part> --out DIR [--duration S] [--runs N]`, that builds and
removes its own namespaces (`sgb-<pid>-*`) and writes `DIR/<part>.json`
({"part": ..., "meta": {...}, "rows": [...]}):

- `core`: connection rate, HTTP keep-alive req/s, p50/p99, TCP bulk per L4 copy path and
  haproxy in TCP mode (the rig script `interception.sh`, its results read by `summary`);
- `copy`: the bulk copy paths against haproxy again, with the gateway namespace's receive
  work on the gateway's core (RPS), where the sockmap path's kernel work runs;
- `scaling`: connection rate against the number of intercepted prefixes, per mode;
- `flood`: XDP drop vs nftables drop vs user-space rejection under a flood (its rig in
  `flood_rig`, its packet sources in `flood_generator` and `live_frames`: the kernel's
  XDP live frames, or `flood_gen.c`).

`report` turns the JSON files into the printed table, PNG plots and docs/tproxy-vs-ebpf.md.
Nothing here is imported by the gateway itself.
"""

PARTS = ("core", "copy", "scaling", "flood")
