"""Benchmark for LMArena Bridge: what the bridge adds to a model's answer.

    python bench.py                                  # the bridge alone
    python bench.py --compare "~/bench-venv/bin/python ../shared/bench/fastapi_relay.py --port {port}"

For each server it starts the process with a temporary config, a fake tab in a separate process
(one WebSocket message per LMArena line, the worst case), and an HTTP/1.1 load generator in this
process, then prints per-scenario figures. Every answer is checked for the exact text: a wrong
answer is a failure, not a fast run. CPU and memory are the server process's own (from /proc).

Scenarios
  start        time from process start to accepting connections (ms)
  idle         resident memory with one tab connected and no load (MiB), and per idle
               keep-alive connection (KiB, 500 of them)
  latency      one request at a time: time to the first answer token, p50 (ms)
  stream10     10 concurrent streaming requests of 50 tokens: requests/s, time to the first
               token p50/p99 (ms; "ttfb"; at saturation the fake tab process is the queue),
               server CPU per request (ms) and per streamed token (us)
  long         one answer of 5,000 and of 20,000 tokens end to end (ms): cost should grow linearly
  streams100   peak resident memory with 100 concurrent streams open (MiB)
Needs only what the bridge needs (websockets); the reference relay needs its own venv
(see ../shared/bench/README.md).
"""
import argparse
import asyncio
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SID = "0198c5a1-1111-7aaa-8bbb-123456789abc"
MID = "0198c5a1-2222-7aaa-8bbb-123456789abc"
TOKEN = "hello "


# -- the fake tab (runs in its own process: `python bench.py --tab URL`) ----------------------------

async def fake_tab(url: str, delay: float) -> None:
    import websockets
    async with websockets.connect(url, origin="https://lmarena.ai", max_size=None) as ws:
        async def answer(rid: str, tokens: int) -> None:
            line = f"a0:{json.dumps(TOKEN)}\n"
            for _ in range(tokens):
                await ws.send(json.dumps({"request_id": rid, "data": line}))
                if delay:
                    await asyncio.sleep(delay)
            await ws.send(json.dumps({"request_id": rid, "data": 'ad:{"finishReason":"stop"}\n'}))
            await ws.send(json.dumps({"request_id": rid, "data": "[DONE]"}))

        async for raw in ws:
            msg = json.loads(raw)
            if msg.get("payload") is None:
                continue
            # The prompt says how many tokens to answer with ("tokens:N").
            content = msg["payload"]["message_templates"][-1]["content"]
            tokens = int(content.split(":")[1]) if content.startswith("tokens:") else 50
            asyncio.get_running_loop().create_task(answer(msg["request_id"], tokens))


# -- the load generator -------------------------------------------------------------------------------

async def one_request(port: int, tokens: int, conn=None):
    """POST a streaming chat completion on a keep-alive connection; returns (ttfb, total, conn)."""
    body = json.dumps({"model": "bench-model", "stream": True,
                       "messages": [{"role": "user", "content": f"tokens:{tokens}"}]}).encode()
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer x\r\n"
           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    if conn is None:
        conn = await asyncio.open_connection("127.0.0.1", port, limit=2**24)
    reader, writer = conn
    t0 = time.perf_counter()
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"status: {head[:100]!r}")
    headers = head.lower()
    text = []
    ttfb = None           # time to the first answer token (not to the response head)
    if b"transfer-encoding: chunked" in headers:
        data = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            data += await reader.readexactly(size)
            await reader.readexactly(2)
            if ttfb is None and TOKEN.encode() in data:
                ttfb = time.perf_counter() - t0
    else:
        data = await reader.read()
        ttfb = time.perf_counter() - t0
        conn = None
    done = False
    for line in bytes(data).split(b"\n"):
        if not line.startswith(b"data: "):
            continue
        payload = line[6:]
        if payload == b"[DONE]":
            done = True
            continue
        obj = json.loads(payload)
        if "error" in obj:
            raise RuntimeError(f"error event: {obj}")
        for ch in obj.get("choices", []):
            c = ch.get("delta", {}).get("content")
            if c:
                text.append(c)
    if not done:
        raise RuntimeError("no [DONE]")
    if "".join(text) != TOKEN * tokens:
        raise RuntimeError(f"wrong text ({len(''.join(text))} chars, expected {len(TOKEN) * tokens})")
    return ttfb, time.perf_counter() - t0, conn


async def load(port: int, requests: int, concurrency: int, tokens: int):
    ttfbs, totals = [], []
    queue = list(range(requests))

    async def worker():
        conn = None
        while queue:
            queue.pop()
            ttfb, total, conn = await one_request(port, tokens, conn)
            ttfbs.append(ttfb)
            totals.append(total)
        if conn:
            conn[1].close()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"rps": requests / wall, "ttfb_p50_ms": pct(ttfbs, .5) * 1000, "ttfb_p99_ms": pct(ttfbs, .99) * 1000,
            "total_p50_ms": pct(totals, .5) * 1000}


