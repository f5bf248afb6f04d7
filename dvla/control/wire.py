"""Blocking, authenticated sockets for the weight plane.

The weight plane moves a few large transfers, so it runs on plain blocking sockets in
threads of their own: ``sendall``/``recv_into`` into a preallocated buffer is the fastest
way to move bulk bytes from Python (the GIL is released for each system call), and these
sockets never touch the data plane's event loop. Every connection starts with the same
mutual HMAC handshake as the data plane; control messages are length-prefixed msgpack.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from typing import Any

import msgpack

from dvla.control.buckets import WeightSyncError
from dvla.transport import auth

MAGIC = b"DVLW"
_HEADER = struct.Struct("<4sI")
PREAUTH_MAX = 4096
MESSAGE_MAX = 64 * 1024 * 1024
SOCKET_BUFFER = 4 * 1024 * 1024


def lower_priority() -> None:
    """Lower this thread's CPU priority, so data-plane threads win a contended core.

    Linux applies ``setpriority`` to single threads; elsewhere this does nothing.
    """
    try:
        tid = __import__("threading").get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))
    except (AttributeError, OSError):
        pass


def tune(sock: socket.socket) -> None:
    """Large buffers and no Nagle delay for bulk and control traffic."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def set_deadline(sock: socket.socket, deadline: float) -> None:
    """Make blocking calls on ``sock`` give up at the monotonic ``deadline``."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("weight-plane deadline passed")
    sock.settimeout(remaining)


def recv_exact(sock: socket.socket, view: memoryview, deadline: float) -> None:
    """Fill ``view`` from ``sock`` or raise (timeout, closed connection)."""
    pos, n = 0, len(view)
    while pos < n:
        set_deadline(sock, deadline)
        got = sock.recv_into(view[pos:], n - pos)
        if not got:
            raise ConnectionError("peer closed the connection")
        pos += got


def send_msg(sock: socket.socket, body: dict[str, Any], deadline: float) -> None:
    """Send one control message."""
    payload = msgpack.packb(body, use_bin_type=True)
    set_deadline(sock, deadline)
    sock.sendall(_HEADER.pack(MAGIC, len(payload)) + payload)


def recv_msg(sock: socket.socket, deadline: float, limit: int = MESSAGE_MAX) -> dict[str, Any]:
    """Receive one control message; a wrong magic, size or type is a protocol error."""
    head = bytearray(_HEADER.size)
    recv_exact(sock, memoryview(head), deadline)
    magic, size = _HEADER.unpack(head)
    if magic != MAGIC:
        raise WeightSyncError("weight plane: peer is not speaking the weight protocol")
    if size > limit:
        raise WeightSyncError(f"weight plane: message of {size} bytes exceeds {limit}")
    payload = bytearray(size)
    recv_exact(sock, memoryview(payload), deadline)
    try:
        body = msgpack.unpackb(bytes(payload), raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as err:
        raise WeightSyncError(f"weight plane: undecodable message ({err})") from None
    if not isinstance(body, dict) or not isinstance(body.get("op"), str):
        raise WeightSyncError("weight plane: message without an 'op'")
    return body


def handshake(
    sock: socket.socket, secret: auth.Secret, role: str, name: str, timeout: float
) -> str:
    """Mutual HMAC proof of the shared secret; returns the peer's name.

    The client proves first, so a stranger never obtains a proof from a server.
    """
    deadline = time.monotonic() + timeout
    mine = auth.new_nonce()
    peer_role = "server" if role == "client" else "client"
    hello = {"op": "hello", "role": role, "name": name, "nonce": mine}
    if role == "client":
        send_msg(sock, hello, deadline)
    theirs = recv_msg(sock, deadline, PREAUTH_MAX)
    nonce = theirs.get("nonce")
    if theirs.get("op") != "hello" or theirs.get("role") != peer_role:
        raise WeightSyncError(f"weight plane: expected a hello from a {peer_role}")
    if not isinstance(nonce, bytes) or len(nonce) != auth.NONCE_BYTES:
        raise WeightSyncError("weight plane: bad nonce in hello")
    if role == "server":
        send_msg(sock, hello, deadline)
    else:
        send_msg(sock, {"op": "auth", "proof": auth.proof(secret, role, mine, nonce)}, deadline)
    got = recv_msg(sock, deadline, PREAUTH_MAX)
    proof = got.get("proof")
    if got.get("op") != "auth" or not isinstance(proof, bytes):
        raise WeightSyncError("weight plane: expected an auth message")
    if not auth.verify(secret, peer_role, nonce, mine, proof):
        raise WeightSyncError(f"weight plane: {peer_role} failed authentication (wrong secret?)")
    if role == "server":
        send_msg(sock, {"op": "auth", "proof": auth.proof(secret, role, mine, nonce)}, deadline)
    peer = theirs.get("name")
    return str(peer)[:64] if isinstance(peer, str) else "?"


def connect(addr: str, secret: auth.Secret, name: str, timeout: float) -> socket.socket:
    """An authenticated client connection to ``host:port``."""
    host, _, port = addr.rpartition(":")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except (OSError, ValueError) as err:
        raise ConnectionError(f"cannot connect to weight-plane peer {addr}: {err}") from None
    try:
        tune(sock)
        handshake(sock, secret, "client", name, timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket; its address is ``host:port`` of :func:`address`."""
    sock = socket.create_server((host, port), backlog=128)
    return sock


def address(sock: socket.socket, advertise: str | None = None) -> str:
    """The ``host:port`` peers should dial to reach a listening socket."""
    host, port = sock.getsockname()[:2]
    if advertise:
        host = advertise
    elif host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    return f"{host}:{port}"
