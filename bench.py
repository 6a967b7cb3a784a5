"""Benchmark for LMArena Bridge: what the bridge adds to a model's answer.

    python bench.py                                  # the bridge alone, every scenario below
    python bench.py --compare "~/bench-venv/bin/python ../shared/bench/fastapi_relay.py --port {port}"
    python bench.py --equal-load --compare "..."     # both servers at the same offered loads
    python bench.py --preminting                     # reCAPTCHA tokens minted ahead, in Chromium
    python bench.py --prompt-size                    # real agents' requests -> the prompt LMArena gets

Each server runs with a temporary config and its own fake tab (a separate process, one WebSocket
message per LMArena line: the worst case); the HTTP load comes from this process. Every answer is
checked for its exact text: a wrong answer is a failure, not a fast run. CPU and memory are the
server process's own, read from /proc (CPU with nanosecond precision from schedstat).

Default run: every scenario, servers alternating, --rounds times; medians are printed.
  start        time from process start to accepting connections (ms)
  idle         resident memory with one tab connected and no load (MiB), and per idle
               keep-alive connection (KiB, 500 of them)
  latency      one request at a time: time to the first answer token, p50 (ms)
  stream10     10 concurrent streaming requests of 50 tokens (closed loop, --requests of them):
               requests/s, time to the first token p50/p99 (ms; "ttfb"; at saturation the fake
               tab process is the queue), server CPU per request (ms) and per streamed token (us)
  long         one answer of 5,000 and of 20,000 tokens end to end (ms): cost should grow linearly
  streams100   peak resident memory with 100 concurrent streams open (MiB)

--equal-load: the same offered load for every server (open loop). At each level, requests start
on a fixed schedule of R per second whatever the answers do; each is a streaming chat completion
of --tokens tokens on a free keep-alive connection (or a new one: the connect counts). First-token
time (the first content delta) and total time count from the request's scheduled start (from its
actual start when the client's timer fired up to 1 ms early), so a server that falls behind shows
it as latency, not as fewer requests. Levels: --levels "50,100,200", or by default 10%, 25%, 50%,
75%, 100% and 125% of a quick saturation probe (10 concurrent streams, closed loop) of the
reference (the --compare server; the bridge without one). Each server gets --duration seconds per
level and round, in --slices slices alternating with the other server's, so a busy moment of a
shared machine hits both alike; percentiles are medians over the rounds. A level is "sustained"
when the achieved rate is >= 95% of the offered one with no errors (no failed, wrong, timed-out or
dropped request: at most --max-in-flight at once).
Printed per level: achieved requests/s, errors, first-token and total p50/p99 (ms), server CPU per
token (us), the CPU of the fake tab and of this client (% of one core), the client's own lag
behind its schedule (p99, ms: it counts in the server's latency; a large one means the machine
was busy), and the bridge's own stage timings from its /health; then the goals: bridge first-token
p50 and p99 at most the reference's at every load the reference sustains, and bridge CPU per token
at most a third of the reference's (at the highest level the reference sustains).
--tab-delay S makes the fake tab wait S seconds between its messages (default 0: bursts).
--busy-client makes the client poll instead of sleeping: it costs a core, and takes the client's
own wake-up latency (large on an idle VM) out of the first-token figures.
The equal-load report ends with the --preminting figure.

--preminting: what a reCAPTCHA token minted ahead (keep_token_ready, config token_ready_seconds)
saves a request, in a real browser: the real userscript in headless Chromium on the browser tests'
stand-in of LMArena (testsupport.py), whose reCAPTCHA execute() takes 1.5 s, and the real bridge
with token_ready_seconds 0 (the tab mints a token per request), then 600 (one is kept ready).
--preminting-requests sequential streaming requests each (default 5, 2 s apart: time to mint the
next one ahead). Printed: POST -> the stand-in receiving the LMArena request (median, max) and POST ->
first token (median). Needs Chromium and Playwright (requirements-dev.txt); skipped, with one line
saying why, where they are missing (--preminting alone then exits 1).

--prompt-size: the recorded first and tool-result requests of Claude Code and Codex (fixtures/), each
translated as the bridge does and folded into the one turn create mode sends: request JSON bytes,
prompt bytes and their ratio (also printed at the end of the default run).

--bridge CMD runs another bridge command ({port}, {config}: a temporary config), e.g. a patched
copy; --compare may use {config} too (two bridges side by side).

The client is cheap on purpose (raw asyncio protocols, chunked SSE parsed by hand, answers checked
after the timed part); the fake tab frames its WebSocket messages itself (masked with a zero key,
which servers cannot tell from any other), so both cost the servers' shared CPUs as little as can be.
Needs only what the bridge needs (websockets), --preminting the test dependencies; the reference
relay needs its own venv (see ../shared/bench/README.md).
"""
import argparse
import asyncio
import base64
import collections
import contextlib
import http.client
import json
import math
import os
import re
import select
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "hello "
TOKEN_BYTES = TOKEN.encode()


# -- the fake tab (runs in its own process: `python bench.py --tab URL`) ----------------------------

def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One final client frame. Clients must mask; a zero key leaves the payload as it is."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def prompt_of(payload: dict) -> str:
    """The prompt of a task: the create-evaluation request's user message, else the last template."""
    try:
        return payload["request"]["body"]["userMessage"]["content"]
    except (KeyError, TypeError):
        return payload["message_templates"][-1]["content"]


