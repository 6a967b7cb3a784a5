"""Today's LMArena protocol from the bridge's side (PROTOCOL.md section 2): new conversations with
create-evaluation, folding, continuation with post-to-evaluation and its fallback, retries with
fresh ids, the new errors, tab cooldown, model sync, the learned request shape, conversation
cleanup, doctor and the status page. End to end: a real bridge on port 0, a `websockets` fake tab
that plays LMArena, the official openai SDK. Pure helpers first, then end to end.

Run: python -m unittest -v test_sessions
"""
import json
import os
import random
import time
import unittest
import urllib.request

import openai

import bridge
import testsupport
from testsupport import feed_parser, IMAGE_UUID, MODEL_UUID, BridgeCase, Harness, lines, run_cli

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
        """Model sync without a catalog (page data): text output means chat whatever else is listed
        (PROTOCOL 2.8), otherwise image, video, search, web; unselectable rows left out; newest row of
        a shared publicName preferred."""
        page = [
            {"id": "0190aaaa-0000-7000-8000-000000000001", "publicName": "dup", "userSelectable": True},
            {"id": "0199aaaa-0000-7000-8000-000000000002", "publicName": "dup", "userSelectable": True},
            {"id": "0198aaaa-0000-7000-8000-000000000003", "publicName": "dup", "userSelectable": False},
            {"id": "0199aaaa-0000-7000-8000-000000000099", "publicName": "hidden", "userSelectable": False},
            {"id": "x1", "publicName": "painter", "capabilities": {"outputCapabilities": {"image": {"a": 1}}}},
            {"id": "x2", "publicName": "finder", "capabilities": {"outputCapabilities": {"search": True}}},
            {"id": "x3", "publicName": "filmer", "capabilities": {"outputCapabilities": {"video": True}}},
            {"id": "x4", "publicName": "builder", "capabilities": {"outputCapabilities": {"web": True}}},
            {"id": "x5", "publicName": "talker", "capabilities": {"outputCapabilities": {"text": True}}},
            # Real page data: chat models that can also build web pages, and the router "Max".
            {"id": "x6", "publicName": "gemini-2.5-pro", "capabilities": {"outputCapabilities": {
                "text": True, "web": True}}},
            {"id": "x7", "publicName": "Max", "capabilities": {"outputCapabilities": {
                "text": True, "image": {"aspectRatios": ["1:1"]}, "search": True, "web": True}}},
        ]
        self.assertEqual(bridge.page_model_entries(page), {
            "dup": "0199aaaa-0000-7000-8000-000000000002", "painter": "x1:image", "finder": "x2:search",
            "filmer": "x3:video", "builder": "x4:webdev", "talker": "x5", "gemini-2.5-pro": "x6",
            "Max": "x7"})

    def test_catalog_arenas_decide(self):
        """From the catalog the arena decides the modality; a name in several arenas is plain in the
        text arena and "<name>:<modality>" elsewhere; the document arena adds nothing; with no text
        row the first listed arena names it; the newest of several rows in one arena wins. The same
        rows flattened by the tab (an "arena" key on each) give the same answer."""
        web = {"outputCapabilities": {"text": True, "web": True}}
        catalog = [
            {"arena": "text", "models": [
                {"id": "t-gem", "publicName": "gemini-2.5-pro", "capabilities": web},
                {"id": "t-gpt", "publicName": "gpt-5.1", "capabilities": web},
                {"id": "t-max", "publicName": "Max", "capabilities": {"outputCapabilities": {
                    "text": True, "image": {}, "search": True, "web": True}}},
                {"id": "0190aaaa-0000-7000-8000-000000000001", "publicName": "twice"},
                {"id": "0199aaaa-0000-7000-8000-000000000002", "publicName": "twice"},
                {"id": "t-off", "publicName": "off", "userSelectable": False}]},
            {"arena": "document", "models": [
                {"id": "t-gem", "publicName": "gemini-2.5-pro", "capabilities": web},
                {"id": "d-only", "publicName": "reader"}]},
            {"arena": "code", "models": [
                {"id": "c-gpt", "publicName": "gpt-5.1", "capabilities": web},
                {"id": "c-only", "publicName": "coder", "capabilities": web}]},
            {"arena": "search", "models": [{"id": "s-gem", "publicName": "gemini-2.5-pro"}]},
            {"arena": "text-to-image", "models": [
                {"id": "i-gpt", "publicName": "gpt-5.1", "capabilities": {"outputCapabilities": {"image": {}}}},
                {"id": "i-only", "publicName": "painter"}]},
            {"arena": "text-to-video", "models": [{"id": "v-only", "publicName": "filmer"}]},
        ]
        want = {"gemini-2.5-pro": "t-gem", "gemini-2.5-pro:search": "s-gem:search",
                "gpt-5.1": "t-gpt", "gpt-5.1:webdev": "c-gpt:webdev", "gpt-5.1:image": "i-gpt:image",
                "Max": "t-max", "twice": "0199aaaa-0000-7000-8000-000000000002", "reader": "d-only",
                "coder": "c-only:webdev", "painter": "i-only:image", "filmer": "v-only:video"}
        self.assertEqual(bridge.page_model_entries(catalog), want)
        flat = [dict(m, arena=group["arena"]) for group in catalog for m in group["models"]]
        self.assertEqual(bridge.page_model_entries(flat), want)
        # A model the text arena does not list is named by its first listed arena, whatever the order.
        flipped = [{"arena": "search", "models": [{"id": "s1", "publicName": "both"}]},
                   {"arena": "code", "models": [{"id": "c1", "publicName": "both"}]}]
        self.assertEqual(bridge.page_model_entries(flipped), {"both": "s1:search", "both:webdev": "c1:webdev"})

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


