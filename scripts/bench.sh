#!/usr/bin/env bash
# Switchyard benchmarks. They print numbers; they are never tests, and
# scripts/test.sh does not run them. All traffic stays on loopback, and every
# load is bounded in time and count.
#
#   scripts/bench.sh [all]      every benchmark below, then a summary
#   scripts/bench.sh control    the NLB's gRPC control API (docs/benchmarks.md)
#   scripts/bench.sh alb        the ALB against nginx as a reverse proxy, and
#                               the origin directly (wrk, h2load)
#   scripts/bench.sh l4         the NLB's data plane against HAProxy (mode tcp)
#                               and nginx (stream), and the origin directly
#                               (iperf3, wrk, idle connections)
#
# Knobs (environment): BENCH_DURATION (s, default 10), BENCH_WARMUP (2),
# BENCH_CONCURRENCY (32), BENCH_CONNECTIONS (4), BENCH_FLEET (10000 instances),
# BENCH_ROUNDS (alb and l4: 3 rounds of every load, the targets taking
# turns, the median reported), BENCH_FLEET_WINDOW (30 s), BENCH_FLEET_CONNECTIONS (BENCH_CONNECTIONS; the
# number of instances gives each its own connection, as separate module
# processes would have), BENCH_AUTH ("off on": which auth modes to run).
# l4 only: BENCH_L4_TARGETS ("direct haproxy nginx nlb-declared nlb-sniffing"),
# BENCH_L4_IDLE (10000 idle connections, fewer if the file-descriptor hard
# limit allows fewer), BENCH_L4_CALLGRIND (0; 1 adds instructions per
# connection under valgrind's callgrind), BENCH_L4_CALLGRIND_CONNS (2000).
set -euo pipefail
cd "$(dirname "$0")/.."

# Each benchmark NAME is a function bench_NAME below.
BENCHES=(control alb l4)

usage() {
    echo "usage: $0 [all|$(
        IFS='|'
        echo "${BENCHES[*]}"
    )]" >&2
    exit 2
}

say() { printf '\n== %s\n' "$*"; }

# The rounds the alb and l4 loads run in (BENCH_ROUNDS), checked before
# anything is built.
ROUNDS="${BENCH_ROUNDS:-3}"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || {
    echo "BENCH_ROUNDS: $ROUNDS is not a number of rounds (1 or more)" >&2
    exit 2
}

# in_turn ROUND TARGET...: the targets in the order they take in ROUND:
# as given, and reversed every other round, so that a slow spell of this
# shared machine falls on all of them.
in_turn() {
    local round="$1" i
    shift
    if [ $((round % 2)) -eq 1 ]; then
        echo "$@"
    else
        for ((i = $#; i >= 1; i--)); do printf '%s ' "${!i}"; done
        echo
    fi
}

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
NLB_WRAP=() # a command the nlb runs under (valgrind), empty for none

# launch_nlb DIR CONFIG [VAR=value ...]: the release nlb with CONFIG on free
# loopback gRPC and admin ports and a state file in DIR; waits until /readyz
# says ready (60 s at most). Returns 1, having said why, if it exited or was
# not ready in time (NLB_PID is then still set if it runs).
launch_nlb() {
    local dir="$1" config="$2"
    shift 2
    local grpc_port admin_port
    grpc_port="$("$REL/control-bench" free-port)"
    admin_port="$("$REL/control-bench" free-port)"
    NLB_GRPC="127.0.0.1:$grpc_port"
    NLB_LOGFILE="$dir/nlb.log"
    env -u NLB_OPERATOR_TOKEN -u NLB_MODULE_TOKEN \
        NLB_GRPC_LISTEN="$NLB_GRPC" NLB_ADMIN_LISTEN="127.0.0.1:$admin_port" \
        NLB_STATE_FILE="$dir/nlb.state.json" NLB_LOG="${NLB_LOG:-info}" "$@" \
        "${NLB_WRAP[@]}" "$REL/nlb" --config "$config" </dev/null >"$NLB_LOGFILE" 2>&1 &
    NLB_PID=$!
    for _ in $(seq 1 600); do
        if ! kill -0 "$NLB_PID" 2>/dev/null; then
            wait "$NLB_PID" 2>/dev/null || true
            NLB_PID=""
            echo "nlb exited before it was ready:" >&2
            cat "$NLB_LOGFILE" >&2
            return 1
        fi
        if curl -fsS --max-time 2 "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    echo "nlb was not ready within 60 s:" >&2
    tail -20 "$NLB_LOGFILE" >&2
    return 1
}

# start_nlb NAME [VAR=value ...]: launch_nlb with the control benchmark's
# config in a fresh directory; a failure ends the script.
start_nlb() {
    local name="$1"
    shift
    local dir="$WORK/$name"
    mkdir -p "$dir"
    "$REL/control-bench" config >"$dir/nlb.yaml"
    launch_nlb "$dir" "$dir/nlb.yaml" "$@" || exit 1
}

# stop_nlb: SIGTERM to the nlb started above, SIGKILL after 30 s; reaps it.
stop_nlb() {
    [ -n "$NLB_PID" ] || return 0
    local pid="$NLB_PID"
    NLB_PID=""
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 300); do
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
# nginx's workers run as an unprivileged user: let them reach the files
# served from here (mktemp makes the directory 0700).
chmod 711 "$WORK"
RESULTS="$WORK/results"
: >"$RESULTS"
NLB_PID=""    # the nlb this script started and has not stopped yet
OTHER_PIDS=() # other processes it started and may not have stopped yet

# forget_pid PID: PID has been stopped and reaped.
forget_pid() {
    local keep=() p
    for p in "${OTHER_PIDS[@]}"; do
        [ "$p" = "$1" ] || keep+=("$p")
    done
    OTHER_PIDS=("${keep[@]}")
}

cleanup() {
    stop_nlb
    local pid
    for pid in "${OTHER_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

# Only what the selected benchmarks run.
packages=(-p switchyard-bench)
for b in "${selected[@]}"; do
    case $b in
    control | l4) [[ " ${packages[*]} " == *" nlb "* ]] || packages+=(-p nlb) ;;
    alb) packages+=(-p alb) ;;
    esac
done
say "build (release, once)"
cargo build --release "${packages[@]}"

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
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    exit 1
}

