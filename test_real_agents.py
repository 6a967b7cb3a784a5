"""The real coding agents, end to end, against a real bridge (issue 19 item 5).

Each test starts a real Bridge (testsupport.Harness) with a fake tab whose script is a scripted
"model" (FakeModel): it reads the prompt the bridge built and answers, in LMArena rows split at odd
places, either with a `<tool_call>` block calling the agent's own file-writing or shell tool, or,
once the tool's result is in the prompt, with a final text quoting that result. The real agent
program then runs non-interactively against the bridge, in a clean temp folder with its own HOME and
TMPDIR, offline (telemetry and update checks off), under a hard timeout that kills its whole process
group. Between the agent and the bridge sits a recording pass-through (Recorder), so the tests can
check that the agent really streamed, and a failure shows the exact requests and answers, the bridge's
log and the agent's output.

  Claude Code 2.1.337   (npm, package.json)  POST /v1/messages          Write, Bash
  Codex CLI 0.171.0     (npm, package.json)  POST /v1/responses         exec_command, apply_patch (custom)
  aider-chat 0.86.2     (PyPI, own venv)     POST /v1/chat/completions  "whole" edit format, no tools
  openai-agents 0.25.0  (PyPI, own venv)     Responses and chat models  a function tool of our own

setUpModule installs what is missing (`npm ci` for node_modules, venvs under .venv-agents/ with the
pinned versions) and reuses it afterwards. A test whose program could not be installed FAILS with the
install's error: these tests are never skipped.
"""
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from testsupport import HERE, MODEL_UUID, Harness

AGENT_TIMEOUT = 120             # seconds for one agent run (a good run takes 1-5 s)
INSTALL_TIMEOUT = 20 * 60       # seconds for one install (npm ci ~11 s, aider's venv ~25 s)
NODE_BIN = os.path.join(HERE, "node_modules", ".bin")
VENVS = os.path.join(HERE, ".venv-agents")
PYPI_PINS = {"aider": ("aider-chat", "0.86.2"), "openai-agents": ("openai-agents", "0.25.0")}
MODEL = "bridge-model"          # a name no agent knows: no model-specific behaviour
KNOWN_MODEL = "gpt-5.5"         # Codex knows it: it then offers apply_patch, a custom (free-form) tool
CLAUDE_KNOWN_MODEL = "claude-sonnet-4-5"    # Claude Code's other request shape: no system message
CONTENT = "hi from the bridge"
SHOUTED = CONTENT.upper()       # what `tr a-z A-Z < hello.txt` prints: appears nowhere but in a result
THINKING = "The user wants a file. I'll use my tool, then check the result."   # reasoning rows
OFFLINE_ENV = {                 # Claude Code: no telemetry, no update checks, nothing but our requests
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1", "DISABLE_ERROR_REPORTING": "1",
}


# Installing the agents (once; reused afterwards) ==================================================

INSTALL_ERRORS: dict = {}       # "node" | "aider" | "openai-agents" -> why it could not be installed


