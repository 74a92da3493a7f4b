#!/usr/bin/env bash
# Switchyard benchmarks. They print numbers; they are never tests, and
# scripts/test.sh does not run them. All traffic stays on loopback, and every
# load is bounded in time and count.
#
#   scripts/bench.sh [all]      every benchmark below, then a summary
#   scripts/bench.sh control    the NLB's gRPC control API (docs/benchmarks.md)
#   scripts/bench.sh alb        the ALB against nginx as a reverse proxy, and
#                               the origin directly (wrk, h2load)
#
# Knobs (environment): BENCH_DURATION (s, default 10), BENCH_WARMUP (2),
# BENCH_CONCURRENCY (32), BENCH_CONNECTIONS (4), BENCH_FLEET (10000 instances),
# BENCH_FLEET_WINDOW (30 s), BENCH_FLEET_CONNECTIONS (BENCH_CONNECTIONS; the
# number of instances gives each its own connection, as separate module
# processes would have), BENCH_AUTH ("off on": which auth modes to run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Each benchmark NAME is a function bench_NAME below.
BENCHES=(control alb)

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
cargo build --release -p nlb -p switchyard-bench -p alb

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

# --- alb: the HTTP reverse proxy against nginx -------------------------------

# free_port: a loopback port free a moment ago.
free_port() { "$REL/control-bench" free-port; }

# wait_port PORT: until something accepts on 127.0.0.1:PORT (10 s at most).
wait_port() {
    local i
    for i in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    exit 1
}

# The awk helper both parsers share: "1.23ms" and the like to milliseconds.
AWK_MS='function ms(v) {
    if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
    if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
    if (v ~ /s$/) return substr(v, 1, length(v) - 1) * 1000
    return v
}'

# wrk_run LOAD TARGET URL [wrk args]: one wrk load, a RESULT line.
wrk_run() {
    local load="$1" target="$2" url="$3"
    shift 3
    local out
    out="$(wrk -t2 -c"${BENCH_HTTP_CONNECTIONS:-64}" -d"${BENCH_DURATION:-10}s" --latency "$@" "$url")"
    echo "$out" >&2
    echo "$out" | awk -v load="$load" -v target="$target" "$AWK_MS"'
        /^ +50%/ { p50 = ms($2) }
        /^ +99%/ { p99 = ms($2) }
        /^Requests\/sec:/ { rps = $2 }
        /Non-2xx or 3xx responses:/ { bad = $NF }
        END {
            printf "RESULT bench=alb load=%s target=%s rps=%.0f p50_ms=%.3f p99_ms=%.3f non2xx=%d\n",
                load, target, rps, p50, p99, bad + 0
        }' | tee -a "$RESULTS"
}

# h2_run TARGET URL: one h2load load (HTTP/2 prior knowledge), a RESULT line.
h2_run() {
    local target="$1" url="$2" out
    out="$(h2load -c"${BENCH_H2_CONNECTIONS:-16}" -m"${BENCH_H2_STREAMS:-10}" -t2 \
        --warm-up-time="${BENCH_WARMUP:-2}" -D"${BENCH_DURATION:-10}" "$url")"
    echo "$out" >&2
    echo "$out" | awk -v target="$target" "$AWK_MS"'
        /^finished in/ { r = $4; gsub(",", "", r); rps = r + 0 }
        /^requests:/ { failed = $8 }
        /^time for request:/ { mean = ms($6); max = ms($5) }
        END {
            printf "RESULT bench=alb load=h2load target=%s rps=%.0f mean_ms=%.3f max_ms=%.3f failed=%d\n",
                target, rps, mean, max, failed + 0
        }' | tee -a "$RESULTS"
}

