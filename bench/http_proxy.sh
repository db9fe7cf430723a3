#!/usr/bin/env bash
# http_proxy.sh - HTTP/1.1 keep-alive proxy benchmark: sluicegate side by side with its peers.
#
#   cases: direct backend | nginx proxy | haproxy http | aiohttp proxy (uvloop) |
#          sluicegate (1 worker, no plugins) | sluicegate (1 worker, key-auth + prometheus)
#          plugin cost, one sluicegate case per plugin (1 worker, the plugin on the route):
#          sluicegate_keyauth | _jwt | _limitcount | _limitreq | _iprestriction | _prometheus |
#          sluicegate_all (the six together); configs bench/<case>.yaml
#   presets in CASES: "peers" = the six original cases (the default), "plugins" = nginx,
#          sluicegate and the seven plugin cases, "all" = both; mixable with case names.
#   load:  wrk -t1 -c50 -d${DURATION}s --latency, keep-alive, GET of a 100-byte body from an
#          nginx backend (1 worker). Every request carries "apikey: <key>" and "Authorization:
#          Bearer <HS256 JWT>" (needed by the auth cases; sent to every case so the request
#          bytes are identical). The JWT is signed here with the venv's pyjwt (exp in 2100).
#
# Method (as /work/shared/bench/peers.sh): backend + wrk pinned to CPU 0, the proxy under test
# alone on CPU 1 (taskset); WARMUP s of discarded wrk before each measured window; /proc snapshots
# around the window give the proxy's CPU (utime+stime of its process group) and the CPU used
# by processes this script did not start ("foreign"); a window with too much foreign CPU is
# measured again and the least disturbed attempt kept (and each attempt first waits up to
# QUIET_WAIT s for a quiet second). Every case is measured RUNS times,
# interleaved (run 1: all cases, run 2: all cases in reverse order, ...); the table reports
# medians.
#
# Usage:   bench/http_proxy.sh                       (defaults: DURATION=10 RUNS=3, 5-10 min)
#          DURATION=5 RUNS=1 CASES="nginx sluicegate" bench/http_proxy.sh
#          CASES=plugins bench/http_proxy.sh        (per-plugin cost, next to nginx)
#          PROFILE=1 bench/http_proxy.sh             (+ py-spy profile of sluicegate under load)
#          SG_REV=HEAD bench/http_proxy.sh           (measure a clean export of a commit, not src/)
# Output:  ${OUT:-/tmp/sluicegate-bench/<timestamp>}: summary.md (the table, also on stdout),
#          runs/ (raw wrk output and CPU accounting per run/case/attempt), logs/, conf/, meta.txt,
#          profile/ (PROFILE=1). Progress goes to stderr.
# Needs:   nginx haproxy wrk (apt-get install -y nginx-light haproxy wrk), the venv with
#          sluicegate, aiohttp and uvloop (.venv/bin/pip install -e '.[bench]').
set -uo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH_DIR/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PY:-$VENV/bin/python}"                 # runs the aiohttp peer
SLUICEGATE="${SLUICEGATE:-$VENV/bin/sluicegate}"
SUMMARY_PY="${SUMMARY_PY:-$PY}"              # runs summarize.py (imports sluicegate.benchrig)
DURATION="${DURATION:-10}"                   # measured seconds per case and run
RUNS="${RUNS:-3}"                            # interleaved runs; the table shows medians
WARMUP="${WARMUP:-2}"                        # discarded wrk seconds before each measurement
CONNS="${CONNS:-50}"
THREADS="${THREADS:-1}"
WRK_TIMEOUT="${WRK_TIMEOUT:-10}"             # wrk per-request timeout (s)
LOAD_CPU="${LOAD_CPU:-0}"                    # wrk (and py-spy)
BACKEND_CPU="${BACKEND_CPU:-0}"              # nginx backend
PROXY_CPU="${PROXY_CPU:-1}"                  # proxy under test
PORT_BASE="${PORT_BASE:-18380}"              # ports PORT_BASE..PORT_BASE+16, within 18300-18399
NOISE_MAX="${NOISE_MAX:-10}"                 # foreign CPU (% of one CPU) that triggers a re-measure
NOISE_RETRIES="${NOISE_RETRIES:-2}"          # extra attempts per measurement
QUIET_WAIT="${QUIET_WAIT:-30}"               # before each attempt, wait up to this many s for a quiet second
CASES="${CASES:-peers}"                      # case names and presets (peers, plugins, all)
PROFILE="${PROFILE:-0}"                      # 1: py-spy profile after the measured runs
PROFILE_CASES="${PROFILE_CASES:-}"           # default: the sluicegate cases of CASES
PROFILE_SECONDS="${PROFILE_SECONDS:-10}"
PROFILE_RATE="${PROFILE_RATE:-100}"          # py-spy samples per second
PROFILE_TOP="${PROFILE_TOP:-25}"
PYSPY_CPU="${PYSPY_CPU:-1}"                  # py-spy runs next to the proxy, see README
SG_REV="${SG_REV:-}"                         # empty: the working tree; else a git revision to export
API_KEY="bench-key-0123456789"               # the consumer key in sluicegate_keyauth_prom.yaml (and the plugin cases)
JWT_KEY="bench-jwt-key"                      # the jwt-auth consumer of sluicegate_jwt.yaml / sluicegate_all.yaml
JWT_SECRET="bench-jwt-secret-0123456789abcdef0123456789"   # its HS256 secret (same files)
JWT_EXP=4102444800                           # 2100-01-01: never expires during a run
OUT="${OUT:-/tmp/sluicegate-bench/$(date +%Y%m%d-%H%M%S)}"

