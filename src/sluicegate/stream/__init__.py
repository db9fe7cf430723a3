"""L4 data plane: APISIX-style stream routes, the TCP relay and the UDP proxy.

- `sluicegate.stream.routes`: the `stream_routes` config model and the compiled route table
  (pure logic, no I/O; safe for `config/` to import).
- `sluicegate.stream.tcp`: `StreamServer`, the TCP relay's listeners and accept loop;
  `connection` (a relayed connection's connect phase and timeouts) and one module per copy
  path: `copy_relay` (user space), `splice_relay` (os.splice), `sockmap_relay` (in the kernel).
- `sluicegate.stream.udp`: `UdpProxy`, per-flow UDP sessions with an idle timeout.

Nothing is imported here, so loading the config model does not pull in the event loop.
"""