class FakeTab(asyncio.Protocol):
    """A userscript tab: answers every task with N text lines ("tokens:N" in the prompt, else 50),
    a finish line and [DONE], one WebSocket message each; ignores commands; answers pings."""

    def __init__(self, host: str, path: str, delay: float):
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                        "Sec-WebSocket-Version: 13\r\nOrigin: https://lmarena.ai\r\n\r\n").encode()
        self.delay = delay
        self.buf = bytearray()
        self.open = False
        self.fragments: list[bytes] = []
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if b" 101 " not in buf[:end].split(b"\r\n", 1)[0]:
                raise SystemExit(f"tab refused: {bytes(buf[:200])!r}")
            del buf[:end + 4]
            self.open = True
            print("connected", flush=True)         # the Server waits for this line
        while len(buf) >= 2:                       # server frames are not masked
            opcode, n, pos = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if n == 126:
                n, pos = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                n, pos = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < pos + n or pos > len(buf):
                return
            fin, payload = buf[0] & 0x80, bytes(buf[pos:pos + n])
            del buf[:pos + n]
            if opcode == 9:
                self.transport.write(ws_frame(payload, 10))
            elif opcode == 8:
                self.transport.write(ws_frame(payload[:2], 8))
                self.transport.close()
                return
            elif opcode in (0, 1, 2):
                self.fragments.append(payload)
                if fin:
                    message, self.fragments = b"".join(self.fragments), []
                    self.on_message(message)

    def on_message(self, raw: bytes) -> None:
        msg = json.loads(raw)
        if msg.get("payload") is None:             # a command (keep_token_ready, abort, ...)
            return
        prompt = prompt_of(msg["payload"])
        tokens = int(prompt.split(":")[1]) if prompt.startswith("tokens:") else 50
        rid = msg["request_id"]
        frames = [ws_frame(json.dumps({"request_id": rid, "data": f"a0:{json.dumps(TOKEN)}\n"}).encode())] * tokens
        frames.append(ws_frame(json.dumps({"request_id": rid, "data": 'ad:{"finishReason":"stop"}\n'}).encode()))
        frames.append(ws_frame(json.dumps({"request_id": rid, "data": "[DONE]"}).encode()))
        if not self.delay:
            for frame in frames:                   # one write each: separate messages on the wire
                self.transport.write(frame)
            return
        loop, it = asyncio.get_running_loop(), iter(frames)

        def step():
            frame = next(it, None)
            if frame is not None and not self.transport.is_closing():
                self.transport.write(frame)
                loop.call_later(self.delay, step)
        step()


async def fake_tab(url: str, delay: float) -> None:
    host, _, path = url.removeprefix("ws://").partition("/")
    name, _, port = host.rpartition(":")
    loop = asyncio.get_running_loop()
    _, tab = await loop.create_connection(lambda: FakeTab(host, "/" + path, delay), name, int(port))
    await tab.closed


# -- the HTTP client ------------------------------------------------------------------------------------

Response = collections.namedtuple("Response", "status first end body chunked keep")


class HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection, one request at a time. The times (perf_counter)
    of the first answer token and of the response's end are taken as bytes arrive; the raw body
    is kept and checked later (check_answer), off the timed path."""

    def __init__(self):
        self.transport = None
        self.closed = False
        self.fut: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def request(self, data: bytes) -> asyncio.Future:
        self.buf, self.head, self.first, self.scan = bytearray(), None, None, 0
        self.fut = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.fut

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.buf
        buf += data
        if self.head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = bytes(buf[:end]).lower()
            self.start = self.scan = end + 4
            self.chunked = b"transfer-encoding: chunked" in self.head
            m = re.search(rb"content-length: *(\d+)", self.head)
            self.length = int(m[1]) if m else None
        if self.first is None:
            if buf.find(TOKEN_BYTES, max(self.start, self.scan - len(TOKEN_BYTES))) >= 0:
                self.first = now
            else:
                self.scan = len(buf)
        if self.chunked:
            done = buf.endswith(b"0\r\n\r\n") and (len(buf) == self.start + 5 or buf.endswith(b"\r\n0\r\n\r\n"))
        elif self.length is not None:
            done = len(buf) - self.start >= self.length
        else:
            return                                 # ends when the server closes
        if done:
            self.finish(now)

    def finish(self, now: float) -> None:
        fut, self.fut = self.fut, None
        if fut is not None and not fut.done():
            fut.set_result(Response(int(self.head[9:12]), self.first, now, bytes(self.buf[self.start:]),
                                    self.chunked, b"connection: close" not in self.head))

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.fut is not None and not self.fut.done():
            if self.head is not None and not self.chunked and self.length is None:
                self.finish(time.perf_counter())
            else:
                self.fut.set_exception(ConnectionError("connection closed before the response ended"))

    def close(self) -> None:
        self.closed = True
        self.transport.close()


async def connect(port: int) -> HttpConn:
    _, conn = await asyncio.get_running_loop().create_connection(HttpConn, "127.0.0.1", port)
    return conn


def chat_request(tokens: int) -> bytes:
    body = json.dumps({"model": "bench-model", "stream": True,
                       "messages": [{"role": "user", "content": f"tokens:{tokens}"}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))


def check_answer(resp: Response, tokens: int) -> None:
    """Raises unless the response is a complete stream of exactly the expected text."""
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.body[:200]!r}")
    data, body = resp.body, resp.body
    if resp.chunked:
        parts, i = [], 0
        while True:
            j = body.index(b"\r\n", i)
            size = int(body[i:j].split(b";")[0], 16)
            if size == 0:
                break
            parts.append(body[j + 2:j + 2 + size])
            i = j + 4 + size
        data = b"".join(parts)
    text, done = [], False
    for line in data.split(b"\n"):
        if not line.startswith(b"data: "):
            continue
        if line[6:] == b"[DONE]":
            done = True
            continue
        obj = json.loads(line[6:])
        if "error" in obj:
            raise RuntimeError(f"error event: {obj}")
        for ch in obj.get("choices", []):
            if c := ch.get("delta", {}).get("content"):
                text.append(c)
    if not done:
        raise RuntimeError("no [DONE]")
    if "".join(text) != TOKEN * tokens:
        raise RuntimeError(f"wrong text ({len(''.join(text))} chars, expected {len(TOKEN) * tokens})")
    if resp.first is None:
        raise RuntimeError("no answer token seen")


async def one_request(port: int, tokens: int, conn: HttpConn | None = None):
    """One streaming chat completion; returns (time to first token, total time, connection)."""
    if conn is None or conn.closed:
        conn = await connect(port)
    t0 = time.perf_counter()
    resp = await conn.request(chat_request(tokens))
    check_answer(resp, tokens)
    if not resp.keep:
        conn.close()
    return resp.first - t0, resp.end - t0, conn


async def load(port: int, requests: int, concurrency: int, tokens: int) -> dict:
    """Closed loop: `concurrency` connections, each sending its next request when the last ends."""
    ttfbs, totals = [], []
    left = [requests]

    async def worker():
        conn = None
        while left[0] > 0:
            left[0] -= 1
            ttfb, total, conn = await one_request(port, tokens, conn)
            ttfbs.append(ttfb)
            totals.append(total)
        if conn:
            conn.close()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"rps": requests / wall, "ttfb_p50_ms": pct(ttfbs, .5) * 1000, "ttfb_p99_ms": pct(ttfbs, .99) * 1000,
            "total_p50_ms": pct(totals, .5) * 1000}


async def open_loop(server: "Server", rps: float, seconds: float, tokens: int, max_in_flight: int,
                    busy: bool = False) -> dict:
    """Open loop: request i starts at t0 + i/rps whatever the answers do. Returns the samples,
    errors, and the CPU each process used while the requests ran.

    A sample counts from the earlier of the request's scheduled and actual start: the client wakes
    up to 1 ms early (asyncio's timers round up to whole milliseconds) and then counts from the
    actual start; when it is late (its own queue), the delay counts. A request waits for no other:
    it takes an idle keep-alive connection or opens one (the connect counts). Requests are
    callbacks, not tasks (cheap). `busy`: the client polls instead of sleeping between events (it
    costs a core, and takes this client's wake-up latency out of the figures)."""
    loop = asyncio.get_running_loop()
    data = chat_request(tokens)
    idle = [await connect(server.port) for _ in range(min(max_in_flight, 8 + int(rps / 20)))]
    done: list = []                  # (origin, lag, Response)
    errors: list[str] = []
    in_flight: set = set()           # connections waiting for their response
    connecting: set = set()          # tasks opening a connection for a request
    settled = asyncio.Event()
    over = False                     # all requests are scheduled

    def start(conn: HttpConn, origin: float, lag: float) -> None:
        in_flight.add(conn)
        conn.request(data).add_done_callback(lambda fut: finished(conn, origin, lag, fut))

    def finished(conn: HttpConn, origin: float, lag: float, fut: asyncio.Future) -> None:
        if conn not in in_flight:                  # given up on at the deadline
            return
        in_flight.discard(conn)
        if fut.exception() is not None:
            errors.append(repr(fut.exception()))
            conn.close()
        else:
            done.append((origin, lag, fut.result()))
            if fut.result().keep and not conn.closed:
                idle.append(conn)
            else:
                conn.close()
        if over and not in_flight and not connecting:
            settled.set()

    async def connect_then_start(origin: float, lag: float) -> None:
        try:
            conn = await connect(server.port)
        except OSError as e:
            errors.append(repr(e))
        else:
            start(conn, origin, lag)
        finally:
            connecting.discard(asyncio.current_task())
            if over and not in_flight and not connecting:
                settled.set()

    async def poll() -> None:
        while not settled.is_set():
            await asyncio.sleep(0)

    dropped = 0
    poller = loop.create_task(poll()) if busy else None
    n = max(1, round(rps * seconds))
    cpu0 = (cpu_seconds(server.proc.pid), cpu_seconds(server.tab.pid), time.process_time())
    sleeps0 = sleeps(server.proc.pid)
    t0 = time.perf_counter() + 0.01
    for i in range(n):
        at = t0 + i / rps
        now = time.perf_counter()
        if at - now > 0.001:
            await asyncio.sleep(at - now - 0.001)
            now = time.perf_counter()
        while busy and now < at:                   # polling anyway: start on time
            await asyncio.sleep(0)
            now = time.perf_counter()
        if len(in_flight) + len(connecting) >= max_in_flight:
            dropped += 1
            continue
        origin, lag = min(at, now), now - at
        while idle and idle[-1].closed:
            idle.pop()
        if idle:
            start(idle.pop(), origin, lag)
        else:
            task = loop.create_task(connect_then_start(origin, lag))
            connecting.add(task)
    over = True
    if in_flight or connecting:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(settled.wait(), max(10.0, seconds * 2))
    wall = time.perf_counter() - t0
    cpu1 = (cpu_seconds(server.proc.pid), cpu_seconds(server.tab.pid), time.process_time())
    server_sleeps = sleeps(server.proc.pid) - sleeps0
    settled.set()
    if poller is not None:
        await poller
    errors.extend(["timed out"] * (len(in_flight) + len(connecting)))
    errors.extend(["dropped: too many in flight"] * dropped)
    for task in list(connecting):
        task.cancel()
    for conn in list(in_flight) + idle:
        conn.close()
    in_flight.clear()
    ttfb, total, lag, ends = [], [], [], []
    for origin, late, resp in done:               # checked after the timed part
        try:
            check_answer(resp, tokens)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
            continue
        ttfb.append(resp.first - origin)
        total.append(resp.end - origin)
        lag.append(late)
        ends.append(resp.end)
    # Achieved rate: completions over the time between the first and the last (answer length adds
    # no delay to it; a server that falls behind completes at its own pace).
    span = max(ends) - min(ends) if len(ends) > 1 else 0.0
    return {"offered": rps, "achieved": (len(ends) - 1) / span if span else 0.0, "span": span,
            "ok": len(ends), "errors": len(errors),
            "first_error": errors[0] if errors else None, "ttfb": ttfb, "total": total, "lag": lag,
            "server_cpu": cpu1[0] - cpu0[0], "tab_cpu": cpu1[1] - cpu0[1], "client_cpu": cpu1[2] - cpu0[2],
            "server_sleeps": server_sleeps,
            "wall": wall, "tokens": tokens}


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
    if not xs:
        return math.nan
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# -- process measurements ------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """CPU time of a process's threads: from schedstat (ns), else utime+stime (clock ticks)."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:             # a thread that just ended
                pass
        return total / 1e9
    except OSError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sleeps(pid: int) -> int:
    """Times a process's threads went to sleep waiting (voluntary context switches): a server that
    sleeps between the steps of a request pays a wake-up for each (CPU time, and latency)."""
    total = 0
    with contextlib.suppress(FileNotFoundError):        # a server that died: its errors tell
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    total += int(next(l for l in f if l.startswith("voluntary_ctxt_switches")).split()[1])
            except (FileNotFoundError, StopIteration):
                pass
    return total


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
    """A server process (command with {port}) and its fake tab process (none with fake_tab=False)."""

    def __init__(self, command: str, tab_delay: float = 0.0, fake_tab: bool = True):
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
        self.tab = None
        if not fake_tab:                      # a real tab connects (--preminting)
            return
        self.tab = subprocess.Popen([sys.executable, __file__, "--tab", f"ws://127.0.0.1:{self.port}/ws",
                                     "--tab-delay", str(tab_delay)], stdout=subprocess.PIPE)
        ready, _, _ = select.select([self.tab.stdout], [], [], 30)
        if not ready or self.tab.stdout.readline() != b"connected\n":
            self.close()
            raise SystemExit(f"the fake tab could not connect to {command}")
        time.sleep(0.2)                       # the server registers the tab after the handshake

    def close(self):
        for p in filter(None, (self.tab, self.proc)):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


# -- the default run: one function per scenario ---------------------------------------------------------

def scenario_idle(s: Server, out: dict) -> None:
    time.sleep(0.3)
    out["idle_mib"] = mem_mib(s.proc.pid, "VmRSS")
    out["kib_per_idle_conn"] = asyncio.run(idle_connections(s, 500))


def scenario_latency(s: Server, out: dict) -> None:
    out["ttfb_c1_p50_ms"] = asyncio.run(load(s.port, 300, 1, 50))["ttfb_p50_ms"]


def scenario_stream10(s: Server, out: dict, requests: int) -> None:
    cpu0 = cpu_seconds(s.proc.pid)
    r = asyncio.run(load(s.port, requests, 10, 50))
    cpu = cpu_seconds(s.proc.pid) - cpu0
    out.update({k: r[k] for k in ("rps", "ttfb_p50_ms", "ttfb_p99_ms")})
    out["cpu_ms_per_req"] = cpu * 1000 / requests
    out["cpu_us_per_token"] = cpu * 1e6 / (requests * 50)


def scenario_long(s: Server, out: dict) -> None:
    async def one(tokens):
        _, total, conn = await one_request(s.port, tokens)
        conn.close()
        return total * 1000
    for tokens in (5000, 20000):
        out[f"long_{tokens}_ms"] = statistics.median(asyncio.run(one(tokens)) for _ in range(3))


def scenario_streams100(command: str, out: dict) -> None:
    s = Server(command, tab_delay=0.01)       # slow tokens so 100 streams are open at once
    try:
        asyncio.run(load(s.port, 100, 100, 100))
        out["peak_mib_100_streams"] = mem_mib(s.proc.pid, "VmHWM")
    finally:
        s.close()


def bench_server(name: str, command: str, args) -> dict:
    out = {"name": name}
    s = Server(command)
    try:
        out["start_ms"] = s.start_ms
        asyncio.run(load(s.port, 20, 2, 50))                       # warm up
        scenario_idle(s, out)
        scenario_latency(s, out)
        scenario_stream10(s, out, args.requests)
        scenario_long(s, out)
    finally:
        s.close()
    scenario_streams100(command, out)
    return out


DEFAULT_KEYS = ["start_ms", "idle_mib", "kib_per_idle_conn", "ttfb_c1_p50_ms", "rps", "ttfb_p50_ms", "ttfb_p99_ms",
                "cpu_ms_per_req", "cpu_us_per_token", "long_5000_ms", "long_20000_ms", "peak_mib_100_streams"]


def default_run(servers: list, args) -> None:
    results = {name: [] for name, _ in servers}
    for _ in range(args.rounds):
        for name, command in servers:
            r = bench_server(name, command, args)
            results[name].append(r)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in DEFAULT_KEYS} for name, rs in results.items()}
    print(f"\nmedians over {args.rounds} rounds ({machine()})")
    print(f"{'figure':24}" + "".join(f"{name:>14}" for name in med) + ("   bridge/reference" if len(med) > 1 else ""))
    for k in DEFAULT_KEYS:
        row = f"{k:24}" + "".join(f"{med[name][k]:14.2f}" for name in med)
        if len(med) > 1 and med["reference"][k]:
            row += f"   x{med['bridge'][k] / med['reference'][k]:.2f}"
        print(row)
    b = med["bridge"]
    print(f"linearity: 20,000 tokens take x{b['long_20000_ms'] / b['long_5000_ms']:.2f} the time of 5,000 (4.00 is linear)")


