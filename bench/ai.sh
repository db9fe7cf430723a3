#!/usr/bin/env bash
# ai.sh - sluicegate's AI gateway (ai-proxy) side by side with the LiteLLM proxy (issue 7).
#
#   cases: direct (client -> fake provider) | sluicegate (1 worker, ai-proxy) |
#          litellm (LiteLLM proxy, `litellm --config ... --num_workers 1`)
#   fake provider, on loopback, the same for every case:
#          non-streamed: nginx (1 worker) answering a canned OpenAI chat.completion with `usage`
#          (bench/conf/ai_fake_nginx.conf.in): fast enough never to be the bottleneck;
#          streamed: tests/servers/fake_llm.py (real OpenAI SSE: role chunk, a chunk per word,
#          finish chunk, usage chunk, [DONE]).
#   per case and run:
#     1. throughput: wrk -t1 -c$CONNS -d$DURATION s, POST of a non-streamed chat completion
#        (bench/ai_chat.lua), req/s and the proxy's CPU per request (its process group, /proc);
#     2. latency: wrk -t1 -c1 -d$LAT_DURATION s, same request one at a time: p50/p99; "added"
#        = the case's p50/p99 minus direct's;
#     3. streaming: bench/ai_load.py ttft, $TTFT_REQUESTS streamed requests one at a time over
#        a raw keep-alive socket: time to the first content token, p50/p99, and added vs direct.
#
# Method (as bench/http_proxy.sh and /work/shared/bench/peers.sh): fake providers + wrk + the
# TTFT client pinned to CPU 0, the proxy under test alone on CPU 1 (taskset); a fresh proxy per
# case and run, a sanity request (JSON and stream, with usage) before measuring, WARMUP s of
# discarded wrk, /proc snapshots around the throughput window (proxy CPU; "foreign" CPU of
# processes this script did not start: a disturbed window is measured again, the least
# disturbed attempt kept); RUNS interleaved runs (odd runs in CASES order, even reversed);
# medians. Ratios sluicegate/LiteLLM and the issue's targets (≥ 10× LiteLLM's req/s, ≤ 1 ms
# added p50) are in the table.
#
# LiteLLM lives in its own venv outside the repo ($LITELLM_VENV, default
# /opt/sluicegate-bench/litellm-venv), created here with `pip install "$LITELLM_SPEC"
# $LITELLM_EXTRA` when missing. It is started with LITELLM_LOCAL_MODEL_COST_MAP=True (else it
# fetches its model cost map from GitHub when imported), no database, no callbacks, telemetry
# off, log level ERROR, bound to 127.0.0.1; its sockets to anything but loopback are recorded
# in logs/*.net.txt after start and after the measurements. Auth: sluicegate runs without an
# auth plugin here, so by default LiteLLM runs without a master key too (LITELLM_AUTH=off:
# LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY=true, as it refuses to start keyless
# otherwise) - its fastest setting. LITELLM_AUTH=on gives it the master key AI_BENCH_KEY that
# every client sends anyway.
#
# Usage:   bench/ai.sh                                 (defaults: DURATION=10 RUNS=3, ~6 min)
#          DURATION=3 RUNS=1 LAT_DURATION=2 TTFT_REQUESTS=100 bench/ai.sh      (smoke)
#          CASES="direct sluicegate" bench/ai.sh       (no LiteLLM)
#          SG_REV=HEAD bench/ai.sh                     (measure a clean export of a commit)
#          PROFILE=1 bench/ai.sh                       (+ py-spy profiles of both proxies under load)
# Output:  ${OUT:-/tmp/sluicegate-bench/ai-<timestamp>}: summary.md (also on stdout), runs/
#          (raw wrk output, CPU accounting, TTFT samples per run/case), logs/, conf/, meta.txt.
# Needs:   nginx wrk curl (apt-get install -y nginx-light wrk curl), the venv with sluicegate
#          (.venv/bin/pip install -e '.[test]' for aiohttp/uvloop/yaml of fake_llm.py).
set -uo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH_DIR/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PY:-$VENV/bin/python}"                 # runs fake_llm.py
SLUICEGATE="${SLUICEGATE:-$VENV/bin/sluicegate}"
HELPER_PY="${HELPER_PY:-$PY}"                # runs summarize.py (imports sluicegate.benchrig) and ai_load.py
LITELLM_VENV="${LITELLM_VENV:-/opt/sluicegate-bench/litellm-venv}"
LITELLM_SPEC="${LITELLM_SPEC:-litellm[proxy]}"   # pin here for a reproducible peer, e.g. litellm[proxy]==1.108.7
# litellm[proxy] lacks opentelemetry-sdk, and its key check then retries a failing import on
# every request (~18 % of its CPU in a profile, 1.108.7): installed so LiteLLM runs at its best.
LITELLM_EXTRA="${LITELLM_EXTRA:-opentelemetry-sdk}"
LITELLM_START_TIMEOUT="${LITELLM_START_TIMEOUT:-90}"
DURATION="${DURATION:-10}"                   # measured throughput seconds per case and run
RUNS="${RUNS:-3}"
WARMUP="${WARMUP:-2}"
CONNS="${CONNS:-50}"
LAT_DURATION="${LAT_DURATION:-5}"            # seconds of wrk -c1 for p50/p99
TTFT_REQUESTS="${TTFT_REQUESTS:-300}"        # streamed requests (after 20 warm-up ones)
WRK_TIMEOUT="${WRK_TIMEOUT:-10}"
LOAD_CPU="${LOAD_CPU:-0}"                    # wrk, the TTFT client
PROVIDER_CPU="${PROVIDER_CPU:-0}"            # nginx fake and fake_llm.py
PROXY_CPU="${PROXY_CPU:-1}"
PORT_BASE="${PORT_BASE:-18400}"              # ports PORT_BASE..PORT_BASE+5
NOISE_MAX="${NOISE_MAX:-10}"
NOISE_RETRIES="${NOISE_RETRIES:-2}"
QUIET_WAIT="${QUIET_WAIT:-30}"
CASES="${CASES:-direct sluicegate litellm}"
SG_REV="${SG_REV:-}"
LITELLM_AUTH="${LITELLM_AUTH:-off}"          # on: a master key, checked on every request (~1.5-2 ms/req more)
LITELLM_WARMUP="${LITELLM_WARMUP:-4}"        # LiteLLM's warm-up (s): it imports code lazily on first requests
PROFILE="${PROFILE:-0}"                      # 1: py-spy profile of each proxy under load, after the runs
PROFILE_SECONDS="${PROFILE_SECONDS:-8}"
PROFILE_RATE="${PROFILE_RATE:-100}"
PROFILE_TOP="${PROFILE_TOP:-25}"
OUT="${OUT:-/tmp/sluicegate-bench/ai-$(date +%Y%m%d-%H%M%S)}"

