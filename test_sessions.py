"""Today's LMArena protocol from the bridge's side (PROTOCOL.md section 2): new conversations with
create-evaluation, folding, continuation with post-to-evaluation and its fallback, retries with
fresh ids, the new errors, tab cooldown, model sync, the learned request shape, conversation
cleanup, doctor and the status page. End to end: a real bridge on port 0, a `websockets` fake tab
that plays LMArena, the official openai SDK. Pure helpers first, then end to end.

Run: python -m unittest -v test_sessions
"""
import json
import os
import re
import threading
import time
import unittest
import urllib.request

import openai

import bridge
from test_bridge import IMAGE_UUID, MODEL_UUID, BridgeCase, Harness, lines, run_cli

SEARCH_UUID = "0199aaaa-0000-7000-8000-00000000000c"
MODELS = {"test-model": MODEL_UUID, "image-model": f"{IMAGE_UUID}:image", "search-model": f"{SEARCH_UUID}:search"}


def body_of(task):
    return task["payload"]["request"]["body"]


def path_of(task):
    return task["payload"]["request"]["path"]


# (a) Pure: building requests, folding, model rows =================================================

class RequestBuilding(unittest.TestCase):
    def test_create_and_followup_bodies(self):
        """create-evaluation and post-to-evaluation bodies follow 2.2/2.3, with fresh v7 ids each call."""
        ref = bridge.ModelRef(MODEL_UUID, "search")
        req, conv = bridge.build_evaluation_request(ref, "hi", [], None)
        b = req["body"]
        self.assertEqual((req["method"], req["path"], req["recaptcha_action"]),
                         ("POST", "/nextjs-api/stream/create-evaluation", "chat_submit"))
        self.assertEqual(b["id"], conv)
        self.assertEqual((b["mode"], b["modelAId"], b["modality"]), ("direct-battle", MODEL_UUID, "search"))
        self.assertEqual(b["userMessage"], {"content": "hi", "experimental_attachments": [], "metadata": {}})
        req2, conv2 = bridge.build_evaluation_request(ref, "more", [], conv)
        self.assertEqual(req2["path"], f"/nextjs-api/stream/post-to-evaluation/{conv}")
        self.assertEqual(conv2, conv)
        ids1 = {b[k] for k in ("userMessageId", "modelAMessageId", "modelBMessageId")}
        ids2 = {req2["body"][k] for k in ("userMessageId", "modelAMessageId", "modelBMessageId")}
        self.assertFalse(ids1 & ids2)
        for i in ids1 | ids2 | {conv}:
            self.assertRegex(i, r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

    def test_learned_shape_adds_only_unknown_fields(self):
        """A learned shape adds fields the bridge does not set, never overriding its own."""
        shape = bridge.learned_shape("create-evaluation", {
            "mode": "direct", "sessionContext": {"tz": "UTC"}, "recaptchaV3Token": "t",
            "userMessage": {"content": "secret", "metadata": {"x": 1}, "extra": True}})
        self.assertEqual(shape, {"sessionContext": {"tz": "UTC"}, "userMessage": {"metadata": {"x": 1}, "extra": True}})
        req, _ = bridge.build_evaluation_request(bridge.ModelRef(MODEL_UUID), "hi", [], None, shape)
        b = req["body"]
        self.assertEqual(b["mode"], "direct-battle")
        self.assertEqual(b["sessionContext"], {"tz": "UTC"})
        self.assertEqual(b["userMessage"]["content"], "hi")
        self.assertIs(b["userMessage"]["extra"], True)
        self.assertEqual(b["userMessage"]["metadata"], {"x": 1})
        self.assertIsNone(bridge.learned_shape("retry", {}))

    def test_folding(self):
        """One user message goes as it is; a conversation becomes a tagged transcript ending with the
        last user turn, attachments kept and named where they were sent."""
        one = [{"role": "user", "content": "just this", "attachments": []}]
        self.assertEqual(bridge.fold_turns(one), ("just this", []))
        att = {"name": "cat.png", "contentType": "image/png", "url": "data:image/png;base64,AAAA"}
        turns = [{"role": "system", "content": "Be brief.", "attachments": []},
                 {"role": "user", "content": "look", "attachments": [att]},
                 {"role": "assistant", "content": "A cat.", "attachments": []},
                 {"role": "user", "content": "color?", "attachments": []}]
        content, atts = bridge.fold_turns(turns)
        self.assertEqual(atts, [att])
        self.assertTrue(content.startswith(bridge.FOLD_PREAMBLE))
        self.assertTrue(content.endswith("<user>\ncolor?\n</user>"))
        self.assertLess(content.index("<system>\nBe brief."), content.index("<user>\nlook\n[attached: cat.png]"))
        self.assertLess(content.index("<assistant>\nA cat.\n</assistant>"), content.index("color?"))

    def test_page_models_to_entries(self):
        """Model sync: modality suffix from capabilities, unselectable rows left out, newest row of
        a shared publicName preferred."""
        page = [
            {"id": "0190aaaa-0000-7000-8000-000000000001", "publicName": "dup", "userSelectable": True},
            {"id": "0199aaaa-0000-7000-8000-000000000002", "publicName": "dup", "userSelectable": True},
            {"id": "0198aaaa-0000-7000-8000-000000000003", "publicName": "dup", "userSelectable": False},
            {"id": "0199aaaa-0000-7000-8000-000000000099", "publicName": "hidden", "userSelectable": False},
            {"id": "x1", "publicName": "painter", "capabilities": {"outputCapabilities": {"image": {"a": 1}}}},
            {"id": "x2", "publicName": "finder", "capabilities": {"outputCapabilities": {"text": True, "search": True}}},
            {"id": "x3", "publicName": "filmer", "capabilities": {"outputCapabilities": {"video": True}}},
            {"id": "x4", "publicName": "builder", "capabilities": {"outputCapabilities": {"web": True}}},
            {"id": "x5", "publicName": "talker", "capabilities": {"outputCapabilities": {"text": True}}},
        ]
        self.assertEqual(bridge.page_model_entries(page), {
            "dup": "0199aaaa-0000-7000-8000-000000000002", "painter": "x1:image", "finder": "x2:search",
            "filmer": "x3:video", "builder": "x4:webdev", "talker": "x5"})

    def test_new_error_rows(self):
        """Section 2.9's new rows map to model_unavailable, upstream_schema_changed (fields named)
        and session_not_owned for an expired login."""
        e = bridge.classify_upstream_error('{"error":"Selected model is not available for user selection"}', 400)
        self.assertEqual((e.status, e.code), (400, "model_unavailable"))
        self.assertIn("Reload the LMArena tab", e.message)
        e = bridge.classify_upstream_error("Chosen Model(s) are no longer available", 400)
        self.assertEqual(e.code, "model_unavailable")
        zod = json.dumps({"success": False, "error": {"name": "ZodError", "issues": [
            {"path": ["userMessage", "metadata"], "message": "Expected object, received null"},
            {"path": ["sessionContext"], "message": "Required"}]}})
        e = bridge.classify_upstream_error(zod, 400)
        self.assertEqual((e.status, e.code), (502, "upstream_schema_changed"))
        self.assertIn("userMessage.metadata", e.message)
        self.assertIn("sessionContext", e.message)
        self.assertIn("by hand", e.message)
        e = bridge.classify_upstream_error('{"error":"auth token has expired"}', 401)
        self.assertEqual(e.code, "session_not_owned")
        e = bridge.classify_upstream_error('{"error":"prompt failed"}', 429, 12)
        self.assertEqual((e.status, e.code, e.retry_after), (429, "rate_limited", 12))

    def test_retry_plan(self):
        """A failed follow-up falls back to a new conversation; a refused token is retried with a
        rediscovered key, then with the v2 check, then given up."""
        recaptcha = bridge.ApiError(403, "x", "recaptcha_failed")
        self.assertEqual(bridge.retry_plan(recaptcha, False, 0), {"rediscover_site_key": True})
        self.assertEqual(bridge.retry_plan(recaptcha, False, 1), {"rediscover_site_key": True, "recaptcha": "v2"})
        self.assertIsNone(bridge.retry_plan(recaptcha, False, 2))
        upstream = bridge.ApiError(502, "x", "upstream_error")
        self.assertEqual(bridge.retry_plan(upstream, True, 0), {"new_conversation": True})
        self.assertIsNone(bridge.retry_plan(upstream, False, 0))
        self.assertIsNone(bridge.retry_plan(bridge.ApiError(429, "x", "rate_limited"), True, 0))


# (c) End to end with a fake tab ===================================================================

def echo_script(msg):
    """Answers with the prompt's last line, so tests see what was sent."""
    content = body_of(msg)["userMessage"]["content"]
    return lines("You said: " + content.splitlines()[-1]) + ["[DONE]"]


class CreateMode(BridgeCase):
    models = MODELS

    def client(self):
        return self.h.client()

    def test_zero_setup_text_image_search(self):
        """With the shipped config (no ids), text, image and search models answer, each with its modality."""
        tab = self.h.tab(lambda m: (['a2:[{"type":"image","image":"https://img/x.png","mimeType":"image/png"}]\n']
                                    if body_of(m)["modality"] == "image" else lines("ok")) + ["ad:{\"finishReason\":\"stop\"}\n", "[DONE]"])
        for model, modality in (("test-model", "chat"), ("image-model", "image"), ("search-model", "search")):
            for stream in (False, True):
                r = self.client().chat.completions.create(model=model, stream=stream,
                                                          messages=[{"role": "user", "content": "hi"}])
                text = "".join(c.choices[0].delta.content or "" for c in r) if stream else r.choices[0].message.content
                self.assertEqual(text, "![Image](https://img/x.png)" if modality == "image" else "ok")
                self.assertEqual(body_of(tab.tasks[-1])["modality"], modality)
                self.assertEqual(path_of(tab.tasks[-1]), "/nextjs-api/stream/create-evaluation")

    def test_conversation_is_folded(self):
        """A whole conversation goes as one transcript in content, ending with the last user turn."""
        tab = self.h.tab(echo_script)
        r = self.client().chat.completions.create(model="test-model", messages=[
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}])
        self.assertEqual(r.choices[0].message.content, "You said: </user>")
        content = body_of(tab.tasks[-1])["userMessage"]["content"]
        self.assertIn("<system>\nBe brief.\n</system>", content)
        self.assertTrue(content.endswith("<user>\nthree\n</user>"))

    def test_continuation_sends_only_the_new_turn(self):
        """A client that sends back our exact answer plus a new turn continues the conversation with
        post-to-evaluation carrying only the new turn; an edited answer starts a new conversation."""
        tab = self.h.tab(echo_script)
        c = self.client()
        history = [{"role": "user", "content": "first"}]
        a1 = c.chat.completions.create(model="test-model", messages=history).choices[0].message.content
        conv = body_of(tab.tasks[-1])["id"]
        history += [{"role": "assistant", "content": a1}, {"role": "user", "content": "second"}]
        chunks = list(c.chat.completions.create(model="test-model", messages=history, stream=True))
        a2 = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        self.assertEqual(a2, "You said: second")
        self.assertEqual(path_of(tab.tasks[-1]), f"/nextjs-api/stream/post-to-evaluation/{conv}")
        self.assertEqual(body_of(tab.tasks[-1])["userMessage"]["content"], "second")
        self.assertEqual(body_of(tab.tasks[-1])["id"], conv)
        # A third turn continues the streamed answer too.
        history += [{"role": "assistant", "content": a2}, {"role": "user", "content": "third"}]
        c.chat.completions.create(model="test-model", messages=history)
        self.assertEqual(path_of(tab.tasks[-1]), f"/nextjs-api/stream/post-to-evaluation/{conv}")
        self.assertEqual(body_of(tab.tasks[-1])["userMessage"]["content"], "third")
        # An older state of the conversation (regenerate the second answer) is a new conversation...
        c.chat.completions.create(model="test-model", messages=history[:3])
        self.assertEqual(path_of(tab.tasks[-1]), "/nextjs-api/stream/create-evaluation")
        # ...and so is an edited answer, or another model.
        edited = history[:1] + [{"role": "assistant", "content": a1 + " (edited)"}, history[2]]
        c.chat.completions.create(model="test-model", messages=edited)
        self.assertEqual(path_of(tab.tasks[-1]), "/nextjs-api/stream/create-evaluation")
        c.chat.completions.create(model="search-model", messages=history[:3])
        self.assertEqual(path_of(tab.tasks[-1]), "/nextjs-api/stream/create-evaluation")

    def test_regenerate_never_returns_the_old_answer(self):
        """Sending the same history again (regenerate) starts a new conversation and a new answer."""
        answers = iter(["first answer", "second answer"])
        tab = self.h.tab(lambda m: lines(next(answers)) + ["[DONE]"])
        msgs = [{"role": "user", "content": "q"}]
        a = self.client().chat.completions.create(model="test-model", messages=msgs).choices[0].message.content
        b = self.client().chat.completions.create(model="test-model", messages=msgs).choices[0].message.content
        self.assertEqual((a, b), ("first answer", "second answer"))
        self.assertNotEqual(body_of(tab.tasks[0])["id"], body_of(tab.tasks[1])["id"])

    def test_failed_followup_falls_back_to_a_new_conversation(self):
        """A follow-up refused before any output is retried at once as a new conversation with the
        folded history, within the same client request; that conversation is never continued again."""
        def script(m):
            if "post-to-evaluation" in path_of(m):
                return [{"error": "Bad next turn request in Battles in Direct mode", "status": 400}]
            return echo_script(m)
        tab = self.h.tab(script)
        c = self.client()
        history = [{"role": "user", "content": "first"}]
        a1 = c.chat.completions.create(model="test-model", messages=history).choices[0].message.content
        history += [{"role": "assistant", "content": a1}, {"role": "user", "content": "second"}]
        r = c.chat.completions.create(model="test-model", messages=history)
        self.assertEqual(r.choices[0].message.content, "You said: </user>")
        paths = [path_of(t) for t in tab.tasks]
        self.assertTrue(paths[1].startswith("/nextjs-api/stream/post-to-evaluation/"))
        self.assertEqual(paths[2], "/nextjs-api/stream/create-evaluation")
        folded = body_of(tab.tasks[2])["userMessage"]["content"]
        self.assertIn("<user>\nfirst\n</user>", folded)
        self.assertNotEqual(tab.tasks[1]["request_id"], tab.tasks[2]["request_id"])
        self.assertNotEqual(body_of(tab.tasks[1])["userMessageId"], body_of(tab.tasks[2])["userMessageId"])
        # The new conversation can be continued; the failed one is never tried again.
        history += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "3"}]
        c.chat.completions.create(model="test-model", messages=history)
        self.assertIn(body_of(tab.tasks[2])["id"], path_of(tab.tasks[3]))

    def test_half_failed_answer_is_not_remembered(self):
        """A conversation whose answer failed half-way is not continued later."""
        tab = self.h.tab(lines("partial ", finish=None) + ['a3:"model exploded"\n', "[DONE]"])
        c = self.client()
        with self.assertRaises(openai.APIStatusError):
            c.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "q"}])
        tab.script = echo_script
        c.chat.completions.create(model="test-model", messages=[
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "partial "},
            {"role": "user", "content": "again"}])
        self.assertEqual(path_of(tab.tasks[-1]), "/nextjs-api/stream/create-evaluation")
        self.assertEqual(self.h.bridge.memory.by_key and len(self.h.bridge.memory.by_key), 1)

    def test_refused_token_retried_fresh_then_v2(self):
        """A refused reCAPTCHA token is retried with fresh ids and a rediscovered key, then with the
        v2 check; a third refusal reaches the client as recaptcha_failed."""
        refusals = {"n": 0}

        def script(m):
            req = m["payload"]["request"]
            if req.get("recaptcha") != "v2" and refusals["n"] < 5:
                refusals["n"] += 1
                return [{"error": '{"error":"recaptcha validation failed"}', "status": 403}]
            return lines("passed") + ["[DONE]"]
        tab = self.h.tab(script)
        r = self.client().chat.completions.create(model="test-model", messages=[{"role": "user", "content": "q"}])
        self.assertEqual(r.choices[0].message.content, "passed")
        reqs = [t["payload"]["request"] for t in tab.tasks]
        self.assertEqual([(q.get("rediscover_site_key"), q.get("recaptcha")) for q in reqs],
                         [(None, None), (True, None), (True, "v2")])
        self.assertEqual(len({q["body"]["id"] for q in reqs}), 3)
        tab.script = [{"error": '{"error":"recaptcha validation failed"}', "status": 403}]
        with self.assertRaises(openai.PermissionDeniedError) as cm:
            self.client().chat.completions.create(model="test-model", messages=[{"role": "user", "content": "q"}])
        self.assertEqual(cm.exception.code, "recaptcha_failed")

    def test_model_unavailable_and_schema_changed(self):
        """LMArena's model and schema refusals reach the client with their codes; the tab is asked
        for a fresh model list after model_unavailable."""
        tab = self.h.tab([{"error": '{"error":"Chosen Model(s) are no longer available"}', "status": 400}])
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client().chat.completions.create(model="test-model", messages=[{"role": "user", "content": "q"}])
        self.assertEqual(cm.exception.code, "model_unavailable")
        tab.wait_command("send_models")
        tab.script = [{"error": json.dumps({"success": False, "error": {"name": "ZodError", "issues": [
            {"path": ["userMessage", "metadata"], "message": "Expected object"}]}}), "status": 400}]
        with self.assertRaises(openai.APIStatusError) as cm:
            self.client().chat.completions.create(model="test-model", messages=[{"role": "user", "content": "q"}])
        self.assertEqual((cm.exception.status_code, cm.exception.code), (502, "upstream_schema_changed"))
        self.assertIn("userMessage.metadata", cm.exception.message)

    def test_learned_shape_is_applied_and_kept(self):
        """A shape reported by the tab adds its unknown fields to later requests and survives a restart."""
        tab = self.h.tab()
        self.h.run(tab.send({"type": "request_shape", "endpoint": "create-evaluation",
                             "body": {"sessionContext": {"v": 2}, "mode": "direct", "userMessage": {"content": ""}}}))
        self.h.wait(lambda: self.h.bridge.shape is not None, what="shape")
        self.h.ask()
        self.assertEqual(body_of(tab.tasks[-1])["sessionContext"], {"v": 2})
        self.assertEqual(body_of(tab.tasks[-1])["mode"], "direct-battle")
        with open(os.path.join(self.h.dir, "request_shape.json"), encoding="utf-8") as f:
            self.assertEqual(json.load(f)["body"], {"sessionContext": {"v": 2}})
        again = bridge.Bridge(self.h.bridge.files, "127.0.0.1", 0)
        self.assertEqual(again.shape, {"sessionContext": {"v": 2}})
        health = json.loads(urllib.request.urlopen(self.h.url + "/health", timeout=5).read())
        self.assertEqual(health["request_shape"]["fields"], ["sessionContext"])
        self.assertIsNotNone(health["request_shape"]["age_seconds"])