BACKEND_PORT=$((PORT_BASE + 0))
NGINX_PORT=$((PORT_BASE + 1))
HAPROXY_PORT=$((PORT_BASE + 2))
AIOHTTP_PORT=$((PORT_BASE + 3))
SG_PORT=$((PORT_BASE + 4))
SG_AUTH_PORT=$((PORT_BASE + 5))
SG_AUTH_METRICS_PORT=$((PORT_BASE + 6))
SG_METRICS_PORT=$((PORT_BASE + 7))           # configured, not served (no prometheus plugin)
PORT_SPAN=17                                 # PORT_BASE+8..+16: the plugin-cost cases, below
ALL_PORTS=$(seq "$PORT_BASE" $((PORT_BASE + PORT_SPAN - 1)))

# Plugin-cost cases: config bench/<case>.yaml, the plugins on its route (drive the sanity
# checks), listen port, metrics port (prometheus cases; else the unserved SG_METRICS_PORT).
PLUGIN_CASES="sluicegate_keyauth sluicegate_jwt sluicegate_limitcount sluicegate_limitreq sluicegate_iprestriction sluicegate_prometheus sluicegate_all"
declare -A SG_CONF=([sluicegate]=sluicegate_plain.yaml [sluicegate_auth]=sluicegate_keyauth_prom.yaml)
declare -A SG_PLUGINS=([sluicegate]="" [sluicegate_auth]="key-auth prometheus"
    [sluicegate_keyauth]="key-auth" [sluicegate_jwt]="jwt-auth" [sluicegate_limitcount]="limit-count"
    [sluicegate_limitreq]="limit-req" [sluicegate_iprestriction]="ip-restriction"
    [sluicegate_prometheus]="prometheus"
    [sluicegate_all]="ip-restriction jwt-auth key-auth limit-count limit-req prometheus")
declare -A SG_LISTEN=([sluicegate]=$SG_PORT [sluicegate_auth]=$SG_AUTH_PORT)
declare -A SG_METRICS=([sluicegate_auth]=$SG_AUTH_METRICS_PORT
    [sluicegate_prometheus]=$((PORT_BASE + 15)) [sluicegate_all]=$((PORT_BASE + 16)))
i=8
for c in $PLUGIN_CASES; do SG_CONF[$c]="$c.yaml"; SG_LISTEN[$c]=$((PORT_BASE + i)); i=$((i + 1)); done

