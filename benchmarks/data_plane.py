"""Data-plane throughput: dvla connections against raw sockets moving the same bytes.

Two workloads, each over TCP loopback (``transport=tcp``) and over the same-host fast
path (``transport=auto``, which picks a Unix socket), each beside a raw-socket baseline
that runs in the same invocation between the same kind of socket:

* large: OBS_BATCH frames of 64 observations (uint8 images [64, 224, 224, 3], float32
  proprio [64, 8], 64 instruction strings), about 9.6 MB each, streamed one way; the
  receiver answers each with an ACTION_BATCH reply (actions float32 [64, 7], tokens
  int64 [64, 7], logprobs float32 [64, 7]) that the sender collects without waiting for
  it (``--no-replies`` drops them). Throughput counts the OBS_BATCH bytes. The baseline
  sends the same number of bytes per message (an 8-byte length prefix and a payload,
  ``sendall``), receives each into one preallocated buffer (``recv_into``), and answers
  with a reply of the same size as dvla's, which a thread of the sender reads.
  Target: dvla / raw >= 0.80.
* small: ACTION_BATCH frames for one environment (actions [1, 7] float32, tokens [1, 7]
  int64, logprobs [1, 7] float32, a version), streamed one way, once with a plain
  ``await conn.send(...)`` loop (pipelined: no reply is awaited per message) and once
  with ``conn.send_many`` in batches of ``--batch`` messages; the receiver takes what has
  arrived with ``conn.recv_many``. Every message is still its own frame on the wire. The
  baseline sends messages of the same encoded size (a 4-byte length prefix and a
  payload), batched ~64 KiB per ``sendall`` from one prebuilt buffer; its receiver reads
  256 KiB per ``recv_into`` and walks every message's length prefix in Python.
  Target: >= 100,000 dvla messages/s with batching.

Sender and receiver are separate processes (multiprocessing, ``spawn``). Every timed
phase ends with an end marker the receiver answers with one acknowledgement carrying
the number of messages it counted, so a phase's time runs from the first send to the
sender holding that acknowledgement (dvla's receiver also decodes each body into an
ObsBatch or ActionBatch, as a lane would). A short warm-up phase sizes the message count
so that one repeat lasts about ``--seconds / --repeats``; the raw baseline moves the same
count, or more where its own warm-up says that would take too short a time to time well.
Figures are medians over the repeats.

    python benchmarks/data_plane.py [--seconds S] [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import os
import queue
import secrets
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np

from dvla import logs
from dvla.config import DataPlaneConfig
from dvla.data import ActionBatch, ObsBatch
from dvla.transport import auth, codec, endpoints
from dvla.transport.frames import MsgType, encode_frame

SECRET_ENV = "DVLA_BENCH_SECRET"
GIB = 1024**3
BATCH, HEIGHT, WIDTH, PROPRIO, ACTION_DIM = 64, 224, 224, 8, 7
LARGE_TARGET_RATIO = 0.80
SMALL_TARGET_MSGS = 100_000
#: Warm-up messages per workload (they also size the timed phases).
WARMUP = {"large": 24, "small": 20_000}
#: Bounds on dvla's messages per timed repeat.
COUNT_RANGE = {"large": (48, 4000), "small": (5_000, 100_000)}
#: Bounds on the raw baseline's messages per timed repeat.
RAW_COUNT_RANGE = {"large": (48, 4000), "small": (5_000, 20_000_000)}
RAW_SMALL_BATCH = 64 * 1024
RAW_SMALL_RECV = 256 * 1024
TIMEOUT_S = 120.0
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


# ----------------------------------------------------------------- payloads
def make_obs() -> ObsBatch:
    rng = np.random.default_rng(0)
    return ObsBatch(
        images={"agentview": rng.integers(0, 256, (BATCH, HEIGHT, WIDTH, 3), dtype=np.uint8)},
        proprio=rng.standard_normal((BATCH, PROPRIO), dtype=np.float32),
        instructions=[
            f"put the red block {i} in the top drawer and close it" for i in range(BATCH)
        ],
    )


def make_actions(n: int) -> ActionBatch:
    rng = np.random.default_rng(1)
    return ActionBatch(
        actions=rng.uniform(-1, 1, (n, ACTION_DIM)).astype(np.float32),
        tokens=rng.integers(0, 256, (n, ACTION_DIM), dtype=np.int64),
        logprobs=-rng.random((n, ACTION_DIM), dtype=np.float32),
        version=12345,
    )


def message(kind: str) -> tuple[MsgType, Callable[[int], dict[str, Any]]]:
    """The message type of a workload and a function building request ``i``'s body."""
    if kind == "large":
        obs = make_obs()
        return MsgType.OBS_BATCH, lambda i: codec.obs_body(i, obs)
    act = make_actions(1)
    return MsgType.ACTION_BATCH, lambda i: codec.action_body(i, act)


