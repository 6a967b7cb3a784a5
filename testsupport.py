"""Test support shared by the test files and bench.py: nothing here is a test.

  Bridge side   constants (ids, MODELS), `lines` (LMArena rows), `parse_all` (the one helper that feeds
                the stream parser), `wait_until`, FakeTab (a `websockets` client playing a script per
                task), Harness (a real Bridge on 127.0.0.1:0 in a thread of its own, user files in a
                temp folder), BridgeCase, raw HTTP helpers (requests, responses, chunked bodies, SSE
                events), run_cli, FileServer.
  Site side     the stand-in of today's LMArena (StandIn, ArenaHandler: pages with flight data, a fake
                grecaptcha, server actions, the stream endpoints as PROTOCOL 2 describes, the model
                catalog, budget headers; switches in StandIn's docstring), its TLS certificate, the
                Chromium arguments that show it as https://arena.ai, and the shared browser World /
                BrowserCase of the userscript tests. Recorded-site data for both sides: CATALOG (the
                catalog, 470 rows), catalog_flattened() (as the tab reports it), catalog_models_json()
                (the models.json entries PROTOCOL 2.8 gives for it, worked out independently),
                ROUTER_ID, long_capture() and prime_cuts() (a long two-lane answer and odd cuts of it),
                send_like_the_site() (the page sends its own request), keys_anywhere().

How the tab sees the stand-in: as on the real site. The stand-in serves https (a throw-away
self-signed certificate made with the openssl command at start-up) and Chromium maps `arena.ai`
(and `blob.example.com`, the stand-in's upload storage) to it with `--host-resolver-rules`, so the
page's origin is `https://arena.ai`, an LMArena origin the bridge accepts without
`allowed_tab_origins`. Every other host name fails to resolve: nothing leaves the machine.
`--ip-address-space-overrides=127.0.0.1:<stand-in port>=public` makes Chromium treat the stand-in
as a public web site, so the page's WebSocket to the bridge goes through the Local Network Access
check exactly as from the real https://arena.ai (see test_userscript.py).
"""
import asyncio
import base64
import contextlib
import functools
import hashlib
import http.server
import json
import os
import random
import re
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import websockets
from websockets.frames import Frame, Opcode

import bridge

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - CI installs it
    sync_playwright = None

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED_CONFIG = os.path.join(HERE, "config.example.jsonc")     # the documented settings, as shipped
SID = "0198c5a1-1111-7aaa-8bbb-123456789abc"
MID = "0198c5a1-2222-7aaa-8bbb-123456789abc"
SID2 = "0198c5a1-3333-7aaa-8bbb-123456789abc"
MID2 = "0198c5a1-4444-7aaa-8bbb-123456789abc"
MODEL_UUID = "11111111-2222-4333-8444-555555555555"
IMAGE_UUID = "66666666-7777-4888-8999-000000000000"
MODELS = {"test-model": MODEL_UUID, "image-model": f"{IMAGE_UUID}:image", "keep-model": "null:image"}


# Bridge side: a fake tab, a bridge in a thread, raw HTTP helpers ====================================

def lines(*texts, finish="stop", side="a"):
    """LMArena text lines for the given deltas and a finish line."""
    out = [f"{side}0:{json.dumps(t)}\n" for t in texts]
    if finish:
        out.append(f'{side}d:{{"finishReason":"{finish}"}}\n')
    return out


def wait_until(predicate, timeout, what, interval=0.01, detail=lambda: ""):
    """Poll `predicate` until it holds; after `timeout` seconds fail saying `what` (and `detail()`)."""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}{detail()}")