class JobWithoutSockets(unittest.TestCase):
    """A Job only accumulates: tab messages in, answer events out, no socket anywhere."""

    class Hub:
        def __init__(self, retry=False):
            self.dirty, self.ended, self.noted, self.retry = set(), [], [], retry

        def job_output(self, job):
            self.dirty.add(job)

        def retry_job(self, job, err):
            return self.retry

        def job_ended(self, job):
            self.ended.append(job)

        def note_upstream_error(self, tab, err, path=""):
            self.noted.append(err.code)

    class Plan:
        path = "/nextjs-api/stream/create-evaluation"

        def task_message(self, rid, flags):
            return json.dumps({"request_id": rid, "flags": flags})

        def explain(self, err):
            return err

    def test_tab_messages_to_events_and_reply(self):
        """Rows become text and reasoning events; the finish ends the job; a Reply renders them."""
        hub = self.Hub()
        job = bridge.Job(hub, "m", self.Plan())
        started = [job.on_tab_data(data) for data in ('a0:"Hel', 'lo"\nag:"why"\n', 'a0:" there"\n',
                                                       'ad:{"finishReason":"length"}\n')]
        self.assertEqual(started, [False, True, False, False])     # the first text started the output
        self.assertIn(job, hub.dirty)
        events = job.take()
        self.assertEqual([e[0] for e in events], ["text", "reasoning", "text"])
        self.assertTrue(job.done and job.output and job.received)
        self.assertEqual((job.finish_reason, hub.ended), ("length", [job]))
        reply = bridge.OpenAIReply("m", False, False, 10)
        reply.render(events)
        body = reply.body(job)
        self.assertEqual(body["choices"][0]["message"], {"role": "assistant", "content": "Hello there",
                                                         "reasoning_content": "why"})
        self.assertEqual(body["choices"][0]["finish_reason"], "length")

    def test_error_before_output_asks_for_a_retry(self):
        """An error before any output goes to the hub first; a retried job starts a new attempt."""
        hub = self.Hub(retry=True)
        job = bridge.Job(hub, "m", self.Plan())
        job.on_tab_data({"error": "recaptcha validation failed", "status": 403})
        self.assertFalse(job.done)
        job.next_attempt({"recaptcha": "v2"})
        self.assertEqual(job.rid, job.id + ".1")
        self.assertEqual(json.loads(job.message)["flags"], {"recaptcha": "v2"})
        hub.retry = False
        job.on_tab_data('a0:"x"\n')
        job.on_tab_data({"error": "boom", "status": 500})      # after output: no retry, noted
        self.assertTrue(job.done)
        self.assertEqual((job.error.code, hub.noted), ("upstream_error", ["upstream_error"]))


# (a) Pure: the response stream in its three dialects, exact at every split (2.6) ==============

def norm(event):
    """Events with the ApiError replaced by comparable fields."""
    if event[0] == "error":
        return ("error", event[1].status, event[1].code)
    return event


def run(chunks, side="a"):
    """(normalised events, parser) after feeding `chunks` and closing."""
    events, p = feed_parser(chunks, side)
    return [norm(e) for e in events], p


def outcome(chunks, side="a"):
    """Everything a caller can observe: events, citations and the unknown count."""
    events, p = run(chunks, side)
    return events, p.citations, p.unknown


class SplitAssertions(unittest.TestCase):
    def assertSplitInvariant(self, text, side="a", bytewise=True):
        """Every single split (str and bytes) and one-unit-at-a-time feeding give the same outcome."""
        whole = outcome([text], side)
        data = text.encode()
        for i in range(len(text) + 1):
            self.assertEqual(outcome([text[:i], text[i:]], side), whole, f"str split at {i}")
        for i in range(len(data) + 1):
            self.assertEqual(outcome([data[:i], data[i:]], side), whole, f"bytes split at {i}")
        self.assertEqual(outcome(list(text), side), whole, "one character per feed")
        if bytewise:
            self.assertEqual(outcome([bytes([b]) for b in data], side), whole, "one byte per feed")
        return whole