bench_alb() {
    local missing=()
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
    [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
    if [ ${#missing[@]} -gt 0 ]; then
        say "alb: installing ${missing[*]} from Debian"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        service nginx stop >/dev/null 2>&1 || true
    fi
    local dir="$WORK/alb"
    mkdir -p "$dir/www" "$dir/origin" "$dir/proxy"
    head -c 1024 /dev/zero | tr '\0' x >"$dir/www/1k"
    local origin origin_h2 proxy proxy_h2 alb alb_grpc alb_admin
    origin="$(free_port)" origin_h2="$(free_port)" proxy="$(free_port)" proxy_h2="$(free_port)"
    alb="$(free_port)" alb_grpc="$(free_port)" alb_admin="$(free_port)"
    local temps="client_body_temp_path T; proxy_temp_path T; fastcgi_temp_path T; uwsgi_temp_path T; scgi_temp_path T;"

    # The origin: nginx serving a 1 KiB file (HTTP/1.1, and h2c on a second port).
    cat >"$dir/origin/nginx.conf" <<EOF
worker_processes 1;
pid $dir/origin/nginx.pid;
error_log $dir/origin/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    ${temps//T/$dir/origin}
    server { listen 127.0.0.1:$origin; root $dir/www; }
    server { listen 127.0.0.1:$origin_h2 http2; root $dir/www; }
}
EOF
    # nginx as the reverse proxy under test, pooled keep-alive to the origin.
    cat >"$dir/proxy/nginx.conf" <<EOF
worker_processes auto;
pid $dir/proxy/nginx.pid;
error_log $dir/proxy/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    ${temps//T/$dir/proxy}
    upstream origin { server 127.0.0.1:$origin; keepalive 64; }
    server {
        listen 127.0.0.1:$proxy;
        listen 127.0.0.1:$proxy_h2 http2;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }
}
EOF
    # The ALB, same origin, its access log off as nginx's is. No NLB: the
    # ALB serves while it retries registration.
    cat >"$dir/alb.yaml" <<EOF
listen: {grpc: "127.0.0.1:$alb_grpc", data: "127.0.0.1:$alb", admin: "127.0.0.1:$alb_admin"}
nlb: {addr: "127.0.0.1:1"}
registration: {max_backoff_ms: 60000}
module:
  access_log: false
  routes: [{id: all, cluster: origin}]
  clusters: [{name: origin, endpoints: [{address: "127.0.0.1:$origin"}]}]
EOF
    /usr/sbin/nginx -c "$dir/origin/nginx.conf" -p "$dir/origin" -g 'daemon off;' &
    local origin_pid=$!
    /usr/sbin/nginx -c "$dir/proxy/nginx.conf" -p "$dir/proxy" -g 'daemon off;' &
    local proxy_pid=$!
    MODULE_LOG=error "$REL/alb" --config "$dir/alb.yaml" </dev/null >"$dir/alb.log" 2>&1 &
    local alb_pid=$!
    wait_port "$origin"
    wait_port "$proxy"
    wait_port "$alb"

    local target port
    for target in origin nginx alb; do
        case $target in origin) port=$origin ;; nginx) port=$proxy ;; alb) port=$alb ;; esac
        say "alb: wrk, keep-alive, 1 KiB, $target"
        wrk_run keepalive "$target" "http://127.0.0.1:$port/1k"
    done
    for target in origin nginx alb; do
        case $target in origin) port=$origin ;; nginx) port=$proxy ;; alb) port=$alb ;; esac
        say "alb: wrk, a new connection per request, 1 KiB, $target"
        wrk_run close "$target" "http://127.0.0.1:$port/1k" -H "Connection: close"
    done
    for target in origin nginx alb; do
        case $target in origin) port=$origin_h2 ;; nginx) port=$proxy_h2 ;; alb) port=$alb ;; esac
        say "alb: h2load, HTTP/2 prior knowledge, 1 KiB, $target"
        h2_run "$target" "http://127.0.0.1:$port/1k"
    done
    kill "$alb_pid" "$proxy_pid" "$origin_pid" 2>/dev/null || true
    wait "$alb_pid" "$proxy_pid" "$origin_pid" 2>/dev/null || true
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
        if (f["bench"] == "alb") {
            http[++nh] = sprintf("%-10s %-7s %9s %9s %9s %9s %9s", f["load"], f["target"], f["rps"],
                f["p50_ms"] != "" ? f["p50_ms"] : "-", f["p99_ms"] != "" ? f["p99_ms"] : "-",
                f["mean_ms"] != "" ? f["mean_ms"] : "-", f["max_ms"] != "" ? f["max_ms"] : "-")
        } else if (f["bench"] ~ /^fleet/) {
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
        if (nh) {
            printf "\n%-10s %-7s %9s %9s %9s %9s %9s\n", "http load", "target", "req/s", "p50 ms",
                "p99 ms", "mean ms", "max ms"
            for (i = 1; i <= nh; i++) print http[i]
        }
        if (nf) {
            printf "\n%-13s %-16s %9s %10s %9s %10s %7s %9s %9s %8s\n", "fleet", "auth", "instances",
                "register s", "beats/s", "beat p99", "errors", "NLB CPU%", "us/beat", "RSS MiB"
            for (i = 1; i <= nf; i++) print fleet[i]
        }
    }'
