"""Rate-limit counters shared by limit-count, limit-req and limit-conn.

- `counters`: the `CounterStore` interface and the stores of the `local` policy: a table in
  a memory-mapped file shared by the workers of one host (exact across workers), and a dict
  for a single process. A Redis store (policy `redis`) implements the same interface.
- `keys`: which counter a request counts against (limit scope + the request's key).
- `options`: the options the plugins share, and the policy -> store choice.
"""

from sluicegate.limits.counters import (
    LIMITS_DIR_ENV,
    CounterStore,
    InProcessStore,
    SharedMemoryStore,
    local_store,
)

__all__ = ["LIMITS_DIR_ENV", "CounterStore", "InProcessStore", "SharedMemoryStore",
           "local_store"]
