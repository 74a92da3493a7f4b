"""The compose end-to-end test: the whole stack as a user runs it.

Brings docker-compose.yml up (`--scale alb=3`) from images of the binaries built by
scripts/test.sh, then:

1. HTTP through the published NLB port reaches the demo origin through an
   ALB, and the three ALBs share it;
2. one ALB container is killed under steady traffic: requests go on, and the
   dead instance leaves the NLB's registry;
3. the NLB container is restarted: the modules register again by
   themselves and traffic resumes, with no operator action;
4. the autoscaler (policy given through `nlbctl config apply`, the ALBs
   scaling with Docker through deploy/compose/autoscale.yml) adds an ALB
   container when connections rise, which registers and takes traffic, and
   removes it when they fall, with no failed request;
5. the stack is torn down and nothing of it is left (the container the
   scaler made included).

Run by scripts/test.sh as `python3 tests/stack/compose_e2e.py --target-dir DIR`.
Its last line says PASSED, or SKIPPED and why (no Docker daemon, no Compose),
or FAILED. Exit code 0 for passed or skipped, 1 for failed.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from echo_check import echo_line

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROJECT = "switchyard-e2e"
TAG = "e2e"


class Failed(Exception):
    pass


def log(msg):
    print(f"[compose-e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, check=True, timeout=300, env=None, quiet=False):
    """Runs a command, returns its stdout; on failure says what failed."""
    p = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and p.returncode != 0:
        raise Failed(
            f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        )
    if not quiet and p.stderr.strip() and p.returncode != 0:
        log(p.stderr.strip()[-500:])
    return p.stdout


def compose_cmd():
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if subprocess.run(["sh", "-c", "command -v docker-compose"], capture_output=True).returncode == 0:
        return ["docker-compose"]
    return None


def unusable():
    """Why Docker can't be used here, or None."""
    if subprocess.run(["sh", "-c", "command -v docker"], capture_output=True).returncode != 0:
        return "docker is not installed"
    try:
        p = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 20 s"
    if p.returncode != 0:
        return "no Docker daemon answers: " + (p.stderr.strip().splitlines() or ["?"])[-1]
    if compose_cmd() is None:
        return "neither 'docker compose' nor 'docker-compose' is installed"
    if not os.path.exists("/var/run/docker.sock"):
        return "no /var/run/docker.sock (rootless Docker or DOCKER_HOST): the autoscaling scenario mounts it"
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=10):
    """(status, body) of a GET on a new connection; status 0 when it failed."""
    req = urllib.request.Request(url, headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (OSError, urllib.error.URLError) as e:
        return 0, str(e)


def until(what, deadline_s, probe, every=0.5):
    """Polls probe() until it returns a true value; fails naming `what`."""
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise Failed(f"{what}: not within {deadline_s} s (last: {last!r})")


class Stack:
    def __init__(self, target_dir):
        self.compose = compose_cmd()
        self.nlbctl = os.path.join(target_dir, "debug", "nlbctl")
        self.ports = {
            "SWITCHYARD_HTTP_PORT": free_port(),
            "SWITCHYARD_ECHO_PORT": free_port(),
            "SWITCHYARD_GRPC_PORT": free_port(),
            "SWITCHYARD_ADMIN_PORT": free_port(),
        }
        self.env = dict(
            os.environ,
            SWITCHYARD_TAG=TAG,
            SWITCHYARD_PUBLISH_ADDR="127.0.0.1",
            SWITCHYARD_DOCKER_GID=str(os.stat("/var/run/docker.sock").st_gid),
        )
        self.env.update({k: str(v) for k, v in self.ports.items()})
        self.http = f"http://127.0.0.1:{self.ports['SWITCHYARD_HTTP_PORT']}"
        self.grpc = f"http://127.0.0.1:{self.ports['SWITCHYARD_GRPC_PORT']}"

    def compose_run(self, *args, timeout=300):
        files = ["-f", "docker-compose.yml", "-f", "deploy/compose/autoscale.yml"]
        return run(self.compose + ["-p", PROJECT, *files, *args], env=self.env, timeout=timeout)

    def containers(self, service=None, all_=False):
        """{container id: (name, hostname, ip)} of the project (or one service)."""
        cmd = ["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"]
        if all_:
            cmd.insert(2, "-a")
        if service:
            cmd += ["--filter", f"label=com.docker.compose.service={service}"]
        ids = run(cmd).split()
        out = {}
        for cid in ids:
            info = json.loads(run(["docker", "inspect", cid]))[0]
            nets = info["NetworkSettings"]["Networks"]
            ip = next(iter(nets.values()))["IPAddress"] if nets else ""
            out[cid] = (info["Name"].lstrip("/"), info["Config"]["Hostname"], ip)
        return out

    def leftovers(self):
        label = f"label=com.docker.compose.project={PROJECT}"
        return {
            "containers": run(["docker", "ps", "-aq", "--filter", label]).split(),
            "networks": run(["docker", "network", "ls", "-q", "--filter", label]).split(),
            "volumes": run(["docker", "volume", "ls", "-q", "--filter", label]).split(),
        }

    def down(self):
        self.compose_run("down", "--volumes", "--remove-orphans", "--timeout", "5")

    def modules(self):
        """{instance id: status} from nlbctl modules list --json, or None."""
        p = subprocess.run(
            [self.nlbctl, "--addr", self.grpc, "modules", "list", "--json"],
            capture_output=True, text=True, timeout=20,
        )
        if p.returncode != 0:
            return None
        return {m["instance_id"]: m for m in json.loads(p.stdout).get("modules", [])}

    def alb_requests(self, ip):
        """alb_requests_total summed, read from an ALB's admin port."""
        status, body = get(f"http://{ip}:9101/metrics")
        if status != 200:
            raise Failed(f"ALB metrics at {ip}:9101: {status} {body[:200]}")
        total = 0.0
        for line in body.splitlines():
            if line.startswith("alb_requests_total"):
                total += float(line.rsplit(" ", 1)[1])
        return total


class Traffic(threading.Thread):
    """Sequential GETs, each on a new connection, until stopped (bounded)."""

    def __init__(self, url, limit=2000, max_seconds=120):
        super().__init__(daemon=True)
        self.url, self.limit, self.max_seconds = url, limit, max_seconds
        self.stop = threading.Event()
        self.results = []  # (monotonic time, status)

    def run(self):
        end = time.monotonic() + self.max_seconds
        while not self.stop.is_set() and len(self.results) < self.limit and time.monotonic() < end:
            status, _ = get(self.url, timeout=15)
            self.results.append((time.monotonic(), status))
            time.sleep(0.02)


def scenario(stack):
    log("building images from the dev binaries (scripts/images.sh --profile dev --no-build --tag e2e)")
    run(["bash", "scripts/images.sh", "--profile", "dev", "--no-build", "--tag", TAG], timeout=600)

    log(f"{' '.join(stack.compose)} -p {PROJECT} up -d --scale alb=3")
    stack.compose_run("up", "-d", "--scale", "alb=3")
    start = time.monotonic()
    run(["bash", "-c", f". scripts/lib.sh && compose_wait_healthy {PROJECT} 180"], timeout=200)
    log(f"every container healthy after {time.monotonic() - start:.1f} s")

    albs = stack.containers("alb")
    if len(albs) != 3:
        raise Failed(f"expected 3 ALB containers, found {len(albs)}: {albs}")
    alb_ids = {cid: f"alb-{host}-8080" for cid, (_, host, _) in albs.items()}

    # 1. The three ALBs registered; HTTP goes NLB -> ALB -> origin, shared.
    until(
        "the three ALBs healthy in the NLB's registry",
        60,
        lambda: (m := stack.modules()) and all(
            m.get(i, {}).get("health_status") == "healthy" for i in alb_ids.values()
        ),
    )
    status, body = until(
        "the demo origin through the NLB",
        60,
        lambda: (r := get(stack.http + "/hello?x=1")) and r[0] == 200 and r,
    )
    doc = json.loads(body)
    if doc.get("path") != "/hello" or doc.get("query") != "x=1":
        raise Failed(f"the origin saw another request: {doc}")
    for header in ("x-forwarded-for", "x-request-id", "forwarded"):
        if header not in doc.get("headers", {}):
            raise Failed(f"the ALB did not add {header}: {doc}")
    before = {cid: stack.alb_requests(ip) for cid, (_, _, ip) in albs.items()}
    n = 60
    failed = [s for s in (get(stack.http + "/share")[0] for _ in range(n)) if s != 200]
    if failed:
        raise Failed(f"{len(failed)} of {n} requests failed: {failed}")
    shares = {cid: stack.alb_requests(ip) - before[cid] for cid, (_, _, ip) in albs.items()}
    if sum(shares.values()) != n or min(shares.values()) < n * 0.1:
        raise Failed(f"{n} requests were not shared by the three ALBs: {shares}")
    log(f"{n} requests through the NLB, shared {sorted(int(v) for v in shares.values())}")

    # 2. Kill one ALB under steady traffic.
    victim = sorted(albs)[0]
    victim_id = alb_ids[victim]
    traffic = Traffic(stack.http + "/steady")
    traffic.start()
    time.sleep(2)
    killed_at = time.monotonic()
    run(["docker", "kill", victim])
    log(f"killed {albs[victim][0]} ({victim_id})")
    until(
        f"{victim_id} leaves the NLB's registry",
        90,
        lambda: (m := stack.modules()) is not None and victim_id not in m,
    )
    left_at = time.monotonic()
    time.sleep(2)
    traffic.stop.set()
    traffic.join(30)
    log(f"{victim_id} left the registry {left_at - killed_at:.1f} s after the kill")
    bad = [(round(t - killed_at, 2), s) for t, s in traffic.results if s != 200]
    after = [s for t, s in traffic.results if t > killed_at]
    # Only a request already inside the killed ALB can be lost with it; new
    # connections go to the live one (connect timeout, next instance, then
    # ejection).
    if len(bad) > 1 or len(after) < 10:
        raise Failed(
            f"traffic did not go on: {len(bad)} failed of {len(traffic.results)} "
            f"({len(after)} after the kill): {bad[:10]}"
        )
    log(f"{len(traffic.results)} requests during the kill, {len(bad)} failed {bad}")

    # 3. Restart the NLB: modules register again, traffic resumes.
    nlb = list(stack.containers("nlb"))
    run(["docker", "restart", "--time", "10", nlb[0]])
    restarted_at = time.monotonic()
    log("restarted the NLB container")
    survivors = [alb_ids[c] for c in albs if c != victim]
    until(
        "the surviving ALBs and the echo module registered again after the NLB restart",
        90,
        lambda: (m := stack.modules())
        and all(m.get(i, {}).get("health_status") == "healthy" for i in survivors)
        and any(i.startswith("echo-") for i in m),
    )
    until(
        "traffic through the restarted NLB",
        60,
        lambda: get(stack.http + "/again")[0] == 200,
    )
    log(f"modules back and traffic resumed {time.monotonic() - restarted_at:.1f} s after the restart")
    failed = [s for s in (get(stack.http + "/after")[0] for _ in range(20)) if s != 200]
    if failed:
        raise Failed(f"after the NLB restart {len(failed)} of 20 requests failed: {failed}")

    autoscale(stack, survivors)

    # The echo module behind its declared TCP listener.
    echoed = echo_line(stack.ports["SWITCHYARD_ECHO_PORT"])
    if echoed != "ping":
        raise Failed(f"the echo module did not echo through the NLB: {echoed!r}")


POLICY = """evaluation_interval_seconds: 1
modules:
  alb:
    min_instances: 2
    max_instances: 3
    target_connections: 4
    scale_up_cooldown_seconds: 5
    scale_down_cooldown_seconds: 5
    window_seconds: 8
"""


def alb_ids(stack):
    m = stack.modules() or {}
    return {i for i, v in m.items() if i.startswith("alb-") and v.get("health_status") == "healthy"}


def autoscale(stack, survivors):
    """Connections rise: a third ALB container; they fall: it goes, drained."""
    import http.client
    import tempfile

    policy = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    policy.write(POLICY)
    policy.close()
    run([stack.nlbctl, "--addr", stack.grpc, "config", "apply", "autoscaling", policy.name])
    os.unlink(policy.name)
    before = set(stack.containers("alb"))
    if alb_ids(stack) != set(survivors):
        raise Failed(f"before scaling: {alb_ids(stack)} are healthy, not {survivors}")

    # Twelve idle keep-alive connections through the NLB: 6 per ALB against
    # a target of 4 asks for 3 instances.
    port = stack.ports["SWITCHYARD_HTTP_PORT"]
    held = []
    for _ in range(12):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        c.request("GET", "/held")
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise Failed(f"a held connection got {r.status}")
        held.append(c)
    grown = until("the autoscaler adds an ALB container that registers", 120,
                  lambda: len(alb_ids(stack)) == 3 and alb_ids(stack))
    new_ids = grown - set(survivors)
    added = set(stack.containers("alb")) - before
    if len(added) != 1:
        raise Failed(f"expected one new ALB container, found {added}")
    log(f"scaled up: {sorted(new_ids)} registered (container {stack.containers('alb')[next(iter(added))][0]})")
    # The new one takes traffic.
    ip = stack.containers("alb")[next(iter(added))][2]
    until("the new ALB serves requests", 60,
          lambda: get(stack.http + "/to-new")[0] == 200 and stack.alb_requests(ip) > 0)

    # Connections end: after the window it is stopped (drained) and removed,
    # while steady traffic sees no failure.
    traffic = Traffic(stack.http + "/during-scale-down")
    traffic.start()
    for c in held:
        c.close()
    until("the autoscaler removes the extra ALB", 120,
          lambda: set(stack.containers("alb")) == before and alb_ids(stack) == set(survivors))
    time.sleep(2)
    traffic.stop.set()
    traffic.join(30)
    bad = [s for _, s in traffic.results if s != 200]
    if bad or len(traffic.results) < 10:
        raise Failed(f"during scale-down {len(bad)} of {len(traffic.results)} requests failed: {bad[:10]}")
    status = json.loads(get(f"http://127.0.0.1:{stack.ports['SWITCHYARD_ADMIN_PORT']}/status")[1])
    moves = [(e["from"], e["to"], e["result"]) for e in status.get("scaling_events", [])]
    if (2, 3, "ok") not in moves or (3, 2, "ok") not in moves:
        raise Failed(f"scaling events: {moves}")
    log(f"scaled down with {len(traffic.results)} requests meanwhile, none failed; events {moves}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target-dir", required=True)
    args = ap.parse_args()

    why = unusable()
    if why:
        print(f"compose e2e: SKIPPED ({why})", flush=True)
        return 0
    stack = Stack(args.target_dir)
    stack.down()  # leftovers of an interrupted run
    try:
        scenario(stack)
    except Exception as e:  # any failure, not only ours: never leave it running
        log("FAILED; the stack's state and logs follow")
        print(run(stack.compose + ["-p", PROJECT, "ps"], check=False, env=stack.env), flush=True)
        print(run(stack.compose + ["-p", PROJECT, "logs", "--tail", "40"], check=False, env=stack.env), flush=True)
        stack.down()
        print(f"compose e2e: FAILED: {type(e).__name__}: {e}", flush=True)
        return 1
    stack.down()
    left = stack.leftovers()
    if any(left.values()):
        print(f"compose e2e: FAILED: teardown left {left}", flush=True)
        return 1
    print("compose e2e: PASSED (up, HTTP through NLB -> ALB -> origin shared by 3 ALBs, "
          "ALB killed under traffic, NLB restarted, autoscaled 2 -> 3 -> 2 with Docker, "
          "torn down leaving nothing)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