async def idle_connections(server, n: int) -> float:
    """Memory per idle keep-alive connection (each has answered one request), in KiB."""
    before = mem_mib(server.proc.pid, "VmRSS")
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer x\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        conns.append(writer)
    await asyncio.sleep(0.3)
    after = mem_mib(server.proc.pid, "VmRSS")
    for w in conns:
        w.close()
    return (after - before) * 1024 / n


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# -- process measurements ------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mem_mib(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, command: str, tab_delay: float = 0.0):
        self.port = free_port()
        argv = [os.path.expanduser(a) for a in shlex.split(command.format(port=self.port))]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}: {command}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.05):
                    break
            except OSError:
                time.sleep(0.002)
        self.start_ms = (time.perf_counter() - t0) * 1000
        self.tab = subprocess.Popen([sys.executable, __file__, "--tab", f"ws://127.0.0.1:{self.port}/ws",
                                     "--tab-delay", str(tab_delay)], stderr=subprocess.DEVNULL)
        time.sleep(0.8)

    def close(self):
        for p in (self.tab, self.proc):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def bench_server(name: str, command: str, args) -> dict:
    out = {"name": name}
    s = Server(command)
    try:
        out["start_ms"] = s.start_ms
        asyncio.run(load(s.port, 20, 2, 50))                       # warm up
        time.sleep(0.3)
        out["idle_mib"] = mem_mib(s.proc.pid, "VmRSS")
        out["kib_per_idle_conn"] = asyncio.run(idle_connections(s, 500))
        r = asyncio.run(load(s.port, 300, 1, 50))                  # unloaded latency, one at a time
        out["ttfb_c1_p50_ms"] = r["ttfb_p50_ms"]
        cpu0 = cpu_seconds(s.proc.pid)
        r = asyncio.run(load(s.port, args.requests, 10, 50))
        cpu = cpu_seconds(s.proc.pid) - cpu0
        out.update({k: r[k] for k in ("rps", "ttfb_p50_ms", "ttfb_p99_ms")})
        out["cpu_ms_per_req"] = cpu * 1000 / args.requests
        out["cpu_us_per_token"] = cpu * 1e6 / (args.requests * 50)
        for tokens in (5000, 20000):
            times = []
            for _ in range(3):
                _, total, conn = asyncio.run(one_request(s.port, tokens))
                times.append(total * 1000)
            out[f"long_{tokens}_ms"] = statistics.median(times)
    finally:
        s.close()
    s = Server(command, tab_delay=0.01)       # slow tokens so 100 streams are open at once
    try:
        asyncio.run(load(s.port, 100, 100, 100))
        out["peak_mib_100_streams"] = mem_mib(s.proc.pid, "VmHWM")
    finally:
        s.close()
    return out


def bridge_command(folder: str) -> str:
    cfg = os.path.join(folder, "config.jsonc")
    with open(cfg, "w") as f:
        json.dump({"session_id": SID, "message_id": MID, "log_level": "warning",
                   "enable_auto_update": False}, f)
    return f"{shlex.quote(sys.executable)} {shlex.quote(os.path.join(HERE, 'bridge.py'))} --port {{port}} --config {shlex.quote(cfg)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare", help="another server command with {port}, run under the identical load")
    p.add_argument("--requests", type=int, default=1000, help="requests in the stream10 scenario")
    p.add_argument("--rounds", type=int, default=3, help="rounds (servers alternate; medians are printed)")
    p.add_argument("--tab", help=argparse.SUPPRESS)
    p.add_argument("--tab-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tab:
        asyncio.run(fake_tab(args.tab, args.tab_delay))
        return
    with tempfile.TemporaryDirectory() as folder:
        servers = [("bridge", bridge_command(folder))]
        if args.compare:
            servers.append(("reference", args.compare))
        results = {name: [] for name, _ in servers}
        for _ in range(args.rounds):
            for name, command in servers:
                r = bench_server(name, command, args)
                results[name].append(r)
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    keys = ["start_ms", "idle_mib", "kib_per_idle_conn", "ttfb_c1_p50_ms", "rps", "ttfb_p50_ms", "ttfb_p99_ms", "cpu_ms_per_req", "cpu_us_per_token",
            "long_5000_ms", "long_20000_ms", "peak_mib_100_streams"]
    med = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in results.items()}
    print(f"\nmedians over {args.rounds} rounds ({os.cpu_count()} CPUs, Python {sys.version.split()[0]})")
    print(f"{'figure':24}" + "".join(f"{name:>14}" for name in med) + ("   bridge/reference" if len(med) > 1 else ""))
    for k in keys:
        row = f"{k:24}" + "".join(f"{med[name][k]:14.2f}" for name in med)
        if len(med) > 1 and med["reference"][k]:
            row += f"   x{med['bridge'][k] / med['reference'][k]:.2f}"
        print(row)
    b = med["bridge"]
    print(f"linearity: 20,000 tokens take x{b['long_20000_ms'] / b['long_5000_ms']:.2f} the time of 5,000 (4.00 is linear)")


if __name__ == "__main__":
    main()
