#!/usr/bin/env bash
# interception.sh - what transparent interception costs (TPROXY and eBPF sk_lookup), next to an
# explicit proxy and plain routing, and what each L4 copy path (splice, sockmap, user space)
# costs, next to haproxy in TCP mode, in a client — gateway — server rig built from network
# namespaces. Package data of sluicegate.benchrig: `python -m sluicegate.benchrig.core` (and
# `sluicegate bench interception --parts core`) run it and turn its run directory into core.json.
#
#   rig:   client ns ──veth── gateway ns (router, ip_forward) ──veth── server ns
#          10.210.1.2         10.210.1.1 | 10.210.2.1                  10.210.2.2
#          fd00:210:1::2      fd00:210:1::1 | fd00:210:2::1            fd00:210:2::2
#          server ns: nginx (1 worker, 100-byte `return 200`) on :80, iperf3 -s on :5201
#          client ns: wrk, iperf3 -c;  gateway ns: sluicegate (when the case has a proxy)
#   cases: direct   client → server address, forwarded by the gateway ns, no proxy running
#          explicit client → the gateway's address: an HTTP route (L7) / gateway.stream_proxy
#                   listener + stream route (L4) to the server
#          tproxy   client → server address, intercepted by sluicegate's tproxy plugin
#                   (handle http: default upstream = the original destination; handle tcp:
#                   the L4 relay to the original destination)
#          ebpf     the same plugin config with `mode: ebpf`: sk_lookup steering, no nft rule
#          haproxy  bulk load only: haproxy (`mode tcp`, 1 thread) as an explicit L4 proxy in
#                   the gateway ns (client → the gateway's address :5201 → the server), pinned
#                   like the gateway: the reference of issue 4's copy-path target
#   L4 copy paths: each gateway case's bulk load runs once per path in L4_COPIES
#          (gateway.stream_proxy.copy: splice | sockmap | userspace), as case "<case>-<copy>"
#   loads: keepalive  wrk -t1 -c50 -d${DURATION}s --latency, HTTP/1.1 keep-alive
#          close      the same with -H 'Connection: close' (a new TCP connection per request)
#          bulk       iperf3 -t ${IPERF_SECONDS} (default DURATION), 1 stream, client → server
#
# Method (the one of bench/http_proxy.sh, whose summarize.py it reuses): wrk/iperf3 client and
# the servers pinned to CPU 0, the gateway alone on CPU 1 (taskset works across ip netns exec);
# a fresh gateway per case and run; WARMUP s of discarded load before each measured window;
# /proc snapshots around the window give the gateway's CPU (utime+stime of its process group),
# the busy share of each CPU, and "foreign" CPU (processes this script did not start); before
# each window a wait (up to QUIET_WAIT s) for a quiet second; a window with more than NOISE_MAX %
# of a CPU of foreign use is measured again (up to NOISE_RETRIES more times) and the least
# disturbed attempt kept. RUNS runs, interleaved (odd runs in CASES order, even runs reversed);
# the table shows medians.
#
# Usage:   interception.sh                              (DURATION=10 RUNS=3: ~7-9 min)
#          DURATION=3 RUNS=1 interception.sh            (a quick look, ~1 min)
#          LOADS="keepalive" CASES="explicit tproxy" interception.sh
#          CASES="tproxy ebpf" L4_COPIES="splice sockmap" interception.sh
#          SG_REV=HEAD interception.sh                  (a clean export of a commit; needs SG_ROOT)
#          PY: the python whose sluicegate runs the gateway and the helpers
#          (python -m sluicegate.benchrig.summary); SG_ROOT: the git checkout (commit in meta.txt)
# Output:  ${OUT:-/tmp/sluicegate-bench/interception-<timestamp>}: summary.md (also on stdout),
#          runs/ (raw wrk / iperf3 JSON + CPU accounting per run/load/case/attempt), logs/,
#          conf/, meta.txt. Progress goes to stderr.
# Needs:   root; ip, nft, nginx, wrk, iperf3, curl, taskset, setsid, ss, haproxy (case haproxy)
#          (apt-get install -y nginx-light wrk iperf3 nftables curl haproxy); sluicegate in $PY.
# Leaves:  nothing: every process is stopped by its process-group id and the three namespaces
#          (names sgb-<pid>-*) are deleted on exit, error or Ctrl-C, which takes their veths,
#          nft table and policy routes with them. A run killed with SIGKILL leaves its
#          namespaces; the next run deletes them (and stops what still runs in them).
set -uo pipefail