def _run_install(cmd, cwd=HERE):
    """Run an install command; None when it worked, else its command line and output's tail."""
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{' '.join(cmd)}` failed: {exc}"
    if p.returncode != 0:
        return f"`{' '.join(cmd)}` exited {p.returncode}:\n{(p.stdout + p.stderr)[-4000:]}"
    return None


def _node_pins_installed() -> bool:
    with open(os.path.join(HERE, "package.json"), encoding="utf-8") as f:
        pins = json.load(f)["devDependencies"]
    for name, version in pins.items():
        try:
            with open(os.path.join(HERE, "node_modules", name, "package.json"), encoding="utf-8") as f:
                if json.load(f).get("version") != version:
                    return False
        except (OSError, ValueError):
            return False
    return all(os.path.exists(os.path.join(NODE_BIN, b)) for b in ("claude", "codex"))


def ensure_node_agents():
    """node_modules/.bin/claude and codex at package.json's versions, else `npm ci` (once)."""
    if _node_pins_installed():
        return None
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not installed: install Node.js (20 or newer) and npm, then run the tests again"
    error = _run_install([npm, "ci", "--no-audit", "--no-fund"])
    if error is None and not _node_pins_installed():
        error = "`npm ci` worked but node_modules/.bin/claude or codex is missing or not the pinned version"
    return error


def venv_python(name: str) -> str:
    return os.path.join(VENVS, name, "bin", "python")


def _venv_has_pin(name: str) -> bool:
    dist, version = PYPI_PINS[name]
    py = venv_python(name)
    if not os.path.exists(py):
        return False
    check = f"import importlib.metadata as m, sys; sys.exit(m.version({dist!r}) != {version!r})"
    try:
        return subprocess.run([py, "-c", check], capture_output=True, timeout=60, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_venv(name: str):
    """.venv-agents/<name> with its pinned package, else a fresh venv and `pip install` (once)."""
    if _venv_has_pin(name):
        return None
    dist, version = PYPI_PINS[name]
    path = os.path.join(VENVS, name)
    error = (_run_install([sys.executable, "-m", "venv", "--clear", path])
             or _run_install([venv_python(name), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              f"{dist}=={version}"]))
    if error is None and not _venv_has_pin(name):
        error = f"{dist}=={version} is not importable in {path} after installing it"
    return error


def setUpModule():
    """Install what is missing, the three installs side by side; errors are kept for the tests."""
    jobs = {"node": ensure_node_agents, "aider": lambda: ensure_venv("aider"),
            "openai-agents": lambda: ensure_venv("openai-agents")}

    def work(key, fn):
        try:
            INSTALL_ERRORS[key] = fn()
        except Exception as exc:  # noqa: BLE001 - reported by the tests that need it
            INSTALL_ERRORS[key] = f"installing failed: {exc!r}"

    threads = [threading.Thread(target=work, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# The scripted model the fake tab plays ===========================================================

def prompt_of(task) -> str:
    """The text the bridge sent to LMArena for one task."""
    return task["payload"]["request"]["body"]["userMessage"]["content"]


def path_of(task) -> str:
    return task["payload"]["request"]["path"]


def call_block(name: str, arguments: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def custom_block(name: str, text: str) -> str:
    """A call of a custom (free-form) tool of the Responses API: `input` instead of `arguments`."""
    return "<tool_call>\n" + json.dumps({"name": name, "input": text}) + "\n</tool_call>"


def result_marker(name: str) -> str:
    return f'<tool_result name="{name}"'


def last_result(prompt: str, name: str) -> str:
    """The text of the last `<tool_result name=NAME ...>` block in the prompt ('' if none)."""
    found = re.findall(rf'<tool_result name="{re.escape(name)}"[^>]*>\n(.*?)\n</tool_result>', prompt, re.DOTALL)
    return found[-1] if found else ""


ODD_SIZES = (1, 6, 2, 13, 3, 9, 4, 17, 5)


def odd_rows(text: str, thinking: str = "") -> list:
    """The answer as LMArena rows of odd sizes (cutting through tags, JSON and words), a couple of
    short pauses, a finish row and [DONE]: the bridge's stream reader and call parser get real work."""
    rows, i, n = [f"ag:{json.dumps(thinking[k:k + 11])}\n" for k in range(0, len(thinking), 11)], 0, 0
    while i < len(text):
        size = ODD_SIZES[n % len(ODD_SIZES)]
        rows.append(f"a0:{json.dumps(text[i:i + size])}\n")
        if n % 7 == 3:
            rows.append(("sleep", 0.005))
        i, n = i + size, n + 1
    return rows + ['ad:{"finishReason":"stop"}\n', "[DONE]"]


class FakeModel:
    """The fake tab's script: a multi-step tool loop keyed by what the prompt holds.

    `steps` is a list of (reply, marker): `reply` is the text of the answer for that step (a line of
    text plus a `<tool_call>` block), `marker` a string that is in the prompt once the step's tool
    result came back. For each task the model finds the last step whose marker is in the prompt and
    plays the next one; after the last step it plays `final(prompt)`. This works whether the bridge
    sent the whole conversation folded into the prompt or continued it with only the new turn.
    With `thinking`, every answer starts with reasoning rows (`ag:`), as a reasoning model's do."""

    def __init__(self, steps, final, thinking=""):
        self.steps = steps
        self.final = final
        self.thinking = thinking
        self.answers = []           # (path, step index or "final", answer text), for the report

    def __call__(self, msg):
        prompt = prompt_of(msg)
        done = max((i + 1 for i, (_, marker) in enumerate(self.steps) if marker in prompt), default=0)
        if done >= len(self.steps):
            text, which = self.final(prompt), "final"
        else:
            text, which = self.steps[done][0], done
        self.answers.append((path_of(msg), which, text))
        return odd_rows(text, self.thinking)


# A recording pass-through between the agent and the bridge =======================================

def _read_message(data: bytes, at: int, has_body=True):
    """One HTTP/1.1 message of `data` from `at` -> (start line, headers, body, next offset), or None
    when incomplete. Bodies: Content-Length, chunked, or (a response without either) up to the end."""
    end = data.find(b"\r\n\r\n", at)
    if end < 0:
        return None
    head = data[at:end].decode("latin-1").split("\r\n")
    headers = {}
    for row in head[1:]:
        k, _, v = row.partition(":")
        headers[k.strip().lower()] = v.strip()
    pos = end + 4
    if not has_body:
        return head[0], headers, b"", pos
    if "content-length" in headers:
        n = int(headers["content-length"])
        return head[0], headers, data[pos:pos + n], pos + n
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            nl = data.find(b"\r\n", pos)
            if nl < 0:
                return head[0], headers, bytes(body), len(data)     # cut short: keep what came
            size = int(data[pos:nl].split(b";")[0] or b"0", 16)
            pos = nl + 2
            if size == 0:
                trailer = data.find(b"\r\n", pos)
                return head[0], headers, bytes(body), (trailer + 2 if trailer >= 0 else len(data))
            body += data[pos:pos + size]
            pos += size + 2
    if head[0].startswith("HTTP/"):
        return head[0], headers, data[pos:], len(data)
    return head[0], headers, b"", pos


class Recorder:
    """A TCP pass-through on 127.0.0.1:0 to the bridge that keeps every connection's bytes both
    ways; `exchanges()` pairs the requests with the bridge's answers."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.conns = []             # [(bytes from the agent, bytes from the bridge)]
        self.lock = threading.Lock()
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            bufs = (bytearray(), bytearray())
            with self.lock:
                self.conns.append(bufs)
                self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, bufs[0]), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, bufs[1]), daemon=True).start()

    def _pipe(self, src, dst, buf):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self.lock:
                    buf += data
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def exchanges(self) -> list:
        """[{method, path, headers, body (str), status, response_headers, response (str)}] in order
        of connections, then of requests on each connection."""
        out = []
        with self.lock:
            conns = [(bytes(a), bytes(b)) for a, b in self.conns]
        for sent, got in conns:
            i = j = 0
            while True:
                req = _read_message(sent, i)
                if req is None:
                    break
                start, headers, body, i = req
                method, _, rest = start.partition(" ")
                item = {"method": method, "path": rest.rsplit(" ", 1)[0], "headers": headers,
                        "body": body.decode("utf-8", "replace"), "status": None, "response_headers": {},
                        "response": ""}
                resp = _read_message(got, j, has_body=method != "HEAD")
                if resp is not None:
                    rstart, rheaders, rbody, j = resp
                    item.update(status=int(rstart.split(" ")[1]), response_headers=rheaders,
                                response=rbody.decode("utf-8", "replace"))
                out.append(item)
        return out

    def close(self):
        with contextlib.suppress(OSError):
            self.server.close()
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.close()


# Running an agent ================================================================================

def run_agent(cmd, cwd, env, timeout=AGENT_TIMEOUT):
    """Run a program in its own process group with stdin from /dev/null; on timeout kill the whole
    group. -> (returncode or None on timeout, stdout, stderr, seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc, err = None, err + f"\n[killed after the {timeout} s timeout]"
    with contextlib.suppress(ProcessLookupError):     # leftovers (a tool's background process)
        os.killpg(proc.pid, signal.SIGKILL)
    return rc, out, err, time.monotonic() - started


class LogKeeper(logging.Handler):
    """Keeps the bridge's log lines of one test."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - limit} characters left out ...]\n{text[-half:]}"


class RealAgentCase(unittest.TestCase):
    """A bridge with a fake tab, a Recorder in front of it, a clean temp folder (home, tmp, project)
    and the report a failure carries."""

    needs = "node"                  # which install the test needs (INSTALL_ERRORS key)

    def setUp(self):
        error = INSTALL_ERRORS.get(self.needs, f"setUpModule did not install {self.needs!r}")
        if error:
            self.fail(f"cannot run this test: {error}")
        self.keeper = LogKeeper()
        logging.getLogger("bridge").addHandler(self.keeper)
        self.addCleanup(logging.getLogger("bridge").removeHandler, self.keeper)
        self.h = Harness(config={"log_level": "info"}, models={MODEL: MODEL_UUID, KNOWN_MODEL: MODEL_UUID,
                                                                   CLAUDE_KNOWN_MODEL: MODEL_UUID})
        self.addCleanup(self.h.close)
        self.rec = Recorder(self.h.port)
        self.addCleanup(self.rec.close)
        self.tmp = tempfile.mkdtemp(prefix="real-agent-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.home, self.project = os.path.join(self.tmp, "home"), os.path.join(self.tmp, "project")
        for d in (self.home, self.project, os.path.join(self.tmp, "tmp")):
            os.makedirs(d)
        self.model = None
        self.tab = None
        self.run_result = None

    def base_env(self, **extra) -> dict:
        """A clean environment: no proxies, no keys or settings of the user's, offline switches."""
        env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "HOME": self.home,
               "TMPDIR": os.path.join(self.tmp, "tmp"), "TERM": "dumb", "LANG": "C.UTF-8",
               "NO_COLOR": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        env.update(OFFLINE_ENV)
        env.update(extra)
        return env

    def play(self, model: FakeModel):
        self.model = model
        self.tab = self.h.tab(model)

    def agent(self, cmd, env, cwd=None):
        self.run_result = run_agent(cmd, cwd or self.project, env)
        return self.run_result

    # -- the report a failure carries -------------------------------------------------------------

    def report(self) -> str:
        parts = []
        if self.run_result is not None:
            rc, out, err, secs = self.run_result
            parts += [f"agent exit code {rc} after {secs:.1f} s", "--- agent stdout ---", clip(out, 3000),
                      "--- agent stderr ---", clip(err, 6000)]
        exchanges = self.rec.exchanges()
        for n, x in enumerate(exchanges, 1):
            parts.append(f"--- exchange {n}: {x['method']} {x['path']} -> {x['status']} "
                         f"{x['response_headers'].get('content-type', '')}")
            if n <= 2 or n == len(exchanges):      # the rest is in the file
                parts += ["request body: " + clip(x["body"], 800), "answer: " + clip(x["response"], 2500)]
        if self.model is not None:
            parts.append("--- the fake model's answers ---")
            parts += [f"{path}: step {which}: {text!r}" for path, which, text in self.model.answers]
        parts += ["--- bridge log ---"] + self.keeper.lines[-60:]
        return "\n".join(parts)

    @contextlib.contextmanager
    def explained(self):
        """Checks inside fail with the whole story (also written in full to a file that stays)."""
        try:
            yield
        except AssertionError as exc:
            text = self.report()
            fd, path = tempfile.mkstemp(prefix=f"{self.id()}-", suffix=".log")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(str(exc) + "\n" + text)
                for x in self.rec.exchanges():
                    f.write(f"\n\n=== {x['method']} {x['path']} -> {x['status']}\n{json.dumps(x['headers'])}\n"
                            f"{x['body']}\n=== answer {json.dumps(x['response_headers'])}\n{x['response']}")
            raise AssertionError(f"{exc}\n(full report with every request and answer: {path})\n{text}") from None

    # -- shared checks ------------------------------------------------------------------------------

    def assertAgentDone(self, final: str):
        rc, out, _, _ = self.run_result
        self.assertEqual(rc, 0, "the agent failed")
        self.assertIn(final, out, "the final text is not on stdout")

    def assertFile(self, name: str, content: str):
        path = os.path.join(self.project, name)
        self.assertTrue(os.path.exists(path), f"{name} was not written; project holds {os.listdir(self.project)}")
        with open(path, encoding="utf-8") as f:
            self.assertEqual(f.read(), content)

    def assertStreamed(self, path: str, count: int) -> list:
        """`count` POSTs to `path`, each asking to stream and answered 200 with an event stream; the
        tab got exactly as many tasks (no retry, no side request). -> the exchanges."""
        posts = [x for x in self.rec.exchanges() if x["method"] == "POST"]
        self.assertEqual([x["path"].split("?")[0] for x in posts], [path] * count)
        for x in posts:
            self.assertIs(json.loads(x["body"]).get("stream"), True)
            self.assertEqual(x["status"], 200)
            self.assertTrue(x["response_headers"].get("content-type", "").startswith("text/event-stream"),
                            x["response_headers"])
        self.assertEqual(len(self.tab.tasks), count)
        return posts

    def assertContinued(self, tasks):
        """Every later turn of the agent's loop continued the LMArena conversation (post-to-evaluation
        with only the new turn) instead of sending the whole history again."""
        kinds = [path_of(t).split("/")[3] for t in tasks]      # /nextjs-api/stream/<kind>[/<id>]
        self.assertEqual(kinds, ["create-evaluation"] + ["post-to-evaluation"] * (len(tasks) - 1))

    def assertToolsInPrompt(self, *names):
        """The first prompt the bridge built describes the agent's tools and the call format."""
        prompt = prompt_of(self.tab.tasks[0])
        for name in names:
            self.assertIn(name, prompt, f"tool {name!r} is not described in the prompt")
        self.assertIn("<tool_call>", prompt)


# Claude Code ======================================================================================

class ClaudeCode(RealAgentCase):
    """Claude Code 2.1.337 (`claude -p`) through POST /v1/messages."""

    def claude(self, prompt, *flags, model=MODEL):
        env = self.base_env(ANTHROPIC_BASE_URL=self.rec.url, ANTHROPIC_API_KEY="sk-ant-test-key",
                            ANTHROPIC_MODEL=model, ANTHROPIC_DEFAULT_OPUS_MODEL=model,
                            ANTHROPIC_DEFAULT_SONNET_MODEL=model, ANTHROPIC_DEFAULT_HAIKU_MODEL=model,
                            CLAUDE_CODE_MAX_RETRIES="2")
        return self.agent([os.path.join(NODE_BIN, "claude"), "-p", prompt, "--permission-mode", "acceptEdits",
                           *flags], env)

    def write_step(self):
        target = os.path.join(self.project, "hello.txt")
        return ("I'll create the file.\n" + call_block("Write", {"file_path": target, "content": CONTENT}),
                result_marker("Write"))

    def test_write_tool(self):
        """The model calls Write; Claude Code writes the file, sends the result back, prints the final text."""
        final = "Done: the file is written."
        self.play(FakeModel([self.write_step()], lambda prompt: final))
        self.claude(f"Create a file hello.txt containing: {CONTENT}")
        with self.explained():
            self.assertAgentDone(final)
            self.assertFile("hello.txt", CONTENT)
            self.assertStreamed("/v1/messages", 2)
            self.assertToolsInPrompt("Write", "Bash", "Read", "Edit", "ToolSearch", "file_path")
            self.assertContinued(self.tab.tasks)
            self.assertIn("File created successfully", last_result(prompt_of(self.tab.tasks[1]), "Write"))

    def test_write_tool_known_model(self):
        """The same with a model name Claude Code knows: its other request shape (thinking with a
        budget, the environment in the first user message, an 87 KB first request)."""
        final = "Done: the file is written."
        self.play(FakeModel([self.write_step()], lambda prompt: final))
        self.claude(f"Create a file hello.txt containing: {CONTENT}", model=CLAUDE_KNOWN_MODEL)
        with self.explained():
            self.assertAgentDone(final)
            self.assertFile("hello.txt", CONTENT)
            posts = self.assertStreamed("/v1/messages", 2)
            self.assertEqual(json.loads(posts[0]["body"])["thinking"].get("type"), "enabled")
            self.assertToolsInPrompt("Write", "Bash", "Read", "Edit", "ToolSearch", "file_path")
            self.assertContinued(self.tab.tasks)

    def test_write_then_bash(self):
        """Two tool steps: Write, then Bash reading the file back; the final text quotes Bash's output."""
        steps = [self.write_step(),
                 ("Now let me check it.\n" + call_block("Bash", {"command": "tr a-z A-Z < hello.txt",
                                                                  "description": "Show the file in capitals"}),
                  SHOUTED)]
        self.play(FakeModel(steps, lambda p: f"Checked: the file reads {last_result(p, 'Bash').strip()}.",
                            thinking=THINKING))
        self.claude(f"Create hello.txt containing: {CONTENT}, then show it in capitals", "--allowedTools", "Bash")
        with self.explained():
            self.assertAgentDone(f"Checked: the file reads {SHOUTED}.")
            self.assertFile("hello.txt", CONTENT)
            self.assertStreamed("/v1/messages", 3)
            self.assertToolsInPrompt("Write", "Bash", "command")
            self.assertContinued(self.tab.tasks)


# Codex CLI ========================================================================================

class Codex(RealAgentCase):
    """OpenAI's Codex CLI 0.171.0 (`codex exec`) through POST /v1/responses (wire_api "responses")."""

    def codex(self, prompt, model=MODEL):
        codex_home = os.path.join(self.home, ".codex")
        os.makedirs(codex_home, exist_ok=True)
        with open(os.path.join(codex_home, "config.toml"), "w", encoding="utf-8") as f:
            f.write(f'model = "{model}"\nmodel_provider = "bridge"\ncheck_for_update_on_startup = false\n\n'
                    '[analytics]\nenabled = false\n\n'
                    '[model_providers.bridge]\nname = "LMArena Bridge"\n'
                    f'base_url = "{self.rec.url}/v1"\nwire_api = "responses"\nenv_key = "BRIDGE_API_KEY"\n')
        env = self.base_env(CODEX_HOME=codex_home, BRIDGE_API_KEY="sk-bridge-test-key")
        return self.agent([os.path.join(NODE_BIN, "codex"), "exec", "--strict-config", "--skip-git-repo-check",
                           "--sandbox", "workspace-write", prompt], env)

    def test_exec_command_write_then_read(self):
        """Two exec_command steps (write the file, read it back in capitals); the final text quotes the output."""
        steps = [("I'll write the file.\n" + call_block("exec_command", {
                     "cmd": f"printf '%s' '{CONTENT}' > hello.txt", "workdir": self.project}),
                  result_marker("exec_command")),
                 ("Let me check it.\n" + call_block("exec_command", {
                     "cmd": "tr a-z A-Z < hello.txt", "workdir": self.project}),
                  SHOUTED)]
        self.play(FakeModel(steps, lambda p: f"Checked: the file reads {SHOUTED}.", thinking=THINKING))
        self.codex(f"Create hello.txt containing: {CONTENT}, then show it in capitals")
        with self.explained():
            self.assertAgentDone(f"Checked: the file reads {SHOUTED}.")
            self.assertFile("hello.txt", CONTENT)
            self.assertStreamed("/v1/responses", 3)
            self.assertToolsInPrompt("exec_command", "write_stdin", "request_user_input", "cmd")
            self.assertContinued(self.tab.tasks)
            self.assertIn("exited with code 0", last_result(prompt_of(self.tab.tasks[1]), "exec_command"))

    def test_apply_patch_custom_tool(self):
        """With a model Codex knows, it offers apply_patch, a custom (free-form) tool: the model's
        `"input"` block is the patch, Codex applies it and gets the result back."""
        patch = f"*** Begin Patch\n*** Add File: {os.path.join(self.project, 'hello.txt')}\n+{CONTENT}\n*** End Patch\n"
        final = "Done: the patch is applied."
        self.play(FakeModel([("Applying a patch.\n" + custom_block("apply_patch", patch), result_marker("apply_patch"))],
                            lambda p: final))
        self.codex(f"Create a file hello.txt containing: {CONTENT}", model=KNOWN_MODEL)
        with self.explained():
            self.assertAgentDone(final)
            self.assertFile("hello.txt", CONTENT + "\n")
            self.assertStreamed("/v1/responses", 2)
            self.assertToolsInPrompt("apply_patch", "exec_command")
            self.assertContinued(self.tab.tasks)
            self.assertIn("Success", last_result(prompt_of(self.tab.tasks[1]), "apply_patch"))


# aider ============================================================================================

class Aider(RealAgentCase):
    """aider 0.86.2 through POST /v1/chat/completions: no tools, its "whole" edit format (the reply
    names the file and gives its whole new content in a fence)."""

    needs = "aider"

    def test_whole_file_edit(self):
        """aider sends the request (streaming), applies the model's whole-file reply to the file on disk."""
        reply = f"I'll write the file.\n\nhello.txt\n```\n{CONTENT}\n```\n"
        self.play(FakeModel([], lambda p: reply))
        env = self.base_env(OPENAI_API_KEY="sk-test-key", LITELLM_LOCAL_MODEL_COST_MAP="True")
        self.agent([os.path.join(VENVS, "aider", "bin", "aider"), "--openai-api-base", self.rec.url + "/v1",
                    "--model", f"openai/{MODEL}", "--yes-always", "--no-check-update", "--analytics-disable",
                    "--no-show-model-warnings", "--no-git", "--no-pretty", "--no-fancy-input",
                    "--message", f"Put exactly this line in hello.txt: {CONTENT}", "hello.txt"], env)
        with self.explained():
            self.assertEqual(self.run_result[0], 0, "aider failed")
            self.assertFile("hello.txt", CONTENT + "\n")
            self.assertStreamed("/v1/chat/completions", 1)
            prompt = prompt_of(self.tab.tasks[0])
            self.assertIn(f"Put exactly this line in hello.txt: {CONTENT}", prompt)
            self.assertIn("hello.txt", prompt)


# The OpenAI Agents SDK ============================================================================

AGENTS_SCRIPT = r'''
"""Run one Agents SDK agent with a function tool against the bridge, in several ways; print JSON."""
import asyncio, json, os, sys, traceback
from openai import AsyncOpenAI
from agents import (Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, function_tool,
                    set_tracing_disabled)

set_tracing_disabled(True)
base_url, workdir = sys.argv[1], sys.argv[2]
calls = []


@function_tool
def write_file(path: str, content: str) -> str:
    """Write a text file (path relative to the working directory) with the given content."""
    calls.append({"path": path, "content": content})
    with open(os.path.join(workdir, path), "w", encoding="utf-8") as f:
        f.write(content)
    return f"wrote {len(content)} characters to {path}"


async def main():
    client = AsyncOpenAI(base_url=base_url, api_key="sk-test-key", max_retries=0, timeout=60)
    out = {}
    runs = [(api, streamed, False) for api in ("responses", "chat") for streamed in (False, True)]
    runs.append(("responses", False, True))        # chained with previous_response_id
    for api, streamed, chained in runs:
        key = "responses-chained" if chained else f"{api}-{'stream' if streamed else 'plain'}"
        calls.clear()
        if api == "responses":
            model = OpenAIResponsesModel(model="bridge-model", openai_client=client)
        else:
            model = OpenAIChatCompletionsModel(model="bridge-model", openai_client=client)
        agent = Agent(name="writer", instructions="You write files with the write_file tool.",
                      tools=[write_file], model=model)
        prompt = f"Create the file {key}.txt containing: hi from the bridge"
        try:
            if streamed:
                run = Runner.run_streamed(agent, prompt)
                async for _ in run.stream_events():
                    pass
            else:
                run = await Runner.run(agent, prompt, auto_previous_response_id=chained)
            out[key] = {"final": run.final_output, "calls": list(calls)}
        except Exception:
            out[key] = {"error": traceback.format_exc(), "calls": list(calls)}
    print("RESULT " + json.dumps(out))


asyncio.run(main())
'''


class OpenAIAgentsSDK(RealAgentCase):
    """openai-agents 0.25.0: an agent with a function tool, with OpenAIResponsesModel (POST
    /v1/responses) and OpenAIChatCompletionsModel (POST /v1/chat/completions), each run once plain
    (Runner.run) and once streamed (Runner.run_streamed); and once more with the Responses model
    chaining its turns by previous_response_id (the second request carries only the tool output)."""

    needs = "openai-agents"
    RUNS = ("responses-plain", "responses-stream", "chat-plain", "chat-stream", "responses-chained")

    def test_function_tool_with_responses_and_chat_models(self):
        """Every run calls write_file with the right arguments and ends with the model's final text."""
        def write_step(prompt):
            name = re.search(r"Create the file (\S+\.txt) containing", prompt).group(1)
            return "I'll write it.\n" + call_block("write_file", {"path": name, "content": CONTENT})

        class Model(FakeModel):
            def __call__(self, msg):          # the file name comes from the prompt (one per run)
                prompt = prompt_of(msg)
                done = result_marker("write_file") in prompt
                text = (f"Done: {last_result(prompt, 'write_file')}." if done else write_step(prompt))
                self.answers.append((path_of(msg), "final" if done else 0, text))
                return odd_rows(text)

        self.play(Model([], None))
        script = os.path.join(self.tmp, "agents_run.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(AGENTS_SCRIPT)
        env = self.base_env(OPENAI_AGENTS_DISABLE_TRACING="1")
        rc, out, _, _ = self.agent([venv_python("openai-agents"), script, self.rec.url + "/v1", self.project], env)
        with self.explained():
            self.assertEqual(rc, 0, "the script failed")
            results = json.loads(out.split("RESULT ", 1)[1])
            for key in self.RUNS:
                with self.subTest(run=key):
                    got = results[key]
                    self.assertNotIn("error", got, got.get("error"))
                    self.assertEqual(got["calls"], [{"path": f"{key}.txt", "content": CONTENT}])
                    self.assertEqual(got["final"], f"Done: wrote {len(CONTENT)} characters to {key}.txt.")
                    self.assertFile(f"{key}.txt", CONTENT)
            posts = [x for x in self.rec.exchanges() if x["method"] == "POST"]
            bodies = [json.loads(x["body"]) for x in posts]
            self.assertEqual([(x["path"], b.get("stream", False)) for x, b in zip(posts, bodies)],
                             [("/v1/responses", False)] * 2 + [("/v1/responses", True)] * 2
                             + [("/v1/chat/completions", False)] * 2 + [("/v1/chat/completions", True)] * 2
                             + [("/v1/responses", False)] * 2)
            self.assertEqual([x["status"] for x in posts], [200] * 10)
            first_id = json.loads(posts[8]["response"])["id"]
            self.assertEqual(bodies[9].get("previous_response_id"), first_id)
            self.assertEqual([i.get("type") for i in bodies[9]["input"]], ["function_call_output"])
            self.assertEqual(len(self.tab.tasks), 10)
            self.assertToolsInPrompt("write_file", "content")
            for run in range(5):                  # each run is one conversation of 2 turns
                self.assertContinued(self.tab.tasks[2 * run:2 * run + 2])


if __name__ == "__main__":
    unittest.main()
