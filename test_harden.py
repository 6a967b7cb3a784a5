"""Tests of issue 20's faults (hostile review of 3.1.0): each failed before its fix.

Real bridges on 127.0.0.1:0 (testsupport.Harness), fake tabs, raw HTTP and the SDKs.
Run: python -m unittest -v test_harden
"""
import json
import os
import random
import socket
import threading
import time
import types
import unittest

import bridge
from testsupport import BridgeCase, Harness, lines, chat, exposed_bridge, log_records, non_loopback_ip, run_stop_filter


def tool(name="f", description="A tool."):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}}}}


def anthropic(messages, **kw):
    body = {"model": "test-model", "max_tokens": 10, "messages": messages}
    body.update(kw)
    return body


def naive_stops(pieces, stops):
    """The documented rule, the slow way: the earliest-ending stop wins, ties to the earlier start."""
    text = "".join(pieces)
    best = None
    for s in stops:
        if not s:
            continue
        at = text.find(s)
        while at >= 0:
            cand = (at + len(s), at, s)
            if best is None or cand[:2] < best[:2]:
                best = cand
            at = text.find(s, at + 1)
    return (text, []) if best is None else (text[:best[1]], [best[2]])


run_filter = run_stop_filter


class StopStrings(BridgeCase):
    """High: stop strings froze the loop (every stop checked on every delta, no cap)."""

    def test_too_many_stops_is_a_clear_400_on_every_api(self):
        self.h.tab()
        many = [f"s{i}" for i in range(bridge.MAX_STOPS + 1)]
        status, _, body = self.post(body=chat("hi", stop=many))
        self.assertEqual(status, 400, body)
        self.assertIn(str(bridge.MAX_STOPS), json.loads(body)["error"]["message"])
        status, _, body = self.post("/v1/messages", anthropic([{"role": "user", "content": "hi"}],
                                                              stop_sequences=many))
        self.assertEqual(status, 400, body)
        self.assertEqual(json.loads(body)["type"], "error")
        self.assertIn("stop_sequences", json.loads(body)["error"]["message"])
        long_ones = ["x" * 1000] * 5
        status, _, body = self.post(body=chat("hi", stop=long_ones))
        self.assertEqual(status, 400, body)
        self.assertIn(str(bridge.MAX_STOP_CHARS), json.loads(body)["error"]["message"])
        # the bound itself passes
        status, _, body = self.post(body=chat("hi", stop=many[:bridge.MAX_STOPS]))
        self.assertEqual(status, 200, body)

    def test_one_pass_matches_the_documented_rule_at_every_split(self):
        rnd = random.Random(20)
        for _ in range(300):
            stops = ["".join(rnd.choice("ab") for _ in range(rnd.randint(1, 4))) for _ in range(rnd.randint(1, 5))]
            text = "".join(rnd.choice("abc") for _ in range(rnd.randint(0, 14)))
            want = naive_stops([text], stops)
            for i in range(len(text) + 1):
                pieces = [text[:i], text[i:]]
                self.assertEqual(run_filter(pieces, stops), want, (stops, text, i))
            self.assertEqual(run_filter(list(text), stops), want, (stops, text))

    def test_many_stops_cost_does_not_grow_with_their_count(self):
        """64 stops over a long answer in small deltas: about the cost of one stop (not 64 times)."""
        text = ("lorem ipsum dolor sit amet " * 4000)
        pieces = [text[i:i + 4] for i in range(0, len(text), 4)]

        def cost(stops):
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                run_filter(pieces, stops)
                best = min(best, time.perf_counter() - started)
            return best
        one = cost(["QQQQ0"])
        many = cost([f"QQQQ{i}" for i in range(bridge.MAX_STOPS)])
        self.assertLess(many / one, 8, (many, one))


