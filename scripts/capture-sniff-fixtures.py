#!/usr/bin/env python3
"""Capture the protocol-sniffing fixtures from real clients.

The NLB's protocol detectors (shared-types/src/sniff/) are tested against the
first bytes real clients send, stored as binary files in
shared-types/tests/fixtures/sniff/. This script makes those files: for each
client it opens a listener on loopback, runs the client against it, records
what the client sends before it waits for an answer (its "first flight"),
and closes. The tests read the stored files; they never need these clients.

Run it from the repository root (as root for the apt step):

    apt-get install -y curl openssl postgresql-client redis-tools ffmpeg \
        netcat-openbsd krb5-kdc krb5-admin-server krb5-user
    pip install pymongo
    python3 scripts/capture-sniff-fixtures.py            # all fixtures
    python3 scripts/capture-sniff-fixtures.py psql-startup curl-http1

A client that is not installed is skipped (its old fixture is kept) and the
script exits 1 at the end. The versions of the clients used are written to
clients.txt beside the fixtures. Captures differ from run to run in random
fields (TLS randoms and key shares, ports in Host headers, request ids); the
tests assert only what does not change: the protocol, SNI, ALPN, host name,
message kinds.

The fixtures:

  curl-http1.bin           curl, HTTP/1.1 GET to http://switchyard.test:PORT/
                           (Host: switchyard.test:PORT)
  curl-http1-ipv6.bin      curl -g http://[::1]:PORT/ (Host: [::1]:PORT)
  curl-h2c-prior-knowledge.bin
                           curl --http2-prior-knowledge: the HTTP/2 preface,
                           SETTINGS, WINDOW_UPDATE and the first HEADERS
  curl-https-sni.bin       curl -k https://switchyard.test:PORT/: a TLS
                           ClientHello, SNI switchyard.test, ALPN h2,http/1.1
  openssl-s_client-sni.bin openssl s_client -servername
                           openssl.switchyard.test: SNI, no ALPN
  tls-hello-split-records.bin
                           made here, not captured: curl-https-sni.bin's
                           ClientHello re-framed into several TLS records
                           (3 bytes, then 100-byte records, then the rest), as
                           a client whose hello outgrows one record sends it
  psql-startup.bin         psql with sslmode=disable, gssencmode=disable: the
                           StartupMessage (user app, database shop)
  psql-sslrequest.bin      psql with sslmode=require: SSLRequest
  psql-gssenc.bin          psql with gssencmode=require and a Kerberos ticket
                           from a throwaway KDC started here (libpq sends
                           GSSENCRequest only with credentials): GSSENCRequest
  psql-cancel.bin          psql's CancelRequest: a small fake server here
                           completes psql's startup (AuthenticationOk,
                           BackendKeyData pid 4242, ReadyForQuery), psql runs
                           `select pg_sleep(60)`, gets SIGINT, and sends the
                           cancel on a new connection; that one is captured
  redis-cli-resp.bin       redis-cli PING (RESP array)
  redis-inline.bin         printf 'PING\\r\\n' | nc (an inline command)
  pymongo-hello.bin        pymongo's first handshake message (MongoClient with
                           directConnection, then a ping)
  ffmpeg-rtmp-publish.bin  ffmpeg publishing a test pattern to
                           rtmp://127.0.0.1:PORT/live/test: C0 and C1
"""

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "shared-types", "tests", "fixtures", "sniff")
HOST = "switchyard.test"
IDLE = 0.8  # seconds without a byte that end a first flight
LIMIT = 64 * 1024


class Listener:
    """Accepts connections on loopback and keeps each one's first flight.

    `handler(index, conn)` may talk to a connection instead (the fake
    PostgreSQL server); by default each connection is read until it goes
    quiet, then closed.
    """

    def __init__(self, family=socket.AF_INET, handler=None):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.flights = []
        self.handler = handler
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        index = 0
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            if self.handler:
                threading.Thread(
                    target=self.handler, args=(index, conn), daemon=True
                ).start()
            else:
                self.flights.append(first_flight(conn))
                conn.close()
            index += 1

    def wait_for(self, count, timeout=15):
        deadline = time.time() + timeout
        while len(self.flights) < count and time.time() < deadline:
            time.sleep(0.05)
        return len(self.flights) >= count

    def close(self):
        self.stopped.set()
        self.thread.join()
        self.sock.close()