# nginx's temporary paths, each under T (replace T with a directory).
NGINX_TEMPS="client_body_temp_path T; proxy_temp_path T; fastcgi_temp_path T; uwsgi_temp_path T; scgi_temp_path T;"

# The awk helper both parsers share: "1.23ms" and the like to milliseconds.
AWK_MS='function ms(v) {
    if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
    if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
    if (v ~ /s$/) return substr(v, 1, length(v) - 1) * 1000
    return v
}'

# pid_tree PID: PID and its children, one a line.
pid_tree() {
    echo "$1"
    cat /proc/"$1"/task/*/children 2>/dev/null | tr ' ' '\n' | sed '/^$/d' || true
}

# tree_cpu PID: utime + stime, in clock ticks, of PID and its children
# (nothing without a PID).
tree_cpu() {
    [ -n "$1" ] || return 0
    local p
    for p in $(pid_tree "$1"); do
        sed 's/.*) //' "/proc/$p/stat" 2>/dev/null || true
    done | awk '{ t += $12 + $13 } END { print t + 0 }'
}

CPU_HZ="$(getconf CLK_TCK)"

# cpu_per TICKS0 TICKS1 COUNT SCALE FIELD: " FIELD=x", x the CPU seconds
# between the two readings times SCALE divided by COUNT; nothing without
# both readings or a count.
cpu_per() {
    [ -n "$1" ] && [ -n "$2" ] || return 0
    awk -v a="$1" -v b="$2" -v n="$3" -v scale="$4" -v field="$5" -v hz="$CPU_HZ" \
        'BEGIN { if (n > 0) printf " %s=%.2f", field, (b - a) / hz * scale / n }'
}

# wrk_stats URL [wrk args]: one wrk load (its report to stderr), then its
# numbers as key=value fields on one line.
wrk_stats() {
    local url="$1" duration="${BENCH_DURATION:-10}"
    shift
    local out
    out="$(timeout $((duration + 30)) wrk -t2 -c"${BENCH_HTTP_CONNECTIONS:-64}" -d"${duration}s" --latency "$@" "$url")"
    echo "$out" >&2
    echo "$out" | awk "$AWK_MS"'
        /^ +50%/ { p50 = ms($2) }
        /^ +99%/ { p99 = ms($2) }
        /^Requests\/sec:/ { rps = $2 }
        / requests in / { requests = $1 }
        /Socket errors:/ { gsub(",", ""); errors = $4 + $6 + $8 + $10 }
        /Non-2xx or 3xx responses:/ { bad = $NF }
        END {
            printf "rps=%.0f p50_ms=%.3f p99_ms=%.3f non2xx=%d requests=%d errors=%d\n",
                rps, p50, p99, bad + 0, requests + 0, errors + 0
        }'
}

CPU_PID="" # alb: the process (tree) whose CPU a load is charged to

# wrk_run KIND TARGET URL [wrk args]: one wrk load, a ROUND line, with the
# CPU of CPU_PID's process tree per request (per connection with
# `Connection: close`) when it is set.
wrk_run() {
    local kind="$1" target="$2" url="$3"
    shift 3
    local stats c0 c1
    c0="$(tree_cpu "$CPU_PID")"
    stats="$(wrk_stats "$url" "$@")"
    c1="$(tree_cpu "$CPU_PID")"
    local requests="${stats##*requests=}"
    echo "ROUND bench=alb load=$kind target=$target $stats$(cpu_per "$c0" "$c1" "${requests%% *}" 1e6 cpu_us_per_req)" | tee -a "$RESULTS"
}

# round_median BENCH LOAD TARGET: the RESULT line of LOAD against TARGET
# over its ROUND lines: the counts (requests, errors, non-2xx, failed)
# summed, the maximum (max_ms) the largest, the rest the median. None when
# the target had no round (it did not start).
round_median() {
    { grep "^ROUND bench=$1 load=$2 target=$3 " "$RESULTS" || true; } | awk '
        {
            for (i = 5; i <= NF; i++) {
                split($i, kv, "=")
                if (!(kv[1] in seen)) { seen[kv[1]] = 1; keys[++nk] = kv[1] }
                v[kv[1], ++n[kv[1]]] = kv[2]
            }
        }
        END {
            line = ""
            for (k = 1; k <= nk; k++) {
                key = keys[k]
                m = n[key]
                for (i = 1; i <= m; i++) s[i] = v[key, i] + 0
                for (i = 2; i <= m; i++) {
                    x = s[i]
                    for (j = i - 1; j >= 1 && s[j] > x; j--) s[j + 1] = s[j]
                    s[j + 1] = x
                }
                med = m % 2 ? s[(m + 1) / 2] : (s[m / 2] + s[m / 2 + 1]) / 2
                if (key ~ /^(requests|errors|non2xx|failed)$/) {
                    med = 0
                    for (i = 1; i <= m; i++) med += s[i]
                }
                if (key ~ /^max_/) med = s[m]
                line = line sprintf(" %s=%s", key, key ~ /_ms$/ ? sprintf("%.3f", med) : \
                    key ~ /^(cpu_|gbps$)/ ? sprintf("%.2f", med) : sprintf("%.0f", med))
            }
            if (nk) print line
        }' | sed "s/^/RESULT bench=$1 load=$2 target=$3 rounds=$ROUNDS/" | tee -a "$RESULTS"
}

# h2_run TARGET URL: one h2load load (HTTP/2 prior knowledge), a ROUND line.
h2_run() {
    local target="$1" url="$2" out
    out="$(h2load -c"${BENCH_H2_CONNECTIONS:-16}" -m"${BENCH_H2_STREAMS:-10}" -t2 \
        --warm-up-time="${BENCH_WARMUP:-2}" -D"${BENCH_DURATION:-10}" "$url")"
    echo "$out" >&2
    echo "$out" | awk -v target="$target" "$AWK_MS"'
        /^finished in/ { r = $4; gsub(",", "", r); rps = r + 0 }
        /^requests:/ { failed = $10 }
        /^time for request:/ { mean = ms($6); max = ms($5) }
        END {
            printf "ROUND bench=alb load=h2load target=%s rps=%.0f mean_ms=%.3f max_ms=%.3f failed=%d\n",
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

    # The origin: nginx serving a 1 KiB file (HTTP/1.1, and h2c on a second port).
    cat >"$dir/origin/nginx.conf" <<EOF
worker_processes 1;
pid $dir/origin/nginx.pid;
error_log $dir/origin/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    ${NGINX_TEMPS//T/$dir/origin}
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
    ${NGINX_TEMPS//T/$dir/proxy}
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

    # Each load runs BENCH_ROUNDS times against every target, the targets
    # taking turns (in reverse order every other round), so that a slow
    # spell of this shared machine falls on all of them; each target's
    # median is its result.
    local load round target port
    for load in keepalive close h2load; do
        for round in $(seq 1 "$ROUNDS"); do
            for target in $(in_turn "$round" origin nginx alb); do
                case $load/$target in
                h2load/origin) port=$origin_h2 ;;
                h2load/nginx) port=$proxy_h2 ;;
                */origin) port=$origin ;;
                */nginx) port=$proxy ;;
                */alb) port=$alb ;;
                esac
                case $target in
                origin) CPU_PID=$origin_pid ;;
                nginx) CPU_PID=$proxy_pid ;;
                alb) CPU_PID=$alb_pid ;;
                esac
                case $load in
                keepalive)
                    say "alb: wrk, keep-alive, 1 KiB, $target (round $round of $ROUNDS)"
                    wrk_run keepalive "$target" "http://127.0.0.1:$port/1k"
                    ;;
                close)
                    say "alb: wrk, a new connection per request, 1 KiB, $target (round $round of $ROUNDS)"
                    wrk_run close "$target" "http://127.0.0.1:$port/1k" -H "Connection: close"
                    ;;
                h2load)
                    say "alb: h2load, HTTP/2 prior knowledge, 1 KiB, $target (round $round of $ROUNDS)"
                    h2_run "$target" "http://127.0.0.1:$port/1k"
                    ;;
                esac
            done
        done
        for target in origin nginx alb; do
            round_median alb "$load" "$target"
        done
    done
    CPU_PID=""
    kill "$alb_pid" "$proxy_pid" "$origin_pid" 2>/dev/null || true
    wait "$alb_pid" "$proxy_pid" "$origin_pid" 2>/dev/null || true
}