FAKE_PORT=$((PORT_BASE + 0))                 # nginx, non-streamed
STREAM_PORT=$((PORT_BASE + 1))               # fake_llm.py, streamed
SG_PORT=$((PORT_BASE + 2))
SG_METRICS_PORT=$((PORT_BASE + 3))           # configured, not served
LITELLM_PORT=$((PORT_BASE + 4))
ALL_PORTS="$FAKE_PORT $STREAM_PORT $SG_PORT $SG_METRICS_PORT $LITELLM_PORT"
# Client key (LiteLLM's master key; sluicegate has no auth plugin here and ignores it) and the
# provider's key (fake_llm.py checks it): different, so a proxy that forwarded the client's
# credentials would fail the streamed sanity check.
export AI_BENCH_KEY="sk-bench-client-4f1c2e9a7b3d5e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5"
export AI_BENCH_PROVIDER_KEY="sk-bench-provider-0123456789abcdef"

log() { printf '[ai-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
for t in nginx wrk taskset setsid curl ss "$HELPER_PY"; do
    command -v "$t" >/dev/null 2>&1 || die "missing tool: $t (apt-get install -y nginx-light wrk curl)"
done
[[ -x $SLUICEGATE ]] || die "no sluicegate at $SLUICEGATE (python -m venv .venv && .venv/bin/pip install -e '.[test]')"
"$PY" -c 'import aiohttp' 2>/dev/null || die "$PY cannot import aiohttp (needed by tests/servers/fake_llm.py)"
for p in $ALL_PORTS; do
    if ss -Hltn "sport = :$p" | grep -q .; then die "port $p already in use (set PORT_BASE)"; fi
done
mkdir -p "$OUT"/{conf,logs,runs,state} || die "cannot create $OUT"
: >"$OUT/skipped.tsv"
: >"$OUT/logs/pinning.txt"

SG_CMD=("$SLUICEGATE")
SG_SRC_DIR="$ROOT/src"
if [[ -n $SG_REV ]]; then   # the exact code of a commit, while others may edit src/
    SG_COMMIT=$(git -C "$ROOT" rev-parse --short "$SG_REV^{commit}" 2>/dev/null) || die "SG_REV=$SG_REV: no such revision"
    mkdir -p "$OUT/sluicegate-src"
    git -C "$ROOT" archive "$SG_COMMIT" src | tar -x -C "$OUT/sluicegate-src" || die "git archive $SG_COMMIT failed"
    SG_CMD=(env PYTHONPATH="$OUT/sluicegate-src/src" "$PY" -m sluicegate)
    SG_SRC_DIR="$OUT/sluicegate-src/src"
fi

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

group_pids() { ps -e -o pid=,pgid= | awk -v g="$1" '$2==g {print $1}'; }

record_pinning() {   # record_pinning NAME
    local pid=${PIDS[$1]:-} p
    [[ -z $pid ]] && return
    for p in $(group_pids "$pid"); do
        printf '%-22s pid %-7s %s  (%s)\n' "$1" "$p" \
            "$(taskset -pc "$p" 2>/dev/null | sed 's/.*: /cpus /')" "$(ps -o comm= -p "$p")" \
            >>"$OUT/logs/pinning.txt"
    done
}

record_net() {   # record_net NAME WHEN: the group's sockets to anything but loopback
    local pid=${PIDS[$1]:-} p pat="" lines
    [[ -z $pid ]] && return
    for p in $(group_pids "$pid"); do pat+="${pat:+|}pid=$p,"; done
    [[ -z $pat ]] && return
    lines=$(ss -Htuanp 2>/dev/null | grep -E "$pat" | grep -vE '127\.0\.0\.1:[0-9]+ +127\.0\.0\.1:|127\.0\.0\.1:[0-9]+ +0\.0\.0\.0:\*')
    { echo "== $2"; [[ -n $lines ]] && echo "$lines" || echo "(no socket to a non-loopback address)"; } \
        >>"$OUT/logs/$1.net.txt"
}

skip() {   # skip CASE REASON
    printf '%s\t%s\n' "$1" "$2" >>"$OUT/skipped.tsv"
    log "SKIP $1: $2"
}

render() {   # render TEMPLATE -> path of the rendered copy in $OUT/conf
    local src=$1 dst
    dst="$OUT/conf/$(basename "${src%.in}")"
    sed -e "s/@FAKE_PORT@/$FAKE_PORT/g" -e "s/@STREAM_PORT@/$STREAM_PORT/g" \
        -e "s/@SG_PORT@/$SG_PORT/g" -e "s/@SG_METRICS_PORT@/$SG_METRICS_PORT/g" \
        -e "s/@LITELLM_PORT@/$LITELLM_PORT/g" "$src" >"$dst"
    echo "$dst"
}

# ------------------------------------------------------------------ LiteLLM venv
LITELLM_BIN="$LITELLM_VENV/bin/litellm"
ensure_litellm() {   # creates the venv when missing; non-zero (and a skip) when it cannot
    local extra=()
    [[ -n $LITELLM_EXTRA ]] && read -ra extra <<<"$LITELLM_EXTRA"
    if [[ -x $LITELLM_BIN ]]; then
        [[ -z $LITELLM_EXTRA ]] || "$LITELLM_VENV/bin/python" -c 'import opentelemetry.sdk' 2>/dev/null ||
            "$LITELLM_VENV/bin/pip" install -q "${extra[@]}" >"$OUT/logs/litellm-install.log" 2>&1 ||
            log "WARNING: pip install $LITELLM_EXTRA into $LITELLM_VENV failed (logs/litellm-install.log)"
        return 0
    fi
    log "installing $LITELLM_SPEC $LITELLM_EXTRA into $LITELLM_VENV (once; ~1 min)"
    mkdir -p "$(dirname "$LITELLM_VENV")"
    if ! { [[ -x $LITELLM_VENV/bin/pip ]] || python3 -m venv "$LITELLM_VENV"; } >"$OUT/logs/litellm-install.log" 2>&1 ||
        ! "$LITELLM_VENV/bin/pip" install "$LITELLM_SPEC" "${extra[@]}" >>"$OUT/logs/litellm-install.log" 2>&1 ||
        [[ ! -x $LITELLM_BIN ]]; then
        skip litellm "pip install $LITELLM_SPEC into $LITELLM_VENV failed (logs/litellm-install.log)"
        return 1
    fi
}

# ------------------------------------------------------------------ metadata
git_state() {
    local rev dirty
    rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    dirty=$(git -C "$ROOT" status --porcelain --untracked-files=no -- src 2>/dev/null | wc -l)
    if (( dirty > 0 )); then echo "$rev (+$dirty uncommitted changes under src/)"; else echo "$rev"; fi
}
if [[ " $CASES " == *" litellm "* ]]; then ensure_litellm || CASES=$(echo " $CASES " | sed 's/ litellm / /; s/^ *//; s/ *$//'); fi
{
    echo "date: $(date -Is)"
    echo "host: $(hostname)"
    echo "cpu: $(lscpu | sed -n 's/^Model name:[[:space:]]*//p') ($(nproc) CPUs)"
    echo "kernel: $(uname -r)"
    echo "loadavg_start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "commit_start: $(git_state)"
    if [[ -n $SG_REV ]]; then
        echo "sluicegate_code: git archive of $SG_COMMIT ($SG_REV)"
    else
        echo "sluicegate_code: working tree $ROOT/src at $(git_state)"
    fi
    echo "settings: DURATION=$DURATION RUNS=$RUNS WARMUP=$WARMUP LITELLM_WARMUP=$LITELLM_WARMUP LITELLM_AUTH=$LITELLM_AUTH CONNS=$CONNS LAT_DURATION=$LAT_DURATION TTFT_REQUESTS=$TTFT_REQUESTS LOAD_CPU=$LOAD_CPU PROVIDER_CPU=$PROVIDER_CPU PROXY_CPU=$PROXY_CPU"
    echo "conns: $CONNS"
    echo "cases: $CASES"
    echo "nginx: $(nginx -v 2>&1 | sed 's/.*: //')"
    echo "wrk: $(wrk -v 2>&1 | head -1 | awk '{print $2}')"
    echo "python: $("$PY" -c 'import platform; print(platform.python_version())')"
    echo "sluicegate: $("$PY" -c 'from importlib.metadata import version; print(version("sluicegate"))' 2>/dev/null)"
    if [[ -x $LITELLM_VENV/bin/python ]]; then
        echo "litellm: $("$LITELLM_VENV/bin/python" -c 'from importlib.metadata import version as v; print(v("litellm"), "uvicorn", v("uvicorn"), "uvloop", v("uvloop"))' 2>/dev/null)"
    fi
} >"$OUT/meta.txt"
[[ -n $CASES ]] || die "CASES selects no case"
log "results -> $OUT"

# ------------------------------------------------------------------ proxies
JSON_URL="" STREAM_URL="" CLIENT_KEY=""
set_urls() {   # set_urls CASE -> JSON_URL STREAM_URL CLIENT_KEY
    case $1 in
    direct)
        JSON_URL="http://127.0.0.1:$FAKE_PORT/v1/chat/completions"
        STREAM_URL="http://127.0.0.1:$STREAM_PORT/v1/chat/completions"
        CLIENT_KEY=$AI_BENCH_PROVIDER_KEY ;;
    sluicegate)
        JSON_URL="http://127.0.0.1:$SG_PORT/v1/chat/completions"
        STREAM_URL="http://127.0.0.1:$SG_PORT/stream/v1/chat/completions"
        CLIENT_KEY=$AI_BENCH_KEY ;;
    litellm)
        JSON_URL="http://127.0.0.1:$LITELLM_PORT/v1/chat/completions"
        STREAM_URL=$JSON_URL     # the model (fake-stream) picks the streaming provider
        CLIENT_KEY=$AI_BENCH_KEY ;;
    esac
}