# CASES presets -> case names, in order, without repeats
expand_cases() {
    local word c out=() seen=" "
    for word in $1; do
        case $word in
        peers) set -- direct nginx haproxy aiohttp sluicegate sluicegate_auth ;;
        plugins) set -- nginx sluicegate $PLUGIN_CASES ;;
        all) set -- direct nginx haproxy aiohttp sluicegate sluicegate_auth $PLUGIN_CASES ;;
        *) set -- "$word" ;;
        esac
        for c in "$@"; do [[ $seen == *" $c "* ]] || { out+=("$c"); seen+="$c "; }; done
    done
    echo "${out[*]}"
}
CASES=$(expand_cases "$CASES")
if [[ -z $PROFILE_CASES ]]; then
    for c in $CASES; do [[ $c == sluicegate* ]] && PROFILE_CASES+="${PROFILE_CASES:+ }$c"; done
fi
BODY_PREFIX='{"ok":true,"service":"bench-backend"'
BODY_LEN=100

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if (( PORT_BASE < 18300 || PORT_BASE + PORT_SPAN - 1 > 18399 )); then
    die "PORT_BASE=$PORT_BASE puts ports outside 18300-18399"
fi
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
for t in nginx wrk taskset setsid curl ss "$SUMMARY_PY"; do
    command -v "$t" >/dev/null 2>&1 || die "missing tool: $t (apt-get install -y nginx-light haproxy wrk curl)"
done
[[ -x $SLUICEGATE ]] || die "no sluicegate at $SLUICEGATE (python -m venv .venv && .venv/bin/pip install -e '.[bench]')"
[[ -n $CASES ]] || die "CASES selects no case"
# The JWT every request carries (the jwt-auth cases verify it; the others forward it).
JWT=$("$PY" -c 'import sys, jwt; print(jwt.encode({"key": sys.argv[1], "exp": int(sys.argv[3])}, sys.argv[2], algorithm="HS256"))' \
    "$JWT_KEY" "$JWT_SECRET" "$JWT_EXP" 2>/dev/null) ||
    die "cannot sign the bench JWT with $PY (pyjwt missing? .venv/bin/pip install -e '.[bench]')"
for p in $ALL_PORTS; do
    if ss -Hltn "sport = :$p" | grep -q .; then die "port $p already in use (set PORT_BASE)"; fi
done

mkdir -p "$OUT"/{conf,logs,runs,state} || die "cannot create $OUT"

# Which sluicegate code runs: the (editable) working tree, or with SG_REV a clean export of
# that git revision, so that the reported commit is exactly the code measured even while
# others edit src/.
SG_CMD=("$SLUICEGATE")
SG_SRC_DIR="$ROOT/src"
if [[ -n $SG_REV ]]; then
    SG_COMMIT=$(git -C "$ROOT" rev-parse --short "$SG_REV^{commit}" 2>/dev/null) || die "SG_REV=$SG_REV: no such revision"
    mkdir -p "$OUT/sluicegate-src"
    git -C "$ROOT" archive "$SG_COMMIT" src | tar -x -C "$OUT/sluicegate-src" || die "git archive $SG_COMMIT failed"
    SG_CMD=(env PYTHONPATH="$OUT/sluicegate-src/src" "$PY" -m sluicegate)
    SG_SRC_DIR="$OUT/sluicegate-src/src"
    SG_FILE=$(PYTHONPATH="$OUT/sluicegate-src/src" "$PY" -c 'import sluicegate; print(sluicegate.__file__)')
    [[ $SG_FILE == "$OUT/sluicegate-src/"* ]] || die "the export of $SG_COMMIT is not what python imports ($SG_FILE)"
fi
: >"$OUT/skipped.tsv"
: >"$OUT/logs/pinning.txt"

# ------------------------------------------------------------------ process control
declare -A PIDS=()