def _encoded_size(mtype: MsgType, body: dict[str, Any]) -> int:
    return sum(memoryview(b).nbytes for b in encode_frame(mtype, body))


def frame_size(kind: str) -> int:
    """Encoded bytes of one message of ``kind`` (header, meta and padded blobs)."""
    mtype, body = message(kind)
    return _encoded_size(mtype, body(100_000))


def reply_size() -> int:
    """Encoded bytes of the ACTION_BATCH answering one OBS_BATCH."""
    return _encoded_size(MsgType.ACTION_BATCH, codec.action_body(100_000, make_actions(BATCH)))


def size_count(kind: str, rate: float, per_repeat_s: float, raw: bool = False) -> int:
    lo, hi = (RAW_COUNT_RANGE if raw else COUNT_RANGE)[kind]
    return int(min(max(rate * per_repeat_s, lo), hi))


def run_loop(coro: Coroutine[Any, Any, Any], loop: str) -> Any:
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _phase_figures(t0: float, t_sent: float, t1: float, c0: float) -> dict[str, float]:
    return {"wall_s": t1 - t0, "send_loop_s": t_sent - t0, "cpu_s": time.process_time() - c0}


# ----------------------------------------------------------------- dvla peers
async def _dvla_receiver(kind: str, transport: str, replies: bool, pipe: Any) -> None:
    cfg = DataPlaneConfig(transport=transport)
    secret = auth.Secret.resolve(None, SECRET_ENV)
    want = MsgType.OBS_BATCH if kind == "large" else MsgType.ACTION_BATCH
    decode = codec.obs_from_body if kind == "large" else codec.action_from_body
    answer = make_actions(BATCH)
    done = asyncio.Event()
    cpu_marks: list[float] = []

    async def handle(conn: Any) -> None:
        n = 0
        try:
            while True:
                # recv_many: every message already decoded, without an await apiece.
                msgs = await conn.recv_many(TIMEOUT_S)
                if msgs is None:
                    break
                for mtype, body in msgs:
                    if mtype == want:
                        req, _ = decode(body)
                        n += 1
                        if replies:
                            await conn.send(MsgType.ACTION_BATCH, codec.action_body(req, answer))
                    elif mtype == MsgType.ACK:  # the sender's end-of-phase marker
                        cpu_marks.append(time.process_time())
                        await conn.send(MsgType.ACK, {"producer": "receiver", "seq": n})
                        n = 0
        finally:
            done.set()

    listener = await endpoints.listen(cfg, secret, handle, name="bench-receiver")
    pipe.send(listener.address.url())
    await done.wait()
    await listener.close()
    pipe.send(cpu_marks)


