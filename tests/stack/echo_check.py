"""Says a line to the echo module through the NLB and prints what came back.

    python3 tests/stack/echo_check.py PORT     # prints the echoed line

Also imported by compose_e2e.py.
"""

import socket
import sys


def echo_line(port, line=b"ping", timeout=10):
    """Sends `line` through 127.0.0.1:PORT; the line echoed after the greeting."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(line + b"\n")
        got = b""
        while got.count(b"\n") < 2:
            chunk = s.recv(1024)
            if not chunk:
                break
            got += chunk
    lines = got.decode(errors="replace").splitlines()
    return lines[-1] if lines else ""


if __name__ == "__main__":
    print(echo_line(int(sys.argv[1])))