# --- l4: the NLB's data plane against HAProxy and nginx stream ---------------

L4_TARGETS_ALL="direct haproxy nginx nlb-declared nlb-sniffing"
L4_DIR=""      # the l4 benchmark's files
L4_PID=""      # the target under load (its children count with it); none for direct
L4_HTTP=""     # its port that leads to the origin's HTTP server
L4_IPERF=""    # its port that leads to the origin's iperf3 server
L4_NLB_SKIP="" # why the NLB rows are skipped, once known
declare -A L4_PORT


# l4_cpu: tree_cpu of the target (nothing for direct).
l4_cpu() { tree_cpu "$L4_PID"; }

# l4_rss: resident KiB (VmRSS) of the target's processes, summed.
l4_rss() {
    [ -n "$L4_PID" ] || return 0
    local p
    for p in $(pid_tree "$L4_PID"); do
        cat "/proc/$p/status" 2>/dev/null || true
    done | awk '/^VmRSS:/ { t += $2 } END { print t + 0 }'
}

# l4_kernel: machine-wide TCP socket buffer pages (/proc/net/sockstat) and
# bytes of kernel slab objects in use (/proc/slabinfo), on one line.
l4_kernel() {
    local slab=0
    [ ! -r /proc/slabinfo ] || slab="$(awk 'NR > 2 { t += $2 * $4 } END { printf "%.0f", t }' /proc/slabinfo)"
    printf '%s %s\n' \
        "$(awk '$1 == "TCP:" { for (i = 2; i < NF; i++) if ($i == "mem") print $(i + 1) }' /proc/net/sockstat)" "$slab"
}