class DialectA(SplitAssertions):
    PLAIN = ('ag:"think"\na0:"Hel"\na0:"lo é€😀"\nb0:"not ours"\na2:[{"type":"heartbeat"}]\n'
             'a0:"\\u00e9\\"\\\\"\nad:{"finishReason":"length","usage":{"promptTokens":1}}\n')
    EXPECTED = [("reasoning", "think"), ("text", '"Hel"', "Hel"), ("text", '"lo é€😀"', "lo é€😀"),
                ("text", '"\\u00e9\\"\\\\"', 'é"\\'), ("finish", "length", {"promptTokens": 1})]

    def test_plain_rows(self):
        """Newline-separated rows give their events, with each text's JSON literal exactly as sent."""
        events, citations, unknown = self.assertSplitInvariant(self.PLAIN)
        self.assertEqual(events, self.EXPECTED)
        self.assertEqual((citations, unknown), ([], 0))

    def test_data_prefix_and_blank_lines(self):
        """`data: `-prefixed rows separated by blank lines parse like plain rows."""
        text = "".join(f"data: {line}\n\n" for line in self.PLAIN.splitlines())
        self.assertEqual(self.assertSplitInvariant(text)[0], self.EXPECTED)
        self.assertEqual(outcome(["data:a0:\"x\"\n\ndata:\ta0:\"y\"\n\n"])[0],
                         [("text", '"x"', "x"), ("text", '"y"', "y")])

    def test_repeated_data_prefixes(self):
        """Blank lines and repeated `data:` prefixes before a row are skipped alike at any split."""
        text = 'data: data: a0:"x"\n\ndata:\n\ndata: \tag:"r"\n\ufeffa0:"y"'
        self.assertEqual(self.assertSplitInvariant(text)[0],
                         [("text", '"x"', "x"), ("reasoning", "r"), ("text", '"y"', "y")])

    def test_crlf_lines(self):
        """Rows ended by CRLF parse like rows ended by LF."""
        text = self.PLAIN.replace("\n", "\r\n")
        self.assertEqual(self.assertSplitInvariant(text)[0], self.EXPECTED)

    def test_laneless_rows_belong_to_our_side(self):
        """A row without a lane (`0:"x"`) belongs to the side the parser was made for."""
        text = '0:"one"\na0:"A"\nb0:"B"\ng:"r"\nd:{"finishReason":"stop"}\n'
        self.assertEqual(self.assertSplitInvariant(text)[0],
                         [("text", '"one"', "one"), ("text", '"A"', "A"), ("reasoning", "r"),
                          ("finish", "stop", None)])
        self.assertEqual(self.assertSplitInvariant(text, side="b")[0],
                         [("text", '"one"', "one"), ("text", '"B"', "B"), ("reasoning", "r"),
                          ("finish", "stop", None)])

    def test_battle_side_b(self):
        """Side b keeps only b rows (and lane-less ones); the other lane's rows are not unknown."""
        text = 'a0:"A1"\nb0:"B1"\naz:1\nbg:"rb"\nag:"ra"\nb2:[{"type":"image","image":"u"}]\n' \
               'ad:{"finishReason":"length"}\nbd:{"finishReason":"stop"}\n'
        events, _, unknown = self.assertSplitInvariant(text, side="b")
        self.assertEqual(events, [("text", '"B1"', "B1"), ("reasoning", "rb"), ("image", "u"),
                                  ("finish", "stop", None)])
        self.assertEqual(unknown, 0)

    def test_row_lookalikes_and_brackets_inside_strings(self):
        """`a0:"`, brackets and newlines escaped inside a string are text, not rows or structure."""
        text = ('a0:"say a0:\\"x\\" and ad:{\\"finishReason\\":\\"stop\\"}"\n'
                'a2:[{"type":"image","image":"https://x/a]b}[{c.png","note":"a0:\\"no\\" ]}"}]\n'
                'ag:{"text":"{[\\"]}\\\\"}\n'
                'a0:"\\\\\\"\\\\"\n')
        self.assertEqual(self.assertSplitInvariant(text)[0], [
            ("text", '"say a0:\\"x\\" and ad:{\\"finishReason\\":\\"stop\\"}"',
             'say a0:"x" and ad:{"finishReason":"stop"}'),
            ("image", "https://x/a]b}[{c.png"), ("reasoning", '{["]}\\'),
            ("text", '"\\\\\\"\\\\"', '\\"\\')])

    def test_cut_tokens_inside_values(self):
        """A value cut inside a literal, number, escape or key waits, though its strings hold row look-alikes."""
        look = '"a0:{ b0:[ g:[ \\n"'
        text = ('a2:[{"note":' + look + ',"type":"image","ok":true,"n":-1.5e+3,"s":"\\u00e9\\ud83d\\ude00",'
                '"image":"u1"}]\n'
                'a2:[{"note":' + look + ',"x":null,"y":false,"z":[-0.25E-2,{},NaN,-Infinity],"type":"image",'
                '"image":"u2"}]\n'
                'ag:"a0:{ \\u00e9 \\ud83d\\ude00"\n')
        want = [("image", "u1"), ("image", "u2"), ("reasoning", "a0:{ é 😀")]
        self.assertEqual(self.assertSplitInvariant(text)[0], want)
        self.assertEqual(self.assertSplitInvariant(text.replace("\n", ""))[0], want)

    def test_escapes_split_everywhere(self):
        """Escaped quotes, backslashes, \\u escapes and surrogate pairs survive every split point."""
        text = 'a0:"\\\\"\na0:"\\""\na0:"x\\\\\\\\\\"y"\na0:"\\ud83d\\ude00\\u00e9\\n"\n'
        self.assertEqual(self.assertSplitInvariant(text)[0], [
            ("text", '"\\\\"', "\\"), ("text", '"\\""', '"'), ("text", '"x\\\\\\\\\\"y"', 'x\\\\"y'),
            ("text", '"\\ud83d\\ude00\\u00e9\\n"', "😀é\n")])

    def test_unknown_codes_are_counted(self):
        """Unknown codes are counted and ignored; listed codes and the other lane's rows are not."""
        text = ('az:"z"\nah:{"url":"u"}\na1:[1]\nae:{"finishReason":"stop"}\naf:{"messageId":"m"}\n'
                'ab:{}\nak:{}\na8:[]\na9:{"toolCallId":"t"}\naa:{"result":1}\na:{"result":2}\n'
                'bz:"z"\na0:"ok"\n')
        events, _, unknown = self.assertSplitInvariant(text)
        self.assertEqual(events, [("text", '"ok"', "ok")])
        self.assertEqual(unknown, 3)

    def test_malformed_values_are_skipped(self):
        """A value that can never be JSON is skipped to the next row, without an exception."""
        text = ('a0:"raw\tcontrol"\na0:"one"\n'
                'a2:[1,}\na0:"two"\n'
                'ad:{oops}\na0:"three"\n'
                'a0:"bad \\x escape"\na0:"four"\n'
                'a0:"\\u12zz"\na0:"five"\n'
                'ag:tru e\na0:"six"\n'
                'a0:\na0:"seven"\n'
                'a3:-x\nhello world\n: comment\na0:"eight"\n')
        events, _, _ = self.assertSplitInvariant(text)
        self.assertEqual(events, [("text", f'"{w}"', w) for w in
                                  ("one", "two", "three", "four", "five", "six", "seven", "eight")])

    def test_close_parses_a_trailing_value_and_drops_a_cut_one(self):
        """close() parses a complete last value without newline and drops an unfinished one."""
        self.assertEqual(run(['a0:"x"\nad:{"finishReason":"length"}'])[0],
                         [("text", '"x"', "x"), ("finish", "length", None)])
        self.assertEqual(run(['a0:"x"\nad:{"finishReason":"len'])[0], [("text", '"x"', "x")])
        self.assertEqual(run(['a0:"x"\na0:"unfinis'])[0], [("text", '"x"', "x")])
        self.assertEqual(run(['a0:"x"\nad:{"finishReason":"stop"}'])[0], run(['a0:"x"\nad:{"finishReason":"stop"}\n'])[0])
        p = bridge.ArenaStreamParser()
        self.assertEqual(p.feed('a0:"x"\nad:{"finishReason":"stop"'), [("text", '"x"', "x")])
        self.assertEqual(p.close(), [])

    def test_a_value_waits_for_the_rest(self):
        """A value cut by the chunk's end is held in `pending` until it completes."""
        p = bridge.ArenaStreamParser()
        self.assertEqual(p.feed('a0:"Hel'), [])
        self.assertEqual(p.pending, 'a0:"Hel')
        self.assertEqual(p.feed('lo"\n'), [("text", '"Hello"', "Hello")])
        self.assertEqual(p.pending, "")
        self.assertEqual(p.feed('a0:"done"'), [("text", '"done"', "done")])   # no newline needed

    def test_large_value_in_many_chunks(self):
        """A base64 image split over many chunks arrives once, whole."""
        data = "QUJD" * 20000
        row = 'a2:[{"type":"image","data":"%s","mimeType":"image/png"}]\na0:"after"\n' % data
        chunks = [row[i:i + 997] for i in range(0, len(row), 997)]
        self.assertEqual(run(chunks)[0], [("image", "data:image/png;base64," + data), ("text", '"after"', "after")])
        self.assertEqual(run([c.encode() for c in chunks])[0], run([row])[0])

    def test_events_come_from_the_feed_that_completes_a_row(self):
        """A row's events come out of the feed() that completes it, even after a long or broken value."""
        p = bridge.ArenaStreamParser()
        blob = ("QUJD\\\\" * 5000) + '\\"q\\" [x] {y}'      # escapes and brackets inside a long string
        row = 'a2:[{"type":"image","url":"https://i/x.png","note":"%s"}]\n' % blob
        cuts = list(range(0, len(row), 97)) + [len(row)]
        cuts += [c for c in (row.index("\\\\") + 1, row.index('\\"') + 1) if c not in cuts]
        cuts.sort()
        pieces = [row[a:b] for a, b in zip(cuts, cuts[1:])]
        for piece in pieces[:-1]:
            self.assertEqual(p.feed(piece), [])
        self.assertEqual(p.feed(pieces[-1]), [("image", "https://i/x.png")])
        self.assertEqual(p.feed('a2:[{"type":"heartbeat"}\n'), [])                # broken: no "]"
        self.assertEqual(p.feed('a0:"next"\n'), [("text", '"next"', "next")])
        self.assertEqual(p.feed('ag:"long ' + "r" * 3000), [])
        self.assertEqual(p.feed("r" * 3000 + '"'), [("reasoning", "long " + "r" * 6000)])
        self.assertEqual(p.feed('{"id":"1","userMessage":{"content":"a0:\\"x\\" {'), [])
        self.assertEqual(p.feed('}"}}a2:[{"type":"image","image":"u"}]'), [("image", "u")])
        self.assertEqual(p.feed('a2:[{"type":"image","image":"v","note":"abc\\'), [])   # cut after "\"
        self.assertEqual(p.feed('"def"}]a0:"x"'), [("image", "v"), ("text", '"x"', "x")])
        self.assertEqual(p.feed('a2:["ab'), [])
        self.assertEqual(p.feed('c\na0:"y"'), [("text", '"y"', "y")])          # raw newline: broken

    def test_cloudflare_page_and_error_body(self):
        """A Cloudflare page or a JSON error body instead of rows is an error."""
        page = ("<!DOCTYPE html>\n<html><head><title>Just a moment...</title></head>\n"
                "<body>Enable JavaScript and cookies to continue</body></html>\n")
        events = self.assertSplitInvariant(page)[0]
        self.assertTrue(events)
        self.assertTrue(all(e[:3] == ("error", 503, "cloudflare_challenge") for e in events))
        body = '{"success": false, "error": {"name": "ZodError"}}'
        want = bridge.classify_upstream_error(body)
        self.assertEqual(run([body])[0], [("error", want.status, want.code)])
        self.assertEqual(run(['a0:"x"\n{"error":"Too Many Requests"}\n'])[0],
                         [("text", '"x"', "x"), ("error", 429, "rate_limited")])

    def test_cut_or_broken_error_body(self):
        """A JSON error body that is cut off or mangled is still an error."""
        self.assertEqual(run(['{"error":"Too Many Requests","detail":"cu'])[0], [("error", 429, "rate_limited")])
        self.assertEqual(self.assertSplitInvariant('{"error": Too Many Requests}\n')[0],
                         [("error", 429, "rate_limited")])
        self.assertEqual(run(['{"note":"cut'])[0], [])

    def test_deep_nesting_does_not_raise(self):
        """A value nested deeper than json's recursion limit is skipped like any broken value."""
        deep = "a2:" + "[" * 100000 + "]" * 100000 + '\na0:"after"\n'
        self.assertEqual(run([deep])[0], [("text", '"after"', "after")])
        self.assertEqual(run([deep[:50000], deep[50000:]])[0], [("text", '"after"', "after")])

    def test_errors_in_rows(self):
        """hasArenaError, a3 and finishReason "error" become errors; an empty text is ignored."""
        events = self.assertSplitInvariant('a0:""\na0:"hasArenaError"\na3:"Too Many Requests"\n'
                                           'a3:{"message":"x"}\nad:{"finishReason":"error"}\n')[0]
        self.assertEqual(events, [("error", 502, "upstream_error"), ("error", 429, "rate_limited"),
                                  ("error", 502, "upstream_error"), ("error", 502, "upstream_error")])

    def test_citations_deduplicated_in_order(self):
        """Citation deltas are assembled; sources are kept once per url, in order of arrival."""
        srcs = [{"source": [{"id": "1", "url": "https://b", "title": "B"}, {"id": "2", "url": "https://a"}]},
                {"source": {"id": "3", "url": "https://b", "title": "again"}},
                {"source": {"id": "4", "url": "https://c"}}]
        rows = []
        for s in srcs:
            text = json.dumps(s)
            for piece in (text[:7], text[7:19], text[19:]):
                rows.append("ac:" + json.dumps({"toolCallId": "citation-source", "argsTextDelta": piece}) + "\n")
        rows.append('ac:{"toolCallId":"other","argsTextDelta":"{\\"source\\":{\\"url\\":\\"https://x\\"}}"}\n')
        _, citations, unknown = self.assertSplitInvariant("".join(rows), bytewise=False)
        self.assertEqual([c["url"] for c in citations], ["https://b", "https://a", "https://c"])
        self.assertEqual(citations[0]["title"], "B")
        self.assertEqual(unknown, 0)

    def test_image_parts(self):
        """Image parts by url, by `image` and by base64 become image events; other parts do not."""
        text = ('a2:[{"type":"heartbeat"},{"type":"image","image":"https://i/1.png"},'
                '{"type":"image","url":"https://i/2.png"},{"type":"image","data":"QUJD"},{"type":"other"}]\n'
                'a2:{"type":"image","image":"https://i/3.png"}\n')
        self.assertEqual(self.assertSplitInvariant(text)[0],
                         [("image", "https://i/1.png"), ("image", "https://i/2.png"),
                          ("image", "data:image/png;base64,QUJD"), ("image", "https://i/3.png")])

    def test_scalar_values_at_chunk_ends(self):
        """Numbers and literals as row values are read whole even when a chunk ends inside them."""
        text = 'ak:12.5e+3\nak:-7\nak:true\nak:null\naz:1.25\na0:"x"\n'
        events, _, unknown = self.assertSplitInvariant(text)
        self.assertEqual(events, [("text", '"x"', "x")])
        self.assertEqual(unknown, 1)

    def test_pending_is_empty_between_whole_rows(self):
        """Whole rows leave nothing pending, which bridge's one-row fast path relies on."""
        p = bridge.ArenaStreamParser()
        for chunk in ('a0:"a"\n', 'ag:"r"\n', 'a2:[{"type":"heartbeat"}]\n', 'a0:"b"\r\n', 'data: a0:"c"\n\n'):
            p.feed(chunk)
            self.assertEqual(p.pending, "", chunk)


