"""Tests for bridge.py, ordered from the pure layers up (each section only uses what is above it):

  Shared helpers   in testsupport.py: FakeTab (a `websockets` client playing a script per task),
                   Harness (a real Bridge on 127.0.0.1:0 in a thread of its own, user files in a temp
                   folder, limits set per bridge with `overrides`), BridgeCase, raw HTTP helpers.
  (a) Wire and pure layers, no sockets: the strict HTTP head parser and chunked decoder, request
      translation, LMArena stream parsing, upstream error classification, chunk shapes, JSONC
      writes, Config defaults (against config.jsonc and the README), origin checks.
  (b) Server tests with raw sockets: framing, limits, timeouts, keep-alive, half-closed and paused
      clients, lingering close, Host/CORS/API key checks, LAN exposure.
  (c) End to end: the official openai SDK (or raw HTTP) against a real bridge and a FakeTab:
      streaming, errors, retries, odd tab messages, capture over HTTP, images.
  (d) Command line and subprocesses: capture, models, update, start-up, SIGTERM, idle restart.
  (e) Fuzzing (hypothesis) and a soak run.

The real userscript in a real browser is in test_userscript.py. Every wait has a bound; every
socket, loop and bridge a test opens is closed by the test (python -X dev shows no ResourceWarning).
A test that shows a bug not yet fixed in bridge.py is marked @unittest.expectedFailure with a `# BUG:` note.

Run: python -m unittest -v test_bridge
"""


import ast
import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import gc
import hashlib
import itertools
import json
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
import tracemalloc
import unittest
import urllib.parse

import openai
import websockets
from websockets.frames import Frame, Opcode

import bridge


from testsupport import (BridgeCase, FakeTab, FileServer, HERE, Harness, IMAGE_UUID, MID, MID2, MODELS, SHIPPED_CONFIG,
    MODEL_UUID, PNG_B64, SID, SID2, answer_capture, chat, close_with_reset, dechunk, get_req, lines,
    exposed_bridge, non_loopback_ip, padded_head, parse_all, post_req, read_responses, run_cli, split_response, sse_events,
    templates, ws_connect)


# (a) Wire and pure layers: no sockets, no event loop ================================================