start_proxy() {   # start_proxy CASE NAME; non-zero if the case cannot run
    local case=$1 name=$2 conf port
    case $case in
    direct) return 0 ;;
    sluicegate)
        port=$SG_PORT; conf=$(render "$BENCH_DIR/conf/ai_sluicegate.yaml.in")
        start_srv "$name" "$PROXY_CPU" "${SG_CMD[@]}" --log-level warning run -c "$conf"
        wait_port "$name" "$port" 20 || { skip "$case" "did not listen on $port (logs/$name.log)"; stop_srv "$name"; return 1; } ;;
    litellm)
        port=$LITELLM_PORT; conf=$(render "$BENCH_DIR/conf/ai_litellm.yaml.in")
        local permit=false
        if [[ $LITELLM_AUTH == off ]]; then   # it refuses to start keyless unless told it may
            sed -i '/^general_settings:/,$d' "$conf"; permit=true
        fi
        start_srv "$name" "$PROXY_CPU" env LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOG=ERROR \
            HF_HUB_OFFLINE=1 NO_COLOR=1 LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY=$permit \
            "$LITELLM_BIN" --config "$conf" --host 127.0.0.1 --port "$port" --num_workers 1
        if ! wait_port "$name" "$port" "$LITELLM_START_TIMEOUT"; then
            skip "$case" "did not listen on $port within ${LITELLM_START_TIMEOUT}s (logs/$name.log: $(grep -m1 -E 'Error|error' "$OUT/logs/$name.log" | cut -c1-200))"
            stop_srv "$name"; return 1
        fi
        record_net "$name" "after start" ;;
    esac
    record_pinning "$name"
}