# -- the equal-load comparison ----------------------------------------------------------------------------

def nice(x: float) -> int:
    """Two significant digits: 187.3 -> 190."""
    if x < 10:
        return max(1, round(x))
    step = 10 ** (len(str(int(x))) - 2)
    return int(round(x / step) * step)


def equal_load(servers: list, args) -> None:
    """The --equal-load scenario: every level, every round, both servers (fresh each round)."""
    levels = [float(x) for x in args.levels.split(",")] if args.levels != "auto" else None
    runs: dict = collections.defaultdict(list)        # (name, level) -> one result per round
    probe = None
    for rnd in range(args.rounds):
        started = []
        try:
            for name, command in servers:
                started.append((name, Server(command, tab_delay=args.tab_delay)))
            for name, s in started:
                asyncio.run(load(s.port, 200, 4, args.tokens))          # warm up
            if levels is None:
                ref = started[-1][1]
                probe = asyncio.run(load(ref.port, 600, 10, args.tokens))["rps"]
                levels = sorted({nice(probe * f) for f in (0.1, 0.25, 0.5, 0.75, 1.0, 1.25)})
                print(f"saturation probe of {started[-1][0]} (10 concurrent streams): {probe:.0f} requests/s; "
                      f"levels {levels}", flush=True)
            for rps in levels:
                results = level_round(started, rps, args)
                for name, r in results.items():
                    runs[name, rps].append(r)
                    print(f"round {rnd + 1} {rps:g} rps {name:9}: achieved {r['achieved']:.1f}, errors {r['errors']}, "
                          f"first token p50 {pct(r['ttfb'], .5) * 1000:.2f} p99 {pct(r['ttfb'], .99) * 1000:.2f} ms, "
                          f"total p50 {pct(r['total'], .5) * 1000:.2f} ms, client CPU {r['client_cpu'] / r['wall']:.0%}"
                          + (f" ({r['first_error']})" if r['first_error'] else ""), flush=True)
        finally:
            for _, s in started:
                s.close()
    report_equal_load([name for name, _ in servers], levels, runs, args, probe)


