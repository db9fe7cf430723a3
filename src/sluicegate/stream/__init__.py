"""L4 data plane: APISIX-style stream routes, the TCP relay and the UDP proxy.

- `sluicegate.stream.routes`: the `stream_routes` config model and the compiled route table
  (pure logic, no I/O; safe for `config/` to import).
- `sluicegate.stream.tcp`: `StreamServer`, a TCP relay with an asyncio copy path and an
  `os.splice` fast path behind one flag.
- `sluicegate.stream.udp`: `UdpProxy`, per-flow UDP sessions with an idle timeout.

Nothing is imported here, so loading the config model does not pull in the event loop.
"""
