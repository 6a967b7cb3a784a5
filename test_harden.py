"""Tests of issue 20's faults (hostile review of 3.1.0): each failed before its fix.

Real bridges on 127.0.0.1:0 (testsupport.Harness), fake tabs, raw HTTP and the SDKs.
Run: python -m unittest -v test_harden
"""
import json
import random
import time
import unittest

import bridge
from bridge import StopSequenceFilter
from testsupport import BridgeCase, lines, chat


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


def run_filter(pieces, stops):
    f = StopSequenceFilter(stops)
    out, hits = [], []
    for p in pieces:
        text, hit = f.feed(p)
        out.append(text)
        if hit:
            hits.append(hit)
    out.append(f.close())
    return "".join(out), hits


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