# l4_probe PORT SECONDS: until one request for /1k through 127.0.0.1:PORT
# is answered 200, or the target (if any) has exited; says what the last
# try got if none was answered.
l4_probe() {
    local got=""
    for _ in $(seq 1 $(($2 * 5))); do
        got="$(curl -sS -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$1/1k" 2>&1)" || true
        [ "$got" != 200 ] || return 0
        if [ -n "$L4_PID" ] && ! kill -0 "$L4_PID" 2>/dev/null; then
            got="$got (the process exited)"
            break
        fi
        sleep 0.2
    done
    echo "127.0.0.1:$1/1k: $got" >&2
    return 1
}

# l4_ports N: N loopback ports, free now and below the kernel's ephemeral
# range: the loads' client sockets (and their TIME_WAITs) take ephemeral
# ports, and the targets bind theirs again minutes later.
l4_ports() {
    python3 - "$1" <<'EOF'
import random, socket, sys
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
candidates = list(range(max(1024, low - 10000), low))
random.shuffle(candidates)
found = []
for port in candidates:
    if len(found) == int(sys.argv[1]):
        break
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    found.append(port)
if len(found) < int(sys.argv[1]):
    sys.exit(f"no {sys.argv[1]} free ports below the ephemeral range (from {low})")
print(*found)
EOF
}

# l4_background LOG CMD...: CMD in the background, its output appended to
# LOG, its pid in L4_PID.
l4_background() {
    local log="$1"
    shift
    "$@" </dev/null >>"$log" 2>&1 &
    L4_PID=$!
    OTHER_PIDS+=("$L4_PID")
}

# l4_start TARGET [WRAPPER...]: starts TARGET (under WRAPPER, e.g. valgrind)
# and sets L4_PID, L4_HTTP and L4_IPERF. Returns 1, having said why, if it
# does not forward a request to the origin.
l4_start() {
    local target="$1"
    shift
    L4_PID="" L4_HTTP="" L4_IPERF=""
    case $target in
    direct)
        L4_HTTP="${L4_PORT[origin]}" L4_IPERF="${L4_PORT[iperf]}"
        return 0
        ;;
    haproxy)
        l4_background "$L4_DIR/$target.log" "$@" /usr/sbin/haproxy -f "$L4_DIR/haproxy.cfg" -db
        ;;
    nginx)
        # Under a wrapper, nginx runs as one process (no master) so that
        # the wrapper sees the worker.
        local conf=nginx.conf
        [ $# -eq 0 ] || conf=nginx-single.conf
        l4_background "$L4_DIR/$target.log" "$@" /usr/sbin/nginx -c "$L4_DIR/nginx/$conf" -p "$L4_DIR/nginx" -g 'daemon off;'
        ;;
    nlb-declared | nlb-sniffing)
        if [ -n "$L4_NLB_SKIP" ]; then
            echo "$target: skipped ($L4_NLB_SKIP)"
            return 1
        fi
        NLB_WRAP=("$@")
        if ! launch_nlb "$L4_DIR/nlb" "$L4_DIR/nlb/nlb.yaml"; then
            NLB_WRAP=()
            stop_nlb
            l4_skip "$target" $#
            return 1
        fi
        NLB_WRAP=()
        L4_PID="$NLB_PID"
        ;;
    esac
    L4_HTTP="${L4_PORT[$target-http]}" L4_IPERF="${L4_PORT[$target-iperf]}"
    if ! l4_probe "$L4_HTTP" "$([ $# -eq 0 ] && echo 10 || echo 60)"; then
        l4_skip "$target" $#
        l4_stop
        return 1
    fi
}

# l4_skip TARGET WRAPPED: says that TARGET did not forward (WRAPPED: the
# number of wrapper words it ran under). An NLB that does not, unwrapped, is
# one without listeners: both NLB targets are skipped from then on.
l4_skip() {
    if [[ $1 == nlb-* ]] && [ "$2" -eq 0 ]; then
        L4_NLB_SKIP="listeners not supported by this build"
        echo "nlb: skipped ($L4_NLB_SKIP)"
    else
        echo "$1: skipped (it did not forward a request to the origin)"
        [[ $1 == nlb-* ]] || tail -20 "$L4_DIR/$1.log" >&2 || true
    fi
}

# l4_stop: SIGTERM to the target, SIGKILL after 10 s; reaps it.
l4_stop() {
    [ -n "$L4_PID" ] || return 0
    local pid="$L4_PID"
    L4_PID=""
    if [ "$pid" = "$NLB_PID" ]; then
        stop_nlb
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}

