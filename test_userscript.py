"""The real userscript.js in a real headless Chromium, against a local stand-in for LMArena and a real
bridge, driven by the openai SDK. Skipped (with the reason) only where Chromium or Playwright is absent.

The stand-in serves a page with Next.js flight data holding `initialModels`, a fake
`grecaptcha.enterprise`, and the retry endpoint, which checks every request (method, path, body
shape, content type, token) and answers with LMArena lines cut into several network chunks, or
with 429, a reCAPTCHA 403 or a Cloudflare page, as the prompt asks.
"""
import json
import os
import re
import shutil
import threading
import time
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai

import bridge
from test_bridge import MID, SID, Harness

HERE = os.path.dirname(os.path.abspath(__file__))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - CI installs it
    sync_playwright = None

SITE_KEY = "6LcTESTKEYaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"   # 40 characters, like real keys
NEW_SID = "0198d000-aaaa-7bbb-8ccc-000000000001"
NEW_MID = "0198d000-aaaa-7bbb-8ccc-000000000002"
PAGE_MODELS = [
    {"id": "aaaaaaaa-0000-4000-8000-000000000001", "publicName": "page-text-model", "organization": "acme",
     "provider": "acme", "capabilities": {"inputCapabilities": {"text": True},
                                          "outputCapabilities": {"text": True}}},
    {"id": "aaaaaaaa-0000-4000-8000-000000000002", "publicName": "page-image-model", "organization": "acme",
     "provider": "acme", "capabilities": {"inputCapabilities": {"text": True},
                                          "outputCapabilities": {"image": {"aspectRatios": ["1:1"]}}}},
]


def flight_page() -> bytes:
    """An LMArena-like page: the model list in two flight-data pushes, a fake grecaptcha, the
    reCAPTCHA site key only in a same-origin script file."""
    flight = '1:["$","div",null,{"initialModels":' + json.dumps(PAGE_MODELS) + ',"other":1}]\n'
    half = len(flight) // 2
    pushes = "".join(f"<script>(self.__next_f=self.__next_f||[]).push([1,{json.dumps(part)}])</script>"
                     for part in (flight[:half], flight[half:]))
    return f"""<!doctype html><html><head><title>LMArena</title>
<script>
  window.__tokens = 0;
  window.grecaptcha = {{enterprise: {{
    ready(cb) {{ setTimeout(cb, 5); }},
    execute(key, opts) {{ window.__tokens++; return Promise.resolve('tok-' + key + '-' + opts.action + '-' + window.__tokens); }}
  }}}};
</script>
<script src="/static/app.js"></script>
{pushes}
</head><body><h1>Stand-in arena</h1></body></html>""".encode()


class StandIn(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ArenaHandler)
        self.requests = []          # (method, path, headers, body) of every stream request
        self.problems = []          # what the checks found wrong
        self.aborted = threading.Event()
        self.recaptcha_failures = 0


class ArenaHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/static/app.js":   # the site key lives only in a script file, as on LMArena
            js = f'function warmUp() {{ return grecaptcha.enterprise.execute("{SITE_KEY}", {{action: "page_load"}}); }}'
            return self.reply(200, "application/javascript", js.encode())
        body = flight_page()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        srv = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        srv.requests.append(("PUT", self.path, dict(self.headers), body))
        m = re.fullmatch(r"/nextjs-api/stream/retry-evaluation-session-message/([\w-]+)/messages/([\w-]+)", self.path)
        if not m:
            srv.problems.append(f"unexpected path {self.path}")
            return self.reply(404, "text/plain", b"not found")
        data = json.loads(body)
        if data == {}:   # the page's own simulated Retry click
            return self.reply(200, "text/plain", b'a0:"regenerated"\nad:{"finishReason":"stop"}\n')
        self.check(m.group(1), m.group(2), data)
        prompt = data["messages"][-1]["content"] if data["messages"] else ""
        if "please 429" in prompt:
            return self.reply(429, "application/json", b'{"error":"Too Many Requests"}', {"Retry-After": "37"})
        if "recaptcha once" in prompt and srv.recaptcha_failures == 0:
            srv.recaptcha_failures += 1
            return self.reply(403, "application/json", b'{"error":"recaptcha validation failed"}')
        if "cloudflare" in prompt:
            return self.reply(403, "text/html", b"<html><head><title>Just a moment...</title></head>"
                                                b"<body>Enable JavaScript and cookies to continue</body></html>")
        if "slow" in prompt:
            return self.stream_slowly()
        text = 'a0:"Hello "\na0:"wörld"\na0:" 😀!"\nad:{"finishReason":"stop"}\n'.encode()
        cuts = [0, 5, 17, len(text) - 3, len(text)]      # mid-line, mid-UTF-8 ("ö" and "😀")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for a, b in zip(cuts, cuts[1:]):
            piece = text[a:b]
            self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            self.wfile.flush()
            time.sleep(0.05)
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
        except (BrokenPipeError, ConnectionResetError):
            self.server.aborted.set()
            return
        self.wfile.write(b"0\r\n\r\n")

    def check(self, sid, mid, data):
        srv = self.server
        problems = []
        if (sid, mid) != (SID, MID):
            problems.append(f"ids {sid}/{mid}")
        if self.headers.get("Content-Type") != "text/plain;charset=UTF-8":
            problems.append(f"content type {self.headers.get('Content-Type')}")
        token = data.get("recaptchaV3Token", "")
        if not re.fullmatch(rf"tok-{SITE_KEY}-chat_retry-\d+", token):
            problems.append(f"token {token!r}")
        msgs = data.get("messages")
        if not isinstance(msgs, list) or not msgs or msgs[-1].get("status") != "pending":
            problems.append("messages")
        for i, msg in enumerate(msgs or []):
            if msg.get("evaluationSessionId") != SID or (i and msg["parentMessageIds"] != [msgs[i - 1]["id"]]):
                problems.append(f"message {i} chain")
        if "modelId" not in data:
            problems.append("modelId missing")
        srv.problems.extend(problems)

    def reply(self, status, ctype, body, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


@unittest.skipIf(CHROMIUM is None or sync_playwright is None,
                 "Chromium or Playwright is not installed (apt-get install chromium; pip install playwright)")
class UserscriptInChromium(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.arena = StandIn()
        threading.Thread(target=cls.arena.serve_forever, daemon=True).start()
        cls.origin = f"http://127.0.0.1:{cls.arena.server_address[1]}"
        cls.h = Harness({"allowed_tab_origins": [cls.origin], "first_byte_hold_seconds": 5, "session_mode": "retry",
                         "cloudflare_wait_seconds": 20}, models={"hand-added": "null"})
        cls.pw = sync_playwright().start()
        cls.browser = cls.pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        cls.page = cls.browser.new_page()
        cls.console = []
        cls.page.on("console", lambda m: cls.console.append(m.text))
        with open(os.path.join(HERE, "userscript.js"), encoding="utf-8") as f:
            cls.script = f.read()
        cls.page.add_init_script(f"localStorage.setItem('lmarena-bridge-url', 'ws://127.0.0.1:{cls.h.port}/ws');")
        cls.page.add_init_script(cls.script)
        cls.page.goto(cls.origin + "/")
        cls.page.evaluate("warmUp()")
        cls.wait_tab()

    @classmethod
    def tearDownClass(cls):
        for closer in (cls.browser.close, cls.pw.stop, cls.h.close, cls.arena.shutdown):
            try:
                closer()
            except Exception:
                pass

    @classmethod
    def wait_tab(cls, timeout=15):
        end = time.time() + timeout
        while time.time() < end:
            tabs = cls.h.bridge.tabs
            if tabs and tabs[-1].version:
                return tabs[-1]
            time.sleep(0.05)
        raise AssertionError(f"the userscript never said hello; console: {cls.console[-10:]}")

    def ask(self, prompt, stream=False):
        client = openai.OpenAI(base_url=self.h.url + "/v1", api_key="x", max_retries=0, timeout=30)
        return client.chat.completions.create(model="page-text-model", stream=stream,
                                              messages=[{"role": "user", "content": prompt}])

    def wait_for(self, predicate, timeout=10, what="condition"):
        self.h.wait(predicate, timeout, what=f"{what}; console: {self.console[-10:]}")

    def test_1_hello_title_and_models(self):
        """The script says hello with its @version, shows ✅ once, and reports the page's models."""
        tab = self.h.bridge.tabs[-1]
        version = re.search(r"@version\s+(\S+)", self.script).group(1)
        self.assertEqual(tab.version, version)
        self.assertTrue(tab.url.startswith(self.origin))
        self.wait_for(lambda: self.page.title() == "✅ LMArena", what="title")
        self.page.evaluate("document.title = 'Other page'")
        self.wait_for(lambda: self.page.title() == "✅ Other page", what="title after the page changed it")
        self.wait_for(lambda: "page-image-model" in self.h.bridge.files.models, what="models")
        with open(os.path.join(self.h.dir, "models.json"), encoding="utf-8") as f:
            on_disk = json.load(f)
        self.assertEqual(on_disk["page-text-model"], PAGE_MODELS[0]["id"])
        self.assertEqual(on_disk["page-image-model"], PAGE_MODELS[1]["id"] + ":image")
        self.assertEqual(on_disk["hand-added"], "null")

    def test_2_streamed_answer_arrives_exactly(self):
        """A streamed answer cut mid-line and mid-character arrives exactly; the request was right."""
        before = len(self.arena.requests)
        chunks = list(self.ask("hi there", stream=True))
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks), "Hello wörld 😀!")
        self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")
        self.assertEqual(len(self.arena.requests), before + 1)
        self.assertEqual(self.arena.problems, [])
        body = json.loads(self.arena.requests[-1][3])
        self.assertEqual(body["messages"][-1]["content"], "hi there")

    def test_3_failures(self):
        """429 passes Retry-After on; a reCAPTCHA 403 is retried once with a fresh token."""
        with self.assertRaises(openai.RateLimitError) as cm:
            self.ask("please 429")
        self.assertEqual(cm.exception.response.headers["retry-after"], "37")
        self.h.bridge.tabs[-1].cool_until = 0     # the tab rests after a 429; these tests go on at once
        before = len(self.arena.requests)
        r = self.ask("recaptcha once")
        self.assertEqual(r.choices[0].message.content, "Hello wörld 😀!")
        tokens = [json.loads(b)["recaptchaV3Token"] for _, _, _, b in self.arena.requests[before:]]
        self.assertEqual(len(tokens), 2)
        self.assertNotEqual(tokens[0], tokens[1])
        self.assertEqual(self.arena.problems, [])

    def test_4_client_disconnect_aborts_the_fetch(self):
        """A client that leaves mid-stream makes the stand-in see its request aborted."""
        stream = self.ask("slow please", stream=True)
        for chunk in stream:
            if chunk.choices[0].delta.content:
                break
        stream.close()
        self.assertTrue(self.arena.aborted.wait(5), "the tab did not abort its fetch")

    def test_5_capture_retry_click(self):
        """An armed capture takes the ids of the page's next Retry and writes them to config.jsonc."""
        result = {}

        def capture():
            status, body = post_json(self.h.url + "/internal/id_capture", {"mode": "battle", "target": "B", "timeout": 20})
            result.update(status=status, body=body)
        t = threading.Thread(target=capture)
        t.start()
        self.wait_for(lambda: self.page.title().startswith("🎯 ✅ "), what="capture title")
        # The script's own requests to the retry endpoint never count as the click.
        self.assertEqual(self.ask("while armed").choices[0].message.content, "Hello wörld 😀!")
        self.assertTrue(self.page.title().startswith("🎯 ✅ "))
        self.assertNotIn("status", result)
        self.assertEqual(self.page.evaluate("[fetch.name, fetch.length]"), ["fetch", 1])
        self.page.evaluate(f"fetch('/nextjs-api/stream/retry-evaluation-session-message/{NEW_SID}/messages/{NEW_MID}',"
                           " {method: 'PUT', body: '{}'}).then(r => r.text())")
        t.join(20)
        self.assertEqual(result["status"], 200, result)
        self.assertEqual((result["body"]["session_id"], result["body"]["message_id"]), (NEW_SID, NEW_MID))
        with open(self.h.config_path, encoding="utf-8") as f:
            text = f.read()
        cfg = bridge.parse_json_file("config.jsonc", text)
        self.assertEqual((cfg["session_id"], cfg["message_id"], cfg["id_updater_last_mode"],
                          cfg["id_updater_battle_target"]), (NEW_SID, NEW_MID, "battle", "B"))
        self.assertIn("// --- Session", text)
        self.wait_for(lambda: self.page.title() == "✅ Other page" or self.page.title() == "✅ LMArena",
                      what="title after capture")
        # Restore the ids the stand-in expects for the remaining tests.
        self.h.bridge.store_session(SID, MID, {"mode": "direct_chat", "target": "A", "model": None})

    def test_6_cloudflare_reload_and_resume(self):
        """A Cloudflare page: 503, the tab reloads and reconnects, the next request succeeds."""
        first_tab = self.h.bridge.tabs[-1]
        with self.assertRaises(openai.APIStatusError) as cm:
            self.ask("cloudflare")
        self.assertEqual((cm.exception.status_code, cm.exception.code), (503, "cloudflare_challenge"))
        self.wait_for(lambda: self.h.bridge.tabs and self.h.bridge.tabs[-1] is not first_tab
                      and self.h.bridge.tabs[-1].version, timeout=20, what="the reloaded tab")
        self.assertEqual(self.ask("hello again").choices[0].message.content, "Hello wörld 😀!")


def post_json(url, obj):
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, data=json.dumps(obj).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


if __name__ == "__main__":
    unittest.main()
