"""The browser launcher (`python bridge.py --browser`, `python bridge.py browser`) with Debian's real
Chromium against the stand-in of LMArena (testsupport.StandIn). No Playwright here: the launcher
itself starts the browser, speaks the DevTools protocol over its pipe and puts userscript.js into the
page; the tests only give it the stand-in's Chromium flags with --browser-arg (host-resolver-rules
show the stand-in as https://arena.ai, a public site to Local Network Access, so the permission the
launcher grants is really checked; --ignore-certificate-errors accepts the stand-in's throw-away
certificate).

BrowserCommand runs the real command line in a subprocess, one bridge and browser for its ordered
steps: a tab connects and chats, no DevTools port is listening, a killed renderer and a killed browser
are recovered, SIGINT leaves no process behind. LauncherInProcess runs BrowserLauncher on a test
bridge's event loop, with a DevTools session of its own into the page (navigator.webdriver, the
permission, a hung page). Every bridge here listens on a free port, never on 5102.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import unittest
import urllib.request

import openai

import bridge
from testsupport import (ANSWER, CHROMIUM, HERE, LNA_PERMISSION, SHIPPED_CONFIG, Harness, StandIn, chromium_args,
                         make_certificate, wait_until)

SKIP_REASON = "Chromium is not installed (apt-get install chromium)"
# CI (.ci/run) sets BRIDGE_REQUIRE_BROWSER=1: there a missing browser is a failure, never a silent skip.
if os.environ.get("BRIDGE_REQUIRE_BROWSER") and CHROMIUM is None:
    raise RuntimeError("BRIDGE_REQUIRE_BROWSER is set but " + SKIP_REASON)

arena = None
arena_dir = None


def setUpModule():
    global arena, arena_dir
    if CHROMIUM is None:
        return
    arena_dir = tempfile.mkdtemp(prefix="standin-")
    arena = StandIn(*make_certificate(arena_dir))
    threading.Thread(target=arena.serve_forever, daemon=True).start()


def tearDownModule():
    if arena is not None:
        arena.shutdown()
        arena.server_close()
        shutil.rmtree(arena_dir, ignore_errors=True)


def stand_in_flags():
    """The stand-in's Chromium flags (testsupport) and its self-signed certificate accepted."""
    return chromium_args(arena.port) + ["--ignore-certificate-errors"]