class DialectB(SplitAssertions):
    ECHO = ('{"id":"e1","mode":"direct","userMessage":{"content":"Quote: a0:\\"fake\\" ]} {[ \\\\",'
            '"experimental_attachments":[]},"modelAId":"m"}')
    ROWS = 'ag:"r"a0:"I "b0:"the "a0:"am"a2:[{"type":"heartbeat"}]ae:{"finishReason":"stop"}ad:{"finishReason":"stop"}'
    EXPECTED = [("reasoning", "r"), ("text", '"I "', "I "), ("text", '"am"', "am"), ("finish", "stop", None)]

    def test_with_leading_echo_object(self):
        """The request echo (with row look-alikes and brackets in its strings) is skipped."""
        events, _, unknown = self.assertSplitInvariant(self.ECHO + self.ROWS)
        self.assertEqual(events, self.EXPECTED)
        self.assertEqual(unknown, 0)

    def test_without_echo_object(self):
        """Rows run together without delimiters parse one JSON value each."""
        self.assertEqual(self.assertSplitInvariant(self.ROWS)[0], self.EXPECTED)

    def test_battle_side_b(self):
        """Side b takes its own rows out of the run-together stream."""
        events = self.assertSplitInvariant(self.ECHO + self.ROWS + 'bd:{"finishReason":"length"}', side="b")[0]
        self.assertEqual(events, [("text", '"the "', "the "), ("finish", "length", None)])

    def test_error_leading_object(self):
        """A leading object with error/errors and no userMessage is an error body."""
        self.assertEqual(self.assertSplitInvariant('{"error":"Too Many Requests"}')[0],
                         [("error", 429, "rate_limited")])
        self.assertEqual(self.assertSplitInvariant('{"errors":[{"message":"recaptcha validation failed"}]}')[0],
                         [("error", 403, "recaptcha_failed")])
        self.assertEqual(run(['{"userMessage":"hi","error":null}a0:"x"'])[0], [("text", '"x"', "x")])

    def test_values_of_every_kind_back_to_back(self):
        """Numbers, literals, arrays and objects end exactly where the next row starts."""
        text = 'ak:12a0:"a"ak:-3.5e2a0:"b"ak:truea0:"c"ak:nulla0:"d"ak:[1,[2]]a0:"e"ak:{"x":{}}a0:"f"'
        self.assertEqual([e[2] for e in self.assertSplitInvariant(text)[0]], list("abcdef"))

    def test_malformed_value_resyncs_to_next_row(self):
        """A broken value in a run-together stream is skipped to the next plausible row."""
        text = 'a0:"ok1"a2:[{"type":"image","image":"u",}]a0:"ok2"ad:{bad json here}a0:"ok3"a0:"tab\there"a0:"ok4"'
        self.assertEqual([e[2] for e in self.assertSplitInvariant(text)[0]], ["ok1", "ok2", "ok3", "ok4"])