class LoneSurrogates(BridgeCase):
    """A lone surrogate (JSON allows "\\ud800") in model or client text: never a 500, streams end."""

    def post_ok(self, path, body):
        status, _, raw = self.post(path, body)
        self.assertEqual(status, 200, raw)
        return raw

    def test_model_tool_call_arguments(self):
        block = '<tool_call>{"name": "f", "arguments": {"a": "\\ud800"}}</tool_call>'
        self.h.tab(lines(block) + ["[DONE]"])
        out = json.loads(self.post_ok("/v1/chat/completions", chat("x", tools=[tool()])))
        self.assertEqual(json.loads(out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]),
                         {"a": "\ud800"})
        raw = self.post_ok("/v1/chat/completions", chat("x", tools=[tool()], stream=True))
        self.assertTrue(raw.rstrip().endswith(b"data: [DONE]"), raw[-200:])
        raw = self.post_ok("/v1/messages", anthropic([{"role": "user", "content": "x"}], stream=True, tools=[
            {"name": "f", "input_schema": {"type": "object"}}]))
        self.assertIn(b"event: message_stop", raw)

    def test_client_histories_and_names(self):
        self.h.tab(lines("hello") + ["[DONE]"])
        hist = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "f", "arguments": '{"a": "\ud800"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "r"}]
        for _ in range(2):          # the second time the conversation is remembered
            self.post_ok("/v1/chat/completions", chat(hist, tools=[tool()]))
        self.post_ok("/v1/chat/completions", chat(hist + [{"role": "assistant", "content": "hello"},
                                                          {"role": "user", "content": "more"}], tools=[tool()]))
        ah = [{"role": "user", "content": "x"},
              {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": "\ud800"}}]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"}]}]
        for _ in range(2):
            self.post_ok("/v1/messages", anthropic(ah, tools=[{"name": "f", "input_schema": {"type": "object"}}]))
        ri = [{"role": "user", "content": "x"},
              {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": "\ud800"}'},
              {"type": "function_call_output", "call_id": "c1", "output": "r"}]
        for _ in range(2):
            self.post_ok("/v1/responses", {"model": "test-model", "input": ri, "tools": [
                {"type": "function", "name": "f", "parameters": {"type": "object"}}]})
        self.post_ok("/v1/chat/completions", chat("x", tools=[tool(description="d\ud800")]))
        self.post_ok("/v1/messages/count_tokens", anthropic([{"role": "user", "content": "x"}], tools=[
            {"name": "f", "description": "\ud800", "input_schema": {"type": "object"}}]))

    def test_user_file_with_a_lone_surrogate_is_written(self):
        path = self.h.dir + "/written.json"
        bridge.atomic_write(path, '{"a": "\ud800"}')
        with open(path, encoding="utf-8") as f:
            self.assertEqual(json.load(f), {"a": "\ud800"})


class LoneSurrogateModelName(BridgeCase):
    config = {"session_mode": "retry"}

    def test_model_name(self):
        """A model name "x\ud800" (sent with the captured session in retry mode) is answered."""
        self.h.tab(lines("hello") + ["[DONE]"])
        for path, body in (("/v1/chat/completions", chat("x", model="x\ud800")),
                           ("/v1/messages", anthropic([{"role": "user", "content": "x"}], model="x\ud800"))):
            status, _, raw = self.post(path, body)
            self.assertEqual(status, 200, raw)



@unittest.skipIf(non_loopback_ip() is None, "this machine has no non-loopback address")
class StatusPageTrust(unittest.TestCase):
    """GET / shows tab URLs, last errors and the config path only to this machine or with the key."""

    def test_lan_client_without_key_sees_the_summary_only(self):
        h, b, ip = exposed_bridge(self)

        def page(key=None):
            with socket.create_connection((ip, b.port), timeout=5) as s:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {ip}:{b.port}\r\nAccept: text/html\r\n"
                          f"{'Authorization: Bearer ' + key + chr(13) + chr(10) if key else ''}"
                          "Connection: close\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            return data.decode()
        anonymous = page()
        self.assertIn("200", anonymous.split("\r\n")[0])
        self.assertNotIn(h.config_path, anonymous)
        self.assertNotIn("no LMArena tab is connected", anonymous)
        self.assertIn("with the API key", anonymous)
        self.assertIn(h.config_path, page("k"))


class OddTabStatus(BridgeCase):
    """Low: a tab status with wrong types made GET / answer 500 and doctor crash."""

    def test_wrong_types_in_a_status_report(self):
        tab = self.h.tab()
        self.h.run(tab.send({"type": "status", "recaptcha": "yes", "actions": ["generateUploadUrl"],
                             "logged_in": [1]}))
        self.h.wait(lambda: self.h.bridge.pool.tabs[0].status.get("recaptcha") == "yes")
        status, _, body = self.get("/", {"Accept": "text/html"})
        self.assertEqual(status, 200, body[:300])
        out = []
        code = bridge.cmd_doctor(types.SimpleNamespace(config=self.h.config_path, bridge=self.h.url, send=None),
                                 out=out.append)
        self.assertEqual(code, 1, out)
        self.assertTrue(any(line.startswith("FAIL tab1 recaptcha") for line in out), out)
        for odd in ([1, 2], {"tab_details": "x", "config": [], "version": "9"}, {"tab_details": [1, {"status": 3}]}):
            bridge.doctor_checks(odd)

    def test_last_error_is_a_note_not_an_ok_line(self):
        self.h.tab()
        self.h.bridge.pool.tabs[0].last_error = "upstream_error: boom"
        out = []
        bridge.cmd_doctor(types.SimpleNamespace(config=self.h.config_path, bridge=self.h.url, send=None),
                          out=out.append)
        self.assertIn("note tab1 last error: upstream_error: boom", out)
        self.assertFalse([line for line in out if line.startswith("ok") and "error" in line], out)


class DoctorPlaceholders(BridgeCase):
    config = {"session_mode": "retry", "session_id": "YOUR_SESSION_ID", "message_id": "YOUR_MESSAGE_ID"}

    def test_retry_mode_with_placeholder_ids_is_a_fail(self):
        out = []
        code = bridge.cmd_doctor(types.SimpleNamespace(config=self.h.config_path, bridge=self.h.url, send=None),
                                 out=out.append)
        self.assertEqual(code, 1)
        self.assertTrue(out[0].startswith("FAIL config:") and "placeholders" in out[0], out)
        self.assertFalse([line for line in out if line.startswith("ok config")], out)
        checks = bridge.doctor_checks(self.h.bridge.health(True))
        self.assertEqual(checks[0][:2], (False, "config"))


class DoctorAgainstOddServers(unittest.TestCase):
    """Low: doctor against a non-HTTP server, HTML, odd JSON or a slow server: one line, one deadline."""

    def serve(self, answer, slow=False):
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        self.addCleanup(srv.close)
        stop = threading.Event()
        self.addCleanup(stop.set)

        def run():
            while not stop.is_set():
                try:
                    c, _ = srv.accept()
                except OSError:
                    return
                with c:
                    c.settimeout(1)
                    try:
                        c.recv(65536)
                        if slow:
                            for b in answer:
                                if stop.wait(1.0):
                                    return
                                c.sendall(bytes([b]))
                        else:
                            c.sendall(answer)
                    except OSError:
                        pass
        threading.Thread(target=run, daemon=True).start()
        return f"http://127.0.0.1:{srv.getsockname()[1]}"

    def doctor(self, url):
        h = Harness()
        self.addCleanup(h.close)
        out = []
        started = time.monotonic()
        code = bridge.cmd_doctor(types.SimpleNamespace(config=h.config_path, bridge=url, send=None), out=out.append)
        return code, out, time.monotonic() - started

    def test_odd_servers(self):
        html = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 13\r\n\r\n<html></html>"
        odd = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n[1, 2, 3]"
        for answer in (b"SSH-2.0-OpenSSH_9.6\r\n", html, odd):
            code, out, _ = self.doctor(self.serve(answer))
            self.assertEqual(code, 1, out)
            self.assertTrue(out[-1].startswith("FAIL bridge:"), out)
            self.assertIn("another", out[-1])

    def test_slow_server_meets_one_deadline(self):
        url = self.serve(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", slow=True)
        old = bridge.call_bridge.__defaults__
        bridge.call_bridge.__defaults__ = (None, 2.0)
        try:
            code, out, took = self.doctor(url)
        finally:
            bridge.call_bridge.__defaults__ = old
        self.assertEqual(code, 1, out)
        self.assertLess(took, 5, out)
        self.assertIn("within 2 s", out[-1])



class RequestChecks(BridgeCase):
    """Low items on the request side: name types, deep schemas, message counts, 500s' shape."""

    def test_tool_choice_names_of_wrong_types_are_400(self):
        self.h.tab()
        fn = [{"name": "f", "parameters": {"type": "object"}}]
        for body in (chat("x", tools=[tool()], tool_choice={"type": "function", "function": {"name": ["f"]}}),
                     chat("x", functions=fn, function_call={"name": {"a": 1}})):
            status, _, raw = self.post(body=body)
            self.assertEqual(status, 400, raw)
            self.assertIn("must be a string", json.loads(raw)["error"]["message"])
        status, _, raw = self.post("/v1/responses", {"model": "test-model", "input": "x", "tool_choice": {
            "type": "function", "name": []}, "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]})
        self.assertEqual(status, 400, raw)

    def test_count_tokens_deep_schema_and_many_messages(self):
        deep = b'{"a":' * 900 + b'1' + b'}' * 900
        status, _, raw = self.post("/v1/messages/count_tokens", b'{"model": "test-model", "messages": [{"role": '
                                   b'"user", "content": "x"}], "tools": [{"name": "f", "input_schema": {"type": '
                                   b'"object", "properties": ' + deep + b'}}]}')
        self.assertIn(status, (200, 400), raw)
        many = b'{"model": "test-model", "messages": [' + b",".join([b'{"role":"user","content":"x"}'] * 6000) + b']}'
        status, _, raw = self.post("/v1/messages/count_tokens", many)
        self.assertEqual(status, 413, raw)
        self.assertIn("max_messages", json.loads(raw)["error"]["message"])

    def test_a_500_on_messages_is_in_anthropics_shape(self):
        from unittest import mock
        with mock.patch.object(bridge, "count_input_tokens", side_effect=RuntimeError("a bug")), \
                self.assertLogs(bridge.log, "ERROR"):
            status, _, raw = self.post("/v1/messages/count_tokens", anthropic([{"role": "user", "content": "x"}]))
        self.assertEqual(status, 500, raw)
        self.assertEqual(json.loads(raw), {"type": "error", "error": {
            "type": "api_error", "message": "Internal error in the bridge; see its log."}})


class UnknownModelInCreateMode(BridgeCase):
    """A name not in models.json in create mode: 404 model_not_found with suggestions, nothing sent;
    the log line and the status page's recent requests name it."""

    def test_404_with_did_you_mean_before_anything_is_sent(self):
        tab = self.h.tab()
        records = log_records(self)
        for path, body in (("/v1/chat/completions", chat("x", model="test-modle")),
                           ("/v1/messages", anthropic([{"role": "user", "content": "x"}], model="test-modle")),
                           ("/v1/responses", {"model": "test-modle", "input": "x"})):
            status, headers, raw = self.post(path, body)
            self.assertEqual(status, 404, raw)
            message = json.loads(raw)["error"]["message"]
            self.assertIn("Did you mean: test-model", message)
            self.assertEqual(headers.get("x-should-retry"), "false")
        self.assertEqual(tab.tasks, [])
        logged = [r.getMessage() for r in records if "status=404" in r.getMessage()]
        self.assertEqual(len(logged), 3, logged)
        self.assertTrue(all("model='test-modle'" in m for m in logged), logged)
        recent = self.h.bridge.health(True)["recent_requests"]
        self.assertEqual([(r["model"], r["status"], r["error"]) for r in recent[-3:]],
                         [("test-modle", 404, "model_not_found")] * 3)
        _, _, page = self.get("/", {"Accept": "text/html"})
        self.assertIn(b"test-modle", page)
        # a lone surrogate in the name: a 404 too, not a 500
        status, _, raw = self.post(body=chat("x", model="x\ud800"))
        self.assertEqual(status, 404, raw)



def strict_json(text):
    """As Node's JSON.parse: NaN, Infinity and -Infinity are not JSON."""
    def refuse(name):
        raise ValueError(name)
    return json.loads(text, parse_constant=refuse)


class OutOfRangeNumbers(BridgeCase):
    """1e400 in a model's tool arguments: the block stays text (as NaN does), never Infinity."""

    def test_1e400_keeps_the_block_as_text(self):
        block = '<tool_call>{"name": "f", "arguments": {"a": 1e400}}</tool_call>'
        self.h.tab(lines(block) + ["[DONE]"])
        status, _, raw = self.post(body=chat("x", tools=[tool()]))
        self.assertEqual(status, 200, raw)
        message = strict_json(raw)["choices"][0]["message"]
        self.assertNotIn("tool_calls", message)
        self.assertIn("1e400", message["content"])
        status, _, raw = self.post("/v1/messages", anthropic([{"role": "user", "content": "x"}], tools=[
            {"name": "f", "input_schema": {"type": "object"}}]))
        self.assertEqual(status, 200, raw)
        self.assertEqual([b["type"] for b in strict_json(raw)["content"]], ["text"])
        status, _, raw = self.post(body=chat("x", tools=[tool()], stream=True))
        for line in raw.decode().splitlines():
            if line.startswith("data: {"):
                strict_json(line[6:])
        self.assertNotIn(b"Infinity", raw)


@unittest.skipIf(non_loopback_ip() is None, "this machine has no non-loopback address")
class PerPeerConnectionCap(unittest.TestCase):
    """Sockets from one other machine sending partial heads cannot take every connection: a keyed
    loopback client and a new tab still get in."""

    def test_one_peer_cannot_take_every_connection(self):
        h, b, ip = exposed_bridge(self, {"api_key": "k", "max_connections": 40, "max_connections_per_peer": 8})
        held = []
        for _ in range(8):
            s = socket.create_connection((ip, b.port), timeout=5)
            self.addCleanup(s.close)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x")     # a head that never ends
            held.append(s)
        h.wait(lambda: len(b.connections) >= 8)
        with socket.create_connection((ip, b.port), timeout=5) as s:
            s.sendall(f"GET /health HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
            self.assertIn(b" 503 ", s.recv(65536).split(b"\r\n")[0] + b" ")
        with socket.create_connection(("127.0.0.1", b.port), timeout=5) as s:
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer k\r\n"
                      b"Connection: close\r\n\r\n")
            self.assertTrue(s.recv(65536).startswith(b"HTTP/1.1 200"))
        import websockets

        async def tab():
            async with websockets.connect(f"ws://127.0.0.1:{b.port}/ws", origin="https://lmarena.ai"):
                return True
        self.assertTrue(h.run(tab()))
        for s in held:
            s.close()
        h.wait(lambda: not b.peer_connections, what="the peer's count back to zero")



def worst_health_during(h, action):
    """Run `action` while polling /health from another thread; the slowest /health in seconds."""
    import http.client
    stop, worst = threading.Event(), [0.0]

    def poll():
        while not stop.is_set():
            started = time.perf_counter()
            c = http.client.HTTPConnection("127.0.0.1", h.port, timeout=30)
            c.request("GET", "/health")
            c.getresponse().read()
            c.close()
            worst[0] = max(worst[0], time.perf_counter() - started)
    t = threading.Thread(target=poll)
    t.start()
    try:
        action()
    finally:
        stop.set()
        t.join(30)
    return worst[0]


class BigTabReports(BridgeCase):
    """A models report with 20,000 changed ids, and a huge status report, from a tab."""

    def test_jsonc_update_is_linear(self):
        def cost(n):
            text = "{\n  // mine\n" + ",\n".join(f'  "m{i}": "old"' for i in range(n)) + "\n}\n"
            updates = {f"m{i}": "new" for i in range(n)}
            spans, _ = bridge.top_level_spans(text)
            started = time.perf_counter()
            out = bridge.jsonc_update(text, updates)
            took = time.perf_counter() - started
            self.assertEqual(out.count('"new"'), n)
            return took, spans
        (small, _), (large, _) = cost(1000), cost(32000)
        self.assertLess(large / small, 55, (small, large))       # 32x the ids: ~32x (quadratic: ~90x here)

    def test_20000_changed_ids_do_not_block_health(self):
        path = os.path.join(self.h.dir, "models.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({f"model-{i}": f"aaaaaaaa-0000-4000-8000-{i:012d}" for i in range(20000)}, f, indent=2)
        self.h.bridge.files.refresh()
        page = [{"id": f"bbbbbbbb-0000-4000-8000-{i:012d}", "publicName": f"model-{i}",
                 "capabilities": {"outputCapabilities": {"text": True}}} for i in range(20000)]
        tab = self.h.tab()

        def report():
            self.h.run(tab.send({"type": "models", "models": page}))
            self.h.wait(lambda: self.h.bridge.files.models.get("model-19999", "").startswith("bbbbbbbb"),
                        timeout=30, what="the merge")
        self.assertLess(worst_health_during(self.h, report), 1.0)

    def test_huge_status_report_is_not_echoed(self):
        tab = self.h.tab()
        self.h.run(tab.send({"type": "status", "recaptcha": {"loaded": True}, "junk": "x" * 3_000_000}))
        self.h.run(tab.send({"type": "status", "recaptcha": {"loaded": True}, "small": 1}))
        self.h.wait(lambda: self.h.bridge.pool.tabs[0].status.get("small") == 1)
        self.h.run(tab.send({"type": "status", "recaptcha": {"loaded": True}, "junk": "x" * 3_000_000}))
        time.sleep(0.2)
        status, _, body = self.get("/health")
        self.assertEqual(status, 200)
        self.assertLess(len(body), 100_000)
        self.assertEqual(self.h.bridge.pool.tabs[0].status.get("small"), 1)


class UnescapedLogLines(BridgeCase):
    """Image-generation errors and the update manifest's version cannot forge log lines."""

    def records(self):
        return log_records(self)

    def test_image_error_is_escaped(self):
        records = self.records()
        calls = iter(range(10))

        def script(msg):
            if next(calls) == 0:
                return [{"error": "boom\n2099-01-01 INFO FORGED", "status": 400}]
            return ['a2:[{"type":"image","image":"https://img/x.png","mimeType":"image/png"}]\n', "[DONE]"]
        self.h.tab(script)
        status, _, raw = self.post("/v1/images/generations", {"model": "image-model", "prompt": "p", "n": 2})
        self.assertEqual(status, 200, raw)
        messages = [r.getMessage() for r in records]
        self.assertTrue(any("FORGED" in m for m in messages), messages)
        for m in messages:
            self.assertNotIn("\n", m)

    def test_manifest_version_is_escaped(self):
        from testsupport import FileServer
        records = self.records()
        srv = FileServer({"/m.json": json.dumps({"version": "99.0\n2099-01-01 INFO FORGED", "files": {}}).encode()})
        self.addCleanup(srv.close)
        h = Harness({"enable_auto_update": True, "update_url": srv.url + "/m.json", "log_level": "info"})
        self.addCleanup(h.close)
        h.wait(lambda: any("FORGED" in r.getMessage() for r in records), what="the update notice logged")
        for r in records:
            self.assertNotIn("\n", r.getMessage())



class MutationsThatSurvived(BridgeCase):
    """One test per one-line change the sampled mutation run could not catch."""

    def test_origin_that_does_not_parse_is_not_lmarena(self):
        for origin in ("https://[lmarena.ai", "https://[::1", "http://[x]"):
            self.assertFalse(bridge.origin_is_lmarena(origin), origin)
        self.assertTrue(bridge.origin_is_lmarena("https://lmarena.ai"))

    def test_allow_header_of_get_routes_lists_head(self):
        status, headers, _ = self.post("/health", body=b"{}")
        self.assertEqual(status, 405)
        self.assertIn("HEAD", [m.strip() for m in headers["allow"].split(",")])

    def test_tab_names_start_at_tab1(self):
        self.h.tab()
        self.h.tab()
        self.assertEqual([t.name for t in self.h.bridge.pool.tabs], ["tab1", "tab2"])

    def test_learned_shape_is_saved_with_its_age(self):
        files = self.h.bridge.files
        files.save_shape("create-evaluation", {"x": 1})
        with open(files.shape_path, encoding="utf-8") as f:
            saved = json.load(f)
        self.assertIsInstance(saved["learned_at"], (int, float))
        self.assertLess(abs(saved["learned_at"] - time.time()), 60)

    def test_assistant_refusal_part_is_kept_in_the_history(self):
        tab = self.h.tab()
        msgs = [{"role": "user", "content": "one"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I will not say that."}]},
                {"role": "user", "content": "two"}]
        status, _, raw = self.post(body=chat(msgs))
        self.assertEqual(status, 200, raw)
        self.assertIn("I will not say that.", tab.tasks[-1]["payload"]["request"]["body"]["userMessage"]["content"])

    def test_control_frame_inside_a_fragmented_message(self):
        """A ping between the fragments of a tab message is not taken as a continuation."""
        from websockets.frames import Frame, Opcode
        tab = self.h.tab([("hang",)])
        got = {}

        def answer(rid):
            text = json.dumps({"request_id": rid, "data": lines("whole")[0]}).encode()
            frames = [Frame(Opcode.TEXT, text[:10], fin=False), Frame(Opcode.PING, b"p"),
                      Frame(Opcode.CONT, text[10:], fin=True),
                      Frame(Opcode.TEXT, json.dumps({"request_id": rid, "data": "[DONE]"}).encode())]
            tab.ws.transport.write(b"".join(f.serialize(mask=True) for f in frames))

        def ask():
            got["r"] = self.post(body=chat("x"))
        t = threading.Thread(target=ask)
        t.start()
        self.h.wait(lambda: tab.tasks, what="the task")
        self.h.loop.call_soon_threadsafe(answer, tab.tasks[0]["request_id"])
        t.join(20)
        status, _, raw = got["r"]
        self.assertEqual(status, 200, raw)
        self.assertEqual(json.loads(raw)["choices"][0]["message"]["content"], "whole")


class RetryModeHistory(BridgeCase):
    config = {"session_mode": "retry"}

    def test_fabricated_history_carries_each_turns_content(self):
        tab = self.h.tab()
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the prompt"}]
        status, _, raw = self.post(body=chat(msgs))
        self.assertEqual(status, 200, raw)
        sent = tab.tasks[-1]["payload"]["request"]["body"]["messages"]
        self.assertEqual([m.get("content") for m in sent], ["Be brief.", "the prompt"])



class LearnedShapes(BridgeCase):
    """A tab cannot break every request, across restarts, with a learned request shape."""

    def deep(self, n):
        value = 1
        for _ in range(n):
            value = {"a": value}
        return value

    def test_500_deep_report_is_not_used_or_saved(self):
        tab = self.h.tab()
        raw = '{"type": "request_shape", "endpoint": "create-evaluation", "body": {"sessionContext": ' \
              + '{"a":' * 500 + '1' + '}' * 500 + '}}'
        self.h.run(tab.ws.send(raw))
        self.h.run(tab.send({"type": "status", "marker": 1}))
        self.h.wait(lambda: self.h.bridge.pool.tabs[0].status.get("marker") == 1)
        self.assertIsNone(self.h.bridge.files.shape)
        self.assertFalse(os.path.exists(os.path.join(self.h.dir, "request_shape.json")))
        self.assertEqual(self.h.ask().choices[0].message.content, "Hello world!")

    def test_bad_saved_file_is_ignored_with_a_log_line(self):
        path = os.path.join(self.h.dir, "request_shape.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write('{"learned_at": 1, "endpoint": "create-evaluation", "body": {"sessionContext": '
                    + '{"a":' * 500 + '1' + '}' * 500 + '}}')
        files = bridge.UserFiles(self.h.config_path)      # as after a restart: read from disk
        files.load_all(report=lambda m: None)

        async def start():
            b = bridge.Bridge(files, "127.0.0.1", 0)
            await b.start()
            return b
        with self.assertLogs(bridge.log, "WARNING") as logs:
            b = self.h.run(start())
        self.assertIsNone(files.shape)
        self.assertTrue(any("request_shape.json" in line for line in logs.output), logs.output)
        self.addCleanup(lambda: self.h.run(b.stop(grace=0)))
        import openai
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{b.port}/v1", api_key="x", max_retries=0, timeout=20)
        self.addCleanup(client.close)
        import websockets

        async def tab_and_ask():
            ws = await websockets.connect(f"ws://127.0.0.1:{b.port}/ws", origin="https://lmarena.ai")

            async def play():
                async for msg in ws:
                    m = json.loads(msg)
                    if "payload" in m:
                        for item in lines("ok") + ["[DONE]"]:
                            await ws.send(json.dumps({"request_id": m["request_id"], "data": item}))
            return ws, asyncio.get_running_loop().create_task(play())
        import asyncio
        ws, task = self.h.run(tab_and_ask())
        self.addCleanup(lambda: self.h.run(ws.close()))
        self.h.wait(lambda: b.pool.tabs)
        r = client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "x"}])
        self.assertEqual(r.choices[0].message.content, "ok")


if __name__ == "__main__":
    unittest.main()


def body_of(task):
    return task["payload"]["request"]["body"]


def path_of(task):
    return task["payload"]["request"]["path"]


class ConcurrentFollowUps(BridgeCase):
    """Two requests extending one remembered conversation at once: one follow-up, one new one."""

    def test_only_one_followup_per_conversation_at_a_time(self):
        import threading
        tab = self.h.tab(lambda m: [("sleep", 0.4 if "post-to" in path_of(m) else 0)] + lines("A1") + ["[DONE]"])
        first = [{"role": "user", "content": "one"}]
        self.assertEqual(self.h.ask("one").choices[0].message.content, "A1")
        conv = body_of(tab.tasks[-1])["id"]
        results = []

        def extend(turn):
            msgs = first + [{"role": "assistant", "content": "A1"}, {"role": "user", "content": turn}]
            status, _, raw = self.post(body=chat(msgs))
            results.append(status)
        threads = [threading.Thread(target=extend, args=(t,)) for t in ("two", "deux")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        self.assertEqual(results, [200, 200])
        paths = sorted(path_of(t) for t in tab.tasks[1:])
        self.assertEqual(paths, ["/nextjs-api/stream/create-evaluation",
                                 f"/nextjs-api/stream/post-to-evaluation/{conv}"])
        # and afterwards the one that was continued goes on; the old state is not continued again
        msgs = first + [{"role": "assistant", "content": "A1"}, {"role": "user", "content": "three"}]
        self.post(body=chat(msgs))
        self.assertEqual(path_of(tab.tasks[-1]), "/nextjs-api/stream/create-evaluation")