def level_round(started: list, rps: float, args) -> dict:
    """One round of one level: --slices slices per server, servers alternating slice by slice (so a
    noisy moment of the shared machine hits both alike); returns each server's merged result."""
    slices = collections.defaultdict(list)
    for k in range(args.slices):
        for name, s in (started if k % 2 == 0 else started[::-1]):
            slices[name].append(asyncio.run(open_loop(s, rps, args.duration / args.slices, args.tokens,
                                                      args.max_in_flight, args.busy_client)))
            time.sleep(0.1)
    merged = {}
    for name, s in started:
        rs = slices[name]
        m = {k: sum(r[k] for r in rs) for k in ("ok", "errors", "span", "server_cpu", "server_sleeps", "tab_cpu", "client_cpu", "wall")}
        m.update({k: [x for r in rs for x in r[k]] for k in ("ttfb", "total", "lag")})
        m["achieved"] = sum(r["ok"] - 1 for r in rs if r["span"]) / m["span"] if m["span"] else 0.0
        m["first_error"] = next((r["first_error"] for r in rs if r["first_error"]), None)
        m["tokens"] = args.tokens
        m["stages"] = bridge_stages(s.port) if name == "bridge" else None
        merged[name] = m
    return merged


def bridge_stages(port: int) -> dict | None:
    """The bridge's own stage timings of its last requests (p50/p99, ms from the job's start), from
    /health; None when it has none."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return json.load(r).get("stages_ms") or None
    except (OSError, ValueError):
        return None


def summary(rs: list) -> dict:
    """One level's rounds for one server: the median over rounds of each percentile and of the
    achieved rate; errors summed; CPU per token over all rounds."""
    tokens = sum(r["ok"] for r in rs) * rs[0]["tokens"]
    f = {"achieved": statistics.median(r["achieved"] for r in rs), "errors": sum(r["errors"] for r in rs)}
    for key in ("ttfb", "total", "lag"):
        for q in (50, 99):
            f[f"{key}_p{q}"] = statistics.median(pct(r[key], q / 100) * 1000 for r in rs)
    wall = sum(r["wall"] for r in rs)
    f["cpu_us_token"] = sum(r["server_cpu"] for r in rs) * 1e6 / tokens if tokens else math.nan
    ok = sum(r["ok"] for r in rs)
    f["sleeps"] = sum(r["server_sleeps"] for r in rs) / ok if ok else math.nan
    f["tab_cpu"] = sum(r["tab_cpu"] for r in rs) / wall * 100
    f["client_cpu"] = sum(r["client_cpu"] for r in rs) / wall * 100
    return f


ROWS = [("achieved", "achieved requests/s", "{:.1f}"), ("errors", "errors", "{:d}"),
        ("ttfb_p50", "first token p50 (ms)", "{:.2f}"), ("ttfb_p99", "first token p99 (ms)", "{:.2f}"),
        ("total_p50", "total p50 (ms)", "{:.2f}"), ("total_p99", "total p99 (ms)", "{:.2f}"),
        ("cpu_us_token", "server CPU per token (us)", "{:.2f}"), ("sleeps", "server sleeps per request", "{:.1f}"),
        ("tab_cpu", "fake tab CPU (% of a core)", "{:.0f}"),
        ("client_cpu", "client CPU (% of a core)", "{:.0f}"), ("lag_p99", "client lag p99 (ms)", "{:.2f}")]


def report_equal_load(names: list, levels: list, runs: dict, args, probe) -> None:
    print(f"\nequal load: {args.tokens}-token streams, {args.duration:g} s per level and server in {args.slices} "
          f"alternating slices, medians over {args.rounds} round(s), fake tab delay {args.tab_delay:g} s"
          f"{', busy client' if args.busy_client else ''} ({machine()})")
    ref = names[-1] if len(names) > 1 else None
    table: dict = {}
    for rps in levels:
        f = {name: summary(runs[name, rps]) for name in names}
        table[rps] = f
        sustained = {n: f[n]["achieved"] >= 0.95 * rps and f[n]["errors"] == 0 for n in names}
        print(f"\n{rps:g} requests/s offered" + "".join(f"{n:>12}" for n in names)
              + ("   bridge/reference" if ref else ""))
        for key, label, fmt in ROWS:
            row = f"{label:29}" + "".join(f"{fmt.format(f[n][key]):>12}" for n in names)
            if ref and key not in ("achieved", "errors", "tab_cpu", "client_cpu", "lag_p99") and f[ref][key]:
                row += f"   x{f['bridge'][key] / f[ref][key]:.2f}"
            print(row)
        print(f"{'sustained':29}" + "".join(f"{'yes' if sustained[n] else 'NO':>12}" for n in names))
        stages = runs["bridge", rps][-1].get("stages")
        if stages:
            print("bridge's own stages, p50/p99 of its last requests (ms from the job's start): "
                  + ", ".join(f"{k} {v['p50']:g}/{v['p99']:g}" for k, v in stages.items()))
        for n in names:
            f[n]["sustained"] = sustained[n]
    if not ref:
        return
    held = [rps for rps in levels if table[rps][ref]["sustained"]]
    print(f"\ngoal 1: bridge first token p50 and p99 <= the reference's at every load the reference sustains "
          f"({', '.join(f'{x:g}' for x in held) or 'none'} requests/s)")
    met = True
    for rps in held:
        b, r = table[rps]["bridge"], table[rps][ref]
        ok50, ok99 = b["ttfb_p50"] <= r["ttfb_p50"], b["ttfb_p99"] <= r["ttfb_p99"]
        met &= ok50 and ok99
        print(f"  {rps:6g} rps: p50 {b['ttfb_p50']:.2f} vs {r['ttfb_p50']:.2f} ms ({'met' if ok50 else 'NOT met'}), "
              f"p99 {b['ttfb_p99']:.2f} vs {r['ttfb_p99']:.2f} ms ({'met' if ok99 else 'NOT met'})")
    print(f"  -> {'met' if met and held else 'NOT met'}")
    if held:
        top = held[-1]
        b, r = table[top]["bridge"], table[top][ref]
        ratio = b["cpu_us_token"] / r["cpu_us_token"]
        print(f"goal 2: bridge CPU per token <= 1/3 of the reference's, at {top:g} requests/s (the highest level "
              f"the reference sustains): {b['cpu_us_token']:.2f} vs {r['cpu_us_token']:.2f} us, x{ratio:.2f} "
              f"-> {'met' if ratio <= 1 / 3 else 'NOT met'}")


# -- token pre-minting, in a real browser (--preminting) ---------------------------------------------------

MINT_DELAY_MS = 1500      # the stand-in's reCAPTCHA execute() time (real ones: 0.1 s to seconds)


def preminting(requests: int) -> bool:
    """The --preminting figure: what keep_token_ready saves a request. The real userscript runs in
    headless Chromium against the browser tests' stand-in of LMArena (testsupport.py), whose
    grecaptcha.enterprise.execute() takes MINT_DELAY_MS; a real bridge (subprocess) serves the
    client. Measured twice, same browser and stand-in, one bridge each: token_ready_seconds 0 (the
    tab mints a token when a task arrives) and 600 (it keeps one minted ahead). False, after one
    line saying why, when Chromium or Playwright (or what the browser tests import) is missing."""
    chromium = shutil.which("chromium")
    if chromium is None:
        print("token pre-minting: skipped (no chromium on PATH; apt-get install chromium)", flush=True)
        return False
    try:
        from playwright.sync_api import sync_playwright
        import testsupport as stand_in
    except ImportError as exc:
        print(f"token pre-minting: skipped ({exc}; pip install -r requirements-dev.txt)", flush=True)
        return False
    folder = tempfile.mkdtemp(prefix="bench-preminting-")
    arena = stand_in.StandIn(*stand_in.make_certificate(folder))
    threading.Thread(target=arena.serve_forever, daemon=True).start()
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=stand_in.chromium_args(arena.port))
        try:
            runs = {mode: premint_run(browser, arena, stand_in, folder, seconds, requests)
                    for mode, seconds in (("without", 0), ("with", 600))}
        finally:
            browser.close()
    finally:
        pw.stop()
        arena.shutdown()
        arena.server_close()
        shutil.rmtree(folder, ignore_errors=True)
    (wa, wf), (ra, rf) = runs["without"], runs["with"]
    med = statistics.median
    print(f"token pre-minting (headless Chromium, stand-in reCAPTCHA execute() {MINT_DELAY_MS / 1000:g} s, "
          f"{requests} requests each): POST -> LMArena request: without {med(wa):.3f} s (max {max(wa):.3f}), "
          f"with {med(ra):.3f} s (max {max(ra):.3f}); first token: without {med(wf):.3f} s, with {med(rf):.3f} s",
          flush=True)
    return True


def premint_run(browser, arena, stand_in, folder: str, seconds: float, n: int) -> tuple:
    """One bridge with token_ready_seconds `seconds` and a tab of it in a fresh context: a warm-up
    request, then n measured ones -> (POST -> the stand-in receiving create-evaluation, POST ->
    first token), seconds each. The token minted ahead when the tab connected came at the page's
    initial 0 ms delay: the warm-up spends it, and each measured request waits until the last mint
    started > MINT_DELAY_MS ago (so one made ahead is ready) and 2 s after the previous one. Every
    measured request's token is checked to come from a mint started at the slow delay."""
    server = Server(bridge_command(tempfile.mkdtemp(dir=folder), token_ready_seconds=seconds), fake_tab=False)
    context = browser.new_context(ignore_https_errors=True)
    try:
        context.grant_permissions([stand_in.LNA_PERMISSION], origin=stand_in.ORIGIN)
        context.add_init_script(f"localStorage.setItem('lmarena-bridge-url', 'ws://127.0.0.1:{server.port}/ws');")
        with open(os.path.join(HERE, "userscript.js"), encoding="utf-8") as f:
            context.add_init_script(f.read())
        page = context.new_page()
        page.goto(stand_in.ORIGIN + "/")
        end = time.time() + 30        # the tab connected and its page's models are in models.json
        while "stand-in-text" not in model_names(server.port):
            if time.time() > end:
                raise SystemExit("token pre-minting: the tab did not connect to the bridge")
            time.sleep(0.05)
        slow_since = page.evaluate(f"window.__mintDelayMs = {MINT_DELAY_MS}; Date.now()")
        last = stream_chat(server.port, stand_in.ANSWER)[0]                                  # warm-up
        arrive, first, records = [], [], []
        for _ in range(n):
            while page.evaluate("Date.now() - (window.__mints.at(-1) || {at: 0}).at") <= MINT_DELAY_MS + 100:
                time.sleep(0.05)
            time.sleep(max(0.0, last + 2 - time.time()))
            seen = len(arena.requests)
            last, t_first = stream_chat(server.port, stand_in.ANSWER)
            new = [r for r in arena.requests[seen:] if r["client"] == "tab"]
            if len(new) != 1 or new[0]["status"] != 200:
                raise SystemExit(f"token pre-minting: expected one accepted LMArena request, got "
                                 f"{[r['status'] for r in new]}")
            records.append(new[0])
            arrive.append(new[0]["at"] - last)
            first.append(t_first - last)
        started = {m["n"]: m["at"] for m in page.evaluate("window.__mints")}
        for r in records:       # token "v3.<key>.<action>.<n>.<page load>": mint n
            if started[int(r["body"]["recaptchaV3Token"].split(".")[3])] < slow_since:
                raise SystemExit("token pre-minting: a measured request used a token minted at 0 ms")
        return arrive, first
    finally:
        context.close()
        server.close()