# l4_iperf TARGET STREAMS: bulk throughput from the iperf3 client to the
# server through the target, and the target's CPU per GB.
l4_iperf() {
    local target="$1" streams="$2" duration="${BENCH_DURATION:-10}" c0 c1 json stats
    say "l4: iperf3, $streams stream(s), ${duration}s, $target"
    c0="$(l4_cpu)"
    json="$(timeout $((duration + 30)) iperf3 -c 127.0.0.1 -p "$L4_IPERF" -P "$streams" -t "$duration" -J)" || true
    c1="$(l4_cpu)"
    if ! stats="$(python3 -c '
import json, sys
try:
    r = json.loads(sys.stdin.read())
except ValueError as e:
    sys.exit(f"iperf3: no report ({e})")
if r.get("error"):
    sys.exit("iperf3: " + r["error"])
s = r["end"]["sum_received"]
print("gbps=%.2f bytes=%d" % (s["bits_per_second"] / 1e9, s["bytes"]))
' <<<"$json")"; then
        return 0
    fi
    echo "$stats" >&2
    echo "ROUND bench=l4 load=iperf-p$streams target=$target $stats$(cpu_per "$c0" "$c1" "${stats##*bytes=}" 1e12 cpu_ms_per_gb)" | tee -a "$RESULTS"
}

# l4_wrk TARGET KIND [wrk args]: wrk's 1 KiB load through the target, and
# the target's CPU per request (which is per connection with
# `Connection: close`).
l4_wrk() {
    local target="$1" kind="$2" c0 c1 stats field=cpu_us_per_req
    shift 2
    [ "$kind" = keepalive ] || field=cpu_us_per_conn
    c0="$(l4_cpu)"
    stats="$(wrk_stats "http://127.0.0.1:$L4_HTTP/1k" "$@")" || return 0
    c1="$(l4_cpu)"
    local requests="${stats##*requests=}" errors="${stats##*errors=}" non2xx="${stats##*non2xx=}"
    echo "ROUND bench=l4 load=$kind target=$target $stats failed=$((${errors%% *} + ${non2xx%% *}))$(cpu_per "$c0" "$c1" "${requests%% *}" 1e6 "$field")" | tee -a "$RESULTS"
}

# l4_idle TARGET: L4_IDLE connections through the target, each answered
# once and then held idle; the target's resident memory growth and the
# kernel's per connection.
l4_idle() {
    local target="$1"
    local log="$L4_DIR/idle-$target" pid r0 r1 m0 m1 s0 s1 opened still
    [ -n "$L4_PID" ] || return 0
    say "l4: $L4_IDLE idle connections (one request each, then held), $target"
    r0="$(l4_rss)"
    read -r m0 s0 <<<"$(l4_kernel)"
    "$REL/l4-conns" --addr "127.0.0.1:$L4_HTTP" --count "$L4_IDLE" --path /1k --sources 4 \
        --hold-secs 120 --deadline-secs 120 >"$log.out" 2>"$log.err" &
    pid=$!
    OTHER_PIDS+=("$pid")
    for _ in $(seq 1 1500); do
        grep -q '^ready' "$log.out" && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    sleep 2 # the last upstream connections settle
    r1="$(l4_rss)"
    read -r m1 s1 <<<"$(l4_kernel)"
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
    cat "$log.out" "$log.err" >&2
    opened="$(sed -n 's/^ready opened=\([0-9]*\).*/\1/p' "$log.out")"
    still="$(sed -n 's/^done still_open=\([0-9]*\).*/\1/p' "$log.out")"
    [ "${opened:-0}" -gt 0 ] || return 0
    awk -v t="$target" -v n="$L4_IDLE" -v o="$opened" -v s="${still:-0}" -v page="$L4_PAGE" \
        -v r0="$r0" -v r1="$r1" -v m0="$m0" -v m1="$m1" -v s0="$s0" -v s1="$s1" 'BEGIN {
        printf "RESULT bench=l4 load=idle target=%s conns=%d opened=%d still_open=%d", t, n, o, s
        printf " rss_kib_per_conn=%.2f rss_mib_per_10k=%.1f", (r1 - r0) / o, (r1 - r0) / o * 10000 / 1024
        printf " sock_kib_per_conn=%.2f slab_kib_per_conn=%.2f\n", (m1 - m0) * page / 1024 / o, (s1 - s0) / 1024 / o
    }' | tee -a "$RESULTS"
}

