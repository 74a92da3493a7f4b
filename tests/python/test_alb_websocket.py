"""WebSocket through the real `alb`: a `websockets` client talks to a
`websockets` echo server behind the ALB. The upgrade is forwarded with the
forwarding headers, then frames flow both ways until either side closes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import workspace_binary
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

DEADLINE_S = 60.0


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports that were free a moment ago (held open
    together while picked, so the kernel cannot hand out one twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    until = time.monotonic() + DEADLINE_S
    while time.monotonic() < until:
        if proc.poll() is not None:
            pytest.fail(f"alb exited with {proc.returncode}:\n{log.read_text()}", pytrace=False)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"alb did not listen on {port} within {DEADLINE_S}s:\n{log.read_text()}", pytrace=False)


def test_websocket_frames_flow_both_ways_through_the_alb(tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(run(tmp_path), DEADLINE_S))


async def run(tmp_path: Path) -> None:
    seen_headers: list[dict[str, str]] = []

    async def echo(ws) -> None:
        seen_headers.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0) as server:
        origin_port = server.sockets[0].getsockname()[1]
        data, grpc, admin = free_ports(3)
        config = tmp_path / "alb.yaml"
        config.write_text(
            f"""listen: {{grpc: "127.0.0.1:{grpc}", data: "127.0.0.1:{data}", admin: "127.0.0.1:{admin}"}}
nlb: {{addr: "127.0.0.1:1"}}
module:
  routes: [{{id: chat, path: {{prefix: /chat}}, cluster: chat}}]
  clusters: [{{name: chat, endpoints: [{{address: "127.0.0.1:{origin_port}"}}]}}]
"""
        )
        log = tmp_path / "alb.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [str(workspace_binary("alb", "SWITCHYARD_ALB_BIN")), "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if not k.startswith("MODULE_")},
            )
        try:
            await asyncio.to_thread(wait_listening, data, proc, log)
            async with connect(f"ws://127.0.0.1:{data}/chat/room-1") as ws:
                texts = [f"message {i}" for i in range(20)]
                for t in texts:
                    await ws.send(t)
                got = [await ws.recv() for _ in texts]
                assert got == texts
                blob = bytes(range(256)) * 1024
                await ws.send(blob)
                assert await ws.recv() == blob
            # The upgrade reached the origin with the forwarding headers.
            assert len(seen_headers) == 1
            h = seen_headers[0]
            assert h["x-forwarded-for"] == "127.0.0.1"
            assert h["x-forwarded-proto"] == "http"
            assert h["upgrade"].lower() == "websocket"
            assert len(h["x-request-id"]) >= 1
            # A path no route serves is refused before any upgrade.
            with pytest.raises(Exception) as refused:
                async with connect(f"ws://127.0.0.1:{data}/elsewhere"):
                    pass
            assert "404" in str(refused.value)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