def cmdline(pid) -> list:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def process_group(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return int(f.read().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def browser_pids(profile, groups=()) -> list:
    """Processes of the browser: the profile folder in their command line, or in a browser's group."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            args = cmdline(entry)
            if any(profile in a for a in args) or (groups and process_group(entry) in groups):
                if args and "chrom" in args[0]:
                    found.append(int(entry))
    return found


def listening_inodes() -> set:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A":                  # TCP_LISTEN
                    inodes.add(cols[9])
    return inodes


def socket_inodes(pid) -> set:
    found = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
            if m:
                found.add(m.group(1))
    except OSError:
        pass
    return found


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@unittest.skipIf(CHROMIUM is None, SKIP_REASON)
class BrowserCommand(unittest.TestCase):
    """`python bridge.py --browser --headless ...`: the whole command, in order (each step builds on
    the one before: they share one bridge and browser, as a user's would)."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="bridge-browser-")
        cls.config = os.path.join(cls.dir, "config.jsonc")
        with open(SHIPPED_CONFIG, encoding="utf-8") as f:
            shipped = f.read()
        with open(cls.config, "w", encoding="utf-8") as f:
            f.write(bridge.jsonc_update(shipped, {"port": 0, "log_level": "info"}))
        for name in ("models.json", "model_endpoint_map.json"):
            with open(os.path.join(cls.dir, name), "w", encoding="utf-8") as f:
                f.write("{}\n")
        cls.profile = os.path.join(cls.dir, "browser-profile")      # the default: beside the config
        cls.log = open(os.path.join(cls.dir, "bridge.log"), "w+", encoding="utf-8")
        cls.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "bridge.py"), "--browser", "--headless", "--config", cls.config,
             "--chrome", CHROMIUM, "--url", "https://arena.ai/"] + [f"--browser-arg={a}" for a in stand_in_flags()],
            stdout=subprocess.PIPE, stderr=cls.log, text=True)
        line = cls.proc.stdout.readline()
        m = re.search(r"listening on (http://127\.0\.0\.1:(\d+))", line)
        if not m:
            cls.proc.kill()
            raise AssertionError(f"the bridge did not start: {line!r} {cls.logged()}")
        cls.url, cls.port = m.group(1), int(m.group(2))
        assert cls.port != 5102
        cls.client = openai.OpenAI(base_url=cls.url + "/v1", api_key="x", max_retries=0, timeout=30)
        cls.groups = set()

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        if cls.proc.poll() is None:
            cls.proc.send_signal(signal.SIGINT)
            try:
                cls.proc.wait(15)
            except subprocess.TimeoutExpired:
                cls.proc.kill()
        for pid in browser_pids(cls.profile, cls.groups):     # never leave a browser behind a failed test
            os.kill(pid, signal.SIGKILL)
        cls.log.close()
        shutil.rmtree(cls.dir, ignore_errors=True)

    @classmethod
    def logged(cls):
        cls.log.flush()
        with open(cls.log.name, encoding="utf-8") as f:
            return "; log: " + " | ".join(f.read().splitlines()[-12:])

    def health(self):
        return get_json(self.url + "/health")

    def wait(self, predicate, timeout, what):
        wait_until(predicate, timeout, what, 0.05, self.logged)

    def connected_tab(self, other_than=None):
        """Wait until a tab of the launched browser said hello (not `other_than`) -> its name."""
        def tab():
            for t in self.health().get("tab_details") or []:
                if t["userscript"] and t["name"] != other_than:
                    return t
        self.wait(tab, 20, "a tab of the launched browser")
        t = tab()
        self.assertEqual(t["url"], "https://arena.ai/")           # the stand-in's page, as arena.ai
        return t["name"]

    def chat(self):
        self.wait(lambda: "stand-in-text" in {m["id"] for m in get_json(self.url + "/v1/models")["data"]}, 10,
                  "the page's model list")
        reply = self.client.chat.completions.create(model="stand-in-text",
                                                    messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(reply.choices[0].message.content, ANSWER)

    def browser(self):
        b = self.health()["browser"]
        self.assertIsNotNone(b)
        if b.get("pid"):
            self.groups.add(b["pid"])           # the browser leads its own process group
        return b

    def test_1_a_tab_connects_and_chats(self):
        asked = len(arena.tab_requests())
        type(self).tab = self.connected_tab()
        self.chat()
        self.assertGreater(len(arena.tab_requests()), asked, "the stand-in saw the tab's request")
        b = self.browser()
        self.assertTrue(b["running"])
        self.assertTrue(b["version"].startswith(("Chrome/", "HeadlessChrome/")), b)
        self.assertEqual((b["path"], b["profile"], b["restarts"], b["devtools"]),
                         (CHROMIUM, self.profile, 0, "pipe"))
        self.assertIn("loopback-network", b["local_network_access"])
        with urllib.request.urlopen(self.url + "/", timeout=10) as r:
            page = r.read().decode()
        self.assertIn("<h2>Browser</h2>", page)
        self.assertIn(b["version"], page)
        doctor = subprocess.run([sys.executable, os.path.join(HERE, "bridge.py"), "doctor", "--config", self.config,
                                 "--bridge", self.url], capture_output=True, text=True, timeout=30)
        self.assertRegex(doctor.stdout, r"(?m)^ok browser: Chrome/\S+, pid \d+, profile ")

    def test_2_no_devtools_port_is_reachable(self):
        b = self.browser()
        pids = browser_pids(self.profile, self.groups)
        self.assertIn(b["pid"], pids)
        main = cmdline(b["pid"])
        self.assertIn("--remote-debugging-pipe", main)
        self.assertFalse([a for a in main if a.startswith(("--remote-debugging-port", "--enable-automation"))])
        self.assertFalse(os.path.exists(os.path.join(self.profile, "DevToolsActivePort")))
        listening = listening_inodes()
        for pid in pids:
            self.assertFalse(socket_inodes(pid) & listening, f"process {pid} {cmdline(pid)[:2]} listens on TCP")

    def test_3_a_killed_renderer_is_reloaded(self):
        before = self.browser()["page_reloads"]
        # (a zygote's children rewrite their command line as one string: look for a substring)
        renderers = [p for p in browser_pids(self.profile, self.groups) if "--type=renderer" in " ".join(cmdline(p))]
        self.assertTrue(renderers, "no renderer process found")
        for pid in renderers:
            os.kill(pid, signal.SIGKILL)
        self.wait(lambda: self.browser()["page_reloads"] > before, 15, "the crashed page's reload")
        type(self).tab = self.connected_tab(other_than=self.tab)
        self.chat()

    def test_4_a_killed_browser_is_started_again(self):
        b = self.browser()
        os.kill(b["pid"], signal.SIGKILL)
        self.wait(lambda: self.browser()["restarts"] == 1 and self.browser()["running"], 20, "the browser's restart")
        self.assertNotEqual(self.browser()["pid"], b["pid"])
        self.assertIn("exited", self.browser()["last_error"])
        type(self).tab = self.connected_tab(other_than=self.tab)
        self.chat()

    def test_5_sigint_closes_the_browser_and_leaves_nothing(self):
        self.browser()
        self.proc.send_signal(signal.SIGINT)
        self.assertEqual(self.proc.wait(20), 0)
        self.assertEqual(browser_pids(self.profile, self.groups), [])
        self.assertIn("browser: closing it", self.logged())
        # A clean exit, so the profile (the LMArena login) was saved. (Chromium also quits cleanly by
        # itself when its DevTools pipe closes: even a bridge that died leaves no browser behind.)
        with open(os.path.join(self.profile, "Default", "Preferences"), encoding="utf-8") as f:
            self.assertEqual(json.load(f)["profile"]["exit_type"], "Normal")


@unittest.skipIf(CHROMIUM is None, SKIP_REASON)
class MissingBrowser(unittest.TestCase):
    def test_a_missing_browser_is_one_line_and_exit_1(self):
        with tempfile.TemporaryDirectory() as d:
            config = os.path.join(d, "config.jsonc")
            with open(config, "w", encoding="utf-8") as f:
                f.write('{"port": 0}\n')
            env = dict(os.environ, BRIDGE_CHROME=os.path.join(d, "no-such-chrome"))
            for args in (["browser", "--chrome", os.path.join(d, "nowhere", "chrome")], ["--browser"]):
                r = subprocess.run([sys.executable, os.path.join(HERE, "bridge.py"), *args, "--config", config],
                                   capture_output=True, text=True, timeout=30, env=env)
                self.assertEqual(r.returncode, 1, r.stderr)
                self.assertEqual(len(r.stderr.splitlines()), 1, r.stderr)
                self.assertRegex(r.stderr, r"^error: no browser at .*(--chrome|\$BRIDGE_CHROME)")
                self.assertNotIn("listening", r.stdout)


@unittest.skipIf(CHROMIUM is None, SKIP_REASON)
class LauncherInProcess(unittest.TestCase):
    """BrowserLauncher on a test bridge's loop, looked at through a DevTools session of its own."""

    def setUp(self):
        self.h = Harness(config={})
        self.profile = tempfile.mkdtemp(prefix="browser-profile-")
        self.launcher = None

    def tearDown(self):
        if self.launcher is not None:
            self.h.run(self.launcher.stop())
        self.h.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def launch(self, **kw):
        self.launcher = bridge.BrowserLauncher(CHROMIUM, self.profile, "https://arena.ai/",
                                               f"ws://127.0.0.1:{self.h.port}/ws", headless=True,
                                               extra_args=stand_in_flags(), **kw)
        self.h.bridge.browser = self.launcher
        self.h.run(self.launcher.start())
        self.wait_tab()

    def wait_tab(self, other_than=None):
        tab = lambda: next((t for t in self.h.bridge.tabs if t.version and t.name != other_than), None)
        wait_until(tab, 20, "the launched browser's tab")
        return tab().name

    def page(self):
        return next(p for p in self.launcher.pages.values() if bridge.url_is_lmarena(p.url))

    def evaluate(self, expression, page=None, timeout=5):
        answer = self.h.run(self.launcher.devtools.call("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True},
            (page or self.page()).session, timeout=timeout))
        return answer["result"].get("value")

    def test_page_does_not_look_automated_and_may_reach_the_bridge(self):
        self.launch()
        self.assertIs(self.evaluate("navigator.webdriver"), False)
        self.assertEqual(self.evaluate(f"navigator.permissions.query({{name: '{LNA_PERMISSION}'}}).then(s => s.state)"),
                         "granted")
        self.assertEqual(self.evaluate("localStorage.getItem('lmarena-bridge-url')"),
                         f"ws://127.0.0.1:{self.h.port}/ws")
        self.assertTrue(self.evaluate("document.title").startswith("✅"))
        # Only LMArena pages get the userscript: a page of another https site (the stand-in's upload
        # storage, opened in a new tab, prepared like every page) has none of it.
        self.h.run(self.launcher.devtools.call("Target.createTarget", {"url": "https://blob.example.com/"}))
        other = lambda: next((p for p in self.launcher.pages.values() if "blob.example.com" in p.url), None)
        wait_until(lambda: other() and self.evaluate("document.readyState", other()) == "complete", 10,
                   "the other site's page")
        self.assertIsNone(self.evaluate("window.__lmarenaBridgeLoaded", other()))
        self.assertIsNone(self.evaluate("localStorage.getItem('lmarena-bridge-url')", other()))
        health = self.h.bridge.health(True)["browser"]
        self.assertEqual((health["lmarena_pages"], health["page_reloads"], health["running"]), (1, 0, True))

    def test_hung_page_is_reloaded(self):
        self.launch(ping_interval=0.3, ping_timeout=1.0)
        name = self.wait_tab()
        self.evaluate("setTimeout(() => { while (true) {} }, 50); 1")
        wait_until(lambda: self.launcher.page_reloads >= 1, 10, "the hung page's reload")
        self.wait_tab(other_than=name)
        self.assertIn("hangs", self.launcher.last_error)

    def test_devtools_port_fallback_is_loopback_only(self):
        """Where no pipe can be handed over (Windows) the link is a random port on 127.0.0.1."""
        self.launch(transport="port")
        with open(os.path.join(self.profile, "DevToolsActivePort"), encoding="utf-8") as f:
            port = int(f.read().split()[0])
        with open("/proc/net/tcp", encoding="ascii") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        bound = [r[1] for r in rows if r[3] == "0A" and int(r[1].split(":")[1], 16) == port]
        self.assertEqual(bound, ["0100007F:%04X" % port])
        self.assertIs(self.evaluate("navigator.webdriver"), False)


if __name__ == "__main__":
    unittest.main()