class DialectC(SplitAssertions):
    STREAM = ('data: {"type":"start","messageId":"m1"}\n\n'
              ': keep-alive\n\n'
              'data: {"type":"text-start","id":"t1"}\n\n'
              'data: {"type":"reasoning-delta","id":"r","delta":"hmm é"}\n\n'
              'data: {"type":"text-delta","id":"t1","delta":"Hi 😀 \\"q\\" a0:\\"x\\"\\n"}\n\n'
              'data: {"type":"source-url","sourceId":"s1","url":"https://a.example","title":"A"}\n\n'
              'data: {"type":"source-url","sourceId":"s2","url":"https://a.example","title":"dup"}\n\n'
              'data: {"type":"source-url","sourceId":"s3","url":"https://b.example"}\n\n'
              'data: {"type":"file","url":"https://f/img.png","mediaType":"image/png"}\n\n'
              'data: {"type":"file","url":"https://f/doc.pdf","mediaType":"application/pdf"}\n\n'
              'data: {"type":"tool-input-start","toolCallId":"c","toolName":"search"}\n\n'
              'data: {"type":"tool-input-delta","toolCallId":"c","inputTextDelta":"{"}\n\n'
              'data: {"type":"brand-new-type"}\n\n'
              'data: {"type":"text-delta","id":"t1","delta":""}\n\n'
              'data: {"type":"text-end","id":"t1"}\n\n'
              'data: {"type":"finish","finishReason":"length","usage":{"inputTokens":2,"outputTokens":3}}\n\n'
              'data: [DONE]\n\n')

    def test_typed_events(self):
        """Typed events become text, reasoning, image, citations and finish; unknown types are counted."""
        events, citations, unknown = self.assertSplitInvariant(self.STREAM)
        self.assertEqual(events, [("reasoning", "hmm é"), ("text", None, 'Hi 😀 "q" a0:"x"\n'),
                                  ("image", "https://f/img.png"),
                                  ("finish", "length", {"inputTokens": 2, "outputTokens": 3})])
        self.assertEqual(citations, [{"url": "https://a.example", "title": "A"}, {"url": "https://b.example"}])
        self.assertEqual(unknown, 1)

    def test_events_come_from_the_feed_that_completes_a_line(self):
        """An event cut over several chunks comes out of the feed() that brings its newline."""
        p = bridge.ArenaStreamParser()
        self.assertEqual(p.feed('data: {"type":"start"}\n\ndata: {"type":"text-delta","del'), [])
        self.assertEqual(p.feed('ta":"a"}'), [])
        self.assertEqual(p.feed('\n\ndata: {"type":"text-delta","delta":"b"}\n'),
                         [("text", None, "a"), ("text", None, "b")])

    def test_crlf_and_sse_fields(self):
        """CRLF line ends, `event:`/`id:` fields and comments do not change the events."""
        text = self.STREAM.replace("data: {\"type\":\"text-start\"", "event: message\nid: 7\ndata: {\"type\":\"text-start\"")
        text = text.replace("\n", "\r\n")
        self.assertEqual(outcome([text]), outcome([self.STREAM]))
        self.assertEqual(outcome([text[:301], text[301:]]), outcome([self.STREAM]))

    def test_errors(self):
        """An error event, finishReason "error" and a `data:` error body become errors."""
        self.assertEqual(run(['data: {"type":"error","errorText":"Too Many Requests"}\n\n'])[0],
                         [("error", 429, "rate_limited")])
        self.assertEqual(run(['data: {"type":"finish","finishReason":"error"}\n\n'])[0],
                         [("error", 502, "upstream_error")])
        self.assertEqual(run(['data: {"error":"recaptcha validation failed"}\n\n'])[0],
                         [("error", 403, "recaptcha_failed")])

    def test_last_line_without_newline_and_broken_lines(self):
        """close() parses a last event without newline; broken lines are dropped without exceptions."""
        text = ('data: {"type":"text-delta","delta":"a"}\n'
                'data: {"type":"text-delta","delta":\n'
                'garbage line\n'
                'data: {"type":"text-delta","delta":"b"}')
        self.assertEqual(self.assertSplitInvariant(text)[0], [("text", None, "a"), ("text", None, "b")])

    def test_rows_inside_typed_stream(self):
        """A dialect-A row sent as an SSE event is still understood."""
        text = 'data: {"type":"start"}\n\ndata: a0:"row"\n\ndata: {"type":"text-delta","delta":"typed"}\n\n'
        self.assertEqual(self.assertSplitInvariant(text)[0], [("text", '"row"', "row"), ("text", None, "typed")])


