#!/usr/bin/env bash
# Switchyard benchmarks. They print numbers; they are never tests, and
# scripts/test.sh does not run them. All traffic stays on loopback, and every
# load is bounded in time and count.
#
#   scripts/bench.sh [all]      every benchmark below, then a summary
#   scripts/bench.sh control    the NLB's gRPC control API (docs/benchmarks.md)
#
# Knobs (environment): BENCH_DURATION (s, default 10), BENCH_WARMUP (2),
# BENCH_CONCURRENCY (32), BENCH_CONNECTIONS (4), BENCH_FLEET (10000 instances),
# BENCH_FLEET_WINDOW (30 s), BENCH_FLEET_CONNECTIONS (BENCH_CONNECTIONS; the
# number of instances gives each its own connection, as separate module
# processes would have), BENCH_AUTH ("off on": which auth modes to run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Each benchmark NAME is a function bench_NAME below. `alb` joins when the
# ALB exists.
BENCHES=(control)

usage() {
    echo "usage: $0 [all|$(
        IFS='|'
        echo "${BENCHES[*]}"
    )]" >&2
    exit 2
}

say() { printf '\n== %s\n' "$*"; }

[ $# -le 1 ] || usage
case "${1:-all}" in
all) selected=("${BENCHES[@]}") ;;
*)
    [[ " ${BENCHES[*]} " == *" $1 "* ]] || usage
    selected=("$1")
    ;;
esac

# --- the NLB under test -----------------------------------------------------

NLB_GRPC=""
NLB_LOGFILE=""

# start_nlb NAME [VAR=value ...]: the release nlb on free loopback ports with
# the benchmark config and a temp state file; waits until /readyz says ready.
start_nlb() {
    local name="$1"
    shift
    local dir="$WORK/$name"
    mkdir -p "$dir"
    "$REL/control-bench" config >"$dir/nlb.yaml"
    local grpc_port admin_port
    grpc_port="$("$REL/control-bench" free-port)"
    admin_port="$("$REL/control-bench" free-port)"
    NLB_GRPC="127.0.0.1:$grpc_port"
    NLB_LOGFILE="$dir/nlb.log"
    env -u NLB_OPERATOR_TOKEN -u NLB_MODULE_TOKEN \
        NLB_GRPC_LISTEN="$NLB_GRPC" NLB_ADMIN_LISTEN="127.0.0.1:$admin_port" \
        NLB_STATE_FILE="$dir/nlb.state.json" NLB_LOG="${NLB_LOG:-info}" "$@" \
        "$REL/nlb" --config "$dir/nlb.yaml" </dev/null >"$NLB_LOGFILE" 2>&1 &
    NLB_PID=$!
    local i
    for i in $(seq 1 300); do
        if ! kill -0 "$NLB_PID" 2>/dev/null; then
            echo "nlb exited before it was ready:" >&2
            cat "$NLB_LOGFILE" >&2
            exit 1
        fi
        if curl -fsS --max-time 2 "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    echo "nlb was not ready within 30 s:" >&2
    tail -20 "$NLB_LOGFILE" >&2
    exit 1
}