RIG_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The checkout whose commit the results name: SG_ROOT, else the git tree holding this file
# (an editable install), else none ("unknown").
ROOT="${SG_ROOT:-$(git -C "$RIG_DIR" rev-parse --show-toplevel 2>/dev/null || true)}"
PY="${PY:-python3}"                          # runs the gateway: $PY -m sluicegate run -c FILE
summary() { "$PY" -m sluicegate.benchrig.summary "$@"; }   # /proc accounting, parsing, tables
DURATION="${DURATION:-10}"                   # measured wrk seconds per case and run
IPERF_SECONDS="${IPERF_SECONDS:-$DURATION}"  # measured iperf3 seconds
RUNS="${RUNS:-3}"                            # interleaved runs; the table shows medians
WARMUP="${WARMUP:-2}"                        # discarded seconds of load before each window
CONNS="${CONNS:-50}"
THREADS="${THREADS:-1}"
WRK_TIMEOUT="${WRK_TIMEOUT:-10}"             # wrk per-request timeout (s)
LOAD_CPU="${LOAD_CPU:-0}"                    # wrk, iperf3 client
BACKEND_CPU="${BACKEND_CPU:-0}"              # nginx, iperf3 server
GW_CPU="${GW_CPU:-1}"                        # the gateway
NOISE_MAX="${NOISE_MAX:-10}"                 # foreign CPU (% of one CPU) that triggers a re-measure
NOISE_RETRIES="${NOISE_RETRIES:-2}"          # extra attempts per measurement
QUIET_WAIT="${QUIET_WAIT:-30}"               # before each attempt, wait up to this many s for a quiet second
LOADS="${LOADS:-keepalive close bulk}"
CASES="${CASES:-direct explicit tproxy ebpf haproxy}"
L4_COPIES="${L4_COPIES:-splice sockmap}"    # bulk: each gateway case once per copy path
PRESERVE_SOURCE="${PRESERVE_SOURCE:-0}"      # 1: tproxy cases with preserve_source: true
# 1: RPS on the gateway ns's two veths sends their receive work to GW_CPU. A veth delivers on
# the sending CPU, so by default the gateway ns's receive path (and with it everything the
# sockmap copy path does, in softirq and a work queue) runs on the load CPU; RPS_GW=1 puts
# all of the gateway's kernel work on the gateway's core, for every case alike.
RPS_GW="${RPS_GW:-0}"
SG_REV="${SG_REV:-}"                         # empty: the working tree; else a git revision to export
OUT="${OUT:-/tmp/sluicegate-bench/interception-$(date +%Y%m%d-%H%M%S)}"

NS_PREFIX="sgb-"
TAG="${NS_PREFIX}$$"
NS_C="$TAG-client" NS_G="$TAG-gateway" NS_S="$TAG-server"
C4=10.210.1.2  GC4=10.210.1.1  GS4=10.210.2.1  S4=10.210.2.2
C6=fd00:210:1::2  GC6=fd00:210:1::1  GS6=fd00:210:2::1  S6=fd00:210:2::2
HTTP_PORT=80
IPERF_PORT=5201
BODY_PREFIX='{"ok":true,"service":"bench-backend"'
BODY_LEN=100

exec 3>&2   # progress always goes to the script's stderr, also from inside redirected functions
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&3; }
die() { log "ERROR: $*"; exit 1; }

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
[[ $DURATION =~ ^[1-9][0-9]*$ && $IPERF_SECONDS =~ ^[1-9][0-9]*$ ]] || die "DURATION / IPERF_SECONDS: whole seconds"
(( $(id -u) == 0 )) || die "needs root (network namespaces, nftables)"
for t in ip nft nginx wrk iperf3 curl taskset setsid ss timeout; do
    command -v "$t" >/dev/null 2>&1 || die "missing tool: $t (apt-get install -y nginx-light wrk iperf3 nftables curl)"
done
if [[ " $CASES " == *" haproxy "* ]]; then
    command -v haproxy >/dev/null 2>&1 || die "missing tool: haproxy (apt-get install -y haproxy; or leave case haproxy out of CASES)"
fi
command -v "$PY" >/dev/null 2>&1 || die "no python at $PY (set PY to the python with sluicegate installed)"
for l in $LOADS; do [[ $l =~ ^(keepalive|close|bulk)$ ]] || die "unknown load $l (keepalive close bulk)"; done
for c in $CASES; do [[ $c =~ ^(direct|explicit|tproxy|ebpf|haproxy)$ ]] || die "unknown case $c (direct explicit tproxy ebpf haproxy)"; done
for c in $L4_COPIES; do [[ $c =~ ^(splice|sockmap|userspace)$ ]] || die "unknown L4 copy path $c (splice sockmap userspace)"; done
(( GW_CPU < $(nproc) )) || die "GW_CPU=$GW_CPU but only $(nproc) CPUs"

mkdir -p "$OUT"/{conf,logs,runs,state} || die "cannot create $OUT"
# eBPF pins: a bpffs of this run, outside /sys (`ip netns exec` remounts /sys, so pins under
# /sys/fs/bpf would be private to each process); the gateway and `intercept status` share it.
BPFFS_MOUNT="$OUT/state/bpffs"
BPFFS="$BPFFS_MOUNT/sluicegate"
BPFFS_MOUNTED=0

# Which sluicegate code runs: the (editable) working tree, or with SG_REV a clean export.
SG_CMD=("$PY" -m sluicegate)
if [[ -n $SG_REV ]]; then
    [[ -n $ROOT ]] || die "SG_REV needs a git checkout: set SG_ROOT"
    SG_COMMIT=$(git -C "$ROOT" rev-parse --short "$SG_REV^{commit}" 2>/dev/null) || die "SG_REV=$SG_REV: no such revision"
    mkdir -p "$OUT/sluicegate-src"
    git -C "$ROOT" archive "$SG_COMMIT" src | tar -x -C "$OUT/sluicegate-src" || die "git archive $SG_COMMIT failed"
    SG_CMD=(env PYTHONPATH="$OUT/sluicegate-src/src" "$PY" -m sluicegate)
    SG_FILE=$(PYTHONPATH="$OUT/sluicegate-src/src" "$PY" -c 'import sluicegate; print(sluicegate.__file__)')
    [[ $SG_FILE == "$OUT/sluicegate-src/"* ]] || die "the export of $SG_COMMIT is not what python imports ($SG_FILE)"
else
    "$PY" -c 'import sluicegate' 2>/dev/null || die "$PY cannot import sluicegate (.venv/bin/pip install -e .)"
fi
: >"$OUT/skipped.tsv"
: >"$OUT/logs/pinning.txt"

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# ------------------------------------------------------------------ process control
declare -A PIDS=()