class PromptLimit(BridgeCase):
    config = {"max_prompt_chars": 50}

    def test_prompt_too_long(self):
        """A prompt over max_prompt_chars is refused with 413 prompt_too_long before reaching a tab."""
        tab = self.h.tab()
        with self.assertRaises(openai.APIStatusError) as cm:
            self.h.ask("x" * 51)
        self.assertEqual((cm.exception.status_code, cm.exception.code), (413, "prompt_too_long"))
        self.assertIn("50", cm.exception.message)
        self.assertEqual(tab.tasks, [])
        self.assertEqual(self.h.ask("short").choices[0].message.content, "Hello world!")


class Cooldown(BridgeCase):
    config = {"tab_cooldown_seconds": 30}

    def test_429_rests_the_tab_and_others_serve(self):
        """After a 429 the tab rests; another tab serves the same request; with none left the client
        gets 429 at once with Retry-After."""
        busy = self.h.tab([{"error": "Too Many Requests", "status": 429, "retry_after": 40}])
        t0 = time.time()
        with self.assertRaises(openai.RateLimitError) as cm:
            self.h.ask()
        self.assertEqual(cm.exception.response.headers["retry-after"], "40")
        with self.assertRaises(openai.RateLimitError) as cm:
            self.h.ask()
        self.assertEqual(len(busy.tasks), 1)                   # the resting tab got nothing
        self.assertLessEqual(int(cm.exception.response.headers["retry-after"]), 40)
        self.assertLess(time.time() - t0, 5)
        fresh = self.h.tab()
        self.assertEqual(self.h.ask().choices[0].message.content, "Hello world!")
        self.assertEqual(len(fresh.tasks), 1)
        # A 429 on one tab with another available: the same request is served by the other.
        busy.h.bridge.tabs[0].cool_until = 0
        fresh.script = [{"error": "Too Many Requests", "status": 429}]
        busy.script = lines("from the other tab") + ["[DONE]"]
        answers = {self.h.ask().choices[0].message.content}
        self.assertEqual(answers, {"from the other tab"})