async def _dvla_sender(
    kind: str, transport: str, url: str, plan: dict[str, Any], pipe: Any
) -> None:
    cfg = DataPlaneConfig(transport=transport)
    secret = auth.Secret.resolve(None, SECRET_ENV)
    mtype, body = message(kind)
    every = plan["batch"]
    conn = await endpoints.connect(url, cfg, secret, "bench-sender")
    wire = endpoints.transport_kind(conn)

    async def phase(n: int) -> dict[str, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        if every:
            for start in range(0, n, every):
                stop = min(start + every, n)
                await conn.send_many([(mtype, body(i)) for i in range(start, stop)])
        else:
            for i in range(n):
                await conn.send(mtype, body(i))
        t_sent = time.perf_counter()
        await conn.send(MsgType.ACK, {"producer": "sender", "seq": n})
        answers = 0
        while True:
            msg = await conn.recv(TIMEOUT_S)
            if msg is None:
                raise RuntimeError(f"connection closed: {conn.close_reason}")
            if msg[0] == MsgType.ACTION_BATCH:
                codec.action_from_body(msg[1])
                answers += 1
            elif msg[0] == MsgType.ACK:
                break
        t1 = time.perf_counter()
        if msg[1]["seq"] != n or answers != (n if plan["replies"] else 0):
            raise RuntimeError(f"receiver counted {msg[1]['seq']}, {answers} replies; sent {n}")
        return _phase_figures(t0, t_sent, t1, c0)

    try:
        warm = await phase(plan["warmup"])
        count = plan["count"] or size_count(
            kind, plan["warmup"] / warm["wall_s"], plan["per_repeat_s"]
        )
        reps = [await phase(count) for _ in range(plan["repeats"])]
    finally:
        await conn.close("benchmark done")
    pipe.send({"transport_kind": wire, "count": count, "warmup": warm, "repeats": reps})


def dvla_receiver(kind: str, transport: str, loop: str, replies: bool, pipe: Any) -> None:
    logs.configure("error")
    run_loop(_dvla_receiver(kind, transport, replies, pipe), loop)


def dvla_sender(
    kind: str, transport: str, loop: str, url: str, plan: dict[str, Any], pipe: Any
) -> None:
    logs.configure("error")
    run_loop(_dvla_sender(kind, transport, url, plan, pipe), loop)


# ----------------------------------------------------------------- raw peers
# Either direction is a stream of u64-length-prefixed messages; the receiver's answer to
# an end marker (length 0) is length 0 followed by the u64 count of messages it received.
def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            return False
        got += k
    return True


def _raw_serve_large(sock: socket.socket, reply: int, cpu_marks: list[float]) -> None:
    head = bytearray(8)
    hview = memoryview(head)
    buf = memoryview(bytearray(0))
    answer = _U64.pack(reply - 8) + bytes(reply - 8) if reply else b""
    n = 0
    while _recv_exact(sock, hview):
        (length,) = _U64.unpack(head)
        if length == 0:  # end of phase
            cpu_marks.append(time.process_time())
            sock.sendall(_U64.pack(0) + _U64.pack(n))
            n = 0
            continue
        if len(buf) < length:
            buf = memoryview(bytearray(length))  # allocated once, reused for every message
        if not _recv_exact(sock, buf[:length]):
            return
        n += 1
        if answer:
            sock.sendall(answer)


def _raw_serve_small(sock: socket.socket, cpu_marks: list[float]) -> None:
    buf = bytearray(RAW_SMALL_RECV)
    view = memoryview(buf)
    unpack = _U32.unpack_from
    have = n = 0
    while True:
        k = sock.recv_into(view[have:])
        if not k:
            return
        have += k
        pos = 0
        while have - pos >= 4:
            (length,) = unpack(buf, pos)
            if have - pos < 4 + length:
                break
            pos += 4 + length
            if length:
                n += 1
            else:  # end of phase
                cpu_marks.append(time.process_time())
                sock.sendall(_U64.pack(0) + _U64.pack(n))
                n = 0
        if pos:
            buf[: have - pos] = view[pos:have]
            have -= pos


def raw_receiver(kind: str, family: str, reply: int, pipe: Any) -> None:
    if family == "unix":
        path = os.path.join(tempfile.gettempdir(), f"dvla-bench-{os.getpid()}.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        addr: Any = path
    else:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.bind(("127.0.0.1", 0))
        addr = srv.getsockname()
    srv.listen(1)
    pipe.send(addr)
    sock, _ = srv.accept()
    if family == "tcp":
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio sets it
    cpu_marks: list[float] = []
    try:
        if kind == "large":
            _raw_serve_large(sock, reply, cpu_marks)
        else:
            _raw_serve_small(sock, cpu_marks)
    finally:
        sock.close()
        srv.close()
        if family == "unix":
            os.unlink(path)
    pipe.send(cpu_marks)


def _raw_answers(sock: socket.socket, acks: queue.Queue[tuple[int, int]]) -> None:
    """Read the receiver's replies and acknowledgements (a thread of the raw sender)."""
    head = memoryview(bytearray(8))
    buf = memoryview(bytearray(0))
    answers = 0
    while _recv_exact(sock, head):
        (length,) = _U64.unpack(head)
        if length == 0:
            if not _recv_exact(sock, head):
                break
            acks.put((_U64.unpack(head)[0], answers))
            answers = 0
            continue
        if len(buf) < length:
            buf = memoryview(bytearray(length))
        if not _recv_exact(sock, buf[:length]):
            break
        answers += 1


def raw_sender(kind: str, family: str, addr: Any, plan: dict[str, Any], pipe: Any) -> None:
    fam = socket.AF_UNIX if family == "unix" else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.connect(addr if family == "unix" else tuple(addr))
    if family == "tcp":
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    acks: queue.Queue[tuple[int, int]] = queue.Queue()
    threading.Thread(target=_raw_answers, args=(sock, acks), daemon=True).start()
    size = plan["frame_size"]
    if kind == "large":
        prefix = _U64.pack(size - 8)
        payload = memoryview(np.random.default_rng(2).integers(0, 256, size - 8, dtype=np.uint8))
        end = _U64.pack(0)

        def send(n: int) -> None:
            for _ in range(n):
                sock.sendall(prefix)
                sock.sendall(payload)

    else:
        one = _U32.pack(size - 4) + bytes(size - 4)
        per_batch = max(1, RAW_SMALL_BATCH // size)
        batch = one * per_batch
        end = _U32.pack(0)

        def send(n: int) -> None:
            full, rest = divmod(n, per_batch)
            for _ in range(full):
                sock.sendall(batch)
            if rest:
                sock.sendall(one * rest)

    def phase(n: int) -> dict[str, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        send(n)
        t_sent = time.perf_counter()
        sock.sendall(end)
        got, answers = acks.get(timeout=TIMEOUT_S)
        t1 = time.perf_counter()
        if got != n or answers != (n if plan["replies"] else 0):
            raise RuntimeError(f"receiver counted {got}, {answers} replies; sent {n}")
        return _phase_figures(t0, t_sent, t1, c0)

    warm = phase(plan["warmup"])
    own = size_count(kind, plan["warmup"] / warm["wall_s"], plan["per_repeat_s"], raw=True)
    count = max(plan["count"], own)
    reps = [phase(count) for _ in range(plan["repeats"])]
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    pipe.send({"transport_kind": family, "count": count, "warmup": warm, "repeats": reps})


# ----------------------------------------------------------------- orchestration
def measure(
    impl: str, kind: str, transport: str, plan: dict[str, Any], loop: str
) -> dict[str, Any]:
    """Run one sender/receiver pair of processes; return their figures."""
    ctx = mp.get_context("spawn")
    r_parent, r_child = ctx.Pipe()
    s_parent, s_child = ctx.Pipe()
    replies = plan["replies"]
    if impl == "dvla":
        args: tuple[Any, ...] = (kind, transport, loop, replies, r_child)
        recv_p = ctx.Process(target=dvla_receiver, args=args)
    else:
        reply = plan["reply_size"] if replies else 0
        recv_p = ctx.Process(target=raw_receiver, args=(kind, transport, reply, r_child))
    recv_p.start()
    send_p = None
    try:
        if not r_parent.poll(30):
            raise RuntimeError(f"{impl} receiver did not start")
        addr = r_parent.recv()
        if impl == "dvla":
            args = (kind, transport, loop, addr, plan, s_child)
            send_p = ctx.Process(target=dvla_sender, args=args)
        else:
            send_p = ctx.Process(target=raw_sender, args=(kind, transport, addr, plan, s_child))
        send_p.start()
        deadline = time.monotonic() + 120 + plan["per_repeat_s"] * plan["repeats"] * 20
        while not s_parent.poll(0.2):
            if not send_p.is_alive() and not s_parent.poll(0.5):
                raise RuntimeError(f"{impl} {kind} {transport}: the sender failed")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{impl} {kind} {transport}: no result in time")
        sent = s_parent.recv()
        cpu_marks = r_parent.recv() if r_parent.poll(30) else []
    finally:
        for p in (send_p, recv_p):
            if p is not None:
                p.join(30)
                if p.is_alive():
                    p.kill()
                    p.join()
    return summarise(sent, cpu_marks, plan["frame_size"])


def summarise(sent: dict[str, Any], cpu_marks: list[float], size: int) -> dict[str, Any]:
    count, reps = sent["count"], sent["repeats"]
    walls = [r["wall_s"] for r in reps]
    # Receiver CPU between consecutive end markers: one timed repeat each.
    recv_cpu = [b - a for a, b in itertools.pairwise(cpu_marks)]
    wall = statistics.median(walls)
    rate = count / wall
    return {
        "transport_kind": sent["transport_kind"],
        "messages_per_repeat": count,
        "bytes_per_message": size,
        "repeats": len(reps),
        "wall_s": walls,
        "msgs_per_s": rate,
        "gib_per_s": rate * size / GIB,
        "best_msgs_per_s": count / min(walls),
        "send_loop_share": statistics.median(r["send_loop_s"] / r["wall_s"] for r in reps),
        "sender_cpu_share": statistics.median(r["cpu_s"] / r["wall_s"] for r in reps),
        "receiver_cpu_share": (
            statistics.median(c / w for c, w in zip(recv_cpu, walls, strict=False))
            if recv_cpu
            else None
        ),
        "sender_cpu_us_per_msg": statistics.median(r["cpu_s"] for r in reps) / count * 1e6,
        "receiver_cpu_us_per_msg": (
            statistics.median(recv_cpu) / count * 1e6 if recv_cpu else None
        ),
    }


def run_all(args: argparse.Namespace, seconds: float, repeats: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    kinds = [args.only] if args.only else ["large", "small"]
    for kind in kinds:
        base_plan = {
            "frame_size": frame_size(kind),
            "reply_size": reply_size(),
            "replies": kind == "large" and not args.no_replies,
            "warmup": WARMUP[kind] // (2 if args.quick else 1),
            "count": 0,
            "repeats": repeats,
            "per_repeat_s": seconds / repeats,
            "batch": 0,
        }
        variants = [0] if kind == "large" or not args.batch else [0, args.batch]
        for transport in ("tcp", "auto"):
            raw: dict[str, Any] | None = None
            for every in variants:
                plan = {**base_plan, "batch": every}
                dv = measure("dvla", kind, transport, plan, args.loop)
                if raw is None:
                    raw_plan = {**plan, "count": dv["messages_per_repeat"]}
                    raw = measure(
                        "raw", kind, "tcp" if transport == "tcp" else "unix", raw_plan, ""
                    )
                ratio = dv["msgs_per_s"] / raw["msgs_per_s"]
                entry: dict[str, Any] = {
                    "workload": kind,
                    "transport": transport,
                    "batch": every,
                    "replies": plan["replies"],
                    "dvla": dv,
                    "raw": raw,
                    "ratio": ratio,
                }
                if kind == "large":
                    entry["target"] = {"ratio": LARGE_TARGET_RATIO}
                    entry["pass"] = ratio >= LARGE_TARGET_RATIO
                elif every:
                    entry["target"] = {"msgs_per_s": SMALL_TARGET_MSGS}
                    entry["pass"] = dv["msgs_per_s"] >= SMALL_TARGET_MSGS
                else:  # one await per message: reported, not held to the batching target
                    entry["target"] = None
                    entry["pass"] = None
                key = f"{kind}_{transport}" + (f"_batch{every}" if every else "")
                results[key] = entry
    return results


def _us(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def report(results: dict[str, Any], out: dict[str, Any]) -> None:
    w = sys.stdout.write
    p = out["parameters"]
    w(f"loop: {p['loop']}  cpus: {p['cpus']}  ")
    w(f"seconds/measurement: {p['seconds_per_measurement']:g}")
    w(f"  repeats: {p['repeats']}  total: {p['total_s']:.1f} s")
    w("  load avg start/end: {:.2f}/{:.2f}\n".format(*p["loadavg_1min_start_end"]))
    if p["large_frame_bytes"]:
        w(f"large: OBS_BATCH {BATCH}x{HEIGHT}x{WIDTH}x3 uint8 + proprio + instructions, ")
        w(f"{p['large_frame_bytes']:,} B/frame; ")
        w(f"ACTION_BATCH reply {p['reply_bytes']:,} B\n" if p["replies"] else "no replies\n")
    if p["small_frame_bytes"]:
        w(f"small: ACTION_BATCH for 1 env, {p['small_frame_bytes']:,} B/frame\n")
    w(
        f"{'workload':<8} {'transport':<10} {'sender':<9} {'msgs':>8} {'dvla msg/s':>11} "
        f"{'dvla GiB/s':>10} {'raw msg/s':>11} {'raw GiB/s':>9} {'ratio':>6} {'cpu us s/r':>12}"
        "  target\n"
    )
    for e in results.values():
        dv, raw = e["dvla"], e["raw"]
        wire = f"auto>{dv['transport_kind']}" if e["transport"] == "auto" else dv["transport_kind"]
        loop = f"send_many/{e['batch']}" if e["batch"] else "send loop"
        rcpu = dv["receiver_cpu_us_per_msg"]
        cpu = f"{_us(dv['sender_cpu_us_per_msg'])}/{_us(rcpu)}" if rcpu is not None else "?"
        if e["workload"] == "large":
            target = f"ratio>={LARGE_TARGET_RATIO:.2f}"
        elif e["batch"]:
            target = f"dvla>={SMALL_TARGET_MSGS:,}/s"
        else:
            target = "(info)"
        verdict = {True: "PASS", False: "FAIL", None: ""}[e["pass"]]
        w(
            f"{e['workload']:<8} {wire:<10} {loop:<9} {dv['messages_per_repeat']:>8} "
            f"{dv['msgs_per_s']:>11,.0f} {dv['gib_per_s']:>10.3f} {raw['msgs_per_s']:>11,.0f} "
            f"{raw['gib_per_s']:>9.3f} {e['ratio']:>6.2f} {cpu:>12}  "
            f"{target} {verdict}\n"
        )
    w("msgs: messages per timed repeat (dvla); raw moves at least as many.\n")
    w("cpu us s/r: dvla sender / receiver process CPU microseconds per message (median).\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=None, help="Timed seconds per measurement (default 4)."
    )
    parser.add_argument("--repeats", type=int, default=None, help="Timed repeats (default 3).")
    parser.add_argument("--quick", action="store_true", help="A short run (about 10 s).")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--only", choices=("large", "small"), help="Run one workload only.")
    parser.add_argument(
        "--no-replies", action="store_true", help="Large frames: no ACTION_BATCH replies."
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=256,
        metavar="N",
        help="Small messages: also measure send_many in batches of N (0: skip); the "
        "100,000 msgs/s target applies to this batched sender.",
    )
    parser.add_argument("--json", metavar="FILE", help="Write the figures as JSON.")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (0.4 if args.quick else 4.0)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    os.environ[SECRET_ENV] = secrets.token_hex(32)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    results = run_all(args, seconds, repeats)
    kinds = {e["workload"] for e in results.values()}
    out = {
        "parameters": {
            "loop": args.loop,
            "cpus": os.cpu_count(),
            "seconds_per_measurement": seconds,
            "repeats": repeats,
            "quick": args.quick,
            "obs_batch": BATCH,
            "image_shape": [HEIGHT, WIDTH, 3],
            "proprio_dim": PROPRIO,
            "action_dim": ACTION_DIM,
            "replies": "large" in kinds and not args.no_replies,
            "large_frame_bytes": frame_size("large") if "large" in kinds else None,
            "reply_bytes": reply_size(),
            "small_frame_bytes": frame_size("small") if "small" in kinds else None,
            "send_many_batch": args.batch,
            "raw_small_batch_bytes": RAW_SMALL_BATCH,
            "raw_small_recv_bytes": RAW_SMALL_RECV,
            "total_s": time.perf_counter() - started,
            "loadavg_1min_start_end": [load_start, os.getloadavg()[0]],
        },
        "targets": {"large_ratio": LARGE_TARGET_RATIO, "small_msgs_per_s": SMALL_TARGET_MSGS},
        "results": results,
        "all_pass": all(e["pass"] for e in results.values() if e["pass"] is not None),
    }
    report(results, out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