# stop_nlb: SIGTERM to the nlb started above, SIGKILL after 30 s; reaps it.
stop_nlb() {
    [ -n "$NLB_PID" ] || return 0
    local pid="$NLB_PID" i
    NLB_PID=""
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

TARGET_DIR="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
REL="$TARGET_DIR/release"
WORK="$(mktemp -d -t switchyard-bench.XXXXXX)"
RESULTS="$WORK/results"
: >"$RESULTS"
NLB_PID="" # the nlb this script started and has not stopped yet

cleanup() {
    stop_nlb
    rm -rf "$WORK"
}
trap cleanup EXIT

say "build (release, once)"
cargo build --release -p nlb -p switchyard-bench

# --- control: the gRPC control API ------------------------------------------

bench_control() {
    local duration="${BENCH_DURATION:-10}" warmup="${BENCH_WARMUP:-2}"
    local concurrency="${BENCH_CONCURRENCY:-32}" connections="${BENCH_CONNECTIONS:-4}"
    local fleet="${BENCH_FLEET:-10000}" window="${BENCH_FLEET_WINDOW:-30}"
    local fleet_connections="${BENCH_FLEET_CONNECTIONS:-$connections}"
    local load=(--concurrency "$concurrency" --connections "$connections"
        --warmup-secs "$warmup" --duration-secs "$duration")
    local mode
    for mode in ${BENCH_AUTH:-off on}; do
        local env=() creds=()
        if [ "$mode" = on ]; then
            # Fresh random tokens; an NLB build without auth ignores them,
            # and control-bench labels the run `on-not-enforced`.
            local operator module
            operator="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
            module="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
            env=(NLB_OPERATOR_TOKEN="$operator" NLB_MODULE_TOKEN="$module")
            creds=(BENCH_OPERATOR_TOKEN="$operator" BENCH_MODULE_TOKEN="$module")
        fi

        say "control: RouteRequest and Heartbeat, auth $mode"
        start_nlb "control-$mode" "${env[@]}"
        env -u BENCH_OPERATOR_TOKEN -u BENCH_MODULE_TOKEN "${creds[@]}" "$REL/control-bench" route --addr "$NLB_GRPC" --nlb-pid "$NLB_PID" "${load[@]}" | tee -a "$RESULTS"
        env -u BENCH_OPERATOR_TOKEN -u BENCH_MODULE_TOKEN "${creds[@]}" "$REL/control-bench" heartbeat --addr "$NLB_GRPC" --nlb-pid "$NLB_PID" "${load[@]}" --instances 1000 | tee -a "$RESULTS"
        stop_nlb

        say "control: $fleet instances heartbeating at 1 Hz, NLB CPU over ${window}s, auth $mode"
        start_nlb "fleet-$mode" "${env[@]}"
        env -u BENCH_OPERATOR_TOKEN -u BENCH_MODULE_TOKEN "${creds[@]}" "$REL/control-bench" fleet --addr "$NLB_GRPC" --nlb-pid "$NLB_PID" \
            --instances "$fleet" --window-secs "$window" --connections "$fleet_connections" | tee -a "$RESULTS"
        stop_nlb

        say "control: the same fleet on HeartbeatStream (one stream per instance), auth $mode"
        start_nlb "fleet-stream-$mode" "${env[@]}"
        env -u BENCH_OPERATOR_TOKEN -u BENCH_MODULE_TOKEN "${creds[@]}" "$REL/control-bench" fleet --stream --addr "$NLB_GRPC" --nlb-pid "$NLB_PID" \
            --instances "$fleet" --window-secs "$window" --connections "$fleet_connections" | tee -a "$RESULTS"
        stop_nlb
    done
}

for b in "${selected[@]}"; do
    "bench_$b"
done

# --- summary ----------------------------------------------------------------

say "summary: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(date -u +%Y-%m-%dT%H:%MZ)"
grep '^RESULT ' "$RESULTS" | awk '
    {
        delete f
        for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
        if (f["bench"] ~ /^fleet/) {
            fleet[++nf] = sprintf("%-13s %-16s %9s %10s %9s %10s %7s %9s %9s %8s",
                f["bench"], f["auth"], f["instances"], f["register_s"], f["beats_per_s"], f["beat_p99_ms"],
                f["errors"], f["nlb_cpu_pct"], f["nlb_us_per_beat"], f["nlb_rss_mib"])
        } else {
            load[++nl] = sprintf("%-14s %-16s %9s %8s %8s %7s %10s %10s",
                f["bench"], f["auth"], f["rps"], f["p50_ms"], f["p99_ms"], f["errors"],
                f["nlb_us_per_call"], f["client_us_per_call"])
        }
    }
    END {
        if (nl) {
            printf "%-14s %-16s %9s %8s %8s %7s %10s %10s\n", "rpc", "auth", "calls/s", "p50 ms",
                "p99 ms", "errors", "NLB us/call", "client us"
            for (i = 1; i <= nl; i++) print load[i]
        }
        if (nf) {
            printf "\n%-13s %-16s %9s %10s %9s %10s %7s %9s %9s %8s\n", "fleet", "auth", "instances",
                "register s", "beats/s", "beat p99", "errors", "NLB CPU%", "us/beat", "RSS MiB"
            for (i = 1; i <= nf; i++) print fleet[i]
        }
    }'