# l4_callgrind TARGET: user-space instructions per connection of the target
# under callgrind: after a warm-up, counters are zeroed, connections are
# made one at a time with one request each, and the counters dumped.
l4_callgrind() {
    local target="$1"
    local n="${BENCH_L4_CALLGRIND_CONNS:-2000}" cg="$L4_DIR/callgrind-$target" part opened ir
    say "l4: callgrind, instructions per connection ($n connections, one request each), $target"
    mkdir -p "$cg"
    l4_start "$target" valgrind --tool=callgrind --callgrind-out-file="$cg/callgrind.out.%p" || return 0
    "$REL/l4-conns" --addr "127.0.0.1:$L4_HTTP" --count 200 --path /1k --close --concurrency 1 >/dev/null
    callgrind_control -z "$L4_PID" >&2
    "$REL/l4-conns" --addr "127.0.0.1:$L4_HTTP" --count "$n" --path /1k --close --concurrency 1 \
        --deadline-secs 300 >"$cg/load.out"
    callgrind_control -d "$L4_PID" >&2
    part="$cg/callgrind.out.$L4_PID.1" # the first dump; zeroing makes none
    for _ in $(seq 1 100); do
        grep -q '^summary:' "$part" 2>/dev/null && break
        sleep 0.1
    done
    l4_stop
    opened="$(sed -n 's/^ready opened=\([0-9]*\).*/\1/p' "$cg/load.out")"
    ir="$(awk '/^summary:/ { print $2 }' "$part" 2>/dev/null)"
    if [ "${opened:-0}" -gt 0 ] && [ -n "$ir" ]; then
        echo "RESULT bench=l4 load=callgrind target=$target conns=$opened ir=$ir ir_per_conn=$((ir / opened))" | tee -a "$RESULTS"
    else
        echo "$target: no callgrind result" >&2
        tail -5 "$cg/load.out" >&2 || true
    fi
}

# l4_nginx_conf PROCESSES: nginx's stream config, with PROCESSES (a
# directive) saying how many processes run it.
l4_nginx_conf() {
    local ngx="$L4_DIR/nginx"
    cat <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
$1
worker_rlimit_nofile $L4_NOFILE;
pid $ngx/nginx.pid;
error_log $ngx/error.log warn;
events { worker_connections $L4_WORKER_CONNECTIONS; }
stream {
    server { listen 127.0.0.1:${L4_PORT[nginx-http]}; proxy_pass 127.0.0.1:${L4_PORT[origin]}; }
    server { listen 127.0.0.1:${L4_PORT[nginx-iperf]}; proxy_pass 127.0.0.1:${L4_PORT[iperf]}; }
}
EOF
}

