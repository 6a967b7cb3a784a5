"""The real userscript.js in a real headless Chromium, against a local stand-in for today's LMArena
site and a real bridge. Skipped (with the reason) only where Chromium or Playwright is absent.

How the tab sees the stand-in: as on the real site. The stand-in serves https (a throw-away
self-signed certificate made with the openssl command at start-up) and Chromium maps `arena.ai`
(and `blob.example.com`, the stand-in's upload storage) to it with `--host-resolver-rules`, so the
page's origin is `https://arena.ai`, an LMArena origin the bridge accepts without
`allowed_tab_origins`. Every other host name fails to resolve: nothing leaves the machine.

Local Network Access (what Chromium 156 with Playwright 1.65 showed when this was written):
`--ip-address-space-overrides=127.0.0.1:<stand-in port>=public` makes Chromium treat the stand-in
as a public web site, so the page's WebSocket to the bridge on ws://127.0.0.1 goes through the
Local Network Access check exactly as from the real https://arena.ai. Without the permission the
socket fails at once (console: `net::ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS`; headless answers
the permission prompt with "denied"). Playwright's permission name is "local-network-access" (it
grants CDP's localNetworkAccess / localNetwork / loopbackNetwork); `grant_permissions([...],
origin="https://arena.ai")` lets the socket through. Without the override the stand-in counts as
loopback like the bridge, and no check happens at all (the socket opens without any permission):
the override is what makes these tests honest. The main context is granted; the
LocalNetworkAccess test uses a context without the grant.

The stand-in (class StandIn) is today's site, each behaviour switchable per test through attributes:
pages with Next.js flight data (`initialModels`; none on /leaderboard; a raw RSC body for
/text/direct with `RSC: 1`), a fake `grecaptcha.enterprise` (v3 execute and v2 invisible widgets,
tokens naming key, action and a counter, a configurable delay), the site key only in a script file,
server actions in a script chunk (upload flow, archive, delete; a deploy changes their ids), the
stream endpoints validated as PROTOCOL 2.2/2.3 describe, answers in dialect A or B, and the retry
endpoint for capture only.
"""
import base64
import hashlib
import json
import os
import re
import secrets
import shutil
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

import bridge
from test_bridge import Harness, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - CI installs it
    sync_playwright = None

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