start_srv() {   # start_srv NAME CPU CMD... : own session/process group, pinned, logged
    local name=$1 cpu=$2; shift 2
    setsid taskset -c "$cpu" "$@" >>"$OUT/logs/$name.log" 2>&1 </dev/null &
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

cleanup() {
    local n
    for n in "${!PIDS[@]}"; do stop_srv "$n"; done
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

wait_port() {   # wait_port NAME PORT [timeout_s]
    local name=$1 port=$2 t=${3:-20} i
    for i in $(seq 1 $((t * 10))); do
        ss -Hltn "sport = :$port" | grep -q . && return 0
        kill -0 "${PIDS[$name]}" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
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

skip() {   # skip CASE REASON
    printf '%s\t%s\n' "$1" "$2" >>"$OUT/skipped.tsv"
    log "SKIP $1: $2"
}

check_http() {   # check_http PORT -> 0 if the backend body comes back (with the API key and JWT)
    local body
    body=$(curl -s --max-time 5 -H "apikey: $API_KEY" -H "Authorization: Bearer $JWT" \
        "http://127.0.0.1:$1/bench") || return 1
    [[ ${#body} -eq $((BODY_LEN - 1)) || ${#body} -eq $BODY_LEN ]] && [[ $body == "$BODY_PREFIX"* ]]
}

render() {   # render TEMPLATE (conf/*.in or a sluicegate_*.yaml) -> path of the rendered copy
    local src=$1 dst i args=()
    dst="$OUT/conf/$(basename "${src%.in}")"
    # 127.0.0.1:(18380+i) -> 127.0.0.1:(PORT_BASE+i), through a placeholder so that a rewritten
    # port is never rewritten again (PORT_BASE=18381 would otherwise chain 18384 -> 18385 -> ...).
    for ((i = 0; i < PORT_SPAN; i++)); do
        args+=(-e "s/127\.0\.0\.1:$((18380 + i))\b/127.0.0.1:@SGPORT$i@/g")
    done
    for ((i = 0; i < PORT_SPAN; i++)); do args+=(-e "s/@SGPORT$i@/$((PORT_BASE + i))/g"); done
    # (the @VARS@ go last: their values are not rewritten either)
    sed "${args[@]}" -e "s/@BACKEND_PORT@/$BACKEND_PORT/g" -e "s/@NGINX_PORT@/$NGINX_PORT/g" \
        -e "s/@HAPROXY_PORT@/$HAPROXY_PORT/g" "$src" >"$dst"
    echo "$dst"
}

nginx_prefix() { mkdir -p "$OUT/state/$1/tmp"; echo "$OUT/state/$1/"; }

have_py() { [[ -x $PY ]] && "$PY" -c "import $1" 2>/dev/null; }

wrk_load() {   # wrk_load PORT SECONDS [extra wrk args] ; pinned to LOAD_CPU
    local port=$1 secs=$2; shift 2
    taskset -c "$LOAD_CPU" wrk -t"$THREADS" -c"$CONNS" -d"${secs}s" --timeout "${WRK_TIMEOUT}s" \
        --latency -H "apikey: $API_KEY" -H "Authorization: Bearer $JWT" "$@" "http://127.0.0.1:$port/bench"
}

# ------------------------------------------------------------------ metadata
git_state() {
    local rev dirty
    rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    dirty=$(git -C "$ROOT" status --porcelain --untracked-files=no -- src 2>/dev/null | wc -l)
    if (( dirty > 0 )); then echo "$rev (+$dirty uncommitted changes under src/)"; else echo "$rev"; fi
}
{
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
    echo "settings: DURATION=$DURATION RUNS=$RUNS WARMUP=$WARMUP CONNS=$CONNS THREADS=$THREADS LOAD_CPU=$LOAD_CPU BACKEND_CPU=$BACKEND_CPU PROXY_CPU=$PROXY_CPU PORT_BASE=$PORT_BASE NOISE_MAX=$NOISE_MAX NOISE_RETRIES=$NOISE_RETRIES QUIET_WAIT=$QUIET_WAIT SG_REV=${SG_REV:-<working tree>}"
    echo "cases: $CASES"
    echo "load: wrk -t$THREADS -c$CONNS -d${DURATION}s --latency -H 'apikey: ...' -H 'Authorization: Bearer <JWT>', GET /bench, $BODY_LEN-byte body, keep-alive"
    echo "nginx: $(nginx -v 2>&1 | sed 's/.*: //')"
    echo "haproxy: $(haproxy -v 2>/dev/null | head -1 | awk '{print $3}')"
    echo "wrk: $(wrk -v 2>&1 | head -1 | awk '{print $2}')"
    if [[ -x $PY ]]; then
        echo "python: $("$PY" -c 'import platform,sys; print(platform.python_version(), sys.executable)')"
        "$PY" - <<'EOF' 2>/dev/null
from importlib.metadata import version
for p in ("sluicegate", "uvloop", "httptools", "aiohttp", "pyjwt", "py-spy"):
    try:
        print(f"{p}: {version(p)}")
    except Exception:
        print(f"{p}: not installed")
EOF
    fi
} >"$OUT/meta.txt"
log "results -> $OUT"
log "$(sed -n 's/^cpu: //p' "$OUT/meta.txt"); commit $(git_state); loadavg $(cut -d' ' -f1-3 /proc/loadavg)"

# ------------------------------------------------------------------ proxies
PORT=""
declare -A SKIPPED=()

start_proxy() {   # start_proxy CASE TAG -> sets PORT; non-zero if the case cannot run
    local case=$1 name="$2" conf
    case $case in
    direct) PORT=$BACKEND_PORT; return 0 ;;
    nginx)
        PORT=$NGINX_PORT; conf=$(render "$BENCH_DIR/conf/nginx_proxy.conf.in")
        start_srv "$name" "$PROXY_CPU" nginx -p "$(nginx_prefix "$name")" -c "$conf" -e stderr ;;
    haproxy)
        command -v haproxy >/dev/null || { skip "$case" "haproxy not installed (apt-get install -y haproxy)"; return 1; }
        PORT=$HAPROXY_PORT; conf=$(render "$BENCH_DIR/conf/haproxy_http.cfg.in")
        start_srv "$name" "$PROXY_CPU" haproxy -db -f "$conf" ;;
    aiohttp)
        have_py aiohttp && have_py uvloop ||
            { skip "$case" "aiohttp/uvloop not importable from $PY (.venv/bin/pip install aiohttp uvloop)"; return 1; }
        PORT=$AIOHTTP_PORT
        start_srv "$name" "$PROXY_CPU" env LISTEN="127.0.0.1:$PORT" UPSTREAM="http://127.0.0.1:$BACKEND_PORT" \
            UVLOOP=1 "$PY" "$BENCH_DIR/aiohttp_proxy.py" ;;
    sluicegate*)
        [[ -n ${SG_CONF[$case]:-} ]] || { skip "$case" "unknown case"; return 1; }
        PORT=${SG_LISTEN[$case]}; conf=$(render "$BENCH_DIR/${SG_CONF[$case]}")
        start_srv "$name" "$PROXY_CPU" "${SG_CMD[@]}" run -c "$conf" ;;
    *) skip "$case" "unknown case"; return 1 ;;
    esac
    if ! wait_port "$name" "$PORT" 20; then
        skip "$case" "did not start listening on $PORT (see logs/$name.log)"
        stop_srv "$name"; return 1
    fi
    if ! check_http "$PORT"; then
        skip "$case" "sanity GET through port $PORT did not return the backend body (logs/$name.log)"
        stop_srv "$name"; return 1
    fi
    local problem
    if [[ $case == sluicegate* ]] && ! problem=$(check_plugins "$case" "$PORT"); then
        skip "$case" "$problem"; stop_srv "$name"; return 1
    fi
    record_pinning "$name"
}

