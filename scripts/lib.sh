# Shared by up.sh, down.sh and compose-e2e.sh: sourced, not run.

# Where cargo builds (honours CARGO_TARGET_DIR and cargo config), absolute.
target_dir() {
    cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
}

# Why Docker cannot be used here, or nothing when it can: the daemon must
# answer and a Compose tool (the plugin or docker-compose) must exist.
docker_unusable() {
    if ! command -v docker >/dev/null 2>&1; then
        echo "docker is not installed"
    elif ! timeout 10 docker info >/dev/null 2>&1; then
        echo "no Docker daemon answers ($(timeout 10 docker info 2>&1 | grep -m1 -i 'error\|cannot' || echo 'docker info failed'))"
    elif [ -z "$(compose_cmd)" ]; then
        echo "neither 'docker compose' nor 'docker-compose' is installed"
    fi
}

# The Compose command: the docker plugin, else the standalone tool.
compose_cmd() {
    if docker compose version >/dev/null 2>&1; then
        echo "docker compose"
    elif command -v docker-compose >/dev/null 2>&1; then
        echo "docker-compose"
    fi
}

# Waits until every container of a compose project reports healthy.
# compose_wait_healthy PROJECT TIMEOUT_SECONDS
compose_wait_healthy() {
    local project="$1" deadline=$((SECONDS + $2)) ids states=""
    while :; do
        ids="$(docker ps -aq --filter "label=com.docker.compose.project=$project")"
        if [ -n "$ids" ]; then
            # shellcheck disable=SC2086
            states="$(docker inspect -f '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' $ids)"
            if ! grep -qv ' running healthy$' <<<"$states"; then
                return 0
            fi
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "not healthy after $2 s:" >&2
            echo "$states" | grep -v ' running healthy$' >&2 || true
            return 1
        fi
        sleep 1
    done
}