start_srv() {   # start_srv NAME CPU NS CMD... : own session/process group, pinned, in NS, logged
    local name=$1 cpu=$2 ns=$3; shift 3
    setsid taskset -c "$cpu" ip netns exec "$ns" "$@" >>"$OUT/logs/$name.log" 2>&1 </dev/null &
    PIDS[$name]=$!
}

group_alive() { ps -e -o pgid=,stat= | awk -v g="$1" '$1==g && $2 !~ /^Z/ {f=1} END {exit !f}'; }

stop_srv() {   # SIGTERM to the process group, SIGKILL after 5 s
    local name=$1 pid=${PIDS[$1]:-} i
    [[ -z $pid ]] && return 0
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 50); do group_alive "$pid" || break; sleep 0.1; done
    if group_alive "$pid"; then
        log "$name did not stop within 5 s; SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null; sleep 0.2
    fi
    wait "$pid" 2>/dev/null
    unset "PIDS[$name]"
}

record_pinning() {   # record_pinning NAME
    local pid=${PIDS[$1]:-} p
    [[ -z $pid ]] && return
    for p in $(ps -e -o pid=,pgid= | awk -v g="$pid" '$2==g {print $1}'); do
        printf '%-22s pid %-7s %s  (%s)\n' "$1" "$p" \
            "$(taskset -pc "$p" 2>/dev/null | sed 's/.*: /cpus /')" "$(ps -o comm= -p "$p")" \
            >>"$OUT/logs/pinning.txt"
    done
}