http_code() {   # http_code PORT [curl args]: status of a GET /bench
    local port=$1; shift
    curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@" "http://127.0.0.1:$port/bench"
}

check_plugins() {   # check_plugins CASE PORT: each plugin of the case is active; else prints why
    local case=$1 port=$2 p code key=(-H "apikey: $API_KEY") jwt=(-H "Authorization: Bearer $JWT")
    for p in ${SG_PLUGINS[$case]}; do
        case $p in
        key-auth)   # without the key -> 401
            code=$(http_code "$port" "${jwt[@]}")
            [[ $code == 401 ]] || { echo "key-auth: request without the key got $code, not 401"; return 1; } ;;
        jwt-auth)   # without the token -> 401
            code=$(http_code "$port" "${key[@]}")
            [[ $code == 401 ]] || { echo "jwt-auth: request without the JWT got $code, not 401"; return 1; } ;;
        ip-restriction)   # from an address outside the whitelist -> 403
            code=$(http_code "$port" "${key[@]}" "${jwt[@]}" --interface 127.0.0.2)
            [[ $code == 403 ]] || { echo "ip-restriction: request from 127.0.0.2 got $code, not 403"; return 1; } ;;
        limit-count)   # counts: the quota headers come back
            curl -s -o /dev/null -D - --max-time 5 "${key[@]}" "${jwt[@]}" "http://127.0.0.1:$port/bench" |
                grep -qi '^x-ratelimit-limit:' || { echo "limit-count: no X-RateLimit-Limit header"; return 1; } ;;
        prometheus)   # /metrics is served
            code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:${SG_METRICS[$case]}/metrics")
            [[ $code == 200 ]] || { echo "prometheus: /metrics on port ${SG_METRICS[$case]} got $code"; return 1; } ;;
        limit-req) ;;   # nothing visible while under the rate; the non-2xx count shows a rejection
        esac
    done
}