sanity() {   # sanity CASE NAME: a JSON and a streamed request, both with usage
    local said mode
    for mode in json stream; do
        if [[ $mode == json ]]; then
            said=$("$HELPER_PY" "$BENCH_DIR/ai_load.py" check "$JSON_URL" "$CLIENT_KEY" fake-model 2>&1)
        else
            said=$("$HELPER_PY" "$BENCH_DIR/ai_load.py" check "$STREAM_URL" "$CLIENT_KEY" fake-stream --stream 2>&1)
        fi || { skip "$1" "sanity request failed: $said (logs/$2.log)"; return 1; }
        echo "$said" >>"$OUT/logs/$2.log"
    done
}

wrk_load() {   # wrk_load URL SECONDS CONNS ; pinned to LOAD_CPU
    taskset -c "$LOAD_CPU" wrk -t1 -c"$3" -d"$2s" --timeout "${WRK_TIMEOUT}s" --latency \
        -s "$BENCH_DIR/ai_chat.lua" "$1"
}

warmup_of() { if [[ $1 == litellm ]]; then echo "$LITELLM_WARMUP"; else echo "$WARMUP"; fi; }

declare -A SKIPPED=()
measure() {   # measure RUN CASE
    local run=$1 case=$2 name="r${1}_${2}" base="$OUT/runs/r${1}_${2}" n=0 f rc pgid=0
    [[ -n ${SKIPPED[$case]:-} ]] && return 0
    if ! start_proxy "$case" "$name"; then SKIPPED[$case]=1; return 0; fi
    set_urls "$case"
    if ! sanity "$case" "$name"; then SKIPPED[$case]=1; stop_srv "$name"; return 0; fi
    [[ $case != direct ]] && pgid=${PIDS[$name]}
    AI_BENCH_KEY=$CLIENT_KEY wrk_load "$JSON_URL" "$(warmup_of "$case")" "$CONNS" >"$OUT/logs/$name.warmup.txt" 2>&1
    while :; do
        n=$((n + 1))
        (( QUIET_WAIT > 0 )) && "$HELPER_PY" "$BENCH_DIR/summarize.py" quiet "$$" "$NOISE_MAX" "$QUIET_WAIT"
        log "run $run/$RUNS $case: wrk -c$CONNS -d${DURATION}s POST chat (attempt $n)"
        "$HELPER_PY" "$BENCH_DIR/summarize.py" snap "$OUT/state/cpu.before"
        AI_BENCH_KEY=$CLIENT_KEY wrk_load "$JSON_URL" "$DURATION" "$CONNS" >"$base.try$n.txt" 2>&1
        rc=$?
        "$HELPER_PY" "$BENCH_DIR/summarize.py" snap "$OUT/state/cpu.after"
        "$HELPER_PY" "$BENCH_DIR/summarize.py" cpu "$OUT/state/cpu.before" "$OUT/state/cpu.after" \
            "$$" "$LOAD_CPU" "$PROXY_CPU" "$pgid" >"$base.try$n.cpu.json"
        (( rc != 0 )) && echo "NOTE: wrk exited with status $rc" >>"$base.try$n.txt"
        f=$("$HELPER_PY" -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["foreign_pct"]))' \
            "$base.try$n.cpu.json" 2>/dev/null || echo 0)
        (( rc != 0 )) && f=100000
        (( f <= NOISE_MAX || n > NOISE_RETRIES )) && break
        log "    other processes used ${f}% of a CPU (or wrk failed); measuring again"
        sleep 2
    done
    "$HELPER_PY" "$BENCH_DIR/summarize.py" keep "$base" "$n" >&2
    log "run $run/$RUNS $case: wrk -c1 -d${LAT_DURATION}s (latency)"
    AI_BENCH_KEY=$CLIENT_KEY wrk_load "$JSON_URL" "$LAT_DURATION" 1 >"$base.lat.txt" 2>&1 ||
        echo "NOTE: latency wrk exited with status $?" >>"$base.lat.txt"
    log "    c=1: $(grep -E '^ +(50|99)%' "$base.lat.txt" | awk '{printf "p%s %s  ", $1, $2}')"
    log "run $run/$RUNS $case: $TTFT_REQUESTS streamed requests (TTFT)"
    taskset -c "$LOAD_CPU" "$HELPER_PY" "$BENCH_DIR/ai_load.py" ttft "$STREAM_URL" "$CLIENT_KEY" \
        fake-stream "$TTFT_REQUESTS" "$base.ttft.json" ||
        echo "NOTE: TTFT client reported errors (see $name.ttft.json)" >>"$base.txt"
    if [[ $case != direct ]]; then
        [[ $case == litellm ]] && record_net "$name" "after the measurements"
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
    local case=$1 name="profile_$1" pyspy pid dir="$OUT/profile" gil=() src
    [[ -n ${SKIPPED[$case]:-} ]] && return 0
    pyspy=$(find_pyspy) || { skip "profile_$case" "py-spy missing and could not be installed"; return 0; }
    mkdir -p "$dir"
    start_proxy "$case" "$name" || return 0
    pid=${PIDS[$name]}
    set_urls "$case"
    AI_BENCH_KEY=$CLIENT_KEY wrk_load "$JSON_URL" "$(warmup_of "$case")" "$CONNS" >"$OUT/logs/$name.warmup.txt" 2>&1
    # LiteLLM keeps idle thread-pool threads that py-spy counts as busy: sample only the
    # thread holding the GIL there.
    [[ $case == litellm ]] && gil=(--gil)
    log "profile $case: py-spy record -d $PROFILE_SECONDS -r $PROFILE_RATE ${gil[*]} --pid $pid (wrk running)"
    start_srv "${name}_wrk" "$LOAD_CPU" env AI_BENCH_KEY="$CLIENT_KEY" wrk -t1 -c"$CONNS" \
        -d"$((PROFILE_SECONDS + 3))s" --timeout "${WRK_TIMEOUT}s" --latency -s "$BENCH_DIR/ai_chat.lua" "$JSON_URL"
    sleep 1
    taskset -c "$LOAD_CPU" "$pyspy" record -d "$PROFILE_SECONDS" -r "$PROFILE_RATE" -f raw "${gil[@]}" \
        -o "$dir/ai_$case.folded" --pid "$pid" >"$dir/$case.py-spy.log" 2>&1 ||
        log "    py-spy failed (see $dir/$case.py-spy.log)"
    wait "${PIDS[${name}_wrk]}" 2>/dev/null
    unset "PIDS[${name}_wrk]"
    cp "$OUT/logs/${name}_wrk.log" "$dir/$case.wrk.txt" 2>/dev/null
    stop_srv "$name"
    if [[ $case == litellm ]]; then
        src=$("$LITELLM_VENV/bin/python" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"] + ":" + p["stdlib"])')
    else
        src="${SG_SRC_DIR}:$("$PY" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"] + ":" + p["stdlib"])')"
    fi
    [[ -s $dir/ai_$case.folded ]] &&
        PROFILE_SRC="$src" PROFILE_RATE="$PROFILE_RATE" PROFILE_SECONDS="$PROFILE_SECONDS" \
            "$HELPER_PY" "$BENCH_DIR/summarize.py" profile "$dir/ai_$case.folded" "$PROFILE_TOP" \
            "$dir/$case.wrk.txt" >"$dir/$case.top.md"
}

