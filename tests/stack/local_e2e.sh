#!/usr/bin/env bash
# The README's first command without Docker: scripts/up.sh --local brings the
# stack up as processes on loopback (from the dev binaries scripts/test.sh
# built), HTTP and TCP go through the NLB, and scripts/down.sh leaves
# nothing running. Prints PASSED or FAILED as its last line.
#
#   tests/stack/local_e2e.sh TARGET_DIR
set -uo pipefail
cd "$(dirname "$0")/../.."
target="${1:?usage: local_e2e.sh TARGET_DIR}"
run="$target/switchyard-local"

fail() {
    echo "local stack e2e: FAILED: $*"
    for f in "$run"/*.log; do
        [ -e "$f" ] && { echo "--- $f"; tail -n 20 "$f"; }
    done
    scripts/down.sh >/dev/null 2>&1
    exit 1
}

scripts/up.sh --local --profile dev --no-build || fail "scripts/up.sh --local exited $?"
pids="$(cat "$run"/*.pid)"

body="$(curl -sf --max-time 10 'http://127.0.0.1:8080/local?x=1')" || fail "no 200 through the NLB on 8080"
python3 - "$body" <<'PY' || fail "the origin's answer is not what went in: $body"
import json, sys
doc = json.loads(sys.argv[1])
assert doc["origin"] == "origin-local", doc
assert doc["path"] == "/local" and doc["query"] == "x=1", doc
# The ALB behind the NLB saw the client through PROXY v2 and said so.
assert doc["headers"]["x-forwarded-for"] == "127.0.0.1", doc
assert "x-request-id" in doc["headers"], doc
PY

list="$("$target/debug/nlbctl" --addr http://127.0.0.1:50051 modules list --json)" || fail "nlbctl modules list"
healthy="$(python3 -c 'import json,sys; print(sum(m["health_status"] == "healthy" for m in json.load(sys.stdin)["modules"]))' <<<"$list")"
[ "$healthy" = 2 ] || fail "expected 2 healthy modules (alb, echo), nlbctl says: $list"

# The echo module behind the declared TCP listener: greeting, then the line.
echoed="$(python3 tests/stack/echo_check.py 7000)"
[ "$echoed" = ping ] || fail "the echo module answered ${echoed:-nothing} through 7000"

scripts/down.sh || fail "scripts/down.sh exited $?"
for pid in $pids; do
    kill -0 "$pid" 2>/dev/null && fail "process $pid still runs after scripts/down.sh"
done
[ -z "$(ls "$run"/*.pid 2>/dev/null)" ] || fail "pid files left in $run"
echo "local stack e2e: PASSED (up.sh --local, HTTP via NLB -> ALB -> origin, TCP via NLB -> echo, down.sh left nothing running)"