# The site's own client: sends create-evaluation the way the site does, with whatever fields the
# site's current build adds (from /_site/config), through window.fetch (the userscript's wrapper).
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
    recaptchaV3Token: token}, config.extraFields);
  const r = await fetch('/nextjs-api/stream/create-evaluation', {method: 'POST', body: JSON.stringify(body),
    headers: {'Content-Type': 'text/plain;charset=UTF-8', 'X-Stand-In-Client': 'page'}});
  return [r.status, await r.text()];
};
"""


class StandIn(ThreadingHTTPServer):
    """Today's LMArena, as far as the tab can tell. Switches (attributes, reset by `reset`):
    dialect ("A"/"B"), refuse_v3, required_field, extra_fields (what the page's own client adds),
    retry_after. `rotate_site_key()` and `deploy()` change the site for good, as on the real one."""
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
        self.aborted.clear()

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
        m = next((x for x in PAGE_MODELS if x["id"] == body["modelAId"]), None)
        if m is not None and not m["userSelectable"]:
            return json_error(400, {"error": "Selected model is not available for user selection"})
        if m is None or MODALITY[m["id"]] != body["modality"]:
            return json_error(400, {"error": "Chosen Model(s) are no longer available"})
        for a in um["experimental_attachments"]:
            if not (isinstance(a, dict) and a.get("url") in self.signed and a.get("name") and a.get("contentType")):
                return json_error(400, {"error": "Invalid attachment: upload it first"})
        conv = None
        if conv_id is not None:
            conv = self.conversations.get(conv_id)
            if conv is None:
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
            return json_error(429, {"error": "Too Many Requests"}, {"Retry-After": str(self.retry_after)})
        if "slow" in content:
            return ("stream", "slow")
        return ("stream", {"image": "image", "search": "search"}.get(body["modality"], "text"))

    def check_token(self, body) -> bool:
        v2, v3 = body.get("recaptchaV2Token"), body.get("recaptchaV3Token")
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
            body = json.dumps({"siteKey": srv.site_key, "extraFields": srv.extra_fields}).encode()
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

    # -- POST: server actions (any page path with Next-Action) and the stream endpoints --
    def do_POST(self):
        path = self.path_only()
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
        if kind == "slow":
            return self.stream_slowly()
        if kind == "image":
            return self.stream(IMAGE_ROWS, [0, len(IMAGE_ROWS) // 2, len(IMAGE_ROWS)])
        if kind == "search":
            return self.stream(SEARCH_ROWS, [0, 40, len(SEARCH_ROWS)])
        if srv.dialect == "B":   # no delimiters, after an object that echoes the request
            echo = json.dumps({"id": body["id"], "mode": body["mode"], "userMessage": {"content": "..."}})
            data = echo.encode() + ROWS_A.replace(b"\n", b"")
            return self.stream(data, cut_points(data))
        return self.stream(ROWS_A, cut_points(ROWS_A))

    def stream(self, data, cuts):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for a, b in zip(cuts, cuts[1:]):
            piece = data[a:b]
            self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            self.wfile.flush()
            time.sleep(0.03)
        self.wfile.write(b"0\r\n\r\n")

    def stream_slowly(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
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
            if set(data) - {"recaptchaV3Token"}:
                return self.reply(400, "application/json", b'{"error":"stand-in: this endpoint only regenerates"}')
            return self.reply(200, "text/plain", b'a0:"regenerated"\nad:{"finishReason":"stop"}\n')
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
        add_tab = self.h.bridge.add_tab

        def spying_add_tab(tab, add_tab=add_tab):   # spy from the tab's first message on
            self.spy(tab)
            return add_tab(tab)
        self.h.bridge.add_tab = spying_add_tab
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


def tearDownModule():
    if _world is not None:
        _world.close()


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


class TabProtocol(BrowserCase):
    """The userscript's side of the tab protocol, driven by raw tasks and commands over the bridge's
    real tab link (what the bridge does with each message is test_bridge.py's business)."""

    def test_hello_title_status_and_models_describe_the_loaded_page(self):
        """The tab says hello with its @version, shows "✅ " once, and reports status and models on request."""
        tab = self.tab()
        version = re.search(r"@version\s+(\S+)", self.w.script).group(1)
        self.assertEqual(version, re.search(r"const VERSION = '([^']+)'", self.w.script).group(1))
        self.assertEqual((tab.version, tab.url), (version, ORIGIN + "/"))
        self.assertEqual(self.page.evaluate(f"navigator.permissions.query({{name: '{LNA_PERMISSION}'}})"
                                            ".then(s => s.state)"), "granted")
        self.w.wait(lambda: self.page.title() == "✅ LMArena", what="title")
        self.page.evaluate("document.title = 'Other page'")
        self.w.wait(lambda: self.page.title() == "✅ Other page", what="title after the page changed it")
        self.page.evaluate("document.title = 'LMArena'")
        start = len(self.w.messages)
        self.command({"command": "send_models"})
        self.command({"command": "send_status"})
        models = self.wait_sent(lambda m: m.get("type") == "models", start)
        self.assertEqual(models["models"], PAGE_MODELS)
        status = self.wait_sent(lambda m: m.get("type") == "status", start)
        self.assertEqual(status["recaptcha"],
                         {"loaded": True, "site_key": self.arena.site_key, "v2_site_key": V2_KEY})
        self.assertEqual(status["actions"], dict.fromkeys(ACTIONS, True))
        self.assertIs(status["logged_in"], True)
        self.assertEqual(status["models"], {"count": len(PAGE_MODELS), "source": "page"})
        self.assertIsInstance(status["token_ready"], bool)
        self.assertIn("last_error", status)

    def test_task_events_come_before_the_exact_stream_and_no_action_means_no_token(self):
        """A task reports token_ready, then upstream_headers, then the exact text and [DONE]; without an action no token is minted."""
        rid, start = self.raw_task(self.create_request("hi there"))
        msgs = self.task_messages(rid, start)
        self.assertEqual(msgs[0], {"request_id": rid, "event": "token_ready"})
        self.assertEqual(msgs[1], {"request_id": rid, "event": "upstream_headers", "status": 200})
        self.assertEqual(msgs[-1]["data"], "[DONE]")
        self.assertEqual("".join(m["data"] for m in msgs[2:-1]), ROWS_A.decode())
        req = self.last_tab_request()
        self.assertEqual(req["status"], 200)
        self.assertEqual(req["headers"]["Content-Type"], "text/plain;charset=UTF-8")
        self.assertRegex(req["body"]["recaptchaV3Token"], rf"^v3\.{self.arena.site_key}\.chat_submit\.\d+\.\w+$")
        self.assertEqual(req["body"]["userMessage"]["content"], "hi there")
        self.assertEqual(self.arena.problems, [])

        mints = self.page.evaluate("window.__mints.length")
        request = self.create_request("no token")
        del request["recaptcha_action"]
        rid, start = self.raw_task(request)
        msgs = self.task_messages(rid, start)
        self.assertEqual([m.get("event") for m in msgs[:1]], ["upstream_headers"])
        self.assertEqual(msgs[-1]["data"], {"error": '{"error": "recaptcha validation failed"}', "status": 403,
                                            "retry_after": None})
        self.assertNotIn("recaptchaV3Token", self.last_tab_request()["body"])
        self.assertEqual(self.page.evaluate("window.__mints.length"), mints)

    def test_ready_token_is_minted_ahead_used_once_and_not_after_the_window(self):
        """keep_token_ready mints ahead, so a task sends without waiting; minting stops when the window ends."""
        self.page.evaluate("window.__mintDelayMs = 700")
        # Without a ready token for its action, a task waits for the mint.
        t0 = time.time()
        rid, start = self.raw_task({"method": "PUT", "path": retry_path(), "body": {}, "recaptcha_action": "chat_retry"})
        waited = [t for t, m in self.timed(rid, start) if m.get("event") == "token_ready"][0] - t0
        self.assertGreater(waited, 0.6)
        # With keep_token_ready the token is there before the task. A change of action drops a token
        # held so far, so the token minted ahead is the first mint after the second command.
        self.addCleanup(self.command, {"command": "keep_token_ready", "action": "chat_submit", "seconds": 600})
        self.command({"command": "keep_token_ready", "action": "warm-up", "seconds": 0})
        first = self.page.evaluate("window.__mints.length")
        self.command({"command": "keep_token_ready", "action": "chat_submit", "seconds": 2})
        self.w.wait(lambda: self.page.evaluate(f"(m => !!m && Date.now() - m.at > 750)(window.__mints[{first}])"),
                    5, "the token minted ahead")
        ahead = self.page.evaluate(f"window.__mints[{first}]")
        self.assertEqual(ahead["action"], "chat_submit")
        t0 = time.time()
        rid, start = self.raw_task(self.create_request("quick"))
        took = [t for t, m in self.timed(rid, start) if m.get("event") == "token_ready"][0] - t0
        self.assertLess(took, 0.4)
        self.assertEqual(self.last_tab_request()["body"]["recaptchaV3Token"].split(".")[3], str(ahead["n"]))
        self.assertEqual(self.last_tab_request()["status"], 200)
        # ... and the next one is minted at once, for the task after.
        self.w.wait(lambda: self.page.evaluate("window.__mints.length") > first + 1, 3, "the next token minted ahead")
        self.assertEqual(self.page.evaluate(f"window.__mints[{first + 1}].action"), "chat_submit")
        # After the window: the held token is still used once, but no new one is minted.
        time.sleep(2.2)
        mints = self.page.evaluate("window.__mints.length")
        self.assertEqual(mints, first + 2)
        rid, start = self.raw_task(self.create_request("after the window"))
        self.assertEqual(self.last_tab_request()["status"], 200)
        time.sleep(0.3)
        self.assertEqual(self.page.evaluate("window.__mints.length"), mints)

    def timed(self, rid, start):
        return [(t, m) for t, m in self.w.timed_messages(start) if m.get("request_id") == rid]

    def test_refused_token_is_reported_with_its_status_not_retried_in_the_tab(self):
        """A reCAPTCHA refusal reaches the bridge as a 403 error after exactly one request."""
        self.arena.refuse_v3 = True
        before = len(self.arena.tab_requests())
        rid, start = self.raw_task(self.create_request("refused"))
        self.assertEqual(self.task_messages(rid, start)[-1]["data"],
                         {"error": '{"error": "recaptcha validation failed"}', "status": 403, "retry_after": None})
        self.assertEqual(len(self.arena.tab_requests()), before + 1)

    def test_rediscover_site_key_finds_a_rotated_key(self):
        """After a key rotation the cached key is refused until a task asks to rediscover it."""
        self.arena.rotate_site_key()
        rid, start = self.raw_task(self.create_request("old key"))
        self.assertEqual(self.task_messages(rid, start)[-1]["data"]["status"], 403)
        rid, start = self.raw_task(self.create_request("new key", rediscover_site_key=True))
        self.assertEqual(self.task_messages(rid, start)[-1]["data"], "[DONE]")
        self.assertTrue(self.last_tab_request()["body"]["recaptchaV3Token"].startswith(f"v3.{self.arena.site_key}."))
        start = len(self.w.messages)
        self.command({"command": "send_status"})
        self.assertEqual(self.wait_sent(lambda m: m.get("type") == "status", start)["recaptcha"]["site_key"],
                         self.arena.site_key)

    def test_v2_task_sends_only_an_invisible_v2_token(self):
        """recaptcha "v2" renders an invisible widget with the page's v2 key and sends no v3 token."""
        self.arena.refuse_v3 = True
        rid, start = self.raw_task(self.create_request("v2 please", recaptcha="v2"))
        self.assertEqual(self.task_messages(rid, start)[-1]["data"], "[DONE]")
        body = self.last_tab_request()["body"]
        self.assertRegex(body["recaptchaV2Token"], rf"^v2\.{V2_KEY}\.\d+\.\w+$")
        self.assertNotIn("recaptchaV3Token", body)
        self.assertEqual(self.page.evaluate("window.__mints.filter(m => m.kind === 'v2').pop().size"), "invisible")
        self.assertEqual(self.page.evaluate("document.querySelectorAll('body > div').length"), 0)

    def test_data_url_attachments_go_up_through_the_server_actions(self):
        """data: attachments are uploaded (generateUploadUrl, PUT, getSignedUrl), cached by content, and survive a deploy."""
        png, gif = tiny_png((255, 0, 0)), TINY_GIF
        attachments = [{"name": "red.png", "contentType": "image/png", "url": data_url("image/png", png)},
                       {"name": "dot.gif", "contentType": "image/gif", "url": data_url("image/gif", gif)}]
        calls = len(self.arena.actions)
        rid, start = self.raw_task(self.create_request("two files", attachments=attachments))
        self.assertEqual(self.task_messages(rid, start)[-1]["data"], "[DONE]")
        sent = self.last_tab_request()["body"]["userMessage"]["experimental_attachments"]
        self.assertEqual([(a["name"], a["contentType"]) for a in sent],
                         [("red.png", "image/png"), ("dot.gif", "image/gif")])
        stored = [self.arena.uploads[self.arena.signed[a["url"]]] for a in sent]
        self.assertEqual(stored, [("red.png", "image/png", png), ("dot.gif", "image/gif", gif)])
        self.assertEqual([c[0] for c in self.arena.actions[calls:]],
                         ["generateUploadUrl", "getSignedUrl", "generateUploadUrl", "getSignedUrl"])
        # The same file again: the signed URL is reused, nothing is uploaded.
        calls = len(self.arena.actions)
        rid, start = self.raw_task(self.create_request("same file", attachments=attachments[:1]))
        self.assertEqual(self.task_messages(rid, start)[-1]["data"], "[DONE]")
        (reused,) = self.last_tab_request()["body"]["userMessage"]["experimental_attachments"]
        self.assertEqual(reused["url"], sent[0]["url"])
        self.assertEqual(self.arena.actions[calls:], [])
        # A deploy changes the action ids: one 404, then the new ids from the page's current HTML.
        self.arena.deploy()
        green = tiny_png((0, 255, 0))
        rid, start = self.raw_task(self.create_request("after deploy", attachments=[
            {"name": "green.png", "contentType": "image/png", "url": data_url("image/png", green)}]))
        self.assertEqual(self.task_messages(rid, start)[-1]["data"], "[DONE]")
        self.assertEqual([(c[0], c[3]) for c in self.arena.actions[calls:]],
                         [(None, 404), ("generateUploadUrl", 200), ("getSignedUrl", 200)])
        url = self.last_tab_request()["body"]["userMessage"]["experimental_attachments"][0]["url"]
        self.assertEqual(self.arena.uploads[self.arena.signed[url]][2], green)
        # The original bridge's body (a message history) has its attachments uploaded too.
        again = dict(attachments[1], name="again.gif")
        self.raw_task({"method": "PUT", "recaptcha_action": "chat_retry", "path": retry_path(), "body": {
            "messages": [{"role": "user", "content": "see", "experimental_attachments": [again]}]}})
        (att,) = self.last_tab_request()["body"]["messages"][0]["experimental_attachments"]
        self.assertEqual((att["name"], att["url"]), ("again.gif", sent[1]["url"]))
        self.assertEqual(self.arena.problems, [])

    def test_cleanup_conversation_archives_and_deletes_through_server_actions(self):
        """cleanup_conversation calls archiveEvaluationSession / deleteEvaluationSession with ["<id>"]; a failure is logged to the bridge."""
        ids = []
        for text in ("to archive", "to delete"):
            request = self.create_request(text)
            self.raw_task(request)
            ids.append(request["body"]["id"])
        self.command({"command": "cleanup_conversation", "id": ids[0], "action": "archive"})
        self.command({"command": "cleanup_conversation", "id": ids[1], "action": "delete"})
        self.w.wait(lambda: self.arena.archived[-1:] == ids[:1] and self.arena.deleted[-1:] == ids[1:], 5, "cleanup")
        self.assertIn(("archiveEvaluationSession", [ids[0]]), [(c[0], c[2]) for c in self.arena.actions])
        start = len(self.w.messages)
        unknown = uuid7()
        self.command({"command": "cleanup_conversation", "id": unknown, "action": "delete"})
        log = self.wait_sent(lambda m: m.get("type") == "log", start)
        self.assertIn(unknown, log["message"])

    def test_page_request_shape_is_reported_without_content_ids_or_tokens(self):
        """The page's own create-evaluation is reported with content, ids, tokens and attachments removed, new fields kept."""
        self.arena.extra_fields = {"experimentFlags": {"fastLane": True, "variant": "b"}}
        start = len(self.w.messages)
        status, _ = self.page.evaluate("__sendLikeTheSite('my secret words')")
        self.assertEqual(status, 200)
        shape = self.wait_sent(lambda m: m.get("type") == "request_shape", start)
        self.assertEqual(shape, {"type": "request_shape", "endpoint": "create-evaluation", "body": {
            "mode": "direct-battle", "modality": "chat", "experimentFlags": {"fastLane": True, "variant": "b"},
            "userMessage": {"content": "", "experimental_attachments": [], "metadata": {}}}})
        self.assertNotIn("secret", json.dumps(self.sent(lambda m: True, start)))
        # The tab's own requests are never reported as the page's.
        self.raw_task(self.create_request("ours"))
        self.assertEqual(len(self.sent(lambda m: m.get("type") == "request_shape", start)), 1)

    def test_models_come_from_text_direct_when_the_page_has_none(self):
        """A page without initialModels (the leaderboard) fetches /text/direct with RSC: 1 and reports that list."""
        fetches = len(self.arena.rsc_fetches)
        page = self.w.open_page("/leaderboard")
        try:
            tab = self.w.tab_at("/leaderboard")
            models = self.wait_sent(lambda m: m.get("type") == "models", tab=tab.name)
            self.assertEqual(models["models"], PAGE_MODELS)
            self.assertEqual(self.arena.rsc_fetches[fetches:], ["/text/direct"])
            status = self.wait_sent(lambda m: m.get("type") == "status", tab=tab.name)
            self.assertEqual(status["models"], {"count": len(PAGE_MODELS), "source": "fetch"})
        finally:
            page.close()
            self.w.wait(lambda: self.w.tab_at("/leaderboard") is None, 5, "the leaderboard tab to leave")


class ThroughTheBridge(BrowserCase):
    """Real clients (the openai SDK) through the bridge with its shipped configuration, the real
    userscript and the stand-in: what users get."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        models_json = os.path.join(cls.h.dir, "models.json")

        def known():
            try:
                with open(models_json, encoding="utf-8") as f:
                    return "stand-in-search" in f.read()
            except OSError:
                return False
        cls.w.wait(known, 15, "the page's models in models.json")

    def test_text_model_streams_dialect_a_exactly(self):
        """A streamed answer cut mid-row and mid-character arrives exactly; the request was create-evaluation as the site sends it."""
        chunks = list(self.ask("hi there", stream=True))
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks), ANSWER)
        self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")
        req = self.last_tab_request()
        self.assertEqual((req["path"], req["status"]), ("/nextjs-api/stream/create-evaluation", 200))
        body = req["body"]
        self.assertEqual((body["mode"], body["modelAId"], body["modality"]), ("direct-battle", TEXT_ID, "chat"))
        self.assertIn("hi there", body["userMessage"]["content"])
        self.assertRegex(body["recaptchaV3Token"], rf"^v3\.{self.arena.site_key}\.chat_submit\.\d+\.\w+$")
        self.assertEqual(self.arena.problems, [])

    def test_text_model_answers_dialect_b_without_streaming(self):
        """Dialect B (an echo object, then rows without delimiters) gives the same answer."""
        self.arena.dialect = "B"
        r = self.ask("no newlines please")
        self.assertEqual((r.choices[0].message.content, r.choices[0].finish_reason), (ANSWER, "stop"))
        self.assertEqual(self.last_tab_request()["status"], 200)

    def test_image_model_answers_with_the_image(self):
        """An image model is asked with modality "image" and its a2 image part comes back as Markdown."""
        r = self.ask("a cat", model="stand-in-image")
        self.assertIn(f"![Image]({IMAGE_URL})", r.choices[0].message.content)
        body = self.last_tab_request()["body"]
        self.assertEqual((body["modelAId"], body["modality"]), (IMAGE_ID, "image"))

    def test_search_model_lists_its_sources(self):
        """A search model is asked with modality "search" and its citations end the answer as Sources."""
        r = self.ask("capital of France?", model="stand-in-search")
        content = r.choices[0].message.content
        self.assertTrue(content.startswith("Paris is the capital of France."), content)
        self.assertIn(f"Sources:\n- [{SOURCE['title']}]({SOURCE['url']})", content)
        self.assertEqual(self.last_tab_request()["body"]["modality"], "search")

    def test_shared_public_name_reaches_the_newest_selectable_model(self):
        """Of two rows sharing a publicName the newer id is asked; a row that is not selectable is not offered."""
        self.assertEqual(self.ask("which twin?", model="stand-in-twin").choices[0].message.content, ANSWER)
        self.assertEqual(self.last_tab_request()["body"]["modelAId"], TWIN_NEW_ID)
        self.assertNotIn("stand-in-retired", [m.id for m in self.client().models.list().data])

    def test_follow_up_continues_the_conversation_or_falls_back_to_a_new_one(self):
        """A conversation plus its answer plus a new turn goes to post-to-evaluation with only that turn; a forgotten one starts anew."""
        history = [{"role": "user", "content": "first question"}]
        self.assertEqual(self.client().chat.completions.create(model="stand-in-text", messages=history)
                         .choices[0].message.content, ANSWER)
        conv_id = self.last_tab_request()["body"]["id"]
        history += [{"role": "assistant", "content": ANSWER}, {"role": "user", "content": "second question"}]
        self.assertEqual(self.client().chat.completions.create(model="stand-in-text", messages=history)
                         .choices[0].message.content, ANSWER)
        req = self.last_tab_request()
        self.assertEqual((req["path"], req["status"]), (f"/nextjs-api/stream/post-to-evaluation/{conv_id}", 200))
        self.assertEqual(self.arena.conversations[conv_id]["turns"][1:], ["second question"])
        # LMArena lost it: 404 before any output, and the same client request is folded into a new one.
        del self.arena.conversations[conv_id]
        before = len(self.arena.tab_requests())
        history += [{"role": "assistant", "content": ANSWER}, {"role": "user", "content": "third question"}]
        self.assertEqual(self.client().chat.completions.create(model="stand-in-text", messages=history)
                         .choices[0].message.content, ANSWER)
        seen = self.arena.tab_requests()[before:]
        self.assertEqual([(r["path"].rsplit("/", 1)[-1], r["status"]) for r in seen],
                         [(conv_id, 404), ("create-evaluation", 200)])
        folded = seen[1]["body"]["userMessage"]["content"]
        self.assertTrue(all(q in folded for q in ("first question", "second question", "third question")), folded)

    def test_rate_limit_passes_retry_after_on(self):
        """LMArena's 429 reaches the client as 429 with its Retry-After."""
        self.arena.retry_after = 1
        with self.assertRaises(openai.RateLimitError) as cm:
            self.ask("please 429")
        self.assertEqual(cm.exception.response.headers["retry-after"], "1")
        self.assertEqual(self.last_tab_request()["status"], 429)
        time.sleep(1.1)    # the tab cools down for Retry-After seconds

    def test_cloudflare_page_reloads_the_tab_and_the_next_request_succeeds(self):
        """A Cloudflare page gives 503, the tab reloads (passing the check) and the next request succeeds."""
        first_tab = self.tab()
        with self.assertRaises(openai.APIStatusError) as cm:
            self.ask("cloudflare")
        self.assertEqual((cm.exception.status_code, cm.exception.code), (503, "cloudflare_challenge"))
        self.w.wait(lambda: self.w.tab_at("/") not in (None, first_tab), 20, "the reloaded tab")
        self.assertEqual(self.ask("cloudflare again").choices[0].message.content, ANSWER)
        self.assertEqual(self.arena.challenges, 1)
        self.assertIn("cf_clearance=passed", self.last_tab_request()["headers"]["Cookie"])

    def test_client_leaving_aborts_the_tab_fetch(self):
        """A client that leaves mid-stream makes the stand-in see its request aborted."""
        stream = self.ask("slow please", stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        stream.close()
        self.assertTrue(self.arena.aborted.wait(8), "the tab did not abort its fetch")

    def test_capture_takes_the_ids_of_the_pages_retry_click(self):
        """An armed capture ignores the tab's own retry requests and takes the ids of the page's Retry click."""
        sid, mid = uuid7(), uuid7()
        result = {}

        def capture():
            result.update(zip(("status", "body"), post_json(self.h.url + "/internal/id_capture",
                                                            {"mode": "battle", "target": "B", "timeout": 20})))
        t = threading.Thread(target=capture)
        t.start()
        self.w.wait(lambda: self.page.title().startswith("🎯 ✅ "), what="capture title")
        rid, start = self.raw_task({"method": "PUT", "path": retry_path(), "body": {}, "recaptcha_action": "chat_retry"})
        self.assertEqual(self.task_messages(rid, start)[-1]["data"], "[DONE]")
        self.assertTrue(self.page.title().startswith("🎯 ✅ "))
        self.assertNotIn("status", result)
        self.assertEqual(self.page.evaluate("[fetch.name, fetch.length]"), ["fetch", 1])
        self.page.evaluate(f"fetch('/nextjs-api/stream/retry-evaluation-session-message/{sid}/messages/{mid}',"
                           " {method: 'PUT', body: '{}'}).then(r => r.text())")
        t.join(20)
        self.assertEqual(result.get("status"), 200, result)
        self.assertEqual((result["body"]["session_id"], result["body"]["message_id"]), (sid, mid))
        with open(self.h.config_path, encoding="utf-8") as f:
            cfg = bridge.parse_json_file("config.jsonc", f.read())
        self.assertEqual((cfg["session_id"], cfg["message_id"]), (sid, mid))
        self.w.wait(lambda: self.page.title() == "✅ LMArena", what="title after capture")

    def test_rotated_site_key_is_rediscovered_and_the_request_succeeds(self):
        """After a site-key rotation the first token is refused and the bridge's next attempt (rediscover) succeeds."""
        before = len(self.arena.tab_requests())
        self.arena.rotate_site_key()
        self.assertEqual(self.ask("after rotation").choices[0].message.content, ANSWER)
        seen = self.arena.tab_requests()[before:]
        self.assertEqual([r["status"] for r in seen], [403, 200])
        self.assertTrue(seen[-1]["body"]["recaptchaV3Token"].startswith(f"v3.{self.arena.site_key}."))
        self.assertNotEqual(seen[0]["body"]["id"], seen[1]["body"]["id"])

    def test_refused_v3_falls_back_to_an_invisible_v2_token(self):
        """When every v3 token is refused, the bridge's third attempt carries only a v2 token and succeeds."""
        before = len(self.arena.tab_requests())
        self.arena.refuse_v3 = True
        self.assertEqual(self.ask("v3 refused").choices[0].message.content, ANSWER)
        seen = self.arena.tab_requests()[before:]
        self.assertEqual([r["status"] for r in seen], [403, 403, 200])
        self.assertNotIn("recaptchaV3Token", seen[-1]["body"])
        self.assertRegex(seen[-1]["body"]["recaptchaV2Token"], rf"^v2\.{V2_KEY}\.\d+\.\w+$")

    def test_attachment_is_uploaded_through_server_actions_even_after_a_deploy(self):
        """An image from the client reaches LMArena as a signed URL, also after a deploy changed the action ids."""
        for rgb in ((0, 0, 255), (9, 9, 9)):
            png = tiny_png(rgb)
            content = [{"type": "text", "text": "what colour is this?"},
                       {"type": "image_url", "image_url": {"url": data_url("image/png", png)}}]
            r = self.client().chat.completions.create(model="stand-in-text",
                                                      messages=[{"role": "user", "content": content}])
            self.assertEqual(r.choices[0].message.content, ANSWER)
            (att,) = self.last_tab_request()["body"]["userMessage"]["experimental_attachments"]
            self.assertEqual(att["contentType"], "image/png")
            self.assertEqual(self.arena.uploads[self.arena.signed[att["url"]]][1:], ("image/png", png))
            self.arena.deploy()

    def test_required_field_is_learned_from_the_pages_own_request(self):
        """A field the site starts to require is refused by name until the page's own request shows it; then it is sent."""
        context = {"surface": "web", "tier": 2}
        self.arena.extra_fields = {"sessionContext": context}
        self.arena.required_field = "sessionContext"
        with self.assertRaises(openai.APIStatusError) as cm:
            self.ask("before the page showed it")
        self.assertEqual((cm.exception.status_code, cm.exception.code), (502, "upstream_schema_changed"))
        self.assertIn("sessionContext", cm.exception.message)
        status, _ = self.page.evaluate("__sendLikeTheSite('the page itself')")
        self.assertEqual(status, 200)
        self.assertEqual(self.ask("after the page showed it").choices[0].message.content, ANSWER)
        self.assertEqual(self.last_tab_request()["body"]["sessionContext"], context)


@unittest.skipIf(CHROMIUM is None or sync_playwright is None, SKIP_REASON)
class LocalNetworkAccess(unittest.TestCase):
    def test_blocked_socket_shows_guidance_until_the_site_is_allowed(self):
        """Without local network access the socket fails, the console says what to do and the title shows "⛔ "; allowed, it connects."""
        w = world()
        page, harness = w.blocked_page, w.h_blocked
        w.wait(lambda: page.title() == "⛔ LMArena", 15, "the ⛔ title", w.blocked_console)
        # Playwright hands console events over only during its own calls: ask the page something.
        w.wait(lambda: page.evaluate("1") and "Local network access" in "\n".join(w.blocked_console), 5,
               "the guidance in the console", w.blocked_console)
        console = "\n".join(w.blocked_console)
        self.assertIn("net::ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS", console)
        for words in ('"Local network access"', "Site settings", "reload this tab", "lock"):
            self.assertIn(words, console)
        self.assertEqual(page.evaluate(f"navigator.permissions.query({{name: '{LNA_PERMISSION}'}}).then(s => s.state)"),
                         "denied")
        self.assertEqual(harness.bridge.tabs, [])
        w.blocked_context.grant_permissions([LNA_PERMISSION], origin=ORIGIN)
        page.reload()
        w.wait(lambda: page.title() == "✅ LMArena", 10, "the ✅ title once allowed", w.blocked_console)
        version = re.search(r"@version\s+(\S+)", w.script).group(1)
        w.wait(lambda: [t.version for t in harness.bridge.tabs] == [version], 5, "the hello of the allowed tab")


if __name__ == "__main__":
    unittest.main()