class Detection(unittest.TestCase):
    def test_dialect_from_first_bytes(self):
        """The first bytes choose the dialect, however few arrive at a time."""
        cases = [('\n\n  data: {"type":"start"}\n', bridge.ArenaStreamParser.TYPED),
                 ('data:[DONE]\n', bridge.ArenaStreamParser.TYPED),
                 (': ping\n', bridge.ArenaStreamParser.TYPED),
                 ('data: a0:"x"\n', bridge.ArenaStreamParser.ROWS),
                 ('{"id":"1","userMessage":{}}a0:"x"', bridge.ArenaStreamParser.ROWS),
                 ('a0:"x"', bridge.ArenaStreamParser.ROWS), ('0:"x"', bridge.ArenaStreamParser.ROWS),
                 ('d:{}', bridge.ArenaStreamParser.ROWS), ('<html>', bridge.ArenaStreamParser.ROWS)]
        for text, mode in cases:
            p = bridge.ArenaStreamParser()
            for ch in text:
                p.feed(ch)
            self.assertEqual(p.mode, mode, text)

    def test_undecided_start_is_decided_at_close(self):
        """A stream too short to tell (`da`, blanks) is read as rows at close()."""
        for text in ("da", "  \n", "data:", "d"):
            p = bridge.ArenaStreamParser()
            self.assertEqual(p.feed(text), [])
            self.assertEqual(p.close(), [], text)


