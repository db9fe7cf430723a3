#!/usr/bin/env bash
# interception.sh - the interception benchmark (explicit proxy, TPROXY, eBPF sk_lookup, haproxy
# in TCP mode; HTTP keep-alive, new connection per request, TCP bulk per L4 copy path) in a
# network-namespace rig. The rig script is package data of sluicegate.benchrig, which
# `sluicegate bench interception` runs too; this wrapper keeps the old entry point. Settings
# (DURATION, RUNS, CASES, LOADS, L4_COPIES, SG_REV, OUT, ...): the header of
# src/sluicegate/benchrig/interception.sh.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PY="${PY:-$ROOT/.venv/bin/python}"
export SG_ROOT="${SG_ROOT:-$ROOT}"
RIG=$("$PY" -c 'from importlib import resources; print(resources.files("sluicegate.benchrig") / "interception.sh")') ||
    { echo "bench/interception.sh: $PY cannot import sluicegate.benchrig (.venv/bin/pip install -e .)" >&2; exit 1; }
exec bash "$RIG" "$@"