class Cleanup(BridgeCase):
    config = {"conversation_cleanup": "delete", "continue_conversations": False}

    def test_conversations_deleted_when_they_cannot_be_continued(self):
        """With continuation off, each conversation the bridge created is deleted after its answer;
        conversations the bridge did not create are never touched."""
        tab = self.h.tab()
        self.h.ask()
        conv = body_of(tab.tasks[-1])["id"]
        cmd = tab.wait_command("cleanup_conversation")
        self.assertEqual((cmd["id"], cmd["action"]), (conv, "delete"))
        self.assertEqual([c["id"] for c in tab.commands if c.get("command") == "cleanup_conversation"], [conv])


class CleanupOnEviction(unittest.TestCase):
    def test_evicted_conversations_are_archived(self):
        """The continuation memory is bounded; an evicted conversation is handed to cleanup."""
        evicted = []
        memory = bridge.Conversations(limit=2, on_evict=evicted.append)
        for i in range(3):
            memory.by_key[f"k{i}"] = memory.Entry(f"conv{i}", f"k{i}", time.monotonic())
            while len(memory.by_key) > memory.limit:
                memory._evict(next(iter(memory.by_key.values())))
        self.assertEqual(evicted, ["conv0"])
        memory.max_age = 0
        memory.expire()
        self.assertEqual(evicted, ["conv0", "conv1", "conv2"])