class Fuzz(unittest.TestCase):
    ROWS = ['a0:"w{i} é😀\\"\\\\"', 'b0:"B{i}"', '0:"L{i}"', 'ag:"r{i}"', 'ag:{{"text":"rt{i}"}}',
            'a2:[{{"type":"heartbeat"}}]', 'a2:[{{"type":"image","image":"https://i/{i}.png"}}]',
            'ac:{{"toolCallId":"citation-source","argsTextDelta":"{{\\"source\\":{{\\"url\\":\\"u{i}\\"}}}}"}}',
            'ae:{{"finishReason":"stop","isContinued":false}}', 'ak:{i}', 'ak:-{i}.5e3', 'az:[{i}]',
            'a3:"Internal Server Error {i}"', 'ad:{{"finishReason":"length"}}', 'a0:"x\\u00e9\\ud83d\\ude00{i}"']
    JUNK = ['a0:"cut\x01"', 'a2:[1,}', 'ad:{nope}', '<p>hi</p>', 'a0:tru', ']]', '{"a":', 'data: [DONE]', ': c',
            'data: ', 'data:data:', '1.5e', '"a0:{"']

    def test_random_streams_split_anywhere(self):
        """Random A/B streams, with broken rows mixed in, give the same outcome for random splits."""
        rng = random.Random(20261104)
        for case in range(150):
            rows = [rng.choice(self.ROWS).format(i=i) for i in range(rng.randint(1, 14))]
            if case % 3 == 0:
                rows.insert(rng.randrange(len(rows) + 1), rng.choice(self.JUNK))
            sep = rng.choice(["\n", "\r\n", "", "\n\n"])
            prefix = "data: " if sep == "\n\n" else ""
            text = "".join(prefix + r + sep for r in rows)
            if sep == "" and rng.random() < 0.5:
                text = '{"id":"1","userMessage":{"content":"a0:\\"x\\"}]"}}' + text
            side = rng.choice("ab")
            whole = outcome([text], side)
            data = text.encode()
            for _ in range(12):
                cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(1, 8))))
                pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
                self.assertEqual(outcome(pieces, side), whole, (text, cuts))
                cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
                pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
                self.assertEqual(outcome(pieces, side), whole, (text, cuts))

    def test_garbage_never_raises(self):
        """Random bytes and truncated JSON never raise, whatever the chunking."""
        rng = random.Random(7)
        alphabet = 'ab0gdc23:{}[]"\\\n\r ,.-etrufnlu1eE+'
        for _ in range(400):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
            whole = outcome([text], rng.choice("ab"))
            self.assertIsInstance(whole[0], list)
            for _ in range(4):
                i = rng.randint(0, len(text))
                self.assertEqual(outcome([text[:i], text[i:]], "a"), outcome([text], "a"), (text, i))


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
        self.h.wait(lambda: self.h.bridge.files.shape is not None, what="shape")
        self.h.ask()
        self.assertEqual(body_of(tab.tasks[-1])["sessionContext"], {"v": 2})
        self.assertEqual(body_of(tab.tasks[-1])["mode"], "direct-battle")
        with open(os.path.join(self.h.dir, "request_shape.json"), encoding="utf-8") as f:
            self.assertEqual(json.load(f)["body"], {"sessionContext": {"v": 2}})
        files = bridge.UserFiles(self.h.config_path)      # as after a restart: read from disk
        files.load_all(report=lambda m: None)
        bridge.Bridge(files, "127.0.0.1", 0)
        self.assertEqual(files.shape, {"sessionContext": {"v": 2}})
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


class TokenReady(BridgeCase):
    config = {"token_ready_seconds": 8}
    WINDOW = {"command": "keep_token_ready", "action": "chat_submit", "seconds": 8}

    def test_kept_ready_from_connect_and_renewed_by_requests_at_most_every_quarter_window(self):
        """A tab is asked for a token minted ahead the moment it connects (the very first request
        finds one ready); requests renew the window, at most once per quarter of it."""
        tab = self.h.tab()
        self.h.wait(lambda: tab.token_windows == [self.WINDOW], what="keep_token_ready at connect")
        self.h.ask()
        self.assertEqual(tab.token_windows, [self.WINDOW])      # not again for the first request
        for _ in range(3):
            self.h.ask()
        self.assertEqual(len(tab.token_windows), 1)
        self.h.bridge.tabs[0].token_window_at -= 2.1            # a quarter window (2 s) later
        self.h.ask()
        self.assertEqual(tab.token_windows, [self.WINDOW] * 2)

    def test_none_kept_ready_when_disabled(self):
        """token_ready_seconds 0: the tab mints a token per request, none ahead."""
        h = Harness({"token_ready_seconds": 0})
        self.addCleanup(h.close)
        tab = h.tab()
        self.assertEqual(h.ask().choices[0].message.content, "Hello world!")
        self.assertEqual((tab.token_windows, len(tab.tasks)), ([], 1))


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
        for stage in ("sent", "first_byte", "first_token", "end"):     # p50/p99 over the recent requests
            got = health["stages_ms"][stage]
            self.assertEqual(got["n"], 3, stage)
            self.assertLessEqual(0, got["p50"])
            self.assertLessEqual(got["p50"], got["p99"])
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