def first_flight(conn, idle=IDLE, total=8.0):
    """What the peer sends until it goes quiet for `idle` seconds."""
    data = b""
    deadline = time.time() + total
    conn.settimeout(idle)
    while len(data) < LIMIT and time.time() < deadline:
        try:
            chunk = conn.recv(LIMIT - len(data))
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return data


def run_client(argv, env=None, stdin=None, timeout=15):
    """Runs a client in its own process group, stopping it after `timeout`."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.Popen(
        argv,
        env=full_env,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    if stdin is not None:
        proc.stdin.write(stdin)
        proc.stdin.close()
    return proc


def stop(proc, timeout=10):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def capture(argv, env=None, stdin=None, family=socket.AF_INET):
    """The first flight of the first connection `argv` (with PORT filled in)
    makes."""
    listener = Listener(family)
    try:
        argv = [a.replace("PORT", str(listener.port)) for a in argv]
        proc = run_client(argv, env=env, stdin=stdin)
        got = listener.wait_for(1)
        stop(proc)
        if not got:
            err = proc.stderr.read().decode(errors="replace")
            raise RuntimeError(f"{argv[0]} made no connection: {err.strip()}")
        return listener.flights[0]
    finally:
        listener.close()


# --- the clients ------------------------------------------------------------


def curl_http1():
    return capture(
        ["curl", "-s", "-m", "5", "--resolve", f"{HOST}:PORT:127.0.0.1",
         f"http://{HOST}:PORT/sniff?fixture=1"]
    )


def curl_http1_ipv6():
    return capture(
        ["curl", "-s", "-m", "5", "-g", "http://[::1]:PORT/"],
        family=socket.AF_INET6,
    )


def curl_h2c():
    return capture(
        ["curl", "-s", "-m", "5", "--http2-prior-knowledge", "--resolve",
         f"{HOST}:PORT:127.0.0.1", f"http://{HOST}:PORT/"]
    )


def curl_https():
    return capture(
        ["curl", "-s", "-k", "-m", "5", "--resolve", f"{HOST}:PORT:127.0.0.1",
         f"https://{HOST}:PORT/"]
    )


def openssl_s_client():
    return capture(
        ["openssl", "s_client", "-connect", "127.0.0.1:PORT", "-servername",
         f"openssl.{HOST}"],
        stdin=b"",
    )


def split_records(hello_records):
    """Re-frames a ClientHello sent in one record into several."""
    kind, version, length = struct.unpack(">BHH", hello_records[:5])
    assert kind == 0x16 and len(hello_records) >= 5 + length, "not one handshake record"
    message = hello_records[5 : 5 + length]
    pieces = [message[:3]] + [message[i : i + 100] for i in range(3, len(message), 100)]
    return b"".join(struct.pack(">BHH", kind, version, len(p)) + p for p in pieces)


PSQL_ENV = {"PGCONNECT_TIMEOUT": "5", "PGAPPNAME": "psql"}
PSQL = ["psql", "-h", "127.0.0.1", "-p", "PORT", "-U", "app", "-d", "shop",
        "-w", "-c", "select 1"]


def psql_startup():
    return capture(PSQL, env=dict(PSQL_ENV, PGSSLMODE="disable", PGGSSENCMODE="disable"))


def psql_sslrequest():
    return capture(PSQL, env=dict(PSQL_ENV, PGSSLMODE="require", PGGSSENCMODE="disable"))


def psql_gssenc():
    """libpq asks for GSS encryption only when it holds Kerberos credentials:
    a throwaway realm and KDC give it a ticket."""
    for tool in ("krb5kdc", "kdb5_util", "kadmin.local", "kinit"):
        if not shutil.which(tool):
            raise FileNotFoundError(tool)
    with tempfile.TemporaryDirectory() as d:
        kdc_port = free_port()
        with open(os.path.join(d, "krb5.conf"), "w") as f:
            f.write(
                "[libdefaults]\n default_realm = SNIFF.TEST\n"
                " dns_lookup_kdc = false\n dns_lookup_realm = false\n"
                f"[realms]\n SNIFF.TEST = {{\n  kdc = 127.0.0.1:{kdc_port}\n }}\n"
            )
        with open(os.path.join(d, "kdc.conf"), "w") as f:
            f.write(
                f"[kdcdefaults]\n kdc_ports = {kdc_port}\n kdc_tcp_ports = {kdc_port}\n"
                f"[realms]\n SNIFF.TEST = {{\n  database_name = {d}/principal\n"
                f"  key_stash_file = {d}/stash\n  acl_file = {d}/kadm5.acl\n }}\n"
            )
        env = {
            "KRB5_CONFIG": f"{d}/krb5.conf",
            "KRB5_KDC_PROFILE": f"{d}/kdc.conf",
            "KRB5CCNAME": f"FILE:{d}/ccache",
        }
        full = dict(os.environ, **env)
        quiet = {"env": full, "check": True, "capture_output": True}
        subprocess.run(["kdb5_util", "create", "-s", "-r", "SNIFF.TEST", "-P", "master"], **quiet)
        subprocess.run(["kadmin.local", "-q", "addprinc -pw app app@SNIFF.TEST"], **quiet)
        kdc = subprocess.Popen(["krb5kdc", "-n"], env=full, stderr=subprocess.DEVNULL)
        try:
            for _ in range(50):
                kinit = subprocess.run(["kinit", "app@SNIFF.TEST"], input=b"app\n",
                                       env=full, capture_output=True)
                if kinit.returncode == 0:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError(f"kinit failed: {kinit.stderr.decode().strip()}")
            return capture(PSQL, env=dict(PSQL_ENV, PGSSLMODE="disable",
                                          PGGSSENCMODE="require", **env))
        finally:
            kdc.terminate()
            kdc.wait()


def pg_message(kind, body):
    return kind + struct.pack(">I", len(body) + 4) + body


def read_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


def psql_cancel():
    """psql connects (to a fake server that lets it in), runs a slow query,
    is interrupted, and sends a CancelRequest on a second connection."""
    query_seen = threading.Event()
    flights = {}

    def handler(index, conn):
        conn.settimeout(10)
        try:
            if index > 0:
                flights[index] = first_flight(conn)
                return
            length = struct.unpack(">I", read_exact(conn, 4))[0]
            read_exact(conn, length - 4)  # the StartupMessage
            reply = pg_message(b"R", struct.pack(">I", 0))  # AuthenticationOk
            for name, value in [("server_version", "15.0"), ("client_encoding", "UTF8"),
                                ("server_encoding", "UTF8"), ("DateStyle", "ISO, MDY"),
                                ("integer_datetimes", "on"),
                                ("standard_conforming_strings", "on")]:
                reply += pg_message(b"S", name.encode() + b"\0" + value.encode() + b"\0")
            reply += pg_message(b"K", struct.pack(">II", 4242, 0x5EED5EED))
            reply += pg_message(b"Z", b"I")
            conn.sendall(reply)
            kind = read_exact(conn, 1)
            if kind == b"Q":
                query_seen.set()
            time.sleep(5)  # never answer the query
        except (OSError, ConnectionError):
            pass
        finally:
            conn.close()

    listener = Listener(handler=handler)
    try:
        argv = [a.replace("PORT", str(listener.port)) for a in PSQL[:-1]]
        argv.append("select pg_sleep(60)")
        proc = run_client(argv, env=dict(PSQL_ENV, PGSSLMODE="disable", PGGSSENCMODE="disable"))
        if not query_seen.wait(10):
            stop(proc, 0)
            raise RuntimeError("psql never sent its query: "
                               + proc.stderr.read().decode(errors="replace"))
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGINT)
        deadline = time.time() + 10
        while 1 not in flights and time.time() < deadline:
            time.sleep(0.05)
        stop(proc, 5)
        if 1 not in flights:
            raise RuntimeError("psql sent no cancel request")
        return flights[1]
    finally:
        listener.close()


def redis_cli_resp():
    return capture(["redis-cli", "-h", "127.0.0.1", "-p", "PORT", "PING"])


def redis_inline():
    return capture(["nc", "-N", "127.0.0.1", "PORT"], stdin=b"PING\r\n")


def pymongo_hello():
    if importlib.util.find_spec("pymongo") is None:
        raise FileNotFoundError("pymongo (pip)")
    script = (
        "import pymongo\n"
        "c = pymongo.MongoClient('127.0.0.1', PORT, directConnection=True,\n"
        "    serverSelectionTimeoutMS=3000, connectTimeoutMS=3000, appname='switchyard-fixture')\n"
        "try:\n"
        "    c.admin.command('ping')\n"
        "except Exception:\n"
        "    pass\n"
    )
    return capture([sys.executable, "-c", script])


def ffmpeg_rtmp():
    return capture(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
         "testsrc=size=64x64:rate=5", "-t", "2", "-f", "flv",
         "rtmp://127.0.0.1:PORT/live/test"]
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FIXTURES = [
    ("curl-http1", ["curl"], curl_http1),
    ("curl-http1-ipv6", ["curl"], curl_http1_ipv6),
    ("curl-h2c-prior-knowledge", ["curl"], curl_h2c),
    ("curl-https-sni", ["curl"], curl_https),
    ("openssl-s_client-sni", ["openssl"], openssl_s_client),
    ("psql-startup", ["psql"], psql_startup),
    ("psql-sslrequest", ["psql"], psql_sslrequest),
    ("psql-gssenc", ["psql"], psql_gssenc),
    ("psql-cancel", ["psql"], psql_cancel),
    ("redis-cli-resp", ["redis-cli"], redis_cli_resp),
    ("redis-inline", ["nc"], redis_inline),
    ("pymongo-hello", [], pymongo_hello),
    ("ffmpeg-rtmp-publish", ["ffmpeg"], ffmpeg_rtmp),
]

VERSIONS = [
    ["curl", "--version"],
    ["openssl", "version"],
    ["psql", "--version"],
    ["redis-cli", "--version"],
    ["ffmpeg", "-version"],
    [sys.executable, "-c", "import pymongo; print('pymongo', pymongo.version)"],
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="fixtures to capture (default: all)")
    parser.add_argument("--out", default=OUT, help="where to write the .bin files")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    missing = []
    for name, tools, func in FIXTURES:
        if args.names and name not in args.names:
            continue
        absent = [t for t in tools if not shutil.which(t)]
        try:
            if absent:
                raise FileNotFoundError(", ".join(absent))
            data = func()
        except FileNotFoundError as e:
            print(f"skip {name}: {e} not installed")
            missing.append(name)
            continue
        write(args.out, name, data)
        if name == "curl-https-sni":
            write(args.out, "tls-hello-split-records", split_records(data))

    with open(os.path.join(args.out, "clients.txt"), "w") as f:
        f.write("# Clients that captured these fixtures (scripts/capture-sniff-fixtures.py)\n")
        for argv in VERSIONS:
            if shutil.which(argv[0]):
                out = subprocess.run(argv, capture_output=True, text=True)
                f.write((out.stdout or out.stderr).splitlines()[0] + "\n")
    if missing:
        print(f"not captured: {', '.join(missing)}")
        sys.exit(1)


def write(out, name, data):
    if not data:
        raise RuntimeError(f"{name}: the client sent nothing")
    path = os.path.join(out, f"{name}.bin")
    with open(path, "wb") as f:
        f.write(data)
    print(f"{name}.bin: {len(data)} bytes")


if __name__ == "__main__":
    main()