# ------------------------------------------------------------------ run
conf=$(render "$BENCH_DIR/conf/ai_fake_nginx.conf.in")
mkdir -p "$OUT/state/fake/tmp"
start_srv fake_nginx "$PROVIDER_CPU" nginx -p "$OUT/state/fake/" -c "$conf" -e stderr
wait_port fake_nginx "$FAKE_PORT" 10 || die "fake provider nginx did not start (logs/fake_nginx.log)"
start_srv fake_stream "$PROVIDER_CPU" "$PY" "$ROOT/tests/servers/fake_llm.py" --port "$STREAM_PORT" \
    --api-key "$AI_BENCH_PROVIDER_KEY"
wait_port fake_stream "$STREAM_PORT" 20 || die "fake_llm.py did not start (logs/fake_stream.log)"
record_pinning fake_nginx
record_pinning fake_stream

REVERSED=$(echo "$CASES" | tr ' ' '\n' | tac | tr '\n' ' ')
for run in $(seq 1 "$RUNS"); do
    if (( run % 2 )); then order=$CASES; else order=$REVERSED; fi
    for c in $order; do measure "$run" "$c"; done
done

if [[ $PROFILE == 1 ]]; then
    for c in $CASES; do [[ $c != direct ]] && profile_case "$c"; done
fi

stop_srv fake_stream
stop_srv fake_nginx
{
    echo "loadavg_end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "commit_end: $(git_state)"
    echo "date_end: $(date -Is)"
} >>"$OUT/meta.txt"

"$HELPER_PY" "$BENCH_DIR/ai_load.py" table "$OUT" | tee "$OUT/summary.md"
if [[ $PROFILE == 1 ]]; then
    for c in $CASES; do
        [[ -s $OUT/profile/$c.top.md ]] && { echo; cat "$OUT/profile/$c.top.md"; } | tee -a "$OUT/summary.md"
    done
fi
log "done: $OUT/summary.md"
exit 0