# Today's site, as recorded (PROTOCOL 2.6, 2.8, 2.9) =============================================

class RecordedSite(unittest.TestCase):
    """The site's model catalog, its budget header, its refusals and a real-sized multi-lane answer."""

    def test_full_size_catalog_named_by_the_arena_rule(self):
        """The full-size catalog (about 470 rows, six arenas, names repeated across and within arenas)
        gives exactly the entries an independent reading of PROTOCOL 2.8 gives; chat models that can
        also build web pages stay chat, the router is chat, code-arena rows are :webdev."""
        rows = testsupport.catalog_flattened()
        self.assertGreaterEqual(len(rows), 450)
        got = bridge.page_model_entries(rows)
        self.assertEqual(got, testsupport.catalog_models_json())
        self.assertEqual(bridge.page_model_entries(testsupport.CATALOG), got)     # the catalog as served
        web_chat = [m["publicName"] for g in testsupport.CATALOG if g["arena"] == "text" for m in g["models"]
                    if (m.get("capabilities") or {}).get("outputCapabilities", {}).get("web")
                    and m.get("userSelectable") is not False]
        self.assertGreater(len(web_chat), 20)
        for name in web_chat:
            self.assertEqual(bridge.parse_model_value(got[name]).modality, "chat", name)
        self.assertEqual(got["max"], testsupport.ROUTER_ID)                      # the router is chat
        self.assertTrue(any(k.endswith(":webdev") for k in got))

    def test_budget_header(self):
        self.assertEqual(bridge.parse_ratelimit("limit=1800, remaining=12, reset=240"),
                         {"limit": 1800, "remaining": 12, "reset": 240})
        self.assertEqual(bridge.parse_ratelimit("remaining=0"), {"limit": None, "remaining": 0, "reset": None})
        for odd in (None, 5, "", "limit=1800", "remaining=-1", "x" * 10000):
            self.assertIsNone(bridge.parse_ratelimit(odd))

    def test_a_budget_reset_far_away_rests_an_hour_at_most(self):
        """A `reset` that cannot be seconds of a 5-minute window (a timestamp, milliseconds) never
        benches a tab for longer than BUDGET_MAX_RESET_SECONDS."""
        tab = bridge.Tab.__new__(bridge.Tab)
        tab.name, tab.cool_until, tab.budget, tab.rest_reason = "tab1", 0.0, None, ""
        tab.note_budget("limit=1800, remaining=0, reset=1796660545")
        self.assertLessEqual(tab.cool_until - time.monotonic(), bridge.BUDGET_MAX_RESET_SECONDS)
        self.assertGreater(tab.cool_until - time.monotonic(), bridge.BUDGET_MAX_RESET_SECONDS - 5)

    def test_site_refusals(self):
        """User not found (no cookies) says to log in again; an old route is a changed site; a 404 of a
        follow-up falls back to a new conversation."""
        e = bridge.classify_upstream_error('{"message": "User not found"}', 401)
        self.assertEqual((e.status, e.code), (403, "session_not_owned"))
        self.assertIn("Log in again", e.message)
        e = bridge.classify_upstream_error('{"error":"Route not allowed"}', 403)
        self.assertEqual((e.status, e.code), (502, "upstream_schema_changed"))
        self.assertFalse(e.retryable)
        e = bridge.classify_upstream_error('{"error": "Evaluation session not found"}', 404)
        self.assertEqual(bridge.retry_plan(e, True, 0), {"new_conversation": True})

    def test_long_multi_lane_capture_at_every_split(self):
        """A ~97,000-character battle answer (both lanes: text, reasoning, tool rows, webdev data rows,
        every row newline-terminated): only lane A's text and reasoning come out, whole, byte by byte,
        at the cuts the stand-in sends it with, and at 300 random two-way splits; lane B never leaks."""
        text, want_text, want_reasoning = testsupport.long_capture()
        self.assertGreater(len(text), 95_000)

        def outcome(chunks):
            events, parser = feed_parser(chunks, "a")
            got_text = "".join(e[2] for e in events if e[0] == "text")
            got_reasoning = "".join(e[1] for e in events if e[0] == "reasoning")
            return got_text, got_reasoning, [e[0] for e in events if e[0] not in ("text", "reasoning")]

        whole = outcome([text])
        self.assertEqual(whole[:2], (want_text, want_reasoning))
        self.assertEqual(whole[2], ["finish"])
        self.assertNotIn('"b0:', whole[0])
        self.assertEqual(outcome(list(text)), whole)                                   # one character at a time
        data = text.encode()
        cuts = [0] + testsupport.prime_cuts(data) + [len(data)]
        self.assertEqual(outcome([data[a:b] for a, b in zip(cuts, cuts[1:])]), whole)   # bytes, odd cuts
        rnd = random.Random(97)
        for _ in range(300):
            k = rnd.randrange(1, len(data))
            self.assertEqual(outcome([data[:k], data[k:]]), whole, k)
        b_events, _ = feed_parser([text], "b")
        self.assertNotIn(want_text[:200], "".join(e[2] for e in b_events if e[0] == "text"))

    def test_doctor_says_where_the_model_list_came_from(self):
        checks = {name: (ok, detail) for ok, name, detail, _ in bridge.doctor_checks({"models": 0})}
        self.assertEqual(checks["models"], (False, "0 known, no list reported by a tab yet"))
        checks = {name: (ok, detail) for ok, name, detail, _ in bridge.doctor_checks(
            {"models": 357, "models_source": "catalog", "models_reported_at": time.time() - 120})}
        self.assertTrue(checks["models"][0])
        self.assertIn("357 known, list from the site's model catalog", checks["models"][1])
