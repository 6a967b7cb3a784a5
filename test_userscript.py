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
endpoint for capture only. Since userscript 3.2 also: the model catalog (a full-size list, failures on
demand), the site's budget headers and the 429 of an empty budget, the page's own request carrying
forceLowRecaptchaScore and secrets, dropped conversations, a lost session, refused /api routes,
routed_model rows and a long two-lane capture (see StandIn's docstring for the switches).
"""
import json
import os
import re
import socket
import threading
import time
import unittest
import urllib.request

import openai

import bridge

from testsupport import (ACTIONS, ANSWER, BrowserCase, CATALOG, CHROMIUM, IMAGE_ID, IMAGE_URL, LNA_PERMISSION,
    NEW_FIELD, ORIGIN, PAGE_MODELS, ROUTER_ID, ROWS_A, SKIP_REASON, SOURCE, TEXT_ID, TINY_GIF, TWIN_NEW_ID, V2_KEY,
    catalog_flattened, data_url, keys_anywhere, long_capture, post_json, retry_path, send_like_the_site,
    sync_playwright, tiny_png, uuid7, world)
import testsupport


def tearDownModule():
    testsupport.close_world()


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
        models = self.wait_sent(lambda m: m.get("type") == "models", start)
        self.assertEqual((models["source"], len(models["models"])), ("catalog", 470))
        self.command({"command": "send_status"})
        status = self.wait_sent(lambda m: m.get("type") == "status", start)
        self.assertEqual(status["recaptcha"],
                         {"loaded": True, "site_key": self.arena.site_key, "v2_site_key": V2_KEY})
        self.assertEqual(status["actions"], dict.fromkeys(ACTIONS, True))
        self.assertIs(status["logged_in"], True)
        self.assertEqual(status["models"], {"count": 470, "source": "catalog"})
        self.assertIsInstance(status["token_ready"], bool)
        self.assertIn("last_error", status)

    def test_task_events_come_before_the_exact_stream_and_no_action_means_no_token(self):
        """A task reports token_ready, then upstream_headers, then the exact text and [DONE]; without an action no token is minted."""
        rid, start = self.raw_task(self.create_request("hi there"))
        msgs = self.task_messages(rid, start)
        self.assertEqual(msgs[0], {"request_id": rid, "event": "token_ready"})
        self.assertEqual(msgs[1], {"request_id": rid, "event": "upstream_headers", "status": 200,
                                   "ratelimit": "limit=1800, remaining=1799, reset=240",
                                   "ratelimit_policy": "1800;w=300"})
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
        self.assertEqual(msgs[0], {"request_id": rid, "event": "upstream_headers", "status": 403})  # no budget headers
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
        """Without site_rules (an older bridge) the page's own create-evaluation is reported by the legacy rules: no content, ids, tokens, forceLowRecaptchaScore, secrets or credential-like keys; new fields kept."""
        self.set_site_rules(None)
        start = len(self.w.messages)
        status, _ = send_like_the_site(self.page, self.arena, "my secret words", {
            "experimentFlags": {"fastLane": True, "variant": "b"},
            "clientContext": {"locale": "en", "sessionCookie": "c", "apiKey": "k", "deviceId": uuid7()}})
        self.assertEqual(status, 200)
        page_body = self.arena.requests[-1]["body"]
        self.assertTrue(page_body["forceLowRecaptchaScore"] and page_body["secrets"] and page_body["recaptchaV3Token"])
        shape = self.wait_sent(lambda m: m.get("type") == "request_shape", start)
        self.assertEqual(shape, {"type": "request_shape", "endpoint": "create-evaluation", "body": {
            "mode": "direct-battle", "modality": "chat", "experimentFlags": {"fastLane": True, "variant": "b"},
            "clientContext": {"locale": "en"},
            "userMessage": {"content": "", "experimental_attachments": [], "metadata": {}}}})
        self.assertNotIn("secret", json.dumps(self.sent(lambda m: True, start)))
        # The tab's own requests are never reported as the page's.
        self.raw_task(self.create_request("ours"))
        self.assertEqual(len(self.sent(lambda m: m.get("type") == "request_shape", start)), 1)

    def test_models_come_from_text_direct_when_neither_the_catalog_nor_the_page_has_them(self):
        """A failing catalog on a page without initialModels (the leaderboard): /text/direct with RSC: 1 is fetched and reported as the source."""
        self.arena.catalog_status = 500
        fetches = len(self.arena.rsc_fetches)
        page = self.w.open_page("/leaderboard")
        try:
            tab = self.w.tab_at("/leaderboard")
            models = self.wait_sent(lambda m: m.get("type") == "models", tab=tab.name)
            self.assertEqual((models["models"], models["source"]), (PAGE_MODELS, "text/direct"))
            self.assertEqual(self.arena.rsc_fetches[fetches:], ["/text/direct"])
            status = self.wait_sent(lambda m: m.get("type") == "status", tab=tab.name)
            self.assertEqual(status["models"], {"count": len(PAGE_MODELS), "source": "text/direct"})
        finally:
            page.close()
            self.w.wait(lambda: self.w.tab_at("/leaderboard") is None, 5, "the leaderboard tab to leave")


    # -- LMArena knowledge from the bridge, the site's catalog and budget (userscript 3.2) --

    def set_site_rules(self, rules):
        """Send site_rules (None: none, so back to the legacy rules) and wait until the tab has handled
        it: it answers a later send_status only after that (one socket, messages in order)."""
        start = len(self.w.messages)
        self.command({"command": "site_rules"} if rules is None else {"command": "site_rules", "rules": rules})
        self.command({"command": "send_status"})
        self.wait_sent(lambda m: m.get("type") == "status", start)

    def test_models_come_from_the_catalog_first_one_row_per_arena(self):
        """The catalog, fetched with the page's cookies, is reported flattened: every row unmodified plus its arena, source "catalog"."""
        fetches = len(self.arena.catalog_fetches)
        start = len(self.w.messages)
        self.command({"command": "send_models"})
        report = self.wait_sent(lambda m: m.get("type") == "models", start)
        self.assertEqual(report["source"], "catalog")
        self.assertEqual(report["models"], catalog_flattened())
        self.assertEqual({m["arena"] for m in report["models"]}, {g["arena"] for g in CATALOG})
        self.assertEqual(len([m for m in report["models"] if m["id"] == TEXT_ID]), 2)   # text and document
        self.assertEqual(self.arena.catalog_fetches[fetches:], [{"cookie": True, "status": 200}])

    def test_a_catalog_that_fails_falls_back_to_the_page_data_with_one_log_line(self):
        """A catalog answering 404, 500, 503 (with a catalog body), HTML, an empty list or the wrong shape: the page's initialModels are reported, source "page"."""
        cases = [("status", 404), ("status", 500), ("status", 503), ("status", "html"), ("catalog", []),
                 ("catalog", {"models": CATALOG[0]["models"]}), ("catalog", [{"arena": "text", "models": "none"}])]
        for attribute, value in cases:
            with self.subTest(**{attribute: value}):
                self.arena.reset()
                setattr(self.arena, "catalog_status" if attribute == "status" else "catalog", value)
                start, lines = len(self.w.messages), len(self.w.console)
                self.command({"command": "send_models"})
                report = self.wait_sent(lambda m: m.get("type") == "models", start)
                self.assertEqual((report["models"], report["source"]), (PAGE_MODELS, "page"))
                self.page.evaluate("1")      # Playwright hands console events over during its own calls
                self.assertEqual(len([c for c in self.w.console[lines:] if "model catalog" in c]), 1, self.w.console[lines:])

    def test_budget_headers_reach_the_bridge_raw_on_success_and_on_429(self):
        """upstream_headers carries the raw ratelimit and ratelimit-policy values, for a 200 and for the 429 of an empty budget."""
        self.arena.budget_remaining, self.arena.budget_reset = 1, 97
        rid, start = self.raw_task(self.create_request("last of the budget"))
        msgs = self.task_messages(rid, start)
        self.assertEqual(msgs[1], {"request_id": rid, "event": "upstream_headers", "status": 200,
                                   "ratelimit": "limit=1800, remaining=0, reset=97", "ratelimit_policy": "1800;w=300"})
        self.assertEqual(msgs[-1]["data"], "[DONE]")
        rid, start = self.raw_task(self.create_request("over budget"))
        msgs = self.task_messages(rid, start)
        self.assertEqual(msgs[1], {"request_id": rid, "event": "upstream_headers", "status": 429,
                                   "ratelimit": "limit=1800, remaining=0, reset=97", "ratelimit_policy": "1800;w=300"})
        self.assertEqual(msgs[-1]["data"], {"error": '{"error": "Too Many Requests"}', "status": 429, "retry_after": 97})

    def body_with_forbidden_fields(self, png):
        request = self.create_request("fields", attachments=[
            {"name": "a.png", "contentType": "image/png", "url": data_url("image/png", png)}])
        body = request["body"]
        body.update(forceLowRecaptchaScore=True, secrets={"k": "v"}, dropMe=1,
                    context=[{"files": [{"name": "b.png", "contentType": "image/png", "url": data_url("image/png", png)}],
                              "forceLowRecaptchaScore": True, "note": "kept"}, {"files": []}])
        body["userMessage"]["metadata"] = {"secrets": ["s"], "deep": [{"dropMe": 2, "keep": 3}]}
        return request

    def test_fields_from_the_task_name_the_token_the_attachments_and_what_never_to_send(self):
        """With "fields": never_send keys go at any depth before the token goes in under the given name, and attachments are uploaded at the given paths."""
        self.arena.token_field_v3, self.arena.token_field_v2 = "captchaV3", "captchaV2"
        png = tiny_png((1, 2, 3))
        request = self.body_with_forbidden_fields(png)
        request["body"]["captchaV3"] = "stale"        # named in never_send: removed before the fresh token
        request["fields"] = {"token_v3": "captchaV3", "token_v2": "captchaV2",
                             "attachments": [["userMessage", "experimental_attachments"], ["context", "*", "files"],
                                             ["nowhere", "*", "files"]],
                             "never_send": ["forceLowRecaptchaScore", "secrets", "dropMe", "captchaV3"]}
        rid, start = self.raw_task(request)
        self.assertEqual(self.task_messages(rid, start)[-1]["data"], "[DONE]")
        seen = self.last_tab_request()["body"]
        self.assertRegex(seen["captchaV3"], rf"^v3\.{self.arena.site_key}\.chat_submit\.")
        self.assertEqual(keys_anywhere(seen) & {"forceLowRecaptchaScore", "secrets", "dropMe", "recaptchaV3Token"}, set())
        self.assertEqual(seen["userMessage"]["metadata"], {"deep": [{"keep": 3}]})
        self.assertEqual([c.get("note") for c in seen["context"]], ["kept", None])
        for att in (seen["userMessage"]["experimental_attachments"][0], seen["context"][0]["files"][0]):
            self.assertEqual(self.arena.uploads[self.arena.signed[att["url"]]][2], png)
        # v2: the v2 token under its given name, the v3 field deleted.
        request = self.create_request("v2 renamed", recaptcha="v2")
        request["body"]["captchaV3"] = "left over"
        request["fields"] = {"token_v3": "captchaV3", "token_v2": "captchaV2"}
        rid, start = self.raw_task(request)
        self.assertEqual(self.task_messages(rid, start)[-1]["data"], "[DONE]")
        seen = self.last_tab_request()["body"]
        self.assertRegex(seen["captchaV2"], rf"^v2\.{V2_KEY}\.")
        self.assertEqual(keys_anywhere(seen) & {"captchaV3", "recaptchaV2Token", "recaptchaV3Token"}, set())
        self.assertEqual(self.arena.problems, [])

    def test_without_fields_the_legacy_names_apply(self):
        """A task without "fields" (a bridge older than 3.2): recaptchaV3Token, the legacy attachment paths, and forceLowRecaptchaScore and secrets never sent."""
        png = tiny_png((4, 5, 6))
        rid, start = self.raw_task(self.body_with_forbidden_fields(png))
        self.assertEqual(self.task_messages(rid, start)[-1]["data"], "[DONE]")
        seen = self.last_tab_request()["body"]
        self.assertRegex(seen["recaptchaV3Token"], rf"^v3\.{self.arena.site_key}\.chat_submit\.")
        self.assertEqual(keys_anywhere(seen) & {"forceLowRecaptchaScore", "secrets"}, set())
        self.assertEqual((seen["dropMe"], seen["userMessage"]["metadata"]), (1, {"deep": [{"dropMe": 2, "keep": 3}]}))
        self.assertIn(seen["userMessage"]["experimental_attachments"][0]["url"], self.arena.signed)
        self.assertTrue(seen["context"][0]["files"][0]["url"].startswith("data:"))   # not a legacy path
        self.assertEqual(self.arena.problems, [])

    def test_site_rules_from_the_bridge_decide_what_a_request_shape_keeps(self):
        """After site_rules the page's own request is reported by those rules: never_copy, the credential and id patterns, blank and empty; a new field kept."""
        self.addCleanup(self.set_site_rules, None)
        self.set_site_rules({"never_copy": ["recaptchaV3Token", "recaptchaV2Token", "modelAId", "modelBId",
                                            "forceLowRecaptchaScore", "secrets", "experimentFlags"],
                             "never_copy_pattern": "token|secret|password|credential|cookie|auth|signature|api_?key",
                             "id_keys_pattern": "^(id|.*Id|.*Ids)$", "blank": ["content"],
                             "empty": ["experimental_attachments"], "a_future_rule": True})
        start = len(self.w.messages)
        status, _ = send_like_the_site(self.page, self.arena, "my private words", dict(
            NEW_FIELD, experimentFlags={"fastLane": True},
            clientContext={"locale": "en", "authorName": "me", "Password": "p", "deviceId": uuid7(),
                           "relatedIds": [uuid7(), uuid7()], "turnId": "not-a-uuid"}))
        self.assertEqual(status, 200)
        shape = self.wait_sent(lambda m: m.get("type") == "request_shape", start)
        self.assertEqual(shape["body"], {
            "mode": "direct-battle", "modality": "chat", "newRequiredField": {"x": 1},
            "clientContext": {"locale": "en", "turnId": "not-a-uuid"},
            "userMessage": {"content": "", "experimental_attachments": [], "metadata": {}}})
        self.assertNotIn("private", json.dumps(self.sent(lambda m: True, start)))

    def test_site_refusals_and_router_rows_pass_through_the_tab(self):
        """The stand-in's lost session (401), old /api route (403), dropped conversation (404) reach the bridge with status and body; a router's routed_model row comes first."""
        self.arena.routes[ROUTER_ID] = "gemini-2.5-pro"
        rid, start = self.raw_task(self.create_request("route me", model_id=ROUTER_ID))
        data = "".join(m["data"] for m in self.task_messages(rid, start)[2:-1])
        self.assertEqual(data, 'a2:[{"type":"routed_model","model":"gemini-2.5-pro"}]\n' + ROWS_A.decode())
        conversation = self.last_tab_request()["body"]["id"]
        follow_up = self.create_request("again", model_id=ROUTER_ID)
        follow_up["path"] = f"/nextjs-api/stream/post-to-evaluation/{conversation}"
        follow_up["body"]["id"] = conversation
        self.arena.dropped.add(conversation)
        old_route = self.create_request("old")
        old_route["path"] = "/api/stream/create-evaluation"
        for request, status, error in ((follow_up, 404, '{"error": "Evaluation session not found"}'),
                                       (old_route, 403, '{"error":"Route not allowed"}'),
                                       (self.create_request("lost"), 401, '{"message": "User not found"}')):
            self.arena.lost_session = status == 401
            rid, start = self.raw_task(request)
            self.assertEqual(self.task_messages(rid, start)[-1]["data"],
                             {"error": error, "status": status, "retry_after": None})
        # A catalog id is accepted with its arena's modality only.
        self.arena.lost_session = False
        code_row = CATALOG[1]["models"][0]
        for modality, last in (("webdev", "[DONE]"), ("chat", {"error": '{"error": "Chosen Model(s) are no longer available"}',
                                                              "status": 400, "retry_after": None})):
            rid, start = self.raw_task(self.create_request("build it", model_id=code_row["id"], modality=modality))
            self.assertEqual(self.task_messages(rid, start)[-1]["data"], last)

    def test_long_multi_lane_answer_arrives_byte_exact(self):
        """A ~97,000-character two-lane webdev answer, cut at odd offsets inside characters and escapes, arrives exactly."""
        self.arena.long_answer = True
        rid, start = self.raw_task(self.create_request("a whole web page"), timeout=30)
        msgs = self.task_messages(rid, start)
        self.assertEqual(msgs[-1]["data"], "[DONE]")
        chunks = [m["data"] for m in msgs if isinstance(m.get("data"), str)][:-1]
        self.assertEqual("".join(chunks), long_capture()[0])
        self.assertGreater(len(chunks), 1)


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

    def test_model_list_comes_from_the_catalog_named_by_the_arena_rule(self):
        """The tab reads the site's catalog first; models.json gets every entry the arena rule of
        PROTOCOL 2.8 gives (read independently by testsupport), and the status says where it came from."""
        with open(os.path.join(self.h.dir, "models.json"), encoding="utf-8") as f:
            models = bridge.parse_json_file("models.json", f.read())
        want = testsupport.catalog_models_json()
        self.assertEqual({k: models.get(k) for k in want}, want)
        health = json.loads(urllib.request.urlopen(self.h.url + "/health", timeout=5).read())
        self.assertEqual(health["models_source"], "catalog")
        self.assertIn("the site's model catalog", " ".join(d for _, _, d, _ in bridge.doctor_checks(health)))

    def test_pages_own_request_never_teaches_denied_fields(self):
        """The page's own request carries forceLowRecaptchaScore, secrets, a token and ids: the learned
        shape keeps only the new field, and what the tab sends next carries none of the others."""
        status, _ = testsupport.send_like_the_site(self.page, self.arena)
        self.assertEqual(status, 200)
        self.w.wait(lambda: (self.h.bridge.files.shape or {}).get("newRequiredField") is not None, 10, "the shape")
        shape = self.h.bridge.files.shape
        self.assertEqual(testsupport.keys_anywhere(shape) & {"forceLowRecaptchaScore", "secrets", "recaptchaV3Token",
                                                             "id", "modelAId"}, set())
        with open(os.path.join(self.h.dir, "request_shape.json"), encoding="utf-8") as f:
            saved = f.read()
        self.assertNotIn("forceLowRecaptchaScore", saved)
        self.assertNotIn("secrets", saved)
        self.ask("after the page's own request")
        body = self.last_tab_request()["body"]
        self.assertEqual(body["newRequiredField"], testsupport.NEW_FIELD["newRequiredField"])
        self.assertEqual(testsupport.keys_anywhere(body) & {"forceLowRecaptchaScore", "secrets"}, set())
        self.assertEqual(self.arena.problems, [])

    def test_budget_paces_the_tab(self):
        """An answer saying the budget is spent makes the lone tab rest until the window resets: the
        next request gets 429 at once with Retry-After, without a request to LMArena; /health and the
        status page show the budget."""
        tab = self.tab()
        self.arena.budget_remaining, self.arena.budget_reset = 1, 120
        self.assertEqual(self.ask("the last one in this window").choices[0].message.content, ANSWER)
        self.w.wait(lambda: tab.budget is not None and tab.budget["remaining"] == 0, 5, "the budget")
        health = json.loads(urllib.request.urlopen(self.h.url + "/health", timeout=5).read())
        seen = [t for t in health["tab_details"] if t["name"] == tab.name][0]
        self.assertEqual((seen["budget"]["limit"], seen["budget"]["remaining"]), (1800, 0))
        self.assertGreater(seen["budget"]["reset_seconds"], 100)
        before = len(self.arena.tab_requests())
        try:
            with self.assertRaises(openai.RateLimitError) as cm:
                self.ask("one too many")
            self.assertEqual(cm.exception.code, "rate_limited")
            self.assertIn("budget", cm.exception.message)
            self.assertGreater(int(cm.exception.response.headers["retry-after"]), 100)
            self.assertEqual(len(self.arena.tab_requests()), before)            # LMArena was not asked
            page = urllib.request.urlopen(self.h.url + "/", timeout=5).read().decode()
            self.assertIn("0/1800, resets in", page)
        finally:
            tab.cool_until, tab.budget, tab.rest_reason = 0, None, ""

    def test_lost_login_says_log_in_again(self):
        self.arena.lost_session = True
        with self.assertRaises(openai.PermissionDeniedError) as cm:
            self.ask("who am I?")
        self.assertEqual(cm.exception.code, "session_not_owned")
        self.assertIn("Log in again", cm.exception.message)

    def test_router_answer_keeps_the_model_name_and_logs_the_pick(self):
        """When the router answers, `model` stays what the client asked; the routed model is logged
        and shown in the recent requests."""
        self.arena.routes[testsupport.ROUTER_ID] = "gemini-2.5-pro"
        with self.assertLogs(bridge.log, "INFO") as logs:
            r = self.ask("route me", model="max")
        self.assertEqual((r.model, r.choices[0].message.content), ("max", ANSWER))
        self.assertTrue(any("routed='gemini-2.5-pro'" in line for line in logs.output), logs.output)
        health = json.loads(urllib.request.urlopen(self.h.url + "/health", timeout=5).read())
        self.assertEqual(health["recent_requests"][-1]["routed_model"], "gemini-2.5-pro")

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


class StandInData(unittest.TestCase):
    """The stand-in's recorded-site data keeps its promises (no browser needed)."""

    def test_catalog_is_full_size_with_names_repeated_across_and_within_arenas(self):
        """470 rows in six arenas; document repeats text rows; names in several arenas and twice in one; about 40% of text rows list web."""
        self.assertEqual([g["arena"] for g in CATALOG], list(testsupport.CATALOG_ARENAS))
        rows = catalog_flattened()
        self.assertEqual(len(rows), 470)
        self.assertEqual(len({(r["id"], r["publicName"]) for r in rows}), len({r["id"] for r in rows}))  # an id: one name
        text = CATALOG[0]["models"]
        self.assertAlmostEqual(sum(bool(r["capabilities"]["outputCapabilities"].get("web")) for r in text) / len(text),
                               0.4, delta=0.03)
        names = lambda arena: [r["publicName"] for r in rows if r["arena"] == arena]
        self.assertGreater(len(set(names("document")) & set(names("text"))), 90)
        self.assertGreater(len(set(names("code")) & set(names("text"))), 70)
        self.assertTrue(set(names("search")) & set(names("text")) and set(names("text-to-image")) & set(names("text")))
        twins = [n for n in set(names("text")) if names("text").count(n) > 1]
        self.assertGreaterEqual(len(twins), 6)
        self.assertTrue(all(testsupport.UUID7_RE.fullmatch(r["id"]) for r in rows))
        router = next(r for r in text if r["id"] == ROUTER_ID)
        self.assertEqual(set(router["capabilities"]["outputCapabilities"]), {"text", "image", "search", "web"})
        expected = testsupport.catalog_models_json()
        self.assertEqual({k: expected[k] for k in ("stand-in-text", "stand-in-twin", "stand-in-image", "stand-in-search",
                                                   "max")},
                         {"stand-in-text": TEXT_ID, "stand-in-twin": TWIN_NEW_ID, "stand-in-image": f"{IMAGE_ID}:image",
                          "stand-in-search": f"{testsupport.SEARCH_ID}:search", "max": ROUTER_ID})
        self.assertFalse({"stand-in-retired", "gpt-4.5-preview", "stand-in-search:search"} & set(expected))

    def test_long_capture_is_shaped_like_the_real_one(self):
        """About 97,000 characters, every row newline-terminated, both lanes with every row kind; the expected lane-A text and reasoning are its a0 and ag rows."""
        text, lane_a, reasoning = long_capture()
        self.assertTrue(95_000 <= len(text) <= 110_000, len(text))
        self.assertTrue(text.endswith("\n"))
        rows = text.split("\n")[:-1]
        kinds = {row[:2] for row in rows}
        self.assertTrue({lane + code for lane in "ab" for code in "0g92afed"} <= kinds, kinds)
        self.assertTrue(all(re.fullmatch(r"[ab][0-9a-z]:.+", row) for row in rows))
        values = [(row[:2], json.loads(row[3:])) for row in rows]
        self.assertEqual("".join(v for k, v in values if k == "a0"), lane_a)
        self.assertEqual("".join(v for k, v in values if k == "ag"), reasoning)
        self.assertTrue(any(v[0]["type"] == "webdev" for k, v in values if k == "b2"))
        for needle in ("😀", "你好", "\\ud83d\\ude00", '\\"', "\\n", "\\t"):
            self.assertIn(needle, text)
        interleaved = sum(a[0] != b[0] for a, b in zip(rows, rows[1:]))
        self.assertGreater(interleaved, 100)
        data = text.encode()
        cuts = testsupport.prime_cuts(data)
        inner = cuts[1:-1]
        self.assertTrue(all(all(c % d for d in range(2, int(c ** 0.5) + 1)) for c in inner))
        self.assertTrue(any(0x80 <= data[c] <= 0xBF for c in inner), "no cut inside a UTF-8 sequence")
        self.assertTrue(any(data[c - 1:c + 1] == b'\\"' for c in inner), 'no cut inside \\"')
        self.assertTrue(any(re.match(rb"[0-9a-f]{1,4}", data[c:c + 4]) and b"\\u" in data[c - 5:c] for c in inner))


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


    def test_test_pages_never_reach_the_users_bridge(self):
        """A bridge the user runs on 5102 is never touched by the tests: their pages cannot open it."""
        got = world().page.evaluate("""() => { try { new WebSocket('ws://127.0.0.1:5102/ws'); return 'opened'; }
                                              catch (e) { return String(e.message); } }""")
        self.assertEqual(got, "the tests never connect to port 5102")

    def test_wrong_port_is_not_called_a_local_network_refusal(self):
        """With local network access granted, a socket that fails at once means nothing listens there
        (a wrong port): no "⛔ " in the title, and the console says to check the port, not to allow
        local network access."""
        w = world()
        with socket.socket() as s:                  # a port nothing listens on once closed
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        context = w.browser.new_context(ignore_https_errors=True)
        self.addCleanup(context.close)
        context.grant_permissions([LNA_PERMISSION], origin=ORIGIN)
        context.add_init_script(f"localStorage.setItem('lmarena-bridge-url', 'ws://127.0.0.1:{port}/ws');")
        context.add_init_script(w.script)
        console = []
        page = context.new_page()
        page.on("console", lambda m: console.append(m.text))
        page.goto(ORIGIN + "/")
        w.wait(lambda: page.evaluate("1") and "nothing answers there" in "\n".join(console), 20,
               "the wrong-port advice", console)
        self.assertEqual(page.title(), "LMArena")
        self.assertNotIn("Local network access", "\n".join(console))
        self.assertIn(f":{port}/ws", "\n".join(console))

if __name__ == "__main__":
    unittest.main()