proxy_pid() { [[ ${1} == direct ]] && echo 0 || echo "${PIDS[$2]:-0}"; }

measure() {   # measure RUN CASE
    local run=$1 case=$2 name="r${1}_${2}" base="$OUT/runs/r${1}_${2}" n=0 f rc pgid
    [[ -n ${SKIPPED[$case]:-} ]] && return 0
    if ! start_proxy "$case" "$name"; then SKIPPED[$case]=1; return 0; fi
    pgid=$(proxy_pid "$case" "$name")
    wrk_load "$PORT" "$WARMUP" >"$OUT/logs/$name.warmup.txt" 2>&1
    while :; do
        n=$((n + 1))
        if (( QUIET_WAIT > 0 )); then
            "$SUMMARY_PY" "$BENCH_DIR/summarize.py" quiet "$$" "$NOISE_MAX" "$QUIET_WAIT"
        fi
        log "run $run/$RUNS $case: wrk -d${DURATION}s via port $PORT (attempt $n)"
        "$SUMMARY_PY" "$BENCH_DIR/summarize.py" snap "$OUT/state/cpu.before"
        wrk_load "$PORT" "$DURATION" >"$base.try$n.txt" 2>&1
        rc=$?
        "$SUMMARY_PY" "$BENCH_DIR/summarize.py" snap "$OUT/state/cpu.after"
        "$SUMMARY_PY" "$BENCH_DIR/summarize.py" cpu "$OUT/state/cpu.before" "$OUT/state/cpu.after" \
            "$$" "$LOAD_CPU" "$PROXY_CPU" "$pgid" >"$base.try$n.cpu.json"
        (( rc != 0 )) && echo "NOTE: wrk exited with status $rc" >>"$base.try$n.txt"
        f=$("$SUMMARY_PY" -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["foreign_pct"]))' \
            "$base.try$n.cpu.json" 2>/dev/null || echo 0)
        (( rc != 0 )) && f=100000   # a failed attempt is never preferred
        (( f <= NOISE_MAX || n > NOISE_RETRIES )) && break
        log "    other processes used ${f}% of a CPU (or wrk failed); measuring again"
        sleep 2
    done
    "$SUMMARY_PY" "$BENCH_DIR/summarize.py" keep "$base" "$n" >&2
    if [[ -n ${SG_METRICS[$case]:-} ]]; then   # proves the prometheus plugin counted
        curl -s --max-time 5 "http://127.0.0.1:${SG_METRICS[$case]}/metrics" >"$OUT/logs/$name.metrics.txt" ||
            echo "NOTE: /metrics scrape failed" >>"$base.txt"
    fi
    if [[ $case != direct ]]; then
        kill -0 "${PIDS[$name]}" 2>/dev/null || echo "NOTE: proxy process exited during the test" >>"$base.txt"
        grep -q Traceback "$OUT/logs/$name.log" 2>/dev/null &&
            echo "NOTE: proxy logged a Python traceback (logs/$name.log)" >>"$base.txt"
        stop_srv "$name"
    fi
}

