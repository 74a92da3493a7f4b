#!/usr/bin/env bash
# Stops the stack scripts/up.sh started, Docker or local, leaving nothing
# running.
#
#   scripts/down.sh [--volumes]
#
# --volumes  also delete the NLB's state volume (operator changes made
#            through the API); kept by default
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

volumes=0
while [ $# -gt 0 ]; do
    case "$1" in
        --volumes|-v) volumes=1; shift ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "down.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

stopped=0

# Local processes: SIGTERM (they drain), then SIGKILL after 20 s.
run="$(target_dir)/switchyard-local"
pids=()
for f in "$run"/*.pid; do
    [ -e "$f" ] || continue
    pid="$(cat "$f")"
    # Only our own processes: a pid file left from before a reboot may name
    # someone else's process now.
    if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$(dirname "$run")"; then
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid")
    fi
done
if [ ${#pids[@]} -gt 0 ]; then
    echo "== stopping the local stack (${#pids[@]} processes)"
    deadline=$((SECONDS + 20))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "process $pid did not stop within 20 s: killed"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    stopped=1
fi
rm -f "$run"/*.pid

# The compose project.
if [ -z "$(docker_unusable)" ]; then
    project="${COMPOSE_PROJECT_NAME:-switchyard}"
    if [ -n "$(docker ps -aq --filter "label=com.docker.compose.project=$project")" ] ||
        { [ "$volumes" = 1 ] && [ -n "$(docker volume ls -q --filter "label=com.docker.compose.project=$project")" ]; }; then
        echo "== stopping the compose stack ($project)"
        args=(--remove-orphans)
        [ "$volumes" = 1 ] && args+=(--volumes)
        $(compose_cmd) -p "$project" down "${args[@]}"
        stopped=1
    fi
fi

[ "$stopped" = 1 ] || echo "nothing was running"