class StrictHttp(unittest.TestCase):
    BAD = [
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chun\xe2\x84\xaaed", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x1f", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1_0", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \xd9\xa5", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\nb", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n  folded", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX : a", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\n: a", 400),
        (b"GET / HTTP/1.1", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b", 400),
        (b"GET  / HTTP/1.1\r\nHost: a", 400),
        (b"GET / HTTP/2.0\r\nHost: a", 505),
        (b"GET / FOO\r\nHost: a", 400),
        (b"G\xc3\xa9T / HTTP/1.1\r\nHost: a", 400),
        (b"GET /\xc3\xa9 HTTP/1.1\r\nHost: a", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX\n: a", 400),          # a name, a method or a target ending in LF
        (b"GET\n / HTTP/1.1\r\nHost: a", 400),
        (b"GET /x\n HTTP/1.1\r\nHost: a", 400),
    ]

    def test_rejected_heads(self):
        """Every smuggling vector in the table is refused with 400 (or 505)."""
        for head, status in self.BAD:
            with self.assertRaises(bridge.HttpError, msg=head) as cm:
                bridge.parse_request_head(head)
            self.assertEqual(cm.exception.status, status, head)

    def test_accepted_heads(self):
        """Plain requests parse, with lowercase names and keep-alive rules per version."""
        r = bridge.parse_request_head(b"POST /v1/x?y=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\nX-A:  b ")
        self.assertEqual((r.method, r.path, r.query, r.content_length, r.keep_alive, r.header("x-a")),
                         ("POST", "/v1/x", "y=1", 5, True, "b"))
        r = bridge.parse_request_head(b"GET / HTTP/1.0")
        self.assertFalse(r.keep_alive)
        r = bridge.parse_request_head(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked")
        self.assertTrue(r.chunked)

    def test_chunked_decoder_strict(self):
        """A bad CRLF after chunk data, a bad size, or an oversized body is refused."""
        for data, status in ((b"3\r\nabcX\r\n0\r\n\r\n", 400), (b"g\r\n", 400), (b"+3\r\nabc\r\n", 400),
                             (b"ffffffffffffffffff\r\n", 400), (b"a\r\n0123456789\r\n", 413)):
            with self.assertRaises(bridge.HttpError) as cm:
                bridge.ChunkedDecoder(5).feed(data)
            self.assertEqual(cm.exception.status, status, data)
        d = bridge.ChunkedDecoder(100)
        self.assertTrue(d.feed(b"3\r\nabc\r\n0\r\n\r\nNEXT"))
        self.assertEqual((d.body(), d.leftover), (b"abc", b"NEXT"))

    def test_outgoing_headers_never_carry_cr_lf(self):
        """Header values written by the server are stripped of CR, LF and NUL."""
        head = bridge.response_head(200, [("X-Evil", "a\r\nSet-Cookie: x=1"), ("X-Nul", "b\x00c")])
        self.assertNotIn(b"\r\nSet-Cookie", head)
        self.assertEqual(head.count(b"\r\n"), 4)


class RequestTranslation(unittest.TestCase):
    def test_roles_positions_and_empty_content(self):
        """developer -> system; system at b in direct chat, everything else a; empty user -> space."""
        cases = [
            # (messages, options, expected [(role, content, position)])
            ([{"role": "developer", "content": "be brief"}, {"role": "user", "content": ""}], {},
             [("system", "be brief", "b"), ("user", " ", "a")]),
            ([{"role": "system", "content": "s1"}, {"role": "system", "content": "s2"},
              {"role": "user", "content": "q"}, {"role": "assistant", "content": "prefill"}], {},
             [("system", "s1", "b"), ("system", "s2", "b"), ("user", "q", "a"), ("assistant", "prefill", "a")]),
            ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
             {"mode": "battle", "target": "B"}, [("system", "s", "b"), ("user", "q", "b")]),
            ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
             {"mode": "battle", "target": "A"}, [("system", "s", "a"), ("user", "q", "a")]),
            ([{"role": "user", "content": "a"}, {"role": "system", "content": "s1"},
              {"role": "system", "content": "s2"}], {"tavern": True},
             [("system", "s1\n\ns2", "b"), ("user", "a", "a")]),
            ([{"role": "user", "content": "q"}], {"bypass": True}, [("user", "q", "a"), ("user", " ", "a")]),
            ([{"role": "user", "content": "q"}], {"bypass": True, "mode": "battle", "target": "B"},
             [("user", "q", "b"), ("user", " ", "a")]),
            ([{"role": "user", "content": "q"}], {"bypass": True, "is_image": True}, [("user", "q", "a")]),
            ([{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}], {},
             [("user", "one\n\ntwo", "a")]),
        ]
        for messages, opts, expected in cases:
            got = [(t["role"], t["content"], t["participantPosition"]) for t in templates(messages, **opts)]
            self.assertEqual(got, expected, (messages, opts))

    def test_attachments_from_every_part_type(self):
        """image_url (data and http, with detail), input_audio and file parts become attachments."""
        msg = {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}", "detail": "high"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "paper.pdf"}},
            {"type": "file", "file": {"file_data": "aGVsbG8=", "filename": "notes.txt"}},
        ]}
        (t,) = templates([msg])
        self.assertEqual(t["content"], "look")
        got = [(a["name"], a["contentType"], a["url"]) for a in t["attachments"]]
        self.assertEqual(got, [
            ("image_1.png", "image/png", f"data:image/png;base64,{PNG_B64}"),
            ("cat.jpg", "image/jpeg", "https://example.com/cat.jpg"),
            ("audio_3.wav", "audio/wav", "data:audio/wav;base64,UklGRg=="),
            ("paper.pdf", "application/pdf", "data:application/pdf;base64,JVBERi0="),
            ("notes.txt", "text/plain", "data:text/plain;base64,aGVsbG8="),
        ])

    def test_attachment_over_limit_is_413(self):
        """A file over max_attachment_bytes is refused up front with 413 attachment_too_large."""
        big = base64.b64encode(b"\0" * 2000).decode()
        with self.assertRaises(bridge.ApiError) as cm:
            templates([{"role": "user", "content": [{"type": "image_url",
                                                      "image_url": {"url": f"data:image/png;base64,{big}"}}]}],
                      attachment_limit=1999)
        self.assertEqual((cm.exception.status, cm.exception.code), (413, "attachment_too_large"))
        templates([{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": f"data:image/png;base64,{big}"}}]}],
                  attachment_limit=2000)

    def test_message_chain(self):
        """Fresh time-ordered UUIDv7 ids, parents chained, session id, pending last."""
        tpl = templates([{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                         {"role": "assistant", "content": "pre"}])
        req = bridge.build_retry_request(tpl, SID, MID, MODEL_UUID, False)
        msgs = req["body"]["messages"]
        ids = [m["id"] for m in msgs]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 3)
        for i, m in enumerate(msgs):
            self.assertEqual(m["id"][14], "7")
            self.assertEqual(m["parentMessageIds"], [ids[i - 1]] if i else [])
            self.assertEqual(m["evaluationSessionId"], SID)
            self.assertIsNone(m["evaluationId"])
            self.assertEqual(m["experimental_attachments"], [])
            for key in ("failureReason", "metadata", "createdAt", "updatedAt", "participantPosition"):
                self.assertIn(key, m)
        self.assertEqual([m["status"] for m in msgs], ["success", "success", "pending"])
        img = bridge.build_retry_request(tpl, SID, MID, None, True)["body"]["messages"]
        self.assertEqual([m["status"] for m in img], ["success"] * 3)
        self.assertEqual(req["body"]["modelId"], MODEL_UUID)
        self.assertNotIn("recaptchaV3Token", req["body"])

    def test_model_resolution(self):
        """models.json: uuid, uuid:image, null:image; unknown -> null, or 404 with similar names."""
        self.assertEqual(bridge.resolve_model("test-model", MODELS, False), bridge.ModelRef(MODEL_UUID, "chat"))
        self.assertEqual(bridge.resolve_model("image-model", MODELS, False), bridge.ModelRef(IMAGE_UUID, "image"))
        self.assertEqual(bridge.resolve_model("keep-model", MODELS, False), bridge.ModelRef(None, "image"))
        self.assertEqual(bridge.resolve_model("other", MODELS, False), bridge.ModelRef(None, "chat"))
        self.assertEqual(bridge.parse_model_value(f"{MODEL_UUID}:search"), bridge.ModelRef(MODEL_UUID, "search"))
        self.assertEqual(bridge.parse_model_value(f"{MODEL_UUID}:webdev").modality, "webdev")
        self.assertEqual(bridge.parse_model_value(f"{MODEL_UUID}:bogus").modality, "chat")
        with self.assertRaises(bridge.ApiError) as cm:
            bridge.resolve_model("test-modl", MODELS, True)
        self.assertEqual((cm.exception.status, cm.exception.code), (404, "model_not_found"))
        self.assertIn("test-model", cm.exception.message)

    def test_placeholder_ids(self):
        """Empty, YOUR_..., or non-UUID ids are placeholders."""
        for v in ("", "YOUR_SESSION_ID", "your_id_here", "abc", None):
            self.assertTrue(bridge.is_placeholder_id(v), v)
        self.assertFalse(bridge.is_placeholder_id(SID))


class StreamParsing(unittest.TestCase):
    SAMPLE = ('ag:"17*3 = 51."\nag:{"text": " sure"}\na2:[{"type":"heartbeat"}]\na0:"**51** é€😀 \\"q\\" \\n"\n'
              'b0:"other side"\naz:"unknown"\nac:{"toolCallId":"citation-source","argsTextDelta":'
              '"{\\"source\\": {\\"id\\": \\"1\\", \\"url\\": \\"https://a.example\\", \\"title\\": \\"A\\"}}"}\n'
              'a2:[{"type":"image","image":"https://x/y.png","mimeType":"image/png"}]\n'
              'ad:{"finishReason":"content-filter","usage":{"promptTokens":3,"completionTokens":4}}\n')

    def test_every_split_position_gives_the_same_events(self):
        """Splitting the stream at every position (str and bytes, mid-UTF-8) changes nothing."""
        whole = parse_all([self.SAMPLE])
        data = self.SAMPLE.encode()
        for i in range(len(data) + 1):
            self.assertEqual(parse_all([data[:i], data[i:]]), whole, i)
        for i in range(len(self.SAMPLE) + 1):
            self.assertEqual(parse_all([self.SAMPLE[:i], self.SAMPLE[i:]]), whole, i)
        self.assertEqual(parse_all([bytes([b]) for b in data]), whole)

    def test_events(self):
        """Reasoning, text, images; other side, heartbeats and unknown codes dropped; finish mapped."""
        self.assertEqual(parse_all([self.SAMPLE]), [
            ("reasoning", "17*3 = 51."), ("reasoning", " sure"), ("text", '**51** é€😀 "q" \n'),
            ("image", "https://x/y.png"),
            ("finish", "content_filter", {"promptTokens": 3, "completionTokens": 4})])

    def test_battle_side_b(self):
        """In battle only the target side's lines count."""
        self.assertEqual(parse_all(['a0:"hi A"\nb0:"hi B"\nad:{"finishReason":"unknown"}\n'
                                    'bd:{"finishReason":"stop"}\n'], side="b"),
                         [("text", "hi B"), ("finish", "stop", None)])

    def test_finish_reasons(self):
        """LMArena finish reasons map to OpenAI's set; "error" is an error."""
        for arena, openai_ in (("stop", "stop"), ("unknown", "stop"), ("length", "length"),
                               ("content-filter", "content_filter")):
            self.assertEqual(parse_all([f'ad:{{"finishReason":"{arena}"}}\n']), [("finish", openai_, None)])
        self.assertEqual(parse_all(['ad:{"finishReason":"error"}\n']), [("error", "upstream_error")])

    def test_errors_in_stream(self):
        """hasArenaError, a3 errors, JSON error bodies and Cloudflare pages become errors."""
        self.assertEqual(parse_all(['a0:"hasArenaError"\n']), [("error", "upstream_error")])
        self.assertEqual(parse_all(['a3:"An error occurred"\n']), [("error", "upstream_error")])
        self.assertEqual(parse_all(['{"error":"Too Many Requests"}']), [("error", "rate_limited")])
        self.assertEqual(parse_all(["<html><title>Just a moment...</title>"]), [("error", "cloudflare_challenge")])

    def test_base64_image_and_citations(self):
        """Base64 image parts become data URLs; citation deltas split over lines are assembled."""
        p = bridge.ArenaStreamParser()
        ev = p.feed('a2:[{"type":"image","data":"QUJD","mimeType":"image/webp"}]\n')
        self.assertEqual(ev, [("image", "data:image/webp;base64,QUJD")])
        src = json.dumps({"source": [{"id": "1", "url": "https://a.example", "title": "A"},
                                     {"id": "2", "url": "https://b.example"}]})
        for piece in (src[:20], src[20:]):
            p.feed("ac:" + json.dumps({"toolCallId": "citation-source", "argsTextDelta": piece}) + "\n")
        self.assertEqual(bridge.citations_markdown(p.citations),
                         "\n\nSources:\n- [A](https://a.example)\n- https://b.example")

    def test_finish_reason_that_is_not_a_string(self):
        """A finish row whose finishReason is not a string still ends the answer (as "stop")."""
        for row in ('ad:{"finishReason":5}\n', 'ad:{"finishReason":[1]}\n', 'ad:{"finishReason":{"a":1}}\n'):
            self.assertEqual(parse_all([row]), [("finish", "stop", None)], row)

class UpstreamErrors(unittest.TestCase):
    def test_classification(self):
        """Each LMArena failure gets its own status and code."""
        cases = [
            (("<title>Just a moment...</title>", 403), 503, "cloudflare_challenge"),
            (("Too Many Requests", 429), 429, "rate_limited"),
            (('{"error":"User abc does not have access to evaluation session xyz"}', 401), 403, "session_not_owned"),
            (('{"error":"recaptcha validation failed"}', 403), 403, "recaptcha_failed"),
            (("Payload Too Large", 413), 413, "attachment_too_large"),
            (('{"error":"Content violates our terms of use"}', 422), 400, "content_policy_violation"),
            (("Internal Server Error", 500), 502, "upstream_error"),
            (("Network response was not ok. Status: 429", None), 429, "rate_limited"),
        ]
        for (text, status), want_status, want_code in cases:
            err = bridge.classify_upstream_error(text, status)
            self.assertEqual((err.status, err.code), (want_status, want_code), text)
        self.assertEqual(bridge.classify_upstream_error("x", 429, 17).retry_after, 17)

    def test_status_alone_decides_when_the_message_is_bland(self):
        """A tab's {"error": "nope", "status": N}: the status alone gives the code; odd numbers
        (Infinity, NaN, "inf", booleans, lists, out of range) are ignored, never trusted."""
        for status, want in ((429, (429, "rate_limited")), (401, (403, "session_not_owned")),
                             (413, (413, "attachment_too_large")), (422, (400, "content_policy_violation"))):
            err = bridge.tab_error({"error": "nope", "status": status})
            self.assertEqual((err.status, err.code), want, status)
        for bad in (float("inf"), float("-inf"), float("nan"), "inf", "Infinity", True, [429], {"a": 1},
                    99, 600, "abc", 1e300):
            err = bridge.tab_error({"error": "nope", "status": bad, "retry_after": bad})
            self.assertEqual((err.status, err.code, err.retry_after), (502, "upstream_error", None), bad)
        err = bridge.tab_error({"error": "nope", "status": 429, "retry_after": "inf"})
        self.assertEqual((err.status, err.retry_after), (429, 30))
        self.assertEqual(bridge.tab_error({"error": "nope", "status": "429", "retry_after": 7.0}).retry_after, 7)

class ChunkShapes(unittest.TestCase):
    def test_a_burst_is_one_delta_per_kind_in_order(self):
        """Streamed pieces of one render become one delta per run of a kind; LMArena's JSON literals
        are joined as they are (escapes kept, a surrogate pair split over two literals rejoined)."""
        for reply in (bridge.OpenAIReply("m", True, False, 1), bridge.AnthropicReply("m", True, 1)):
            out = reply.render([("text", '"a\\n"', "a\n"), ("text", '"\\ud83d"', "\ud83d"),
                                ("text", '"\\ude00"', "\ude00"), ("text", None, 'q"'), ("reasoning", "r1"),
                                ("reasoning", "r2"), ("text", '"z"', "z")])
            got = []
            for e in sse_events(bridge.wire_bytes(out)):
                obj = json.loads(e)
                if "choices" in obj:
                    d = obj["choices"][0]["delta"]
                    got.append(("text", d["content"]) if "content" in d else ("reasoning", d["reasoning_content"]))
                elif obj["type"] == "content_block_delta":
                    d = obj["delta"]
                    got.append(("text", d["text"]) if d["type"] == "text_delta" else ("reasoning", d["thinking"]))
            self.assertEqual(got, [("text", "a\n\U0001F600q\""), ("reasoning", "r1r2"), ("text", "z")], type(reply))

    def test_formatter_emits_valid_json(self):
        """Every chunk the formatter builds is valid JSON of OpenAI's shape."""
        f = bridge.ChunkFormatter("chatcmpl-1", 'mo"del', 5)
        for text in (f.role(), f.content('"a\\"b"'), f.reasoning('"r"'), f.finish("stop"),
                     f.usage({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})):
            self.assertTrue(text.startswith("data: ") and text.endswith("\n\n"))
            obj = json.loads(text[6:])
            self.assertEqual((obj["id"], obj["object"], obj["model"]), ("chatcmpl-1", "chat.completion.chunk", 'mo"del'))


class UserFileWrites(unittest.TestCase):
    def test_jsonc_update_keeps_comments_and_layout(self):
        """Editing JSONC keeps every comment, quotes style and member order; new keys are appended."""
        text = ('// head\n{\n  // the session\n  "session_id": "YOUR_SESSION_ID", // trailing\n'
                "  'message_id': 'x',\n  /* block */ \"n\": 5,\n  \"obj\": {\"a\": [1, {\"b\": \"}\"}]},\n  // tail\n}\n")
        out = bridge.jsonc_update(text, {"session_id": SID, "n": 7, "new": True})
        for piece in ("// head", "// the session", "// trailing", "/* block */", "// tail", "'message_id': 'x'"):
            self.assertIn(piece, out)
        self.assertEqual(bridge.parse_json_file("t", out),
                         {"session_id": SID, "message_id": "x", "n": 7, "obj": {"a": [1, {"b": "}"}]}, "new": True})
        self.assertLess(out.index('"obj"'), out.index('"new"'))

    def test_crash_during_write_leaves_the_old_file(self):
        """A crash at any point of a write leaves the previous file and no temporary file."""
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "config.jsonc")
        with open(path, "w") as f:
            f.write('{"a": 1}')
        for broken in ("fsync", "replace"):
            original = getattr(os, broken)

            def boom(*a, **k):
                raise OSError("simulated crash")
            setattr(bridge.os, broken, boom)
            try:
                with self.assertRaises(OSError):
                    bridge.atomic_write(path, '{"a": 2}')
            finally:
                setattr(bridge.os, broken, original)
            with open(path) as f:
                self.assertEqual(f.read(), '{"a": 1}')
            self.assertEqual(os.listdir(d), ["config.jsonc"])
        bridge.atomic_write(path, '{"a": 3}')
        with open(path) as f:
            self.assertEqual(f.read(), '{"a": 3}')

    def test_jsonc_update_past_strings_with_commas_spaces_and_slashes(self):
        """Top-level strings holding ", ", spaces, "//", "/*", quotes or braces do not derail the writer:
        the right values change and every comment stays."""
        text = ('{\n  // lead\n  "name": "a, b c", // after name\n  "url": "https://x.example//p/*q*/", /* block */\n'
                '  "quote": "say \\"hi\\", ok }", \'single\': \'x, // y\',\n'
                '  "obj": {"u": "http://a//b", "c": "x, y"}, // after obj\n  "session_id": "old",\n  "n": 1\n}\n')
        self.assertEqual(list(bridge.top_level_spans(text)[0]),
                         ["name", "url", "quote", "single", "obj", "session_id", "n"])
        out = bridge.jsonc_update(text, {"session_id": SID, "name": "new, value // kept", "n": 2, "added": "z"})
        for piece in ("// lead", "// after name", "/* block */", "// after obj", "'single': 'x, // y'"):
            self.assertIn(piece, out)
        self.assertEqual(bridge.parse_json_file("t", out), {
            "name": "new, value // kept", "url": "https://x.example//p/*q*/", "quote": 'say "hi", ok }',
            "single": "x, // y", "obj": {"u": "http://a//b", "c": "x, y"}, "session_id": SID, "n": 2, "added": "z"})


class FileMap(unittest.TestCase):
    """bridge.py shows its map: the module docstring's table of contents matches the section banners
    (number, title, purpose, size in lines), and every section and class stays readable in one sitting."""

    BANNER = re.compile(r"^# (\d+)\. (.+?) =+$")
    ENTRY = re.compile(r"^ {4}(\d+)\. (.+?) +(\d+)  (\S.*)$")
    MAX_SECTION_LINES, MAX_CLASS_LINES = 900, 500

    @classmethod
    def sections(cls):
        """[(number, title, first line, size in lines)] from the banners of bridge.py."""
        with open(os.path.join(HERE, "bridge.py"), encoding="utf-8") as f:
            lines = f.read().split("\n")
        found = [(i, cls.BANNER.match(line)) for i, line in enumerate(lines)]
        found = [(i, m) for i, m in found if m]
        out = []
        for k, (i, m) in enumerate(found):
            end = found[k + 1][0] if k + 1 < len(found) else len(lines)
            out.append((int(m.group(1)), m.group(2), i, end - i))
        return out

    @classmethod
    def expected_toc(cls, purposes):
        width = max(len(f"{n}. {t}") for n, t, _, _ in cls.sections()) + 1
        return "\n".join(f"    {f'{n}. {t}'.ljust(width)}{size:5d}  {purposes.get(n, '?')}"
                         for n, t, _, size in cls.sections())

    def test_table_of_contents_matches_the_banners(self):
        """Numbers and titles equal, in order; each size within 10% (or 20 lines) of the real one."""
        toc = [m for m in (self.ENTRY.match(line) for line in bridge.__doc__.split("\n")) if m]
        purposes = {int(m.group(1)): m.group(4).strip() for m in toc}
        hint = "\\nThe table should read:\\n" + self.expected_toc(purposes)
        got = [(int(m.group(1)), m.group(2)) for m in toc]
        want = [(n, t) for n, t, _, _ in self.sections()]
        self.assertEqual(got, want, hint)
        self.assertEqual(list(range(1, len(want) + 1)), [n for n, _ in want], "sections numbered 1, 2, ...")
        for m, (n, t, _, size) in zip(toc, self.sections()):
            self.assertLessEqual(abs(int(m.group(3)) - size), max(20, size // 10), f"section {n}: {hint}")

    def test_sections_and_classes_fit_one_sitting(self):
        for n, title, _, size in self.sections():
            self.assertLessEqual(size, self.MAX_SECTION_LINES, f"section {n}. {title}")
        with open(os.path.join(HERE, "bridge.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                self.assertLessEqual(node.end_lineno - node.lineno + 1, self.MAX_CLASS_LINES, node.name)

class ConfigDefaults(unittest.TestCase):
    """The built-in defaults (`bridge.Config()`) are what the shipped config.jsonc and the README's
    configuration table say: a default changed in one place only is caught here."""

    def test_defaults_equal_the_shipped_config(self):
        """Every key the shipped config.jsonc sets has the built-in default as its value."""
        path = SHIPPED_CONFIG
        with open(path, encoding="utf-8") as f:
            shipped = bridge.parse_json_file(path, f.read())
        defaults = bridge.Config()
        self.assertGreater(len(shipped), 20)
        for key, value in shipped.items():
            self.assertTrue(hasattr(defaults, key), f"config.jsonc sets {key!r}, which Config does not know")
            self.assertEqual(getattr(defaults, key), tuple(value) if isinstance(value, list) else value, key)
        self.assertEqual(bridge.Config.from_dict(path, shipped), defaults)

    def test_defaults_equal_the_readme_table(self):
        """Each row `| `key`[, `key`] | `default`[, `default`] | ...` of the README's table matches the
        built-in default (rows whose default is prose are checked by meaning)."""
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        fields = {f.name for f in dataclasses.fields(bridge.Config)}
        defaults = bridge.Config()
        checked, prose = set(), set()
        for col1, col2 in re.findall(r"^\| ((?:`\w+`(?:, )?)+) \| ([^|]*) \|", readme, re.M):
            keys = re.findall(r"`(\w+)`", col1)
            if not set(keys) <= fields:
                continue                  # another table (endpoints, errors)
            values = re.findall(r"`([^`]*)`", col2)
            if len(values) != len(keys):
                prose.update(keys)
                continue
            for key, text in zip(keys, values):
                want = json.loads(text)
                self.assertEqual(getattr(defaults, key), tuple(want) if isinstance(want, list) else want,
                                 f"README says {key} defaults to {text}")
                checked.add(key)
        self.assertGreater(len(checked), 25)
        self.assertEqual(prose, {"session_id", "message_id", "cors_allowed_origins"})
        self.assertTrue(bridge.is_placeholder_id(defaults.session_id) and bridge.is_placeholder_id(defaults.message_id))
        self.assertTrue(defaults.cors_allowed_origins)
        for origin in defaults.cors_allowed_origins:          # "localhost origins"
            self.assertIn(urllib.parse.urlsplit(origin).hostname, ("localhost", "127.0.0.1", "::1"))


class TabOrigins(unittest.TestCase):
    def test_only_https_lmarena_origins_without_user_info(self):
        """A tab's Origin must be https, an LMArena host or subdomain, no user info, no path."""
        for origin in ("https://lmarena.ai", "https://canary.lmarena.ai", "https://arena.ai", "https://LMArena.ai",
                       "https://lmarena.ai:443", "https://lmarena.ai/"):
            self.assertTrue(bridge.origin_is_lmarena(origin), origin)
        for origin in ("https://user@lmarena.ai", "https://user:pw@lmarena.ai",
                       "http://lmarena.ai", "wss://lmarena.ai", "https://lmarena.ai.evil.com", "https://evillmarena.ai",
                       "https://lmarena.ai/x", "https://evil.com/lmarena.ai", "null", "", "https://[::1"):
            self.assertFalse(bridge.origin_is_lmarena(origin), origin)

    def test_empty_user_info_is_refused_too(self):
        """Empty user info ("@" with no user name) is still user info."""
        for origin in ("https://@lmarena.ai", "https://:pw@lmarena.ai"):
            self.assertFalse(bridge.origin_is_lmarena(origin), origin)




# (b) Server tests: a real bridge on 127.0.0.1:0, raw sockets ========================================

class HttpServer(BridgeCase):
    config = {"max_head_bytes": 4096, "max_body_bytes": 100000, "head_timeout_seconds": 0.5,
              "body_timeout_seconds": 0.5, "keep_alive_timeout_seconds": 0.5}

    def test_keep_alive_two_requests_one_connection(self):
        """Two requests on one connection, one after the other."""
        s = self.connect()
        s.sendall(get_req())
        (r1,) = read_responses(s, 1)
        s.sendall(get_req("/v1/models"))
        (r2,) = read_responses(s, 1)
        self.assertEqual((r1[0], r2[0]), (200, 200))
        self.assertEqual(json.loads(r2[2])["object"], "list")

    def test_pipelined_requests_answered_in_order(self):
        """Three pipelined requests in one packet are answered in order."""
        self.h.tab()
        s = self.connect()
        s.sendall(get_req("/v1/models") + post_req(json.dumps(chat()).encode()) + get_req("/health"))
        rs = read_responses(s, 3)
        self.assertEqual([r[0] for r in rs], [200, 200, 200])
        self.assertEqual(json.loads(rs[0][2])["object"], "list")
        self.assertEqual(json.loads(rs[1][2])["choices"][0]["message"]["content"], "Hello world!")
        self.assertEqual(json.loads(rs[2][2])["status"], "ok")

    def test_chunked_request_body(self):
        """A chunked request body is decoded (with a chunk extension and a trailer)."""
        self.h.tab()
        body = json.dumps(chat()).encode()
        a, b = body[:10], body[10:]
        data = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x;ext=1\r\n%b\r\n%x\r\n%b\r\n0\r\nX-Trailer: 1\r\n\r\n" % (len(a), a, len(b), b))
        s = self.connect()
        s.sendall(data + get_req())
        rs = read_responses(s, 2)
        self.assertEqual(json.loads(rs[0][2])["choices"][0]["message"]["content"], "Hello world!")
        self.assertEqual(rs[1][0], 200)

    def test_expect_100_continue(self):
        """Expect: 100-continue gets `100 Continue` before the body is sent, then the answer."""
        self.h.tab()
        body = json.dumps(chat()).encode()
        s = self.connect()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        s.settimeout(2)
        self.assertTrue(s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n"))
        s.sendall(body)
        (r,) = read_responses(s, 1)
        self.assertEqual(r[0], 200)

    def test_expect_100_continue_refused_body_too_large(self):
        """A too-large declared body is refused with 413 without 100 Continue."""
        s = self.connect()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 999999999\r\n\r\n")
        status, headers, body = split_response(self.raw(b"", sock=s))
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["error"]["code"], "request_too_large")
        self.assertEqual(headers["connection"], "close")

    def test_head(self):
        """HEAD answers headers with the GET's Content-Length and no body."""
        s = self.connect()
        s.sendall(b"HEAD /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + get_req())
        s.settimeout(2)
        time.sleep(0.3)
        data = s.recv(65536)
        first, _, rest = data.partition(b"\r\n\r\n")
        self.assertIn(b"200 OK", first)
        self.assertGreater(int(re.search(rb"Content-Length: (\d+)", first).group(1)), 10)
        self.assertTrue(rest.startswith(b"HTTP/1.1 200 OK"))

    def test_http10_client(self):
        """An HTTP/1.0 request without keep-alive is answered and the connection closed."""
        raw = self.raw(b"GET /health HTTP/1.0\r\n\r\n")
        status, headers, body = split_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(headers["connection"], "close")
        self.assertEqual(json.loads(body)["status"], "ok")

    def test_http10_streaming_without_chunked(self):
        """HTTP/1.0 clients get a stream ended by closing, never chunked encoding."""
        self.h.tab()
        body = json.dumps(chat(stream=True)).encode()
        raw = self.raw(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        status, headers, data = split_response(raw)
        self.assertEqual(status, 200)
        self.assertNotIn("transfer-encoding", headers)
        self.assertEqual(headers["connection"], "close")
        self.assertTrue(data.startswith(b"data: {"), data[:40])      # no chunk size before the first event
        self.assertNotIn(b"\r\n", data)                               # SSE uses \n only; chunk framing \r\n
        self.assertTrue(data.endswith(b"data: [DONE]\n\n"))
        self.assertEqual(sse_events(data)[-1], "[DONE]")

    def test_404_and_405_are_openai_shaped(self):
        """Unknown paths are 404 and wrong methods 405 (with Allow), both OpenAI-shaped."""
        status, _, body = split_response(self.raw(get_req("/nope", b"Connection: close\r\n")))
        self.assertEqual(status, 404)
        self.assertEqual(json.loads(body)["error"]["code"], "not_found")
        status, headers, body = split_response(self.raw(get_req("/v1/chat/completions", b"Connection: close\r\n")))
        self.assertEqual(status, 405)
        self.assertIn("POST", headers["allow"])
        self.assertIn("message", json.loads(body)["error"])

    def test_431_head_too_large(self):
        """A request head over max_head_bytes is 431 and the connection closes."""
        raw = self.raw(get_req("/health", b"X-Big: " + b"a" * 5000 + b"\r\n"))
        self.assertEqual(split_response(raw)[0], 431)

    def test_413_body_too_large(self):
        """A body over max_body_bytes is 413 request_too_large, chunked or not."""
        raw = self.raw(post_req(b"x" * 100001))
        status, _, body = split_response(raw)
        self.assertEqual((status, json.loads(body)["error"]["code"]), (413, "request_too_large"))
        chunk = b"x" * 60000
        data = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                + (b"%x\r\n%b\r\n" % (len(chunk), chunk)) * 2 + b"0\r\n\r\n")
        self.assertEqual(split_response(self.raw(data))[0], 413)

    def test_408_slow_head_and_body(self):
        """A head or body that trickles in past its deadline gets 408; bytes do not extend it."""
        s = self.connect()
        s.sendall(b"GET /health HTTP/1.1\r\n")
        t0 = time.time()
        with contextlib.suppress(OSError):
            for _ in range(20):
                time.sleep(0.1)
                s.sendall(b"X: y\r\n")
        raw = self.raw(b"", sock=s)
        self.assertEqual(split_response(raw)[0], 408)
        self.assertLess(time.time() - t0, 3)
        s = self.connect()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
        self.assertEqual(split_response(self.raw(b"", sock=s))[0], 408)

    def test_idle_keep_alive_timeout_closes(self):
        """An idle keep-alive connection is closed after keep_alive_timeout_seconds."""
        s = self.connect()
        s.sendall(get_req())
        read_responses(s, 1)
        t0 = time.time()
        s.settimeout(5)
        self.assertEqual(s.recv(10), b"")
        self.assertLess(time.time() - t0, 3)

    def test_bad_json_and_fields(self):
        """Bad JSON and bad fields are 400 invalid_request_error with a readable message."""
        for body, code in ((b"{bad", "invalid_json"), (b"[1]", "invalid_json"),
                           (json.dumps({"model": "test-model"}).encode(), "invalid_messages"),
                           (json.dumps({"messages": []}).encode(), "invalid_model"),
                           (json.dumps(chat(stream="yes")).encode(), "invalid_stream")):
            status, _, data = split_response(self.raw(post_req(body, extra=b"Connection: close\r\n")))
            err = json.loads(data)["error"]
            self.assertEqual((status, err["type"], err["code"]), (400, "invalid_request_error", code), body)

    def test_head_of_exactly_max_head_bytes_is_accepted(self):
        """A head of exactly max_head_bytes (without its blank line) is read, in one packet or with the
        blank line later; one byte more is 431, also before the blank line arrives."""
        limit = self.h.bridge.files.config.max_head_bytes
        self.assertEqual(split_response(self.raw(padded_head(limit) + b"\r\n\r\n"))[0], 200)
        s = self.connect()
        s.sendall(padded_head(limit))
        time.sleep(0.1)
        self.assertEqual(split_response(self.raw(b"\r\n\r\n", sock=s))[0], 200)
        self.assertEqual(split_response(self.raw(padded_head(limit + 1) + b"\r\n\r\n"))[0], 431)
        self.assertEqual(split_response(self.raw(padded_head(limit + 1)))[0], 431)

    def test_head_of_max_head_bytes_with_its_blank_line_split(self):
        """The same head whose blank line arrives in two pieces is read too."""
        limit = self.h.bridge.files.config.max_head_bytes
        s = self.connect()
        s.sendall(padded_head(limit) + b"\r\n")
        time.sleep(0.1)
        self.assertEqual(split_response(self.raw(b"\r\n", sock=s))[0], 200)

    def test_http10_keep_alive_is_echoed_and_kept(self):
        """HTTP/1.0 with `Connection: keep-alive` gets `Connection: keep-alive` back and the connection
        stays open for the next request; without it the answer says close and the connection closes."""
        s = self.connect()
        s.sendall(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        (r1,) = read_responses(s, 1)
        self.assertEqual((r1[0], r1[1].get("connection", "").lower()), (200, "keep-alive"))
        s.sendall(b"GET /v1/models HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
        (r2,) = read_responses(s, 1)
        self.assertEqual((r2[0], r2[1].get("connection", "").lower(), json.loads(r2[2])["object"]),
                         (200, "keep-alive", "list"))
        status, headers, _ = split_response(self.raw(b"GET /health HTTP/1.0\r\n\r\n", sock=s))
        self.assertEqual((status, headers["connection"]), (200, "close"))

    def test_head_ws_is_426_with_allow(self):
        """HEAD /ws: 426 with Upgrade and an Allow that lists HEAD, no body, connection kept."""
        s = self.connect()
        s.sendall(b"HEAD /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + get_req("/health", b"Connection: close\r\n"))
        head, _, rest = self.raw(b"", sock=s).partition(b"\r\n\r\n")
        status, headers, _ = split_response(head + b"\r\n\r\n")
        self.assertEqual(status, 426)
        self.assertIn("HEAD", [m.strip() for m in headers["allow"].split(",")])
        self.assertEqual(headers["upgrade"].lower(), "websocket")
        self.assertTrue(rest.startswith(b"HTTP/1.1 200 OK\r\n"), rest[:80])

    def test_head_ws_reason_phrase(self):
        """The 426 carries its reason phrase."""
        raw = self.raw(b"HEAD /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 426 Upgrade Required\r\n"), raw[:40])

    def test_refused_body_is_read_away_so_the_client_reads_the_413(self):
        """A client still sending a too-large body (declared, or found while reading chunks) can finish
        sending and then reads the 413: a lingering close, not a connection reset. (12 MiB: more than
        the kernels' buffers hold, so without the linger the client is still sending at the reset.)"""
        big = b"x" * (12 * 2**20)
        piece = b"y" * 65536
        cases = [
            (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\n\r\n" % len(big), big),
            (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n",
             (b"%x\r\n%b\r\n" % (len(piece), piece)) * 192 + b"0\r\n\r\n"),
        ]
        for head, body in cases:
            s = self.connect()
            s.sendall(head)
            try:
                s.sendall(body)
            except OSError as exc:
                self.fail(f"the bridge reset the connection while the client was sending: {exc!r}")
            raw = self.raw(b"", sock=s)
            status, headers, data = split_response(raw)
            self.assertEqual((status, json.loads(data)["error"]["code"]), (413, "request_too_large"))
            self.assertEqual(headers["connection"], "close")

class Security(BridgeCase):
    config = {"cors_allowed_origins": ["http://localhost", "https://chat.example:8443"]}

    def test_no_smuggling_after_unframeable_request(self):
        """A request that cannot be framed closes the connection: the bytes behind it are never
        read as a second request."""
        self.h.tab()
        smuggled = post_req(json.dumps(chat()).encode())
        raw = self.raw(b"POST /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled)
        self.assertEqual(raw.count(b"HTTP/1.1 "), 1)
        self.assertEqual(split_response(raw)[0], 400)
        self.assertEqual(self.h.tabs[0].tasks, [])

    def test_host_header_must_name_this_server(self):
        """Host must be localhost, 127.0.0.1, [::1] or the configured host (DNS rebinding)."""
        for host in (b"localhost", b"127.0.0.1:5102", b"[::1]:80", b"LOCALHOST"):
            status, _, _ = split_response(self.raw(b"GET /health HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"))
            self.assertEqual(status, 200, host)
        for host in (b"evil.example", b"evil.example:5102", b"127.0.0.1.evil.example", b"10.0.0.1"):
            status, _, body = split_response(self.raw(b"GET /health HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"))
            self.assertEqual(status, 403, host)
            self.assertEqual(json.loads(body)["error"]["code"], "invalid_host")

    def test_cors(self):
        """Preflight and responses only for allowed origins; a port-less entry matches every port."""
        pre = (b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: %b\r\n"
               b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\n"
               b"Connection: close\r\n\r\n")
        for origin in (b"http://localhost:3000", b"http://localhost", b"https://chat.example:8443"):
            status, headers, _ = split_response(self.raw(pre % origin))
            self.assertEqual(status, 204, origin)
            self.assertEqual(headers["access-control-allow-origin"], origin.decode())
            self.assertIn("POST", headers["access-control-allow-methods"])
            self.assertIn("authorization", headers["access-control-allow-headers"])
        for origin in (b"https://evil.example", b"https://chat.example:9999", b"null", b"http://localhost.evil.example"):
            status, headers, _ = split_response(self.raw(pre % origin))
            self.assertEqual(status, 403, origin)
            self.assertNotIn("access-control-allow-origin", headers)
        status, headers, _ = split_response(self.raw(get_req("/v1/models", b"Origin: http://localhost:5173\r\nConnection: close\r\n")))
        self.assertEqual((status, headers["access-control-allow-origin"]), (200, "http://localhost:5173"))

    def test_simple_cross_site_post_refused_before_tab(self):
        """A 'simple' text/plain POST from a foreign page is refused before anything reaches a tab."""
        tab = self.h.tab()
        body = json.dumps(chat()).encode()
        raw = self.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://evil.example\r\n"
                       b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        self.assertEqual(split_response(raw)[0], 403)
        time.sleep(0.1)
        self.assertEqual(tab.tasks, [])

    def test_keys_and_prompts_not_logged(self):
        """At info level the log has one line per request and no prompt text; with an api_key set,
        neither the right key nor a wrong one is logged (at debug level neither)."""
        self.h.bridge.files.config = self.h.bridge.files.config.replace(api_key="sk-RIGHT-KEY-4711")
        self.h.tab()
        records = []
        handler = bridge.logging.Handler()
        handler.emit = records.append
        bridge.log.addHandler(handler)
        bridge.set_log_level("info")
        messages = [{"role": "user", "content": "SECRET-PROMPT"}]
        try:
            with self.assertRaises(openai.AuthenticationError):
                self.h.client("sk-WRONG-KEY-0815").chat.completions.create(model="test-model", messages=messages)
            self.h.client("sk-RIGHT-KEY-4711").chat.completions.create(model="test-model", messages=messages)
            info_records = list(records)
            bridge.set_log_level("debug")
            self.h.client("sk-RIGHT-KEY-4711").chat.completions.create(model="test-model", messages=messages)
            self.assertEqual(self.post(body=chat(), headers={"X-Api-Key": "sk-WRONG-KEY-0815"})[0], 401)
        finally:
            bridge.log.removeHandler(handler)
            bridge.set_log_level("error")
        text = "\n".join(r.getMessage() for r in info_records)
        self.assertNotIn("SECRET-PROMPT", text)
        everything = "\n".join(r.getMessage() for r in records)
        for key in ("RIGHT-KEY", "WRONG-KEY"):
            self.assertNotIn(key, everything)
        request_lines = [r.getMessage() for r in info_records if "/v1/chat/completions" in r.getMessage()]
        self.assertEqual(len(request_lines), 2)
        self.assertRegex(request_lines[0], r"^r\d{7} POST /v1/chat/completions model='-' tab=- status=401 "
                                           r"error=invalid_api_key \d+ms$")
        self.assertRegex(request_lines[1], r"^[0-9a-f]{8} POST /v1/chat/completions model='test-model' tab=tab\d+ "
                                           r"status=200 \d+ms$")


class ExposedWarning(unittest.TestCase):
    def test_warns_when_exposed_without_key(self):
        """Listening beyond loopback without api_key logs a warning."""
        records = []
        handler = bridge.logging.Handler()
        handler.emit = records.append
        bridge.log.addHandler(handler)
        self.addCleanup(bridge.log.removeHandler, handler)
        h = Harness()
        self.addCleanup(h.close)
        bridge.set_log_level("warning")
        self.addCleanup(bridge.set_log_level, "error")

        async def start_exposed():
            b = bridge.Bridge(h.bridge.files, "0.0.0.0", 0)
            await b.start()
            await b.stop(grace=0)
        h.run(start_exposed())
        self.assertTrue(any("without an api_key" in r.getMessage() for r in records))


class SlowClients(BridgeCase):
    config = {"head_timeout_seconds": 2, "max_connections": 300}

    def test_200_slow_connections_do_not_block_a_normal_request(self):
        """With 200 slow connections trickling bytes, a normal request is answered promptly."""
        self.h.tab()
        slow = []
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", self.h.port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            slow.append(s)
        self.addCleanup(lambda: [s.close() for s in slow])
        t0 = time.time()
        r = self.h.ask()
        self.assertEqual(r.choices[0].message.content, "Hello world!")
        self.assertLess(time.time() - t0, 2)
        # And the slow ones are cut at their head deadline, not kept forever.
        time.sleep(2.5)
        self.h.wait(lambda: len(self.h.bridge.connections) <= 2, timeout=5, what="slow connections dropped")

    def test_connection_cap(self):
        """Past max_connections new connections get 503 at once."""
        self.h.bridge.files.config = self.h.bridge.files.config.replace(max_connections=5)
        held = [self.connect() for _ in range(5)]
        self.h.wait(lambda: len(self.h.bridge.connections) == 5)
        raw = self.raw(get_req())
        self.assertEqual(split_response(raw)[0], 503)
        del held

    def test_client_that_stops_reading_is_dropped(self):
        """A client that stops reading a stream does not grow memory without bound: past the cap
        it is dropped and the tab told to abort."""
        self.h.bridge.files.config = self.h.bridge.files.config.replace(max_pending_output_bytes=256 * 1024)
        piece = json.dumps("x" * 8000)
        tab = self.h.tab([f"a0:{piece}\n"] * 3000 + ["[DONE]"])
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", self.h.port))
        self.addCleanup(s.close)
        body = json.dumps(chat(stream=True)).encode()
        s.sendall(post_req(body))
        cmd = tab.wait_command("abort", timeout=20)
        self.assertEqual(cmd["request_id"], tab.tasks[0]["request_id"])
        self.h.wait(lambda: not self.h.bridge.jobs, what="job gone")

    def test_slow_reader_gets_a_large_answer_whole(self):
        """A client slow to read a large non-streaming answer (nothing for 5.5 s, then all of it) is
        waited for in Connection.write: it gets every byte, not a connection cut once the answer is
        queued (an unread buffer is dropped 5 s after the connection is closed)."""
        piece = "x" * 8000
        self.h.tab(lines(*[piece] * 1000) + ["[DONE]"])
        s = socket.socket()
        self.addCleanup(s.close)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(20)
        s.connect(("127.0.0.1", self.h.port))
        s.sendall(post_req(json.dumps(chat()).encode(), extra=b"Connection: close\r\n"))
        time.sleep(5.5)
        status, headers, body = split_response(self.raw(b"", sock=s, timeout=20))
        self.assertEqual(status, 200)
        self.assertEqual(len(body), int(headers["content-length"]))
        self.assertEqual(len(json.loads(body)["choices"][0]["message"]["content"]), 8_000_000)

@unittest.skipIf(non_loopback_ip() is None, "this machine has no non-loopback address")
class ExposedOnLan(unittest.TestCase):
    def exposed(self):
        return exposed_bridge(self)

    def test_internal_endpoints_refuse_lan_clients(self):
        """Bound to all interfaces: a LAN client may use /health (IP Host), never /internal, and
        may not connect as a tab."""
        h, b, ip = self.exposed()

        def request(path, method="GET"):
            with socket.create_connection((ip, b.port), timeout=5) as s:
                s.sendall(f"{method} {path} HTTP/1.1\r\nHost: {ip}:{b.port}\r\nAuthorization: Bearer k\r\n"
                          f"Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            return split_response(data)
        self.assertEqual(request("/health")[0], 200)
        status, _, body = request("/internal/id_capture", "POST")
        self.assertEqual((status, json.loads(body)["error"]["code"]), (403, "forbidden"))

        async def remote_tab():
            return await websockets.connect(f"ws://{ip}:{b.port}/ws", origin="https://lmarena.ai")
        with self.assertRaises(websockets.InvalidStatus) as cm:
            h.run(remote_tab())
        self.assertEqual(cm.exception.response.status_code, 403)

    def test_health_details_only_for_loopback_or_the_key(self):
        """Exposed with an api_key: /health from a LAN address shows no tab_details (tab URLs hold
        conversation ids) without the right key; with it, or from loopback, it does. Exposed without
        a key, LAN clients never see them."""
        h, b, ip = self.exposed()
        secret_url = "https://lmarena.ai/c/0198c5a1-9999-7aaa-8bbb-123456789abc"

        async def tab():
            ws = await websockets.connect(f"ws://127.0.0.1:{b.port}/ws", origin="https://lmarena.ai")
            await ws.send(json.dumps({"type": "hello", "version": "test", "url": secret_url}))
            return ws
        ws = h.run(tab())
        self.addCleanup(lambda: h.run(ws.close()))
        h.wait(lambda: b.tabs and b.tabs[0].url == secret_url, what="the tab's hello")

        def health(address, key=None):
            auth = f"Authorization: Bearer {key}\r\n" if key else ""
            with socket.create_connection((address, b.port), timeout=5) as s:
                s.settimeout(5)
                s.sendall(f"GET /health HTTP/1.1\r\nHost: {address}:{b.port}\r\n{auth}"
                          "Connection: close\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            status, _, body = split_response(data)
            self.assertEqual(status, 200, (address, key))
            return body
        for key in (None, "wrong"):
            body = health(ip, key)
            self.assertNotIn("tab_details", json.loads(body), key)
            self.assertNotIn(secret_url.encode(), body)
            self.assertEqual(json.loads(body)["tabs"], 1)
        self.assertEqual(json.loads(health(ip, "k"))["tab_details"][0]["url"], secret_url)
        self.assertEqual(json.loads(health("127.0.0.1"))["tab_details"][0]["url"], secret_url)
        h.bridge.files.config = h.bridge.files.config.replace(api_key="")
        self.assertNotIn(secret_url.encode(), health(ip))
        self.assertIn(secret_url.encode(), health("127.0.0.1"))


class MissingConfigFile(BridgeCase):
    config = {"api_key": "k-first"}

    def test_api_key_still_checked_while_config_is_missing(self):
        """config.jsonc deleted (an editor saving by rename-then-write): the last good config stays,
        so a request without the key is 401 and with it 200; the file's return is picked up."""
        self.h.tab()
        with open(self.h.config_path, encoding="utf-8") as f:
            text = f.read()
        os.remove(self.h.config_path)
        status, _, body = self.post(body=chat())
        self.assertEqual((status, json.loads(body)["error"]["code"]), (401, "invalid_api_key"))
        status, _, body = self.post(body=chat(), headers={"Authorization": "Bearer k-first"})
        self.assertEqual((status, json.loads(body)["choices"][0]["message"]["content"]), (200, "Hello world!"))
        self.assertIn("missing", json.loads(self.get("/health")[2])["config"]["error"])
        with open(self.h.config_path, "w", encoding="utf-8") as f:
            f.write(bridge.jsonc_update(text, {"api_key": "k-second"}))
        time.sleep(bridge.UserFiles.CHECK_SECONDS)        # files are looked at once a second
        self.assertEqual(self.post(body=chat(), headers={"Authorization": "Bearer k-first"})[0], 401)
        self.assertEqual(self.post(body=chat(), headers={"Authorization": "Bearer k-second"})[0], 200)


class RequestBounds(BridgeCase):
    overrides = {"max_messages": 10}

    def test_more_than_max_messages_is_413(self):
        """More than max_messages messages: 413 request_too_large naming the limit, before any tab
        sees it (OpenAI's and Anthropic's API); max_messages itself passes."""
        tab = self.h.tab()
        msgs = [{"role": "user", "content": f"m{i}"} for i in range(11)]
        status, _, data = self.post(body=chat(msgs))
        err = json.loads(data)["error"]
        self.assertEqual((status, err["code"]), (413, "request_too_large"))
        self.assertIn("max_messages", err["message"])
        status, _, data = self.post("/v1/messages", {"model": "test-model", "max_tokens": 10, "messages": msgs})
        self.assertEqual(status, 413, data)
        self.assertEqual(tab.tasks, [])
        self.assertEqual(self.post(body=chat(msgs[:10]))[0], 200)
        self.assertEqual(len(tab.tasks), 1)

    def test_deeply_nested_json_is_400(self):
        """100k (parsed on the loop) or 300k (parsed in a thread) "[": 400 invalid_json, no 500."""
        for depth in (100_000, 300_000):
            status, _, data = self.post(body=b"[" * depth)
            self.assertEqual((status, json.loads(data)["error"]["code"]), (400, "invalid_json"), depth)
        status, _, data = self.post(body=b'{"model": "test-model", "messages": [{"role": "user", "content": '
                                    + b"[" * 5000 + b"]" * 5000 + b"}]}")
        self.assertEqual(status, 400, data)

    def test_deeply_nested_tool_call_arguments_are_not_a_500(self):
        """A tool call's arguments string nested 990 deep: a clean answer (400 or 200), no traceback."""
        self.h.tab()
        args = '{"a":' * 990 + "1" + "}" * 990
        msgs = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": args}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "x"}, {"role": "user", "content": "go"}]
        with self.assertNoLogs(bridge.log, level="ERROR"):
            status, _, data = self.post(body=chat(msgs))
        self.assertIn(status, (200, 400), data[:200])

    def test_bad_part_shapes_are_400_naming_the_field(self):
        """`file` as a string or a list, a non-string filename, `input_audio` that is not an object:
        400 with a message naming the field (never a 500)."""
        cases = [
            ({"type": "file", "file": "abc"}, "messages[0].content[0].file"),
            ({"type": "file", "file": ["a"]}, "messages[0].content[0].file"),
            ({"type": "file", "file": {"file_data": "aGk=", "filename": 5}}, "messages[0].content[0].file.filename"),
            ({"type": "file", "file": {"file_data": "aGk=", "filename": ["a.txt"]}},
             "messages[0].content[0].file.filename"),
            ({"type": "input_audio", "input_audio": "UklGRg=="}, "messages[0].content[0].input_audio"),
            ({"type": "input_audio", "input_audio": ["UklGRg=="]}, "messages[0].content[0].input_audio"),
        ]
        for part, field in cases:
            status, _, data = self.post(body=chat([{"role": "user", "content": [part]}]))
            err = json.loads(data)["error"]
            self.assertEqual((status, err["type"]), (400, "invalid_request_error"), part)
            self.assertIn(field, err["message"], part)


class HugeRequests(BridgeCase):
    def test_200k_messages_refused_quickly(self):
        """With the default max_messages, a real 200k-message body (6.8 MB) is refused with 413 within
        3 s (about 0.2 s on a laptop), and /health answers at once right after."""
        body = json.dumps(chat([{"role": "user", "content": "x"}] * 200_000)).encode()
        t0 = time.monotonic()
        status, _, data = self.post(body=body)
        took = time.monotonic() - t0
        self.assertEqual((status, json.loads(data)["error"]["code"]), (413, "request_too_large"))
        self.assertLess(took, 3.0)
        t0 = time.monotonic()
        self.assertEqual(self.get("/health")[0], 200)
        self.assertLess(time.monotonic() - t0, 1.0)


class HalfClosedAndPausedClients(BridgeCase):
    overrides = {"max_head_bytes": 4096}

    def assert_aborted(self, tab, rid, what, within=3.0):
        """The tab is told to abort task `rid` within `within` seconds."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if any(c.get("command") == "abort" and c.get("request_id") == rid for c in tab.commands):
                return
            time.sleep(0.01)
        self.fail(f"{what}: the tab got no abort within {within:g} s")

    def test_half_closed_client_still_gets_the_answer(self):
        """A client that sends its request and then shutdown(SHUT_WR)s gets the whole answer, streamed
        or not (an interim `100 Continue` may come first)."""
        self.h.tab([("sleep", 0.3)] + lines("late ", "answer") + ["[DONE]"])
        for stream in (False, True):
            s = self.connect()
            s.sendall(post_req(json.dumps(chat(stream=stream)).encode()))
            s.shutdown(socket.SHUT_WR)
            raw = self.raw(b"", sock=s)
            while raw.startswith(b"HTTP/1.1 100 "):
                raw = raw.partition(b"\r\n\r\n")[2]
            status, _, body = split_response(raw)
            self.assertEqual(status, 200, raw[:200])
            if stream:
                body = dechunk(body)
                self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
                text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                               for e in sse_events(body) if e != "[DONE]")
            else:
                text = json.loads(body)["choices"][0]["message"]["content"]
            self.assertEqual(text, "late answer", f"stream={stream}")
        self.h.wait(lambda: not self.h.bridge.jobs, what="jobs ended")

    def test_client_leaving_while_reading_is_paused_is_noticed(self):
        """Reading is paused for a client that pipelines more than max_head_bytes while its job runs;
        when it closes, the bridge notices at once (the tab gets abort within 3 s, not at the stream
        timeout)."""
        tab = self.h.tab([("hang",)])
        s = self.connect()
        s.sendall(post_req(json.dumps(chat()).encode()))
        self.h.wait(lambda: tab.tasks, what="the task at the tab")
        s.sendall(get_req("/health", b"X-Pad: " + b"a" * 20000 + b"\r\n"))
        self.h.wait(lambda: any(c.read_paused for c in list(self.h.bridge.connections)), what="reading paused")
        s.close()
        cmd = tab.wait_command("abort", timeout=3)
        self.assertEqual(cmd["request_id"], tab.tasks[0]["request_id"])
        self.h.wait(lambda: not self.h.bridge.jobs, timeout=3, what="the job ended")

    def test_client_leaving_before_its_answer_starts_is_noticed(self):
        """A client that closes while its job runs and nothing was sent yet (non-streaming, or
        streaming within first_byte_hold_seconds) is noticed: the tab gets abort within 3 s."""
        tab = self.h.tab([("hang",)])
        for n, stream in enumerate((False, True), 1):
            s = self.connect()
            s.sendall(post_req(json.dumps(chat(stream=stream)).encode()))
            self.h.wait(lambda: len(tab.tasks) == n, what="the task at the tab")
            s.close()
            self.assert_aborted(tab, tab.tasks[-1]["request_id"], f"stream={stream}")

    def test_client_resetting_before_its_answer_starts_is_noticed(self):
        """A client whose connection is reset while its job runs (nothing sent yet, streamed or not,
        reading paused or not) is noticed: the tab gets abort within 3 s."""
        tab = self.h.tab([("hang",)])
        for n, (stream, paused) in enumerate(((False, False), (True, False), (False, True)), 1):
            s = self.connect()
            s.sendall(post_req(json.dumps(chat(stream=stream)).encode()))
            self.h.wait(lambda: len(tab.tasks) == n, what="the task at the tab")
            if paused:
                s.sendall(get_req("/health", b"X-Pad: " + b"a" * 20000 + b"\r\n"))
                self.h.wait(lambda: any(c.read_paused for c in list(self.h.bridge.connections)), what="paused")
            close_with_reset(s)
            self.assert_aborted(tab, tab.tasks[-1]["request_id"], f"stream={stream} paused={paused}")

    def test_reading_is_paused_for_a_client_that_keeps_sending(self):
        """A client that keeps sending while its job runs is not read without bound: the connection's
        buffer stays below max_head_bytes + 256 KiB while it tries to send 8 MiB."""
        tab = self.h.tab([("hang",)])
        bound = self.h.bridge.files.config.max_head_bytes + 256 * 1024
        s = self.connect()
        s.sendall(post_req(json.dumps(chat()).encode()))
        self.h.wait(lambda: tab.tasks, what="the task at the tab")
        s.setblocking(False)
        chunk = b"z" * 65536
        sent, peak, stalled = 0, 0, None
        end = time.monotonic() + 5
        while sent < 8 * 2**20 and time.monotonic() < end:
            try:
                sent += s.send(chunk)
                stalled = None
            except BlockingIOError:
                stalled = stalled or time.monotonic()
                if time.monotonic() - stalled > 0.5:
                    break                 # the kernel's buffers are full: nobody reads any more
                time.sleep(0.002)
            peak = max([peak] + [len(c.buf) for c in list(self.h.bridge.connections)])
        time.sleep(0.2)
        peak = max([peak] + [len(c.buf) for c in list(self.h.bridge.connections)])
        self.assertGreater(sent, bound)
        self.assertLess(peak, bound, f"{peak} bytes buffered after {sent} sent")


class NonAsciiApiKey(BridgeCase):
    config = {"api_key": "ключ"}

    def test_utf8_header_bytes_match_the_key(self):
        """A non-ASCII api_key matches a header carrying its UTF-8 bytes (Bearer or x-api-key); other
        bytes (another encoding, a longer or shorter key, none) get 401."""
        def status(header: bytes) -> int:
            raw = self.raw(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + header + b"\r\n")
            return split_response(raw)[0]
        key = "ключ".encode()
        self.assertEqual(status(b"Authorization: Bearer " + key + b"\r\n"), 200)
        self.assertEqual(status(b"X-Api-Key: " + key + b"\r\n"), 200)
        for wrong in ("ключ".encode("cp1251"), "ключи".encode(), key[:-1], b"\xd0", "kljuch".encode()):
            self.assertEqual(status(b"Authorization: Bearer " + wrong + b"\r\n"), 401, wrong)
        self.assertEqual(status(b""), 401)




# (c) End to end: the openai SDK (or raw HTTP) against a real bridge and a FakeTab ====================

class ChatEndToEnd(BridgeCase):
    def test_stream_exact_text_and_chunk_shapes(self):
        """The openai SDK streams the exact text; chunks have OpenAI's shape; role first, finish last."""
        self.h.tab(lines("Hel", "lo, ", "wörld ✓") + ["[DONE]"])
        chunks = list(self.h.client().chat.completions.create(model="test-model", stream=True,
                                                               messages=[{"role": "user", "content": "hi"}]))
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks), "Hello, wörld ✓")
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")
        for c in chunks:
            self.assertEqual(c.object, "chat.completion.chunk")
            self.assertEqual(c.model, "test-model")
            self.assertTrue(c.id.startswith("chatcmpl-"))
            self.assertEqual(len(c.choices), 1)
        self.assertEqual(len({c.id for c in chunks}), 1)

    def test_burst_first_text_goes_out_before_the_rest_which_is_one_delta(self):
        """Many tab messages in one read: the first text leaves in the response's first write (it is
        never held back while the rest is parsed); the rest of the burst is one delta."""
        rest = [f"w{i} " for i in range(8)]
        self.h.tab([("burst", lines("first ", *rest) + ["[DONE]"], False)])
        with socket.create_connection(("127.0.0.1", self.h.port), timeout=10) as sock:
            sock.sendall(post_req(json.dumps(chat(stream=True)).encode(), extra=b"Connection: close\r\n"))
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        status, _, body = split_response(raw)
        self.assertEqual(status, 200)
        size_line, _, rest_of_body = body.partition(b"\r\n")
        first_write = rest_of_body[:int(size_line, 16)]     # the head's write carries one chunk
        contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in sse_events(first_write)
                    if e != "[DONE]"]
        self.assertEqual(contents, ["", "first "])
        contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in sse_events(dechunk(body))
                    if e != "[DONE]"]
        self.assertEqual(contents, ["", "first ", "".join(rest), None])

    def test_an_error_after_a_burst_comes_after_all_of_its_text(self):
        """Texts queued from a read are parsed before a later message of the same read (an error)."""
        texts = [f"t{i} " for i in range(8)]
        self.h.tab([("burst", lines(*texts, finish=None) + [{"error": "boom", "status": 500}], False)])
        stream = self.h.client().chat.completions.create(model="test-model", stream=True,
                                                         messages=[{"role": "user", "content": "hi"}])
        got = []
        with self.assertRaises(openai.APIError):
            for c in stream:
                got.append(c.choices[0].delta.content or "")
        self.assertEqual("".join(got), "".join(texts))

    def test_a_tab_that_leaves_right_after_bursts_of_many_answers_still_answers_all(self):
        """Several answers start in the tab's last read before it leaves (each start lets the others
        wait a turn): every message of that read is still handled, every answer is complete."""
        n, tab = 8, self.h.tab([("hang",)])
        client = self.h.client()

        def ask(i):
            chunks = client.chat.completions.create(model="test-model", stream=True,
                                                    messages=[{"role": "user", "content": f"q{i}"}])
            return "".join(c.choices[0].delta.content or "" for c in chunks)
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            answers = [pool.submit(ask, i) for i in range(n)]
            self.h.wait(lambda: len(tab.tasks) == n, what="all tasks at the tab")
            frames = [Frame(Opcode.TEXT, json.dumps({"request_id": t["request_id"], "data": d}).encode())
                      .serialize(mask=True)
                      for t in tab.tasks for d in lines("one ", *["two "] * 6) + ["[DONE]"]]

            async def burst_and_leave():
                tab.ws.transport.write(b"".join(frames))
                tab.ws.transport.close()
            self.h.run(burst_and_leave())
            self.assertEqual([a.result(30) for a in answers], ["one " + "two " * 6] * n)

    def test_non_stream_is_default(self):
        """Without `stream` the answer is one chat.completion with usage estimates."""
        self.h.tab(lines("Hello ", "there!") + ["[DONE]"])
        r = self.h.ask()
        self.assertEqual(r.choices[0].message.content, "Hello there!")
        self.assertEqual(r.choices[0].message.role, "assistant")
        self.assertEqual(r.choices[0].finish_reason, "stop")
        self.assertGreater(r.usage.completion_tokens, 0)
        self.assertEqual(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens)

    def test_include_usage_gives_final_usage_chunk(self):
        """stream_options.include_usage adds a usage chunk with empty choices before [DONE]."""
        self.h.tab(lines("abcd" * 10) + ["[DONE]"])
        chunks = list(self.h.client().chat.completions.create(
            model="test-model", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "x" * 40}]))
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.completion_tokens, 10)
        self.assertEqual(chunks[-1].usage.prompt_tokens, 10)
        self.assertTrue(all(c.usage is None for c in chunks[:-1]))

    def test_no_tab_is_503_with_instructions(self):
        """No tab connected: 503 no_tab_connected at once, saying how to connect one."""
        with self.assertRaises(openai.APIStatusError) as cm:
            self.h.ask()
        self.assertEqual(cm.exception.status_code, 503)
        self.assertEqual(cm.exception.code, "no_tab_connected")
        self.assertIn("userscript", cm.exception.message)
        # No Retry-After: SDKs would retry for seconds with no tab to answer (README, Errors).
        self.assertIsNone(cm.exception.response.headers.get("retry-after"))
        # x-should-retry: false, so an SDK with its default retries fails at once too; the same for a
        # bad request and a bad key, on every API (Responses included); a 429 may be retried.
        client = openai.OpenAI(base_url=self.h.url + "/v1", api_key="unused", timeout=20)     # retries on
        self.addCleanup(client.close)
        for call in (lambda: client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "x"}]),
                     lambda: client.responses.create(model="test-model", input="x"),
                     lambda: client.chat.completions.create(model="test-model", messages=[])):
            started = time.monotonic()
            with self.assertRaises(openai.APIStatusError) as cm:
                call()
            self.assertLess(time.monotonic() - started, 0.4)     # one retry would wait 0.5 s or more
            self.assertEqual(cm.exception.response.headers["x-should-retry"], "false")
        self.assertTrue(bridge.ApiError(429, "x", "rate_limited").retryable)
        self.assertFalse(bridge.ApiError(401, "x", "invalid_api_key").retryable)

    def test_task_payload_is_a_create_evaluation_request(self):
        """With the shipped config the task is a create-evaluation request built as PROTOCOL 2.2 says."""
        tab = self.h.tab()
        self.h.ask("hello there")
        p = tab.tasks[0]["payload"]
        for key in ("message_templates", "target_model_id", "session_id", "message_id", "is_image_request"):
            self.assertIn(key, p)
        r = p["request"]
        self.assertEqual((r["method"], r["path"], r["recaptcha_action"]),
                         ("POST", "/nextjs-api/stream/create-evaluation", "chat_submit"))
        b = r["body"]
        self.assertEqual((b["mode"], b["modelAId"], b["modality"]), ("direct-battle", MODEL_UUID, "chat"))
        self.assertEqual(b["userMessage"], {"content": "hello there", "experimental_attachments": [], "metadata": {}})
        ids = [b["id"], b["userMessageId"], b["modelAMessageId"], b["modelBMessageId"]]
        self.assertEqual(len(set(ids)), 4)
        for i in ids:
            self.assertEqual(i[14], "7", i)           # UUIDv7
        self.assertEqual(p["session_id"], b["id"])

    def test_tab_closes_mid_stream(self):
        """A tab that vanishes mid-answer: an error event then [DONE], within a second."""
        self.h.tab(lines("partial ", finish=None) + [("sleep", 0.2), ("close",)])
        stream = self.h.client().chat.completions.create(model="test-model", stream=True,
                                                         messages=[{"role": "user", "content": "hi"}])
        got = []
        t0 = time.time()
        with self.assertRaises(openai.APIError) as cm:
            for c in stream:
                got.append(c.choices[0].delta.content or "")
        self.assertLess(time.time() - t0, 2.0)
        self.assertEqual("".join(got), "partial ")
        self.assertIn("tab", str(cm.exception.message).lower())

    def test_tab_closes_mid_answer_non_stream_is_502(self):
        """Non-streaming, the same situation is a 502 tab_disconnected."""
        self.h.tab(lines("partial ", finish=None) + [("close",)])
        with self.assertRaises(openai.APIStatusError) as cm:
            self.h.ask()
        self.assertEqual(cm.exception.status_code, 502)
        self.assertEqual(cm.exception.code, "tab_disconnected")

    def test_retry_on_other_tab_when_nothing_was_sent(self):
        """A tab that closes before answering: the task is retried once on another tab."""
        dying = self.h.tab([("close",)])
        healthy = self.h.tab(lines("from the second tab") + ["[DONE]"])
        # Both are idle: the tie goes to the first connected, the dying one.
        r = self.h.ask()
        self.assertEqual(r.choices[0].message.content, "from the second tab")
        self.assertEqual(len(dying.tasks), 1)
        self.assertEqual(len(healthy.tasks), 1)

    def test_client_disconnect_aborts_tab(self):
        """A client that leaves mid-stream makes the tab get {"command": "abort", "request_id"}."""
        tab = self.h.tab(lines("a", finish=None) + [("hang",)])
        s = self.connect()
        body = json.dumps(chat(stream=True)).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        self.assertIn(b"200 OK", s.recv(65536))
        s.close()
        cmd = tab.wait_command("abort", timeout=2)
        self.assertEqual(cmd["request_id"], tab.tasks[0]["request_id"])
        self.h.wait(lambda: not self.h.bridge.jobs, what="job cleanup")

    def test_least_busy_tab_gets_the_task(self):
        """Two slow requests at once go to two different tabs."""
        script = lines("x", finish=None) + [("sleep", 0.5)] + lines("y") + ["[DONE]"]
        t1, t2 = self.h.tab(script), self.h.tab(script)
        client = self.h.client()
        results = []
        threads = [threading.Thread(target=lambda: results.append(client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content),
            daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
            self.assertFalse(t.is_alive(), "a request did not end within 20 s")
        self.assertEqual(results, ["xy", "xy"])
        self.assertEqual((len(t1.tasks), len(t2.tasks)), (1, 1))

    def test_quick_failure_keeps_real_status_when_streaming(self):
        """Streaming: a 429 from LMArena before any text reaches the client as HTTP 429."""
        self.h.tab([{"error": "Too Many Requests", "status": 429, "retry_after": 42}])
        with self.assertRaises(openai.RateLimitError) as cm:
            list(self.h.client().chat.completions.create(model="test-model", stream=True,
                                                         messages=[{"role": "user", "content": "hi"}]))
        self.assertEqual(cm.exception.response.headers["retry-after"], "42")
        self.assertEqual(cm.exception.code, "rate_limited")

    def test_large_tab_message_passes(self):
        """Tab messages of several MiB (base64 images) pass the socket."""
        b64 = base64.b64encode(os.urandom(4 * 2**20)).decode()
        part = json.dumps([{"type": "image", "data": b64, "mimeType": "image/png"}])
        self.h.tab([f"a2:{part}\n", 'ad:{"finishReason":"stop"}\n', "[DONE]"])
        r = self.h.ask()
        self.assertEqual(r.choices[0].message.content, f"![Image](data:image/png;base64,{b64})")


class KeepAliveAndHold(BridgeCase):
    config = {"first_byte_hold_seconds": 0.2, "keepalive_interval_seconds": 0.3}

    def test_keepalive_comments_while_waiting(self):
        """After the hold, the 200 goes out and `: keep-alive` comments flow until the first token."""
        self.h.tab([("sleep", 1.0)] + lines("late") + ["[DONE]"])
        status, headers, body = self.post(body=chat(stream=True))
        self.assertEqual(status, 200)
        self.assertEqual(headers["cache-control"], "no-store")
        self.assertEqual(headers["x-accel-buffering"], "no")
        self.assertTrue(headers["content-type"].startswith("text/event-stream"))
        self.assertIn(b": keep-alive\n\n", body)
        self.assertEqual(json.loads(sse_events(body)[1])["choices"][0]["delta"]["content"], "late")

    def test_error_after_start_goes_in_band(self):
        """An error after the 200 is one `data: {"error"}` event and then [DONE]."""
        self.h.tab([("sleep", 0.5), {"error": "Too Many Requests", "status": 429}])
        status, _, body = self.post(body=chat(stream=True))
        self.assertEqual(status, 200)
        events = sse_events(body)
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual(json.loads(events[-2])["error"]["code"], "rate_limited")


class ApiKeyAndModels(BridgeCase):
    config = {"api_key": "s3cret"}

    def test_wrong_key_is_401_invalid_api_key(self):
        """With api_key set, a wrong key gets 401 invalid_api_key; the right key works."""
        self.h.tab()
        with self.assertRaises(openai.AuthenticationError) as cm:
            self.h.client("wrong").models.list()
        self.assertEqual(cm.exception.code, "invalid_api_key")
        status, _, _ = self.post(body=chat())
        self.assertEqual(status, 401)
        r = self.h.client("s3cret").chat.completions.create(model="test-model",
                                                            messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(r.choices[0].message.content, "Hello world!")

    def test_models_list_and_one(self):
        """/v1/models lists models.json in OpenAI's shape; /v1/models/{id} answers one or 404."""
        c = self.h.client("s3cret")
        ids = [m.id for m in c.models.list()]
        self.assertEqual(sorted(ids), sorted(MODELS))
        self.assertEqual(c.models.retrieve("test-model").id, "test-model")
        with self.assertRaises(openai.NotFoundError):
            c.models.retrieve("nope")

    def test_health_needs_no_key(self):
        """/health answers without a key and counts tabs and tasks."""
        self.h.tab()
        status, _, body = self.get("/health")
        data = json.loads(body)
        self.assertEqual(status, 200)
        self.assertEqual((data["status"], data["version"], data["tabs"], data["tasks_in_flight"]),
                         ("ok", bridge.VERSION, 1, 0))

    def test_x_api_key_header_is_accepted(self):
        """x-api-key (Anthropic's header) works in place of Authorization: Bearer; a wrong one is 401."""
        self.h.tab()
        status, _, body = self.post(body=chat(), headers={"X-Api-Key": "s3cret"})
        self.assertEqual((status, json.loads(body)["choices"][0]["message"]["content"]), (200, "Hello world!"))
        status, _, body = self.post(body=chat(), headers={"X-Api-Key": "s3cret-not"})
        self.assertEqual((status, json.loads(body)["error"]["code"]), (401, "invalid_api_key"))
        self.assertEqual(self.get("/v1/models", headers={"x-api-key": "s3cret"})[0], 200)

class EmptyModels(BridgeCase):
    models = {}

    def test_empty_model_list(self):
        """An empty models.json still gives {"object": "list", "data": []}."""
        status, _, body = self.get("/v1/models")
        self.assertEqual((status, json.loads(body)), (200, {"object": "list", "data": []}))


class TabSocket(BridgeCase):
    overrides = {"ws_ping_interval_seconds": 0.1}
    config = {"allowed_tab_origins": ["http://127.0.0.1:8123"]}

    def test_foreign_origin_refused(self):
        """Only LMArena origins (and allowed_tab_origins) may connect as a tab; others get 403."""
        for origin in ("https://evil.example", "http://lmarena.ai", "https://lmarena.ai.evil.com",
                       "https://user@lmarena.ai"):
            with self.assertRaises(websockets.InvalidStatus) as cm:
                self.h.run(ws_connect(self.h.port, origin))
            self.assertEqual(cm.exception.response.status_code, 403)
        for origin in ("https://lmarena.ai", "https://canary.lmarena.ai", "https://arena.ai",
                       "http://127.0.0.1:8123"):
            ws = self.h.run(ws_connect(self.h.port, origin))
            self.h.run(ws.close())

    def test_garbage_and_unknown_tasks_are_ignored(self):
        """Garbage, unknown tasks and unknown types from a tab never break it."""
        tab = self.h.tab()
        for junk in ("not json", "[1,2]", json.dumps({"request_id": "nope", "data": "a0:\"x\"\n"}),
                     json.dumps({"type": "mystery"}), json.dumps({"request_id": 5, "data": None})):
            self.h.run(tab.ws.send(junk))
        r = self.h.ask()
        self.assertEqual(r.choices[0].message.content, "Hello world!")

    def test_server_pings(self):
        """The server pings tabs; a tab that answers is kept."""
        self.h.bridge  # noqa: B018 - the ping loop runs in the background
        tab = self.h.tab()
        ping_seen = threading.Event()
        orig = tab.ws.protocol.receive_data

        def spy(data):
            if data[:1] == b"\x89":
                ping_seen.set()
            return orig(data)
        tab.ws.protocol.receive_data = spy
        self.assertTrue(ping_seen.wait(3))

    def test_message_split_over_frames_is_delivered_whole(self):
        """A tab message split over several WebSocket frames (a fragmented message) is one message."""
        self.h.tab([("fragments", 'a0:"Hello "\n', 3), ("fragments", 'a0:"fragmented wörld ✓"\n', 7),
                    'ad:{"finishReason":"stop"}\n', ("fragments", "[DONE]", 2)])
        self.assertEqual(self.h.ask().choices[0].message.content, "Hello fragmented wörld ✓")

class TranslationEndToEnd(BridgeCase):
    config = {"stream_response_timeout_seconds": 0.5, "cloudflare_wait_seconds": 3, "session_mode": "retry"}
    endpoint_map = {"pooled": [{"session_id": SID, "message_id": MID, "mode": "direct_chat"},
                               {"session_id": SID2, "message_id": MID2, "mode": "battle", "battle_target": "B"}],
                    "single": {"session_id": SID2, "message_id": MID2}}

    def create(self, **kw):
        body = dict(model="test-model", messages=[{"role": "user", "content": "hi"}])
        body.update(kw)
        return self.h.client().chat.completions.create(**body)

    def assert_api_error(self, status, code, **kw):
        with self.assertRaises(openai.APIStatusError) as cm:
            r = self.create(**kw)
            if kw.get("stream"):
                list(r)
        self.assertEqual((cm.exception.status_code, cm.exception.code), (status, code), cm.exception.message)
        return cm.exception

    def test_upstream_failures(self):
        """429, 401, reCAPTCHA 403, 413, 422, JSON error bodies, a3: distinct statuses and codes."""
        cases = [
            ({"error": "Too Many Requests", "status": 429, "retry_after": 30}, 429, "rate_limited"),
            ({"error": '{"error":"User x does not have access to evaluation session y"}', "status": 401},
             403, "session_not_owned"),
            ({"error": '{"error":"recaptcha validation failed"}', "status": 403}, 403, "recaptcha_failed"),
            ({"error": "Request Entity Too Large", "status": 413}, 413, "attachment_too_large"),
            ({"error": '{"error":"Content violates our terms of use"}', "status": 422}, 400,
             "content_policy_violation"),
            ('{"error":"Internal error"}', 502, "upstream_error"),
            ('a3:"Something broke"\n', 502, "upstream_error"),
            ('a0:"hasArenaError"\n', 502, "upstream_error"),
        ]
        tab = self.h.tab()
        for item, status, code in cases:
            tab.script = [item, "[DONE]"]
            for stream in (False, True):
                self.h.bridge.tabs[0].cool_until = 0       # each case on a rested tab
                err = self.assert_api_error(status, code, stream=stream)
                if status == 429:
                    self.assertEqual(err.response.headers["retry-after"], "30")

    def test_runaway_answer_is_capped(self):
        """An answer larger than max_answer_chars ends with 502 and the tab is told."""
        self.h.bridge.files.config = self.h.bridge.files.config.replace(max_answer_chars=1000)
        tab = self.h.tab(lines(*["x" * 100] * 20) + ["[DONE]"])
        err = self.assert_api_error(502, "upstream_error")
        self.assertIn("max_answer_chars", err.message)
        tab.wait_command("abort")

    def test_stream_timeout_is_504(self):
        """No data for stream_response_timeout_seconds: 504 upstream_timeout, and the tab is told."""
        tab = self.h.tab([("hang",)])
        self.assert_api_error(504, "upstream_timeout")
        self.assertEqual(tab.wait_command("abort")["request_id"], tab.tasks[0]["request_id"])

    def test_cloudflare_reload_then_wait_for_the_tab(self):
        """A Cloudflare page: the tab is told to reload once, the client gets 503 + Retry-After;
        a later request waits for the tab to come back instead of failing."""
        tab = self.h.tab([{"error": "<html><title>Just a moment...</title>", "status": 403}])
        err = self.assert_api_error(503, "cloudflare_challenge")
        self.assertTrue(err.response.headers["retry-after"])
        tab.wait_command("refresh")
        result = {}

        def later():
            result["r"] = self.create()
        t = threading.Thread(target=later)
        t.start()
        time.sleep(0.3)
        self.assertNotIn("r", result)
        tab.close()                      # the tab reloads...
        self.h.tab()                     # ...and comes back
        t.join(5)
        self.assertEqual(result["r"].choices[0].message.content, "Hello world!")
        self.assertEqual(sum(1 for c in tab.commands if c.get("command") == "refresh"), 1)

    def test_cloudflare_wait_gives_up(self):
        """If no tab comes back within cloudflare_wait_seconds, the waiting request gets 503."""
        self.h.tab([{"error": "<title>Just a moment...</title>", "status": 403}])
        self.assert_api_error(503, "cloudflare_challenge")
        t0 = time.time()
        self.assert_api_error(503, "cloudflare_challenge")
        self.assertGreater(time.time() - t0, 2.5)

    def test_retry_task_payload(self):
        """In retry mode the task regenerates the captured message with the whole history (2.4)."""
        tab = self.h.tab()
        self.create()
        p = tab.tasks[0]["payload"]
        self.assertEqual(p["target_model_id"], MODEL_UUID)
        r = p["request"]
        self.assertEqual(r["method"], "PUT")
        self.assertEqual(r["path"], f"/nextjs-api/stream/retry-evaluation-session-message/{SID}/messages/{MID}")
        self.assertEqual(r["recaptcha_action"], "chat_retry")
        self.assertEqual(r["body"]["modelId"], MODEL_UUID)
        self.assertEqual(r["body"]["messages"][-1]["status"], "pending")

    def test_unknown_params_ignored_and_unknown_model_sent_as_null(self):
        """Unknown sampling parameters are ignored; an unknown model is sent with modelId null."""
        tab = self.h.tab()
        r = self.create(model="not-listed", temperature=0.2, top_p=0.5, seed=3,
                        extra_body={"top_k": 5, "repetition_penalty": 1.1})
        self.assertEqual(r.choices[0].message.content, "Hello world!")
        self.assertIsNone(tab.tasks[0]["payload"]["request"]["body"]["modelId"])

    def test_pool_spreads_and_modes_apply(self):
        """A pool in model_endpoint_map.json is used in turn, each entry with its own mode."""
        tab = self.h.tab()
        for _ in range(4):
            self.create(model="pooled")
        sessions = [t["payload"]["session_id"] for t in tab.tasks]
        self.assertEqual(sorted(set(sessions)), sorted({SID, SID2}))
        for t in tab.tasks:
            positions = {m["participantPosition"] for m in t["payload"]["request"]["body"]["messages"]}
            self.assertEqual(positions, {"a"} if t["payload"]["session_id"] == SID else {"b"})

    def test_reasoning_content(self):
        """Reasoning goes to reasoning_content, never into content, streaming and not."""
        self.h.tab(['ag:"think"\n'] + lines("answer") + ["[DONE]"])
        r = self.create()
        self.assertEqual(r.choices[0].message.content, "answer")
        self.assertEqual(r.choices[0].message.reasoning_content, "think")
        chunks = list(self.create(stream=True))
        self.assertEqual("".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks), "think")
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks), "answer")

    def test_citations_and_images(self):
        """Citations are appended as Sources; image parts become Markdown images."""
        src = json.dumps({"source": {"id": "1", "url": "https://a.example", "title": "A"}})
        self.h.tab(["ac:" + json.dumps({"toolCallId": "citation-source", "argsTextDelta": src}) + "\n"]
                   + lines("text") + ["[DONE]"])
        self.assertEqual(self.create().choices[0].message.content, "text\n\nSources:\n- [A](https://a.example)")
        self.h.tabs[0].script = ['a2:[{"type":"image","image":"https://img/1.png","mimeType":"image/png"}]\n',
                                 'ad:{"finishReason":"stop"}\n', "[DONE]"]
        for stream in (False, True):
            r = self.create(model="image-model", stream=stream)
            text = r.choices[0].message.content if not stream else "".join(c.choices[0].delta.content or "" for c in r)
            self.assertEqual(text, "![Image](https://img/1.png)")
        payload = self.h.tabs[0].tasks[-1]["payload"]
        self.assertTrue(payload["is_image_request"])
        self.assertEqual(payload["request"]["body"]["modelId"], IMAGE_UUID)

    def test_config_edits_apply_without_restart(self):
        """Editing config.jsonc takes effect within a second (the files are looked at once a second,
        not on every request); a broken edit keeps the last good one."""
        tab = self.h.tab()
        with open(self.h.config_path, encoding="utf-8") as f:
            text = f.read()
        self.create(messages=[{"role": "user", "content": "q"}])      # the files were just looked at
        with open(self.h.config_path, "w", encoding="utf-8") as f:
            f.write(bridge.jsonc_update(text, {"tavern_mode_enabled": True}))
        msgs = [{"role": "system", "content": "a"}, {"role": "user", "content": "q"}, {"role": "system", "content": "b"}]
        self.create(messages=msgs)                                      # within the second: not yet
        self.assertEqual([m["content"] for m in tab.tasks[-1]["payload"]["message_templates"]], ["a", "q", "b"])
        time.sleep(bridge.UserFiles.CHECK_SECONDS)
        self.create(messages=msgs)
        self.assertEqual([m["content"] for m in tab.tasks[-1]["payload"]["message_templates"]], ["a\n\nb", "q"])
        with open(self.h.config_path, "w", encoding="utf-8") as f:
            f.write("{ this is broken")
        time.sleep(bridge.UserFiles.CHECK_SECONDS)        # files are looked at once a second
        with self.assertLogs(bridge.log, "ERROR") as logs:       # said once in the log (not on stderr here)
            self.create(messages=msgs)
        self.assertIn("keeping the last good config.jsonc", logs.output[0])
        self.assertEqual([m["content"] for m in tab.tasks[-1]["payload"]["message_templates"]], ["a\n\nb", "q"])

    def test_status_alone_sets_the_error(self):
        """A tab error with only a status and a bland message: 429 rate_limited, 401 -> 403
        session_not_owned, 413 attachment_too_large (streamed or not)."""
        tab = self.h.tab()
        for status, want in ((429, (429, "rate_limited")), (401, (403, "session_not_owned")),
                             (413, (413, "attachment_too_large"))):
            tab.script = [{"error": "nope", "status": status}]
            for stream in (False, True):
                self.h.bridge.tabs[0].cool_until = 0       # a 429 makes the tab rest
                self.assert_api_error(*want, stream=stream)

class SessionConfig(BridgeCase):
    config = {"session_id": "YOUR_SESSION_ID", "strict_models": True, "session_mode": "retry"}

    def test_placeholder_ids_refused(self):
        """Placeholder ids give 400 session_not_configured telling how to capture."""
        self.h.tab()
        with self.assertRaises(openai.BadRequestError) as cm:
            self.h.ask()
        self.assertEqual(cm.exception.code, "session_not_configured")
        self.assertIn("capture", cm.exception.message)

    def test_strict_models_404(self):
        """With strict_models, an unknown model is 404 model_not_found listing similar names."""
        with self.assertRaises(openai.NotFoundError) as cm:
            self.h.client().chat.completions.create(model="test-modle", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(cm.exception.code, "model_not_found")
        self.assertIn("test-model", cm.exception.message)


class NoDefaults(BridgeCase):
    config = {"use_default_ids_if_mapping_not_found": False, "session_mode": "retry"}

    def test_no_mapping_is_400(self):
        """Without a mapping and with defaults disabled: 400 that explains how to add one."""
        with self.assertRaises(openai.BadRequestError) as cm:
            self.h.ask()
        self.assertEqual(cm.exception.code, "session_not_configured")
        self.assertIn("capture --model", cm.exception.message)


class UploadLimits(BridgeCase):
    config = {"max_attachment_bytes": 1000}

    def test_attachment_too_large_before_reaching_a_tab(self):
        """An oversized attachment is refused with 413 before anything reaches a tab."""
        tab = self.h.tab()
        big = base64.b64encode(b"\0" * 1500).decode()
        with self.assertRaises(openai.APIStatusError) as cm:
            self.h.client().chat.completions.create(model="test-model", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{big}"}}]}])
        self.assertEqual((cm.exception.status_code, cm.exception.code), (413, "attachment_too_large"))
        self.assertEqual(tab.tasks, [])


class Images(BridgeCase):
    def test_generations_urls_in_parallel_over_tabs(self):
        """n tasks run in parallel over the tabs; each answer's image URL comes back."""
        counter = itertools.count()

        def script(msg):
            i = next(counter)
            return [("sleep", 0.3), f'a2:[{{"type":"image","image":"https://img/{i}.png","mimeType":"image/png"}}]\n',
                    'ad:{"finishReason":"stop"}\n', "[DONE]"]
        t1, t2 = self.h.tab(script), self.h.tab(script)
        t0 = time.time()
        r = self.h.client().images.generate(model="image-model", prompt="a cat", n=4, size="1024x1024")
        self.assertLess(time.time() - t0, 1.0)     # parallel, not 4 x 0.3 s
        self.assertEqual(sorted(d.url for d in r.data), [f"https://img/{i}.png" for i in range(4)])
        self.assertEqual(len(t1.tasks) + len(t2.tasks), 4)
        self.assertGreater(min(len(t1.tasks), len(t2.tasks)), 0)
        for t in t1.tasks + t2.tasks:
            self.assertTrue(t["payload"]["is_image_request"])
            self.assertEqual(t["payload"]["message_templates"][-1]["content"], "a cat")

    def test_b64_json_and_partial_failure(self):
        """b64_json fetches the bytes; a partial failure returns the images that succeeded."""
        png = b"\x89PNG fake image bytes"
        files = FileServer({"/a.png": png})
        self.addCleanup(files.close)
        counter = itertools.count()

        def script(msg):
            if next(counter) == 0:
                return [{"error": "Too Many Requests", "status": 429}]
            return [f'a2:[{{"type":"image","image":"{files.url}/a.png","mimeType":"image/png"}}]\n', "[DONE]"]
        self.h.tab(script)
        r = self.h.client().images.generate(model="image-model", prompt="p", n=2, response_format="b64_json")
        self.assertEqual([base64.b64decode(d.b64_json) for d in r.data], [png])

    def test_total_failure_is_an_openai_error(self):
        """When every task fails the client gets an OpenAI-shaped error saying why."""
        self.h.tab([{"error": "Too Many Requests", "status": 429, "retry_after": 9}])
        with self.assertRaises(openai.RateLimitError) as cm:
            self.h.client().images.generate(model="image-model", prompt="p", n=2)
        self.assertIn("rate limit", cm.exception.message)

    def test_bad_requests(self):
        """n out of range, no prompt, bad response_format: 400."""
        for body in ({"prompt": "p", "n": 11}, {"prompt": "p", "n": 0}, {"n": 1},
                     {"prompt": "p", "response_format": "gif"}):
            status, _, data = self.post("/v1/images/generations", body)
            self.assertEqual(status, 400, body)
            self.assertIn("message", json.loads(data)["error"])


class AllTabsGone(BridgeCase):
    def test_queued_requests_end_when_tabs_vanish(self):
        """Requests in flight when every tab disappears all end with a clean error, never a hang."""
        tab = self.h.tab([("hang",)])
        results = []

        def one():
            try:
                self.h.ask()
            except openai.APIStatusError as e:
                results.append(e.status_code)
        threads = [threading.Thread(target=one) for _ in range(5)]
        for t in threads:
            t.start()
        self.h.wait(lambda: len(tab.tasks) == 5)
        tab.close()
        for t in threads:
            t.join(5)
        self.assertEqual(results, [502] * 5)
        self.assertFalse(self.h.bridge.jobs)


class LoneSurrogates(BridgeCase):
    def test_lone_surrogates_from_a_client(self):
        """"\\ud800" (a JSON escape) in a client's messages: 200, streamed or not; the task reaches the
        tab with the text; nothing stays in flight."""
        tab = self.h.tab()
        for stream in (b"false", b"true"):
            body = (b'{"model": "test-model", "stream": %s, "messages": [{"role": "system", "content": "s\\ud800"},'
                    b' {"role": "user", "content": "a\\udfffb\\ud800"}]}' % stream)
            status, _, data = split_response(self.raw(post_req(body, extra=b"Connection: close\r\n")))
            self.assertEqual(status, 200, data[:300])
        self.assertEqual(len(tab.tasks), 2)
        self.assertIn("a\udfffb\ud800", tab.tasks[0]["payload"]["request"]["body"]["userMessage"]["content"])
        self.h.wait(lambda: not self.h.bridge.jobs, what="no job in flight")
        self.assertEqual(json.loads(self.get("/health")[2])["tasks_in_flight"], 0)

    def test_lone_surrogates_in_a_tab_stream(self):
        """A tab's stream with lone surrogates (a JSON escape inside the row, or one decoded into the
        tab's message): the client gets them as JSON escapes in valid UTF-8, streamed or not; the tab
        stays connected and another stream on it is unaffected."""
        def script(msg):
            if msg["payload"]["message_templates"][-1]["content"] == "slow":
                return lines("steady ", finish=None) + [("sleep", 0.6)] + lines("stream") + ["[DONE]"]
            return ['a0:"\\ud800x"\n', 'a0:"\ud800y"\n', 'ad:{"finishReason":"stop"}\n', "[DONE]"]
        tab = self.h.tab(script)
        result = {}

        def slow():
            chunks = self.h.client().chat.completions.create(model="test-model", stream=True,
                                                             messages=[{"role": "user", "content": "slow"}])
            result["text"] = "".join(c.choices[0].delta.content or "" for c in chunks)
        t = threading.Thread(target=slow, daemon=True)
        t.start()
        self.h.wait(lambda: len(tab.tasks) == 1, what="the slow task at the tab")
        for stream in (False, True):
            raw = self.raw(post_req(json.dumps(chat("bad", stream=stream)).encode(), extra=b"Connection: close\r\n"))
            status, _, body = split_response(raw)
            self.assertEqual(status, 200, raw[:300])
            if stream:
                body = dechunk(body)
            body.decode("utf-8")              # strict: the surrogates went out as JSON escapes
            if stream:
                text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                               for e in sse_events(body) if e != "[DONE]")
            else:
                text = json.loads(body)["choices"][0]["message"]["content"]
            self.assertEqual(text, "\ud800x\ud800y", f"stream={stream}")
        t.join(10)
        self.assertFalse(t.is_alive())
        self.assertEqual(result.get("text"), "steady stream")
        self.assertFalse(tab.closed.is_set())
        self.assertEqual(len(self.h.bridge.tabs), 1)


class OddTabMessages(BridgeCase):
    def script(self, msg):
        prompt = msg["payload"]["message_templates"][-1]["content"]
        if prompt == "slow":
            return lines("still ", finish=None) + [("sleep", 0.8)] + lines("here") + ["[DONE]"]
        if prompt == "bad-ids":
            return [("raw", lambda rid: json.dumps({"request_id": [1], "data": "x"})),
                    ("raw", lambda rid: json.dumps({"request_id": {"a": 1}, "data": "x"})),
                    ("raw", lambda rid: json.dumps({"request_id": 1.5, "data": {"error": "x", "status": 429}}))] \
                + lines("ok") + ["[DONE]"]
        if prompt == "inf-status":
            return [("raw", lambda rid: '{"request_id": "%s", "data": {"error": "x", "status": Infinity}}' % rid)]
        if prompt == "nan-status":
            return [("raw", lambda rid: '{"request_id": "%s", "data": {"error": "x", "status": NaN, '
                                        '"retry_after": -Infinity}}' % rid)]
        if prompt == "inf-retry":
            return [("raw", lambda rid: '{"request_id": "%s", "data": {"error": "x", "status": 429, '
                                        '"retry_after": "inf"}}' % rid)]
        return lines("default") + ["[DONE]"]

    def test_odd_messages_neither_drop_the_tab_nor_log_a_traceback(self):
        """request_id [1] / {} / 1.5, status Infinity or NaN, retry_after "inf" or -Infinity: the tab
        stays connected, nothing is logged at ERROR, a job running meanwhile finishes normally, and a
        bad status gives the client a clean error."""
        tab = self.h.tab(self.script)
        result = {}

        def slow():
            result["text"] = self.h.ask("slow").choices[0].message.content
        with self.assertNoLogs(bridge.log, level="ERROR"):
            t = threading.Thread(target=slow, daemon=True)
            t.start()
            self.h.wait(lambda: len(tab.tasks) == 1, what="the slow task at the tab")
            self.assertEqual(self.h.ask("bad-ids").choices[0].message.content, "ok")
            for prompt in ("inf-status", "nan-status"):
                status, _, data = self.post(body=chat(prompt))
                err = json.loads(data)["error"]
                self.assertEqual((status, err["code"]), (502, "upstream_error"), prompt)
                self.assertNotIn("inf", err["message"].lower())
            status, headers, data = self.post(body=chat("inf-retry"))
            self.assertEqual((status, json.loads(data)["error"]["code"]), (429, "rate_limited"))
            self.assertRegex(headers["retry-after"], r"^[0-9]{1,5}$")
            self.h.bridge.tabs[0].cool_until = 0
            t.join(10)
        self.assertFalse(t.is_alive())
        self.assertEqual(result.get("text"), "still here")
        self.assertFalse(tab.closed.is_set())
        self.assertEqual(len(self.h.bridge.tabs), 1)
        self.assertEqual(self.h.ask("again").choices[0].message.content, "default")

    def test_finish_reason_that_is_not_a_string(self):
        """ad:{"finishReason":[1]} ends the answer normally, without a traceback."""
        self.h.tab(lines("fine", finish=None) + ['ad:{"finishReason":[1]}\n', "[DONE]"])
        with self.assertNoLogs(bridge.log, level="ERROR"):
            r = self.h.ask()
        self.assertEqual((r.choices[0].message.content, r.choices[0].finish_reason), ("fine", "stop"))


class LogInjection(BridgeCase):
    def test_untrusted_strings_are_logged_on_one_line(self):
        """A model name and a tab's hello (url, version) with newlines cannot forge log lines: every
        record's message is one line, at info and at debug level."""
        self.h.tab()
        records = []
        handler = bridge.logging.Handler()
        handler.emit = records.append
        bridge.log.addHandler(handler)
        self.addCleanup(bridge.log.removeHandler, handler)
        self.addCleanup(bridge.set_log_level, "error")
        forged = "\n2099-01-01 INFO deadbeef POST /v1/chat/completions status=200\r\nFORGED"
        for n, level in enumerate(("info", "debug"), 1):
            bridge.set_log_level(level)
            status, _, _ = self.post(body=chat(model="m" + forged))
            self.assertEqual(status, 404)         # not in models.json: refused, and logged with its name
            tab = FakeTab(self.h, hello=False)
            self.h.run(tab.connect())
            self.h.tabs.append(tab)
            self.h.run(tab.send({"type": "log", "message": "x" + forged}))
            self.h.run(tab.send({"type": "mystery" + forged}))
            self.h.run(tab.send({"type": "hello", "version": "9" + forged, "url": "https://lmarena.ai/" + forged}))
            self.h.wait(lambda: sum("says hello" in r.getMessage() and "FORGED" in r.getMessage()
                                    for r in records[:]) == n, what="the hello logged")
        messages = [r.getMessage() for r in records]
        self.assertTrue(any("FORGED" in m and "POST" in m for m in messages))
        for m in messages:
            self.assertNotIn("\n", m)
            self.assertNotIn("\r", m)


class CaptureOverHttp(BridgeCase):
    def config_bytes(self):
        with open(self.h.config_path, "rb") as f:
            return f.read()

    def round_trip(self, tab):
        """Returns once the bridge has handled everything the tab sent before."""
        marker = os.urandom(4).hex()
        self.h.run(tab.send({"type": "status", "marker": marker}))
        self.h.wait(lambda: any(t.status.get("marker") == marker for t in self.h.bridge.tabs), what="round trip")

    def test_bad_capture_requests_are_400_and_arm_nothing(self):
        """A bad timeout, mode, target or model (alone, the rest good): 400 naming the field, capture
        not armed, no activate command sent to the tab."""
        tab = self.h.tab()
        for body, field in (({"timeout": "abc"}, "timeout"), ({"mode": "direct_chat", "timeout": -1}, "timeout"),
                            ({"timeout": True}, "timeout"), ({"timeout": 1e9}, "timeout"),
                            ({"mode": "nope"}, "mode"), ({"mode": ["battle"]}, "mode"),
                            ({"mode": "battle", "target": "C"}, "target"), ({"target": 5}, "target"),
                            ({"mode": "battle", "target": "A", "model": 5}, "model")):
            status, _, data = self.post("/internal/id_capture", body)
            err = json.loads(data)["error"]
            self.assertEqual(status, 400, body)
            self.assertIn(field, err["message"], body)
            self.assertIsNone(self.h.bridge.capture.settings, body)
        self.h.ask()            # a task sent after: any command sent before it has arrived by now
        self.assertEqual(len(tab.tasks), 1)
        self.assertEqual([c for c in tab.commands if "capture" in str(c.get("command"))], [])

    def leave_waiting_capture(self, reset: bool):
        """The client waiting on /internal/id_capture leaves (a reset or a plain close): the tabs are
        told to deactivate, and a later ids_captured from a tab does not rewrite config.jsonc."""
        tab = self.h.tab()
        before = self.config_bytes()
        s = self.connect()
        s.sendall(post_req(json.dumps({"mode": "direct_chat"}).encode(), path="/internal/id_capture"))
        tab.wait_command("activate_id_capture")
        self.assertIsNotNone(self.h.bridge.capture.settings)
        if reset:
            close_with_reset(s)
        else:
            s.close()
        tab.wait_command("deactivate_id_capture", timeout=3)
        self.assertIsNone(self.h.bridge.capture.settings)
        self.h.run(tab.send({"type": "ids_captured", "session_id": SID2, "message_id": MID2}))
        self.round_trip(tab)
        self.assertEqual(self.config_bytes(), before)
        self.assertEqual(self.h.bridge.files.config.session_id, SID)

    def test_capture_disarmed_when_the_waiting_client_resets(self):
        """The waiting client's connection is reset (a killed process with unread data)."""
        self.leave_waiting_capture(reset=True)

    def test_capture_disarmed_when_the_waiting_client_closes(self):
        """The waiting client closes its connection normally."""
        self.leave_waiting_capture(reset=False)

    def test_unsolicited_ids_captured_is_ignored(self):
        """ids_captured with no capture armed leaves config.jsonc byte-identical."""
        tab = self.h.tab()
        before = self.config_bytes()
        self.h.run(tab.send({"type": "ids_captured", "session_id": SID2, "message_id": MID2}))
        self.round_trip(tab)
        self.assertEqual(self.config_bytes(), before)
        self.assertEqual(self.h.bridge.files.config.session_id, SID)

    def test_report_with_a_bad_id_is_ignored_and_capture_stays_armed(self):
        """A capture report with one good id and one that is not a UUID never overwrites the good ids;
        capture stays armed and the next good report is written."""
        tab = self.h.tab()
        status, _, data = self.post("/internal/start_id_capture", {"mode": "battle", "target": "B", "timeout": 10})
        self.assertEqual(status, 200, data)
        before = self.config_bytes()
        for sid, mid in ((SID2, "not-a-uuid"), ("YOUR_SESSION_ID", MID2), (SID2, None), ([SID2], MID2), (SID2, 7)):
            self.h.run(tab.send({"type": "ids_captured", "session_id": sid, "message_id": mid}))
            self.round_trip(tab)
            self.assertEqual(self.config_bytes(), before, (sid, mid))
            self.assertIsNotNone(self.h.bridge.capture.settings)
        self.h.run(tab.send({"type": "ids_captured", "session_id": SID2, "message_id": MID2}))
        self.round_trip(tab)
        cfg = bridge.parse_json_file("c", self.config_bytes().decode())
        self.assertEqual((cfg["session_id"], cfg["message_id"], cfg["id_updater_last_mode"],
                          cfg["id_updater_battle_target"]), (SID2, MID2, "battle", "B"))
        self.assertIsNone(self.h.bridge.capture.settings)

    def test_start_id_capture_arms_and_returns_at_once(self):
        """/internal/start_id_capture arms the tabs and answers at once; its timeout disarms them."""
        tab = self.h.tab()
        t0 = time.monotonic()
        status, _, data = self.post("/internal/start_id_capture", {"mode": "direct_chat", "timeout": 30})
        self.assertLess(time.monotonic() - t0, 2)
        self.assertEqual((status, json.loads(data)["status"]), (200, "armed"))
        self.assertEqual(tab.wait_command("activate_id_capture")["mode"], "direct_chat")
        self.assertIsNotNone(self.h.bridge.capture.settings)
        status, _, _ = self.post("/internal/start_id_capture", {"mode": "direct_chat", "timeout": 0.3})
        self.assertEqual(status, 200)
        tab.wait_command("deactivate_id_capture", timeout=3)
        self.assertIsNone(self.h.bridge.capture.settings)


class RetryOnce(BridgeCase):
    def test_retried_on_another_tab_only_once(self):
        """A tab that vanishes before answering: the task goes to another tab once; when that one
        vanishes too the client gets 502 tab_disconnected, and a third tab never sees it."""
        first, second = self.h.tab([("close",)]), self.h.tab([("close",)])
        third = self.h.tab()
        with self.assertRaises(openai.APIStatusError) as cm:
            self.h.ask()
        self.assertEqual((cm.exception.status_code, cm.exception.code), (502, "tab_disconnected"))
        self.assertEqual((len(first.tasks), len(second.tasks), len(third.tasks)), (1, 1, 0))
        self.assertEqual(self.h.ask().choices[0].message.content, "Hello world!")




# (d) Command line and subprocesses: capture, models, update, start-up, restart ======================

class Capture(BridgeCase):
    config = {"session_mode": "retry"}
    endpoint_map = {"solo": {"session_id": SID, "message_id": MID}}

    def cli(self, *args, timeout=30):
        return run_cli("capture", "--config", self.h.config_path, "--bridge", self.h.url, *args, timeout=timeout)

    def test_capture_writes_config_keeping_comments(self):
        """`capture` arms the tab and writes the ids, mode and target into config.jsonc, comments kept."""
        tab = self.h.tab()
        tab.on_command = answer_capture()
        r = self.cli("--mode", "battle", "--target", "B")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(SID2, r.stdout)
        self.assertEqual(tab.wait_command("activate_id_capture")["mode"], "battle")
        with open(self.h.config_path, encoding="utf-8") as f:
            text = f.read()
        self.assertIn("// Captured by `python bridge.py capture`", text)
        cfg = bridge.parse_json_file("c", text)
        self.assertEqual((cfg["session_id"], cfg["message_id"], cfg["id_updater_last_mode"],
                          cfg["id_updater_battle_target"]), (SID2, MID2, "battle", "B"))
        # The running bridge uses the new ids at once.
        self.h.client().chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(tab.tasks[-1]["payload"]["session_id"], SID2)
        self.assertEqual(tab.tasks[-1]["payload"]["message_templates"][0]["participantPosition"], "b")

    def test_capture_for_a_model_builds_a_pool(self):
        """`capture --model` adds the session to that model's pool, turning one object into a list."""
        tab = self.h.tab()
        tab.on_command = answer_capture()
        r = self.cli("--mode", "direct_chat", "--model", "solo")
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(os.path.join(self.h.dir, "model_endpoint_map.json"), encoding="utf-8") as f:
            mapping = json.load(f)
        self.assertEqual(mapping["solo"], [{"session_id": SID, "message_id": MID},
                                           {"session_id": SID2, "message_id": MID2, "mode": "direct_chat",
                                            "battle_target": "A"}])
        r = self.cli("--mode", "battle", "--target", "A", "--model", "fresh")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(len(self.h.bridge.files.endpoint_map["fresh"]), 1)

    def test_capture_failures_are_one_line_exit_1(self):
        """No tab, a timeout, or no bridge at all: one line on stderr and exit code 1."""
        r = self.cli("--mode", "direct_chat")
        self.assertEqual(r.returncode, 1)
        self.assertIn("No LMArena tab", r.stderr)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1)
        self.h.tab()
        r = self.cli("--mode", "direct_chat", "--timeout", "0.5")
        self.assertEqual(r.returncode, 1)
        self.assertIn("Retry click", r.stderr)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        r = run_cli("capture", "--config", self.h.config_path, "--bridge", dead, "--mode", "direct_chat")
        self.assertEqual(r.returncode, 1)
        self.assertIn("not reachable", r.stderr)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1)


class CaptureWithKey(BridgeCase):
    config = {"api_key": "k1"}

    def test_internal_endpoint_needs_the_key(self):
        """The internal capture endpoint requires the API key when one is set; the CLI sends it."""
        status, _, body = self.post("/internal/id_capture", {"mode": "direct_chat"})
        self.assertEqual((status, json.loads(body)["error"]["code"]), (401, "invalid_api_key"))
        tab = self.h.tab()
        tab.on_command = answer_capture()
        r = run_cli("capture", "--config", self.h.config_path, "--bridge", self.h.url, "--mode", "direct_chat")
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_loopback_check(self):
        """Internal endpoints are for loopback clients only."""
        self.assertTrue(bridge.is_loopback(("127.0.0.1", 5)))
        self.assertTrue(bridge.is_loopback(("::1", 5, 0, 0)))
        self.assertTrue(bridge.is_loopback(("::ffff:127.0.0.1", 5, 0, 0)))
        self.assertFalse(bridge.is_loopback(("192.168.1.4", 5)))
        self.assertFalse(bridge.is_loopback(("10.0.0.1", 5)))


class ModelSync(BridgeCase):
    models = {"hand-made": "null", "renamed": "00000000-0000-4000-8000-000000000000"}

    def test_merge_models_from_the_page(self):
        """New models are added (image ones as :image), changed ids updated, hand entries kept;
        nothing is rewritten when nothing changed; /v1/models reflects it at once."""
        page = [{"id": "aaaaaaaa-0000-4000-8000-000000000001", "publicName": "text-one",
                 "capabilities": {"outputCapabilities": {"text": True}}},
                {"id": "aaaaaaaa-0000-4000-8000-000000000002", "publicName": "painter",
                 "capabilities": {"outputCapabilities": {"image": {}}}},
                {"id": "aaaaaaaa-0000-4000-8000-000000000003", "publicName": "renamed"},
                {"id": "no-name"}]
        path = os.path.join(self.h.dir, "models.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write('{\n  // my own\n  "hand-made": "null",\n  "renamed": "00000000-0000-4000-8000-000000000000"\n}\n')
        tab = self.h.tab()
        self.h.run(tab.send({"type": "models", "models": page}))
        self.h.wait(lambda: "painter" in self.h.bridge.files.models, what="merge")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        self.assertIn("// my own", text)
        merged = bridge.parse_json_file(path, text)
        self.assertEqual(merged, {"hand-made": "null", "renamed": "aaaaaaaa-0000-4000-8000-000000000003",
                                  "text-one": "aaaaaaaa-0000-4000-8000-000000000001",
                                  "painter": "aaaaaaaa-0000-4000-8000-000000000002:image"})
        ids = {m.id for m in self.h.client().models.list()}
        self.assertEqual(ids, set(merged))
        stamp = os.stat(path).st_mtime_ns
        time.sleep(0.02)
        self.h.run(tab.send({"type": "models", "models": page}))
        self.h.run(tab.send({"type": "hello"}))   # a round trip, so the report was handled
        time.sleep(0.2)
        self.assertEqual(os.stat(path).st_mtime_ns, stamp)
        r = run_cli("models", "--config", self.h.config_path)
        self.assertEqual(r.returncode, 0)
        self.assertRegex(r.stdout, r"painter\s+aaaaaaaa-0000-4000-8000-000000000002\s+image")
        self.assertRegex(r.stdout, r"text-one\s+aaaaaaaa-0000-4000-8000-000000000001\s+chat")


    def test_catalog_rows_repair_models_sent_as_webdev(self):
        """A models report from the catalog (rows carrying "arena"): chat models the old rule wrote
        as :webdev are written back as chat, other arenas get their suffixed names, and a chat sent
        to the plain name goes out with modality "chat"."""
        path = os.path.join(self.h.dir, "models.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write('{\n  "claude-sonnet-4-5": "aaaaaaaa-0000-4000-8000-00000000000a:webdev"\n}\n')
        web = {"outputCapabilities": {"text": True, "web": True}}
        rows = [{"arena": "text", "id": "aaaaaaaa-0000-4000-8000-00000000000a",
                 "publicName": "claude-sonnet-4-5", "capabilities": web},
                {"arena": "code", "id": "aaaaaaaa-0000-4000-8000-00000000000b",
                 "publicName": "claude-sonnet-4-5", "capabilities": web}]
        tab = self.h.tab()
        self.h.run(tab.send({"type": "models", "models": rows}))
        self.h.wait(lambda: "claude-sonnet-4-5:webdev" in self.h.bridge.files.models, what="merge")
        with open(path, encoding="utf-8") as f:
            merged = bridge.parse_json_file(path, f.read())
        self.assertEqual(merged, {"claude-sonnet-4-5": "aaaaaaaa-0000-4000-8000-00000000000a",
                                  "claude-sonnet-4-5:webdev": "aaaaaaaa-0000-4000-8000-00000000000b:webdev"})
        for name, (model_id, modality) in {"claude-sonnet-4-5": ("a", "chat"),
                                           "claude-sonnet-4-5:webdev": ("b", "webdev")}.items():
            self.h.ask("hi", model=name)
            body = tab.tasks[-1]["payload"]["request"]["body"]
            self.assertEqual((body["modelAId"][-1], body["modality"]), (model_id, modality))

class InteractiveCapture(BridgeCase):
    def test_asks_in_a_terminal_defaulting_to_the_last_choice(self):
        """Run in a terminal without options, `capture` asks mode and target; Enter keeps the last."""
        import pty
        with open(self.h.config_path, encoding="utf-8") as f:
            text = f.read()
        with open(self.h.config_path, "w", encoding="utf-8") as f:
            f.write(bridge.jsonc_update(text, {"id_updater_last_mode": "battle", "id_updater_battle_target": "B"}))
        tab = self.h.tab()
        tab.on_command = answer_capture()
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "bridge.py"), "capture", "--config",
                              self.h.config_path, "--bridge", self.h.url], stdin=slave,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(slave)
        os.write(master, b"\n\n")
        out, err = p.communicate(timeout=30)
        self.assertEqual(p.returncode, 0, err)
        cmd = tab.wait_command("activate_id_capture")
        self.assertEqual((cmd["mode"], cmd["battle_target"]), ("battle", "B"))


class Update(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="bridge-update-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        for name in ("bridge.py", "userscript.js"):
            shutil.copy(os.path.join(HERE, name), self.dir)
        shutil.copy(SHIPPED_CONFIG, os.path.join(self.dir, "config.jsonc"))

    def serve(self, new_bridge: bytes, sha: str | None = None, version="99.0.0"):
        manifest = {"version": version, "files": {
            "bridge.py": {"url": "files/bridge.py", "sha256": sha or hashlib.sha256(new_bridge).hexdigest()},
            "config.jsonc": {"url": "files/config.jsonc", "sha256": hashlib.sha256(b"{}").hexdigest()}}}
        srv = FileServer({"/m/manifest.json": json.dumps(manifest).encode(), "/m/files/bridge.py": new_bridge,
                          "/m/files/config.jsonc": b"{}"})
        self.addCleanup(srv.close)
        cfg = os.path.join(self.dir, "config.jsonc")
        with open(cfg, encoding="utf-8") as f:
            text = f.read()
        with open(cfg, "w", encoding="utf-8") as f:
            f.write(bridge.jsonc_update(text, {"update_url": srv.url + "/m/manifest.json"}))
        return srv

    def read(self, name):
        with open(os.path.join(self.dir, name), "rb") as f:
            return f.read()

    def test_update_verifies_backs_up_and_replaces_program_files_only(self):
        """`update` downloads, verifies sha256, keeps a backup, never touches config.jsonc."""
        old = self.read("bridge.py")
        new = old + b"\n# new version\n"
        self.serve(new)
        config_before = self.read("config.jsonc")
        r = run_cli("update", script=os.path.join(self.dir, "bridge.py"), cwd=self.dir)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("replaced bridge.py", r.stdout)
        self.assertEqual(self.read("bridge.py"), new)
        self.assertEqual(self.read("config.jsonc"), config_before)
        backups = [d for d in os.listdir(self.dir) if d.startswith("backup-")]
        self.assertEqual(len(backups), 1)
        with open(os.path.join(self.dir, backups[0], "bridge.py"), "rb") as f:
            self.assertEqual(f.read(), old)

    def test_wrong_hash_replaces_nothing(self):
        """A wrong sha256 replaces nothing and exits 1."""
        old = self.read("bridge.py")
        self.serve(old + b"# tampered\n", sha="0" * 64)
        r = run_cli("update", script=os.path.join(self.dir, "bridge.py"), cwd=self.dir)
        self.assertEqual(r.returncode, 1)
        self.assertIn("sha256 mismatch", r.stdout)
        self.assertEqual(self.read("bridge.py"), old)
        self.assertFalse([d for d in os.listdir(self.dir) if d.startswith("backup-")])

    def test_startup_check_logs_newer_version_and_survives_offline(self):
        """The background check finds a newer version; an unreachable URL never breaks start-up."""
        srv = self.serve(b"x")
        h = Harness({"enable_auto_update": True, "update_url": srv.url + "/m/manifest.json"})
        self.addCleanup(h.close)
        h.wait(lambda: h.bridge.update_notice == "99.0.0", what="update notice")
        h2 = Harness({"enable_auto_update": True, "update_url": "http://127.0.0.1:9/nothing"})
        self.addCleanup(h2.close)
        time.sleep(0.3)
        self.assertIsNone(h2.bridge.update_notice)


class StartupAndRestart(unittest.TestCase):
    def start(self, *args, config=None, raw=None):
        d = tempfile.mkdtemp(prefix="bridge-cli-")
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "config.jsonc")
        with open(SHIPPED_CONFIG, encoding="utf-8") as f:
            text = f.read()
        settings = {"session_id": SID, "message_id": MID}
        settings.update(config or {})
        with open(path, "w", encoding="utf-8") as f:
            f.write(raw if raw is not None else bridge.jsonc_update(text, settings))
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "bridge.py"), "--config", path, "--port", "0", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(p.stderr.close)
        self.addCleanup(p.stdout.close)
        self.addCleanup(lambda: p.poll() is None and (p.kill(), p.wait(10)))
        return p, d

    def test_first_run_makes_config_from_the_example(self):
        """Your config.jsonc is not in version control (git pull never conflicts with it): the first
        run makes it from config.example.jsonc beside bridge.py, comments and all; later runs keep it."""
        d = tempfile.mkdtemp(prefix="bridge-first-run-")
        self.addCleanup(shutil.rmtree, d, True)
        for name in ("bridge.py", "config.example.jsonc"):
            shutil.copy(os.path.join(HERE, name), d)
        r = run_cli("models", script=os.path.join(d, "bridge.py"), cwd=d)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("made config.jsonc from config.example.jsonc", r.stderr)
        with open(os.path.join(d, "config.jsonc"), encoding="utf-8") as f, open(SHIPPED_CONFIG, encoding="utf-8") as g:
            self.assertEqual(f.read(), g.read())
        with open(os.path.join(d, "config.jsonc"), "a", encoding="utf-8") as f:
            f.write("// mine\n")
        r = run_cli("models", script=os.path.join(d, "bridge.py"), cwd=d)
        self.assertNotIn("made config.jsonc", r.stderr)
        with open(os.path.join(d, "config.jsonc"), encoding="utf-8") as f:
            self.assertTrue(f.read().endswith("// mine\n"))
        with open(os.path.join(HERE, ".gitignore"), encoding="utf-8") as f:
            ignored = f.read().split()
        for name in ("config.jsonc", "models.json", "model_endpoint_map.json", "request_shape.json"):
            self.assertIn(name, ignored)

    def test_port_in_use_suggests_another_bridge_or_port(self):
        """A taken port is one line saying another program (perhaps a bridge) has it, and --port."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            r = run_cli("--config", SHIPPED_CONFIG, "--port", str(port), timeout=30)
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}", r.stderr)
        self.assertIn("perhaps a bridge already running", r.stderr)
        self.assertIn("--port", r.stderr)

    def listening(self, p, timeout=20):
        """The port from the "listening on" line, read within `timeout` seconds (else the process
        is killed, which also ends the blocked read)."""
        got = []
        reader = threading.Thread(target=lambda: got.append(p.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            p.kill()
            reader.join(5)
            self.fail(f"no 'listening on' line within {timeout} s")
        line = got[0]
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        self.assertTrue(m, line)
        return int(m.group(1))

    def test_broken_config_exit_2_with_line_and_column(self):
        """A broken file stops start-up with its name, line and column, exit code 2, no traceback."""
        p, d = self.start(raw='{\n  "port": 5102,\n  "host": ,\n}\n')
        out, err = p.communicate(timeout=20)
        self.assertEqual(p.returncode, 2)
        self.assertIn("config.jsonc: line 3, column 11", err)
        self.assertNotIn("Traceback", err)
        p, d = self.start(config={"port": "abc"})
        _, err = p.communicate(timeout=20)
        self.assertEqual(p.returncode, 2)
        self.assertIn('"port" must be a number', err)

    def test_port_0_missing_files_and_sigterm(self):
        """--port 0 listens on a free port; missing optional files are reported; SIGTERM ends open
        streams with an error event, tells tabs, and exits 0 within 5 s."""
        p, d = self.start(config={"session_mode": "retry"})     # no models.json: a name goes as it is
        port = self.listening(p)
        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)

        async def scenario():
            ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws", origin="https://lmarena.ai")
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            try:
                body = json.dumps(chat(stream=True)).encode()
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(body), body))
                task = {}
                while "payload" not in task:
                    task = json.loads(await asyncio.wait_for(ws.recv(), 10))
                await ws.send(json.dumps({"request_id": task["request_id"], "data": 'a0:"part"\n'}))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                t0 = time.time()
                p.send_signal(signal.SIGTERM)
                rest = await asyncio.wait_for(reader.read(), 5)
                await asyncio.wait_for(ws.wait_closed(), 5)
                return head, rest, time.time() - t0, ws.close_code
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await asyncio.wait_for(writer.wait_closed(), 5)
                await asyncio.wait_for(ws.close(), 5)
        head, rest, took, code = loop.run_until_complete(asyncio.wait_for(scenario(), 40))
        self.assertIn(b"200 OK", head)
        body = dechunk(rest)
        self.assertIn(b"bridge_shutdown", body)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        self.assertEqual(code, 1001)
        self.assertEqual(p.wait(5), 0)
        self.assertLess(took, 5)
        err = p.stderr.read()
        self.assertIn("models.json not found", err)

    def test_idle_restart(self):
        """After idle_restart_timeout_seconds without requests, tabs are told to reconnect and the
        process restarts itself with the same arguments."""
        p, d = self.start(config={"enable_idle_restart": True, "idle_restart_timeout_seconds": 1})
        port = self.listening(p)
        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)

        async def tab():
            ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws", origin="https://lmarena.ai")
            try:
                while True:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if msg.get("command") != "keep_token_ready":
                        return msg
            finally:
                await asyncio.wait_for(ws.close(), 5)
        self.assertEqual(loop.run_until_complete(asyncio.wait_for(tab(), 30)), {"command": "reconnect"})
        self.listening(p)        # the new process says it listens again
        self.assertIsNone(p.poll())
        p.terminate()
        self.assertEqual(p.wait(10), 0)


# (e) Fuzzing and soak ==============================================================================

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None


@unittest.skipIf(given is None, "hypothesis is not installed")
class Fuzz(unittest.TestCase):
    if given is not None:
        @settings(max_examples=400, deadline=None)
        @given(st.binary(max_size=600))
        def test_head_parser_only_raises_http_errors(self, data):
            """Arbitrary bytes: the head parser returns a request or raises HttpError, nothing else."""
            with contextlib.suppress(bridge.HttpError):
                bridge.parse_request_head(data)

        @settings(max_examples=400, deadline=None)
        @given(st.lists(st.binary(max_size=64), max_size=8))
        def test_chunked_decoder_only_raises_http_errors(self, parts):
            """Arbitrary bytes: the chunked decoder only raises HttpError."""
            d = bridge.ChunkedDecoder(1000)
            with contextlib.suppress(bridge.HttpError):
                for p in parts:
                    if d.feed(p):
                        break

        @settings(max_examples=400, deadline=None)
        @given(st.lists(st.one_of(st.text(max_size=80), st.binary(max_size=80)), max_size=6), st.sampled_from("ab"))
        def test_line_parser_never_raises(self, parts, side):
            """Arbitrary text or bytes: the LMArena line parser never raises."""
            p = bridge.ArenaStreamParser(side)
            kind = None
            for part in parts:
                if kind is not None and type(part) is not kind:
                    continue     # one stream is either text or bytes
                kind = type(part)
                p.feed(part)
            p.close()

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.binary(min_size=1, max_size=400))
        def test_server_survives_arbitrary_bytes(self, data):
            """Arbitrary bytes to a live server: any response is well-formed HTTP, and it keeps serving."""
            h = self.__class__.h
            with socket.create_connection(("127.0.0.1", h.port), timeout=5) as s:
                with contextlib.suppress(OSError):
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                got = b""
                with contextlib.suppress(OSError):
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        got += chunk
            for m in re.finditer(rb"HTTP/1\.1 (\d{3}) ", got):
                self.assertIn(int(m.group(1)), bridge._REASONS)
            if got:
                self.assertRegex(got, rb"^HTTP/1\.1 \d{3} [A-Za-z -]+\r\n")
            with socket.create_connection(("127.0.0.1", h.port), timeout=5) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                self.assertTrue(s.recv(100).startswith(b"HTTP/1.1 200"))

    @classmethod
    def setUpClass(cls):
        cls.h = Harness({"head_timeout_seconds": 1, "body_timeout_seconds": 1})

    @classmethod
    def tearDownClass(cls):
        cls.h.close()


class Soak(BridgeCase):
    def test_thousands_of_requests_leave_nothing_behind(self):
        """Thousands of mixed requests (streamed, plain, aborted, failed) leave no tasks, queues or
        connections behind, and memory returns to its level before the load."""
        def script(msg):
            prompt = msg["payload"]["message_templates"][-1]["content"]
            if prompt == "fail":
                return [{"error": "boom", "status": 500}]
            if prompt == "abort":
                return lines("a", finish=None) + [("sleep", 0.05)] + lines("b") + ["[DONE]"]
            return lines("Hello ", "world!") + ["[DONE]"]
        for tab in (self.h.tab(script), self.h.tab(script)):
            tab.record = False        # the test's own bookkeeping must not count as a leak

        def batch(n):
            for i in range(n):
                kind = i % 4
                body = json.dumps(chat({0: "ok", 1: "ok", 2: "fail", 3: "abort"}[kind], stream=kind != 1)).encode()
                s = socket.create_connection(("127.0.0.1", self.h.port), timeout=10)
                try:
                    s.sendall(post_req(body, extra=b"Connection: close\r\n"))
                    if kind == 3:
                        s.recv(10)
                    else:
                        while s.recv(65536):
                            pass
                finally:
                    s.close()

        batch(200)              # warm up caches and pools
        self.h.wait(lambda: not self.h.bridge.jobs and not self.h.bridge.connections, timeout=10)
        gc.collect()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        threads = [threading.Thread(target=batch, args=(500,), daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
            self.assertFalse(t.is_alive(), "a batch did not end within 120 s")
        self.h.wait(lambda: not self.h.bridge.jobs, timeout=10, what="jobs drained")
        self.h.wait(lambda: not self.h.bridge.connections, timeout=10, what="connections closed")
        b = self.h.bridge
        self.assertEqual([len(t.jobs) for t in b.tabs], [0, 0])
        self.assertFalse(b.pool.dirty)
        gc.collect()
        time.sleep(0.2)
        after = tracemalloc.get_traced_memory()[0]
        if after - before > 1_000_000:
            for stat in tracemalloc.take_snapshot().statistics("lineno")[:8]:
                print(stat)
        self.assertLess(after - before, 1_000_000, f"grew by {after - before} bytes")
