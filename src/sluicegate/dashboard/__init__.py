"""The built-in web dashboard: static files (`static/`) and the JSON they read.

`stats` turns successive metrics snapshots into per-route rates and latency quantiles (no
I/O); `summary` describes the config being served with health and counters; `server`
mounts both under the Admin API's key, on the Admin API's listener and on its own.
"""
