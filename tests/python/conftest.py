"""Fixtures for the Python interop suite: stubs generated from our .proto
files at test time, and the real `nlb` binary started on free loopback ports.

Nothing generated here is committed: the stubs go to a temp dir per session.
Every wait is a bounded poll with generous slack (the machine may be busy).
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "proto"
PROTO_FILES = [
    "marchproxy/types.proto",
    "marchproxy/rollout.proto",
    "marchproxy/nlb.proto",
    "marchproxy/module.proto",
]

START_DEADLINE_S = 60.0
EXIT_DEADLINE_S = 30.0
POLL_S = 0.1


def workspace_binary(name: str, env_var: str) -> Path:
    """A debug binary of the workspace: `env_var` (set by scripts/test.sh),
    else `$CARGO_TARGET_DIR/debug/<name>`, else `target/debug/<name>` in the
    repo."""
    explicit = os.environ.get(env_var)
    if explicit:
        path = Path(explicit)
    else:
        target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
        if not target.is_absolute():
            target = REPO / target
        path = target / "debug" / name
    if not path.is_file():
        pytest.fail(
            f"the {name} binary is not at {path}: build it first (`cargo build -p {name}`) "
            f"or set {env_var}",
            pytrace=False,
        )
    return path


def nlb_binary() -> Path:
    """The debug `nlb` (`SWITCHYARD_NLB_BIN`)."""
    return workspace_binary("nlb", "SWITCHYARD_NLB_BIN")


@dataclass
class Stubs:
    """The generated modules: `types_pb2`, `nlb_pb2`, `nlb_pb2_grpc`, ..."""

    types_pb2: types.ModuleType
    nlb_pb2: types.ModuleType
    nlb_pb2_grpc: types.ModuleType
    module_pb2: types.ModuleType


@pytest.fixture(scope="session")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Stubs:
    """Compiles proto/marchproxy/*.proto with grpcio-tools into a temp dir
    and imports the result."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    # The well-known types (google/protobuf/timestamp.proto) ship with grpc_tools.
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        *PROTO_FILES,
    ]
    rc = protoc.main(args)
    assert rc == 0, f"protoc failed ({rc}) on {PROTO_FILES}"
    sys.path.insert(0, str(out))
    importlib.invalidate_caches()
    return Stubs(
        types_pb2=importlib.import_module("marchproxy.types_pb2"),
        nlb_pb2=importlib.import_module("marchproxy.nlb_pb2"),
        nlb_pb2_grpc=importlib.import_module("marchproxy.nlb_pb2_grpc"),
        module_pb2=importlib.import_module("marchproxy.module_pb2"),
    )


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class NlbProcess:
    proc: subprocess.Popen
    grpc_addr: str
    admin_addr: str
    stderr_path: Path

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.admin_addr}/readyz", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> int | None:
        """SIGTERM, a bounded wait, then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=EXIT_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=EXIT_DEADLINE_S)
        return self.proc.returncode


@dataclass
class Launcher:
    """Starts `nlb` processes in a temp dir and stops them all at teardown."""

    workdir: Path
    started: list[NlbProcess] = field(default_factory=list)

    def start(self, env: dict[str, str] | None = None) -> NlbProcess:
        last_error = ""
        for attempt in range(5):
            p = self._spawn(attempt, env or {})
            error = self._wait_ready(p)
            if error is None:
                return p
            p.stop()
            # Another process may have taken a port between our probe and bind.
            if "cannot listen on" not in error:
                pytest.fail(error, pytrace=False)
            last_error = error
        pytest.fail(f"could not start nlb on free ports: {last_error}", pytrace=False)

    def _spawn(self, attempt: int, extra_env: dict[str, str]) -> NlbProcess:
        n = len(self.started)
        config = self.workdir / f"nlb-{n}.yaml"
        # No ModuleService listens at the addresses the tests register, so
        # active health checks are off: liveness is the heartbeat lease alone.
        config.write_text("health:\n  active_checks: false\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("NLB_") and k != "RUST_LOG"}
        grpc_addr = f"127.0.0.1:{free_port()}"
        admin_addr = f"127.0.0.1:{free_port()}"
        env.update(
            NLB_GRPC_LISTEN=grpc_addr,
            NLB_ADMIN_LISTEN=admin_addr,
            NLB_STATE_FILE=str(self.workdir / f"state-{n}" / "nlb.state.json"),
            NLB_LOG="info",
        )
        env.update(extra_env)
        stderr_path = self.workdir / f"nlb-{n}-{attempt}.stderr"
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                [str(nlb_binary()), "--config", str(config)],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        p = NlbProcess(proc, grpc_addr, admin_addr, stderr_path)
        self.started.append(p)
        return p

    @staticmethod
    def _wait_ready(p: NlbProcess) -> str | None:
        until = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < until:
            if p.proc.poll() is not None:
                return f"nlb exited with {p.proc.returncode} before it was ready; stderr:\n{p.stderr()}"
            if p.ready():
                return None
            time.sleep(POLL_S)
        return f"nlb was not ready within {START_DEADLINE_S}s; stderr:\n{p.stderr()}"

    def stop_all(self) -> None:
        for p in self.started:
            p.stop()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture
def start_nlb(launcher: Launcher) -> Callable[..., NlbProcess]:
    """`start_nlb(env={...})` starts a real nlb and waits until it is ready."""
    return launcher.start
