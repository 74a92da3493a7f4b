#!/usr/bin/env bash
# Brings the whole Switchyard stack up: the NLB, the ALB, the echo module and
# a demo origin, then prints what to try.
#
#   scripts/up.sh [--local | --docker] [--alb N] [--profile release|dev] [--no-build]
#
# With Docker (the default when a daemon answers): builds release binaries
# and the images (scripts/images.sh), runs `docker compose up -d` on
# docker-compose.yml and waits until every container is healthy.
# --local, or no Docker daemon: the same stack as processes on 127.0.0.1,
# from deploy/local/, with logs in target/switchyard-local/.
# --docker   fail instead of falling back to local processes
# --alb N    ALB instances (Docker only; default 1)
# --profile  cargo profile of the binaries (default release)
# --no-build use the binaries already built
#
# scripts/down.sh stops either.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

mode=auto
albs=1
profile=release
build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --local) mode=local; shift ;;
        --docker) mode=docker; shift ;;
        --alb) albs="${2:?--alb needs a number}"; shift 2 ;;
        --profile) profile="${2:?--profile needs release or dev}"; shift 2 ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "up.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$albs" in ''|*[!0-9]*|0) echo "up.sh: --alb needs a positive number, not $albs" >&2; exit 2 ;; esac
case "$profile" in
    release) cargo_profile=(--release); dir=release ;;
    dev|debug) cargo_profile=(); dir=debug ;;
    *) echo "up.sh: --profile must be release or dev, not $profile" >&2; exit 2 ;;
esac

if [ "$mode" != local ]; then
    why="$(docker_unusable)"
    if [ -n "$why" ]; then
        [ "$mode" = docker ] && { echo "up.sh: --docker, but $why" >&2; exit 1; }
        echo "up.sh: $why; bringing the stack up as local processes (--local)"
        mode=local
    else
        mode=docker
    fi
fi

http_port="${SWITCHYARD_HTTP_PORT:-8080}"
echo_port="${SWITCHYARD_ECHO_PORT:-7000}"
grpc_port="${SWITCHYARD_GRPC_PORT:-50051}"
admin_port="${SWITCHYARD_ADMIN_PORT:-9090}"
target="$(target_dir)"
bin="$target/$dir"

# Waits until an HTTP URL answers 2xx (through switchyard-probe, which
# every build has): wait_http URL SECONDS WHAT
wait_http() {
    local deadline=$((SECONDS + $2))
    until "$bin/switchyard-probe" "$1" --timeout-ms 1000 >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "up.sh: $3 did not answer at $1 within $2 s" >&2
            "$bin/switchyard-probe" "$1" --timeout-ms 1000 || true
            return 1
        fi
        sleep 0.5
    done
}

if [ "$mode" = docker ]; then
    compose="$(compose_cmd)"
    project="${COMPOSE_PROJECT_NAME:-switchyard}"
    images_args=(--profile "$profile")
    [ "$build" = 1 ] || images_args+=(--no-build)
    scripts/images.sh "${images_args[@]}"
    echo "== $compose -p $project up -d --scale alb=$albs"
    $compose -p "$project" up -d --scale "alb=$albs"
    echo "== waiting for every container to be healthy"
    compose_wait_healthy "$project" 180 || {
        $compose -p "$project" ps >&2
        $compose -p "$project" logs --tail 20 >&2
        exit 1
    }
else
    if [ "$build" = 1 ]; then
        cargo build "${cargo_profile[@]}" -p nlb -p alb -p echo-module -p switchyard-tools --bins
    fi
    run="$target/switchyard-local"
    mkdir -p "$run"
    if [ -n "$(ls "$run"/*.pid 2>/dev/null)" ]; then
        echo "up.sh: a local stack is already running ($run); scripts/down.sh stops it" >&2
        exit 1
    fi
    # start NAME COMMAND...: in its own session, output to NAME.log.
    start() {
        local name="$1"; shift
        setsid "$@" >"$run/$name.log" 2>&1 </dev/null &
        echo $! >"$run/$name.pid"
    }
    for port in 50051 9090 8080 7000 8000 18080 17001 18061 17062 9101 9102; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "up.sh: 127.0.0.1:$port is in use (the Docker stack? scripts/down.sh stops it)" >&2
            exit 1
        fi
    done
    DEMO_ORIGIN_LISTEN=127.0.0.1:8000 DEMO_ORIGIN_NAME=origin-local start origin "$bin/demo-origin"
    NLB_STATE_FILE="$run/nlb.state.json" start nlb "$bin/nlb" --config deploy/local/nlb.yaml
    MODULE_CONFIG=deploy/local/alb.yaml start alb "$bin/alb"
    MODULE_CONFIG=deploy/local/echo.yaml start echo "$bin/echo-module"
    # The local stack's ports are those of deploy/local (the SWITCHYARD_*
    # ports move the compose stack's published ports only).
    http_port=8080 echo_port=7000 grpc_port=50051 admin_port=9090
    echo "== waiting for every process to be ready (logs: $run)"
    wait_http http://127.0.0.1:8000/healthz 30 "the demo origin"
    wait_http http://127.0.0.1:9090/readyz 30 "the NLB"
    wait_http http://127.0.0.1:9101/readyz 30 "the ALB (registered with the NLB)"
    wait_http http://127.0.0.1:9102/readyz 30 "the echo module (registered with the NLB)"
fi

# The ALB announces its routes when it registers: the first request through
# the NLB proves the whole path.
wait_http "http://127.0.0.1:$http_port/" 60 "the demo origin through the NLB and the ALB"

cat <<TXT

Switchyard is up ($mode). Try:

  curl -s http://127.0.0.1:$http_port/hello        # NLB -> ALB -> demo origin (JSON: who answered, what arrived)
  nc 127.0.0.1 $echo_port                          # NLB -> echo module: a greeting, then each line you type comes back
  $bin/nlbctl --addr http://127.0.0.1:$grpc_port modules list
  $bin/nlbctl --addr http://127.0.0.1:$grpc_port routes show
  curl -s http://127.0.0.1:$admin_port/metrics     # the NLB's metrics (Prometheus text)
  curl -s http://127.0.0.1:$admin_port/status      # the NLB's status (JSON)

Stop it with scripts/down.sh.
TXT