# l4_configs: the configs of the origin, HAProxy, nginx and the NLB.
l4_configs() {
    cat >"$L4_DIR/origin/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $L4_NOFILE;
pid $L4_DIR/origin/nginx.pid;
error_log $L4_DIR/origin/error.log warn;
events { worker_connections $L4_WORKER_CONNECTIONS; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    ${NGINX_TEMPS//T/$L4_DIR/origin}
    server { listen 127.0.0.1:${L4_PORT[origin]}; root $L4_DIR/www; }
}
EOF
    cat >"$L4_DIR/haproxy.cfg" <<EOF
global
    nbthread 2
    maxconn $((L4_IDLE + 50))
defaults
    mode tcp
    maxconn $((L4_IDLE + 50))
    timeout connect 5s
    timeout client 10m
    timeout server 10m
listen http
    bind 127.0.0.1:${L4_PORT[haproxy-http]}
    server origin 127.0.0.1:${L4_PORT[origin]}
listen iperf
    bind 127.0.0.1:${L4_PORT[haproxy-iperf]}
    server origin 127.0.0.1:${L4_PORT[iperf]}
EOF
    l4_nginx_conf "worker_processes 2;" >"$L4_DIR/nginx/nginx.conf"
    l4_nginx_conf "master_process off;" >"$L4_DIR/nginx/nginx-single.conf"
    cat >"$L4_DIR/nlb/nlb.yaml" <<EOF
listeners:
  - name: http-declared
    bind: "127.0.0.1:${L4_PORT[nlb-declared-http]}"
    protocol: tcp          # declared: no sniffing
  - name: iperf-declared
    bind: "127.0.0.1:${L4_PORT[nlb-declared-iperf]}"
    protocol: tcp
  - name: http-sniffing
    bind: "127.0.0.1:${L4_PORT[nlb-sniffing-http]}"
    protocol: auto         # sniffed
  - name: iperf-sniffing
    bind: "127.0.0.1:${L4_PORT[nlb-sniffing-iperf]}"
    protocol: auto
backends:
  origin-http: ["127.0.0.1:${L4_PORT[origin]}"]
  origin-iperf: ["127.0.0.1:${L4_PORT[iperf]}"]
routes:
  - route_id: http-declared
    protocol: tcp
    destination_port: ${L4_PORT[nlb-declared-http]}
    metadata: {backend: origin-http}
  - route_id: iperf-declared
    protocol: tcp
    destination_port: ${L4_PORT[nlb-declared-iperf]}
    metadata: {backend: origin-iperf}
  - route_id: http-sniffing
    protocol: tcp
    destination_port: ${L4_PORT[nlb-sniffing-http]}
    metadata: {backend: origin-http}
  - route_id: iperf-sniffing
    protocol: tcp
    destination_port: ${L4_PORT[nlb-sniffing-iperf]}
    metadata: {backend: origin-iperf}
EOF
}

bench_l4() {
    local targets target
    read -r -a targets <<<"${BENCH_L4_TARGETS:-$L4_TARGETS_ALL}"
    for target in "${targets[@]}"; do
        [[ " $L4_TARGETS_ALL " == *" $target "* ]] || {
            echo "BENCH_L4_TARGETS: unknown target $target (known: $L4_TARGETS_ALL)" >&2
            exit 2
        }
    done
    local missing=()
    [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
    # nginx's stream module; it brings nginx itself if that is missing too.
    [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing+=(libnginx-mod-stream)
    command -v iperf3 >/dev/null 2>&1 || missing+=(iperf3)
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    if [ "${BENCH_L4_CALLGRIND:-0}" = 1 ]; then
        command -v callgrind_control >/dev/null 2>&1 || missing+=(valgrind)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        say "l4: installing ${missing[*]} from Debian"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        local service
        for service in haproxy nginx iperf3; do
            service "$service" stop >/dev/null 2>&1 || true
        done
    fi

    L4_DIR="$WORK/l4"
    mkdir -p "$L4_DIR/www" "$L4_DIR/origin" "$L4_DIR/nginx" "$L4_DIR/nlb"
    head -c 1024 /dev/zero | tr '\0' x >"$L4_DIR/www/1k"
    L4_PAGE="$(getconf PAGESIZE)"

    # A proxy holds two descriptors per proxied connection: raise the soft
    # limit to the hard one, and hold no more idle connections than it allows.
    local hard most
    hard="$(ulimit -Hn)"
    [ "$hard" != unlimited ] || hard=1048576
    ulimit -n "$hard" 2>/dev/null || true
    L4_NOFILE="$(ulimit -n)"
    L4_IDLE="${BENCH_L4_IDLE:-10000}"
    most=$(((L4_NOFILE - 300) / 2))
    if [ "$L4_IDLE" -gt "$most" ]; then
        echo "l4: a file-descriptor limit of $L4_NOFILE lets a proxy hold $most connections (two descriptors each): the idle runs open $most"
        L4_IDLE="$most"
    fi
    L4_WORKER_CONNECTIONS=$((2 * L4_IDLE + 1000))
    [ "$L4_WORKER_CONNECTIONS" -le $((L4_NOFILE - 100)) ] || L4_WORKER_CONNECTIONS=$((L4_NOFILE - 100))

    local names=(origin iperf haproxy-http haproxy-iperf nginx-http nginx-iperf
        nlb-declared-http nlb-declared-iperf nlb-sniffing-http nlb-sniffing-iperf) ports i
    read -r -a ports <<<"$(l4_ports ${#names[@]})"
    [ ${#ports[@]} -eq ${#names[@]} ] || exit 1
    for i in "${!names[@]}"; do
        L4_PORT[${names[$i]}]="${ports[$i]}"
    done
    l4_configs

    # The origin: nginx (one worker) serving 1 KiB over HTTP/1.1, and an
    # iperf3 server.
    /usr/sbin/nginx -c "$L4_DIR/origin/nginx.conf" -p "$L4_DIR/origin" -g 'daemon off;' \
        </dev/null >"$L4_DIR/origin.log" 2>&1 &
    local origin_pid=$!
    OTHER_PIDS+=("$origin_pid")
    iperf3 -s -B 127.0.0.1 -p "${L4_PORT[iperf]}" </dev/null >"$L4_DIR/iperf3.log" 2>&1 &
    local iperf_pid=$!
    OTHER_PIDS+=("$iperf_pid")
    wait_port "${L4_PORT[origin]}"
    wait_port "${L4_PORT[iperf]}"
    if ! l4_probe "${L4_PORT[origin]}" 10; then
        echo "the origin does not serve /1k:" >&2
        cat "$L4_DIR/origin/error.log" >&2 || true
        exit 1
    fi

    # The loads run BENCH_ROUNDS times against every target, the targets
    # taking turns (in reverse order every other round), so that a slow
    # spell of this shared machine falls on all of them; each target's
    # median is its result. The idle connections (memory, which does not
    # move with the machine) are held in the first round only.
    local round load
    for round in $(seq 1 "$ROUNDS"); do
        for target in $(in_turn "$round" "${targets[@]}"); do
            say "l4: $target (round $round of $ROUNDS)"
            l4_start "$target" || continue
            l4_iperf "$target" 1
            l4_iperf "$target" 8
            say "l4: wrk, keep-alive, 1 KiB, $target"
            l4_wrk "$target" keepalive
            say "l4: wrk, a new connection per request, 1 KiB, $target"
            l4_wrk "$target" close -H "Connection: close"
            [ "$round" -gt 1 ] || l4_idle "$target"
            l4_stop
        done
    done
    for load in iperf-p1 iperf-p8 keepalive close; do
        for target in "${targets[@]}"; do
            round_median l4 "$load" "$target"
        done
    done
    if [ "${BENCH_L4_CALLGRIND:-0}" = 1 ]; then
        for target in "${targets[@]}"; do
            # Optional, and slow to fail: a failure skips one target's row.
            [ "$target" = direct ] || l4_callgrind "$target" || true
        done
    fi
    kill -TERM "$iperf_pid" "$origin_pid" 2>/dev/null || true
    wait "$iperf_pid" "$origin_pid" 2>/dev/null || true
    forget_pid "$iperf_pid"
    forget_pid "$origin_pid"
}

# l4_table: the l4 RESULT lines as one table, each target's value with its
# ratio to direct; then the declared NLB against the better of HAProxy and
# nginx, and the sniffing NLB against the declared one, both as "how many
# times as good" (1.00 = as good; above is better, whatever the unit).
l4_table() {
    grep '^RESULT bench=l4 ' "$RESULTS" | awk -v targets="$L4_TARGETS_ALL" '
        {
            delete f
            for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
            for (k in f) v[f["load"], f["target"], k] = f[k]
        }
        function good(better, x, ref) {
            if (x == "" || ref == "" || x + 0 == 0 || ref + 0 == 0) return "-"
            return sprintf("%.2f", better == "hi" ? x / ref : ref / x)
        }
        END {
            nt = split(targets, t, " ")
            nr = split("iperf-p1;gbps;hi;bulk, 1 stream (Gbit/s)|iperf-p8;gbps;hi;bulk, 8 streams (Gbit/s)|" \
                "keepalive;rps;hi;keep-alive (req/s)|keepalive;p50_ms;lo;keep-alive p50 (ms)|" \
                "keepalive;p99_ms;lo;keep-alive p99 (ms)|keepalive;failed;lo;keep-alive failed (errors, non-2xx)|" \
                "close;rps;hi;new conn each (req/s)|close;p50_ms;lo;new conn each p50 (ms)|" \
                "close;p99_ms;lo;new conn each p99 (ms)|close;failed;lo;new conn each failed|" \
                "iperf-p1;cpu_ms_per_gb;lo;CPU per GB, 1 stream (ms)|iperf-p8;cpu_ms_per_gb;lo;CPU per GB, 8 streams (ms)|" \
                "keepalive;cpu_us_per_req;lo;CPU per request (us)|close;cpu_us_per_conn;lo;CPU per connection (us)|" \
                "idle;still_open;hi;idle connections held|idle;rss_kib_per_conn;lo;RSS per idle conn (KiB)|" \
                "idle;slab_kib_per_conn;lo;kernel slab per idle conn (KiB)|idle;sock_kib_per_conn;lo;socket buffers per idle conn (KiB)|" \
                "callgrind;ir_per_conn;lo;instructions per conn (callgrind)", rows, "|")
            printf "%-36s", "l4"
            for (j = 1; j <= nt; j++) printf " %17s", t[j]
            printf " %11s %11s\n", "decl/peers", "sniff/decl"
            for (i = 1; i <= nr; i++) {
                split(rows[i], r, ";")
                any = 0
                for (j = 1; j <= nt; j++) if (v[r[1], t[j], r[2]] != "") any = 1
                if (!any) continue
                base = v[r[1], "direct", r[2]]
                printf "%-36s", r[4]
                for (j = 1; j <= nt; j++) {
                    x = v[r[1], t[j], r[2]]
                    cell = x == "" ? "-" : x
                    if (j > 1 && x != "" && base + 0 > 0) cell = sprintf("%s (%.2fx)", x, x / base)
                    printf " %17s", cell
                }
                h = v[r[1], "haproxy", r[2]]; n = v[r[1], "nginx", r[2]]
                best = h
                if (best == "" || (n != "" && (r[3] == "hi" ? n + 0 > best + 0 : n + 0 < best + 0))) best = n
                d = v[r[1], "nlb-declared", r[2]]
                printf " %11s %11s\n", good(r[3], d, best), good(r[3], v[r[1], "nlb-sniffing", r[2]], d)
            }
        }'
}

for b in "${selected[@]}"; do
    "bench_$b"
done

# --- summary ----------------------------------------------------------------

say "summary: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(date -u +%Y-%m-%dT%H:%MZ)"
{ grep '^RESULT ' "$RESULTS" || true; } | awk '
    $2 == "bench=l4" { next }
    {
        delete f
        for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
        if (f["bench"] == "alb") {
            if (f["target"] == "nginx") nginx_rps[f["load"]] = f["rps"]
            ratio = f["target"] == "alb" && nginx_rps[f["load"]] > 0 ? \
                sprintf("%.2fx", f["rps"] / nginx_rps[f["load"]]) : "-"
            http[++nh] = sprintf("%-10s %-7s %9s %9s %9s %9s %9s %9s %9s", f["load"], f["target"], f["rps"],
                f["p50_ms"] != "" ? f["p50_ms"] : "-", f["p99_ms"] != "" ? f["p99_ms"] : "-",
                f["mean_ms"] != "" ? f["mean_ms"] : "-", f["max_ms"] != "" ? f["max_ms"] : "-",
                f["cpu_us_per_req"] != "" ? f["cpu_us_per_req"] : "-", ratio)
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
            printf "\n%-10s %-7s %9s %9s %9s %9s %9s %9s %9s\n", "http load", "target", "req/s", "p50 ms",
                "p99 ms", "mean ms", "max ms", "CPU us", "/ nginx"
            for (i = 1; i <= nh; i++) print http[i]
        }
        if (nf) {
            printf "\n%-13s %-16s %9s %10s %9s %10s %7s %9s %9s %8s\n", "fleet", "auth", "instances",
                "register s", "beats/s", "beat p99", "errors", "NLB CPU%", "us/beat", "RSS MiB"
            for (i = 1; i <= nf; i++) print fleet[i]
        }
    }'
if grep -q '^RESULT bench=l4 ' "$RESULTS"; then
    echo
    l4_table
fi