wait_port() {   # wait_port NAME NS PORT [timeout_s]
    local name=$1 ns=$2 port=$3 t=${4:-20} i
    for i in $(seq 1 $((t * 10))); do
        nsx "$ns" ss -Hltn "sport = :$port" | grep -q . && return 0
        kill -0 "${PIDS[$name]}" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# ------------------------------------------------------------------ the rig
kill_ns_procs() {   # kill_ns_procs NS: what still runs in one of our namespaces, by pid
    local pids p
    pids=$(ip netns pids "$1" 2>/dev/null) || return 0
    [[ -z $pids ]] && return 0
    for p in $pids; do kill -TERM "$p" 2>/dev/null; done
    sleep 0.5
    for p in $(ip netns pids "$1" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
}

sweep_stale() {   # namespaces of an earlier run of this script whose shell is gone (SIGKILL)
    local name pid
    for name in $(ip netns list 2>/dev/null | awk '{print $1}'); do
        [[ $name =~ ^${NS_PREFIX}([0-9]+)-(client|gateway|server)$ ]] || continue
        pid=${BASH_REMATCH[1]}
        [[ -e /proc/$pid ]] && continue
        log "deleting stale namespace $name (its bench run, pid $pid, is gone)"
        kill_ns_procs "$name"
        ip netns del "$name" 2>/dev/null
    done
}

RIG_NS=()
rig_up() {
    local ns
    for ns in "$NS_C" "$NS_G" "$NS_S"; do
        ip netns add "$ns" || return 1
        RIG_NS+=("$ns")
        nsx "$ns" ip link set lo up || return 1
    done
    # veths created directly inside the namespaces: no name ever appears in the root ns
    ip link add name eth0 netns "$NS_C" type veth peer name to-client netns "$NS_G" || return 1
    ip link add name eth0 netns "$NS_S" type veth peer name to-server netns "$NS_G" || return 1
    nsx "$NS_G" sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward && echo 1 > /proc/sys/net/ipv6/conf/all/forwarding' || return 1
    addr() {   # addr NS IF V4 V6
        nsx "$1" ip addr add "$3/24" dev "$2" && nsx "$1" ip -6 addr add "$4/64" dev "$2" nodad &&
            nsx "$1" ip link set "$2" up
    }
    addr "$NS_C" eth0 "$C4" "$C6" && addr "$NS_G" to-client "$GC4" "$GC6" &&
        addr "$NS_G" to-server "$GS4" "$GS6" && addr "$NS_S" eth0 "$S4" "$S6" || return 1
    nsx "$NS_C" ip route add default via "$GC4" && nsx "$NS_C" ip -6 route add default via "$GC6" &&
        nsx "$NS_S" ip route add default via "$GS4" && nsx "$NS_S" ip -6 route add default via "$GS6" || return 1
    # The Connection: close load opens ~15k connections/s from one client address to one
    # server address and port. When wrk closes first (it does, through a proxy: the proxy's FIN
    # comes after the response) the client ns keeps each port in TIME_WAIT for 60 s; once
    # the ~27k even ports connect() prefers are used up, every connect() scans the range and
    # the load collapses to a few hundred req/s with CPU 0 at 100 %. So, in the client ns
    # only (all cases alike): the full port range and TIME_WAIT reuse for outgoing connections.
    nsx "$NS_C" sh -c 'echo "1024 65535" > /proc/sys/net/ipv4/ip_local_port_range &&
        echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse' || return 1
    if [[ $RPS_GW == 1 ]]; then
        local mask dev
        mask=$(printf '%x' $((1 << GW_CPU)))
        for dev in to-client to-server; do
            nsx "$NS_G" sh -c "echo $mask > /sys/class/net/$dev/queues/rx-0/rps_cpus" || return 1
        done
    fi
}

rig_down() {
    local ns
    for ns in "${RIG_NS[@]}"; do
        kill_ns_procs "$ns"
        ip netns del "$ns" 2>/dev/null
    done
    RIG_NS=()
}

leftovers() {   # what of this run is still there (should print nothing)
    local n
    ip netns list 2>/dev/null | awk '{print $1}' | grep -F "$TAG-" | sed 's/^/namespace /'
    for n in to-client to-server; do
        ip -o link show 2>/dev/null | grep -q ": $n[@:]" && echo "link $n in the root namespace"
    done
    for n in "${!PIDS[@]}"; do group_alive "${PIDS[$n]}" && echo "process group $n (${PIDS[$n]})"; done
}

cleanup() {
    local n left
    trap - EXIT INT TERM
    for n in "${!PIDS[@]}"; do stop_srv "$n"; done
    rig_down
    if (( BPFFS_MOUNTED )); then umount -l "$BPFFS_MOUNT" 2>/dev/null; BPFFS_MOUNTED=0; fi
    left=$(leftovers)
    if [[ -n $left ]]; then log "LEFT BEHIND: $left"; else log "rig removed (namespaces $TAG-*)"; fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------ configs
render_backend() {   # the nginx backend of bench/http_proxy.sh (1 worker, 100-byte body) on :80, v4 + v6
    local dst="$OUT/conf/nginx_backend.conf"
    cat >"$dst" <<EOF
# Backend of the interception rig: nginx, 1 worker, a fixed 100-byte JSON body for every GET
# (bench/conf/nginx_backend.conf.in with the rig's listen lines). Pinned by taskset.
worker_processes 1;
daemon off;
master_process on;
pid nginx.pid;
error_log stderr warn;
worker_rlimit_nofile 16384;
events {
    worker_connections 8192;
    multi_accept off;
}
http {
    access_log off;
    default_type application/json;
    server_tokens off;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    server {
        listen $HTTP_PORT backlog=4096;
        listen [::]:$HTTP_PORT ipv6only=on backlog=4096;
        location / {
            # 99 characters + "\n" = 100 bytes
            return 200 '{"ok":true,"service":"bench-backend","pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}\n';
        }
    }
}
EOF
    echo "$dst"
}

tproxy_extra() { [[ $PRESERVE_SOURCE == 1 ]] && echo ", preserve_source: true"; }
mode_of() { if [[ $1 == ebpf ]]; then echo ebpf; else echo tproxy; fi; }

write_configs() {
    # Access logs are off (no file-logger), no prometheus: the bare forwarding path.
    # The L7 upstream of the explicit route keeps the default keepalive_pool, which is also
    # what the tproxy original-destination upstream uses (size 320, 1000 requests/conn).
    cat >"$OUT/conf/explicit_l7.yaml" <<EOF
# explicit L7 proxy: the client targets the gateway ($GC4:$HTTP_PORT), one route to the server
gateway:
  listen: ["$GC4:$HTTP_PORT"]
  metrics_listen: "127.0.0.1:9091"   # not served (no prometheus plugin)
  workers: 1
  drain_timeout: 1
upstreams:
  - id: server
    nodes: {"$S4:$HTTP_PORT": 1}
routes:
  - id: bench
    uri: /*
    upstream_id: server
EOF
    local case copy
    for case in tproxy ebpf; do
        cat >"$OUT/conf/${case}_l7.yaml" <<EOF
# ${case} L7: the client targets the server ($S4:$HTTP_PORT); traffic to port $HTTP_PORT routed
# through the gateway is intercepted (mode: $(mode_of $case)), parsed and sent to its original
# destination
gateway:
  listen: ["127.0.0.1:9080"]         # unused explicit listener
  metrics_listen: "127.0.0.1:9091"
  workers: 1
  drain_timeout: 1
plugins:
  - name: tproxy
    config: {listen: "0.0.0.0:$HTTP_PORT", tproxy: true, mode: $(mode_of $case), handle: http$(tproxy_extra)}
EOF
    done
    for copy in $L4_COPIES; do
        cat >"$OUT/conf/explicit_l4_${copy}.yaml" <<EOF
# explicit L4 proxy: the client targets the gateway ($GC4:$IPERF_PORT), one stream route;
# bytes relayed by the $copy copy path
gateway:
  listen: ["127.0.0.1:9080"]
  metrics_listen: "127.0.0.1:9091"
  workers: 1
  drain_timeout: 1
  stream_proxy:
    tcp: ["$GC4:$IPERF_PORT"]
    copy: $copy
stream_routes:
  - id: iperf
    server_port: $IPERF_PORT
    upstream:
      nodes: {"$S4:$IPERF_PORT": 1}
EOF
        for case in tproxy ebpf; do
            cat >"$OUT/conf/${case}_l4_${copy}.yaml" <<EOF
# ${case} L4: the client targets the server ($S4:$IPERF_PORT); intercepted TCP to port
# $IPERF_PORT (mode: $(mode_of $case)) is relayed as bytes to its original destination by the
# $copy copy path
gateway:
  listen: ["127.0.0.1:9080"]
  metrics_listen: "127.0.0.1:9091"
  workers: 1
  drain_timeout: 1
  stream_proxy:
    copy: $copy
plugins:
  - name: tproxy
    config: {listen: "0.0.0.0:$IPERF_PORT", tproxy: true, mode: $(mode_of $case), handle: tcp$(tproxy_extra)}
EOF
        done
    done
}

write_haproxy_config() {   # haproxy in TCP mode: the explicit L4 reference of the bulk load
    cat >"$OUT/conf/haproxy_l4.cfg" <<EOF
# haproxy, mode tcp, 1 thread: the client targets the gateway ($GC4:$IPERF_PORT), relayed to the
# server ($S4:$IPERF_PORT); the same addresses as the explicit L4 case of sluicegate
global
    nbthread 1
    maxconn 1024
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe_tcp
    bind $GC4:$IPERF_PORT
    default_backend be_tcp
backend be_tcp
    server s1 $S4:$IPERF_PORT
EOF
}

# ------------------------------------------------------------------ metadata
git_state() {
    local rev dirty
    [[ -n $ROOT ]] || { echo unknown; return; }
    rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    dirty=$(git -C "$ROOT" status --porcelain --untracked-files=no -- src 2>/dev/null | wc -l)
    if (( dirty > 0 )); then echo "$rev (+$dirty uncommitted changes under src/)"; else echo "$rev"; fi
}
write_meta() {
    echo "date: $(date -Is)"
    echo "host: $(hostname)"
    echo "cpu: $(lscpu | sed -n 's/^Model name:[[:space:]]*//p') ($(nproc) CPUs)"
    echo "kernel: $(uname -r)"
    echo "loadavg_start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "commit_start: $(git_state)"
    if [[ -n $SG_REV ]]; then
        echo "sluicegate_code: git archive of $SG_COMMIT ($SG_REV) in $OUT/sluicegate-src"
    else
        echo "sluicegate_code: working tree $ROOT/src at $(git_state)"
    fi
    echo "settings: DURATION=$DURATION IPERF_SECONDS=$IPERF_SECONDS RUNS=$RUNS WARMUP=$WARMUP CONNS=$CONNS THREADS=$THREADS LOAD_CPU=$LOAD_CPU BACKEND_CPU=$BACKEND_CPU GW_CPU=$GW_CPU NOISE_MAX=$NOISE_MAX NOISE_RETRIES=$NOISE_RETRIES QUIET_WAIT=$QUIET_WAIT PRESERVE_SOURCE=$PRESERVE_SOURCE RPS_GW=$RPS_GW SG_REV=${SG_REV:-<working tree>}"
    echo "loads: $LOADS"
    echo "cases: $CASES"
    echo "l4_copies: $L4_COPIES"
    echo "rig: namespaces $NS_C ($C4) / $NS_G ($GC4 | $GS4, forwarding) / $NS_S ($S4), veth pairs"
    echo "load_keepalive: wrk -t$THREADS -c$CONNS -d${DURATION}s --latency, GET /bench, $BODY_LEN-byte body, keep-alive"
    echo "load_close: wrk -t$THREADS -c$CONNS -d${DURATION}s --latency -H 'Connection: close'"
    echo "load_bulk: iperf3 -c -t $IPERF_SECONDS -J, 1 stream, client -> server"
    echo "nginx: $(nginx -v 2>&1 | sed 's/.*: //')"
    echo "wrk: $(wrk -v 2>&1 | head -1 | awk '{print $2}')"
    echo "iperf3: $(iperf3 --version 2>/dev/null | head -1 | awk '{print $2}')"
    echo "nft: $(nft --version 2>/dev/null | awk '{print $2}')"
    echo "haproxy: $(haproxy -v 2>/dev/null | head -1 | awk '{print $3}')"
    echo "python: $("$PY" -c 'import platform,sys; print(platform.python_version(), sys.executable)')"
    "$PY" - <<'EOF' 2>/dev/null
from importlib.metadata import version
for p in ("sluicegate", "uvloop", "httptools"):
    try:
        print(f"{p}: {version(p)}")
    except Exception:
        print(f"{p}: not installed")
EOF
}

# ------------------------------------------------------------------ cases
skip() {   # skip KEY REASON   (KEY = load/case)
    printf '%s\t%s\n' "$1" "$2" >>"$OUT/skipped.tsv"
    log "SKIP $1: $2"
}

check_http() {   # check_http URL -> 0 if the backend body comes back, from the client ns (3 tries)
    local body try rc
    for try in 1 2 3; do
        body=$(nsx "$NS_C" curl -sS --max-time 3 "$1" 2>>"$OUT/logs/check_http.txt")
        rc=$?
        if (( rc == 0 )) && [[ ${#body} -eq $((BODY_LEN - 1)) || ${#body} -eq $BODY_LEN ]] &&
            [[ $body == "$BODY_PREFIX"* ]]; then
            return 0
        fi
        echo "$(date +%T) GET $1 try $try: curl exit $rc, body ${body:0:80}" >>"$OUT/logs/check_http.txt"
        sleep 0.5
    done
    return 1
}

sg_table() { nsx "$NS_G" nft list tables 2>/dev/null | grep -c 'inet sluicegate'; }

capture_packets() {   # packets counted by the table's tproxy rules (0 when none)
    nsx "$NS_G" nft list table inet sluicegate 2>/dev/null |
        awk '/tproxy/ && /packets/ {for (i = 1; i < NF; i++) if ($i == "packets") s += $(i + 1)} END {print s + 0}'
}

# eBPF mode: what `sluicegate intercept status` says about the pins of this run's bpffs.
ebpf_status() { nsx "$NS_G" env SLUICEGATE_BPFFS="$BPFFS" "${SG_CMD[@]}" intercept status 2>/dev/null; }
ebpf_installed() {
    ebpf_status | "$PY" -c 'import json,sys; sys.exit(0 if json.load(sys.stdin).get("installed") else 1)' 2>/dev/null
}
ebpf_assigned() {   # connections/datagrams sg_sk_lookup steered to the gateway so far
    ebpf_status | "$PY" -c 'import json,sys; print(json.load(sys.stdin).get("counters", {}).get("assigned", 0))' 2>/dev/null || echo 0
}
ebpf_pins() { if [[ -d $BPFFS ]]; then find "$BPFFS" -mindepth 1 -maxdepth 1 | wc -l; else echo 0; fi; }

capture_count() {   # capture_count CASE: tproxy rule packets / sk_lookup steerings so far
    case $1 in
        tproxy) capture_packets ;;
        ebpf) ebpf_assigned ;;
        *) echo 0 ;;
    esac
}
intercepting() { [[ $1 == tproxy || $1 == ebpf ]]; }

GW=""        # name of the running gateway (PIDS key), empty for direct
start_gateway() {   # start_gateway CASE LAYER(l7|l4) RUN [COPY] -> sets GW; non-zero if it cannot run
    local case=$1 layer=$2 run=$3 copy=${4:-} conf port name
    GW=""
    if [[ $case == direct ]]; then
        # direct must really be direct: no listener, no interception in the gateway ns
        if (( $(sg_table) > 0 )); then
            nsx "$NS_G" nft list ruleset >"$OUT/logs/stale_ruleset.txt" 2>&1
            die "a sluicegate table is still installed in the gateway ns before a direct case"
        fi
        (( $(ebpf_pins) == 0 )) || die "eBPF interception pins are still in $BPFFS before a direct case"
        return 0
    fi
    conf="$OUT/conf/${case}_${layer}${copy:+_$copy}.yaml"
    name="gw_r${run}_${case}_${layer}${copy:+_$copy}"
    if [[ $layer == l7 ]]; then port=$HTTP_PORT; else port=$IPERF_PORT; fi
    if [[ $case == haproxy ]]; then   # the reference proxy, on the gateway's core
        start_srv "$name" "$GW_CPU" "$NS_G" haproxy -db -f "$OUT/conf/haproxy_l4.cfg"
    else
        start_srv "$name" "$GW_CPU" "$NS_G" env SLUICEGATE_BPFFS="$BPFFS" "${SG_CMD[@]}" run -c "$conf"
    fi
    if ! wait_port "$name" "$NS_G" "$port" 20; then
        stop_srv "$name"; return 1
    fi
    local i
    if [[ $case == tproxy ]]; then   # listeners open before the rules go in
        for i in $(seq 1 100); do (( $(sg_table) > 0 )) && break; sleep 0.1; done
        (( $(sg_table) > 0 )) || { stop_srv "$name"; return 1; }
    elif [[ $case == ebpf ]]; then   # the same for the sk_lookup link and its routing
        for i in $(seq 1 40); do ebpf_installed && break; sleep 0.2; done
        ebpf_installed || { stop_srv "$name"; return 1; }
    fi
    record_pinning "$name"
    GW=$name
}

stop_gateway() {   # stop the gateway of a case; checks it removed its interception
    local case=$1 layer=$2 run=$3
    [[ -z $GW ]] && return 0
    if [[ $case == tproxy ]]; then
        nsx "$NS_G" nft list table inet sluicegate >"$OUT/logs/$GW.nft.txt" 2>&1
    elif [[ $case == ebpf ]]; then
        ebpf_status >"$OUT/logs/$GW.ebpf.json"
    fi
    local notes="$OUT/state/gwnotes"
    : >"$notes"
    kill -0 "${PIDS[$GW]}" 2>/dev/null || echo "NOTE: gateway process exited during the test" >>"$notes"
    stop_srv "$GW"
    # A stopped TPROXY gateway leaves TIME_WAIT sockets in the gateway ns whose local address is
    # the server's (the intercepted 4-tuples). For up to 60 s the router then silently drops a
    # new connection that reuses such a tuple: early demux attaches the TIME_WAIT socket and
    # ip_forward drops packets that carry a socket. The next case (direct) would hang on
    # those; count them (logs/<gw>.timewait.txt) and destroy every TIME_WAIT socket of the
    # gateway ns (ss -K; all are this run's), so that each case starts from a clean router.
    local tw
    tw=$(nsx "$NS_G" ss -Htan state time-wait 2>/dev/null | wc -l)
    nsx "$NS_G" ss -K -Htan state time-wait >/dev/null 2>&1
    echo "TIME_WAIT sockets in the gateway ns after stop: $tw; after ss -K: $(nsx "$NS_G" ss -Htan state time-wait 2>/dev/null | wc -l)" \
        >"$OUT/logs/$GW.timewait.txt"
    grep -q Traceback "$OUT/logs/$GW.log" 2>/dev/null &&
        echo "NOTE: gateway logged a Python traceback (logs/$GW.log)" >>"$notes"
    grep -q "sockmap unavailable" "$OUT/logs/$GW.log" 2>/dev/null &&
        echo "NOTE: sockmap could not load, the relay fell back (logs/$GW.log)" >>"$notes"
    if (( $(ebpf_pins) > 0 )); then
        log "the gateway left eBPF pins behind; removing them (intercept down)"
        nsx "$NS_G" env SLUICEGATE_BPFFS="$BPFFS" "${SG_CMD[@]}" intercept down >>"$OUT/logs/$GW.log" 2>&1
        echo "NOTE: gateway left its eBPF interception pinned at exit" >>"$notes"
    fi
    if (( $(sg_table) > 0 )); then
        log "the gateway left its nft table behind; removing it (intercept down)"
        nsx "$NS_G" "${SG_CMD[@]}" intercept down >>"$OUT/logs/$GW.log" 2>&1
        echo "NOTE: gateway left its interception installed at exit" >>"$notes"
    fi
    GW=""
}

url_of() {   # url_of CASE
    if [[ $1 == explicit || $1 == haproxy ]]; then echo "http://$GC4:$HTTP_PORT/bench"; else echo "http://$S4:$HTTP_PORT/bench"; fi
}
iperf_host() { if [[ $1 == explicit || $1 == haproxy ]]; then echo "$GC4"; else echo "$S4"; fi; }

wrk_load() {   # wrk_load URL SECONDS [extra wrk args]: in the client ns, pinned to LOAD_CPU
    local url=$1 secs=$2; shift 2
    timeout --foreground $((secs + 30)) taskset -c "$LOAD_CPU" ip netns exec "$NS_C" \
        wrk -t"$THREADS" -c"$CONNS" -d"${secs}s" --timeout "${WRK_TIMEOUT}s" --latency "$@" "$url"
}

iperf_load() {   # iperf_load HOST SECONDS: in the client ns, pinned to LOAD_CPU, JSON on stdout
    timeout --foreground $(($2 + 30)) taskset -c "$LOAD_CPU" ip netns exec "$NS_C" \
        iperf3 -c "$1" -p "$IPERF_PORT" -t "$2" -J
}

window() {   # window BASE N GW_PGID STDOUT STDERR CMD... : one attempt: quiet wait, snapshots around CMD
    local base=$1 n=$2 pgid=$3 out=$4 err=$5 rc; shift 5
    if (( QUIET_WAIT > 0 )); then
        summary quiet "$$" "$NOISE_MAX" "$QUIET_WAIT"
    fi
    summary snap "$OUT/state/cpu.before"
    "$@" >"$out" 2>"$err"
    rc=$?
    summary snap "$OUT/state/cpu.after"
    summary cpu "$OUT/state/cpu.before" "$OUT/state/cpu.after" \
        "$$" "$LOAD_CPU" "$GW_CPU" "$pgid" >"$base.try$n.cpu.json"
    return $rc
}

foreign_of() {   # foreign_of CPU_JSON -> rounded foreign %
    "$PY" -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["foreign_pct"]))' "$1" 2>/dev/null || echo 0
}

measure_http() {   # measure_http RUN LOAD CASE
    local run=$1 load=$2 case=$3 base="$OUT/runs/r${1}_${2}_${3}" n=0 f rc pgid url before after
    local -a extra=()
    [[ $load == close ]] && extra=(-H "Connection: close")
    url=$(url_of "$case")
    pgid=0
    [[ -n $GW ]] && pgid=${PIDS[$GW]:-0}
    if ! check_http "$url"; then
        skip "$load/$case" "sanity GET of $url from the client ns did not return the backend body (logs/check_http.txt)"
        return 0
    fi
    before=$(capture_count "$case")
    wrk_load "$url" "$WARMUP" "${extra[@]}" >"$OUT/logs/r${run}_${load}_${case}.warmup.txt" 2>&1
    while :; do
        n=$((n + 1))
        log "run $run/$RUNS $load/$case: wrk -d${DURATION}s ${extra[*]:+${extra[*]} }$url (attempt $n)"
        window "$base" "$n" "$pgid" "$base.try$n.txt" "$base.try$n.err" wrk_load "$url" "$DURATION" "${extra[@]}"
        rc=$?
        cat "$base.try$n.err" >>"$base.try$n.txt" && rm -f "$base.try$n.err"
        (( rc != 0 )) && echo "NOTE: wrk exited with status $rc" >>"$base.try$n.txt"
        f=$(foreign_of "$base.try$n.cpu.json")
        (( rc != 0 )) && f=100000   # a failed attempt is never preferred
        (( f <= NOISE_MAX || n > NOISE_RETRIES )) && break
        log "    other processes used ${f}% of a CPU (or wrk failed); measuring again"
        sleep 2
    done
    summary keep "$base" "$n" >&2
    if intercepting "$case"; then   # the traffic really was intercepted
        after=$(capture_count "$case")
        (( after > before )) || echo "NOTE: the $case interception counted nothing: traffic was not intercepted" >>"$base.txt"
        echo "$case capture counter (tproxy: rule packets, ebpf: sk_lookup assigned): $before -> $after" >>"$OUT/logs/r${run}_${load}_${case}.intercept.txt"
    fi
}

measure_bulk() {   # measure_bulk RUN CASE KEY (KEY = CASE-COPY, or direct)
    local run=$1 case=$2 key=$3 base="$OUT/runs/r${1}_bulk_${3}" n=0 f rc pgid host before after
    host=$(iperf_host "$case")
    pgid=0
    [[ -n $GW ]] && pgid=${PIDS[$GW]:-0}
    before=$(capture_count "$case")
    if ! iperf_load "$host" "$WARMUP" >"$OUT/logs/r${run}_bulk_${key}.warmup.json" 2>&1; then
        skip "bulk/$key" "warm-up iperf3 to $host:$IPERF_PORT failed (logs/r${run}_bulk_${key}.warmup.json)"
        return 0
    fi
    while :; do
        n=$((n + 1))
        log "run $run/$RUNS bulk/$key: iperf3 -t $IPERF_SECONDS -c $host (attempt $n)"
        window "$base" "$n" "$pgid" "$base.try$n.json" "$base.try$n.err" iperf_load "$host" "$IPERF_SECONDS"
        rc=$?
        f=$(foreign_of "$base.try$n.cpu.json")
        (( rc != 0 )) && { f=100000; echo "iperf3 exited with status $rc" >>"$base.try$n.err"; }
        (( f <= NOISE_MAX || n > NOISE_RETRIES )) && break
        log "    other processes used ${f}% of a CPU (or iperf3 failed); measuring again"
        sleep 2
    done
    summary keep-iperf "$base" "$n" >&2
    : >"$base.notes"
    if intercepting "$case"; then
        after=$(capture_count "$case")
        (( after > before )) || echo "the $case interception counted nothing: traffic was not intercepted" >>"$base.notes"
        echo "$case capture counter: $before -> $after" >>"$OUT/logs/r${run}_bulk_${key}.intercept.txt"
    fi
}

run_case() {   # run_case RUN CASE LAYER [COPY]: one gateway, the loads of that layer
    local run=$1 case=$2 layer=$3 copy=${4:-} load loads=() key k
    key=$case${copy:+-$copy}   # bulk results are per case and copy path
    for load in $LOADS; do
        if [[ $layer == l7 && $load != bulk ]] || [[ $layer == l4 && $load == bulk ]]; then loads+=("$load"); fi
    done
    (( ${#loads[@]} )) || return 0
    : >"$OUT/state/gwnotes"
    if ! start_gateway "$case" "$layer" "$run" "$copy"; then
        for load in "${loads[@]}"; do
            if [[ $load == bulk ]]; then k=$key; else k=$case; fi
            skip "$load/$k" "the gateway did not start (or installed no interception) within 20 s (logs/gw_r${run}_${case}_${layer}${copy:+_$copy}.log)"
        done
        return 0
    fi
    for load in "${loads[@]}"; do
        if [[ $load == bulk ]]; then measure_bulk "$run" "$case" "$key"; else measure_http "$run" "$load" "$case"; fi
    done
    stop_gateway "$case" "$layer" "$run"
    if [[ -s $OUT/state/gwnotes ]]; then   # gateway trouble: noted on each of its measurements
        for load in "${loads[@]}"; do
            if [[ $load == bulk ]]; then
                [[ -f $OUT/runs/r${run}_bulk_${key}.json ]] &&
                    sed 's/^NOTE: //' "$OUT/state/gwnotes" >>"$OUT/runs/r${run}_bulk_${key}.notes"
            else
                [[ -f $OUT/runs/r${run}_${load}_${case}.txt ]] &&
                    cat "$OUT/state/gwnotes" >>"$OUT/runs/r${run}_${load}_${case}.txt"
            fi
        done
    fi
}

# ------------------------------------------------------------------ run
sweep_stale
write_meta >"$OUT/meta.txt"
log "results -> $OUT"
log "$(sed -n 's/^cpu: //p' "$OUT/meta.txt"); commit $(git_state); loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
write_configs
if [[ " $CASES " == *" haproxy "* ]]; then
    write_haproxy_config
    haproxy -c -f "$OUT/conf/haproxy_l4.cfg" >"$OUT/logs/validate_haproxy_l4.txt" 2>&1 ||
        die "haproxy config does not validate: $(cat "$OUT/logs/validate_haproxy_l4.txt")"
fi
for f in "$OUT"/conf/*.yaml; do
    "${SG_CMD[@]}" validate "$f" >"$OUT/logs/validate_$(basename "$f" .yaml).txt" 2>&1 ||
        die "config $f does not validate: $(cat "$OUT/logs/validate_$(basename "$f" .yaml).txt")"
done

if [[ " $CASES " == *" ebpf "* ]]; then
    mkdir -p "$BPFFS_MOUNT" && mount -t bpf bpf "$BPFFS_MOUNT" || die "cannot mount a bpffs on $BPFFS_MOUNT"
    BPFFS_MOUNTED=1
fi
rig_up || die "could not build the namespace rig"
log "rig up: $NS_C ($C4) — $NS_G ($GC4 | $GS4) — $NS_S ($S4)"
conf=$(render_backend)
mkdir -p "$OUT/state/nginx/tmp"
start_srv backend "$BACKEND_CPU" "$NS_S" nginx -p "$OUT/state/nginx/" -c "$conf" -e stderr
wait_port backend "$NS_S" "$HTTP_PORT" 10 || die "backend nginx did not start (see $OUT/logs/backend.log)"
record_pinning backend
check_http "http://$S4:$HTTP_PORT/bench" || die "the backend did not return the expected body through the rig"
if [[ " $LOADS " == *" bulk "* ]]; then
    start_srv iperf_server "$BACKEND_CPU" "$NS_S" iperf3 -s -p "$IPERF_PORT"
    wait_port iperf_server "$NS_S" "$IPERF_PORT" 10 || die "iperf3 server did not start (see $OUT/logs/iperf_server.log)"
    record_pinning iperf_server
fi

read -r -a CASE_LIST <<<"$CASES"
for run in $(seq 1 "$RUNS"); do
    order=("${CASE_LIST[@]}")
    if (( run % 2 == 0 )); then   # even runs in reverse order: no case always goes first
        order=(); for (( i = ${#CASE_LIST[@]} - 1; i >= 0; i-- )); do order+=("${CASE_LIST[i]}"); done
    fi
    for c in "${order[@]}"; do [[ $c == haproxy ]] || run_case "$run" "$c" l7; done   # haproxy: L4 only
    for c in "${order[@]}"; do
        if [[ $c == direct || $c == haproxy ]]; then run_case "$run" "$c" l4; continue; fi
        for copy in $L4_COPIES; do run_case "$run" "$c" l4 "$copy"; done
    done
done

{
    echo "loadavg_end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "commit_end: $(git_state)"
    echo "date_end: $(date -Is)"
} >>"$OUT/meta.txt"
cleanup
trap 'log "interrupted"; exit 130' INT TERM
left=$(leftovers)
echo "leftovers: ${left:-none}" >>"$OUT/meta.txt"

summary table "$OUT" | tee "$OUT/summary.md"
log "done: $OUT/summary.md"
exit 0