# ------------------------------------------------------------------ py-spy profile
find_pyspy() {
    if [[ -x $VENV/bin/py-spy ]]; then echo "$VENV/bin/py-spy"; return 0; fi
    command -v py-spy 2>/dev/null && return 0
    log "py-spy not found; installing it into $VENV"
    "$VENV/bin/pip" install -q py-spy >&2 && [[ -x $VENV/bin/py-spy ]] && echo "$VENV/bin/py-spy"
}

profile_case() {   # profile_case CASE: py-spy record of the proxy while wrk loads it
    local case=$1 name="profile_$1" pyspy pid dir="$OUT/profile"
    pyspy=$(find_pyspy) || { skip "profile_$case" "py-spy missing and could not be installed"; return 0; }
    mkdir -p "$dir"
    start_proxy "$case" "$name" || return 0
    pid=${PIDS[$name]}
    wrk_load "$PORT" "$WARMUP" >"$OUT/logs/$name.warmup.txt" 2>&1
    log "profile $case: py-spy record -d $PROFILE_SECONDS -r $PROFILE_RATE -f raw --pid $pid (wrk running)"
    # wrk runs a bit longer than the recording, in its own group so cleanup() can stop it.
    start_srv "${name}_wrk" "$LOAD_CPU" wrk -t"$THREADS" -c"$CONNS" -d"$((PROFILE_SECONDS + 3))s" \
        --timeout "${WRK_TIMEOUT}s" --latency -H "apikey: $API_KEY" -H "Authorization: Bearer $JWT" \
        "http://127.0.0.1:$PORT/bench"
    sleep 1
    taskset -c "$PYSPY_CPU" "$pyspy" record -d "$PROFILE_SECONDS" -r "$PROFILE_RATE" -f raw \
        -o "$dir/$case.folded" --pid "$pid" >"$dir/$case.py-spy.log" 2>&1 ||
        log "    py-spy failed (see $dir/$case.py-spy.log)"
    wait "${PIDS[${name}_wrk]}" 2>/dev/null
    unset "PIDS[${name}_wrk]"
    cp "$OUT/logs/${name}_wrk.log" "$dir/$case.wrk.txt" 2>/dev/null
    stop_srv "$name"
    if [[ -s $dir/$case.folded ]]; then
        PROFILE_SRC="$SG_SRC_DIR:$("$PY" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"] + ":" + p["stdlib"])')" \
            PROFILE_RATE="$PROFILE_RATE" PROFILE_SECONDS="$PROFILE_SECONDS" \
            "$SUMMARY_PY" "$BENCH_DIR/summarize.py" profile "$dir/$case.folded" "$PROFILE_TOP" \
            "$dir/$case.wrk.txt" >"$dir/$case.top.md"
    fi
}

# ------------------------------------------------------------------ run
conf=$(render "$BENCH_DIR/conf/nginx_backend.conf.in")
start_srv backend "$BACKEND_CPU" nginx -p "$(nginx_prefix backend)" -c "$conf" -e stderr
wait_port backend "$BACKEND_PORT" 10 || die "backend nginx did not start (see $OUT/logs/backend.log)"
record_pinning backend
check_http "$BACKEND_PORT" || die "backend did not return the expected body"

REVERSED=$(echo "$CASES" | tr ' ' '\n' | tac | tr '\n' ' ')
for run in $(seq 1 "$RUNS"); do   # odd runs in CASES order, even runs reversed: no case always first
    if (( run % 2 )); then order=$CASES; else order=$REVERSED; fi
    for c in $order; do measure "$run" "$c"; done
done

if [[ $PROFILE == 1 ]]; then
    for c in $PROFILE_CASES; do profile_case "$c"; done
fi

stop_srv backend
{
    echo "loadavg_end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "commit_end: $(git_state)"
    echo "date_end: $(date -Is)"
} >>"$OUT/meta.txt"

"$SUMMARY_PY" "$BENCH_DIR/summarize.py" table "$OUT" | tee "$OUT/summary.md"
if [[ $PROFILE == 1 ]]; then
    for c in $PROFILE_CASES; do
        [[ -s $OUT/profile/$c.top.md ]] && { echo; cat "$OUT/profile/$c.top.md"; } | tee -a "$OUT/summary.md"
    done
fi
log "done: $OUT/summary.md"
exit 0