def model_names(port: int) -> list:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
            return [m["id"] for m in json.load(r)["data"]]
    except (OSError, ValueError, KeyError):
        return []


def stream_chat(port: int, answer: str) -> tuple:
    """One streaming chat completion ("hi" to stand-in-text) -> (time.time() right before the POST,
    at its first content delta). The answer must be `answer` (the stand-in's), in full."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        body = json.dumps({"model": "stand-in-text", "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]})
        t_post = time.time()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise SystemExit(f"token pre-minting: HTTP {r.status}: {r.read()[:300]!r}")
        t_first, text = None, ""
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            for choice in json.loads(line[6:]).get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    t_first = t_first or time.time()
                    text += piece
        if text != answer:
            raise SystemExit(f"token pre-minting: wrong answer {text!r}")
        return t_post, t_first
    finally:
        conn.close()


def machine() -> str:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip() + ", "
                break
    return f"{os.cpu_count()} CPUs, {model}Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}"


def prompt_sizes() -> list:
    """(fixture, API, request bytes, prompt characters sent to LMArena, ratio) for the real agents'
    recorded requests in fixtures/: the first turn of a new conversation, as create mode sends it."""
    import bridge
    cfg = bridge.Config()
    apis = {"responses": bridge.responses_conversation, "anthropic": bridge.anthropic_conversation,
            "openai": bridge.openai_conversation}
    out = []
    for name in sorted(os.listdir(os.path.join(HERE, "fixtures"))):
        if not name.endswith("_request.json"):
            continue
        with open(os.path.join(HERE, "fixtures", name), "rb") as f:
            raw = f.read()
        data = json.loads(raw)
        api = "responses" if "input" in data else "anthropic" if "max_tokens" in data else "openai"
        conv = apis[api](data, cfg)
        chat = bridge.prepare(conv, cfg, {conv.model: None}, (conv.model,))   # any name: the size is what counts
        plan = bridge.TaskPlan(chat, cfg, None)
        content = plan.content()[0]
        out.append((name[:-len("_request.json")], api, len(raw), len(content.encode()), len(content.encode()) / len(raw)))
    return out


def report_prompt_sizes() -> None:
    rows = prompt_sizes()
    print("\nprompt size: real agents' recorded requests (fixtures/) -> the prompt LMArena gets (UTF-8 bytes)")
    print(f"  {'request':42} {'API':10} {'JSON':>8} {'prompt':>8} {'ratio':>6}")
    for name, api, raw, prompt, ratio in rows:
        print(f"  {name:42} {api:10} {raw:8d} {prompt:8d} {ratio:6.2f}")


def bridge_config(folder: str, **extra) -> str:
    cfg = os.path.join(folder, "config.jsonc")
    with open(cfg, "w") as f:                 # session_mode "create" (the default): no ids needed
        json.dump({"log_level": "warning", "enable_auto_update": False, **extra}, f)
    with open(os.path.join(folder, "models.json"), "w") as f:     # create mode answers only known names
        json.dump({"bench-model": "11111111-2222-4333-8444-555555555555"}, f)
    return cfg


def bridge_command(folder: str, command: str | None = None, **extra) -> str:
    """This folder's bridge.py with a temporary config (`extra`: more config keys), or `command`
    ({port}, {config})."""
    cfg = bridge_config(folder, **extra)
    if command:
        return command.replace("{config}", shlex.quote(cfg))
    return f"{shlex.quote(sys.executable)} {shlex.quote(os.path.join(HERE, 'bridge.py'))} --port {{port}} --config {shlex.quote(cfg)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare", help="the reference server's command with {port}, run under the identical load")
    p.add_argument("--bridge", help="the bridge's command with {port} and {config} (default: bridge.py here)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (servers alternate; medians over rounds)")
    p.add_argument("--requests", type=int, default=1000, help="requests in the stream10 scenario")
    p.add_argument("--equal-load", action="store_true", help="open-loop comparison at equal offered loads")
    p.add_argument("--levels", default="auto", help='offered loads in requests/s ("50,100,200"), or "auto"')
    p.add_argument("--duration", type=float, default=4.0, help="seconds per level, server and round")
    p.add_argument("--slices", type=int, default=4, help="servers alternate this many times per level and round")
    p.add_argument("--tokens", type=int, default=50, help="tokens per answer (equal load)")
    p.add_argument("--max-in-flight", type=int, default=400, help="requests open at once; more are dropped")
    p.add_argument("--tab-delay", type=float, default=0.0, help="seconds between the fake tab's messages (equal load)")
    p.add_argument("--busy-client", action="store_true", help="the client polls, never sleeps (equal load)")
    p.add_argument("--preminting", action="store_true", help="the reCAPTCHA token pre-minting figure (Chromium)")
    p.add_argument("--preminting-requests", type=int, default=5, help="measured requests per mode (--preminting)")
    p.add_argument("--prompt-size", action="store_true", help="only the prompt-size figures of the recorded agents")
    p.add_argument("--tab", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.prompt_size:
        report_prompt_sizes()
        return
    if args.preminting_requests < 1:
        p.error("--preminting-requests must be at least 1")
    if args.tab:
        asyncio.run(fake_tab(args.tab, args.tab_delay))
        return
    if args.preminting and not args.equal_load:
        raise SystemExit(0 if preminting(args.preminting_requests) else 1)
    with tempfile.TemporaryDirectory() as folder:
        servers = [("bridge", bridge_command(folder, args.bridge))]
        if args.compare:
            servers.append(("reference", args.compare.replace("{config}", shlex.quote(bridge_config(folder)))))
        if args.equal_load:
            equal_load(servers, args)
            print()
            preminting(args.preminting_requests)
        else:
            default_run(servers, args)
            report_prompt_sizes()


if __name__ == "__main__":
    main()