class FakeTab:
    """A stand-in userscript tab: a `websockets` client that answers each task by playing `script`:
    str or dict items are sent as `data`, ("sleep", s) waits, ("close",) drops the socket,
    ("hang",) never answers, ("raw", rid -> text) sends text as it is (JSON with Infinity...),
    ("fragments", data, n) sends the data message split over n WebSocket frames, ("burst", [data,
    ...], leave) sends data messages in one socket write (one read for the bridge), then closes the
    socket at once if `leave`.
    Tasks and commands received are recorded."""

    def __init__(self, harness, script=None, origin="https://lmarena.ai", hello=True):
        self.h = harness
        self.script = script if script is not None else lines("Hello ", "world!") + ["[DONE]"]
        self.origin = origin
        self.hello = hello
        self.tasks, self.commands, self.token_windows = [], [], []
        self.ws = None
        self.on_command = None        # msg -> list of replies (e.g. ids_captured)
        self.record = True            # keep tasks and commands for assertions
        self.closed = threading.Event()

    async def connect(self):
        self.ws = await websockets.connect(f"ws://127.0.0.1:{self.h.port}/ws", origin=self.origin,
                                           max_size=None)
        if self.hello:
            await self.ws.send(json.dumps({"type": "hello", "version": "test", "url": "https://lmarena.ai/"}))
        self.reader = asyncio.get_running_loop().create_task(self.read())

    async def read(self):
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                if "payload" in msg:
                    if self.record:
                        self.tasks.append(msg)
                    asyncio.get_running_loop().create_task(self.play(msg["request_id"], msg))
                elif msg.get("command") == "keep_token_ready":
                    if self.record:
                        self.token_windows.append(msg)
                else:
                    if self.record:
                        self.commands.append(msg)
                    if self.on_command is not None:
                        for reply in self.on_command(msg) or ():
                            await self.ws.send(json.dumps(reply))
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.set()

    async def play(self, rid, msg):
        script = self.script(msg) if callable(self.script) else self.script
        for item in script:
            if isinstance(item, tuple):
                if item[0] == "sleep":
                    await asyncio.sleep(item[1])
                elif item[0] == "close":
                    await self.ws.close()
                    return
                elif item[0] == "hang":
                    return
                elif item[0] == "raw":
                    with contextlib.suppress(websockets.ConnectionClosed):
                        await self.ws.send(item[1](rid))
                elif item[0] == "burst":     # frames made by websockets, written together
                    frames = [Frame(Opcode.TEXT, json.dumps({"request_id": rid, "data": d}).encode())
                              .serialize(mask=True) for d in item[1]]
                    self.ws.transport.write(b"".join(frames))
                    if item[2]:
                        self.ws.transport.close()
                        return
                elif item[0] == "fragments":
                    text = json.dumps({"request_id": rid, "data": item[1]})
                    step = -(-len(text) // item[2])
                    with contextlib.suppress(websockets.ConnectionClosed):
                        await self.ws.send([text[i:i + step] for i in range(0, len(text), step)])
                continue
            with contextlib.suppress(websockets.ConnectionClosed):
                await self.ws.send(json.dumps({"request_id": rid, "data": item}))

    async def send(self, obj):
        await self.ws.send(json.dumps(obj))

    def close(self):
        self.h.run(self.ws.close())
        self.closed.wait(5)

    def wait_command(self, name, timeout=5.0):
        end = time.time() + timeout
        while time.time() < end:
            for c in self.commands:
                if c.get("command") == name:
                    return c
            time.sleep(0.01)
        raise AssertionError(f"tab never got {name!r}; got {self.commands}")


class Harness:
    """A real Bridge on 127.0.0.1:0 in a thread of its own, with user files in a temp folder."""

    def __init__(self, config=None, models=None, endpoint_map=None, raw_config=None, overrides=None):
        self.dir = tempfile.mkdtemp(prefix="bridge-test-")
        self.config_path = os.path.join(self.dir, "config.jsonc")
        with open(SHIPPED_CONFIG, encoding="utf-8") as f:
            shipped = f.read()
        settings = {"session_id": SID, "message_id": MID, "log_level": "error"}
        settings.update(config or {})
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(raw_config if raw_config is not None else bridge.jsonc_update(shipped, settings))
        self.write_json("models.json", MODELS if models is None else models)
        self.write_json("model_endpoint_map.json", endpoint_map or {})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        files = bridge.UserFiles(self.config_path, overrides)
        files.load_all(report=lambda m: None)
        bridge.set_log_level(files.config.log_level)
        self.bridge = self.run(self._start(files))
        self.port = self.bridge.port
        self.url = f"http://127.0.0.1:{self.port}"
        self.tabs = []
        self.clients = []             # openai SDK clients, closed with the harness (their sockets)

    def write_json(self, name, obj):
        with open(os.path.join(self.dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)

    async def _start(self, files):
        b = bridge.Bridge(files, "127.0.0.1", 0)
        await b.start()
        return b

    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def tab(self, script=None, **kw):
        t = FakeTab(self, script, **kw)
        self.run(t.connect())
        self.tabs.append(t)
        self.wait(lambda: len(self.bridge.tabs) >= len([x for x in self.tabs if not x.closed.is_set()]))
        return t

    def wait(self, predicate, timeout=5.0, what="condition"):
        wait_until(predicate, timeout, what)

    def client(self, key="unused", **kw):
        c = openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=20, **kw)
        self.clients.append(c)
        return c

    def ask(self, content="hi", model="test-model", **kw):
        """One chat completion through the openai SDK."""
        return self.client().chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)

    def close(self):
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.close()
        for t in self.tabs:
            with contextlib.suppress(Exception):
                self.run(t.ws.close(), timeout=5)
        with contextlib.suppress(Exception):
            self.run(self.bridge.stop(grace=0.2), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class BridgeCase(unittest.TestCase):
    config = None
    models = None
    endpoint_map = None
    overrides = None        # Config fields set for this bridge only (limits), not written to the file

    def setUp(self):
        self.h = Harness(self.config, self.models, self.endpoint_map, overrides=self.overrides)
        self.addCleanup(self.h.close)

    # raw HTTP helpers
    def connect(self):
        s = socket.create_connection(("127.0.0.1", self.h.port), timeout=10)
        self.addCleanup(s.close)
        return s

    def raw(self, data: bytes, read_until_close=True, sock=None, timeout=10):
        """Send `data` and read until the server closes (or `timeout` seconds in all)."""
        s = sock or self.connect()
        s.settimeout(timeout)
        if data:
            s.sendall(data)
        if not read_until_close:
            return s
        chunks = []
        end = time.monotonic() + timeout
        with contextlib.suppress(socket.timeout, ConnectionResetError):
            while time.monotonic() < end:
                s.settimeout(max(0.01, end - time.monotonic()))
                d = s.recv(65536)
                if not d:
                    break
                chunks.append(d)
        return b"".join(chunks)

    def post(self, path="/v1/chat/completions", body=None, headers=None, stream=False):
        """A real HTTP exchange via http.client; returns (status, headers, body bytes)."""
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", self.h.port, timeout=20)
        self.addCleanup(c.close)
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        hdrs = {"Content-Type": "application/json"}
        hdrs.update(headers or {})
        c.request("POST" if data is not None else "GET", path, body=data, headers=hdrs)
        r = c.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()

    def get(self, path, headers=None):
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", self.h.port, timeout=20)
        self.addCleanup(c.close)
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()


async def ws_connect(port, origin):
    return await websockets.connect(f"ws://127.0.0.1:{port}/ws", origin=origin)


def chat(messages="hi", **kw):
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body = {"model": "test-model", "messages": messages}
    body.update(kw)
    return body


def sse_events(raw: bytes):
    """data payloads of an SSE body (comments skipped)."""
    out = []
    for block in raw.decode().split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                out.append(line[6:])
    return out


def split_response(raw: bytes):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines_ = head.decode("latin-1").split("\r\n")
    status = int(lines_[0].split()[1])
    headers = {}
    for line in lines_[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out += rest[:size]
        rest = rest[size + 2:]


def get_req(path="/health", extra=b"", version=b"HTTP/1.1"):
    return b"GET " + path.encode() + b" " + version + b"\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n"


def padded_head(size: int, path="/health") -> bytes:
    """A GET head (without its blank line) of exactly `size` bytes."""
    base = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Pad: "
    return base + b"a" * (size - len(base))


def close_with_reset(sock):
    """Close a socket so that the peer gets a reset (RST), as when a process dies with unread data."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def post_req(body: bytes, path="/v1/chat/completions", extra=b""):
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body)


def read_responses(sock, n, timeout=10):
    """Read exactly n complete responses (Content-Length or chunked) from a socket, within
    `timeout` seconds in all (a 100 Continue counts as one)."""
    end = time.monotonic() + timeout
    buf = b""
    out = []

    def more():
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no complete response within {timeout} s: {buf[:300]!r}")
        sock.settimeout(left)
        d = sock.recv(65536)
        if not d:
            raise AssertionError(f"closed after {len(out)} responses: {buf[:300]!r}")
        return d
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            buf += more()
        head, _, rest = buf.partition(b"\r\n\r\n")
        status, headers, _ = split_response(head + b"\r\n\r\n")
        if status == 100:
            buf = rest
            out.append((100, headers, b""))
            continue
        if "content-length" in headers:
            n_body = int(headers["content-length"])
            while len(rest) < n_body:
                rest += more()
            out.append((status, headers, rest[:n_body]))
            buf = rest[n_body:]
        elif headers.get("transfer-encoding") == "chunked":
            while not re.search(rb"(^|\r\n)0\r\n\r\n", rest):
                rest += more()
            stop = re.search(rb"(^|\r\n)0\r\n\r\n", rest).end()
            out.append((status, headers, dechunk(rest[:stop])))
            buf = rest[stop:]
        else:
            out.append((status, headers, rest))
            buf = b""
    return out


PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 20).decode()


def templates(messages, attachment_limit=5 * 2**20, **kw):
    """OpenAI messages -> the retry body's templates (transcript, then positions)."""
    opts = dict(tavern=False, bypass=False, is_image=False, mode="direct_chat", target="A")
    opts.update(kw)
    turns = bridge.openai_turns(messages, bridge.Attachments(attachment_limit))
    return bridge.openai_to_templates_positions(bridge.transcript(turns), **opts)


def feed_parser(chunks, side="a"):
    """(events, parser) after feeding `chunks` to a new LMArena stream parser and closing it."""
    p = bridge.ArenaStreamParser(side)
    events = []
    for c in chunks:
        events += p.feed(c)
    events += p.close()
    return events, p


def run_stop_filter(pieces, stops):
    """(the text a StopSequenceFilter lets through for `pieces`, the stops it hit)."""
    f = bridge.StopSequenceFilter(stops)
    out, hits = [], []
    for p in pieces:
        text, hit = f.feed(p)
        out.append(text)
        if hit:
            hits.append(hit)
    out.append(f.close())
    return "".join(out), hits


def parse_all(chunks, side="a"):
    """The parser's events for `chunks`, text as ("text", value), errors last as ("error", code)."""
    events, _ = feed_parser(chunks, side)
    return [e if e[0] != "text" else ("text", e[2]) for e in events if e[0] != "error"] + \
        [("error", e[1].code) for e in events if e[0] == "error"]


def run_cli(*args, timeout=60, cwd=HERE, script=None):
    return subprocess.run([sys.executable, script or os.path.join(HERE, "bridge.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def answer_capture(sid=SID2, mid=MID2):
    def on_command(msg):
        if msg.get("command") == "activate_id_capture":
            return [{"type": "ids_captured", "session_id": sid, "message_id": mid}]
    return on_command


class FileServer:
    """A tiny local HTTP server for update manifests and image bytes."""

    def __init__(self, files: dict):
        store = files

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                data = store.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def log_records(case, level="info"):
    """The bridge's log records from now until `case` ends (at `level`), as a list."""
    records = []
    handler = bridge.logging.Handler()
    handler.emit = records.append
    bridge.log.addHandler(handler)
    case.addCleanup(bridge.log.removeHandler, handler)
    bridge.set_log_level(level)
    case.addCleanup(bridge.set_log_level, "error")
    return records


def exposed_bridge(case, config=None):
    """(harness, a second bridge of its files bound to all interfaces, this machine's LAN address),
    closed when `case` ends."""
    h = Harness(config or {"api_key": "k"})
    case.addCleanup(h.close)

    async def start():
        b = bridge.Bridge(h.bridge.files, "0.0.0.0", 0)
        await b.start()
        return b
    b = h.run(start())
    case.addCleanup(lambda: h.run(b.stop(grace=0)))
    return h, b, non_loopback_ip()


def non_loopback_ip():
    """An address of this machine that is not loopback, or None."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 9))
        ip = s.getsockname()[0]
        if not ip.startswith("127."):
            return ip
    return None


# Site side: the stand-in of today's LMArena, and the browser world ======================================
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

ORIGIN = "https://arena.ai"
STORAGE = "https://blob.example.com"      # where upload URLs point (another origin, as on the site)
LNA_PERMISSION = "local-network-access"   # Playwright's name for Chromium's Local Network Access


def site_key(n: int) -> str:
    """The n-th v3 site key of the stand-in (40 characters, like real keys); rotation moves on."""
    return f"6LcStandInV3key{n:04d}".ljust(40, "x")


V2_KEY = "6LcStandInV2key".ljust(40, "y")
TEXT_ID = "01990000-0000-7000-8000-000000000001"
IMAGE_ID = "01990000-0000-7000-8000-000000000002"
SEARCH_ID = "01990000-0000-7000-8000-000000000003"
RETIRED_ID = "01990000-0000-7000-8000-000000000004"
TWIN_OLD_ID = "01980000-0000-7000-8000-000000000005"
TWIN_NEW_ID = "01995000-0000-7000-8000-000000000006"


def model(mid, name, out_caps, **extra):
    return {"id": mid, "publicName": name, "organization": "acme", "provider": "acme", "userSelectable": True,
            "capabilities": {"inputCapabilities": {"text": True, "image": True}, "outputCapabilities": out_caps},
            **extra}


PAGE_MODELS = [
    model(TEXT_ID, "stand-in-text", {"text": True}),
    model(IMAGE_ID, "stand-in-image", {"image": {"aspectRatios": ["1:1"]}}),
    model(SEARCH_ID, "stand-in-search", {"search": True}),   # page data: text output would mean chat (2.8)
    model(RETIRED_ID, "stand-in-retired", {"text": True}, userSelectable=False),
    model(TWIN_OLD_ID, "stand-in-twin", {"text": True}),
    model(TWIN_NEW_ID, "stand-in-twin", {"text": True}),
]
MODALITY = {TEXT_ID: "chat", IMAGE_ID: "image", SEARCH_ID: "search", RETIRED_ID: "chat",
            TWIN_OLD_ID: "chat", TWIN_NEW_ID: "chat"}


# -- The model catalog (PROTOCOL 2.8): full size, shaped like the real one, deterministic ------------------
# GET /nextjs-api/model-catalog answers CATALOG: [{"arena", "models": [row, ...]}] in six arenas, 470 rows.
# What it holds, on purpose: names repeated across arenas ("document" repeats most "text" rows with the
# same ids; many text models are in "code" with ids of their own, some in "search" and "text-to-image"),
# names repeated within an arena (two selectable rows of one publicName with UUIDv7 ids of different
# times; a newer userSelectable false row beside an older selectable one; names with only unselectable
# rows; anonymous rows without organization), about 40% of the text rows listing `web: true`, and the
# router "max" listing text, image, search and web (a chat model: its arena is "text"). The stand-in's
# own models are in it too: stand-in-text (text, document), stand-in-twin (two rows), stand-in-retired
# (not selectable), stand-in-search (search only), stand-in-image (text-to-image only).
CATALOG_ARENAS = ("text", "code", "document", "search", "text-to-image", "text-to-video")
ARENA_MODALITY = {"text": "chat", "document": "chat", "code": "webdev", "search": "search",
                  "text-to-image": "image", "text-to-video": "video"}
_TEXT_FAMILIES = (
    ("google", "gemini", ("2.0-flash", "2.5-flash", "2.5-flash-lite", "2.5-pro", "3-flash", "3-pro")),
    ("anthropic", "claude", ("haiku-4-5", "opus-4", "opus-4-1", "opus-4-5", "sonnet-4", "sonnet-4-5",
                             "3-7-sonnet")),
    ("openai", "gpt", ("4.1", "4.1-mini", "4o", "5", "5-mini", "5-nano", "5.1", "5.1-high", "oss-120b",
                       "oss-20b")),
    ("xai", "grok", ("3", "3-mini", "4", "4-fast", "4.1", "code-fast-1")),
    ("meta", "llama", ("3.1-405b", "3.1-70b", "3.3-70b", "4-maverick", "4-scout")),
    ("deepseek", "deepseek", ("r1", "r1-0528", "v3", "v3.1", "v3.1-terminus", "v3.2-exp")),
    ("alibaba", "qwen", ("2.5-max", "3-235b-a22b", "3-coder-480b", "3-max", "3-next-80b", "3-vl-235b",
                         "3-30b-a3b")),
    ("mistral", "mistral", ("large-2411", "medium-2508", "small-3.2", "nemo")),
    ("moonshot", "kimi", ("k2", "k2-0905", "k2-thinking")),
    ("zhipu", "glm", ("4.5", "4.5-air", "4.6", "4.5v")),
    ("amazon", "nova", ("pro", "lite", "micro", "premier")),
    ("cohere", "command", ("a", "r-plus", "a-reasoning")),
    ("minimax", "minimax", ("m1", "m2")),
    ("tencent", "hunyuan", ("t1", "large", "turbos")),
    ("bytedance", "seed", ("1.6", "1.6-flash", "oss-36b")),
    ("ibm", "granite", ("3.3-8b", "4.0-h-small")),
    ("microsoft", "phi", ("4", "4-reasoning")),
    ("nvidia", "nemotron", ("ultra-253b", "super-49b")),
    ("ai21", "jamba", ("1.7-large", "1.7-mini")),
    ("baidu", "ernie", ("4.5", "x1", "5.0")),
    ("stepfun", "step", ("3", "2-16k")),
    ("inclusionai", "ling", ("flash-2.0", "1t")),
    ("meituan", "longcat", ("flash-chat", "flash-thinking")),
    ("mistral", "magistral", ("medium-2509", "small-2509")),
    ("google", "gemma", ("3-27b", "3-12b", "3n-e4b")),
    ("openai", "chatgpt", ("4o-latest",)),
)
_IMAGE_FAMILIES = (
    ("openai", "gpt-image", ("1", "1-mini", "1-high")),
    ("google", "imagen", ("3.0", "4.0", "4.0-fast", "4.0-ultra")),
    ("bfl", "flux", ("1.1-pro", "1-kontext-pro", "1-kontext-max", "1-dev", "2-pro", "2-flex", "1.1-ultra")),
    ("ideogram", "ideogram", ("v2", "v3", "v3-quality", "v3-turbo", "v2a")),
    ("recraft", "recraft", ("v3", "v2", "v3-svg")),
    ("bytedance", "seedream", ("3", "4", "4-high-res", "4-2k")),
    ("alibaba", "qwen-image", ("base", "edit", "prompt-extend", "plus")),
    ("tencent", "hunyuan-image", ("2.1", "3.0")),
    ("stability", "stable-diffusion", ("3.5-large", "3.5-medium", "3-ultra", "xl")),
    ("midjourney", "midjourney", ("v6", "v6.1", "v7")),
    ("leonardo", "lucid", ("origin", "realism")),
    ("luma", "photon", ("1", "flash")),
    ("reve", "reve", ("v1", "fast")),
    ("krea", "krea", ("1", "flux")),
    ("playground", "playground", ("v3", "v2.5")),
    ("minimax", "image", ("01", "01-live")),
    ("kuaishou", "kolors", ("2.0", "2.1")),
    ("xai", "grok-imagine", ("image", "image-pro")),
    ("microsoft", "mai-image", ("1",)),
    ("nvidia", "sana", ("1.5", "sprint")),
    ("hidream", "hidream", ("i1-full", "i1-dev", "e1")),
    ("baidu", "ernie-image", ("1",)),
    ("amazon", "nova-canvas", ("1", "premier")),
    ("adobe", "firefly", ("image-4", "image-4-ultra", "image-5")),
    ("runway", "gen4-image", ("base", "turbo")),
    ("vivago", "vivago", ("2.0",)),
    ("lumina", "lumina", ("image-2",)),
    ("janus", "janus", ("pro-7b",)),
    ("google", "gemini-image", ("2.5-flash", "3-pro")),
    ("openai", "dall-e", ("3", "3-hd")),
    ("qwen", "qwen-vlo", ("1",)),
    ("fal", "aura-flow", ("0.3",)),
)
_VIDEO_FAMILIES = (
    ("google", "veo", ("2", "3", "3-fast", "3-audio", "3.1", "3.1-fast")),
    ("openai", "sora", ("1", "2", "2-pro")),
    ("kuaishou", "kling", ("1.6-pro", "2.0-master", "2.1-master", "2.1-pro", "2.5-turbo", "2.5-pro")),
    ("minimax", "hailuo", ("02-pro", "02-standard", "02-fast", "2.3")),
    ("bytedance", "seedance", ("1.0-pro", "1.0-lite", "1.0-pro-fast")),
    ("alibaba", "wan", ("2.1", "2.2-a14b", "2.5-preview", "2.5")),
    ("luma", "ray", ("2", "2-flash", "3")),
    ("runway", "gen", ("3-alpha", "4", "4-turbo", "4-aleph")),
    ("pika", "pika", ("2.1", "2.2", "2.5")),
    ("tencent", "hunyuan-video", ("1", "i2v")),
    ("lightricks", "ltx-video", ("13b", "2")),
    ("vidu", "vidu", ("q1", "2.0", "q2")),
    ("xai", "grok-imagine-video", ("1",)),
    ("pixverse", "pixverse", ("v4.5", "v5")),
    ("moonvalley", "marey", ("1",)),
    ("genmo", "mochi", ("1", "1-hd")),
    ("haiper", "haiper", ("2.0", "2.5")),
    ("midjourney", "mj-video", ("v1", "v1-hd")),
)
_SEARCH_ONLY = (("perplexity", "sonar", ("pro", "reasoning-pro", "deep-research", "base")),
                ("exa", "exa-search", ("answer", "research")), ("you", "you-search", ("ari", "express")))
_CODE_ONLY = (("stand-in-labs", "webdev-agent", ("1", "2", "pro")), ("anthropic", "claude-code", ("agent",)),
              ("openai", "codex", ("web", "mini")))
_DOCUMENT_ONLY = (("stand-in-labs", "doc-reader", ("1", "2", "long")),)


def catalog_id(seed: str, day: int) -> str:
    """A deterministic UUIDv7: its time is `day` days after 2024-06-01 (a larger day is a newer id)."""
    h = int(hashlib.sha256(seed.encode()).hexdigest(), 16)
    ms = 1717200000000 + day * 86_400_000 + h % 86_400_000
    value = (ms << 80) | (0x7 << 76) | (((h >> 64) & 0xFFF) << 64) | (0b10 << 62) | (h & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def _names(families):
    return [(org, f"{family}-{v}") for org, family, versions in families for v in versions]


def _row(name, org, mid, out_caps, selectable=True, image_in=True):
    row = {"id": mid, "organization": org, "provider": org, "publicName": name, "name": f"{org}/{name}",
           "displayName": name.replace("-", " ").title(),
           "capabilities": {"inputCapabilities": {"text": True, "image": image_in}, "outputCapabilities": out_caps},
           "userSelectable": selectable}
    if not org:              # an anonymous (battle-only) model: no organization or provider
        del row["organization"], row["provider"]
    return row


def _catalog_row(page_model, **extra):
    """A stand-in model of the page data as a catalog row (the same object plus the catalog's keys)."""
    return dict(page_model, name="stand-in/" + page_model["publicName"], displayName=page_model["publicName"],
                **extra)


def build_catalog() -> list:
    text_names = _names(_TEXT_FAMILIES)
    text_names += [("stand-in-labs", f"atlas-{k}") for k in range(1, 109 - len(text_names))]   # 108 in all
    text_caps = lambda i: {"text": True, "web": True} if i % 5 in (0, 3) else {"text": True}   # 40% web
    arenas = {a: [] for a in CATALOG_ARENAS}
    text_rows = [_row(n, org, catalog_id(f"text|{n}", 300 + i), text_caps(i), image_in=i % 3 != 0)
                 for i, (org, n) in enumerate(text_names)]
    page = {m["publicName"] + ("-old" if m["id"] == TWIN_OLD_ID else ""): m for m in PAGE_MODELS}
    arenas["text"] = list(text_rows) + [
        _row("max", "stand-in-labs", catalog_id("text|max", 420),
             {"text": True, "image": True, "search": True, "web": True}),
        _catalog_row(page["stand-in-text"]), _catalog_row(page["stand-in-twin-old"]),
        _catalog_row(page["stand-in-twin"]), _catalog_row(page["stand-in-retired"])]
    for i in (3, 15, 40, 78):           # an older selectable row of the same name: the newer one wins
        org, n = text_names[i]
        arenas["text"].append(_row(n, org, catalog_id(f"text-old|{n}", 10 + i), text_caps(i)))
    for i in (5, 60):                   # a newer row that is not selectable: the older selectable one wins
        org, n = text_names[i]
        arenas["text"].append(_row(n, org, catalog_id(f"text-new|{n}", 500 + i), {"text": True}, selectable=False))
    arenas["text"] += [_row("gpt-4.5-preview", "openai", catalog_id("text|gpt-4.5-preview", 200), {"text": True},
                            selectable=False),                  # only unselectable rows: not offered
                       _row("anonymous-1021", "", catalog_id("text|anon1", 450), {"text": True}, selectable=False),
                       _row("anonymous-1107", "", catalog_id("text|anon2", 460), {"text": True}, selectable=False)]
    # document: most text rows again (same objects, same ids), the stand-in's text model, three of its own
    arenas["document"] = text_rows[:96] + [_catalog_row(page["stand-in-text"])] + [
        _row(n, org, catalog_id(f"document|{n}", 380 + i), {"text": True}) for i, (org, n) in enumerate(_names(_DOCUMENT_ONLY))]
    # code: 80 text models with ids of their own, six code-only models, an older twin, an unselectable row
    arenas["code"] = [_row(n, org, catalog_id(f"code|{n}", 320 + i), {"text": True, "web": True})
                      for i, (org, n) in enumerate(text_names[:80])]
    arenas["code"] += [_row(n, org, catalog_id(f"code|{n}", 400 + i), {"text": True, "web": True})
                       for i, (org, n) in enumerate(_names(_CODE_ONLY))]
    org, n = text_names[11]
    arenas["code"].append(_row(n, org, catalog_id(f"code-old|{n}", 1), {"text": True, "web": True}))
    org, n = text_names[12]
    arenas["code"].append(_row(n, org, catalog_id(f"code-new|{n}", 600), {"text": True, "web": True},
                               selectable=False))
    # search: the stand-in's search model (here only), ten text models, search-only models, an older twin
    arenas["search"] = [_catalog_row(page["stand-in-search"])]
    arenas["search"] += [_row(n, org, catalog_id(f"search|{n}", 340 + i), {"text": True, "search": True})
                         for i, (org, n) in enumerate(text_names[:40:4])]
    arenas["search"] += [_row(n, org, catalog_id(f"search|{n}", 360 + i), {"text": True, "search": True})
                         for i, (org, n) in enumerate(_names(_SEARCH_ONLY))]
    org, n = _names(_SEARCH_ONLY)[0]
    arenas["search"].append(_row(n, org, catalog_id(f"search-old|{n}", 2), {"text": True, "search": True}))
    # text-to-image: the stand-in's image model, six text models, image models, twins
    image_caps = {"image": {"aspectRatios": ["1:1", "16:9", "9:16"]}}
    arenas["text-to-image"] = [_catalog_row(page["stand-in-image"])]
    arenas["text-to-image"] += [_row(n, org, catalog_id(f"image|{n}", 350 + i), {"text": True, "image": True})
                                for i, (org, n) in enumerate(text_names[:6])]
    image_names = _names(_IMAGE_FAMILIES)
    arenas["text-to-image"] += [_row(n, org, catalog_id(f"image|{n}", 250 + i), image_caps, image_in=i % 2 == 0)
                                for i, (org, n) in enumerate(image_names)]
    org, n = image_names[0]
    arenas["text-to-image"].append(_row(n, org, catalog_id(f"image-old|{n}", 3), image_caps))
    org, n = image_names[1]
    arenas["text-to-image"].append(_row(n, org, catalog_id(f"image-new|{n}", 700), image_caps, selectable=False))
    # text-to-video
    video_caps = {"video": {"durations": [5, 8], "audio": False}}
    arenas["text-to-video"] = [_row(n, org, catalog_id(f"video|{n}", 260 + i), video_caps)
                               for i, (org, n) in enumerate(_names(_VIDEO_FAMILIES))]
    catalog = []
    for arena in CATALOG_ARENAS:
        rows = [dict(r, rank=i + 1) for i, r in enumerate(arenas[arena])]
        catalog.append({"arena": arena, "models": rows})
    return catalog


CATALOG = build_catalog()


def catalog_flattened(catalog=None) -> list:
    """The catalog as the tab reports it (PROTOCOL 1): each row unmodified plus "arena"."""
    return [dict(row, arena=group["arena"]) for group in (CATALOG if catalog is None else catalog)
            for row in group["models"]]


def catalog_models_json(catalog=None) -> dict:
    """The models.json entries the catalog must give by the naming rule of PROTOCOL 2.8, worked out here
    independently of bridge.py (compare with bridge.page_model_entries(catalog_flattened()))."""
    catalog = CATALOG if catalog is None else catalog
    newest = {}                                   # name -> {arena: id of its newest selectable row there}
    for group in catalog:
        for row in group["models"]:
            if row.get("userSelectable") is False:
                continue
            ids = newest.setdefault(row["publicName"], {})
            if group["arena"] not in ids or row["id"] > ids[group["arena"]]:   # UUIDv7s sort by time
                ids[group["arena"]] = row["id"]
    order = [group["arena"] for group in catalog]

    def value(mid, modality):
        return mid if modality == "chat" else f"{mid}:{modality}"
    out = {}
    for name, ids in newest.items():
        arenas = [a for a in order if a in ids]
        plain = "text" if "text" in ids else arenas[0]
        out[name] = value(ids[plain], ARENA_MODALITY[plain])
        for arena in arenas:
            modality = ARENA_MODALITY[arena]
            if modality != ARENA_MODALITY[plain]:
                out.setdefault(f"{name}:{modality}", value(ids[arena], modality))
    return out


def _accepted_models():
    """model id -> (selectable, modalities it may be asked with): page data and catalog alike."""
    out = {m["id"]: (m["userSelectable"], {MODALITY[m["id"]]}) for m in PAGE_MODELS}
    for group in CATALOG:
        for row in group["models"]:
            selectable, modalities = out.get(row["id"], (row["userSelectable"], set()))
            out[row["id"]] = (selectable, modalities | {ARENA_MODALITY[group["arena"]]})
    return out


ACCEPTED_MODELS = _accepted_models()
ROUTER_ID = next(r["id"] for r in CATALOG[0]["models"] if r["publicName"] == "max")


# -- A long multi-lane answer shaped like the real capture (PROTOCOL 2.6) -------------------------------
_TEXT_BITS = ("Here is ", "the page ", "you asked for: ", "a **landing page** ", "with a hero section, ",
              'some "quotes", ', "a back\\slash, ", "tabs\tand\nnew lines, ", "emoji 😀🚀 ", "a family 👩‍👩‍👧 ",
              "flags 🇫🇷🇯🇵 ", "CJK 你好，世界 ", "日本語のテキスト ", "한국어 문장 ", "math ∑ x² ≤ ∞ ",
              "accents é à ü ß ", "a clef 𝄞 ", "</script> ", 'code `x = {"a": [1, 2]}` ', "done. ")
_REASONING_BITS = ("Let me think. ", "The user wants a page; ", "I'll use flexbox. ", "Check: 17*3 = 51. ",
                   "Ünïcödé in thoughts 🤔 ", "考虑布局。 ", 'quote " and \\ too. ', "Next step.\n")


def _source_file(rnd, n_lines):
    lines_ = ['<!doctype html>', '<html lang="en"><head><meta charset="utf-8">',
              '<style>body { font: 16px/1.5 "Inter", sans-serif; } .hero::after { content: "\\2014"; }</style>']
    for i in range(n_lines):
        lines_.append(rnd.choice((
            f'  <p class="row-{i}">Zeile {i}: “smart quotes” and \'single\' — 你好 {i} 😀</p>',
            f'  <script>const s{i} = "tab\\tand\\nnewline"; console.log(s{i}.split("\\n"));</script>',
            f'  <div data-json=\'{{"k": "v{i}", "n": [{i}, {i + 1}]}}\'>C:\\\\path\\\\{i}</div>',
            f'  <!-- step {i}: \\u00e9 stays literal here, 🇯🇵 too -->')))
    return "\n".join(lines_ + ["</html>"]) + "\n"


def _lane_events(lane, rnd, rounds):
    """One participant's rows, in order: [(code, value, ascii_only)]; its text and reasoning."""
    ev, text, reasoning = [], [], []
    ev.append(("f", {"messageId": str(uuid.UUID(int=rnd.getrandbits(128)))}, False))
    for _ in range(rnd.randint(8, 14)):
        bit = rnd.choice(_REASONING_BITS)
        ev.append(("g", bit, rnd.random() < 0.25))
        reasoning.append(bit)
    ev.append(("2", [{"type": "heartbeat"}], False))
    for r in range(rounds):
        for _ in range(rnd.randint(6, 16)):
            bit = rnd.choice(_TEXT_BITS)
            ev.append(("0", bit, rnd.random() < 0.25))   # a quarter with \uXXXX escapes (surrogate pairs too)
            text.append(bit)
        call = f"call_{lane}{r}_{rnd.getrandbits(32):08x}"
        path = f"src/page_{r}.html"
        ev.append(("9", {"toolCallId": call, "toolName": "create_file",
                         "args": {"path": path, "content": _source_file(rnd, rnd.randint(12, 30))}}, rnd.random() < 0.3))
        ev.append(("2", [{"type": "heartbeat"}], False))
        ev.append(("a", {"toolCallId": call, "result": {"ok": True, "path": path, "bytes": rnd.randint(500, 4000)}},
                   False))
        ev.append(("2", [{"type": "webdev", "status": "building", "sandboxId": f"sbx-{lane}-{r}",
                          "files": [path], "note": "构建中 ⏳"}], False))
        ev.append(("e", {"finishReason": "tool-calls", "isContinued": True}, False))
        ev.append(("f", {"messageId": str(uuid.UUID(int=rnd.getrandbits(128)))}, False))
    ev.append(("2", [{"type": "webdev", "status": "ready", "url": f"https://sandbox.example/{lane}/index.html"}], False))
    ev.append(("e", {"finishReason": "stop", "isContinued": False}, False))
    ev.append(("d", {"finishReason": "stop", "usage": {"promptTokens": 1234, "completionTokens": 20000}}, False))
    return ev, "".join(text), "".join(reasoning)


@functools.lru_cache(maxsize=4)
def long_capture(target_chars=97_000):
    """-> (text, lane A's text, lane A's reasoning): a battle/webdev answer of about `target_chars`
    characters shaped like the real 2026-08 capture (PROTOCOL 2.6): lanes a and b interleaved, text
    (a0/b0), reasoning (ag/bg), tool calls and results (a9/aa, b9/ba), data rows (a2/b2: webdev and
    heartbeats), step and finish rows (af/bf, ae/be, ad/bd), every row ending with a newline; unicode
    (emoji, ZWJ sequences, flags, CJK) and escapes (\\" \\\\ \\n \\t \\uXXXX, surrogate pairs) in strings."""
    for rounds in range(4, 200):
        rnd = random.Random(2608)
        lanes = {lane: _lane_events(lane, rnd, rounds) for lane in "ab"}
        queues = {lane: list(lanes[lane][0]) for lane in "ab"}
        rows = []
        while queues["a"] or queues["b"]:
            lane = rnd.choice([x for x in "ab" if queues[x]])
            for _ in range(rnd.randint(1, 3)):
                if queues[lane]:
                    code, value, ascii_only = queues[lane].pop(0)
                    rows.append(f"{lane}{code}:{json.dumps(value, ensure_ascii=ascii_only)}\n")
        text = "".join(rows)
        if len(text) >= target_chars:
            return text, lanes["a"][1], lanes["a"][2]
    raise ValueError("target_chars too large")


def _is_prime(n):
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def prime_cuts(data: bytes) -> list:
    """Chunk boundaries for `data`, every one a prime byte offset: spread over the body in uneven steps,
    plus cuts inside a 4-byte and a 3-byte UTF-8 sequence, inside a \\" and a \\uXXXX escape and between
    a row's lane letter and its code (when the body has them)."""
    cuts = {0, len(data)}
    steps, pos, k = (251, 997, 1499, 2003, 101, 3001, 7), 0, 0
    while True:
        pos += steps[k % len(steps)]
        k += 1
        while pos < len(data) and not _is_prime(pos):
            pos += 1
        if pos >= len(data):
            break
        cuts.add(pos)
    for pattern, inside in ((re.compile(rb"[\xf0-\xf4][\x80-\xbf]{3}"), (1, 2, 3)),
                            (re.compile(rb"[\xe0-\xef][\x80-\xbf]{2}"), (1, 2)),
                            (re.compile(rb'\\"'), (1,)), (re.compile(rb"\\u[0-9a-fA-F]{4}"), (1, 2, 3, 4, 5)),
                            (re.compile(rb"\n[ab][0-9a-z]:"), (2,))):
        cut = next((m.start() + i for m in pattern.finditer(data) for i in inside if _is_prime(m.start() + i)), None)
        if cut is not None:
            cuts.add(cut)
    return sorted(cuts)

IMMUTABLE = {"Cache-Control": "max-age=31536000, immutable"}   # a hashed script URL never changes
UUID7_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
ACTIONS = ("generateUploadUrl", "getSignedUrl", "archiveEvaluationSession", "deleteEvaluationSession")

ANSWER = "Hello wörld 😀!"
ROWS_A = 'a0:"Hello "\na0:"wörld"\na0:" 😀!"\nad:{"finishReason":"stop"}\n'.encode()
IMAGE_URL = STORAGE + "/generated/cat.png"
IMAGE_ROWS = ('a2:[{"type":"heartbeat"}]\n'
              f'a2:[{{"type":"image","image":"{IMAGE_URL}","mimeType":"image/png"}}]\n'
              'ad:{"finishReason":"stop"}\n').encode()
SOURCE = {"id": "s1", "url": "https://example.org/paris", "title": "Paris - Wikipedia"}
SEARCH_ROWS = ('a0:"Paris is the capital of France."\n'
               + "ac:" + json.dumps({"toolCallId": "citation-source",
                                     "argsTextDelta": json.dumps({"source": SOURCE})}) + "\n"
               + 'ad:{"finishReason":"stop"}\n').encode()


def cut_points(data: bytes) -> list:
    """Chunk boundaries inside a row, inside "ö" and inside "😀" (the tab must reassemble them)."""
    o, smile = data.index("ö".encode()), data.index("😀".encode())
    return sorted({0, 5, o + 1, smile + 2, len(data) - 3, len(data)})


def retry_path() -> str:
    """The retry endpoint (PROTOCOL 2.4) of some conversation."""
    return f"/nextjs-api/stream/retry-evaluation-session-message/{uuid7()}/messages/{uuid7()}"


def uuid7() -> str:
    ms = int(time.time() * 1000)
    value = (ms << 80) | (0x7 << 76) | (secrets.randbits(12) << 64) | (0b10 << 62) | secrets.randbits(62)
    return str(uuid.UUID(int=value))


def tiny_png(rgb: tuple) -> bytes:
    """A valid 1x1 PNG of one colour (different colours: different files for the upload cache)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"\x00" + bytes(rgb)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


TINY_GIF = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# -- The stand-in's page ------------------------------------------------------------------------------

FAKE_GRECAPTCHA = """
window.__mints = []; window.__mintDelayMs = 0;
(function () {
  // Tokens name key, action, a counter and this page load (a reloaded page counts from 0 again).
  let n = 0; const widgets = [], load = Math.random().toString(36).slice(2, 10);
  window.grecaptcha = {enterprise: {
    ready(cb) { setTimeout(cb, 1); },
    execute(keyOrWidget, opts) {
      if (typeof keyOrWidget === 'string') {   // v3: a token for key + action
        const i = ++n, action = opts && opts.action;
        window.__mints.push({kind: 'v3', key: keyOrWidget, action, n: i, at: Date.now()});
        const token = ['v3', keyOrWidget, action, i, load].join('.');
        return new Promise((r) => setTimeout(() => r(token), window.__mintDelayMs));
      }
      const w = widgets[keyOrWidget];            // v2: an invisible widget's callback gets the token
      if (!w) return Promise.reject(new Error('no such widget'));
      const i = ++n;
      window.__mints.push({kind: 'v2', key: w.sitekey, size: w.size, n: i, at: Date.now()});
      setTimeout(() => w.callback(['v2', w.sitekey, i, load].join('.')), window.__mintDelayMs);
      return Promise.resolve();
    },
    render(el, params) { widgets.push(params); return widgets.length - 1; },
  }};
})();
"""

# The site's own client: sends create-evaluation the way the site does (2026: with
# forceLowRecaptchaScore and secrets next to the token, PROTOCOL 2.2), with whatever fields the site's
# current build adds (from /_site/config), through window.fetch (the userscript's wrapper).
SITE_CLIENT = """
function uuidv7() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  let ms = Date.now();
  for (let i = 5; i >= 0; i--) { b[i] = ms % 256; ms = Math.floor(ms / 256); }
  b[6] = (b[6] & 0x0f) | 0x70; b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return h.slice(0, 8) + '-' + h.slice(8, 12) + '-' + h.slice(12, 16) + '-' + h.slice(16, 20) + '-' + h.slice(20);
}
window.__sendLikeTheSite = async function (text) {
  const config = await (await fetch('/_site/config')).json();
  const token = await grecaptcha.enterprise.execute(config.siteKey, {action: 'chat_submit'});
  const body = Object.assign({id: uuidv7(), mode: 'direct-battle', modelAId: 'TEXT_ID',
    userMessageId: uuidv7(), modelAMessageId: uuidv7(), modelBMessageId: uuidv7(),
    userMessage: {content: text, experimental_attachments: [], metadata: {}}, modality: 'chat',
    recaptchaV3Token: token}, config.siteFields, config.extraFields);
  const r = await fetch('/nextjs-api/stream/create-evaluation', {method: 'POST', body: JSON.stringify(body),
    headers: {'Content-Type': 'text/plain;charset=UTF-8', 'X-Stand-In-Client': 'page'}});
  return [r.status, await r.text()];
};
"""


class StandIn(ThreadingHTTPServer):
    """Today's LMArena, as far as the tab can tell. Switches (attributes, reset by `reset`):
    - dialect ("A"/"B"), refuse_v3, required_field, retry_after (of the "please 429" answer).
    - extra_fields: what the page's own client adds to its create-evaluation (a field to learn);
      site_fields: what it sends beside its token, like the real site in 2026 (forceLowRecaptchaScore:
      true, secrets). `send_like_the_site(page, ...)` makes the page send one.
    - catalog, catalog_status: GET /nextjs-api/model-catalog answers `catalog` (default CATALOG) with
      200, or 404 (an HTML not-found page), 500 (JSON error), "html" (200 with an HTML page), another
      status (e.g. 503: that status with the catalog as the body; a stale copy must not be used).
    - budget_remaining, budget_reset (seconds), budget_limit: stream answers carry `ratelimit: limit=L,
      remaining=R, reset=S` and `ratelimit-policy: L;w=300` (PROTOCOL 2.9); each accepted request takes
      one (the retry endpoint's too); with none left a create-/post-to-evaluation answers 429 {"error":
      "Too Many Requests"} with those headers and Retry-After = budget_reset.
    - dropped (set of conversation ids), drop_all: post-to-evaluation of such a conversation answers
      404 {"error": "Evaluation session not found"} (the server dropped it).
    - lost_session: stream endpoints answer 401 {"message": "User not found"} (the page's cookies are
      gone). Any /api/* route answers 403 {"error": "Route not allowed"}, always.
    - routes ({model id: routed model name}): that model's text answer starts with the data row
      `a2:[{"type":"routed_model","model":"<name>"}]` (a router such as "max", ROUTER_ID, naming the
      model it picked), then the usual rows.
    - long_answer: text answers are long_capture()[0], cut at prime_cuts() (odd sizes that split UTF-8
      sequences and escapes).
    - token_field_v3, token_field_v2: the body fields the token must arrive in (a renamed field).
    A tab request carrying forceLowRecaptchaScore or secrets anywhere is noted in `problems`.
    `rotate_site_key()` and `deploy()` change the site for good, as on the real one."""
    daemon_threads = True

    def __init__(self, certfile, keyfile):
        super().__init__(("127.0.0.1", 0), ArenaHandler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certfile, keyfile)
        # The handshake happens in the handler's thread: a slow client never blocks accept().
        self.socket = ctx.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        self.port = self.server_address[1]
        self.lock = threading.Lock()
        self.key_number = 1
        self.build = 1
        # What the stand-in saw
        self.requests = []          # stream requests: {"path", "headers", "raw", "body", "status", "client", "at"}
        self.problems = []
        self.actions = []           # server action calls: (name or None, id, args, status)
        self.uploads = {}           # key -> (name, mime, bytes or None until the PUT)
        self.signed = {}            # signed URL -> key
        self.conversations = {}     # id -> {"model", "modality", "mode", "turns": [content, ...]}
        self.archived, self.deleted = [], []
        self.seen_ids, self.used_tokens = set(), set()
        self.rsc_fetches = []       # paths fetched with "RSC: 1"
        self.catalog_fetches = []   # {"cookie": the auth cookie came along, "status"} per catalog request
        self.challenges = 0
        self.challenge_pending = False
        self.aborted = threading.Event()
        self.reset()

    def handle_error(self, request, client_address):
        """Chromium drops connections at will (and refuses the self-signed certificate once before
        ignore_https_errors applies): only unexpected errors are worth a traceback."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def reset(self):
        self.dialect = "A"
        self.refuse_v3 = False
        self.required_field = None
        self.extra_fields = {}
        self.retry_after = 1
        self.site_fields = {"forceLowRecaptchaScore": True,
                            "secrets": {"turnstileToken": "0.stand-in-secret", "sessionKey": "do-not-copy"}}
        self.catalog = CATALOG
        self.catalog_status = 200
        self.budget_limit = 1800
        self.budget_remaining = 1800
        self.budget_reset = 240
        self.dropped = set()
        self.drop_all = False
        self.lost_session = False
        self.routes = {}
        self.long_answer = False
        self.token_field_v3 = "recaptchaV3Token"
        self.token_field_v2 = "recaptchaV2Token"
        self.aborted.clear()

    def budget_headers(self) -> dict:
        return {"ratelimit": f"limit={self.budget_limit}, remaining={self.budget_remaining}, reset={self.budget_reset}",
                "ratelimit-policy": f"{self.budget_limit};w=300"}

    # -- switches that change the site for good --
    @property
    def site_key(self):
        return site_key(self.key_number)

    def rotate_site_key(self):
        self.key_number += 1

    def deploy(self):
        self.build += 1

    def action_id(self, name, build=None):
        return hashlib.sha256(f"{name}@{build or self.build}".encode()).hexdigest()[:42]

    def action_name(self, action_id):
        return next((n for n in ACTIONS if self.action_id(n) == action_id), None)

    def tab_requests(self, path_part="/nextjs-api/stream/"):
        """The stream requests the tab (not the page's own client) sent."""
        return [r for r in self.requests if r["client"] == "tab" and path_part in r["path"]]

    # -- judging a create-evaluation / post-to-evaluation request (PROTOCOL 2.2, 2.3, 2.5) --
    def judge(self, rec, conv_id, headers):
        """-> (status, content type, body bytes, extra headers) for an error, or ("stream", kind)."""
        body = rec["body"]
        if rec["client"] == "tab":
            for name in sorted(keys_anywhere(body) & {"forceLowRecaptchaScore", "secrets"}):
                self.problems.append(f"the tab sent {name}")
        if self.lost_session:
            return json_error(401, {"message": "User not found"})
        if headers.get("Content-Type") != "text/plain;charset=UTF-8":
            self.problems.append(f"content type {headers.get('Content-Type')!r}")
            return json_error(400, {"error": "Unsupported content type"})
        if not isinstance(body, dict):
            return zod_error([{"path": [], "message": "Expected object"}])
        content = body.get("userMessage", {}).get("content") if isinstance(body.get("userMessage"), dict) else None
        content = content if isinstance(content, str) else ""
        if "cloudflare" in content and "cf_clearance=" not in headers.get("Cookie", ""):
            self.challenges += 1
            self.challenge_pending = True
            return (403, "text/html; charset=utf-8", b"<!DOCTYPE html><html><head><title>Just a moment...</title>"
                    b"</head><body>Enable JavaScript and cookies to continue</body></html>",
                    {"cf-mitigated": "challenge"})
        if "arena-auth-prod-v1.0=" not in headers.get("Cookie", ""):
            return json_error(401, {"error": "auth token has expired"})
        if self.budget_remaining <= 0:
            return json_error(429, {"error": "Too Many Requests"},
                              dict(self.budget_headers(), **{"Retry-After": str(self.budget_reset)}))
        issues = []
        required = ["id", "mode", "modelAId", "userMessageId", "modelAMessageId", "userMessage", "modality"]
        if self.required_field:
            required.append(self.required_field)
        issues += [{"path": [f], "message": "Required"} for f in required if f not in body]
        um = body.get("userMessage")
        if isinstance(um, dict):
            for f, kind in (("content", str), ("experimental_attachments", list), ("metadata", dict)):
                if not isinstance(um.get(f), kind):
                    got = "null" if um.get(f) is None and f in um else type(um.get(f)).__name__
                    issues.append({"path": ["userMessage", f],
                                   "message": f"Expected {kind.__name__}, received {got}"})
        elif "userMessage" in body:
            issues.append({"path": ["userMessage"], "message": "Expected object"})
        if issues:
            return zod_error(issues)
        id_fields = ([] if conv_id else ["id"]) + ["userMessageId", "modelAMessageId"]
        id_fields += ["modelBMessageId"] if "modelBMessageId" in body else []
        for f in id_fields:
            if not isinstance(body[f], str) or not UUID7_RE.fullmatch(body[f]):
                return json_error(400, {"error": f"Invalid {f}: not a UUIDv7"})
            if body[f] in self.seen_ids:
                return json_error(400, {"error": f"Duplicate {f}: {body[f]}"})
        if conv_id is None and body["mode"] == "direct":
            return json_error(400, {"error": "'direct' mode is not allowed when starting a new conversation"})
        if body["mode"] not in ("direct-battle", "side-by-side", "battle", "direct"):
            return zod_error([{"path": ["mode"], "message": "Invalid enum value"}])
        selectable, modalities = ACCEPTED_MODELS.get(body["modelAId"], (None, ()))
        if selectable is False:
            return json_error(400, {"error": "Selected model is not available for user selection"})
        if body["modality"] not in modalities:
            return json_error(400, {"error": "Chosen Model(s) are no longer available"})
        for a in um["experimental_attachments"]:
            if not (isinstance(a, dict) and a.get("url") in self.signed and a.get("name") and a.get("contentType")):
                return json_error(400, {"error": "Invalid attachment: upload it first"})
        conv = None
        if conv_id is not None:
            conv = self.conversations.get(conv_id)
            if conv is None or conv_id in self.dropped or self.drop_all:
                return json_error(404, {"error": "Evaluation session not found"})
            if body["mode"] != conv["mode"]:
                return json_error(400, {"error": f"Bad next turn request in Battles in {body['mode']} mode"})
            if body["id"] != conv_id or body["modelAId"] != conv["model"] or body["modality"] != conv["modality"]:
                return json_error(400, {"error": "Bad next turn request"})
        token_ok = self.check_token(body)
        if not token_ok:
            return json_error(403, {"error": "recaptcha validation failed"})
        with self.lock:
            self.seen_ids.update(body[f] for f in id_fields)
            if conv is None:
                self.conversations[body["id"]] = {"model": body["modelAId"], "modality": body["modality"],
                                                  "mode": body["mode"], "turns": [content]}
            else:
                conv["turns"].append(content)
        if "please 429" in content:
            return json_error(429, {"error": "Too Many Requests"},
                              dict(self.budget_headers(), **{"Retry-After": str(self.retry_after)}))
        with self.lock:
            self.budget_remaining -= 1
        if "slow" in content:
            return ("stream", "slow")
        return ("stream", {"image": "image", "search": "search"}.get(body["modality"], "text"))

    def check_token(self, body) -> bool:
        v2, v3 = body.get(self.token_field_v2), body.get(self.token_field_v3)
        with self.lock:
            if v2 is not None:
                ok = isinstance(v2, str) and v2.startswith(f"v2.{V2_KEY}.") and v2 not in self.used_tokens
                token = v2
            else:
                parts = v3.split(".") if isinstance(v3, str) else []
                ok = (len(parts) == 5 and parts[0] == "v3" and parts[1] == self.site_key
                      and parts[2] == "chat_submit" and v3 not in self.used_tokens and not self.refuse_v3)
                token = v3
            if ok:
                self.used_tokens.add(token)
        return ok


def keys_anywhere(value) -> set:
    """Every key of every object in a JSON value, at any depth."""
    if isinstance(value, dict):
        return set(value).union(*(keys_anywhere(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(keys_anywhere(v) for v in value))
    return set()


def send_like_the_site(page, arena, text="hello from the page", extra_fields=None) -> tuple:
    """The page itself sends create-evaluation as the site does when the user sends a message
    (PROTOCOL 2.2): ids, a v3 token, `arena.site_fields` (forceLowRecaptchaScore: true, secrets) and
    `extra_fields` (default NEW_FIELD: a field the tab should learn) -> (status, answer text)."""
    arena.extra_fields = dict(NEW_FIELD if extra_fields is None else extra_fields)
    return tuple(page.evaluate("(t) => __sendLikeTheSite(t)", text))


NEW_FIELD = {"newRequiredField": {"x": 1}}


def json_error(status, obj, headers=None):
    return (status, "application/json", json.dumps(obj).encode(), headers or {})


def zod_error(issues):
    return json_error(400, {"success": False, "error": {"name": "ZodError", "issues": issues}})


class ArenaHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        try:
            self.request.do_handshake()
        except (OSError, ssl.SSLError):
            self.request.close()
            raise
        super().setup()

    def log_message(self, *args):
        pass

    def read_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status, ctype, body, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def path_only(self):
        return self.path.split("?", 1)[0]

    # -- GET: pages, scripts, the RSC payload, the site's config --
    def do_GET(self):
        srv, path = self.server, self.path_only()
        if path.startswith("/api/"):
            return self.route_not_allowed()
        if path == "/nextjs-api/model-catalog":
            return self.model_catalog()
        m = re.fullmatch(r"/static/app\.js\?v=(\d+)", self.path)
        if m:      # the site keys live only in this script file; a new key is a new file (URL)
            key = site_key(int(m.group(1)))
            js = (f'function warmUp() {{ return grecaptcha.enterprise.execute("{key}", {{action: "page_load"}}); }}\n'
                  f'function renderInvisibleCheck(el, cb) {{ return grecaptcha.enterprise.render(el, '
                  f'{{sitekey: "{V2_KEY}", size: "invisible", callback: cb}}); }}\n'
                  + SITE_CLIENT.replace("TEXT_ID", TEXT_ID))
            return self.reply(200, "application/javascript", js.encode(), IMMUTABLE)
        m = re.fullmatch(r"/_next/static/chunks/app-page-(\d+)\.js", path)
        if m:                                # old builds stay on the CDN, as on the real site
            build = int(m.group(1))
            refs = ",".join(f'{chr(97 + i)}=(0,r.createServerReference)("{srv.action_id(n, build)}",r.callServer,'
                            f'void 0,r.findSourceMapURL,"{n}")' for i, n in enumerate(ACTIONS))
            js = ('(self.webpackChunk_N_E=self.webpackChunk_N_E||[]).push([[7001],{4242:(e,t,n)=>{"use strict";'
                  f'var r=n(5555);let {refs};}}}}]);')
            return self.reply(200, "application/javascript", js.encode(), IMMUTABLE)
        if path == "/_site/config":
            body = json.dumps({"siteKey": srv.site_key, "extraFields": srv.extra_fields,
                               "siteFields": srv.site_fields}).encode()
            return self.reply(200, "application/json", body)
        if path in ("/", "/text/direct", "/leaderboard") or path.startswith("/c/"):
            with_models = path != "/leaderboard"
            if self.headers.get("RSC") == "1":
                srv.rsc_fetches.append(path)
                rows = '0:["$","$L1",null,{}]\n' + (flight_row() if with_models else '1:["$","div",null,{}]\n')
                return self.reply(200, "text/x-component", rows.encode())
            cookies = ["arena-auth-prod-v1.0=base64-stand-in-session; Path=/; Secure; SameSite=Lax"]
            if srv.challenge_pending:        # loading the page again passes the Cloudflare check
                srv.challenge_pending = False
                cookies.append("cf_clearance=passed; Path=/; Secure; SameSite=None")
            body = page_html(srv, with_models)
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for c in cookies:
                self.send_header("Set-Cookie", c)
            self.end_headers()
            self.wfile.write(body)
            return
        return self.reply(404, "text/plain", b"not found")

    def route_not_allowed(self):
        return self.reply(403, "application/json", b'{"error":"Route not allowed"}')

    def model_catalog(self):
        srv = self.server
        status = srv.catalog_status
        srv.catalog_fetches.append({"cookie": "arena-auth-prod-v1.0=" in self.headers.get("Cookie", ""),
                                    "status": status})
        if status == 200:
            return self.reply(200, "application/json", json.dumps(srv.catalog).encode(), {"Cache-Control": "no-store"})
        if status == "html":
            return self.reply(200, "text/html; charset=utf-8", b"<!doctype html><title>LMArena</title><p>Sign in")
        if status == 404:
            return self.reply(404, "text/html; charset=utf-8", b"<!doctype html><h1>404</h1>This page could not be found.")
        if status == 500:
            return self.reply(500, "application/json", b'{"error":"Internal Server Error"}')
        # another error status with a body that looks usable (a stale copy): the status decides
        return self.reply(int(status), "application/json", json.dumps(srv.catalog).encode())

    # -- POST: server actions (any page path with Next-Action) and the stream endpoints --
    def do_POST(self):
        path = self.path_only()
        if path.startswith("/api/"):
            self.read_body()
            return self.route_not_allowed()
        if self.headers.get("Next-Action"):
            return self.server_action(self.headers["Next-Action"], self.read_body())
        if path == "/nextjs-api/stream/create-evaluation":
            return self.evaluation(None)
        m = re.fullmatch(r"/nextjs-api/stream/post-to-evaluation/([0-9a-f-]{36})", path)
        if m:
            return self.evaluation(m.group(1))
        self.read_body()
        return self.reply(404, "text/plain", b"not found")

    def evaluation(self, conv_id):
        srv = self.server
        raw = self.read_body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        rec = {"path": self.path, "headers": dict(self.headers), "raw": raw, "body": body, "status": None,
               "client": "page" if self.headers.get("X-Stand-In-Client") == "page" else "tab",
               "at": time.time()}   # when it arrived (bench.py --preminting measures up to here)
        srv.requests.append(rec)
        verdict = srv.judge(rec, conv_id, self.headers)
        if verdict[0] != "stream":
            rec["status"] = verdict[0]
            return self.reply(*verdict)
        rec["status"] = 200
        kind = verdict[1]
        budget = srv.budget_headers()
        if kind == "slow":
            return self.stream_slowly(budget)
        if kind == "image":
            return self.stream(IMAGE_ROWS, [0, len(IMAGE_ROWS) // 2, len(IMAGE_ROWS)], budget)
        if kind == "search":
            return self.stream(SEARCH_ROWS, [0, 40, len(SEARCH_ROWS)], budget)
        if srv.long_answer:
            data = long_capture()[0].encode()
            return self.stream(data, prime_cuts(data), budget, pause=0.002)
        rows = ROWS_A
        routed = srv.routes.get(body["modelAId"])
        if routed:
            rows = f'a2:{json.dumps([{"type": "routed_model", "model": routed}], separators=(",", ":"))}\n'.encode() + rows
        if srv.dialect == "B":   # no delimiters, after an object that echoes the request
            echo = json.dumps({"id": body["id"], "mode": body["mode"], "userMessage": {"content": "..."}})
            data = echo.encode() + rows.replace(b"\n", b"")
            return self.stream(data, cut_points(data), budget)
        return self.stream(rows, cut_points(rows), budget)

    def start_chunked(self, headers=None):
        """A 200 with a chunked text body, as the site's stream endpoints answer."""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def stream(self, data, cuts, headers=None, pause=0.03):
        self.start_chunked(headers)
        for a, b in zip(cuts, cuts[1:]):
            piece = data[a:b]
            self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            self.wfile.flush()
            time.sleep(pause)
        self.wfile.write(b"0\r\n\r\n")

    def stream_slowly(self, headers=None):
        self.start_chunked(headers)
        try:
            for i in range(200):
                piece = f'a0:"tick {i} "\n'.encode()
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                self.wfile.flush()
                time.sleep(0.05)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:          # the tab aborted its fetch (broken pipe, reset, TLS EOF)
            self.server.aborted.set()

    def server_action(self, action_id, raw):
        srv = self.server
        name = srv.action_name(action_id)
        try:
            args = json.loads(raw)
        except ValueError:
            args = None
        if name is None:
            srv.actions.append((None, action_id, args, 404))
            return self.reply(404, "text/plain", b"Server action not found.")
        if self.headers.get("Accept") != "text/x-component" or \
                self.headers.get("Content-Type") != "text/plain;charset=UTF-8" or not isinstance(args, list):
            srv.problems.append(f"server action {name}: headers or body {self.headers.get('Accept')!r} {args!r}")
        result = {"success": False, "error": "bad arguments"}
        if name == "generateUploadUrl" and isinstance(args, list) and len(args) == 2:
            key = "upl-" + secrets.token_hex(8)
            srv.uploads[key] = (args[0], args[1], None)
            result = {"success": True, "data": {"uploadUrl": f"{STORAGE}/storage/upload/{key}?X-Amz-Signature=abc",
                                                "key": key}}
        elif name == "getSignedUrl" and isinstance(args, list) and args and srv.uploads.get(args[0], [None])[-1]:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            url = f"{STORAGE}/storage/obj/{args[0]}?X-Amz-Date={stamp}&X-Amz-Expires=3600&X-Amz-Signature=def"
            srv.signed[url] = args[0]
            result = {"success": True, "data": {"url": url}}
        elif name in ("archiveEvaluationSession", "deleteEvaluationSession") and isinstance(args, list) \
                and args and args[0] in srv.conversations:
            (srv.archived if name.startswith("archive") else srv.deleted).append(args[0])
            result = {"success": True, "data": None}
        srv.actions.append((name, action_id, args, 200))
        rows = f'0:{{"a":"$@1","f":"","b":"build-{srv.build}"}}\n1:{json.dumps(result)}\n'
        return self.reply(200, "text/x-component", rows.encode())

    # -- PUT: the upload storage, and the retry endpoint (only what a Retry click sends) --
    def do_PUT(self):
        srv, path = self.server, self.path_only()
        body = self.read_body()
        if path.startswith("/api/"):
            return self.route_not_allowed()
        m = re.fullmatch(r"/storage/upload/(upl-[0-9a-f]+)", path)
        if m and m.group(1) in srv.uploads:
            name, mime, _ = srv.uploads[m.group(1)]
            if self.headers.get("Content-Type") != mime:
                srv.problems.append(f"upload content type {self.headers.get('Content-Type')!r} for {mime}")
            srv.uploads[m.group(1)] = (name, mime, body)
            return self.reply(200, "text/plain", b"", {"Access-Control-Allow-Origin": ORIGIN})
        m = re.fullmatch(r"/nextjs-api/stream/retry-evaluation-session-message/([\w-]+)/messages/([\w-]+)", path)
        if m:
            data = json.loads(body or b"{}")
            srv.requests.append({"path": self.path, "headers": dict(self.headers), "raw": body, "body": data,
                                 "status": 200, "client": "tab" if data else "page"})
            if srv.lost_session:
                srv.requests[-1]["status"] = 401
                return self.reply(401, "application/json", b'{"message":"User not found"}')
            if set(data) - {"recaptchaV3Token"}:
                return self.reply(400, "application/json", b'{"error":"stand-in: this endpoint only regenerates"}')
            with srv.lock:
                srv.budget_remaining -= 1
            return self.reply(200, "text/plain", b'a0:"regenerated"\nad:{"finishReason":"stop"}\n',
                              srv.budget_headers())
        return self.reply(404, "text/plain", b"not found")

    def do_OPTIONS(self):
        """CORS preflight of the cross-origin upload (Content-Type image/png is not a simple one)."""
        self.reply(204, "text/plain", b"", {"Access-Control-Allow-Origin": ORIGIN,
                                            "Access-Control-Allow-Methods": "PUT",
                                            "Access-Control-Allow-Headers": "content-type",
                                            "Access-Control-Max-Age": "600"})


def flight_row() -> str:
    return '1:["$","div",null,{"initialModels":' + json.dumps(PAGE_MODELS) + ',"other":1}]\n'


def page_html(srv, with_models: bool) -> bytes:
    """An LMArena-like page: the model list in two flight-data pushes (none on /leaderboard), the
    fake grecaptcha, the site keys in a same-origin script file, server actions in a chunk."""
    flight = '0:["$","$L1",null,{}]\n' + (flight_row() if with_models else "")
    half = len(flight) // 2
    pushes = "".join(f"<script>(self.__next_f=self.__next_f||[]).push([1,{json.dumps(part)}])</script>"
                     for part in (flight[:half], flight[half:]))
    return f"""<!doctype html><html><head><title>LMArena</title>
<script>{FAKE_GRECAPTCHA}</script>
<script src="/static/app.js?v={srv.key_number}"></script>
<script src="/_next/static/chunks/app-page-{srv.build}.js" async></script>
{pushes}
</head><body><h1>Stand-in arena</h1></body></html>""".encode()


# -- The world: stand-in, bridges, Chromium --------------------------------------------------------------

def make_certificate(folder: str) -> tuple:
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=arena.ai",
                    "-addext", "subjectAltName=DNS:arena.ai,DNS:*.arena.ai,DNS:blob.example.com"],
                   check=True, capture_output=True)
    return cert, key


def chromium_args(port: int) -> list:
    """Chromium sees the stand-in on `port` as https://arena.ai (and its upload storage), a public
    site to Local Network Access; every other host name fails to resolve."""
    return ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--host-resolver-rules=MAP arena.ai:443 127.0.0.1:{port},"
            f"MAP blob.example.com:443 127.0.0.1:{port},MAP * ~NOTFOUND,EXCLUDE 127.0.0.1",
            f"--ip-address-space-overrides=127.0.0.1:{port}=public"]


# Tests touch only what they start: a page of the tests may never open a socket to the port a bridge
# the user runs listens on (5102 by default), whatever its script falls back to.
NEVER_THE_USERS_BRIDGE = """(() => {
  const Native = window.WebSocket;
  window.WebSocket = function (url, protocols) {
    if (/:5102(\\/|$)/.test(String(url))) throw new Error('the tests never connect to port 5102');
    return protocols === undefined ? new Native(url) : new Native(url, protocols);
  };
  window.WebSocket.prototype = Native.prototype;
  for (const k of ['CONNECTING', 'OPEN', 'CLOSING', 'CLOSED']) window.WebSocket[k] = Native[k];
})();"""


class World:
    """One stand-in, one Chromium, a bridge with the shipped configuration and a tab connected to it
    with local network access granted, and (for LocalNetworkAccess) a second bridge whose tab is in a
    context without the permission, started early so its failures happen while other tests run."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="standin-")
        self.arena = StandIn(*make_certificate(self.dir))
        threading.Thread(target=self.arena.serve_forever, daemon=True).start()
        self.h = Harness(config={})
        self.h_blocked = Harness(config={})
        self.messages = []              # (tab name, message) of everything the tabs sent, in order
        self.stamps = []                # time.time() of each of them
        add_tab = self.h.bridge.pool.add_tab

        def spying_add_tab(tab, add_tab=add_tab):   # spy from the tab's first message on
            self.spy(tab)
            return add_tab(tab)
        self.h.bridge.pool.add_tab = spying_add_tab
        self.console, self.blocked_console = [], []
        self.client = None
        with open(os.path.join(HERE, "userscript.js"), encoding="utf-8") as f:
            self.script = f.read()
        self.pw = sync_playwright().start()
        self.browser = self.pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                               args=chromium_args(self.arena.port))
        self.context = self.new_context(self.h, grant=True)
        self.blocked_context = self.new_context(self.h_blocked, grant=False)
        self.blocked_page = self.blocked_context.new_page()
        self.blocked_page.on("console", lambda m: self.blocked_console.append(m.text))
        self.blocked_page.goto(ORIGIN + "/")
        self.page = self.open_page("/")

    def new_context(self, harness, grant):
        context = self.browser.new_context(ignore_https_errors=True)
        if grant:
            context.grant_permissions([LNA_PERMISSION], origin=ORIGIN)
        context.add_init_script(f"localStorage.setItem('lmarena-bridge-url', 'ws://127.0.0.1:{harness.port}/ws');")
        context.add_init_script(NEVER_THE_USERS_BRIDGE)
        context.add_init_script(self.script)
        return context

    def open_page(self, path):
        page = self.context.new_page()
        page.on("console", lambda m: self.console.append(m.text))
        page.goto(ORIGIN + path)
        self.wait(lambda: self.tab_at(path) is not None, 15, f"the tab at {path}")
        return page

    def tab_at(self, path):
        """The bridge's connected tab (it said hello) whose page is at `path`."""
        for tab in list(self.h.bridge.tabs):
            if tab.version and (tab.url or "").split("arena.ai", 1)[-1].split("?")[0] == path:
                return tab
        return None

    def spy(self, tab):
        """Record every message the tab sends before the bridge handles it (the bridge drops
        messages for tasks it did not start: our raw tasks)."""
        if getattr(tab, "_spied", False):
            return
        handle = tab.on_message

        def on_message(raw, handle=handle, name=tab.name):
            try:
                msg = json.loads(raw)
            except ValueError:
                msg = None
            if msg is not None:
                self.stamps.append(time.time())
                self.messages.append((name, msg))
            return handle(raw)
        tab.on_message = on_message
        tab._spied = True

    def timed_messages(self, start=0):
        return [(t, m) for t, (_, m) in zip(self.stamps[start:], self.messages[start:])]

    def wait(self, predicate, timeout=10.0, what="condition", console=None):
        wait_until(predicate, timeout, what, 0.02, lambda: f"; console: {(console or self.console)[-8:]}")

    def close(self):
        closers = [self.browser.close, self.pw.stop, self.h.close, self.h_blocked.close, self.arena.shutdown,
                   self.arena.server_close]
        if self.client is not None:
            closers.insert(0, self.client.close)
        for closer in closers:
            try:
                closer()
            except Exception:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


_world = None


def world() -> World:
    global _world
    if _world is None:
        _world = World()
    return _world


def close_world():
    """Closes the shared browser world (test modules call it from tearDownModule)."""
    global _world
    if _world is not None:
        _world.close()
        _world = None


def post_json(url, obj):
    req = urllib.request.Request(url, data=json.dumps(obj).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


SKIP_REASON = "Chromium or Playwright is not installed (apt-get install chromium; pip install playwright)"
# CI (.ci/run) sets BRIDGE_REQUIRE_BROWSER=1: there a missing browser is a failure, never a silent skip.
if os.environ.get("BRIDGE_REQUIRE_BROWSER") and (CHROMIUM is None or sync_playwright is None):
    raise RuntimeError("BRIDGE_REQUIRE_BROWSER is set but " + SKIP_REASON)


@unittest.skipIf(CHROMIUM is None or sync_playwright is None, SKIP_REASON)
class BrowserCase(unittest.TestCase):
    """Shared helpers: the world, the main tab, raw tasks sent through the real bridge's tab link."""

    @classmethod
    def setUpClass(cls):
        cls.w = world()
        cls.arena, cls.h = cls.w.arena, cls.w.h

    def setUp(self):
        self.arena.reset()
        self.page.evaluate("window.__mintDelayMs = 0")

    @property
    def page(self):
        return self.w.page

    def tab(self):
        self.w.wait(lambda: self.w.tab_at("/") is not None, 15, "the main tab")
        return self.w.tab_at("/")

    def command(self, obj, tab=None):
        tab = tab or self.tab()
        self.h.loop.call_soon_threadsafe(tab.send, obj)

    def sent(self, pred, after=0, tab=None):
        """Messages the tabs (or the tab named `tab`) sent, from index `after`, that match pred."""
        return [m for name, m in self.w.messages[after:] if pred(m) and tab in (None, name)]

    def wait_sent(self, pred, after=0, timeout=10, what="a message from the tab", tab=None):
        self.w.wait(lambda: self.sent(pred, after, tab), timeout, what)
        return self.sent(pred, after, tab)[0]

    def raw_task(self, request, wait=True, timeout=15):
        """Send one task straight to the tab (the bridge does not know it) and wait for its end ->
        (request id, index of the first message to look at)."""
        rid = str(uuid.uuid4())
        start = len(self.w.messages)
        self.command({"request_id": rid, "payload": {
            "message_templates": [], "target_model_id": None, "session_id": None, "message_id": None,
            "is_image_request": False, "request": request}})
        if wait:
            self.w.wait(lambda: any(m.get("request_id") == rid and (m.get("data") == "[DONE]" or
                                                                    isinstance(m.get("data"), dict))
                                    for m in self.sent(lambda m: True, start)), timeout, f"task {rid[:8]} to end")
        return rid, start

    def task_messages(self, rid, start=0):
        return self.sent(lambda m: m.get("request_id") == rid, start)

    @staticmethod
    def create_request(content="hi", model_id=TEXT_ID, modality="chat", attachments=(), **extra):
        body = {"id": uuid7(), "mode": "direct-battle", "modelAId": model_id, "userMessageId": uuid7(),
                "modelAMessageId": uuid7(), "modelBMessageId": uuid7(),
                "userMessage": {"content": content, "experimental_attachments": list(attachments), "metadata": {}},
                "modality": modality}
        return dict({"method": "POST", "path": "/nextjs-api/stream/create-evaluation", "body": body,
                     "recaptcha_action": "chat_submit"}, **extra)

    def client(self):
        if self.w.client is None:     # one SDK client (and its connection pool) for all tests
            self.w.client = openai.OpenAI(base_url=self.h.url + "/v1", api_key="x", max_retries=0, timeout=30)
        return self.w.client

    def ask(self, prompt, model="stand-in-text", stream=False, **kw):
        return self.client().chat.completions.create(
            model=model, stream=stream, messages=[{"role": "user", "content": prompt}], **kw)

    def last_tab_request(self):
        reqs = self.arena.tab_requests()
        self.assertTrue(reqs, "the stand-in saw no request from the tab")
        return reqs[-1]
