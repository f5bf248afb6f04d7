"""Raw socket copies between processes: the yardstick for the weight plane on one host.

``raw_copy(nbytes, streams)`` times ``streams`` concurrent plain-TCP copies of ``nbytes``
each, from this process to as many receiver processes (``sendall`` from one buffer,
``recv_into`` one preallocated buffer, one byte back when complete). On a single host
every "link" shares the same cores, so a pipelined chain of k hops is measured against k
concurrent copies, which cost the same CPU work.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

CHUNK = 1 << 22


def _serve_one(conn: socket.socket, payload: memoryview, errors: list[BaseException]) -> None:
    try:
        conn.sendall(payload)
        if conn.recv(1) != b"\x01":
            raise ConnectionError("receiver did not confirm")
    except BaseException as err:
        errors.append(err)


def raw_copy(nbytes: int, streams: int, timeout: float = 120.0) -> float:
    """Seconds until ``streams`` receiver processes each hold ``nbytes`` (median of 1)."""
    payload = memoryview(bytearray(nbytes))
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "dvla.testing.rawcopy", str(port), str(nbytes)],
                stdout=subprocess.DEVNULL,
            )
            for _ in range(streams)
        ]
        conns: list[socket.socket] = []
        try:
            srv.settimeout(timeout)
            for _ in range(streams):
                conn, _ = srv.accept()
                conn.settimeout(timeout)
                conns.append(conn)
            for c in conns:  # every receiver is ready before the clock starts
                if c.recv(1) != b"\x00":
                    raise ConnectionError("receiver not ready")
            errors: list[BaseException] = []
            t0 = time.perf_counter()
            threads = [
                threading.Thread(target=_serve_one, args=(c, payload, errors)) for c in conns
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout)
            seconds = time.perf_counter() - t0
            if errors or any(t.is_alive() for t in threads):
                raise ConnectionError(f"raw copy failed: {errors[:1]}")
            return seconds
        finally:
            for c in conns:
                c.close()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def ping_latency(rounds: int = 200) -> float:
    """Median one-way latency (s) of a 1-byte ping-pong over loopback TCP, two threads."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        server, _ = srv.accept()
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(10)

        def echo() -> None:
            for _ in range(rounds):
                server.sendall(server.recv(1))

        t = threading.Thread(target=echo)
        t.start()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            client.sendall(b"x")
            client.recv(1)
            times.append((time.perf_counter() - t0) / 2)
        t.join(10)
        client.close()
        server.close()
    times.sort()
    return times[len(times) // 2]


def _receiver(port: int, nbytes: int) -> None:
    buf = memoryview(bytearray(nbytes))
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(120)
        s.sendall(b"\x00")
        pos = 0
        while pos < nbytes:
            got = s.recv_into(buf[pos:], min(CHUNK, nbytes - pos))
            if not got:
                raise ConnectionError("sender closed early")
            pos += got
        s.sendall(b"\x01")


if __name__ == "__main__":
    _receiver(int(sys.argv[1]), int(sys.argv[2]))