class Diagnosis(BridgeCase):
    def test_status_page_and_health_stages(self):
        """GET / is an HTML status page without scripts; /health has stage percentiles and recent requests."""
        tab = self.h.tab()
        self.h.run(tab.send({"type": "status", "recaptcha": {"loaded": True, "site_key": "6Lkey"},
                             "actions": {"generateUploadUrl": True, "getSignedUrl": True}, "logged_in": True}))
        rid = None
        for _ in range(3):
            rid = self.h.client().chat.completions.with_raw_response.create(
                model="test-model", messages=[{"role": "user", "content": "SECRET-PROMPT"}]).headers["x-request-id"]
        status, headers, body = self.get("/", headers={"Accept": "text/html"})
        page = body.decode()
        self.assertEqual(status, 200)
        self.assertIn("text/html", headers["content-type"])
        self.assertNotIn("<script", page)
        self.assertNotIn("SECRET-PROMPT", page)
        self.assertIn("6Lkey", page)
        self.assertIn(rid[:8], page)
        health = json.loads(self.get("/health")[2])
        self.assertIn("end", health["stages_ms"])
        self.assertEqual(health["recent_requests"][-1]["id"], rid[:8])

    def test_doctor_exit_codes(self):
        """doctor prints one line per check and exits 0 when all pass, 1 when a link is broken."""
        r = run_cli("doctor", "--config", self.h.config_path, "--bridge", self.h.url)
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertRegex(r.stdout, r"(?m)^FAIL tabs: no LMArena tab is connected -- ")
        tab = self.h.tab()
        self.h.run(tab.send({"type": "status", "recaptcha": {"loaded": True, "site_key": "6Lkey"},
                             "actions": {"generateUploadUrl": True, "getSignedUrl": True}, "logged_in": None}))
        self.h.wait(lambda: self.h.bridge.tabs and self.h.bridge.tabs[0].status, what="status")
        r = run_cli("doctor", "--config", self.h.config_path, "--bridge", self.h.url, "--send", "test-model")
        self.assertEqual(r.returncode, 0, r.stdout)
        for line in r.stdout.strip().splitlines():
            self.assertRegex(line, r"^(ok|FAIL) [\w ]+: ")
        self.assertRegex(r.stdout, r"ok send: test-model answered 'Hello world!' in \d+ ms")
        r = run_cli("doctor", "--config", self.h.config_path, "--bridge", "http://127.0.0.1:9")
        self.assertEqual(r.returncode, 1)
        self.assertIn("FAIL bridge: not reachable", r.stdout)


if __name__ == "__main__":
    unittest.main()
