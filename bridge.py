#!/usr/bin/env python3
"""LMArena Bridge: OpenAI- and Anthropic-compatible APIs served from your own logged-in LMArena tab.

One file, asyncio, a hand-rolled HTTP/1.1 server with the tab WebSocket on the same port.
Run-time dependencies: ``websockets`` (all WebSocket framing, Sans-I/O) and ``json5`` (config files).

Run
    python bridge.py [--config PATH] [--host H] [--port N]    serve (prints "listening on http://H:P")
    python bridge.py doctor [--send MODEL]                      check every link from here to LMArena
    python bridge.py capture [--mode direct_chat|battle] [--target A|B] [--model NAME] [--timeout S]
    python bridge.py models                                     list the known models
    python bridge.py update                                     install a newer version (see update_url)
    python bridge.py --browser [--headless] [--chrome PATH] ... serve, and start a browser of its own with
                                                                the userscript in its LMArena pages (section 17)
    python bridge.py browser [--bridge URL] [...]               only that browser, for a running bridge
Exit codes: 0 done, 1 could not do it (explained in one line), 2 bad usage or broken file.

How a request reaches LMArena (PROTOCOL.md in this repository has the facts and their sources)
    session_mode "create" (default): each request starts a conversation with create-evaluation; a
    whole conversation is folded into one user turn (fold_turns). A client that sends back
    our exact answer plus new turns is continued with post-to-evaluation (Conversations); if that
    fails before any output, the same request falls back to a new conversation. "retry": the
    original's captured session, regenerated with a fabricated history (build_retry_request).
    Every client API is translated into one Conversation first (section "The conversation"); tools
    are described in the prompt and calls read back out of the text ("Tools in the prompt").

HTTP endpoints (same port as the tab socket)
    POST /v1/chat/completions      OpenAI chat, streaming (SSE) or not, with function calling
    POST /v1/messages              Anthropic Messages API (and /v1/messages/count_tokens)
    POST /v1/responses             OpenAI Responses API (Codex CLI, Agents SDK); GET /v1/responses/{id}
    POST /v1/images/generations    OpenAI image generation (n tasks in parallel)
    GET  /v1/models, /v1/models/{id}
    GET  /health                   {"status", "version", "tabs", "tasks_in_flight", ...}; details
                                   (tabs, stages, recent requests) for this machine or the API key
    GET  /                         status page (HTML): the doctor's checks, tabs, recent requests
    POST /internal/id_capture      arms the tabs, waits for a Retry click (loopback + API key)
    GET  /ws                       WebSocket for userscript tabs (LMArena origins only)

Tab protocol (JSON text messages; PROTOCOL.md section 1)
    bridge -> tab  {"request_id", "payload": {message_templates, target_model_id, session_id,
                   message_id, is_image_request, request: {method, path, body, recaptcha_action,
                   recaptcha?, rediscover_site_key?}}}
                   {"command": "abort"|"refresh"|"reconnect"|"activate_id_capture"|"send_models"|
                               "keep_token_ready"|"send_status"|"cleanup_conversation"|...}
    tab -> bridge  {"request_id", "data": "<raw LMArena text>" | "[DONE]" | {"error", "status", "retry_after"}}
                   {"request_id", "event": "token_ready"|"upstream_headers"}
                   {"type": "hello"|"ids_captured"|"models"|"status"|"request_shape"|"log", ...}

Limits and timeouts (Config fields; config.jsonc keys; defaults)
    max_head_bytes 65536          request line + headers; 431 above (nginx 8 KiB, node 16 KiB, h11 16 KiB;
                                  larger here because some clients send long cookies to localhost)
    max_body_bytes 64 MiB         request body; 413 above (several base64 images fit)
    max_attachment_bytes 5 MiB    one decoded attachment; LMArena refuses more as a data URL
    max_messages 5000             messages in one request; 413 above (a million tiny ones froze the loop)
    max_prompt_chars 0            the text sent as one turn; 413 prompt_too_long above (0: no limit)
    head_timeout_seconds 10       whole request head, from its first byte (408)
    body_timeout_seconds 60       whole request body (408)
    keep_alive_timeout_seconds 15 idle time between requests on one connection
    max_connections 512           open HTTP connections; 503 above
    max_connections_per_peer 64   open connections of one other machine; all of them together get
                                  7/8 of max_connections (room kept for this machine's clients and tabs)
    first_byte_hold_seconds 10    streaming: hold the 200 until the tab answers, so errors keep their status
    keepalive_interval_seconds 15 ": keep-alive" SSE comments while waiting
    stream_response_timeout_seconds 360   no data from the tab for that long: 504
    tab_cooldown_seconds 60       a tab rests after a 429 or a refused bot check
    max_pending_output_bytes 8 MiB, max_answer_chars 64 Mi, ws_ping_interval_seconds 20,
    ws_ping_timeout_seconds 20, token_ready_seconds 600: see Config
Table of contents (section, lines, purpose; test_bridge.FileMap keeps it true: banners `# N. Title ===`)
    1. Constants and limits                            77  names, sizes, the JSON scanners every layer uses
    2. Configuration and the user files               378  Config; UserFiles: read when changed, written by the bridge
    3. Atomic, comment-keeping writes of user files   153  JSONC edits that keep comments, written atomically
    4. Errors and JSON                                 95  ApiError (what a client sees), field checks, strict JSON
    5. HTTP/1.1 wire format                           254  pure: request heads, chunked bodies, response heads, SSE
    6. LMArena: requests, models and errors           538  the site's request bodies, model list, refusals, retries
    7. LMArena: the response stream                   504  three stream dialects -> text, reasoning, images, finish
    8. The conversation                               291  one value for every client API; transcript; fingerprints
    9. Tools in the prompt, and calls read back       449  tools described for the model; calls and stops in its text
    10. Replies                                       137  answer events -> a client API's output (base class)
    11. OpenAI chat completions                       402  /v1/chat/completions: request and answer translations
    12. Anthropic Messages                            478  /v1/messages (and count_tokens): request and answer
    13. OpenAI Responses                              519  /v1/responses: input items, output items, the kept responses
    14. Jobs                                          353  one request's attempts on the tabs; the conversation memory
    15. The tab link                                  311  one userscript tab over WebSocket (Sans-I/O websockets)
    16. The tab pool                                  305  picking tabs, assigning and retrying jobs, rests, pings
    17. HTTP connection driver                        483  asyncio protocol: requests in, answers and streams out
    18. Diagnosis                                     152  doctor's checks and the status page (pure)
    19. Routes                                        465  the HTTP API: one method per endpoint
    20. The bridge                                    350  the server: lifecycle, capture, stats, health, tab reports
    21. Updates and image downloads                    83  blocking; run in threads or from the command line
    22. Browser launcher (DevTools protocol)          770  python bridge.py --browser: its own Chrome, minded
    23. Command line                                  332  serve (and --browser), browser, doctor, capture, models, update
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import codecs
import collections
import contextlib
import copy
import dataclasses
import datetime
import difflib
import errno
import hashlib
import hmac
import html
import ipaddress
import itertools
import json
import logging
import math
import mimetypes
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import time
import typing
import urllib.parse
import uuid

import json5
from websockets.frames import Opcode
from websockets.http11 import Request as WsRequest
from websockets.datastructures import Headers as WsHeaders
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol

VERSION = "3.2.0"
USERSCRIPT_VERSION = "3.2.0"    # the userscript.js shipped with this bridge
log = logging.getLogger("bridge")

# 1. Constants and limits ==========================================================================

HERE = os.path.dirname(os.path.abspath(__file__))


CONFIG_NAME, MODELS_NAME, MAP_NAME = "config.jsonc", "models.json", "model_endpoint_map.json"
# The documented settings as shipped. Your own config.jsonc (like models.json and the other files the
# bridge writes) is not in version control, so `git pull` never conflicts with it: the first run
# makes it from this example.
EXAMPLE_CONFIG_NAME = "config.example.jsonc"


SHAPE_NAME = "request_shape.json"      # what the tab learned of LMArena's request shape (learned_shape)


PROGRAM_FILES = ("bridge.py", "userscript.js", "README.md")  # the only files `update` may replace


# Limits that are part of the protocol, not of a user's taste (the tunable ones are Config fields).
MAX_HEADERS = 100                 # h11 and websockets cap the count too; 100 is generous for clients


MAX_CHUNK_SIZE_DIGITS = 16        # hex digits of one chunk size (64 bits); more is an attack


MAX_TRAILER_BYTES = 8192          # chunked trailers are read and discarded


WS_MAX_MESSAGE = 64 * 2**20       # tab messages carry base64 images: several MiB must pass


BURST_FRAMES = 4                  # more tab messages than this behind an answer's first text: write it first


FLUSH_INTERVAL = 0.002            # a burst of tokens within 2 ms of the last write goes out as one chunk


THREAD_PARSE_BYTES = 256 * 1024   # request bodies larger than this are parsed off the event loop


RECENT_REQUESTS = 200             # kept for /health, the status page and stage percentiles


# Hot-path JSON: a tab message is decoded by the C scanner directly (json.loads adds type checks,
# encoding sniffing and two regex scans for surrounding whitespace: twice the time of the scan).
# Anything unusual (leading or trailing text, invalid JSON) goes the full way, errors included.
_DECODER = json.JSONDecoder()


_scan_once = _DECODER.scan_once


def _json_decode(s: str):
    try:
        value, end = _scan_once(s, 0)
    except StopIteration:
        return _DECODER.decode(s)
    if end != len(s) and s[end:].strip(" \t\n\r"):
        return _DECODER.decode(s)
    return value


_scan_json_string = json.decoder.scanstring


LMARENA_HOSTS = ("lmarena.ai", "arena.ai")


RETRY_PATH = "/nextjs-api/stream/retry-evaluation-session-message/{session_id}/messages/{message_id}"


RECAPTCHA_RETRY_ACTION = "chat_retry"


UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


# 2. Configuration and the user files ==============================================================
#    config.jsonc becomes one frozen `Config`, replaced whole when the file changes: a mistyped key or
#    a wrong type fails at load time with the file's name, never as a 500 at request time.


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    # -- The original's options --
    session_id: str = "YOUR_SESSION_ID"
    message_id: str = "YOUR_MESSAGE_ID"
    id_updater_last_mode: str = "direct_chat"          # "direct_chat" | "battle"
    id_updater_battle_target: str = "A"                # "A" | "B"
    use_default_ids_if_mapping_not_found: bool = True
    tavern_mode_enabled: bool = False
    bypass_enabled: bool = False
    api_key: str = ""
    stream_response_timeout_seconds: float = 360
    enable_auto_update: bool = True
    enable_idle_restart: bool = False
    idle_restart_timeout_seconds: float = -1
    # -- Sessions (PROTOCOL section 4) --
    session_mode: str = "create"                       # "create" | "retry"
    continue_conversations: bool = True
    conversation_cleanup: str = "keep"                 # "keep" | "archive" | "delete"
    max_prompt_chars: int = 0                          # 0: no check
    tab_cooldown_seconds: float = 60
    # -- Where and who --
    host: str = "127.0.0.1"
    port: int = 5102
    allowed_tab_origins: tuple = ()
    allow_remote_tabs: bool = False
    cors_allowed_origins: tuple = ("http://localhost", "http://127.0.0.1", "http://[::1]")
    allowed_hosts: tuple = ()
    # -- Limits (HTTP) --
    max_head_bytes: int = 65536          # nginx 8 KiB, node 16 KiB, h11 16 KiB; long localhost cookies
    max_body_bytes: int = 64 * 2**20     # several base64 images fit
    max_attachment_bytes: int = 5 * 2**20
    max_connections: int = 512
    max_connections_per_peer: int = 64   # one address other than this machine's; others keep room too
    max_messages: int = 5000             # messages per request: a million tiny ones froze the loop
    max_pending_output_bytes: int = 8 * 2**20   # queued for a client that does not read; past it we drop it
    max_answer_chars: int = 64 * 2**20   # a non-streaming answer is held in memory; a runaway tab stops here
    # -- Timeouts --
    head_timeout_seconds: float = 10
    body_timeout_seconds: float = 60
    keep_alive_timeout_seconds: float = 15
    first_byte_hold_seconds: float = 10
    keepalive_interval_seconds: float = 15
    cloudflare_wait_seconds: float = 60
    capture_timeout_seconds: float = 180
    ws_ping_interval_seconds: float = 20  # browsers answer pings even in throttled background tabs
    ws_ping_timeout_seconds: float = 20   # no traffic at all for interval + timeout: the tab is dead
    token_ready_seconds: float = 600      # tabs keep a reCAPTCHA token minted this long after a request
    # -- Models --
    strict_models: bool = False
    default_image_model: str = ""
    # -- Maintenance --
    update_url: str = ""
    log_level: str = "info"              # "debug" | "info" | "warning" | "error"

    CHOICES = {"id_updater_last_mode": ("direct_chat", "battle"), "id_updater_battle_target": ("A", "B"),
               "session_mode": ("create", "retry"), "conversation_cleanup": ("keep", "archive", "delete"),
               "log_level": ("debug", "info", "warning", "error")}
    # Keys of the original bridge's config that mean nothing here: accepted and ignored.
    IGNORED = frozenset({"version", "file_bed_enabled", "file_bed_upload_url", "file_bed_api_key",
                         "enable_comprehensive_update", "auto_restart", "$schema"})

    @classmethod
    def from_dict(cls, path: str, raw) -> "Config":
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be an object {{...}}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in raw.items():
            field = fields.get(key)
            if field is None:
                if key in cls.IGNORED or str(key).startswith("_"):
                    continue
                close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
                hint = f"; did you mean \"{close[0]}\"?" if close else " (see the README's configuration table)"
                raise ConfigError(f"{path}: unknown key {json.dumps(key)}{hint}")
            default = field.default
            shown = json.dumps(value, ensure_ascii=False)[:80]
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"{path}: \"{key}\" must be true or false, not {shown}")
            elif isinstance(default, (int, float)):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                        or value in (float("inf"), float("-inf")):
                    raise ConfigError(f"{path}: \"{key}\" must be a number, not {shown}")
                if field.type == "int" and not isinstance(value, int):
                    if not float(value).is_integer():
                        raise ConfigError(f"{path}: \"{key}\" must be a whole number, not {shown}")
                    value = int(value)
            elif isinstance(default, tuple):
                if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                    raise ConfigError(f"{path}: \"{key}\" must be a list of strings")
                value = tuple(value)
            elif not isinstance(value, str):
                raise ConfigError(f"{path}: \"{key}\" must be a string, not {shown}")
            values[key] = value
        for key, choices in cls.CHOICES.items():
            if key in values:
                v = values[key]
                norm = v.upper() if key == "id_updater_battle_target" else v.lower()
                if norm not in choices:
                    raise ConfigError(f"{path}: \"{key}\" must be one of {', '.join(map(json.dumps, choices))}, "
                                      f"not {json.dumps(v)}")
                values[key] = norm
        if not 0 <= values.get("port", 0) <= 65535:
            raise ConfigError(f"{path}: \"port\" must be between 0 and 65535")
        for key in ("max_head_bytes", "max_body_bytes", "max_attachment_bytes", "max_connections",
                    "max_connections_per_peer", "max_messages", "max_pending_output_bytes", "max_answer_chars"):
            if key in values and values[key] < 1:
                raise ConfigError(f"{path}: \"{key}\" must be at least 1")
        return cls(**values)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


class ConfigError(Exception):
    """A user file that cannot be used; the message names the file, line and column."""


def parse_json_file(path: str, text: str):
    """JSON first (fast), JSON5 for comments and trailing commas; errors carry line and column."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    try:
        return json5.loads(text)
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    except ValueError as exc:
        msg = str(exc)
        m = re.match(r"<string>:(\d+) (.*) at column (\d+)$", msg)
        if m:
            raise ConfigError(f"{path}: line {m.group(1)}, column {m.group(3)}: {m.group(2)}") from None
        raise ConfigError(f"{path}: {msg}") from None


def read_json_file(path: str, default):
    """(value, text) of a user file; (default, None) when it does not exist."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        return default, None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_json_file(path, text), text


def validate_models(path: str, raw) -> dict:
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ConfigError(f"{path}: must be an object of \"model name\": \"<uuid>\" (or \"<uuid>:image\", "
                          "\":search\", \":video\", \":webdev\")")
    return raw


def validate_endpoint_map(path: str, raw) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be an object of \"model name\": {{session}} or [{{session}}, ...]")
    for name, value in raw.items():
        entries = value if isinstance(value, list) else [value]
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("session_id"), str) \
                    or not isinstance(entry.get("message_id"), str):
                raise ConfigError(f"{path}: \"{name}\" needs \"session_id\" and \"message_id\" strings")
            if entry.get("mode", "direct_chat") not in ("direct_chat", "battle"):
                raise ConfigError(f"{path}: \"{name}\": mode must be \"direct_chat\" or \"battle\"")
            if str(entry.get("battle_target", "A")).upper() not in ("A", "B"):
                raise ConfigError(f"{path}: \"{name}\": battle_target must be \"A\" or \"B\"")
    return raw


class UserFiles:
    """The user files, re-read when they change on disk (checked when a request comes, at most once
    per CHECK_SECONDS: three stats per request cost more than the rest of a small request's
    bookkeeping, and an edit still takes effect within a second). A broken edit, or a file that is
    missing for a moment (editors that save by rename-then-write), keeps the last good version.
    What the bridge writes into them (captured ids, the model list, the learned request shape) is
    written here too, atomically and keeping the user's comments (jsonc_update, atomic_write)."""

    CHECK_SECONDS = 1.0

    def __init__(self, config_path: str, overrides: dict | None = None):
        self.config_path = os.path.abspath(config_path)
        folder = os.path.dirname(self.config_path)
        self.models_path = os.path.join(folder, MODELS_NAME)
        self.map_path = os.path.join(folder, MAP_NAME)
        self.shape_path = os.path.join(folder, SHAPE_NAME)
        self.overrides = dict(overrides or {})     # fields set by tests or the command line
        self.config = Config().replace(**self.overrides)
        self.models: dict = {}
        self.endpoint_map: dict = {}
        self.loaded_at = time.time()
        self.last_error: str | None = None
        self._stamps: dict = {}
        self._checked = -math.inf               # when refresh() last looked at the files
        self.models_at: float | None = None     # when a tab last reported the model list
        self.models_source: str | None = None   # where that list came from: catalog, page, text/direct
        self.shape: dict | None = None          # the request shape learned from the page
        self.shape_at: float | None = None

    def _spec(self):
        return ((self.config_path, "config", self._config_value),
                (self.models_path, "models", validate_models),
                (self.map_path, "endpoint_map", validate_endpoint_map))

    def _config_value(self, path, raw) -> Config:
        return Config.from_dict(path, raw).replace(**self.overrides)

    @staticmethod
    def _stamp(path):
        try:
            st = os.stat(path)
            return (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return None

    def load_all(self, report=print) -> None:
        """Startup: a missing file is reported and defaults used; a broken one raises ConfigError."""
        for path, attr, validate in self._spec():
            value, text = read_json_file(path, {})
            if text is None:
                report(f"note: {path} not found; using defaults")
            setattr(self, attr, validate(path, value))
            self._stamps[path] = self._stamp(path)

    def refresh(self, force: bool = False) -> bool:
        """Reload whichever file changed (looked at once per CHECK_SECONDS unless `force`); True
        when something was reloaded."""
        now = time.monotonic()
        if not force and now - self._checked < self.CHECK_SECONDS:
            return False
        self._checked = now
        changed = False
        for path, attr, validate in self._spec():
            stamp = self._stamp(path)
            if stamp == self._stamps.get(path):
                continue
            if stamp is None:
                # Gone, perhaps only for a moment: never fall back to defaults (that would, for one,
                # drop the api_key). The stamp stays, so the file's return is noticed.
                log.warning("%s is missing; keeping the last good version", os.path.basename(path))
                self.last_error = f"{path} is missing"
                continue
            self._stamps[path] = stamp
            try:
                value, _ = read_json_file(path, {})
                new = validate(path, value)
            except ConfigError as exc:
                log.error("keeping the last good %s: %s", os.path.basename(path), exc)
                self.last_error = str(exc)
                continue
            if attr == "config":
                for key in ("host", "port"):
                    if getattr(new, key) != getattr(self.config, key):
                        log.warning("%s changed in %s; it takes effect after a restart", key, path)
                set_log_level(new.log_level)
            setattr(self, attr, new)
            self.last_error = None
            self.loaded_at = time.time()
            log.info("reloaded %s", os.path.basename(path))
            changed = True
        return changed

    def note_written(self, path: str) -> None:
        self._stamps[path] = self._stamp(path)

    # -- what the bridge writes: captured ids, the model list, the learned request shape --
    def store_session(self, session_id: str, message_id: str, settings: dict) -> str:
        """Write captured ids: into config.jsonc, or into a model's pool in model_endpoint_map.json."""
        model = settings.get("model")
        files = self
        if not model:
            path = files.config_path
            text = _read_text(path)
            new = jsonc_update(text, {"session_id": session_id, "message_id": message_id,
                                      "id_updater_last_mode": settings["mode"],
                                      "id_updater_battle_target": settings["target"]})
            cfg = self._config_value(path, parse_json_file(path, new))
            atomic_write(path, new)
            files.note_written(path)
            files.config = cfg
            return path
        path = files.map_path
        text = _read_text(path)
        current = parse_json_file(path, text) if text and text.strip() else {}
        entry = {"session_id": session_id, "message_id": message_id, "mode": settings["mode"],
                 "battle_target": settings["target"]}
        existing = current.get(model)
        pool = [] if existing is None else (existing if isinstance(existing, list) else [existing])
        pool = [e for e in pool if not (isinstance(e, dict) and e.get("session_id") == session_id
                                        and e.get("message_id") == message_id)] + [entry]
        new = jsonc_update(text, {model: pool})
        mapping = validate_endpoint_map(path, parse_json_file(path, new))
        atomic_write(path, new)
        files.note_written(path)
        files.endpoint_map = mapping
        return path

    def merge_models(self, page_models: list) -> dict:
        """Merge the page's model list into models.json: add new, update changed ids, keep the rest
        (entries the user wrote by hand stay as they are unless the page knows the name)."""
        path = self.models_path
        text = _read_text(path)
        current = parse_json_file(path, text) if text and text.strip() else {}
        updates, added, changed = {}, [], []
        for name, value in page_model_entries(page_models).items():
            if name not in current:
                added.append(name)
            elif current[name] != value:
                changed.append(name)
            else:
                continue
            updates[name] = value
        self.models_at = time.time()
        if not updates:
            log.info("model list from the page: %d models, models.json already up to date", len(page_models))
            return {}
        new = jsonc_update(text, updates)
        models = validate_models(path, parse_json_file(path, new))
        atomic_write(path, new)
        self.note_written(path)
        self.models = models
        log.info("models.json updated: %d added%s, %d changed%s", len(added),
                 f" ({shown(', '.join(added[:5]), 200)}{'...' if len(added) > 5 else ''})" if added else "",
                 len(changed), f" ({shown(', '.join(changed[:5]), 200)})" if changed else "")
        return updates

    def load_shape(self) -> None:
        """The request shape learned from the page, kept beside the config across restarts."""
        self.shape, self.shape_at = None, None
        try:
            value, text = read_json_file(self.shape_path, None)
        except ConfigError as exc:
            log.warning("ignoring %s: %s", SHAPE_NAME, exc)
            return
        if not isinstance(value, dict) or not isinstance(value.get("body"), dict):
            return
        shape = learned_shape(value.get("endpoint", "create-evaluation"), value["body"])
        if shape is None:
            log.warning("ignoring %s: not a usable request shape (too large, too deep, or odd values)",
                        SHAPE_NAME)
            return
        at = value.get("learned_at")
        self.shape, self.shape_at = shape, at if isinstance(at, (int, float)) else None

    def save_shape(self, endpoint: str, shape: dict) -> None:
        self.shape, self.shape_at = shape, time.time()
        with contextlib.suppress(OSError):
            atomic_write(self.shape_path, json.dumps({"learned_at": self.shape_at, "endpoint": endpoint,
                                                      "body": shape}, indent=2) + "\n")


def set_log_level(name: str) -> None:
    log.setLevel(getattr(logging, str(name).upper(), logging.INFO))


def is_placeholder_id(value) -> bool:
    """Empty, containing YOUR_ (any case), or not shaped like a UUID."""
    return not isinstance(value, str) or not value or "your_" in value.lower() or not UUID_RE.match(value)


def shown(value, limit: int = 120) -> str:
    """An untrusted string for a log line: repr-escaped (no forged lines) and cut."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:limit])


# 3. Atomic, comment-keeping writes of user files ==================================================

def atomic_write(path: str, content: str | bytes) -> None:
    """Temporary file in the same folder, fsync, rename: a crash leaves the old or the new file."""
    folder = os.path.dirname(os.path.abspath(path))
    data = wire_bytes(content) if isinstance(content, str) else content   # tab text: lone surrogates too
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _skip_space_and_comments(text: str, i: int) -> int:
    n = len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n\ufeff":
            i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            break
    return i


def _end_of_string(text: str, i: int) -> int:
    """Index just past the string literal starting at text[i] (a quote)."""
    quote, i, n = text[i], i + 1, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == quote:
            return i + 1
        i += 1
    raise ValueError("unterminated string")


def _end_of_value(text: str, i: int) -> int:
    c = text[i]
    if c in "\"'":
        return _end_of_string(text, i)
    if c in "{[":
        depth = 0
        while i < len(text):
            i = _skip_space_and_comments(text, i)
            if i >= len(text):
                break
            c = text[i]
            if c in "\"'":
                i = _end_of_string(text, i)
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        raise ValueError("unterminated value")
    m = re.compile(r"[^,}\]\s/]*").match(text, i)
    return m.end()


def top_level_spans(text: str) -> tuple[dict, int]:
    """{key: (value_start, value_end)} of a JSONC object's top-level members, and the index of its
    closing brace. Comments and layout around them are left untouched by edits."""
    i = _skip_space_and_comments(text, 0)
    if i >= len(text) or text[i] != "{":
        raise ValueError("not an object")
    i += 1
    spans = {}
    while True:
        i = _skip_space_and_comments(text, i)
        if i >= len(text):
            raise ValueError("unterminated object")
        if text[i] == "}":
            return spans, i
        if text[i] == ",":
            i += 1
            continue
        if text[i] in "\"'":
            end = _end_of_string(text, i)
            key = json5.loads(text[i:end])
        else:
            m = re.compile(r"[A-Za-z_$][\w$]*").match(text, i)
            if not m:
                raise ValueError(f"unexpected character at {i}")
            key, end = m.group(0), m.end()
        i = _skip_space_and_comments(text, end)
        if i >= len(text) or text[i] != ":":
            raise ValueError("expected ':'")
        i = _skip_space_and_comments(text, i + 1)
        end = _end_of_value(text, i)
        spans[key] = (i, end)
        i = end


def jsonc_update(text: str | None, updates: dict, indent: str = "  ") -> str:
    """Set top-level members of a JSONC/JSON5 object text, keeping every comment and the layout.
    Existing members get their value replaced in place; new ones are added before the closing brace."""
    if text is None or not text.strip():
        return json.dumps(updates, indent=2, ensure_ascii=False) + "\n"
    spans, close = top_level_spans(text)
    edits = []
    additions = []
    for key, value in updates.items():
        nested = isinstance(value, (dict, list))
        rendered = json.dumps(value, ensure_ascii=False, indent=2 if nested else None).replace("\n", "\n" + indent)
        if key in spans:
            edits.append((*spans[key], rendered))
        else:
            additions.append(f"{indent}{json.dumps(key, ensure_ascii=False)}: {rendered}")
    if additions:
        # Insert just after the last member (and its trailing comma, if any): comments that follow
        # it and the closing brace stay where they are.
        at = max((end for _, end in spans.values()), default=text.index("{") + 1)
        j = _skip_space_and_comments(text, at)
        has_comma = j < close and text[j] == ","
        if has_comma:
            at = j + 1
        block = ("," if spans and not has_comma else "") + ",".join("\n" + a for a in additions)
        edits.append((at, at, block))
    out, pos = [], 0                  # one pass: 20,000 changed ids must not copy the text 20,000 times
    for start, end, rendered in sorted(edits):
        out += (text[pos:start], rendered)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except FileNotFoundError:
        return None


# 4. Errors and JSON ===============================================================================

class ApiError(Exception):
    """An error a client sees. Rendered in one place per API: `body()` (OpenAI's shape) and
    `anthropic_error_body`; the status, Retry-After and extra headers go with it."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 type_: str | None = None, retry_after: int | None = None, close: bool = False,
                 headers: list | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.type = type_ or ("invalid_request_error" if 400 <= status < 500 and status not in (429,)
                              else "api_error")
        if status == 429:
            self.type = "rate_limit_error"
        if status == 401:
            self.type = "authentication_error"
        self.retry_after = retry_after
        self.close = close
        self.headers = headers or []

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": None}}

    # Server-side errors that trying again soon cannot fix: the user must act first.
    FINAL_CODES = frozenset(("no_tab_connected", "upstream_schema_changed", "bridge_shutdown"))

    @property
    def retryable(self) -> bool:
        """Whether trying again soon can help. When not, answers carry `x-should-retry: false`,
        which the OpenAI and Anthropic SDKs, Claude Code and Codex honour: they fail at once instead
        of retrying for seconds to minutes (PROTOCOL section 3)."""
        if self.code in self.FINAL_CODES:
            return False
        return self.status in (408, 409, 429) or self.status >= 500


def no_tab_error() -> ApiError:
    # No Retry-After: with no tab at all, an SDK's automatic retries (seconds apart) only make the
    # user wait longer for the same answer. A Cloudflare check or a cooling tab does send one.
    return ApiError(503, "No LMArena tab is connected to the bridge. Open https://arena.ai (or "
                    "lmarena.ai) in a browser with the LMArena Bridge userscript installed and enabled; its "
                    "title starts with ✅ once connected (python bridge.py doctor checks every link).",
                    "no_tab_connected")


def _bad(message: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error", "invalid_request_error")


def _describe(value) -> str:
    """The JSON type name of a value, for error messages a client author can act on."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _reject_constant(name: str):
    # json.loads accepts NaN/Infinity, which json.dumps would then write back as invalid JSON.
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):        # 1e400: json.dumps would write Infinity, which strict parsers refuse
        raise ValueError(f"{text[:40]} is out of range")
    return value


def _loads(text: str):
    """JSON that must round-trip: no NaN/Infinity, nor numbers out of a double's range (1e400), and
    nesting too deep for Python is invalid too."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None


# Compact JSON, UTF-8 as it is. Encoders made once: json.dumps with options builds one per call.
json_text = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


_canonical_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode




# 5. HTTP/1.1 wire format ==========================================================================

_TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")      # \Z: "$" would pass a final LF


_TARGET_RE = re.compile(rb"^[\x21-\x7e]+\Z")


_VALUE_BAD_RE = re.compile(rb"[\x00\r\n]")


_FIELDS_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*)*")


_FRAMING_FIELDS = frozenset({"transfer-encoding", "content-length", "host", "connection", "expect"})


_DIGITS_RE = re.compile(rb"^[0-9]+\Z")


_HEX_RE = re.compile(rb"^[0-9A-Fa-f]+\Z")


class HttpError(Exception):
    """The request cannot be read or framed; answered with `status` and the connection is closed."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclasses.dataclass(slots=True)
class HttpRequest:
    method: str
    target: str
    path: str
    query: str
    version: str                      # "HTTP/1.1" or "HTTP/1.0"
    headers: list                     # [(lowercase name str, value str)], in order
    content_length: int | None        # None: no body length given
    chunked: bool
    keep_alive: bool
    expect_continue: bool
    body: bytes = b""

    def header(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return default


def parse_request_head(head: bytes) -> HttpRequest:
    """Parse a request line and headers (without the final CRLF CRLF) strictly.

    Framing rules (RFC 9112 and the lessons of tornado, aiohttp, h11): Content-Length together with
    Transfer-Encoding, any coding but a single `chunked`, unequal duplicate lengths, lengths that are
    not plain ASCII digits, obsolete line folding, whitespace before the colon and CR/LF/NUL in a
    value are all refused: each is a request-smuggling vector when a proxy reads it differently."""
    lines = head.split(b"\r\n")
    if len(lines) > MAX_HEADERS + 1:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method_b, target_b, version_b = parts
    if not _TOKEN_RE.match(method_b):
        raise HttpError(400, "malformed method")
    if not _TARGET_RE.match(target_b):
        raise HttpError(400, "malformed request target")
    if version_b not in (b"HTTP/1.1", b"HTTP/1.0"):
        if re.match(rb"^HTTP/[0-9]\.[0-9]$", version_b):
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        raise HttpError(400, "malformed HTTP version")
    # The usual head passes two scans of the whole (no CR, LF or NUL but in line breaks; every line a
    # token, a colon and a value); any other is checked line by line, for the exact error.
    checked = (len(lines) == 1 or b"\0" not in head and head.count(b"\r") == head.count(b"\n") == len(lines) - 1
               and _FIELDS_RE.fullmatch(head, len(lines[0]) + 2) is not None)
    headers = []
    framing: dict[str, list] = {}       # the fields checked below, in one pass
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not checked:
            if not line:
                raise HttpError(400, "empty header line")
            if line[0] in b" \t":
                raise HttpError(400, "obsolete line folding is not allowed")
            if not sep or not _TOKEN_RE.match(name):
                raise HttpError(400, "malformed header field name (whitespace before ':'?)")
            if _VALUE_BAD_RE.search(value):
                raise HttpError(400, "CR, LF or NUL in a header value")
        field = (name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1"))
        headers.append(field)
        if field[0] in _FRAMING_FIELDS:
            framing.setdefault(field[0], []).append(field[1])
    version = version_b.decode()
    method = method_b.decode()
    target = target_b.decode("ascii")
    content_length = None
    chunked = False
    te_values = framing.get("transfer-encoding")
    cl_values = framing.get("content-length")
    if te_values:
        if cl_values:
            raise HttpError(400, "Content-Length together with Transfer-Encoding")
        codings = [c.strip(" \t") for v in te_values for c in v.split(",")]
        # Check ASCII before lowering: "chun\u212aed".lower() would be "chunked" (Kelvin sign).
        if len(codings) != 1 or not codings[0].isascii() or codings[0].lower() != "chunked":
            raise HttpError(400, "only Transfer-Encoding: chunked is supported")
        if version == "HTTP/1.0":
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        chunked = True
    elif cl_values:
        lengths = {c.strip(" \t") for v in cl_values for c in v.split(",")}
        if len(lengths) != 1:
            raise HttpError(400, "conflicting Content-Length values")
        only = lengths.pop()
        raw = only.encode("latin-1")
        if not _DIGITS_RE.match(raw) or len(raw) > 18:
            raise HttpError(400, "Content-Length must be plain digits")
        content_length = int(raw)
    hosts = framing.get("host", ())
    if len(hosts) > 1 or (version == "HTTP/1.1" and not hosts):
        raise HttpError(400, "exactly one Host header is required")
    conn_tokens = {t.strip(" \t").lower() for v in framing.get("connection", ()) for t in v.split(",")}
    keep_alive = ("keep-alive" in conn_tokens) if version == "HTTP/1.0" else ("close" not in conn_tokens)
    expect = framing.get("expect", (None,))[0]
    if expect is not None and expect.lower() != "100-continue":
        raise HttpError(417, "only Expect: 100-continue is supported")
    path, _, query = target.partition("?")
    if target == "*":
        path = "*"
    elif target.startswith(("http://", "https://")):   # absolute form (proxies); keep the path
        path = urllib.parse.urlsplit(target).path or "/"
    return HttpRequest(method, target, path, query, version, headers, content_length, chunked,
                       keep_alive, expect is not None and version == "HTTP/1.1")


class ChunkedDecoder:
    """Incremental decoder of a chunked body: feed bytes, collect the body, know when it ended and
    where the next request begins (`leftover`). Strict: every chunk is followed by exactly CRLF."""

    __slots__ = ("buf", "parts", "size", "state", "total", "limit", "leftover", "trailer_bytes")

    def __init__(self, limit: int):
        self.buf = bytearray()
        self.parts: list[bytes] = []
        self.size = 0
        self.state = "size"     # size -> data -> crlf -> size ... -> trailers -> done
        self.total = 0
        self.limit = limit
        self.leftover = b""
        self.trailer_bytes = 0

    def feed(self, data: bytes) -> bool:
        """True when the body is complete."""
        self.buf += data
        while True:
            if self.state == "size":
                i = self.buf.find(b"\r\n")
                if i < 0:
                    if len(self.buf) > 1024:
                        raise HttpError(400, "chunk size line too long")
                    return False
                line = bytes(self.buf[:i]).split(b";", 1)[0].strip(b" \t")
                del self.buf[:i + 2]
                if not _HEX_RE.match(line) or len(line) > MAX_CHUNK_SIZE_DIGITS:
                    raise HttpError(400, "malformed chunk size")
                self.size = int(line, 16)
                if self.size == 0:
                    self.state = "trailers"
                    continue
                self.total += self.size
                if self.total > self.limit:
                    raise HttpError(413, "request body too large")
                self.state = "data"
            elif self.state == "data":
                if not self.buf:
                    return False
                take = min(self.size, len(self.buf))
                self.parts.append(bytes(self.buf[:take]))
                del self.buf[:take]
                self.size -= take
                if self.size == 0:
                    self.state = "crlf"
            elif self.state == "crlf":
                if len(self.buf) < 2:
                    return False
                if self.buf[:2] != b"\r\n":
                    raise HttpError(400, "chunk data not followed by CRLF")
                del self.buf[:2]
                self.state = "size"
            elif self.state == "trailers":
                i = self.buf.find(b"\r\n")
                if i < 0:
                    if len(self.buf) > MAX_TRAILER_BYTES:
                        raise HttpError(431, "trailers too large")
                    return False
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                self.trailer_bytes += i + 2
                if self.trailer_bytes > MAX_TRAILER_BYTES:
                    raise HttpError(431, "trailers too large")
                if not line:
                    self.state = "done"
                    self.leftover = bytes(self.buf)
                    self.buf.clear()
                    return True
                if b":" not in line or _VALUE_BAD_RE.search(line):
                    raise HttpError(400, "malformed trailer")
            else:
                return True

    def body(self) -> bytes:
        return b"".join(self.parts)


_REASONS = {100: "Continue", 101: "Switching Protocols", 200: "OK", 204: "No Content",
            400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large", 426: "Upgrade Required",
            417: "Expectation Failed", 421: "Misdirected Request", 429: "Too Many Requests",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported"}


_HEADER_SAFE = re.compile(r"[\r\n\x00]")


def response_head(status: int, headers: list, version: str = "HTTP/1.1") -> bytes:
    """Status line and headers; values are stripped of CR, LF and NUL so nothing can be injected."""
    out = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
    for name, value in headers:
        out.append(f"{name}: {_HEADER_SAFE.sub(' ', str(value))}\r\n")
    out.append("\r\n")
    return "".join(out).encode("latin-1", "replace")


def chunk_frame(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


def wire_bytes(text: str) -> bytes:
    """UTF-8 for the wire. A lone surrogate (JSON allows "\\ud800") cannot be encoded: it goes out as
    its JSON escape, which is exactly right inside the JSON strings where such text can occur."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def sse_event(obj) -> str:
    return "data: " + json_text(obj) + "\n\n"


# 6. LMArena: requests, models and errors ==========================================================
#    Everything LMArena-specific lives here and in the next section (the response stream): when the
#    site changes, these are the sections to adjust. PROTOCOL.md (in this repository) section 2 has the facts and their sources.


CREATE_PATH = "/nextjs-api/stream/create-evaluation"


FOLLOWUP_PATH = "/nextjs-api/stream/post-to-evaluation/{id}"


RECAPTCHA_SUBMIT_ACTION = "chat_submit"


MODALITIES = ("chat", "image", "search", "video", "webdev")


# Body fields the bridge always sets itself: a learned shape (below) never overrides them.
TOKEN_V3_FIELD, TOKEN_V2_FIELD = "recaptchaV3Token", "recaptchaV2Token"
OWN_FIELDS = frozenset({"id", "mode", "modelAId", "modelBId", "userMessageId", "modelAMessageId",
                        "modelBMessageId", "userMessage", "modality", TOKEN_V3_FIELD, TOKEN_V2_FIELD})
# Fields the site's own bodies carry that ours must never have (2.2): `forceLowRecaptchaScore`
# (what the server does with it is unknown; true could only hurt) and `secrets`. Neither is ever
# learned from the page, and the tab strips them from every body it sends.
NEVER_SEND = ("forceLowRecaptchaScore", "secrets")
# Key names that look like a credential: never learned from the page, whatever the site adds.
_CREDENTIAL_KEY = re.compile(r"token|secret|passw|credential|cookie|authoriz|signature|api_?key|private_?key",
                             re.I)
_ID_KEY = re.compile(r"^(?:id|.*Id|.*Ids)$")
# What the tab needs to know of the bodies, so a renamed field is a change here only (section 1 of
# PROTOCOL.md): with every task, where the tokens and attachments go and what never leaves; once
# after hello, what the tab's learner must leave out of the page's own bodies (site_rules).
TASK_FIELDS = {"token_v3": TOKEN_V3_FIELD, "token_v2": TOKEN_V2_FIELD,
               "attachments": [["userMessage", "experimental_attachments"],
                               ["messages", "*", "experimental_attachments"]],
               "never_send": list(NEVER_SEND)}
SITE_RULES = {"command": "site_rules", "rules": {
    "never_copy": sorted({TOKEN_V3_FIELD, TOKEN_V2_FIELD, "modelAId", "modelBId", *NEVER_SEND}),
    "never_copy_pattern": _CREDENTIAL_KEY.pattern, "id_keys_pattern": _ID_KEY.pattern,
    "blank": ["content"], "empty": ["experimental_attachments"]}}
# A refusal LMArena gives rate limits and too-long prompts alike ("prompt failed") means the latter
# for prompts at least this long (TaskPlan.explain).
LONG_PROMPT_CHARS = 32_000
# A learned shape is the page's body minus what we set: small and shallow (a tab could send anything).
SHAPE_MAX_DEPTH, SHAPE_MAX_CHARS = 6, 16384


def uuid7_chain(n: int, now_ms: int | None = None) -> list[str]:
    """n fresh UUIDv7 strings, strictly increasing (same millisecond, rising 12-bit sequence)."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    out = []
    entropy = os.urandom(8 * n + 2)          # one system call for the whole chain
    seq = int.from_bytes(entropy[-2:], "big") & 0x3FF
    for i in range(n):
        if seq > 0xFFF:
            ms, seq = ms + 1, 0
        rand_b = int.from_bytes(entropy[8 * i:8 * i + 8], "big") >> 2
        h = "%032x" % ((ms & 0xFFFFFFFFFFFF) << 80 | 0x7 << 76 | seq << 64 | 0b10 << 62 | rand_b)
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")    # str(uuid.UUID(int=...)), quicker
        seq += 1
    return out


def iso_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


# -- Models: models.json values and the page's model list (2.8) -----------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class ModelRef:
    """A models.json value: "<id>" (chat), "<id>:image|search|video|webdev", "null:image"."""
    id: str | None
    modality: str = "chat"

    @property
    def is_image(self) -> bool:
        return self.modality == "image"


def parse_model_value(value) -> ModelRef:
    model_id, _, kind = str(value).partition(":")
    kind = kind.lower()
    return ModelRef(None if model_id in ("", "null") else model_id, kind if kind in MODALITIES else "chat")


def model_value(ref: ModelRef) -> str:
    return (ref.id or "null") + ("" if ref.modality == "chat" else ":" + ref.modality)


# The catalog's arenas (2.8) and the modality each one sends with; "document" repeats "text".
ARENA_MODALITIES = {"text": "chat", "document": "chat", "code": "webdev", "webdev": "webdev",
                    "search": "search", "text-to-image": "image", "image": "image",
                    "text-to-video": "video", "video": "video"}


def modality_of(model: dict, arena=None) -> str:
    """Modality of a model row. From the catalog its arena decides; page data has no arena, so
    text output means chat (the site's text page lists routers and models that can also draw, search
    or build web pages), otherwise image, video, search, web -> webdev."""
    if isinstance(arena, str) and arena.lower() in ARENA_MODALITIES:
        return ARENA_MODALITIES[arena.lower()]
    caps = model.get("capabilities")
    out = caps.get("outputCapabilities") if isinstance(caps, dict) else None
    if not isinstance(out, dict) or out.get("text") not in (None, False):
        return "chat"
    for key, modality in (("image", "image"), ("video", "video"), ("search", "search"), ("web", "webdev")):
        if out.get(key) not in (None, False):
            return modality
    return "chat"


def catalog_rows(models: list):
    """(arena, row) for each model row: the tab's flattened list (rows carrying "arena"), page data
    (no arena: None), or the catalog itself ([{"arena", "models": [...]}]) as the site sends it."""
    for m in models:
        if not isinstance(m, dict):
            continue
        arena = m.get("arena")
        arena = arena if isinstance(arena, str) else None
        if arena is not None and isinstance(m.get("models"), list):
            for row in m["models"]:
                if isinstance(row, dict):
                    yield arena, row
        else:
            yield arena, m


def page_model_entries(page_models: list) -> dict:
    """The site's model rows -> {name: models.json value}, by the naming rule of PROTOCOL 2.8.

    Rows with userSelectable false are left out. Within one arena, among rows sharing a publicName the
    newest wins (UUIDv7 ids sort by time; otherwise the later row). A name's plain entry is its "text"
    arena row, or without one its first listed arena's row; its rows in arenas of another modality
    become "<name>:<modality>"; rows adding nothing (same modality as the plain entry, such as the
    "document" arena repeating "text") are left out."""
    best: dict[tuple, tuple] = {}            # (name, arena) -> (rank, id, modality)
    arena_order: dict = {}
    for order, (arena, m) in enumerate(catalog_rows(page_models)):
        if m.get("userSelectable") is False:
            continue
        name, mid = m.get("publicName") or m.get("name"), m.get("id")
        if not isinstance(name, str) or not isinstance(mid, str) or not name or not mid:
            continue
        arena_order.setdefault(arena, len(arena_order))
        key = (name, arena)
        rank = (mid[14:15] == "7" and mid.lower(), order)    # v7 ids carry their creation time
        if key not in best or rank > best[key][0]:
            best[key] = (rank, mid, modality_of(m, arena))
    arenas_of: dict[str, list] = {}
    for name, arena in best:
        arenas_of.setdefault(name, []).append(arena)
    out: dict[str, str] = {}
    for name, arenas in arenas_of.items():
        arenas.sort(key=lambda a: (a != "text", arena_order[a]))
        _, mid, plain = best[(name, arenas[0])]
        out[name] = model_value(ModelRef(mid, plain))
        for arena in arenas[1:]:
            _, mid, modality = best[(name, arena)]
            if modality != plain:
                out.setdefault(f"{name}:{modality}", model_value(ModelRef(mid, modality)))
    return out


def resolve_model(name: str, models: dict, strict: bool) -> ModelRef:
    """models.json entry of a model name; an unknown name is modelId null (or 404 when strict:
    always in create mode, where LMArena has no model to fall back on)."""
    value = models.get(name)
    if value is None:
        if strict:
            if not models:
                raise ApiError(404, f"The model {name!r} is not known: models.json is empty. Open "
                               "https://arena.ai in the tab with the userscript so it reports the model "
                               "list, then try again.", "model_not_found")
            close = difflib.get_close_matches(name, list(models), n=5, cutoff=0.4)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ApiError(404, f"The model {name!r} is not in models.json.{hint} GET /v1/models lists "
                           "the known names.", "model_not_found")
        return ModelRef(None)
    return parse_model_value(value)


# -- What a job asks of LMArena -------------------------------------------------------------------

def tavern_merge(templates: list) -> list:
    """Tavern mode: every system prompt joined (blank line between) into one, first."""
    system = [t["content"] for t in templates if t["role"] == "system"]
    rest = [t for t in templates if t["role"] != "system"]
    return ([{"role": "system", "content": "\n\n".join(system), "attachments": []}] if system else []) + rest


# -- Request content: OpenAI parts -> text and attachments ---------------------------------------------

def openai_to_templates_positions(templates: list, *, tavern: bool, bypass: bool, is_image: bool, mode: str,
                                  target: str) -> list[dict]:
    """The retry body's view of the messages: Tavern's merged system prompt, participant positions
    (direct chat: all `a` but system `b`; battle: the captured side), Bypass's trailing turn."""
    if tavern:
        templates = tavern_merge(templates)
    battle_side = "b" if str(target).upper() == "B" else "a"
    out = []
    for t in templates:
        position = battle_side if mode == "battle" else ("b" if t["role"] == "system" else "a")
        out.append({"role": t["role"], "content": t["content"], "attachments": t.get("attachments") or [],
                    "participantPosition": position})
    if bypass and not is_image:
        out.append({"role": "user", "content": " ", "participantPosition": "a", "attachments": []})
    return out


# -- Folding a conversation into one turn (create mode) ----------------------------------------------
#    LMArena keeps a conversation's history on its side; a new conversation takes one user turn. A
#    whole OpenAI conversation goes as one transcript: each turn in a tagged block that names its
#    role, attachments listed where they were sent, and the last user turn last, so the model
#    answers it. The format is in the README ("How a conversation is sent").

FOLD_PREAMBLE = ("The conversation so far is below, each turn tagged with its role. Reply to the last "
                 "user turn as the assistant; do not repeat the tags.")


def fold_turns(templates: list[dict]) -> tuple[str, list]:
    """Templates -> (content, attachments) for one LMArena user turn."""
    attachments = [a for t in templates for a in t.get("attachments") or ()]
    if len(templates) == 1 and templates[0]["role"] == "user":
        return templates[0]["content"], attachments
    blocks = [FOLD_PREAMBLE]
    for t in templates:
        text = t["content"]
        names = [a["name"] for a in t.get("attachments") or ()]
        if names:
            text = (text + "\n" if text.strip() else "") + "[attached: " + ", ".join(names) + "]"
        blocks.append(f"<{t['role']}>\n{text}\n</{t['role']}>")
    return "\n\n".join(blocks), attachments


def build_retry_request(templates: list, session_id: str, message_id: str, model_id,
                        is_image: bool) -> dict:
    """The complete LMArena request for the retry endpoint (PROTOCOL 2.4); the tab adds the token."""
    ids = uuid7_chain(len(templates))
    now = iso_now()
    messages, parent = [], None
    last = len(templates) - 1
    for i, (t, mid) in enumerate(zip(templates, ids)):
        messages.append({
            "id": mid, "role": t["role"], "content": t["content"],
            "experimental_attachments": t.get("attachments") or [],
            "parentMessageIds": [parent] if parent else [],
            "participantPosition": t["participantPosition"],
            "evaluationSessionId": session_id, "evaluationId": None,
            "status": "success" if is_image or i != last else "pending",
            "failureReason": None, "metadata": {}, "createdAt": now, "updatedAt": now,
        })
        parent = mid
    return {"method": "PUT",
            "path": RETRY_PATH.format(session_id=session_id, message_id=message_id),
            "body": {"messages": messages, "modelId": model_id},
            "recaptcha_action": RECAPTCHA_RETRY_ACTION}


def build_evaluation_request(ref: ModelRef, content: str, attachments: list, conversation_id: str | None,
                             learned: dict | None = None) -> tuple[dict, str]:
    """create-evaluation (2.2) for a new conversation, post-to-evaluation (2.3) to continue one.
    Fresh UUIDv7 ids every call (an attempt's ids are never reused). Fields of a learned shape that
    the bridge does not set itself are added. Returns (request, conversation id)."""
    new_id, user_id, a_id, b_id = uuid7_chain(4)
    conv = conversation_id or new_id
    body = {}
    for key, value in (learned or {}).items():
        if key not in OWN_FIELDS and key not in NEVER_SEND:
            body[key] = copy.deepcopy(value)
    learned_user = (learned or {}).get("userMessage")
    learned_user = learned_user if isinstance(learned_user, dict) else {}
    meta = learned_user.get("metadata")       # ours is empty: the learned keys add, never override
    user_message = {"content": content, "experimental_attachments": attachments,
                    "metadata": copy.deepcopy(meta) if isinstance(meta, dict) else {}}
    for key, value in learned_user.items():
        user_message.setdefault(key, copy.deepcopy(value))
    body.update({"id": conv, "mode": "direct-battle", "modelAId": ref.id, "userMessageId": user_id,
                 "modelAMessageId": a_id, "modelBMessageId": b_id, "userMessage": user_message,
                 "modality": ref.modality})
    path = CREATE_PATH if conversation_id is None else FOLLOWUP_PATH.format(id=conversation_id)
    return {"method": "POST", "path": path, "body": body, "recaptcha_action": RECAPTCHA_SUBMIT_ACTION}, conv


def _is_uuid(value) -> bool:
    return isinstance(value, str) and UUID_RE.match(value) is not None


def _never_learned(key: str, value) -> bool:
    """A field of the page's own body no shape may keep: the deny list, anything credential-like
    (the tokens included), and ids (an id-named key holding a UUID or a list of them)."""
    return (key in NEVER_SEND or _CREDENTIAL_KEY.search(key) is not None
            or (_ID_KEY.match(key) is not None and (_is_uuid(value) or isinstance(value, list)
                                                    and all(_is_uuid(x) for x in value))))


def _shape_value(value, depth: int):
    """A learned value without ids, credentials and deny-listed keys; ValueError when it is too deep,
    or of a type JSON bodies do not have."""
    if depth > SHAPE_MAX_DEPTH:
        raise ValueError(f"nested more than {SHAPE_MAX_DEPTH} deep")
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            if not isinstance(key, str) or _never_learned(key, v):
                continue
            out[key] = _shape_value(v, depth + 1)
        return out
    if isinstance(value, list):
        return [_shape_value(v, depth + 1) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("a number JSON cannot hold")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ValueError(f"a value of type {type(value).__name__}")


def learned_shape(endpoint, body) -> dict | None:
    """A report of the page's own request body (from a tab, or request_shape.json) -> the fields
    worth keeping, or None when it is unusable. The tab already leaves out content, ids and tokens;
    whatever it sent, what we set ourselves, ids, anything credential-like and the deny list
    (NEVER_SEND) are dropped here too, and the shape must be small and shallow: a learned shape goes
    into every later request, so a bad one must never get that far."""
    if endpoint not in ("create-evaluation", "post-to-evaluation") or not isinstance(body, dict):
        return None
    try:
        if len(json_text(body)) > SHAPE_MAX_CHARS * 4:
            return None
        shape = _shape_value({k: v for k, v in body.items() if k not in OWN_FIELDS or k == "userMessage"}, 0)
    except (ValueError, RecursionError, TypeError):
        return None
    user = shape.get("userMessage")
    if isinstance(user, dict):
        user = {k: v for k, v in user.items() if k not in ("content", "experimental_attachments")}
        shape["userMessage"] = user
        if not user:
            del shape["userMessage"]
    else:
        shape.pop("userMessage", None)
    if len(json_text(shape)) > SHAPE_MAX_CHARS:
        return None
    return shape


@dataclasses.dataclass(frozen=True, slots=True)
class SessionChoice:
    session_id: str
    message_id: str
    mode: str        # direct_chat | battle
    target: str      # "A" | "B"
    source: str      # where it came from, for messages

    @property
    def side(self) -> str:
        return ("b" if self.target == "B" else "a") if self.mode == "battle" else "a"


def session_candidates(model: str, cfg: Config, endpoint_map: dict) -> list[SessionChoice]:
    """Captured sessions for a model: its pool in model_endpoint_map.json, else the config's ids."""
    entry = endpoint_map.get(model)
    if entry is not None:
        entries = entry if isinstance(entry, list) else [entry]
        out = []
        for e in entries:
            out.append(SessionChoice(e["session_id"], e["message_id"],
                                     e.get("mode") or cfg.id_updater_last_mode,
                                     str(e.get("battle_target") or cfg.id_updater_battle_target).upper(),
                                     f"{MAP_NAME} entry for {model!r}"))
        if out:
            return out
    if not cfg.use_default_ids_if_mapping_not_found:
        raise ApiError(400, f"No session is configured for model {model!r} in {MAP_NAME}, and "
                       "use_default_ids_if_mapping_not_found is false. Add one with: python bridge.py "
                       f"capture --model {model!r}", "session_not_configured")
    return [SessionChoice(cfg.session_id, cfg.message_id, cfg.id_updater_last_mode,
                          str(cfg.id_updater_battle_target).upper(), CONFIG_NAME)]


def check_session(choice: SessionChoice) -> None:
    if is_placeholder_id(choice.session_id) or is_placeholder_id(choice.message_id):
        raise ApiError(400, f"The session ids in {choice.source} are placeholders or not UUIDs. Capture "
                       "them: run `python bridge.py capture` and click Retry on an answer in your "
                       "LMArena tab (or set \"session_mode\": \"create\", which needs no ids).",
                       "session_not_configured")


# -- Errors (2.9) -----------------------------------------------------------------------------------

_CLOUDFLARE_MARKS = ("<title>Just a moment", "Enable JavaScript and cookies to continue",
                     "cf-mitigated", "challenge-platform", "cf_chl_")


FINISH_REASONS = {"stop": "stop", "unknown": "stop", "length": "length",
                  "content-filter": "content_filter", "content_filter": "content_filter",
                  "tool-calls": "stop", "other": "stop"}


def is_cloudflare(text: str) -> bool:
    return any(mark in text for mark in _CLOUDFLARE_MARKS)


def _zod_fields(text: str) -> list[str] | None:
    """The fields a ZodError complains about ("userMessage.metadata"), or None if it is no ZodError."""
    if "ZodError" not in text:
        return None
    fields = []
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        obj = json.loads(text[text.index("{"):])
        err = obj.get("error") if isinstance(obj, dict) else None
        issues = err.get("issues") if isinstance(err, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str) and not issues:
            with contextlib.suppress(ValueError):
                issues = json.loads(err["message"])
        for issue in issues if isinstance(issues, list) else ():
            if isinstance(issue, dict) and isinstance(issue.get("path"), list):
                fields.append(".".join(str(p) for p in issue["path"]) or "(body)")
    return fields


def classify_upstream_error(message, status: int | None = None, retry_after=None) -> ApiError:
    """A failure reported by the tab (or found in the stream) -> the error the client sees."""
    text = message if isinstance(message, str) else json.dumps(message)
    if status is None:
        m = re.search(r"\b(?:[Ss]tatus:?|HTTP)\s*(\d{3})\b", text)
        status = int(m.group(1)) if m else None
    detail = text.strip()
    inner = _inner_error_text(detail)
    short = (inner or detail)[:300]
    lower = text.lower()
    retry = retry_after if isinstance(retry_after, int) and retry_after > 0 else None
    if is_cloudflare(text):
        return ApiError(503, "LMArena is showing a Cloudflare check. The tab was asked to reload; if it "
                        "keeps failing, open the LMArena tab and complete the check.",
                        "cloudflare_challenge", retry_after=retry or 30)
    if status == 429 or "too many requests" in lower or "rate limit" in lower or "prompt failed" in lower:
        return ApiError(429, f"LMArena rate limit reached; try again later. ({short})", "rate_limited",
                        retry_after=retry or 30)
    if "user not found" in lower:
        return ApiError(403, "LMArena does not know the tab's user (User not found): the page's login "
                        "cookies are gone. Log in again in the LMArena tab and reload it.", "session_not_owned")
    if status == 401 or "does not have access to evaluation session" in text or "token has expired" in lower:
        return ApiError(403, "LMArena refused the request: you are logged out, or the session belongs to "
                        "another account. Log in again in the LMArena tab (captured ids: capture them "
                        f"again with `python bridge.py capture`). ({short})", "session_not_owned")
    if "route not allowed" in lower:
        return ApiError(502, f"LMArena no longer serves this path ({short}): the site has changed. Update the "
                        "bridge (python bridge.py update).", "upstream_schema_changed")
    if "recaptcha" in lower or (status == 403 and "captcha" in lower):
        return ApiError(403, "LMArena's reCAPTCHA check failed, also with a fresh token and the fallback "
                        "check. Open the LMArena tab, send one message by hand (solve a check if one is "
                        "shown), then try again.", "recaptcha_failed")
    if "not available for user selection" in lower or "no longer available" in lower:
        return ApiError(400, f"LMArena says this model is not available ({short}). Reload the LMArena tab "
                        "so the model list refreshes, then pick a model from GET /v1/models.",
                        "model_unavailable")
    fields = _zod_fields(text)
    if fields is not None:
        named = ", ".join(fields[:8]) or "unknown fields"
        return ApiError(502, f"LMArena refused the request's shape (ZodError at {named}); the site has "
                        "changed. Send one message by hand in the LMArena tab so the bridge learns the new "
                        "shape, then try again (or update the bridge).", "upstream_schema_changed")
    if status == 413 or "too large" in lower:
        return ApiError(413, f"LMArena refused an attachment as too large (about 5 MB per file as a data "
                        f"URL). ({short})", "attachment_too_large")
    if status == 422 or "violates our terms" in lower:
        return ApiError(400, f"LMArena rejected the content: {short}", "content_policy_violation")
    if status == 400:
        return ApiError(502, f"LMArena rejected the request as invalid (400): {short}", "upstream_error")
    where = f" ({status})" if status else ""
    return ApiError(502, f"LMArena returned an error{where}: {short}", "upstream_error")


def _inner_error_text(text: str) -> str | None:
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        start = text.index("{")
        obj = json.loads(text[start:])
        err = obj.get("error")
        if isinstance(err, dict):
            err = err.get("message")
        return str(err) if err else None
    return None


def _bounded_int(value, low: int, high: int) -> int | None:
    """A tab-supplied number, if it is a finite integer-ish value in range (JSON allows Infinity)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        value = int(value)
    return value if isinstance(value, int) and low <= value <= high else None


def tab_error(data: dict) -> ApiError:
    """A tab's {"error", "status"?, "retry_after"?} report, each field checked."""
    message = data.get("error")
    if not isinstance(message, str):
        message = json.dumps(message, ensure_ascii=False)[:2000] if message else "unknown error"
    return classify_upstream_error(message[:20000], _bounded_int(data.get("status"), 100, 599),
                                   _bounded_int(data.get("retry_after"), 0, 86400))


BUDGET_MAX_RESET_SECONDS = 3600      # the longest rest a budget header can impose (Tab.note_budget)
_RATELIMIT_FIELD = re.compile(r"\b(limit|remaining|reset)\s*=\s*(\d{1,9})")


def parse_ratelimit(value) -> dict | None:
    """A `ratelimit: limit=1800, remaining=12, reset=240` header (2.9: the account's budget per
    5-minute window, on successful answers) -> {"limit", "remaining", "reset"}; None when absent."""
    if not isinstance(value, str):
        return None
    found = dict((k, int(v)) for k, v in _RATELIMIT_FIELD.findall(value[:300]))
    if "remaining" not in found:
        return None
    return {"limit": found.get("limit"), "remaining": found["remaining"], "reset": found.get("reset")}


def retry_plan(err: ApiError, followup: bool, attempt: int) -> dict | None:
    """What to change on the next attempt after a failure before any output, or None to give up.
    A follow-up that fails falls back to a new conversation; a refused token is retried once with a
    fresh v3 token (the site key rediscovered), then once with the invisible v2 check (2.5)."""
    if followup and err.code not in ("rate_limited", "cloudflare_challenge", "attachment_too_large",
                                     "content_policy_violation", "session_not_owned"):
        return {"new_conversation": True}
    if err.code == "recaptcha_failed":
        refusals = attempt + 1
        if refusals == 1:
            return {"rediscover_site_key": True}
        if refusals == 2:
            return {"rediscover_site_key": True, "recaptcha": "v2"}
    return None


# 7. LMArena: the response stream ==================================================================

# -- The response stream -----------------------------------------------------------------------------

class ArenaStreamParser:
    """LMArena's response stream (PROTOCOL.md 2.6) -> events, however the text is cut into chunks.

    Dialects, told apart by the first bytes:
      A/B  rows `<lane><code>:<JSON value>`, one per line (A, maybe `data: `-prefixed) or run together
           with no delimiter after an optional request-echo object (B). Both are read the same way:
           exactly one JSON value after each `<lane><code>:`, string- and bracket-aware, so a newline
           is never needed to end a row.
      C    typed server-sent events, `data: {"type": ...}` lines ending with `data: [DONE]`.
    Events (tuples): ("text", json_literal_or_None, text), ("reasoning", text), ("image", url),
    ("finish", openai_reason, usage_or_None), ("error", ApiError). `citations` collects sources
    (dicts with `url`, maybe `title`), deduplicated by url; `unknown` counts ignored unknown codes/types.

    Exact at any split: a value cut by the end of the buffered text waits for more (`pending`), a
    value that can never become JSON is skipped to the next plausible row start, and every decision
    depends only on text that has arrived, so feeding the stream whole or byte by byte gives the same
    events. Job.on_tab_data relies on `side` and on `pending` being empty between whole rows."""

    __slots__ = ("side", "pending", "decoder", "citations", "tool_args", "finished", "unknown",
                 "mode", "_head", "_data_head", "_wait", "_urls", "routed_model")

    # Dialects (`mode`); None until the first bytes tell.
    ROWS, TYPED = "rows", "typed"

    # Codes and types the protocol lists that carry nothing the client sees; anything else not
    # handled is counted in `unknown` (LMArena adds codes without notice: counting shows it happened).
    IGNORED_CODES = frozenset("efbk89a")
    IGNORED_TYPES = frozenset(("start", "text-start", "text-end", "reasoning-start", "reasoning-end",
                               "start-step", "finish-step"))

    # `_value` results: the end index, or one of these.
    _WAIT, _BAD = -1, -2

    # A row head, after what may separate rows: SSE-style blank lines and `data: ` prefixes.
    # Always matches; group 2 is None when no row head follows the separators. The separators are
    # any mix of whitespace and `data:` so that a buffer ending inside them can drop what it has read
    # (the rest of the run continues the same pattern: exact at any split).
    _ROW_HEAD = re.compile(r'(?:[ \t\r\n\ufeff]|data:)*(?:([ab]?)([0-9A-Za-z]):[ \t]*)?')
    # Where to resume after text that is not a row: a line start, or a row head whose value starts
    # like a string/object/array (digits and `tfn` would resync inside prose). Whether a position
    # matches depends on at most 4 characters and a match is at least 3 long, so the first match
    # found in the buffer is also the first in any longer text (see `_resync`).
    _RESYNC = re.compile(r'\n|[ab]?[0-9A-Za-z]:["{\[]')
    _SPACE = re.compile(r'[ \t\r\n\ufeff]*')
    _HSPACE = re.compile(r'[ \t]*')
    # Tails of the buffer that json's errors leave when the text was only cut short (error position
    # onward): a cut \\uXXXX escape, a cut literal/sign (json also takes NaN and Infinity), and a number
    # whose fraction or exponent has not arrived (json stops the number before `.`/`e`).
    _CUT_ESCAPE = re.compile(r'u[0-9a-fA-F]{0,4}')
    _CUT_LITERAL = re.compile(r'-?(?:I(?:n(?:f(?:i(?:n(?:i(?:t)?)?)?)?)?)?)?|t(?:r(?:u)?)?'
                              r'|f(?:a(?:l(?:s)?)?)?|n(?:u(?:l)?)?|N(?:a)?')
    _CUT_NUMBER = re.compile(r'(?:[.eE][-+]?)?')
    # While a long string/object/array arrives in pieces (a base64 image, B's request echo), its
    # brackets and strings are followed through each new chunk only (`_track`), and the value is
    # parsed again only once it may have ended: linear, not quadratic, in its length.
    _OUTSIDE = re.compile(r'[^"\[\]{}\n]*')
    _IN_STRING = re.compile(r'[^"\\\n]*(?:\\[^\n][^"\\\n]*)*')
    _LINE = "line"                         # `_wait` of typed SSE: the rest of a line

    _raw_decode = staticmethod(json.JSONDecoder().raw_decode)

    def __init__(self, side: str = "a"):
        # Fixed for the stream
        self.side = side
        self._head = side + '0:"'          # our text delta, the row most streams are made of
        self._data_head = "data: " + self._head
        # Per-stream state
        self.mode = None
        self.pending = ""                  # text received but not parsed yet (an unfinished row)
        self._wait = None                  # what a non-empty `pending` waits for: see _still_waiting
        self.decoder = None                # UTF-8 decoder, made on the first bytes chunk
        self.citations: list[dict] = []
        self._urls: set[str] = set()
        self.tool_args: dict[str, str] = {}
        self.finished = False
        self.unknown = 0
        self.routed_model: str | None = None     # the model a router picked, when it says

    def feed(self, chunk) -> list:
        if type(chunk) is not str:
            if self.decoder is None:
                self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
            chunk = self.decoder.decode(chunk)
        if self.pending:
            if self._wait is not None and self._still_waiting(chunk):
                self.pending += chunk
                return []
            chunk = self.pending + chunk
        elif not chunk:
            return []
        events = []
        mode = self.mode or self._detect(chunk, False)
        if mode is self.ROWS:
            self.pending = self._rows(chunk, events, False)
        elif mode is self.TYPED:
            self.pending = self._lines(chunk, events, False)
        else:
            self.pending = chunk
        return events

    def close(self) -> list:
        """End of stream: parse what is left; a value still unfinished is dropped."""
        s = self.pending
        if self.decoder is not None:
            s += self.decoder.decode(b"", final=True)
        self.pending, self._wait = "", None
        events = []
        if s:
            if (self.mode or self._detect(s, True)) is self.ROWS:
                self._rows(s, events, True)
            else:
                self._lines(s, events, True)
        return events

    # -- dialect detection --

    def _detect(self, s: str, final: bool):
        """Typed SSE starts with `data: {` (or `data: [DONE]`) or an SSE comment; anything else is
        rows. Returns None while the first bytes cannot tell yet."""
        n = len(s)
        w = self._SPACE.match(s).end()
        if w == n:
            mode = self.ROWS if final else None
        elif s.startswith("data:", w):
            p = self._HSPACE.match(s, w + 5).end()
            if p == n:
                mode = self.ROWS if final else None
            else:
                mode = self.TYPED if s[p] in "{[" else self.ROWS
        elif s[w] == ":":
            mode = self.TYPED
        elif not final and n - w < 5 and "data:".startswith(s[w:]):
            mode = None
        else:
            mode = self.ROWS
        self.mode = mode
        return mode

    # -- dialects A and B: rows --

    def _rows(self, s: str, events: list, final: bool) -> str:
        """Parse rows from `s`; returns the unparsed rest (always "" when `final`)."""
        self._wait = None
        head, data_head, side = self._head, self._data_head, self.side
        n, i = len(s), 0
        while i < n:
            # Our own text delta, most of the stream: a C string scan, no regex. The general path
            # below reads these rows the same way; this only saves time.
            h = i + 3 if s.startswith(head, i) else i + 9 if s.startswith(data_head, i) else 0
            if h:
                try:
                    text, end = _scan_json_string(s, h + 1)
                except ValueError:
                    pass                       # cut or broken: the general path decides which
                else:
                    if text:
                        if text == "hasArenaError":
                            events.append(("error", self._arena_failed()))
                        else:
                            events.append(("text", s[h:end], text))
                    i = end + 1 if s.startswith("\n", end) else end
                    if i < n and s[i] in "\r\n":
                        i = self._SPACE.match(s, i).end()
                    continue
            m = self._ROW_HEAD.match(s, i)
            code = m.group(2)
            if code is None:
                k = self._not_a_row(s, m.end(), events, final)
                if k < 0:
                    return s[i:] if k == -1 else ""
                i = k
                continue
            j = m.end()
            value, end = self._value(s, j, final)
            if end >= 0:
                lane = m.group(1)
                if not lane or lane == side:    # a lane-less row is ours; the other lane's is not
                    self._row(code, value, s, j, end, events)
                i = end
            elif end == self._WAIT:
                if final:
                    log.debug("LMArena stream ended inside a row; dropped: %.200s", s[i:])
                    return ""
                if s[j:j + 1] in ('"', "{", "["):
                    self._wait = self._track(s, j, (0, False, False))
                return s[i:]
            else:
                k = self._resync(s, j, final)
                if k < 0:
                    return s[i:]
                log.debug("malformed LMArena row dropped: %.200s", s[i:k])
                i = k
        return ""

    def _not_a_row(self, s: str, w: int, events: list, final: bool) -> int:
        """Text at `w` that is no row head: a JSON object (B's request echo, an error body, a typed
        event) or other text (a Cloudflare page, ...). Returns where to go on, -1 to wait for more
        text, -2 when a final leftover was dropped."""
        n = len(s)
        if w >= n:
            return n
        c = s[w]
        if c == "{" or c == "[":
            value, end = self._value(s, w, final)
            if end >= 0:
                if isinstance(value, dict):
                    self._object(value, s[w:end], events)
                else:
                    log.debug("JSON array between LMArena rows ignored: %.200s", s[w:end])
                return end
            if end == self._WAIT:
                if final:
                    self._junk(s[w:], events)     # a cut error body is still an error
                    return -2
                self._wait = self._track(s, w, (0, False, False))
                return -1
        # Other text runs to the next plausible row start. A row head cut by the buffer's end (`a0`,
        # `data: a`) waits here too: no resync match can end inside it.
        k = self._resync(s, w + 1, final)
        if k < 0:
            return -1
        self._junk(s[w:k], events)
        return k

    def _resync(self, s: str, start: int, final: bool) -> int:
        """The next plausible row start at or after `start`; -1: none yet, wait for more text.
        A match found at k ends by k+4 inside the buffer, and every earlier position was ruled out
        by at most 4 characters, all before k+3: more text cannot put an earlier match in front."""
        m = self._RESYNC.search(s, start)
        if m is not None:
            return m.start()
        return len(s) if final else -1

    def _still_waiting(self, chunk: str) -> bool:
        """Whether `chunk` surely leaves the waiting value unfinished, so it need only be appended."""
        wait = self._wait
        if wait is self._LINE:
            return "\n" not in chunk
        wait = self._track(chunk, 0, wait)
        if wait is None:
            return False
        self._wait = wait
        return True

    def _track(self, s: str, pos: int, state):
        """Follow strings and brackets through s[pos:] from `state` (depth, in_string, escaped);
        the state at the end, or None once the value may have ended (its brackets closed) or broke
        (a raw newline, which JSON.stringify never writes: in dialect A it ends a broken row).
        A loop turn per quote or bracket, the text between is skipped by a regex."""
        depth, in_string, escaped = state
        n = len(s)
        if escaped and pos < n:
            pos += 1
            escaped = False
        while pos < n:
            if in_string:
                pos = self._IN_STRING.match(s, pos).end()
                if pos >= n:
                    break
                c = s[pos]
                if c == "\\" and pos + 1 == n:
                    escaped = True
                    break
                if c != '"':
                    return None
                in_string = False
                pos += 1
                if depth <= 0:
                    return None
            else:
                pos = self._OUTSIDE.match(s, pos).end()
                if pos >= n:
                    break
                c = s[pos]
                pos += 1
                if c == '"':
                    in_string = True
                elif c == "{" or c == "[":
                    depth += 1
                elif c == "\n":
                    return None
                else:
                    depth -= 1
                    if depth <= 0:
                        return None
        return depth, in_string, escaped

    def _value(self, s: str, j: int, final: bool):
        """One JSON value at s[j] -> (value, end), or (None, _WAIT) when the buffer ends before it
        does, or (None, _BAD) when no further text could make it JSON."""
        if j >= len(s):
            return None, self._WAIT
        c = s[j]
        try:
            if c == '"':
                return _scan_json_string(s, j + 1)
            value, end = self._raw_decode(s, j)
        except ValueError as e:
            return None, self._cut_or_bad(e, s)
        except RecursionError:
            return None, self._BAD
        if not final and c not in "{[" and type(value) in (int, float) \
                and self._CUT_NUMBER.fullmatch(s, end):
            return None, self._WAIT        # `12` / `1.` / `1e+` at the end: more digits may follow
        return value, end

    def _cut_or_bad(self, e: ValueError, s: str) -> int:
        """Whether json's error means "the text stops too early" (_WAIT) or "this is not JSON" (_BAD):
        json reports a cut value at the end of the buffer, or at the start of the cut token."""
        msg, pos = getattr(e, "msg", ""), getattr(e, "pos", 0)
        if msg.startswith("Unterminated string"):
            return self._WAIT               # only raised when the closing quote is past the end
        if msg.startswith("Invalid \\uXXXX"):
            return self._WAIT if self._CUT_ESCAPE.fullmatch(s, pos) else self._BAD
        if msg == "Expecting value":
            return self._WAIT if self._CUT_LITERAL.fullmatch(s, pos) else self._BAD
        if msg.startswith("Expecting"):     # a delimiter or a property name
            return self._WAIT if self._CUT_NUMBER.fullmatch(s, pos) else self._BAD
        return self._BAD                    # control character, bad escape, ...

    def _row(self, code: str, value, s: str, j: int, end: int, events: list) -> None:
        if code == "0":
            if isinstance(value, str) and value:
                if value == "hasArenaError":
                    events.append(("error", self._arena_failed()))
                else:
                    events.append(("text", s[j:end], value))
        elif code == "g":
            if isinstance(value, dict):
                value = value.get("text") or value.get("reasoning") or value.get("delta") or ""
            if isinstance(value, str) and value:
                events.append(("reasoning", value))
        elif code == "2":
            for part in value if isinstance(value, list) else [value]:
                if isinstance(part, dict) and part.get("type") == "image":
                    url = part.get("image") or part.get("url")
                    if not url and isinstance(part.get("data"), str) and part["data"]:
                        url = f"data:{part.get('mimeType') or 'image/png'};base64,{part['data']}"
                    if isinstance(url, str) and url:
                        events.append(("image", url))
                elif isinstance(part, dict) and part.get("type") == "routed_model":
                    # A router ("Max") names the model it picked (2.6): logged, never shown as text.
                    name = part.get("model") or part.get("modelName") or part.get("name")
                    if isinstance(name, (str, dict)):
                        self.routed_model = (name if isinstance(name, str) else
                                             str(name.get("publicName") or name.get("name") or name.get("id")))[:120]
        elif code == "3":
            events.append(("error", classify_upstream_error(value if isinstance(value, str)
                                                            else json.dumps(value))))
        elif code == "c":
            self._citation_delta(value)
        elif code == "d":
            value = value if isinstance(value, dict) else {}
            self._finish(value.get("finishReason"), value.get("usage"), events)
        elif code not in self.IGNORED_CODES:
            self.unknown += 1
            log.debug("LMArena row with unknown code %r ignored", code)

    # -- dialect C: typed server-sent events --

    def _lines(self, s: str, events: list, final: bool) -> str:
        """SSE lines (JSON.stringify never writes a raw newline, so a line is a whole event)."""
        n, i = len(s), 0
        while i < n:
            k = s.find("\n", i)
            if k < 0:
                if not final:
                    self._wait = self._LINE
                    return s[i:]
                k = n
            line = s[i:k]                   # a CRLF's "\r" stays: every use below tolerates it
            i = k + 1
            if line:
                self._line(line, events)
        return ""

    def _line(self, line: str, events: list) -> None:
        if line.startswith("data:"):
            payload = line[6:] if line.startswith("data: ") else line[5:]
            if payload[:1] == "{":
                try:
                    value = _json_decode(payload)
                except ValueError:
                    self._junk(payload, events)
                    return
                self._object(value, payload, events)
            elif payload.strip() == "[DONE]":
                return
            elif payload.strip():
                self._rows(payload, events, True)   # a row of dialect A sent as an SSE event
        elif line[0] == ":" or line.startswith(("event:", "id:", "retry:")):
            return                                   # SSE comment (keep-alive) and fields we need not
        else:
            self._junk(line, events)

    def _object(self, obj: dict, literal: str, events: list) -> None:
        """A whole JSON object outside a row: a typed event, B's request echo or an error body."""
        if "userMessage" in obj:
            return                                   # B's echo of our own request
        kind = obj.get("type")
        if isinstance(kind, str):
            self._typed(kind, obj, events)
        elif "error" in obj or "errors" in obj:
            events.append(("error", classify_upstream_error(literal)))
        else:
            log.debug("JSON object in LMArena stream ignored: %.200s", literal)

    def _typed(self, kind: str, obj: dict, events: list) -> None:
        if kind == "text-delta":
            delta = obj.get("delta", obj.get("textDelta"))
            if isinstance(delta, str) and delta:
                events.append(("text", None, delta))
        elif kind == "reasoning-delta":
            delta = obj.get("delta", obj.get("textDelta"))
            if isinstance(delta, str) and delta:
                events.append(("reasoning", delta))
        elif kind == "source-url":
            title = obj.get("title")
            self._add_source({"url": obj.get("url"), "title": title} if isinstance(title, str) and title
                             else {"url": obj.get("url")})
        elif kind == "file":
            url, media = obj.get("url"), obj.get("mediaType")
            if isinstance(url, str) and url and isinstance(media, str) and media.startswith("image/"):
                events.append(("image", url))
        elif kind == "finish":
            self._finish(obj.get("finishReason"), obj.get("usage"), events)
        elif kind == "error":
            text = obj.get("errorText")
            events.append(("error", classify_upstream_error(text if isinstance(text, str) and text
                                                            else json.dumps(obj))))
        elif kind not in self.IGNORED_TYPES and not kind.startswith("tool-"):
            self.unknown += 1
            log.debug("LMArena event of unknown type %r ignored", kind)

    # -- shared --

    def _finish(self, reason, usage, events: list) -> None:
        if not isinstance(reason, str) or not reason:
            reason = "stop"
        if reason == "error":
            events.append(("error", ApiError(502, "LMArena ended the answer with an error.",
                                             "upstream_error")))
            return
        self.finished = True
        events.append(("finish", FINISH_REASONS.get(reason, "stop"), usage))

    @staticmethod
    def _arena_failed() -> ApiError:
        return ApiError(502, "LMArena failed to answer this turn (hasArenaError). Try again or pick "
                        "another model.", "upstream_error")

    def _junk(self, text: str, events: list) -> None:
        """Text that is no row and no event: a Cloudflare page or an error body mean the answer
        failed; anything else is dropped."""
        stripped = text.strip()
        if not stripped:
            return
        if is_cloudflare(stripped):
            events.append(("error", classify_upstream_error(stripped, 403)))
            return
        if stripped[0] == "{":
            try:
                value = _json_decode(stripped)
            except ValueError:
                value = None
            if isinstance(value, dict):
                self._object(value, stripped, events)
                return
            if '"error"' in stripped:               # a cut or mangled JSON error body
                events.append(("error", classify_upstream_error(stripped)))
                return
        log.debug("non-LMArena text dropped: %.200s", stripped)

    def _citation_delta(self, value) -> None:
        """`ac` rows stream the citation tool's arguments as JSON text in pieces; a source is known
        once the pieces so far parse."""
        if not isinstance(value, dict) or value.get("toolCallId") != "citation-source":
            return
        delta = value.get("argsTextDelta")
        if not isinstance(delta, str):
            return
        acc = self.tool_args.get("citation", "") + delta
        try:
            obj = json.loads(acc)
        except ValueError:
            self.tool_args["citation"] = acc
            return
        self.tool_args.pop("citation", None)
        sources = obj.get("source") if isinstance(obj, dict) else None
        for src in sources if isinstance(sources, list) else [sources]:
            self._add_source(src)

    def _add_source(self, src) -> None:
        if isinstance(src, dict):
            url = src.get("url")
            if isinstance(url, str) and url and url not in self._urls:
                self._urls.add(url)
                self.citations.append(src)


# 8. The conversation ==============================================================================
#    OpenAI chat, Anthropic Messages and the Responses API describe the same things: system text, turns
#    with text and attachments, tools, tool calls and their results, stop strings, streaming or not.
#    Each API's section is a pair of pure translations: its request -> a Conversation, and the answer's
#    events -> its own output (a Reply subclass, section "Replies"). Everything that reaches LMArena is made
#    from the Conversation alone: its transcript (calls and results as text the model can read), folded
#    into one turn in create mode (fold_turns) or sent as a history in retry mode.


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """A tool call, in the history or read from an answer. `arguments` is compact JSON text for a
    function tool and the free-form text for a custom tool (`custom`)."""
    id: str
    name: str
    arguments: str
    custom: bool = False


@dataclasses.dataclass(slots=True)
class Turn:
    """One entry of a conversation. Roles: "system" (instructions at that point of the conversation,
    wherever they stand), "user", "assistant" (text and the calls it made), "tool" (a call's result)."""
    role: str
    text: str = ""
    files: list = dataclasses.field(default_factory=list)  # attachments {"name", "contentType", "url"}
    calls: tuple = ()                   # assistant: Call, in order
    call_id: str | None = None          # tool: the call it answers
    name: str | None = None             # tool: the tool's name, when known

    def fingerprint(self) -> str:
        """What identifies this turn for the continuation memory. An assistant turn is its text plus
        its calls (arguments canonical), so an answer we returned matches its echo from any client;
        its text without whitespace (answer_text_bytes), since clients drop a blank text part, and
        split or join text parts around the calls."""
        if self.role == "assistant":
            digest = hashlib.sha256(answer_text_bytes(self.text)).hexdigest()
            return "assistant|" + answer_fingerprint(digest, [(c.name, c.arguments, c.custom)
                                                              for c in self.calls])
        return json_text([self.role, self.text, [f.get("url") for f in self.files], self.call_id, self.name])


@dataclasses.dataclass(slots=True)
class Conversation:
    """A client's request in the bridge's own terms, whichever API it came through."""
    model: str
    turns: list
    tools: "ToolSpec | None" = None
    stream: bool = False
    stop: tuple = ()                    # stop strings, honoured on our side
    include_usage: bool = False         # OpenAI chat streaming: a usage chunk at the end
    options: object = None              # what one API asks beyond this (ResponsesOptions)


def answer_text_bytes(text: str) -> bytes:
    """An answer's text as the continuation memory compares it: without any whitespace. The same
    answer comes back from clients as one part or several, a whitespace-only part dropped
    (non-streaming answers leave it out before a call) or kept (streaming ones send it), parts
    joined with blank lines (Anthropic text blocks); only the visible characters are sure to stay."""
    return wire_bytes("".join(text.split()))


def check_turn_count(n: int, cfg: Config, what: str = "messages") -> None:
    if n > cfg.max_messages:
        raise ApiError(413, f"{n} {what} is more than this bridge accepts in one request "
                       f"({cfg.max_messages}, max_messages).", "request_too_large")


MAX_STOPS = 64                    # stop strings in one request (OpenAI takes 4; Anthropic more)


MAX_STOP_CHARS = 4096             # all stop strings together, in characters


def check_stop_bounds(stops, field: str) -> None:
    """A clear 400 for more stop strings than the bridge matches (each delta is checked against
    all of them, on the event loop): MAX_STOPS strings, MAX_STOP_CHARS characters in all."""
    if len(stops) > MAX_STOPS:
        raise _bad(f"'{field}' has {len(stops)} strings; this bridge accepts at most {MAX_STOPS}.")
    if sum(len(s) for s in stops) > MAX_STOP_CHARS:
        raise _bad(f"'{field}' is longer than this bridge accepts ({MAX_STOP_CHARS} characters in all).")


# -- Attachments: data: or http(s) URLs -> {"name", "contentType", "url"} --------------------------

_DATA_URL_RE = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*?)(;base64)?,", re.I)


_AUDIO_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg",
                "m4a": "audio/mp4", "webm": "audio/webm", "aac": "audio/aac", "pcm16": "audio/wav"}


def decoded_size(data_url: str) -> int:
    """Bytes a data URL decodes to (base64 counted without decoding it)."""
    m = _DATA_URL_RE.match(data_url)
    if not m:
        return len(data_url)
    payload = len(data_url) - m.end()
    if m.group(3):
        pad = data_url.endswith("==") + data_url.endswith("=")
        return payload * 3 // 4 - pad
    return payload


def _extension_for(mime: str) -> str:
    special = {"image/jpeg": "jpg", "audio/mpeg": "mp3", "text/plain": "txt", "image/svg+xml": "svg"}
    if mime in special:
        return special[mime]
    ext = mimetypes.guess_extension(mime or "") or ""
    return ext.lstrip(".") or "bin"


class Attachments:
    """Makes the attachments of one request: numbered in order, each checked against the size limit."""

    __slots__ = ("limit", "counter")

    def __init__(self, limit: int):
        self.limit, self.counter = limit, itertools.count(1)

    def add(self, url: str, name: str | None, mime: str | None, kind: str, ext: str | None = None) -> dict:
        index, limit = next(self.counter), self.limit
        if url.startswith("data:"):
            m = _DATA_URL_RE.match(url)
            if not m:
                raise ApiError(400, f"{kind} attachment {index}: malformed data URL", "invalid_attachment")
            if name and not m.group(1) and not mime:
                mime = mimetypes.guess_type(name)[0]
            mime = mime or m.group(1) or "application/octet-stream"
            size = decoded_size(url)
            if size > limit:
                raise ApiError(413, f"Attachment {name or index} is {size / 2**20:.1f} MiB; LMArena accepts at "
                               f"most {limit / 2**20:.1f} MiB per file (max_attachment_bytes).",
                               "attachment_too_large")
        elif url.startswith(("http://", "https://")):
            guess = mimetypes.guess_type(urllib.parse.urlsplit(url).path)[0]
            mime = mime or guess or ("image/png" if kind == "image" else "application/octet-stream")
            if not name:
                base = os.path.basename(urllib.parse.urlsplit(url).path)
                name = base if "." in base else None
        else:
            raise ApiError(400, f"{kind} attachment {index}: expected a data: or http(s): URL",
                           "invalid_attachment")
        if not name:
            name = f"{kind}_{index}.{ext or _extension_for(mime)}"
        return {"name": name, "contentType": mime, "url": url}

    def file(self, data: str, name: str | None) -> dict:
        """A file given as a data URL or bare base64 (its type guessed from the name)."""
        if not data.startswith("data:"):
            mime = (mimetypes.guess_type(name)[0] if name else None) or "application/octet-stream"
            data = f"data:{mime};base64,{data}"
        return self.add(data, name, None, "file")


# -- The transcript: turns as the text LMArena gets ---------------------------------------------

def _attr(value: str) -> str:
    return html.escape(value, quote=True)


def call_block(call: Call) -> str:
    """The block the model is asked to write for a call; used to show it its own earlier calls."""
    if call.custom:
        body = {"name": call.name, "input": call.arguments}
    else:
        body = {"name": call.name, "arguments": _arguments_value(call.arguments)}
    return f"{TOOL_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{TOOL_CLOSE}"


def _arguments_value(text: str):
    """A call's arguments text as the JSON value to show in a block (clients send "" for none)."""
    if not text.strip():
        return {}
    try:
        return _loads(text)
    except ValueError:
        return text             # shown as a JSON string: the model still sees what it sent


def transcript(turns: list) -> list[dict]:
    """Turns -> templates ({"role", "content", "attachments"}; roles system/user/assistant).

    An assistant turn's calls become `<tool_call>` blocks after its text, so the model sees its own
    format; a run of tool results becomes one user message of `<tool_result name=".." id="..">`
    blocks (they answer one assistant turn). A user turn is never empty (LMArena refuses that)."""
    out: list[dict] = []
    results: list[str] = []
    result_files: list = []

    def flush():
        if results:
            out.append({"role": "user", "content": "\n".join(results), "attachments": result_files[:]})
            results.clear()
            result_files.clear()

    for t in turns:
        if t.role == "tool":
            attrs = (f' name="{_attr(t.name)}"' if t.name else "") + (f' id="{_attr(t.call_id)}"'
                                                                      if t.call_id else "")
            results.append(f"<tool_result{attrs}>\n{t.text}\n</tool_result>")
            result_files.extend(t.files)
            continue
        flush()
        text = t.text
        if t.calls:
            text = "\n\n".join(s for s in (text.strip(), "\n".join(call_block(c) for c in t.calls)) if s)
        elif t.role == "user" and (not text or (not text.strip() and not t.files)):
            text = " "
        out.append({"role": t.role, "content": text, "attachments": list(t.files)})
    flush()
    return out


# -- A conversation ready for LMArena ------------------------------------------------------------

@dataclasses.dataclass(slots=True)
class ChatRequest:
    """A Conversation with what LMArena needs: the model's id and modality, the transcript, the
    tool instructions, and the prompt's size. Fingerprints (the continuation memory's keys) are made
    only when asked for: most requests never need them."""
    conv: Conversation
    model: str
    ref: ModelRef
    stream: bool
    templates: list         # transcript(turns): role/content/attachments
    tools: "ToolSpec | None"
    tools_prompt: str       # "" without tools
    stop: tuple
    prompt_chars: int
    _fingerprints: list | None = None

    @property
    def turns(self) -> list:
        return self.conv.turns

    @property
    def fingerprints(self) -> list:
        if self._fingerprints is None:
            self._fingerprints = [t.fingerprint() for t in self.conv.turns]
        return self._fingerprints


@dataclasses.dataclass(frozen=True)
class ClientApi:
    """One client API, as Routes.route_chat sees it: its request -> a Conversation, the Reply that
    renders an answer for it, and the shape of its errors. (The Responses API has a route of its
    own: previous_response_id needs the kept responses before the translation.)"""
    name: str
    conversation: typing.Callable       # (request JSON, Config) -> Conversation
    reply: typing.Callable              # (ChatRequest) -> Reply
    error_body: typing.Callable         # (ApiError) -> dict


def prepare(conv: Conversation, cfg: Config, models: dict, mapped=()) -> ChatRequest:
    """Resolve the model and render the transcript (pure; may run in a thread). In create mode a
    name not in models.json (nor a captured session's, `mapped`) is a 404 before anything is sent."""
    strict = cfg.strict_models or (cfg.session_mode == "create" and conv.model not in mapped)
    ref = resolve_model(conv.model, models, strict)
    templates = transcript(conv.turns)
    prompt = tool_prompt(conv.tools) if conv.tools else ""
    chars = len(prompt) + sum(len(t["content"]) + 4 * _ATTACHMENT_TOKENS * len(t["attachments"])
                              for t in templates)
    return ChatRequest(conv, conv.model, ref, conv.stream, templates, conv.tools, prompt, conv.stop, chars)


def chain_digests(head: str, fingerprints: list) -> list[str]:
    """d[i] identifies the first i turns (and the model and tools, in `head`): one running hash,
    read after each turn."""
    h = hashlib.sha256(wire_bytes(head))
    out = [h.hexdigest()]
    for fp in fingerprints:
        h.update(wire_bytes("\n" + fp))
        out.append(h.hexdigest())
    return out


def answer_fingerprint(content_digest: str, calls: list) -> str:
    """An answer's text digest and its calls ((name, arguments, custom) each), arguments canonical."""
    canon = [(name, args if custom else canonical_arguments(args)) for name, args, custom in calls]
    return content_digest + ("|" + json_text(canon) if canon else "")


def canonical_arguments(arguments) -> str:
    try:
        value = _loads(arguments) if isinstance(arguments, str) else arguments
        return _canonical_json(value)
    except (ValueError, TypeError, RecursionError):
        return str(arguments)


# 9. Tools in the prompt, and calls read back ======================================================

TOOL_OPEN = "<tool_call>"


TOOL_CLOSE = "</tool_call>"


_TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


# How many tokens an image or file counts for in count_input_tokens: base64 length says nothing
# about what a model charges for a picture, and ~1000 is in the range Anthropic documents.
_ATTACHMENT_TOKENS = 1000


# -- OpenAI tools in the request ---------------------------------------------------------------

class Tool(typing.NamedTuple):
    """One tool offered to the model. A custom tool (the Responses API's) takes free-form text,
    optionally described by a grammar (lark or regex), instead of JSON arguments."""
    name: str
    description: str
    parameters: dict | None
    custom: bool = False
    grammar: str | None = None


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """The validated tools of one request. `choice` is "auto", "required" or a tool's name."""
    tools: tuple            # Tool, in the client's order
    choice: str
    parallel: bool
    names: frozenset
    legacy: bool = False    # sent as `functions`: the answer uses `function_call`, one call at most


def tool_spec(tools: list, choice: str, parallel: bool, legacy: bool = False,
              field: str = "tool_choice") -> ToolSpec | None:
    """Every API's tools end here. None means "send no tool description": no tools, or choice
    "none". The caller then runs no ToolCallReader either (a model imitating the format would
    otherwise make calls the client never offered); the history still shows earlier calls."""
    names: set = set()
    for t in tools:
        if t.name in names:
            raise _bad(f"'tools' holds two functions named {t.name!r}; names must be unique.")
        names.add(t.name)
    if not tools:
        if choice not in ("auto", "none"):
            raise _bad(f"'{field}' asks for a tool call but the request has no 'tools'.")
        return None
    if choice == "none":
        return None
    return ToolSpec(tuple(tools), choice, parallel and not legacy, frozenset(names), legacy)


# -- Tools in the prompt -----------------------------------------------------------------------

# JSON Schema keywords that only help validators: left out of the description the model reads.
_SCHEMA_NOISE = frozenset(("$schema", "$id", "additionalProperties", "title", "examples", "$comment",
                           "strict", "unevaluatedProperties", "propertyNames"))
SCHEMA_MAX_DEPTH = 8                  # deeper parts of a schema are summarised as "object"
SCHEMA_MAX_CHARS = 1_000_000          # argument lines of one request's tools at most (schema_lines)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _schema_type(schema: dict, defs: dict, depth: int) -> str:
    """A schema's type in words: "string", "array of integer", "one of: string | null", ..."""
    if "$ref" in schema and isinstance(schema["$ref"], str):
        name = schema["$ref"].rsplit("/", 1)[-1]
        target = defs.get(name)
        return _schema_type(target, defs, depth + 1) if isinstance(target, dict) and depth < 3 else name
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            if depth >= 2:              # nested choices (8 options each) would multiply: say it in words
                return "one of several types"
            return "one of: " + " | ".join(_schema_type(o, defs, depth + 1) if isinstance(o, dict) else "?"
                                           for o in options[:8])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = " or ".join(str(k) for k in kind)
    elif not isinstance(kind, str):
        kind = "object" if "properties" in schema else ("any" if "enum" not in schema else "value")
    if kind == "array" and isinstance(schema.get("items"), dict):
        kind = "array" if depth >= SCHEMA_MAX_DEPTH else "array of " + _schema_type(schema["items"], defs, depth + 1)
    return kind


def _schema_facts(schema: dict) -> str:
    """Enum values, defaults and bounds, the facts a model needs to fill a value in."""
    facts = []
    if isinstance(schema.get("enum"), list):
        facts.append("one of " + ", ".join(json_text(v) for v in schema["enum"][:40]))
    if "const" in schema:
        facts.append("always " + json_text(schema["const"]))
    if "default" in schema:
        facts.append("default " + json_text(schema["default"]))
    for key, word in (("minimum", "min"), ("maximum", "max"), ("minLength", "min length"),
                      ("maxLength", "max length"), ("minItems", "min items"), ("maxItems", "max items"),
                      ("pattern", "pattern"), ("format", "format")):
        if key in schema and not isinstance(schema[key], (dict, list)):
            facts.append(f"{word} {schema[key]}")
    return "; ".join(facts)


def schema_defs(schema: dict) -> dict:
    """The named subschemas a `$ref` may point at ($defs and definitions; objects only)."""
    return {k: v for key in ("$defs", "definitions") if isinstance(schema.get(key), dict)
            for k, v in schema[key].items() if isinstance(v, dict)}


def schema_lines(schema, defs: dict | None = None, indent: str = "", depth: int = 0,
                 budget: list | None = None, path: tuple = ()) -> list[str]:
    """An object schema as one line per parameter: `- name (type, required): description; facts`,
    nested objects indented. Every parameter, type, enum and required flag stays; JSON noise goes.
    A `$ref` is expanded where it is used, but never inside itself; `budget` ([characters left],
    shared by all the tools of a request) stops the lines there: a few hundred bytes of $refs that
    fan out would otherwise make billions of lines (on the event loop)."""
    if not isinstance(schema, dict):
        return []
    top = budget is None
    if top:
        budget = [SCHEMA_MAX_CHARS]
    defs = defs if defs is not None else schema_defs(schema)
    props = schema.get("properties")
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        props = schema["items"].get("properties")
        schema = schema["items"]
    if not isinstance(props, dict):
        return []
    required = schema.get("required") if isinstance(schema.get("required"), list) else ()
    required = {r for r in required if isinstance(r, str)}
    out = []
    for name, sub in props.items():
        if budget[0] <= 0:
            break
        if not isinstance(sub, dict):
            sub = {}
        target, ref = sub, None
        if isinstance(sub.get("$ref"), str):
            ref = sub["$ref"].rsplit("/", 1)[-1]
            target = defs.get(ref, sub)
        head = f"{indent}- {name} ({_schema_type(sub, defs, 0)}{', required' if name in required else ''})"
        desc = sub.get("description") or (target.get("description") if target is not sub else None)
        tail = [_one_line(desc)] if isinstance(desc, str) and desc.strip() else []
        facts = _schema_facts(target)
        if facts:
            tail.append(facts)
        out.append(head + (": " + "; ".join(tail) if tail else ""))
        budget[0] -= len(out[-1]) + 1
        if depth < SCHEMA_MAX_DEPTH and ref not in path:
            out += schema_lines(target, defs, indent + "  ", depth + 1, budget, path + (ref,) if ref else path)
    extra = {k for k in schema if k not in _SCHEMA_NOISE and k not in (
        "type", "properties", "required", "description", "$defs", "definitions", "items")}
    if depth == 0 and "anyOf" in extra | {k for k in schema if k == "oneOf"}:
        try:
            shapes = json_text({k: schema[k] for k in ('anyOf', 'oneOf') if k in schema})
        except (ValueError, RecursionError):
            shapes = "(too deeply nested to show)"
        out.append(f"{indent}(the arguments must match one of several shapes: {_one_line(shapes[:2000])[:400]})")
    if top and budget[0] <= 0:
        out.append(f"{indent}(further arguments not listed: the schema is too large to describe in full)")
    return out


def tool_prompt(spec: ToolSpec) -> str:
    """Instructions placed before the conversation: the tools, the call format, when to call. Each
    tool's arguments are listed one per line (schema_lines) rather than as JSON Schema: the same
    facts in about a third of the characters, which the model reads more easily too."""
    lines = ["# Tools", "",
             "You can call the following tools. Each is listed with its name, what it does, and its "
             "arguments.", ""]
    custom = False
    budget = [SCHEMA_MAX_CHARS]         # for the argument lines of all the tools together
    for t in spec.tools:
        lines.append(f"## {t.name}")
        if t.description.strip():
            lines.append(t.description.strip())
        if t.custom:
            custom = True
            lines.append("Input: free-form text (not JSON arguments)" + (
                ", following this grammar:\n" + t.grammar if t.grammar else "."))
        else:
            args = schema_lines(t.parameters, budget=budget)
            if budget[0] <= 0:
                args.append("(further arguments not listed: the tools' schemas are too large to describe in full)")
            lines += ["Arguments:", *args] if args else ["Arguments: none ({})."]
        lines.append("")
    lines += [
        "# How to call a tool", "",
        "To call a tool, write a block in exactly this format:",
        TOOL_OPEN,
        '{"name": "<tool name>", "arguments": {...}}',
        TOOL_CLOSE, "",
        "- Inside the block: one JSON object, nothing else. \"arguments\" is a JSON object with the "
        "tool's arguments (use {} when it takes none).",
    ]
    if custom:
        lines.append("- A tool with free-form input takes {\"name\": \"<tool name>\", \"input\": \"<the whole "
                     "input as one JSON string>\"} instead of \"arguments\".")
    lines += [
        "- Write one block per call." + (
            " To call several tools at once, write several blocks one after another."
            if spec.parallel else
            " Call at most one tool per answer: never write more than one block."),
        "- Text outside the blocks is your normal reply, shown to the user as usual. Do not put "
        "the blocks in a code fence, and do not show them as an example.",
        "- After your tool call block(s), stop writing and wait. The results will come back in "
        "the next message as <tool_result name=\"...\" id=\"...\">...</tool_result> blocks. Never "
        "write a <tool_result> block yourself and never guess a result.", "",
    ]
    if spec.choice == "auto":
        lines.append("Call a tool when it helps you answer; otherwise answer normally, with no "
                     "block.")
    elif spec.choice == "required":
        lines.append("In this answer you MUST call at least one tool.")
    else:
        lines.append(f"In this answer you MUST call the tool \"{spec.choice}\".")
    return "\n".join(lines)


# -- Reading calls out of the model's text -----------------------------------------------------

def _held_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (0 if none)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _strip_fence(s: str) -> str | None:
    """```json ... ``` (or a bare ```) around the JSON -> the JSON; None for any other fence."""
    nl = s.find("\n")
    if nl < 0 or s[3:nl].strip().lower() not in ("", "json"):
        return None
    s = s[nl + 1:].rstrip()
    return s[:-3].strip() if s.endswith("```") else None


def parse_call_block(inner: str, names: frozenset, custom: frozenset = frozenset()) -> tuple[str, str] | None:
    """The text between the tags -> (name, arguments as compact JSON text; a custom tool's input
    text), or None (stays text)."""
    s = inner.strip()
    if s.startswith("```"):
        s = _strip_fence(s)
        if s is None:
            return None
    try:
        obj = _loads(s)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    if name in custom:                  # free-form input: "input" (or what a model calls it)
        for key in ("input", "arguments", "parameters"):
            if key in obj:
                value = obj[key]
                return name, value if isinstance(value, str) else json_text(value)
        return name, ""
    args = {}
    for key in ("arguments", "parameters", "input"):     # models borrow other APIs' spellings
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):           # OpenAI's own wire form: the object encoded as a string
        if not args.strip():
            args = {}
        else:
            try:
                args = _loads(args)
            except ValueError:
                return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return name, json_text(args)


class ToolCallReader:
    """Splits the model's streamed text into ("text", s) and ("tool_call", call) events.

    call = {"id", "name", "arguments": "<compact JSON text>"}. No character of a recognised block
    ever reaches a text event, whatever the chunking: outside a block only a suffix that could
    still grow into "<tool_call>" is held back, everything else goes out at once. A block that
    names an unknown tool, holds invalid JSON, or is never closed (at close(), or because another
    "<tool_call>" starts first) goes out as text, verbatim, tags included: the user then sees what
    the model wrote instead of losing it.

    parallel=False (parallel_tool_calls false): only the first valid call is kept; later valid
    blocks are dropped entirely (neither calls nor text), since the model was told to make one
    call and the block is not meant for the user. `done` becomes True with that first call, so
    the caller may stop reading the upstream there.
    """

    __slots__ = ("names", "custom", "id_prefix", "parallel", "pending", "in_block", "parts", "tail", "count",
                 "closed")

    def __init__(self, names: frozenset, id_prefix: str = "call_", *, parallel: bool = True,
                 custom: frozenset = frozenset()):
        self.names, self.id_prefix, self.parallel = frozenset(names), id_prefix, parallel
        self.custom = custom      # names of free-form tools: their calls carry "input" text
        self.pending = ""         # outside a block: at most len(TOOL_OPEN) - 1 held characters
        self.in_block = False
        self.parts: list[str] = []  # inside a block: its text so far, as chunks (no quadratic joins)
        self.tail = ""            # inside a block: the last few characters, to find split tags
        self.count = 0            # valid calls seen, kept or not
        self.closed = False

    @property
    def done(self) -> bool:
        return not self.parallel and self.count > 0

    def new_id(self) -> str:
        return self.id_prefix + secrets.token_hex(12)

    def feed(self, text: str) -> list:
        events: list = []
        while text:
            if not self.in_block:
                buf = self.pending + text
                text = ""
                at = buf.find(TOOL_OPEN)
                if at >= 0:
                    self._text(events, buf[:at])
                    self.pending, self.in_block, self.parts, self.tail = "", True, [], ""
                    text = buf[at + len(TOOL_OPEN):]
                    continue
                keep = _held_suffix(buf, TOOL_OPEN)
                self._text(events, buf[:len(buf) - keep])
                self.pending = buf[len(buf) - keep:]
            else:
                window = self.tail + text
                close, reopen = window.find(TOOL_CLOSE), window.find(TOOL_OPEN)
                if close < 0 and reopen < 0:
                    self.parts.append(text)
                    self.tail = window[-(len(TOOL_CLOSE) - 1):]
                    text = ""
                    continue
                whole = "".join(self.parts) + text
                base = len(whole) - len(window)     # where the window starts inside `whole`
                if close >= 0 and (reopen < 0 or close < reopen):
                    inner = whole[:base + close]
                    text = whole[base + close + len(TOOL_CLOSE):]
                    self._block(events, inner)
                else:                   # a new block starts before this one closed: abandon it
                    self._text(events, TOOL_OPEN + whole[:base + reopen])
                    text = whole[base + reopen:]
                self.in_block, self.parts, self.tail = False, [], ""
        return events

    def close(self) -> list:
        """End of the answer: whatever is held back goes out as text."""
        events: list = []
        if not self.closed:
            self.closed = True
            if self.in_block:
                self._text(events, TOOL_OPEN + "".join(self.parts))
            else:
                self._text(events, self.pending)
            self.pending, self.in_block, self.parts, self.tail = "", False, [], ""
        return events

    def _text(self, events: list, s: str) -> None:
        if not s:
            return
        if events and events[-1][0] == "text":
            events[-1] = ("text", events[-1][1] + s)
        else:
            events.append(("text", s))

    def _block(self, events: list, inner: str) -> None:
        parsed = parse_call_block(inner, self.names, self.custom)
        if parsed is None:
            self._text(events, TOOL_OPEN + inner + TOOL_CLOSE)
            return
        self.count += 1
        if self.parallel or self.count == 1:
            call = {"id": self.new_id(), "name": parsed[0], "arguments": parsed[1]}
            if parsed[0] in self.custom:
                call["custom"] = True
            events.append(("tool_call", call))


class StopSequenceFilter:
    """Cuts the answer at the first stop sequence, across chunk boundaries.

    feed(text) -> (text to emit now, the stop sequence hit or None). Only a suffix that could be
    the start of a stop sequence is held back. "First" means the one whose end comes first (what
    a model stopping token by token would do; ties go to the one starting earlier), which makes
    the result the same however the text is split. After a hit everything else is dropped.
    All stops are matched in one pass: one regex alternation, shortest first (so at a start the
    match found ends first), narrowed to earlier ends; the held suffix is looked up in the sorted
    stops (a proper prefix of a stop sorts right before it), so a delta costs O(its length), not
    O(stops x length) (MAX_STOPS and MAX_STOP_CHARS bound the rest).
    """

    __slots__ = ("stops", "held", "hit", "_rx", "_sorted", "_firsts", "_longest")

    def __init__(self, stops):
        self.stops = tuple(dict.fromkeys(s for s in (stops or ()) if s))
        self.held = ""
        self.hit: str | None = None
        by_len = sorted(self.stops, key=len)
        self._rx = re.compile("|".join(re.escape(s) for s in by_len)) if by_len else None
        self._sorted = sorted(self.stops)
        self._firsts = frozenset(s[0] for s in self.stops)
        self._longest = len(by_len[-1]) if by_len else 0

    def feed(self, text: str) -> tuple[str, str | None]:
        if self.hit is not None:
            return "", None
        if not self.stops:
            return text, None
        buf = self.held + text
        best = self._rx.search(buf)
        if best is not None:
            while True:                             # a later start may still end earlier
                m = self._rx.search(buf, best.start() + 1, best.end() - 1)
                if m is None:
                    break
                best = m
            self.hit, self.held = best.group(), ""
            return buf[:best.start()], self.hit
        keep = 0
        for p in range(max(0, len(buf) - self._longest + 1), len(buf)):
            if buf[p] in self._firsts:
                tail = buf[p:]
                i = bisect.bisect_left(self._sorted, tail)
                if i < len(self._sorted) and self._sorted[i].startswith(tail):
                    keep = len(buf) - p
                    break
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], None

    def close(self) -> str:
        rest, self.held = self.held, ""
        return "" if self.hit is not None else rest


# 10. Replies ======================================================================================

def estimate_tokens(chars: int) -> int:
    """A rough estimate (about 4 characters per token); LMArena's own usage wins when it sends one."""
    return (chars + 3) // 4


def citations_markdown(sources: list[dict]) -> str:
    lines = []
    for s in sources:
        title = s.get("title")
        lines.append(f"- [{title}]({s['url']})" if isinstance(title, str) and title else f"- {s['url']}")
    return "\n\nSources:\n" + "\n".join(lines)


def image_markdown(url: str) -> str:
    return f"![Image]({url})"


class Reply:
    """Answer events -> one API's output: stream text while streaming, or the collected answer.
    Text passes the stop-sequence filter, then (with tools) the tool-call reader, so no part of a
    <tool_call> block leaks as text; subclasses only say how text, reasoning and calls look."""

    id_prefix = "call_"

    def __init__(self, model: str, stream: bool, prompt_chars: int, tools=None, stop=None):
        self.model, self.stream, self.prompt_chars = model, stream, prompt_chars
        self.reader = ToolCallReader(tools.names, self.id_prefix, parallel=tools.parallel,
                                     custom=frozenset(t.name for t in tools.tools if t.custom)) if tools else None
        self.stopper = StopSequenceFilter(stop) if stop else None
        self.stop_hit: str | None = None
        self.on_stop = None                     # called once when a stop sequence ends the answer
        self.texts: list[str] = []
        self.thoughts: list[str] = []
        self.calls: list[dict] = []
        self.answer = hashlib.sha256()          # of the text returned: the continuation key
        self.run: list[tuple] = []              # streamed pieces of one kind not formatted yet
        self.run_kind: str | None = None

    def render(self, events: list) -> str:
        out: list[str] = []
        for ev in events:
            if ev[0] == "text":
                self._text(ev[2], ev[1], out)
            elif ev[0] == "reasoning" and self.stop_hit is None:
                if self.stream:
                    self._run(out, "reasoning", ev[1], None)
                else:
                    self.thoughts.append(ev[1])
        self._flush(out)
        return "".join(out)

    def _run(self, out: list, kind: str, text: str, literal: str | None) -> None:
        """Streamed text (or reasoning) that arrives in one burst goes out as one delta: a client
        parses one chunk per burst instead of one per token, and so does the bridge format one."""
        if kind != self.run_kind:
            self._flush(out)
            self.run_kind = kind
        self.run.append((text, literal))

    def _flush(self, out: list) -> None:
        run = self.run
        if not run:
            return
        text = run[0][0] if len(run) == 1 else "".join([t for t, _ in run])
        if self.run_kind == "text":
            self.answer.update(answer_text_bytes(text))
            out.append(self.fmt_text(text, run))
        else:
            out.append(self.fmt_reasoning(text))
        run.clear()

    def _text(self, text: str, literal: str | None, out: list) -> None:
        if self.stopper is not None:
            if self.stop_hit is not None:
                return
            cut, hit = self.stopper.feed(text)
            if cut != text:
                text, literal = cut, None
            if hit is not None:
                self.stop_hit = hit
                if self.on_stop is not None:
                    self.on_stop()
        if self.reader is None:
            self._emit(text, literal, out)
            return
        for ev in self.reader.feed(text):
            if ev[0] == "text":
                self._emit(ev[1], None, out)
            else:
                self.calls.append(ev[1])
                if self.stream:
                    self._flush(out)
                    out.append(self.fmt_call(len(self.calls) - 1, ev[1]))

    def _emit(self, text: str, literal: str | None, out: list) -> None:
        if not text:
            return
        if self.stream:
            self._run(out, "text", text, literal)
        else:
            self.answer.update(answer_text_bytes(text))
            self.texts.append(text)

    def _held(self, out: list) -> None:
        """The end of the answer: text held back in case it began a stop sequence or a block."""
        if self.stopper is not None:
            rest = self.stopper.close()
            self.stopper = None
            if rest:
                self._text(rest, None, out)
        if self.reader is not None:
            for ev in self.reader.close():
                self._emit(ev[1], None, out)
            self.reader = None

    def finish_reason(self, job: "Job") -> str:
        return "tool_calls" if self.calls else ("stop" if self.stop_hit else job.finish_reason)

    def closing(self, job: "Job") -> str:
        out: list[str] = []
        if not job.error:
            self._held(out)
        self._flush(out)
        out.append(self.fmt_end(job))
        return "".join(out)

    def answer_key(self) -> str:
        """What a client will send back as this answer, for the continuation memory."""
        return answer_fingerprint(self.answer.hexdigest(),
                                  [(c["name"], c["arguments"], c.get("custom", False)) for c in self.calls])

    def headers(self) -> list:
        return []


# 11. OpenAI chat completions ======================================================================

# -- Request: /v1/chat/completions -> Conversation -----------------------------------------------

def content_parts(content, where: str) -> list:
    """Message content as a list of parts: None is none, a string or one object is one."""
    if content is None:
        return []
    if isinstance(content, (str, dict)):
        return [content]
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of parts", "invalid_content")
    return content


def _object_field(part: dict, key: str, where: str) -> dict:
    value = part.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"{where}.{key} must be an object", "invalid_content")
    return value


def content_to_text(content, files: Attachments, where: str = "content") -> tuple[str, list]:
    """OpenAI message content (a string or a list of parts: text, image_url, input_audio, file,
    refusal; the Responses API's input_text, output_text, input_image, input_file too) -> (text,
    attachments). Several text parts are joined with a blank line."""
    if isinstance(content, str):
        return content, []
    texts, found = [], []
    for i, part in enumerate(content_parts(content, where)):
        at = f"{where}[{i}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise ApiError(400, f"{at} must be an object", "invalid_content")
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text"):
            text = part.get("text")
            if text is not None and not isinstance(text, str):
                raise ApiError(400, f"{at}.text must be a string", "invalid_content")
            texts.append(text or "")
        elif kind in ("image_url", "input_image"):
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise ApiError(400, f"{at}.image_url{'.url' if kind == 'image_url' else ''} must be a string "
                               "(a data: or http(s) URL)", "invalid_content")
            found.append(files.add(url, None, None, "image"))
        elif kind == "input_audio":
            audio = _object_field(part, "input_audio", at)
            data, fmt = audio.get("data"), audio.get("format") or "wav"
            if not isinstance(data, str):
                raise ApiError(400, f"{at}.input_audio.data must be a base64 string", "invalid_content")
            if not isinstance(fmt, str) or not re.fullmatch(r"[A-Za-z0-9]{1,10}", fmt):
                raise ApiError(400, f"{at}.input_audio.format must be a short name like \"wav\"",
                               "invalid_content")
            fmt = fmt.lower()
            mime = _AUDIO_TYPES.get(fmt, f"audio/{fmt}")
            url = data if data.startswith("data:") else f"data:{mime};base64,{data}"
            found.append(files.add(url, None, mime, "audio", "wav" if fmt == "pcm16" else fmt))
        elif kind in ("file", "input_file"):
            f = _object_field(part, "file", at) if kind == "file" else part
            data, name = f.get("file_data"), f.get("filename")
            if not isinstance(data, str):
                raise ApiError(400, f"{at}{'.file' if kind == 'file' else ''}.file_data must be a string (a data "
                               "URL or base64); file_id is not supported", "invalid_content")
            if name is not None and not isinstance(name, str):
                raise ApiError(400, f"{at}.file.filename must be a string", "invalid_content")
            found.append(files.file(data, name))
        elif kind == "refusal":
            refusal = part.get("refusal")
            texts.append(refusal if isinstance(refusal, str) else "")
        else:
            raise ApiError(400, f"{at}: unsupported content part type {shown(kind, 40)}", "invalid_content")
    return "\n\n".join(t for t in texts if t) if len(texts) > 1 else "".join(texts), found


def _history_call(fn, field: str, call_id) -> Call:
    """A call in the history (`tool_calls[k].function` or the legacy `function_call`)."""
    if not isinstance(fn, dict):
        raise _bad(f"'{field}' must be an object with 'name' and 'arguments'.")
    name, args = fn.get("name"), fn.get("arguments", "")
    if not isinstance(name, str) or not name:
        raise _bad(f"'{field}.name' must be a string (got {_describe(name)}).")
    if not isinstance(args, str):
        raise _bad(f"'{field}.arguments' must be a string of JSON (got {_describe(args)}).")
    return Call(call_id or "", name, args)


def openai_turns(messages: list, files: Attachments) -> list:
    """OpenAI chat messages -> turns. developer is system; tool (and legacy function) messages are
    results, named after the call they answer; an assistant's tool_calls are its calls."""
    names_by_id: dict[str, str] = {}
    turns: list[Turn] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ApiError(400, f"messages[{i}] must be an object", "invalid_messages")
        role, where = msg.get("role"), f"messages[{i}].content"
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str):
                raise _bad(f"'messages[{i}].tool_call_id' must be a string (got {_describe(call_id)}).")
            name = msg.get("name") if isinstance(msg.get("name"), str) else None
            text, found = content_to_text(msg.get("content"), files, where)
            turns.append(Turn("tool", text, found, call_id=call_id, name=names_by_id.get(call_id, name)))
        elif role == "function":
            name = msg.get("name")
            if not isinstance(name, str):
                raise _bad(f"'messages[{i}].name' must be a string (got {_describe(name)}).")
            text, found = content_to_text(msg.get("content"), files, where)
            turns.append(Turn("tool", text, found, name=name))
        elif role in ("system", "developer", "user"):
            text, found = content_to_text(msg.get("content"), files, where)
            turns.append(Turn("system" if role == "developer" else role, text, found))
        elif role == "assistant":
            calls = []
            raw, legacy = msg.get("tool_calls"), msg.get("function_call")
            if raw is not None:
                if not isinstance(raw, list):
                    raise _bad(f"'messages[{i}].tool_calls' must be an array (got {_describe(raw)}).")
                for k, call in enumerate(raw):
                    field = f"messages[{i}].tool_calls[{k}]"
                    if not isinstance(call, dict):
                        raise _bad(f"'{field}' must be an object (got {_describe(call)}).")
                    call_id = call.get("id")
                    if call_id is not None and not isinstance(call_id, str):
                        raise _bad(f"'{field}.id' must be a string (got {_describe(call_id)}).")
                    calls.append(_history_call(call.get("function"), f"{field}.function", call_id))
                    if call_id:
                        names_by_id[call_id] = calls[-1].name
            if legacy is not None:
                calls.append(_history_call(legacy, f"messages[{i}].function_call", None))
            text, found = content_to_text(msg.get("content"), files, where)
            turns.append(Turn("assistant", text, found, tuple(calls)))
        else:
            raise ApiError(400, f"messages[{i}].role {shown(role, 40)} is not supported", "invalid_messages")
    return turns


def _check_tool_name(name, field: str) -> str:
    if not isinstance(name, str) or not _TOOL_NAME_RE.match(name):
        raise _bad(f"'{field}' must be a string of 1 to 64 letters, digits, '_', '.' or '-' "
                   f"(got {name!r})." if isinstance(name, str) else
                   f"'{field}' must be a string (got {_describe(name)}).")
    return name


def _function_def(fn, field: str) -> tuple:
    if not isinstance(fn, dict):
        raise _bad(f"'{field}' must be an object with 'name', 'description' and 'parameters'.")
    name = _check_tool_name(fn.get("name"), f"{field}.name")
    desc = fn.get("description")
    if desc is None:
        desc = ""
    elif not isinstance(desc, str):
        raise _bad(f"'{field}.description' must be a string (got {_describe(desc)}).")
    params = fn.get("parameters")
    if params is None:
        # OpenAI allows a function without parameters; the model still needs a schema to read.
        params = {"type": "object", "properties": {}}
    elif not isinstance(params, dict):
        raise _bad(f"'{field}.parameters' must be a JSON Schema object (got {_describe(params)}).")
    return Tool(name, desc, params)


def _choice_name(value, field: str, names: set) -> str:
    if not isinstance(value, str):
        raise _bad(f"'{field}' must be a string (got {_describe(value)}).")
    if value not in names:
        raise _bad(f"'{field}' names the function {value!r}, which is not in 'tools'.")
    return value


def parse_tools(data: dict) -> ToolSpec | None:
    """Validate `tools`/`functions`, `tool_choice`/`function_call` and `parallel_tool_calls`
    (OpenAI chat) -> a ToolSpec, or None (see tool_spec)."""
    tools = []
    raw_tools, raw_functions = data.get("tools"), data.get("functions")
    if raw_tools is not None:
        if not isinstance(raw_tools, list):
            raise _bad(f"'tools' must be an array of tools (got {_describe(raw_tools)}).")
        for i, tool in enumerate(raw_tools):
            if not isinstance(tool, dict):
                raise _bad(f"'tools[{i}]' must be an object (got {_describe(tool)}).")
            kind = tool.get("type", "function")
            if kind != "function":
                raise _bad(f"'tools[{i}].type' {kind!r} is not supported; only \"function\" tools "
                           "can be offered through LMArena.")
            tools.append(_function_def(tool.get("function"), f"tools[{i}].function"))
    if raw_functions is not None:       # the legacy (pre-tools) form: a plain list of functions
        if not isinstance(raw_functions, list):
            raise _bad(f"'functions' must be an array of functions (got {_describe(raw_functions)}).")
        tools.extend(_function_def(fn, f"functions[{i}]") for i, fn in enumerate(raw_functions))
    names = {t.name for t in tools}

    parallel = data.get("parallel_tool_calls")
    if parallel is None:
        parallel = True
    elif not isinstance(parallel, bool):
        raise _bad(f"'parallel_tool_calls' must be true or false (got {_describe(parallel)}).")

    if "tool_choice" in data and data["tool_choice"] is not None:
        field, raw = "tool_choice", data["tool_choice"]
    else:
        field, raw = "function_call", data.get("function_call")
    if raw is None:
        choice = "auto"
    elif isinstance(raw, str):
        if raw not in ("auto", "none", "required"):
            raise _bad(f"'{field}' must be \"auto\", \"none\", \"required\" or "
                       f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}} (got {raw!r}).")
        if raw == "required" and field == "function_call":
            raise _bad("'function_call' must be \"auto\", \"none\" or {\"name\": ...}.")
        choice = raw
    elif isinstance(raw, dict):
        if field == "function_call":
            choice = _choice_name(raw.get("name"), "function_call.name", names)
        elif raw.get("type") in ("auto", "none", "required"):    # {"type": "auto"}: some SDKs
            choice = raw["type"]
        else:
            if raw.get("type") != "function":
                raise _bad("'tool_choice.type' must be \"function\" when tool_choice is an object "
                           f"(got {raw.get('type')!r}).")
            fn = raw.get("function")
            if isinstance(fn, dict):
                choice = _choice_name(fn.get("name"), "tool_choice.function.name", names)
            elif "name" in raw:         # the Responses API spells it {"type": "function", "name"}
                choice = _choice_name(raw.get("name"), "tool_choice.name", names)
            else:
                raise _bad("'tool_choice.function' must be an object with the function's 'name'.")
    else:
        raise _bad(f"'{field}' must be a string or an object (got {_describe(raw)}).")

    return tool_spec(tools, choice, parallel, raw_tools is None and raw_functions is not None, field)


def openai_conversation(data: dict, cfg: Config) -> Conversation:
    """Validate an OpenAI chat request and translate it (pure; may run in a thread)."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required (a name from GET /v1/models).", "invalid_model")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false.", "invalid_stream")
    n = data.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "Only n=1 is supported for chat completions.", "invalid_n")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_messages")
    check_turn_count(len(messages), cfg)
    stop = data.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of non-empty strings.", "invalid_request_error")
    if stop is not None:
        check_stop_bounds(stop, "stop")
    tools = parse_tools(data)
    turns = openai_turns(messages, Attachments(cfg.max_attachment_bytes))
    include_usage = bool(isinstance(data.get("stream_options"), dict)
                         and data["stream_options"].get("include_usage"))
    return Conversation(model, turns, tools, stream, tuple(stop or ()), include_usage)


# -- Answer: chunks or a completion ----------------------------------------------------------------

def usage_object(prompt_chars: int, completion_chars: int, upstream) -> dict:
    if isinstance(upstream, dict):
        p = upstream.get("promptTokens", upstream.get("inputTokens", upstream.get("prompt_tokens")))
        c = upstream.get("completionTokens", upstream.get("outputTokens",
                                                           upstream.get("completion_tokens")))
        if type(p) is int and type(c) is int and p >= 0 and c >= 0:
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    p, c = estimate_tokens(prompt_chars), estimate_tokens(completion_chars)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class ChunkFormatter:
    """Builds `chat.completion.chunk` SSE events. The constant parts are rendered once per request,
    so a token costs one string join (the text's JSON literal is reused as LMArena sent it)."""

    __slots__ = ("head", "cid", "model", "created")

    def __init__(self, cid: str, model: str, created: int):
        self.cid, self.model, self.created = cid, model, created
        self.head = ('data: {"id":%s,"object":"chat.completion.chunk","created":%d,"model":%s,'
                     '"choices":[{"index":0,"delta":{' % (json_text(cid), created, json_text(model)))

    def content(self, literal: str) -> str:
        return self.head + '"content":' + literal + '},"finish_reason":null}]}\n\n'

    def reasoning(self, literal: str) -> str:
        return self.head + '"reasoning_content":' + literal + '},"finish_reason":null}]}\n\n'

    def delta(self, key: str, value) -> str:
        return self.head + json_text(key) + ':' + json_text(value) + '},"finish_reason":null}]}\n\n'

    def role(self) -> str:
        return self.head + '"role":"assistant","content":""},"finish_reason":null}]}\n\n'

    def finish(self, reason: str) -> str:
        return self.head + '},"finish_reason":%s}]}\n\n' % json_text(reason)

    def usage(self, usage: dict) -> str:
        return sse_event({"id": self.cid, "object": "chat.completion.chunk", "created": self.created,
                          "model": self.model, "choices": [], "usage": usage})


def completion_body(cid: str, model: str, created: int, content: str, reasoning: str,
                    finish: str, usage: dict, tool_calls: list | None = None) -> dict:
    message = {"role": "assistant", "content": content if content.strip() or not tool_calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage}


# -- OpenAI output -----------------------------------------------------------------------------

def openai_tool_call_delta(index: int, call: dict) -> list[dict]:
    """The `delta.tool_calls` items for one call: id and name first, then the arguments."""
    return [{"index": index, "id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": ""}},
            {"index": index, "function": {"arguments": call["arguments"]}}]


def openai_message_tool_calls(calls: list) -> list:
    """`message.tool_calls` of a non-streaming answer."""
    return [{"id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


class OpenAIReply(Reply):
    """OpenAI's `chat.completion` (or its chunks, reusing LMArena's JSON string literals)."""

    def __init__(self, model: str, stream: bool, include_usage: bool, prompt_chars: int, tools=None, stop=None):
        super().__init__(model, stream, prompt_chars, tools, stop)
        self.include_usage = include_usage
        self.legacy = bool(tools and tools.legacy)
        self.cid = "chatcmpl-" + os.urandom(16).hex()
        self.created = int(time.time())
        self.fmt = ChunkFormatter(self.cid, model, self.created)

    def opening(self) -> str:
        return self.fmt.role()

    def fmt_text(self, text: str, run: list) -> str:
        """LMArena's own JSON string literals are reused: those of a burst join inside one pair of
        quotes (an escape never spans two literals), so no text is encoded again."""
        if len(run) == 1:
            return self.fmt.content(run[0][1] or json_text(text))
        return self.fmt.content('"' + "".join([(lit or json_text(t))[1:-1] for t, lit in run]) + '"')

    def fmt_reasoning(self, text: str) -> str:
        return self.fmt.reasoning(json_text(text))

    def fmt_call(self, index: int, call: dict) -> str:
        if self.legacy:
            return (self.fmt.delta("function_call", {"name": call["name"], "arguments": ""})
                    + self.fmt.delta("function_call", {"arguments": call["arguments"]}))
        return "".join(self.fmt.delta("tool_calls", [d]) for d in openai_tool_call_delta(index, call))

    def finish_reason(self, job: "Job") -> str:
        reason = super().finish_reason(job)
        return "function_call" if reason == "tool_calls" and self.legacy else reason

    def fmt_end(self, job: "Job") -> str:
        if job.error:
            return sse_event(job.error.body()) + "data: [DONE]\n\n"
        out = self.fmt.finish(self.finish_reason(job))
        if self.include_usage:
            out += self.fmt.usage(usage_object(self.prompt_chars, job.completion_chars, job.usage))
        return out + "data: [DONE]\n\n"

    def body(self, job: "Job") -> dict:
        self._held([])
        usage = usage_object(self.prompt_chars, job.completion_chars, job.usage)
        out = completion_body(self.cid, self.model, self.created, "".join(self.texts), "".join(self.thoughts),
                              self.finish_reason(job), usage,
                              openai_message_tool_calls(self.calls) if self.calls and not self.legacy else None)
        if self.calls and self.legacy:
            message = out["choices"][0]["message"]
            message["function_call"] = {"name": self.calls[0]["name"], "arguments": self.calls[0]["arguments"]}
            message["content"] = message["content"] if message["content"].strip() else None
        return out


OPENAI_CHAT = ClientApi(
    "openai", openai_conversation,
    lambda chat: OpenAIReply(chat.model, chat.stream, chat.conv.include_usage, chat.prompt_chars, chat.tools,
                             chat.stop),
    ApiError.body)


# 12. Anthropic Messages ===========================================================================

# -- Request: /v1/messages -> Conversation ------------------------------------------------------

# Blocks Anthropic's own servers write into an assistant turn (server tools, citations of their
# searches): nothing here ran them, so they are left out of the transcript rather than refused.
_ANTHROPIC_SERVER_BLOCKS = frozenset(("server_tool_use", "web_search_tool_result", "web_fetch_tool_result",
                                      "code_execution_tool_result", "bash_code_execution_tool_result",
                                      "text_editor_code_execution_tool_result", "mcp_tool_use",
                                      "mcp_tool_result", "container_upload"))


def _anthropic_text(value, field: str) -> str:
    """A string, or a list of text blocks (system prompts, tool results, document content)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(f"{field}: must be a string or an array of text blocks (got {_describe(value)}).")
    texts = []
    for j, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _bad(f"{field}.{j}: must be a text block ({{\"type\": \"text\", \"text\": ...}}).")
        if not isinstance(block.get("text"), str):
            raise _bad(f"{field}.{j}.text: must be a string.")
        texts.append(block["text"])
    return "\n\n".join(t for t in texts if t)


def _anthropic_image(block: dict, field: str, files: Attachments) -> dict:
    src = block.get("source")
    if not isinstance(src, dict):
        raise _bad(f"{field}.source: must be an object.")
    kind = src.get("type")
    if kind == "base64":
        mime, data = src.get("media_type"), src.get("data")
        if not isinstance(mime, str) or not mime:
            raise _bad(f"{field}.source.media_type: must be a string such as \"image/png\".")
        if not isinstance(data, str):
            raise _bad(f"{field}.source.data: must be a base64 string.")
        return files.add(f"data:{mime};base64,{data}", None, None, "image")
    if kind == "url":
        url = src.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise _bad(f"{field}.source.url: must be an http(s) URL.")
        return files.add(url, None, None, "image")
    raise _bad(f"{field}.source.type: {kind!r} is not supported (use \"base64\" or \"url\").")


def _anthropic_document(block: dict, field: str, files: Attachments, number: int) -> str | dict:
    """A document block -> its text (text and content sources) or an attachment (base64)."""
    src = block.get("source")
    if not isinstance(src, dict):
        raise _bad(f"{field}.source: must be an object.")
    title = block.get("title")
    title = title if isinstance(title, str) and title.strip() else None
    kind = src.get("type")
    if kind == "base64":
        mime, data = src.get("media_type") or "application/pdf", src.get("data")
        if not isinstance(mime, str):
            raise _bad(f"{field}.source.media_type: must be a string such as \"application/pdf\".")
        if not isinstance(data, str):
            raise _bad(f"{field}.source.data: must be a base64 string.")
        ext = ".pdf" if mime == "application/pdf" else (mimetypes.guess_extension(mime) or ".bin")
        # LMArena shows the file name; a title without an extension would hide the file's type.
        name = (title if "." in title else title + ext) if title else f"document_{number}{ext}"
        return files.add(f"data:{mime};base64,{data}", name, None, "file")
    if kind in ("text", "content"):
        if kind == "text":
            text = src.get("data")
            if not isinstance(text, str):
                raise _bad(f"{field}.source.data: must be a string.")
        else:
            text = _anthropic_text(src.get("content"), f"{field}.source.content")
        return f"{title}\n\n{text}" if title else text
    raise _bad(f"{field}.source.type: {kind!r} is not supported through LMArena (send documents as "
               "\"base64\" or \"text\").")


def _anthropic_search_result(block: dict, field: str) -> str:
    """A search_result block (an agent's own search, handed to the model) -> text."""
    head = [s for s in (block.get("title"), block.get("source")) if isinstance(s, str) and s]
    return "\n".join(head + [_anthropic_text(block.get("content") or [], f"{field}.content")])


def _anthropic_tool_result(block: dict, field: str, files: Attachments, names: dict) -> Turn:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"{field}.tool_use_id: must be a string.")
    content = block.get("content")
    texts, found = [], []
    if content is None:
        pass
    elif isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for j, inner in enumerate(content):
            sub = f"{field}.content.{j}"
            kind = inner.get("type") if isinstance(inner, dict) else None
            if kind == "text":
                if not isinstance(inner.get("text"), str):
                    raise _bad(f"{sub}.text: must be a string.")
                texts.append(inner["text"])
            elif kind == "image":
                found.append(_anthropic_image(inner, sub, files))
            elif kind == "document":
                doc = _anthropic_document(inner, sub, files, j + 1)
                (texts if isinstance(doc, str) else found).append(doc)
            elif kind == "search_result":
                texts.append(_anthropic_search_result(inner, sub))
            else:
                raise _bad(f"{sub}.type: {kind!r} is not supported in a tool_result (use text, "
                           "image or document).")
    else:
        raise _bad(f"{field}.content: must be a string or an array of blocks.")
    text = "\n\n".join(t for t in texts if t)
    if block.get("is_error") is True:
        text = "Error: " + text
    return Turn("tool", text, found, call_id=call_id, name=names.get(call_id))


def _joined(texts: list) -> str:
    return "\n\n".join(t for t in texts if t) if len(texts) > 1 else (texts[0] if texts else "")


def anthropic_turns(raw: list, files: Attachments) -> list:
    """Anthropic messages -> turns. A `system` entry between turns (Claude Code 2.x, beta
    mid-conversation-system) is an instruction at that point of the conversation. Tool results go
    first in their user turn (they answer the previous assistant turn); thinking blocks are not
    shown again (their signatures cannot be checked here)."""
    turns: list[Turn] = []
    names: dict[str, str] = {}
    documents = 0
    for i, msg in enumerate(raw):
        field = f"messages.{i}"
        if not isinstance(msg, dict):
            raise _bad(f"{field}: must be an object with 'role' and 'content'.")
        role, content = msg.get("role"), msg.get("content")
        if role not in ("user", "assistant", "system"):
            raise _bad(f"{field}.role: must be \"user\", \"assistant\" or \"system\" (got {role!r}).")
        if role == "system":
            turns.append(Turn("system", _anthropic_text(content, f"{field}.content")))
            continue
        if isinstance(content, str):
            turns.append(Turn(role, content))
            continue
        if not isinstance(content, list):
            raise _bad(f"{field}.content: must be a string or an array of content blocks.")
        texts, found, calls, results = [], [], [], []
        for j, block in enumerate(content):
            sub = f"{field}.content.{j}"
            if not isinstance(block, dict):
                raise _bad(f"{sub}: must be an object with a 'type'.")
            kind = block.get("type")
            if kind == "text":
                if not isinstance(block.get("text"), str):
                    raise _bad(f"{sub}.text: must be a string.")
                texts.append(block["text"])
            elif kind in ("thinking", "redacted_thinking"):
                continue
            elif kind == "image" and role == "user":
                found.append(_anthropic_image(block, sub, files))
            elif kind == "document" and role == "user":
                documents += 1
                doc = _anthropic_document(block, sub, files, documents)
                (texts if isinstance(doc, str) else found).append(doc)
            elif kind == "search_result" and role == "user":
                texts.append(_anthropic_search_result(block, sub))
            elif kind == "tool_use" and role == "assistant":
                call_id, name, inp = block.get("id"), block.get("name"), block.get("input", {})
                if not isinstance(call_id, str) or not call_id:
                    raise _bad(f"{sub}.id: must be a string.")
                if not isinstance(name, str) or not name:
                    raise _bad(f"{sub}.name: must be a string.")
                if not isinstance(inp, dict):
                    raise _bad(f"{sub}.input: must be an object.")
                calls.append(Call(call_id, name, json_text(inp)))
                names[call_id] = name
            elif kind == "tool_result" and role == "user":
                results.append(_anthropic_tool_result(block, sub, files, names))
            elif role == "assistant" and isinstance(kind, str) and kind in _ANTHROPIC_SERVER_BLOCKS:
                continue
            else:
                raise _bad(f"{sub}.type: {kind!r} blocks are not supported in {role} messages.")
        turns.extend(results)
        if role == "assistant":
            if calls or texts or not content:
                turns.append(Turn("assistant", _joined(texts), [], tuple(calls)))
            # an assistant turn of thinking blocks only adds nothing
        elif texts or found or not (content or results):
            turns.append(Turn("user", _joined(texts), found))
    return turns


def anthropic_tools(body: dict) -> "ToolSpec | None":
    """tools, tool_choice and disable_parallel_tool_use -> a ToolSpec. Server tools (web search, code
    execution...) run on Anthropic's side only: they are left out with a log line, never refused,
    since agents offer them whatever the endpoint."""
    tools = body.get("tools")
    offered, skipped = [], []
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools: must be an array.")
        for i, tool in enumerate(tools):
            field = f"tools.{i}"
            if not isinstance(tool, dict):
                raise _bad(f"{field}: must be an object with 'name' and 'input_schema'.")
            kind, schema = tool.get("type"), tool.get("input_schema")
            if kind not in (None, "custom") and schema is None:
                skipped.append(str(tool.get("name") or kind))
                continue
            name = tool.get("name")
            if not isinstance(name, str) or not _TOOL_NAME_RE.match(name):
                raise _bad(f"{field}.name: must be 1 to 64 letters, digits, '_', '.' or '-' "
                           f"(got {name!r}).")
            if not isinstance(schema, dict):
                raise _bad(f"{field}.input_schema: must be a JSON Schema object.")
            desc = tool.get("description", "")
            if desc is not None and not isinstance(desc, str):
                raise _bad(f"{field}.description: must be a string.")
            offered.append(Tool(name, desc or "", schema))
    if skipped:
        log.info("server tools cannot run through LMArena; left out: %s", shown(", ".join(skipped), 200))
    choice, parallel = body.get("tool_choice"), True
    if choice is None:
        kind = "auto"
    elif not isinstance(choice, dict):
        raise _bad("tool_choice: must be an object such as {\"type\": \"auto\"}.")
    else:
        kind = choice.get("type")
        if choice.get("disable_parallel_tool_use") is True:
            parallel = False
    if body.get("disable_parallel_tool_use") is True:   # lenient: some clients put it at top level
        parallel = False
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or name not in {t.name for t in offered}:
            raise _bad(f"tool_choice.name: {shown(name, 80)} is not one of the request's tools.")
        return tool_spec(offered, name, parallel, field="tool_choice")
    choices = {"auto": "auto", "any": "required", "none": "none"}
    if not isinstance(kind, str) or kind not in choices:
        raise _bad(f"tool_choice.type: must be \"auto\", \"any\", \"tool\" or \"none\" (got {shown(kind, 40)}).")
    return tool_spec(offered, choices[kind], parallel, field="tool_choice")


def anthropic_conversation(body, cfg: Config, *, require_max_tokens: bool = True) -> Conversation:
    """A /v1/messages request -> a Conversation. Errors name fields the way Anthropic does
    ("messages.1.content.0.source: ..."). Unknown fields and beta features (cache_control, metadata,
    context_management, output_config, thinking...) are accepted and ignored.
    require_max_tokens=False serves /v1/messages/count_tokens, whose requests carry none."""
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model: Field required (a model name from GET /v1/models).")
    if "max_tokens" in body or require_max_tokens:
        mt = body.get("max_tokens")
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
            raise _bad("max_tokens: Field required, a positive integer." if mt is None else
                       f"max_tokens: must be a positive integer (got {shown(mt, 40)}).")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream: must be true or false.")
    files = Attachments(cfg.max_attachment_bytes)
    turns = []
    system = body.get("system")
    if system is not None:
        text = _anthropic_text(system, "system")
        if text:
            turns.append(Turn("system", text))
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("messages: must be a non-empty array.")
    check_turn_count(len(raw), cfg)
    turns += anthropic_turns(raw, files)
    tools = anthropic_tools(body)
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        raise _bad("stop_sequences: must be an array of strings.")
    if stops is not None:
        check_stop_bounds(stops, "stop_sequences")
    return Conversation(model, turns, tools, stream, tuple(s for s in stops or () if s))


def count_input_tokens(body, cfg: Config) -> int:
    """Rough input tokens of a /v1/messages (or count_tokens) body, the bridge's chars/4 rule,
    counted over what the bridge would send: the tool instructions, the transcript, and a flat
    _ATTACHMENT_TOKENS per image or file."""
    conv = anthropic_conversation(body, cfg, require_max_tokens=False)
    chars = len(tool_prompt(conv.tools)) if conv.tools else 0
    attachments = 0
    for t in transcript(conv.turns):
        chars += len(t["content"]) if t["content"] != " " else 0
        attachments += len(t["attachments"])
    return (chars + 3) // 4 + attachments * _ATTACHMENT_TOKENS


# -- Answer: events or a message ----------------------------------------------------------------

_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                          403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                          429: "rate_limit_error", 500: "api_error", 502: "api_error",
                          504: "api_error", 503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_type(status: int, code: str | None = None) -> str:
    """Anthropic's error type for a status. overloaded_error means "Anthropic is busy, retry": a 503
    of ours (no tab, a Cloudflare check) says something else, so it is an api_error (the message
    tells what happened)."""
    if status == 503 and code != "overloaded":
        return "api_error"
    return _ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500
                                      else "api_error")


def anthropic_error_body(err: ApiError) -> dict:
    return {"type": "error", "error": {"type": anthropic_error_type(err.status, err.code),
                                       "message": err.message}}


def anthropic_stop_reason(openai_finish: str | None, stop_sequence: str | None = None) -> str:
    """OpenAI finish_reason -> Anthropic stop_reason ("stop_sequence" whenever one was hit)."""
    if stop_sequence is not None:
        return "stop_sequence"
    # content_filter: Anthropic's newer "refusal" is unknown to older clients; end_turn is safe.
    return {"length": "max_tokens", "tool_calls": "tool_use"}.get(openai_finish or "", "end_turn")


def anthropic_tool_id(call_id: str) -> str:
    """Anthropic ids start with "toolu_"; a reader made with id_prefix="toolu_" needs no change."""
    return call_id if call_id.startswith("toolu_") else "toolu_" + call_id.removeprefix("call_")


class AnthropicEvents:
    """Renders a streamed Anthropic answer as SSE text (`event: <type>` + `data: <JSON>`).

    Blocks are opened on demand and numbered from 0 in order: text and thinking are extended
    while they stay the open block; switching kinds closes the open block first; a tool_use block
    is complete in one go (start, one input_json_delta, stop).
    """

    __slots__ = ("message_id", "model", "input_tokens", "index", "open")

    def __init__(self, message_id: str, model: str, input_tokens: int):
        self.message_id, self.model, self.input_tokens = message_id, model, input_tokens
        self.index = -1           # the index of the last block opened
        self.open: str | None = None  # "text" | "thinking" while a block is open

    @staticmethod
    def event(obj: dict) -> str:
        return f"event: {obj['type']}\ndata: {json_text(obj)}\n\n"

    def start(self) -> str:
        return self.event({"type": "message_start", "message": {
            "id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0}}})

    def _close(self) -> str:
        if self.open is None:
            return ""
        self.open = None
        return self.event({"type": "content_block_stop", "index": self.index})

    def _open(self, block: dict) -> str:
        out = self._close()
        self.index += 1
        self.open = block["type"]
        return out + self.event({"type": "content_block_start", "index": self.index,
                                 "content_block": block})

    def text(self, s: str) -> str:
        if not s:
            return ""
        out = "" if self.open == "text" else self._open({"type": "text", "text": ""})
        return out + self.event({"type": "content_block_delta", "index": self.index,
                                 "delta": {"type": "text_delta", "text": s}})

    def thinking(self, s: str) -> str:
        if not s:
            return ""
        out = "" if self.open == "thinking" else self._open(
            {"type": "thinking", "thinking": "", "signature": ""})
        return out + self.event({"type": "content_block_delta", "index": self.index,
                                 "delta": {"type": "thinking_delta", "thinking": s}})

    def tool_use(self, call: dict) -> str:
        out = self._open({"type": "tool_use", "id": anthropic_tool_id(call["id"]),
                          "name": call["name"], "input": {}})
        out += self.event({"type": "content_block_delta", "index": self.index,
                           "delta": {"type": "input_json_delta", "partial_json": call["arguments"]}})
        self.open = None
        return out + self.event({"type": "content_block_stop", "index": self.index})

    def finish(self, stop_reason: str, stop_sequence: str | None, output_tokens: int) -> str:
        return (self._close()
                + self.event({"type": "message_delta",
                              "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                              "usage": {"output_tokens": output_tokens}})
                + self.event({"type": "message_stop"}))

    def ping(self) -> str:
        return self.event({"type": "ping"})

    @staticmethod
    def error(err: ApiError) -> str:
        return AnthropicEvents.event(anthropic_error_body(err))


def anthropic_message(message_id: str, model: str, text: str, thinking: str, calls: list,
                      stop_reason: str, stop_sequence: str | None, input_tokens: int,
                      output_tokens: int) -> dict:
    """A non-streaming /v1/messages answer: thinking, then text, then tool_use blocks."""
    content: list = []
    if thinking:
        content.append({"type": "thinking", "thinking": thinking, "signature": ""})
    if text.strip() or (text and not calls):
        content.append({"type": "text", "text": text})
    for call in calls:
        content.append({"type": "tool_use", "id": anthropic_tool_id(call["id"]),
                        "name": call["name"], "input": json.loads(call["arguments"])})
    return {"id": message_id, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


class AnthropicReply(Reply):
    """Anthropic's Messages API answer, or its event stream (section 3 of PROTOCOL.md)."""

    id_prefix = "toolu_"

    def __init__(self, model: str, stream: bool, prompt_chars: int, tools=None, stop=None):
        super().__init__(model, stream, prompt_chars, tools, stop)
        self.mid = f"msg_{uuid.uuid4().hex[:24]}"
        self.events = AnthropicEvents(self.mid, model, estimate_tokens(prompt_chars))

    def opening(self) -> str:
        return self.events.start()

    def fmt_text(self, text: str, run: list) -> str:
        return self.events.text(text)

    def fmt_reasoning(self, text: str) -> str:
        return self.events.thinking(text)

    def fmt_call(self, index: int, call: dict) -> str:
        return self.events.tool_use(call)

    def stop_sequence(self) -> str | None:
        """A tool call wins over a stop sequence after it: agents run tools on "tool_use" only."""
        return None if self.calls else self.stop_hit

    def stop_reason(self, job: "Job") -> str:
        return anthropic_stop_reason(self.finish_reason(job), self.stop_sequence())

    def output_tokens(self, job: "Job") -> int:
        return usage_object(self.prompt_chars, job.completion_chars, job.usage)["completion_tokens"]

    def fmt_end(self, job: "Job") -> str:
        if job.error:
            return AnthropicEvents.error(job.error)
        return self.events.finish(self.stop_reason(job), self.stop_sequence(), self.output_tokens(job))

    def body(self, job: "Job") -> dict:
        self._held([])
        return anthropic_message(self.mid, self.model, "".join(self.texts), "".join(self.thoughts), self.calls,
                                 self.stop_reason(job), self.stop_sequence(), estimate_tokens(self.prompt_chars),
                                 self.output_tokens(job))

    def headers(self) -> list:
        return [("request-id", "req_" + self.mid[4:])]


ANTHROPIC_MESSAGES = ClientApi(
    "anthropic", anthropic_conversation,
    lambda chat: AnthropicReply(chat.model, chat.stream, chat.prompt_chars, chat.tools, chat.stop),
    lambda err: anthropic_error_body(err))


# 13. OpenAI Responses =============================================================================
#    /v1/responses, the API Codex CLI and the OpenAI Agents SDK speak (PROTOCOL section 3). Input
#    items become turns like any other API's messages; the answer is a list of output items
#    (reasoning, a message, function and custom tool calls) or their event stream. Responses the
#    client lets us keep (`store`, the default) stay in a bounded memory for `previous_response_id`
#    and `GET /v1/responses/{id}`.

# Input item types that only carry what OpenAI's servers did (their own tool runs, references to
# items kept on OpenAI's side): left out of the transcript with a log line.
_SERVER_ITEMS = frozenset(("web_search_call", "file_search_call", "computer_call", "computer_call_output",
                           "code_interpreter_call", "image_generation_call", "mcp_call", "mcp_list_tools",
                           "mcp_approval_request", "mcp_approval_response", "local_shell_call",
                           "local_shell_call_output", "item_reference", "tool_search_call",
                           "tool_search_output", "compaction", "shell_call", "shell_call_output"))
JSON_FORMAT_NOTE = ("Answer with one valid JSON value and nothing else: no Markdown code fence, no text "
                    "before or after it.")


@dataclasses.dataclass(slots=True)
class ResponsesOptions:
    """What a Responses request asks of the answer beyond the conversation."""
    json_format: str | None = None      # "json_object" | "json_schema" | None (plain text)
    store: bool = True
    previous_response_id: str | None = None
    echo: dict = dataclasses.field(default_factory=dict)   # request fields the response repeats
    carried: list = dataclasses.field(default_factory=list)  # turns a later response continues from


def _responses_text(value, field: str) -> str:
    """A function call's output: a string, or a list of input_text parts (images are not shown)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n\n".join(p.get("text", "") for p in value
                           if isinstance(p, dict) and isinstance(p.get("text"), str))
    raise _bad(f"'{field}' must be a string or a list of content parts.")


def responses_turns(items: list, files: Attachments, earlier: list = ()) -> list:
    """Input items -> turns. An assistant message followed by its function calls is one assistant
    turn (that is how the bridge answered it, so continuations match); developer is system. Results
    are named after their calls, here or in the `earlier` turns (of a previous response)."""
    turns: list[Turn] = []
    names = {c.id: c.name for t in earlier for c in t.calls}
    skipped: set = set()
    for i, item in enumerate(items):
        field = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"'{field}' must be an object (got {_describe(item)}).")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _bad(f"'{field}.role' must be \"user\", \"assistant\", \"system\" or \"developer\" "
                           f"(got {shown(role, 40)}).")
            text, found = content_to_text(item.get("content"), files, f"{field}.content")
            last = turns[-1] if turns else None
            if role == "assistant" and last is not None and last.role == "assistant":
                # one answer's items (text after its calls, or around its reasoning): one turn, as
                # the bridge made them, so a continuation matches (Turn.fingerprint)
                last.text += text
                last.files = last.files + found
            else:
                turns.append(Turn("system" if role == "developer" else role, text, found))
        elif kind in ("function_call", "custom_tool_call"):
            call_id, name = item.get("call_id"), item.get("name")
            value = item.get("arguments" if kind == "function_call" else "input", "")
            if not isinstance(call_id, str) or not call_id:
                raise _bad(f"'{field}.call_id' must be a string.")
            if not isinstance(name, str) or not name:
                raise _bad(f"'{field}.name' must be a string.")
            if not isinstance(value, str):
                raise _bad(f"'{field}.{'arguments' if kind == 'function_call' else 'input'}' must be a string.")
            call = Call(call_id, name, value, kind == "custom_tool_call")
            names[call_id] = name
            last = turns[-1] if turns else None
            if last is not None and last.role == "assistant":
                last.calls = last.calls + (call,)
            else:
                turns.append(Turn("assistant", "", [], (call,)))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _bad(f"'{field}.call_id' must be a string.")
            text = _responses_text(item.get("output", ""), f"{field}.output")
            turns.append(Turn("tool", text, [], call_id=call_id, name=names.get(call_id)))
        elif kind == "reasoning":
            continue            # earlier reasoning (and its encrypted content) is not shown again
        elif isinstance(kind, str) and (kind in _SERVER_ITEMS or kind.endswith("_call")
                                        or kind.endswith("_call_output")):
            skipped.add(kind)
        else:
            raise _bad(f"'{field}.type' {shown(kind, 40)} is not an input item this bridge knows.")
    if skipped:
        log.info("input items of tools that ran elsewhere were left out: %s", shown(", ".join(sorted(skipped))))
    return turns


def responses_tools(data: dict) -> "ToolSpec | None":
    """function and custom tools -> a ToolSpec; hosted tools (and types unknown here) are left out
    with a log line."""
    raw = data.get("tools")
    offered, skipped = [], []
    if raw is not None:
        if not isinstance(raw, list):
            raise _bad(f"'tools' must be an array of tools (got {_describe(raw)}).")
        for i, tool in enumerate(raw):
            field = f"tools[{i}]"
            if not isinstance(tool, dict):
                raise _bad(f"'{field}' must be an object (got {_describe(tool)}).")
            kind = tool.get("type", "function")
            if kind == "function":
                offered.append(_function_def(tool, field))
            elif kind == "custom":
                name = _check_tool_name(tool.get("name"), f"{field}.name")
                desc = tool.get("description") or ""
                if not isinstance(desc, str):
                    raise _bad(f"'{field}.description' must be a string (got {_describe(desc)}).")
                fmt = tool.get("format") if isinstance(tool.get("format"), dict) else {}
                grammar = None
                if fmt.get("type") == "grammar" and isinstance(fmt.get("definition"), str):
                    grammar = f"({fmt.get('syntax') or 'grammar'})\n{fmt['definition'].strip()}"
                offered.append(Tool(name, desc, None, True, grammar))
            else:
                skipped.append(str(tool.get("name") or kind))
    if skipped:
        log.info("tools that cannot run through LMArena were left out: %s", shown(", ".join(skipped), 200))
    choice = data.get("tool_choice")
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        kind = choice.get("type")
        if kind in ("function", "custom"):
            name = choice.get("name")
            if not isinstance(name, str) or name not in {t.name for t in offered}:
                raise _bad(f"'tool_choice.name' names {shown(name, 80)}, which is not in 'tools'.")
            choice = name
        elif kind == "allowed_tools":
            choice = "required" if choice.get("mode") == "required" else "auto"
        else:                            # a hosted tool: it cannot be called here
            choice = "auto"
    elif choice not in ("auto", "none", "required"):
        raise _bad(f"'tool_choice' must be \"auto\", \"none\", \"required\" or an object (got {shown(choice, 40)}).")
    parallel = data.get("parallel_tool_calls")
    if parallel is None:
        parallel = True
    elif not isinstance(parallel, bool):
        raise _bad(f"'parallel_tool_calls' must be true or false (got {_describe(parallel)}).")
    return tool_spec(offered, choice, parallel)


def _shallow(value, limit: int = 8) -> bool:
    """Nested at most `limit` levels (iteratively: the value may be nested as deep as the parser
    allows). The response repeats such fields inside its events, a few levels deeper than the request
    held them: deeper ones are not repeated (they made a RecursionError, a 500 or a cut stream)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth >= limit:
                return False
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def responses_options(data: dict) -> ResponsesOptions:
    store = data.get("store", True)
    if store is None:
        store = True
    if not isinstance(store, bool):
        raise _bad(f"'store' must be true or false (got {_describe(store)}).")
    prev = data.get("previous_response_id")
    if prev is not None and not isinstance(prev, str):
        raise _bad(f"'previous_response_id' must be a string (got {_describe(prev)}).")
    text = data.get("text") if isinstance(data.get("text"), dict) else {}
    fmt = text.get("format") if isinstance(text.get("format"), dict) else {}
    kind = fmt.get("type", "text")
    if kind not in ("text", "json_object", "json_schema"):
        raise _bad(f"'text.format.type' must be \"text\", \"json_object\" or \"json_schema\" (got {shown(kind, 40)}).")
    echo = {k: data[k] for k in ("instructions", "max_output_tokens", "metadata", "reasoning", "temperature",
                                 "top_p", "truncation", "user", "prompt_cache_key") if k in data and _shallow(data[k])}
    return ResponsesOptions(None if kind == "text" else kind, store, prev or None, echo)


def responses_conversation(data: dict, cfg: Config, history: list | None = None) -> Conversation:
    """A /v1/responses request (and the turns of its previous_response_id) -> a Conversation.
    `instructions` come first (they are not carried over from a previous response, as OpenAI does);
    a JSON text.format adds an instruction at the end."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required (a name from GET /v1/models).")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false.")
    raw = data.get("input")
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": raw}]
    if not isinstance(raw, list) or not (raw or history):
        raise _bad("'input' must be a string or a non-empty array of input items.")
    check_turn_count(len(raw) + len(history or ()), cfg, "input items")
    options = responses_options(data)
    turns = []
    instructions = data.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad(f"'instructions' must be a string (got {_describe(instructions)}).")
        if instructions.strip():
            turns.append(Turn("system", instructions))
    start = len(turns)
    turns += list(history or ())
    turns += responses_turns(raw, Attachments(cfg.max_attachment_bytes), history or ())
    options.carried = turns[start:]            # instructions are not carried over (as OpenAI does)
    if options.json_format:
        note = JSON_FORMAT_NOTE
        fmt = data["text"]["format"]
        if options.json_format == "json_schema" and isinstance(fmt.get("schema"), dict):
            note += (" It must follow this JSON Schema" + (f" ({fmt['name']})" if isinstance(fmt.get("name"), str)
                                                           else "") + ":\n" + json_text(fmt["schema"]))
        turns.append(Turn("system", note))
    return Conversation(model, turns, responses_tools(data), stream, options=options)


def json_answer(text: str) -> str | None:
    """The answer as JSON text when it parses (a Markdown code fence around it is taken off), else None."""
    s = text.strip()
    if s.startswith("```"):
        s = _strip_fence(s) or ""
    try:
        _loads(s)
    except ValueError:
        return None
    return s


# -- Answer: output items, or their event stream --------------------------------------------------

def responses_usage(prompt_chars: int, completion_chars: int, upstream, reasoning_chars: int) -> dict:
    u = usage_object(prompt_chars, completion_chars, upstream)
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": u["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": estimate_tokens(reasoning_chars)},
            "total_tokens": u["total_tokens"]}


class ResponsesReply(Reply):
    """The Responses API's answer: a `response` object, or its event stream with a sequence number
    on every event. Items are opened on demand (reasoning, a message, each call) and closed before
    the next one starts; a JSON text.format holds the text back until it is checked."""

    id_prefix = "call_"

    def __init__(self, chat: ChatRequest):
        super().__init__(chat.model, chat.stream, chat.prompt_chars, chat.tools, chat.stop)
        self.options: ResponsesOptions = chat.conv.options
        self.rid = "resp_" + secrets.token_hex(24)
        self.created = int(time.time())
        self.tools = chat.tools
        self.seq = 0
        self.items: list[dict] = []           # output items, done ones complete
        self.open: dict | None = None         # the item being streamed
        self.reasoning_chars = 0
        self.held: list[str] | None = [] if self.options.json_format else None
        self.on_done = None                   # called with the final response object

    # -- the response object --
    def response(self, status: str, usage: dict | None = None, error: dict | None = None,
                 output: list | None = None) -> dict:
        tools = [] if self.tools is None else [
            ({"type": "custom", "name": t.name, "description": t.description} if t.custom else
             {"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
              "strict": False}) for t in self.tools.tools]
        choice = "auto" if self.tools is None else (
            self.tools.choice if self.tools.choice in ("auto", "required") else
            {"type": "function", "name": self.tools.choice})
        out = {"id": self.rid, "object": "response", "created_at": self.created, "status": status,
               "error": error, "incomplete_details": None, "instructions": None, "model": self.model,
               "output": self.items if output is None else output, "parallel_tool_calls":
               True if self.tools is None else self.tools.parallel,
               "previous_response_id": self.options.previous_response_id, "store": self.options.store,
               "tool_choice": choice, "tools": tools, "usage": usage, "metadata": {}, "text":
               {"format": {"type": self.options.json_format or "text"}}}
        out.update(self.options.echo)
        if status == "completed":
            texts = [p["text"] for it in out["output"] if it["type"] == "message" for p in it["content"]]
            out["output_text"] = "".join(texts)
        return out

    def event(self, kind: str, **fields) -> str:
        fields["type"] = kind
        fields["sequence_number"] = self.seq
        self.seq += 1
        return f"event: {kind}\ndata: {json_text(fields)}\n\n"

    def opening(self) -> str:
        start = self.response("in_progress", output=[])
        return self.event("response.created", response=start) + self.event("response.in_progress", response=start)

    # -- items --
    def _close(self) -> str:
        item, self.open = self.open, None
        if item is None:
            return ""
        i = len(self.items) - 1
        out = ""
        if item["type"] == "message":
            part = item["content"][0]
            if self.stream:
                out += self.event("response.output_text.done", item_id=item["id"], output_index=i,
                                  content_index=0, text=part["text"], logprobs=[])
                out += self.event("response.content_part.done", item_id=item["id"], output_index=i,
                                  content_index=0, part=part)
        elif item["type"] == "reasoning":
            part = item["summary"][0]
            if self.stream:
                out += self.event("response.reasoning_summary_text.done", item_id=item["id"], output_index=i,
                                  summary_index=0, text=part["text"])
                out += self.event("response.reasoning_summary_part.done", item_id=item["id"], output_index=i,
                                  summary_index=0, part=part)
        item["status"] = "completed"
        if item["type"] == "reasoning":
            del item["status"]
        if self.stream:
            out += self.event("response.output_item.done", output_index=i, item=item)
        return out

    def _open(self, item: dict) -> str:
        out = self._close()
        self.items.append(item)
        self.open = item
        if not self.stream:
            return out
        i = len(self.items) - 1
        added = dict(item, status="in_progress") if item["type"] != "reasoning" else item
        if item["type"] == "message":
            added = dict(added, content=[])
        elif item["type"] == "reasoning":
            added = dict(added, summary=[])
        out += self.event("response.output_item.added", output_index=i, item=added)
        if item["type"] == "message":
            out += self.event("response.content_part.added", item_id=item["id"], output_index=i, content_index=0,
                              part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        elif item["type"] == "reasoning":
            out += self.event("response.reasoning_summary_part.added", item_id=item["id"], output_index=i,
                              summary_index=0, part={"type": "summary_text", "text": ""})
        return out

    def _message_text(self, text: str) -> str:
        out = ""
        if self.open is None or self.open["type"] != "message":
            out += self._open({"id": "msg_" + secrets.token_hex(24), "type": "message", "status": "in_progress",
                               "role": "assistant", "content": [{"type": "output_text", "text": "",
                                                                 "annotations": [], "logprobs": []}]})
        part = self.open["content"][0]
        part["text"] += text
        if self.stream:
            out += self.event("response.output_text.delta", item_id=self.open["id"], output_index=len(self.items) - 1,
                              content_index=0, delta=text, logprobs=[])
        return out

    def fmt_text(self, text: str, run: list) -> str:
        if self.held is not None:              # JSON output: checked whole at the end
            self.held.append(text)
            return ""
        return self._message_text(text)

    def fmt_reasoning(self, text: str) -> str:
        self.reasoning_chars += len(text)
        out = ""
        if self.open is None or self.open["type"] != "reasoning":
            out += self._open({"id": "rs_" + secrets.token_hex(24), "type": "reasoning",
                               "summary": [{"type": "summary_text", "text": ""}]})
        self.open["summary"][0]["text"] += text
        if self.stream:
            out += self.event("response.reasoning_summary_text.delta", item_id=self.open["id"],
                              output_index=len(self.items) - 1, summary_index=0, delta=text)
        return out

    def fmt_call(self, index: int, call: dict) -> str:
        custom = call.get("custom", False)
        item = {"id": ("ctc_" if custom else "fc_") + secrets.token_hex(24),
                "type": "custom_tool_call" if custom else "function_call", "status": "in_progress",
                "call_id": call["id"], "name": call["name"]}
        key = "input" if custom else "arguments"
        item[key] = call["arguments"]
        out = self._open(dict(item, **{key: ""}) if self.stream else item)
        if self.stream:
            i = len(self.items) - 1
            self.items[i] = item
            self.open = item
            prefix = "response.custom_tool_call_input" if custom else "response.function_call_arguments"
            out += self.event(prefix + ".delta", item_id=item["id"], output_index=i, delta=call["arguments"])
            out += self.event(prefix + ".done", item_id=item["id"], output_index=i, **{key: call["arguments"]})
        return out + self._close()

    # -- the end --
    def _json_check(self) -> tuple[str, dict | None]:
        """Held JSON text -> (its message events, an error when it does not parse)."""
        text, self.held = "".join(self.held or ()), None
        if not text.strip() and self.calls:
            return "", None
        checked = json_answer(text)
        if checked is None:
            return "", {"code": "invalid_json_output", "message": "The model's answer is not valid JSON "
                        "(text.format asked for JSON; LMArena's models cannot be forced to it). Try again."}
        return self._message_text(checked), None

    def _usage(self, job) -> dict:
        return responses_usage(self.prompt_chars, job.completion_chars, job.usage, self.reasoning_chars)

    def fmt_end(self, job) -> str:
        if job.error:
            err = job.error
            self.finish(None)
            return (self.event("error", code=err.code, message=err.message, param=None)
                    + self.event("response.failed", response=self.response(
                        "failed", error={"code": err.code or "server_error", "message": err.message})))
        out = ""
        error = None
        if self.held is not None:
            out, error = self._json_check()
        out += self._close()
        if error is not None:
            final = self.response("failed", self._usage(job), error)
            self.finish(None)
            return out + self.event("error", code=error["code"], message=error["message"], param=None) + \
                self.event("response.failed", response=final)
        final = self.response("completed", self._usage(job))
        self.finish(final)
        return out + self.event("response.completed", response=final)

    def body(self, job) -> dict:
        self._held([])
        if self.thoughts:
            self.fmt_reasoning("".join(self.thoughts))
        text = "".join(self.texts)
        if self.held is not None:
            self.held = [text]
            _, error = self._json_check()
            if error is not None:
                self.finish(None)
                raise ApiError(502, error["message"], error["code"])
        elif text.strip() or (text and not self.calls):
            self._message_text(text)
        self._close()
        for i, call in enumerate(self.calls):
            self.fmt_call(i, call)
        final = self.response("completed", self._usage(job))
        self.finish(final)
        return final

    def finish(self, final: dict | None) -> None:
        if self.on_done is not None:
            callback, self.on_done = self.on_done, None
            callback(final)

    def output_turn(self) -> Turn:
        """This answer as the assistant turn a later request (previous_response_id) continues from."""
        text = "".join(p["text"] for it in self.items if it["type"] == "message" for p in it["content"])
        calls = tuple(Call(c["id"], c["name"], c["arguments"], c.get("custom", False)) for c in self.calls)
        return Turn("assistant", text, [], calls)


class ResponseStore:
    """Responses kept for `previous_response_id` and `GET /v1/responses/{id}`: the most recent
    `limit`, each with the turns that led to it (its input and its answer); `store: false` keeps
    nothing. Memory is bounded by count and by the characters of all kept entries together (texts,
    attachments' data URLs, call arguments, the answer's items): `max_chars`; an entry larger than
    half of it is not kept. Entries of one chain share their turns, so this overcounts: older ones
    go sooner, never more memory."""

    def __init__(self, limit: int = 256, max_chars: int = 128 * 2**20):
        self.limit, self.max_chars = limit, max_chars
        self.entries: collections.OrderedDict = collections.OrderedDict()   # id -> (response, turns, size)
        self.chars = 0

    def turns(self, response_id: str | None) -> list | None:
        if response_id is None:
            return None
        entry = self.entries.get(response_id)
        if entry is None:
            raise ApiError(400, f"Previous response with id {response_id!r} not found (this bridge keeps the "
                           f"last {self.limit} responses in memory, none after a restart, and none sent with "
                           "store: false). Send the whole conversation as input instead.",
                           "previous_response_not_found", "invalid_request_error")
        self.entries.move_to_end(response_id)
        return list(entry[1])

    @staticmethod
    def size(response: dict, turns: list) -> int:
        chars = sum(len(t.text) + sum(len(f.get("url") or "") for f in t.files)
                    + sum(len(c.arguments) for c in t.calls) for t in turns)
        for item in response.get("output") or ():
            chars += sum(len(p.get("text") or "") for p in item.get("content") or item.get("summary") or ())
            chars += len(item.get("arguments") or item.get("input") or "")
        return chars

    def keep(self, response: dict, turns: list) -> None:
        size = self.size(response, turns)
        if size > self.max_chars // 2:
            log.info("response %s is not kept for previous_response_id: %d characters", response["id"][:16], size)
            return
        old = self.entries.pop(response["id"], None)
        if old is not None:
            self.chars -= old[2]
        self.entries[response["id"]] = (response, turns, size)
        self.chars += size
        while len(self.entries) > self.limit or self.chars > self.max_chars:
            self.chars -= self.entries.popitem(last=False)[1][2]

    def get(self, response_id: str) -> dict:
        entry = self.entries.get(response_id)
        if entry is None:
            raise ApiError(404, f"No response with id {response_id!r} is kept here (store: false, too old, "
                           "or the bridge restarted).", "not_found")
        return entry[0]


# 14. Jobs =========================================================================================

class JobOwner(typing.Protocol):
    """What a Job tells whoever runs it (the tab pool)."""

    def job_output(self, job: "Job") -> None:
        """The job has answer events to take."""

    def retry_job(self, job: "Job", err: ApiError) -> bool:
        """An attempt failed before any output: True when another attempt is under way."""

    def note_upstream_error(self, tab, err: ApiError, path: str = "") -> None:
        """LMArena refused something on this tab (after output started, or for good) at `path`."""

    def job_ended(self, job: "Job") -> None:
        """The job is over (answered, failed, or its client left)."""


class Job:
    """One client request's work on the tabs: the task sent to a tab (again, with fresh ids, when an
    attempt fails before any output and a retry can help), and the answer events it produces.

    It only accumulates: answer events wait in `events` until the request's Reply takes them;
    its `owner` (a JobOwner) is told when there is something to take and when an attempt failed."""

    # Attempts after the first one, at most: a follow-up's fallback to a new conversation, a fresh
    # v3 token, the v2 check, and another tab after a 429 (retry_plan; PROTOCOL 2.3 and 2.5).
    MAX_RETRIES = 4

    __slots__ = ("owner", "id", "rid", "model", "plan", "side", "parser", "events", "tab", "tab_name",
                 "attempt", "received", "output", "done", "error", "finish_reason", "usage",
                 "client_gone", "wake", "last_activity", "dispatcher", "completion_chars", "limit",
                 "stages", "message", "cooled", "sink", "images")

    def __init__(self, owner: JobOwner, model: str, plan, side: str = "a", limit: int = 64 * 2**20):
        self.owner = owner
        h = os.urandom(16).hex()                # a random id in UUID form (uuid4() costs 5 times more)
        self.id = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        self.rid = self.id                      # request id of the current attempt
        self.model, self.plan, self.side, self.limit = model, plan, side, limit
        self.parser = ArenaStreamParser(side)
        self.events: list = []
        self.tab = None
        self.tab_name = "-"
        self.attempt = 0
        self.received = self.output = self.done = self.client_gone = False
        self.error: ApiError | None = None
        self.finish_reason = "stop"
        self.usage = None
        self.completion_chars = 0
        self.wake = asyncio.Event()
        self.last_activity = time.monotonic()
        self.dispatcher = None
        self.stages: dict[str, float] = {"start": time.monotonic()}
        self.message = plan.task_message(self.rid, {}) if plan is not None else ""
        self.cooled: set = set()                # tabs that refused this job (429, reCAPTCHA)
        self.sink = None                        # set by a streaming route: takes events as they come
        self.images: list = []                  # image events (for /v1/images/generations)

    # -- from the tab --
    def on_tab_data(self, data) -> bool:
        """A data message of the tab for this job; True when it started the answer's output (the
        tab then lets the route write that first text before handling a burst's rest)."""
        if self.done:
            return False
        had_output = self.output
        self.last_activity = time.monotonic()
        if not self.received:
            self.received = True
            self.stages.setdefault("first_byte", self.last_activity)
            self.wake.set()
        if type(data) is str:
            if data == "[DONE]":
                self._take(self.parser.close())
                if not self.done:
                    self.complete()
            else:
                self._take(self.parser.feed(data))
        elif isinstance(data, dict) and "error" in data:
            self.on_error(tab_error(data))
        else:
            log.debug("task %s: unexpected data of type %s ignored", self.id[:8], type(data).__name__)
        return self.output and not had_output

    def on_stage(self, name: str) -> None:
        if name in ("token_ready", "upstream_headers"):
            self.stages.setdefault(name, time.monotonic())

    def _take(self, events: list) -> None:
        for ev in events:
            kind = ev[0]
            if kind == "error":
                self.on_error(ev[1])
                return
            if kind == "finish":
                self.finish_reason, self.usage = ev[1], ev[2]
                self.complete()
                return
            if kind == "image":
                self.images.append(ev)
                ev = ("text", None, ("\n\n" if self.completion_chars else "") + image_markdown(ev[1]))
            if kind != "reasoning":
                self.completion_chars += len(ev[2])
                if self.completion_chars > self.limit:
                    self.fail(ApiError(502, f"The answer is larger than the bridge keeps ({self.limit} "
                                       "characters, max_answer_chars).", "upstream_error"))
                    return
            self.events.append(ev)
            if not self.output:
                self.output = True
                self.stages.setdefault("first_token", time.monotonic())
        if events:
            self.owner.job_output(self)

    def on_error(self, err: ApiError) -> None:
        """An attempt failed: the bridge may retry it (before any output), else the job fails."""
        if self.done:
            return
        if self.plan is not None and not self.output:
            err = self.plan.explain(err)
        if self.output:
            self.owner.note_upstream_error(self.tab, err, self.plan.path if self.plan is not None else "")
        elif self.owner.retry_job(self, err):
            return
        self.fail(err, tell_tab=False)

    def take(self) -> list:
        events, self.events = self.events, []
        return events

    async def woken(self, seconds: float) -> None:
        """Wait for news of this job (wake), or `seconds`. A timer that sets wake costs a third of
        asyncio.timeout's machinery, and this runs for every request; callers check the time."""
        self.wake.clear()
        timer = asyncio.get_running_loop().call_later(seconds, self.wake.set)
        try:
            await self.wake.wait()
        finally:
            timer.cancel()

    def next_attempt(self, flags: dict) -> None:
        """Rebuild the task with fresh ids for another attempt (the old one is over)."""
        self.attempt += 1
        self.rid = f"{self.id}.{self.attempt}"
        self.parser = ArenaStreamParser(self.side)
        self.received = False
        self.message = self.plan.task_message(self.rid, flags)

    def idle_left(self, timeout: float, now: float) -> float:
        """Seconds left before stream_response_timeout_seconds; at 0 the job fails with 504."""
        if self.tab is None:          # still waiting for a tab: the dispatcher owns that deadline
            self.last_activity = now
        left = self.last_activity + timeout - now
        if left <= 0:
            self.fail(ApiError(504, f"LMArena sent nothing for {timeout:g} s "
                               "(stream_response_timeout_seconds).", "upstream_timeout"))
        return left

    # -- endings --
    def complete(self) -> None:
        if self.done:
            return
        if self.parser.citations:
            self._take([("text", None, citations_markdown(self.parser.citations))])
        self._end()

    def fail(self, err: ApiError, tell_tab: bool = True) -> None:
        if self.done:
            return
        self.error = err
        if tell_tab and self.tab is not None:
            self.tab.abort(self.rid)
        self._end()

    def stop_early(self) -> None:
        """The answer is complete on our side (a stop sequence): stop the tab, end normally."""
        if not self.done:
            if self.tab is not None:
                self.tab.abort(self.rid)
            self.finish_reason = "stop"
            self._end()

    def on_client_gone(self) -> None:
        self.client_gone = True
        if self.done:
            return
        if self.tab is not None:
            self.tab.abort(self.rid)
        self._end()

    def _end(self) -> None:
        self.done = True
        self.stages.setdefault("end", time.monotonic())
        if self.tab is not None:
            self.tab.jobs.pop(self.rid, None)
        if self.dispatcher is not None and not self.dispatcher.done():
            self.dispatcher.cancel()
        self.owner.job_ended(self)
        self.wake.set()


class TaskPlan:
    """What one job asks of LMArena: a captured session (retry mode), a new conversation, or a
    follow-up of a remembered one. Rebuilt with fresh ids for every attempt; a follow-up whose
    attempt failed turns into a new conversation (the whole history folded)."""

    __slots__ = ("chat", "cfg", "session", "followup", "new_turns", "learned", "conversation_id", "created",
                 "path", "size")

    def __init__(self, chat: ChatRequest, cfg: Config, session: SessionChoice | None,
                 followup=None, new_turns: list | None = None, learned: dict | None = None):
        self.chat, self.cfg, self.session, self.learned = chat, cfg, session, learned
        self.followup, self.new_turns = followup, new_turns
        self.conversation_id: str | None = None     # of the current attempt
        self.created = False                        # the current attempt starts a conversation
        self.path = ""                              # LMArena path of the current attempt
        self.size = 0                               # characters of the prompt it sends
        limit = cfg.max_prompt_chars
        if limit:
            size = len(self.content()[0])
            if size > limit:
                raise ApiError(413, f"The prompt is {size} characters; this bridge sends at most {limit} "
                               "(max_prompt_chars). Shorten the conversation or raise the limit.",
                               "prompt_too_long")

    def explain(self, err: ApiError) -> ApiError:
        """What a refusal means for this request. LMArena answers a very long prompt with 429 "prompt
        failed" (one source, 2.9), the same words as a rate limit: a long prompt's refusal is reported
        as prompt_too_long naming its size, and does not make the tab rest."""
        lower = err.message.lower()
        long_prompt = self.size >= LONG_PROMPT_CHARS
        if (err.code == "rate_limited" and "prompt failed" in lower and long_prompt) or (
                err.code in ("upstream_error", "attachment_too_large") and long_prompt and any(
                    w in lower for w in ("too long", "context length", "maximum context", "prompt is too"))):
            return ApiError(413, f"LMArena refused the prompt ({self.size} characters); at that size it is most "
                            "likely too long for LMArena (it says \"prompt failed\" for too-long prompts and for "
                            "rate limits alike). Shorten the conversation or the tool list, or set max_prompt_chars "
                            "to refuse such prompts up front.", "prompt_too_long")
        return err

    def content(self) -> tuple[str, list]:
        """(content, attachments) of the user turn this attempt sends."""
        if self.followup is not None:
            return fold_turns(self.new_turns)
        chat = self.chat
        turns = tavern_merge(chat.templates) if self.cfg.tavern_mode_enabled else chat.templates
        if chat.tools_prompt:
            turns = [{"role": "system", "content": chat.tools_prompt, "attachments": []}] + turns
        return fold_turns(turns)

    def task_message(self, rid: str, flags: dict) -> str:
        chat, cfg = self.chat, self.cfg
        if flags.get("new_conversation"):
            self.followup = None
        if self.session is not None:
            s = self.session
            turns = chat.templates
            if chat.tools_prompt:
                turns = [{"role": "system", "content": chat.tools_prompt, "attachments": []}] + turns
            templates = openai_to_templates_positions(turns, tavern=cfg.tavern_mode_enabled,
                                                      bypass=cfg.bypass_enabled, is_image=chat.ref.is_image,
                                                      mode=s.mode, target=s.target)
            request = build_retry_request(templates, s.session_id, s.message_id, chat.ref.id, chat.ref.is_image)
            self.size = sum(len(t["content"]) for t in templates)
            ids = (s.session_id, s.message_id)
        else:
            content, attachments = self.content()
            self.size = len(content)
            templates = [{"role": "user", "content": content, "attachments": attachments,
                          "participantPosition": "a"}]
            request, self.conversation_id = build_evaluation_request(
                chat.ref, content, attachments, self.followup.id if self.followup else None, self.learned)
            self.created = self.followup is None
            ids = (self.conversation_id, None)
        for flag in ("recaptcha", "rediscover_site_key"):
            if flags.get(flag):
                request[flag] = flags[flag]
        request["fields"] = TASK_FIELDS
        self.path = request["path"]
        payload = {"message_templates": templates, "target_model_id": chat.ref.id, "session_id": ids[0],
                   "message_id": ids[1], "is_image_request": chat.ref.is_image, "request": request}
        return json_text({"request_id": rid, "payload": payload})


class Conversations:
    """Recent conversations the bridge started (create mode), so a client that sends one back with
    our exact answer plus new turns is continued with only the new turns (2.3). Bounded by count and
    age. A conversation is remembered only after a clean answer, always under its latest state (an
    older prefix must never continue it), and forgotten when a follow-up fails."""

    @dataclasses.dataclass(slots=True)
    class Entry:
        id: str
        key: str
        used: float
        taken: bool = False      # a follow-up is (or was) sent on it: one at a time, never twice

    def __init__(self, limit: int = 256, max_age: float = 6 * 3600, on_evict=None):
        self.limit, self.max_age, self.on_evict = limit, max_age, on_evict
        self.by_key: dict[str, Conversations.Entry] = {}       # insertion order = age of last use

    @staticmethod
    def head(chat: ChatRequest) -> str:
        return json_text([chat.model, chat.ref.id, chat.ref.modality, chat.tools_prompt])

    def find(self, chat: ChatRequest):
        """(entry, index of the first new turn) when the request continues a conversation."""
        turns = chat.turns
        if not self.by_key or not any(t.role == "assistant" for t in turns[1:-1]):
            return None
        self.expire()
        digests = chain_digests(self.head(chat), chat.fingerprints)
        for k in range(len(turns) - 2, 0, -1):
            if turns[k].role != "assistant":
                continue
            entry = self.by_key.get(digests[k + 1])
            if entry is not None:
                if entry.taken:      # another request is extending it: this one starts anew
                    return None
                if any(t.role != "assistant" for t in turns[k + 1:]):
                    return entry, k + 1
                return None
        return None

    def remember(self, job: "Job", reply) -> None:
        plan = job.plan
        if plan is None or plan.session is not None or plan.conversation_id is None or job.error:
            return
        chat = plan.chat
        if plan.followup is not None:
            self.by_key.pop(plan.followup.key, None)
        key = chain_digests(self.head(chat), chat.fingerprints + ["assistant|" + reply.answer_key()])[-1]
        self.by_key[key] = self.Entry(plan.conversation_id, key, time.monotonic())
        while len(self.by_key) > self.limit:
            self._evict(next(iter(self.by_key.values())))

    def forget(self, entry) -> None:
        if self.by_key.pop(entry.key, None) is not None:
            log.info("conversation %s will not be continued again", entry.id[:8])
            if self.on_evict:
                self.on_evict(entry.id)

    def expire(self) -> None:
        now = time.monotonic()
        for entry in [e for e in self.by_key.values() if now - e.used > self.max_age]:
            self._evict(entry)

    def _evict(self, entry) -> None:
        self.by_key.pop(entry.key, None)
        if self.on_evict:
            self.on_evict(entry.id)


# 15. The tab link =================================================================================

MAX_TAB_STATUS_CHARS = 16384      # a tab's status report, as /health and the status page show it


class Tab(asyncio.Protocol):
    """One connected userscript tab: a worker that runs tasks concurrently. After the handshake it
    becomes the socket's protocol, so every read goes straight to the frame parser (no stream
    reader and no task switch per read: this is the per-token path).

    Whatever a tab sends is untrusted: each message is checked field by field, and a bad one is
    logged and ignored; it never drops the tab or touches other tasks."""

    def __init__(self, pool: "TabPool", proto: ServerProtocol, transport, origin: str, peer, name: str):
        self.pool, self.proto, self.transport = pool, proto, transport
        self.closed = asyncio.get_running_loop().create_future()
        self.name = name
        self.origin, self.peer = origin, peer
        self.jobs: dict[str, Job] = {}          # by request id of the attempt it runs
        self.assigned = 0
        self.version: str | None = None
        self.url: str | None = None
        self.status: dict = {}                  # the tab's last {"type": "status"} report
        self.last_error: str | None = None
        self.challenged_until = 0.0             # Cloudflare: no work until it reloads (or this passes)
        self.cool_until = 0.0                   # after a 429 / reCAPTCHA refusal: resting
        self.refresh_sent = False
        self.rest_reason = ""                   # why it rests: rate_limited, recaptcha_failed, budget
        self.budget: dict | None = None         # the account's budget from the last answer (note_budget)
        self.token_window_at = -math.inf        # when keep_token_ready was last sent
        self.last_seen = time.monotonic()
        self.pings = 0
        self.fragments: list[bytes] | None = None
        self.backlog: list | None = None         # frames received, not handled yet: see receive
        self.runs: dict = {}                    # job -> its text messages of this batch, fed as one

    # -- to the tab --
    def send(self, obj) -> bool:
        return self.send_text(obj if isinstance(obj, str) else json_text(obj))

    def send_text(self, text: str) -> bool:
        if self.proto.state is not WsState.OPEN:
            return False
        self.proto.send_text(wire_bytes(text))
        self.flush()
        return True

    def abort(self, rid: str) -> None:
        self.send({"command": "abort", "request_id": rid})

    def ping(self) -> None:
        if self.proto.state is WsState.OPEN:
            self.pings += 1
            self.proto.send_ping(str(self.pings).encode())
            self.flush()

    def flush(self) -> None:
        """Write whatever the protocol has to send (frames, pongs, close)."""
        transport = self.transport
        for data in self.proto.data_to_send():
            if transport.is_closing():
                return
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    transport.write_eof()

    # -- asyncio.Protocol callbacks --
    def data_received(self, data: bytes) -> None:
        try:
            self.receive(data)
        except Exception:      # the frame layer itself failed: the link is unusable
            log.exception("%s: failed to handle tab data; dropping the tab", self.name)
            self.transport.abort()
            return
        if self.proto.state is WsState.CLOSED:
            self.transport.close()

    def eof_received(self) -> bool:
        self.proto.receive_eof()
        self.flush()
        return False

    def connection_lost(self, exc) -> None:
        while self.backlog is not None:  # what the tab sent before it left counts (each pass is shorter)
            self.resume()
        if not self.closed.done():
            self.closed.set_result(None)

    def receive(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        self.proto.receive_data(data)
        frames = self.proto.events_received()
        self.flush()                  # pongs and close replies
        if self.backlog is not None:  # earlier frames wait for their turn: order is kept
            self.backlog.extend(frames)
        else:
            self.handle(frames)

    def handle(self, frames: list) -> None:
        """Handle frames in order. When an answer's first text comes in a burst (a read holding
        more than BURST_FRAMES messages after it), the rest waits for one turn of the event loop:
        the route writes the first text at once, and the burst follows in one write. A few
        messages are handled first (microseconds; an extra write would cost more)."""
        n = len(frames)
        for i, frame in enumerate(frames):
            op, started = frame.opcode, False
            if op is Opcode.TEXT or op is Opcode.BINARY:
                if frame.fin:
                    started = self.on_message(frame.data)
                else:
                    self.fragments = [frame.data]
            elif op is Opcode.CONT and self.fragments is not None:
                self.fragments.append(frame.data)
                if frame.fin:
                    data, self.fragments = b"".join(self.fragments), None
                    started = self.on_message(data)
            if started and n - 1 - i > BURST_FRAMES:
                self.backlog = frames[i + 1:]
                asyncio.get_running_loop().call_soon(self.resume)
                break
        if self.runs:
            runs, self.runs = self.runs, {}
            for job, parts in runs.items():
                self.feed(job, parts)
        self.pool.flush_dirty()

    def resume(self) -> None:
        frames, self.backlog = self.backlog, None
        if frames:
            try:
                self.handle(frames)
            except Exception:      # as in data_received: the link is unusable
                log.exception("%s: failed to handle tab data; dropping the tab", self.name)
                self.transport.abort()

    def on_message(self, raw: bytes) -> bool:
        """One message of the tab; True when it started an answer's output (see handle)."""
        try:
            msg = _json_decode(raw.decode())
        except (ValueError, RecursionError):     # UnicodeDecodeError is a ValueError too
            log.debug("%s sent something that is not JSON; ignored", self.name)
            return False
        if type(msg) is not dict:
            return False
        rid = msg.get("request_id")
        try:
            if rid is None:
                self.on_notice(msg)
                return False
            job = self.jobs.get(rid) if type(rid) is str else None
            if job is None:
                log.debug("%s: message for unknown task %s ignored", self.name, shown(rid, 60))
                return False
            data = msg.get("data")
            if type(data) is str and job.output and data != "[DONE]":
                # The answer is flowing: its texts of this batch are parsed as one (see handle).
                self.runs.setdefault(job, []).append(data)
                return False
            parts = self.runs.pop(job, None) if self.runs else None
            if parts:
                self.feed(job, parts)
            if "data" in msg:
                return job.on_tab_data(data)
            event = msg.get("event")
            if isinstance(event, str):
                job.on_stage(event)
                if event == "upstream_headers" and "ratelimit" in msg:
                    self.note_budget(msg["ratelimit"])
        except Exception:         # a bug here must not kill the tab link or the other tasks
            self.failed(rid)
        return False

    def feed(self, job: "Job", parts: list) -> None:
        """Texts of one job from one batch of frames: the parser takes any split, so one call."""
        try:
            job.on_tab_data(parts[0] if len(parts) == 1 else "".join(parts))
        except Exception:
            self.failed(job.rid)

    def failed(self, rid) -> None:
        log.exception("%s: could not handle a message", self.name)
        job = self.jobs.get(rid) if type(rid) is str else None
        if job is not None:
            job.fail(ApiError(502, "The bridge could not read LMArena's answer.", "upstream_error"))

    def on_notice(self, msg: dict) -> None:
        kind = msg.get("type")
        if kind == "hello":
            version, url = msg.get("version"), msg.get("url")
            self.version = version[:40] if isinstance(version, str) else "?"
            self.url = url[:300] if isinstance(url, str) else ""
            log.info("%s says hello: userscript %s at %s", self.name, shown(self.version), shown(self.url))
            self.send(SITE_RULES)          # what its learner leaves out of the page's own bodies
            if version_tuple(self.version) < version_tuple(USERSCRIPT_VERSION):
                log.warning("%s runs userscript %s; this bridge ships %s: paste the new userscript.js",
                            self.name, shown(self.version), USERSCRIPT_VERSION)
        elif kind in ("ids_captured", "models", "request_shape"):
            self.pool.report(self, kind, msg)
        elif kind == "status":
            status = {k: v for k, v in msg.items() if k != "type"}
            if len(json_text(status)) > MAX_TAB_STATUS_CHARS:     # echoed by every detailed /health
                log.warning("%s sent a status report over %d characters; ignored", self.name, MAX_TAB_STATUS_CHARS)
                return
            self.status = status
            if isinstance(msg.get("last_error"), str):
                self.last_error = msg["last_error"][:300]
        elif kind == "log":
            log.debug("%s: %s", self.name, shown(msg.get("message"), 300))
        else:
            log.debug("%s: unknown message type %s ignored", self.name, shown(kind, 40))

    def available(self, now: float) -> bool:
        return self.proto.state is WsState.OPEN and now >= self.challenged_until and now >= self.cool_until

    def note_budget(self, raw) -> None:
        """The account's budget from an answer's `ratelimit` header (2.9). With nothing left the tab
        rests until the window resets, like after a 429 but without spending a request on a certain
        refusal (reports say a few 429s in a row get an account flagged)."""
        budget = parse_ratelimit(raw)
        if budget is None:
            return
        now = time.monotonic()
        # The window is 5 minutes (2.9): a reset far beyond that is a misreading (a timestamp, or
        # milliseconds), and must not bench the tab for days.
        reset = min(budget["reset"] if budget["reset"] is not None else 300, BUDGET_MAX_RESET_SECONDS)
        self.budget = {"limit": budget["limit"], "remaining": budget["remaining"], "reset_at": now + reset}
        if budget["remaining"] <= 0:
            self.cool_until = max(self.cool_until, now + reset)
            self.rest_reason = "budget"
            log.warning("%s has used its LMArena budget (%s requests per window); it rests %d s until the "
                        "window resets", self.name, budget["limit"] if budget["limit"] is not None else "?", reset)

    def budget_view(self, now: float) -> dict | None:
        """/health's view of the budget: {"limit", "remaining", "reset_seconds"}, or None (unknown, or
        its window is over)."""
        b = self.budget
        if b is None or now >= b["reset_at"]:
            return None
        return {"limit": b["limit"], "remaining": b["remaining"], "reset_seconds": math.ceil(b["reset_at"] - now)}

    def rest(self, err: ApiError, cfg: Config, path: str = "") -> None:
        """What LMArena's refusal (at `path`) means for this tab: after a 429 or a refused check it
        takes no new task for Retry-After (or tab_cooldown_seconds); a stale model list is asked for
        again; a Cloudflare check makes it reload (once per check) and wait."""
        where = f" at {path}" if path else ""
        self.last_error = f"{err.code}{where}: {err.message[:200]}"
        log.info("%s: LMArena refused the request%s: %s", self.name, shown(where, 200), err.code)
        now = time.monotonic()
        if err.code in ("rate_limited", "recaptcha_failed"):
            rest = err.retry_after or cfg.tab_cooldown_seconds
            self.cool_until = max(self.cool_until, now + rest)
            self.rest_reason = err.code
            log.warning("%s rests for %g s after %s", self.name, rest, err.code)
        elif err.code == "model_unavailable":
            self.send({"command": "send_models"})     # the list is stale: refresh it
        elif err.code == "cloudflare_challenge":
            self.challenged_until = now + cfg.cloudflare_wait_seconds
            if not self.refresh_sent:
                self.refresh_sent = True
                log.warning("%s hit a Cloudflare check; asking it to reload", self.name)
                self.send({"command": "refresh"})

    def close(self, code: int = 1001, reason: str = "") -> None:
        if self.proto.state is WsState.OPEN:
            self.proto.send_close(code, reason)
            self.flush()


def origin_is_lmarena(origin: str) -> bool:
    try:
        u = urllib.parse.urlsplit(origin)
    except ValueError:
        return False
    host = (u.hostname or "").lower()
    return (u.scheme == "https" and u.path in ("", "/") and "@" not in u.netloc
            and any(host == h or host.endswith("." + h) for h in LMARENA_HOSTS))


def origin_matches(origin: str, allowed: list) -> bool:
    """CORS: an entry without a port matches every port of that scheme and host; "*" matches all."""
    if "*" in allowed:
        return True
    try:
        o = urllib.parse.urlsplit(origin)
        o_port = o.port
    except ValueError:
        return False
    for entry in allowed:
        try:
            e = urllib.parse.urlsplit(entry)
            e_port = e.port
        except ValueError:
            continue
        if e.scheme == o.scheme and (e.hostname or "").lower() == (o.hostname or "").lower() \
                and (e_port is None or e_port == o_port):
            return True
    return False


def is_loopback(peer) -> bool:
    try:
        ip = ipaddress.ip_address(peer[0] if isinstance(peer, tuple) else peer)
    except (ValueError, TypeError, IndexError):
        return isinstance(peer, str)     # a Unix socket ("" or a path) is local
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


# 16. The tab pool =================================================================================

class PoolOwner(typing.Protocol):
    """What the tab pool leaves to the bridge: the conversation memory, and what tabs report."""

    def job_ended(self, job: "Job") -> None:
        """A job is over: remember, forget or clean up its LMArena conversation."""

    def forget_followup(self, entry) -> None:
        """A follow-up of a remembered conversation failed: never continue that conversation."""

    def cleanup_conversation(self, conversation_id: str) -> None:
        """A conversation the bridge created will not be used again."""

    def tab_joined(self, tab: "Tab") -> None:
        """A tab connected (an armed capture is sent to it)."""

    def tab_report(self, tab: "Tab", kind: str, msg: dict) -> None:
        """A tab's ids_captured, models or request_shape report."""


class TabPool:
    """The connected tabs and the jobs they run: picking the least busy tab, assigning jobs and
    giving them another attempt (another tab after a 429, fresh tokens after a refused check),
    waiting for a tab after a Cloudflare check, pings. Tabs own their rests (Tab.rest); the pool
    only asks. Implements JobOwner for its jobs."""

    def __init__(self, files: "UserFiles", owner: PoolOwner):
        self.files, self.owner = files, owner
        self.tabs: list[Tab] = []
        self.jobs: dict[str, Job] = {}
        self.dirty: set[Job] = set()
        self.tab_counter = itertools.count(1)
        self.tab_event = asyncio.Event()       # set (and replaced) whenever tabs come or go
        self.cloudflare_since = 0.0
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- jobs --
    def start_job(self, job: Job) -> None:
        self.jobs[job.id] = job
        for tab in self.tabs:
            self.keep_token_ready(tab)
        tab = self.pick_tab(job)
        if tab is not None:
            self.assign(job, tab)
        else:                     # no tab right now: fail at once, or wait after a Cloudflare check
            job.dispatcher = self.spawn(self.dispatch(job))

    async def wait_job(self, job: Job, until_first: float | None = None) -> None:
        """Wait until the job ends (or, with `until_first`, until the tab's first message or that
        deadline), enforcing stream_response_timeout_seconds."""
        while not job.done and not (until_first is not None and job.received):
            now = time.monotonic()
            left = job.idle_left(self.files.config.stream_response_timeout_seconds, now)
            if left <= 0 or (until_first is not None and now >= until_first):
                return
            if until_first is not None:
                left = min(left, until_first - now)
            await job.woken(left)

    def job_output(self, job: Job) -> None:
        self.dirty.add(job)

    def retry_job(self, job: Job, err: ApiError) -> bool:
        """An attempt failed before any output: try again when that can help (a follow-up as a new
        conversation; a refused token with a fresh one, then the v2 check, on the same tab; another
        tab after a 429); True when a new attempt is under way."""
        tab, plan = job.tab, job.plan
        followup = plan.followup is not None
        can_retry = job.attempt < Job.MAX_RETRIES
        flags = retry_plan(err, followup, job.attempt) if can_retry else None
        if flags is not None and followup:
            log.info("task %s: the follow-up failed (%s); starting a new conversation", job.id[:8], err.code)
            self.owner.forget_followup(plan.followup)
        elif flags is not None:
            log.info("task %s: %s refused; trying again (%s)", job.id[:8], err.code, json_text(flags))
        else:
            self.note_upstream_error(tab, err, plan.path)   # the tab rests after a 429 or a final refusal
            if err.code in ("rate_limited", "recaptcha_failed") and tab is not None and can_retry:
                job.cooled.add(tab)
                if self.pick_tab(job) is not None:
                    flags = {}
        if flags is None:
            return False
        if tab is not None:
            tab.jobs.pop(job.rid, None)
        job.tab = None
        if plan.created and plan.conversation_id and not followup:
            self.owner.cleanup_conversation(plan.conversation_id)
        job.next_attempt(flags)
        other = tab if tab is not None and tab.available(time.monotonic()) and tab not in job.cooled \
            else self.pick_tab(job)
        if other is None:
            self.note_upstream_error(tab, err, plan.path)
            return False
        self.assign(job, other)
        return True

    def job_ended(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        self.dirty.discard(job)      # the route, woken, writes what is left with the ending
        self.owner.job_ended(job)

    def note_upstream_error(self, tab: "Tab | None", err: ApiError, path: str = "") -> None:
        if tab is not None:
            if err.code == "cloudflare_challenge":
                self.cloudflare_since = time.monotonic()
            tab.rest(err, self.files.config, path)

    def flush_dirty(self) -> None:
        if self.dirty:
            jobs, self.dirty = self.dirty, set()
            for job in jobs:
                if job.sink is not None:
                    job.sink()
                else:
                    job.wake.set()

    def fail_all(self, err: ApiError) -> None:
        for job in list(self.jobs.values()):
            job.fail(err)
        self.flush_dirty()

    # -- tabs --
    def pick_tab(self, job: Job | None = None, exclude: "Tab | None" = None) -> "Tab | None":
        now = time.monotonic()
        best = None
        for tab in self.tabs:
            if tab is exclude or not tab.available(now) or (job is not None and tab in job.cooled):
                continue
            if best is None or (len(tab.jobs), tab.assigned) < (len(best.jobs), best.assigned):
                best = tab
        return best

    def any_tab(self) -> "Tab | None":
        """A tab for a chore (cleanup): the least busy available one, else any."""
        return self.pick_tab() or (self.tabs[0] if self.tabs else None)

    def keep_token_ready(self, tab: "Tab") -> None:
        """Ask the tab to keep a reCAPTCHA token minted ahead for token_ready_seconds from now, so
        a request finds one ready (minting takes 0.1 s to seconds). Renewed while requests come
        (at most every quarter window); an idle browser stops asking Google for tokens."""
        window = self.files.config.token_ready_seconds
        now = time.monotonic()
        if window > 0 and now - tab.token_window_at > window / 4:
            tab.token_window_at = now
            tab.send({"command": "keep_token_ready", "action": RECAPTCHA_SUBMIT_ACTION, "seconds": window})

    def tab_changed(self) -> None:
        self.tab_event.set()
        self.tab_event = asyncio.Event()

    def assign(self, job: Job, tab: "Tab") -> None:
        job.tab, job.tab_name = tab, tab.name
        job.last_activity = time.monotonic()
        job.stages.setdefault("sent", job.last_activity)
        tab.jobs[job.rid] = job
        tab.assigned += 1
        try:
            sent = tab.send_text(job.message)
        except Exception:         # never leak a job: whatever failed, it ends with an answer
            log.exception("task %s: could not send it to %s", job.id[:8], tab.name)
            sent = False
        if not sent:
            job.fail(ApiError(502, "The task could not be sent to the LMArena tab.", "tab_disconnected"),
                     tell_tab=False)

    def cooling_error(self) -> ApiError | None:
        """All connected tabs rest after a 429 or a refused check: the client hears it at once."""
        now = time.monotonic()
        open_tabs = [t for t in self.tabs if t.proto.state is WsState.OPEN and now >= t.challenged_until]
        if open_tabs and all(now < t.cool_until for t in open_tabs):
            wait = max(1, math.ceil(min(t.cool_until for t in open_tabs) - now))
            if all(t.rest_reason == "budget" for t in open_tabs):
                why = "has used its LMArena request budget for this window (LMArena's ratelimit header)"
            else:
                why = "is resting after LMArena refused requests (rate limit or bot check)"
            return ApiError(429, f"Every LMArena tab {why}; try again in {wait} s.", "rate_limited",
                            retry_after=wait)
        return None

    async def dispatch(self, job: Job) -> None:
        """Give the job to the least busy tab; after a Cloudflare challenge wait for a tab to return."""
        tab = self.pick_tab(job)
        if tab is None:
            resting = self.cooling_error()
            if resting is not None:
                job.fail(resting)
                return
            wait = self.files.config.cloudflare_wait_seconds
            cf_recent = time.monotonic() - self.cloudflare_since < wait
            if not cf_recent:
                job.fail(no_tab_error())
                return
            end = time.monotonic() + wait
            while tab is None and time.monotonic() < end and not job.done:
                event = self.tab_event
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(1.0, end - time.monotonic())):
                        await event.wait()
                tab = self.pick_tab(job)
            if tab is None:
                job.fail(ApiError(503, "LMArena is showing a Cloudflare check and no tab came back in "
                                  f"{wait:g} s. Open the LMArena tab and complete the check.",
                                  "cloudflare_challenge", retry_after=30))
                return
        if not job.done:
            self.assign(job, tab)

    def add_tab(self, tab: "Tab") -> None:
        self.tabs.append(tab)
        self.cloudflare_since = 0.0 if tab.available(time.monotonic()) else self.cloudflare_since
        log.info("%s connected from %s (%d tab%s)", tab.name, shown(tab.origin), len(self.tabs),
                 "" if len(self.tabs) == 1 else "s")
        self.owner.tab_joined(tab)
        self.keep_token_ready(tab)
        self.tab_changed()

    def remove_tab(self, tab: "Tab") -> None:
        if tab in self.tabs:
            self.tabs.remove(tab)
        orphans = list(tab.jobs.values())
        tab.jobs.clear()
        log.info("%s disconnected (%d left%s)", tab.name, len(self.tabs),
                 f", {len(orphans)} task(s) affected" if orphans else "")
        for job in orphans:
            if job.done:
                continue
            job.tab = None
            other = None if (job.received or job.attempt) else self.pick_tab(job, exclude=tab)
            if other is not None:
                log.info("task %s: %s vanished before answering; retrying on %s", job.id[:8], tab.name,
                         other.name)
                job.next_attempt({})
                self.assign(job, other)
            else:
                job.fail(ApiError(502, "The LMArena tab closed or reloaded while answering. Try again.",
                                  "tab_disconnected"), tell_tab=False)
        self.flush_dirty()
        self.tab_changed()

    def report(self, tab: "Tab", kind: str, msg: dict) -> None:
        self.owner.tab_report(tab, kind, msg)

    def close_all(self, abort: bool = False) -> None:
        for tab in list(self.tabs):
            if abort:
                tab.transport.abort()
            else:
                tab.close(1001, "bridge shutting down")

    async def ping_loop(self) -> None:
        while True:
            cfg = self.files.config
            await asyncio.sleep(cfg.ws_ping_interval_seconds)
            now = time.monotonic()
            for tab in list(self.tabs):
                if now - tab.last_seen > cfg.ws_ping_interval_seconds + cfg.ws_ping_timeout_seconds:
                    log.warning("%s stopped answering pings; dropping it", tab.name)
                    tab.transport.abort()
                else:
                    tab.ping()

    async def serve_tab(self, conn: "Connection", req: HttpRequest) -> None:
        origin = req.header("origin") or ""
        cfg = self.files.config
        # The head was already parsed by our HTTP layer: one ServerProtocol validates the handshake
        # and renders the 101 (or the refusal), a second one in state OPEN handles the frames.
        handshake = ServerProtocol(max_size=WS_MAX_MESSAGE)
        ws_req = WsRequest(req.target, WsHeaders([(k, v) for k, v in req.headers]))
        if not (origin_is_lmarena(origin) or origin in cfg.allowed_tab_origins):
            response = handshake.reject(403, f"Origin {origin or '(none)'} may not connect as a tab: only "
                                        "LMArena pages (and allowed_tab_origins) may.\n")
            log.warning("refused a tab socket from origin %s", shown(origin))
        elif not cfg.allow_remote_tabs and not is_loopback(conn.peer):
            # A tab sees every prompt; Origin is only a header, so a remote process could forge it.
            response = handshake.reject(403, "Tabs must run on this machine (allow_remote_tabs).\n")
            log.warning("refused a tab socket from %s (not this machine)", conn.peer)
        else:
            response = handshake.accept(ws_req)
        if response.status_code != 101:
            await conn.write(response.serialize())
            return
        conn.transport.write(response.serialize())
        conn.responded = True
        proto = ServerProtocol(max_size=WS_MAX_MESSAGE, state=WsState.OPEN)
        tab = Tab(self, proto, conn.transport, origin, conn.peer, f"tab{next(self.tab_counter)}")
        # No await since the head was read: hand the socket to the tab (a client must wait for the
        # 101 before sending frames anyway, but whatever came is passed on).
        leftover = conn.upgrade(tab)
        self.add_tab(tab)
        try:
            if leftover:
                tab.data_received(leftover)
            await tab.closed
        finally:
            self.remove_tab(tab)


# 17. HTTP connection driver =======================================================================

_TCP_INFO = getattr(socket, "TCP_INFO", None)


_TCP_ESTABLISHED, _TCP_CLOSE = 1, 7


PEER_POLL_SECONDS = 0.15          # how often a socket we cannot read is checked for its client leaving


def _time_out(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Connection(asyncio.Protocol):
    """One client connection: reads requests under deadlines, answers them in order (pipelining),
    keeps alive, upgrades /ws to a tab link. Never sends an error once a response has started.

    It is the socket's asyncio protocol: bytes land in `buf` as they arrive (pipelined requests
    included), and a client that leaves is noticed at once, also while a job runs (the job is told,
    and the tab aborts), without a reader task per request.

    A client that half-closes after its request (shutdown(SHUT_WR), as some tools do) still gets
    its answer: HTTP allows it. EOF alone cannot tell that from a client that left, so while a
    request runs we send one `100 Continue` (RFC 9110 15.2: clients must accept unexpected 1xx) as
    a probe: a client that is really gone answers it with a reset, noticed at once."""

    def __init__(self, bridge: "Bridge"):
        # Per-connection state
        self.bridge = bridge
        self.transport: asyncio.Transport | None = None
        self.peer = None
        self.remote_ip: str | None = None     # None for this machine (loopback)
        self.buf = bytearray()
        self.eof = False              # the client will send nothing more (half-closed or gone)
        self.lost = False             # the connection is gone
        self.waiter: asyncio.Future | None = None        # run() waits for bytes
        self.drain_waiter: asyncio.Future | None = None  # run() waits for the client to read
        self.write_paused = False
        self.read_paused = False
        self.peer_poll: asyncio.TimerHandle | None = None
        self.linger = False           # an error answer was sent with Connection: close
        self.busy = False             # a request is being answered (idle ones close at shutdown)
        self.task: asyncio.Task | None = None
        # Per-request state
        self.responded = False
        self.http11 = True
        self.probed = False
        self.on_gone = None           # called when the client leaves while a job runs

    # -- asyncio.Protocol callbacks --
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        bridge = self.bridge
        cfg = bridge.files.config
        self.remote_ip = None if is_loopback(self.peer) else str(self.peer[0] if isinstance(self.peer, tuple) else self.peer)
        # Peers other than this machine: max_connections_per_peer each, and together all but an
        # eighth of max_connections, so loopback clients and tabs always find room.
        crowded = self.remote_ip is not None and (
            bridge.peer_connections[self.remote_ip] >= cfg.max_connections_per_peer
            or sum(bridge.peer_connections.values()) >= cfg.max_connections - max(1, cfg.max_connections // 8))
        if bridge.stopping or crowded or len(bridge.connections) >= cfg.max_connections:
            body = json_text(ApiError(503, "Too many open connections.", "too_many_connections").body()).encode()
            transport.write(response_head(503, [("Content-Type", "application/json"), ("Retry-After", "1"),
                                                ("Content-Length", str(len(body))),
                                                ("Connection", "close")]) + body)
            transport.close()
            return
        bridge.connections.add(self)
        if self.remote_ip is not None:
            bridge.peer_connections[self.remote_ip] += 1
        self.task = asyncio.get_running_loop().create_task(self.run())
        bridge.track(self.task)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None:
            if not self.waiter.done():
                self.waiter.set_result(None)
        elif len(self.buf) > self.bridge.files.config.max_head_bytes and not self.read_paused:
            # Nobody is reading (a job runs): keep pipelined bytes, but not without bound. While
            # paused we cannot see the client leave, so its TCP state is checked meanwhile.
            self.read_paused = True
            self.transport.pause_reading()
            self._poll_later()

    def eof_received(self) -> bool:
        self.eof = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        if self.on_gone is not None:
            if self.responded:        # a client does not half-close in the middle of an answer
                self.gone()
            else:
                self._probe()
        return True                   # keep the transport: a half-closed client still reads

    def connection_lost(self, exc) -> None:
        self.lost = self.eof = True
        if self.peer_poll is not None:
            self.peer_poll.cancel()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_exception(ConnectionResetError("client went away"))
        self._leave()
        self.gone()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def _probe(self) -> None:
        """EOF while a request runs: a `100 Continue` makes a client that is gone answer with a
        reset; as asyncio reads no more after EOF, the socket's state is then polled."""
        if self.http11 and not self.probed and not self.responded:
            self.probed = True
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._poll_later()

    def _poll_later(self) -> None:
        if self.peer_poll is None and not self.lost:
            self.peer_poll = asyncio.get_running_loop().call_later(PEER_POLL_SECONDS, self._poll_peer)

    def _poll_peer(self) -> None:
        """We cannot read the socket (reading paused, or after EOF): check its TCP state. A reset
        means the client left (the job is told at once); a client that stopped sending while we
        are paused lets us read again (what is left is bounded by the kernel's buffer)."""
        self.peer_poll = None
        if self.lost:
            return
        state, error = _TCP_ESTABLISHED, 0
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError, TypeError):
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if _TCP_INFO is not None:
                state = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 8)[0]
        if error or state == _TCP_CLOSE:
            self.gone()
            self.transport.abort()
            return
        if self.read_paused and state != _TCP_ESTABLISHED:
            self.read_paused = False
            self.transport.resume_reading()
        if self.read_paused or (self.eof and self.on_gone is not None):
            self._poll_later()

    def gone(self) -> None:
        if self.on_gone is not None:
            on_gone, self.on_gone = self.on_gone, None
            on_gone()

    def watch(self, on_gone) -> None:
        """Call `on_gone()` at once if the client leaves while a job runs (None: stop watching)."""
        self.on_gone = on_gone
        if on_gone is None:
            return
        if self.lost:
            self.gone()
        elif self.eof:
            self._probe()

    def upgrade(self, protocol: asyncio.Protocol) -> bytes:
        """Hand the socket to another protocol (a tab); returns bytes already read past the head."""
        leftover, self.buf = bytes(self.buf), bytearray()
        self.transport.set_protocol(protocol)
        self._leave()
        return leftover

    def _leave(self) -> None:
        bridge = self.bridge
        if self in bridge.connections:
            bridge.connections.discard(self)
            if self.remote_ip is not None:
                bridge.peer_connections[self.remote_ip] -= 1
                if bridge.peer_connections[self.remote_ip] <= 0:
                    del bridge.peer_connections[self.remote_ip]

    async def _fill(self, deadline: float | None) -> bool:
        """Wait for more bytes in the buffer before the deadline; False at EOF."""
        if self.eof:
            return False
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise TimeoutError
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        size = len(self.buf)
        loop = asyncio.get_running_loop()
        self.waiter = waiter = loop.create_future()
        # A plain timer, not asyncio.timeout: this runs for every request (see Job.woken).
        timer = None if deadline is None else loop.call_at(deadline, _time_out, waiter)
        try:
            await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()
        return len(self.buf) > size

    async def run(self) -> None:
        first = True
        try:
            while True:
                cfg = self.bridge.files.config
                req = await self.read_head(first, cfg)
                if req is None:
                    return
                first = False
                self.responded = self.probed = False
                self.http11 = req.version == "HTTP/1.1"
                self.busy = True
                if not await self.bridge.routes.handle(self, req):
                    return
                self.busy = False
                if self.bridge.stopping:
                    return
        except HttpError as exc:
            if not self.responded:
                with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                    await self.send_error(ApiError(exc.status, exc.message, "invalid_request_error"
                                                   if exc.status == 400 else None), close=True)
        except TimeoutError:
            if not self.responded:
                with contextlib.suppress(Exception):
                    await self.send_error(ApiError(408, "The request was not received in time.",
                                                   "request_timeout"), close=True)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        except asyncio.CancelledError:
            self.transport.abort()
            raise
        except Exception:             # a bug: say so once, never leave the client hanging
            log.exception("internal error while serving %s", self.peer)
            if not self.responded:
                with contextlib.suppress(Exception):
                    await self.send_error(ApiError(500, "Internal error in the bridge; see its log.",
                                                   "internal_error"), close=True)
        finally:
            if self.transport.get_protocol() is self:
                await self.close()

    async def close(self) -> None:
        """After an error answer the client may still be sending the body we refused: half-close
        and discard its bytes for a moment (a lingering close), so it reads our answer instead of
        a connection reset. Whatever happens, the transport is gone a few seconds later."""
        transport = self.transport
        if self.linger and not self.eof and not transport.is_closing() and transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError, TimeoutError, ConnectionError):
                transport.write_eof()
                deadline = time.monotonic() + 2
                for _ in range(256):
                    self.buf.clear()
                    if not await self._fill(deadline):
                        break
        pending = transport.get_write_buffer_size()
        transport.close()
        if pending:          # a client that never reads cannot keep the socket open for long
            asyncio.get_running_loop().call_later(5, transport.abort)

    async def read_head(self, first: bool, cfg: Config) -> HttpRequest | None:
        limit = cfg.max_head_bytes
        # Idle: between keep-alive requests (or before the first byte) we wait without a response.
        idle = cfg.keep_alive_timeout_seconds if not first else cfg.head_timeout_seconds
        while self.buf[:2] == b"\r\n":          # RFC 9112 2.2: ignore CRLF before a request line
            del self.buf[:2]
        if not self.buf:
            try:
                if not await self._fill(time.monotonic() + idle):
                    return None
            except TimeoutError:
                return None
            while self.buf[:2] == b"\r\n":
                del self.buf[:2]
        deadline = time.monotonic() + cfg.head_timeout_seconds
        start = 0
        while True:
            end = self.buf.find(b"\r\n\r\n", start)
            if end >= 0:
                if end > limit:
                    raise HttpError(431, f"request head larger than {limit} bytes")
                head = bytes(self.buf[:end])
                del self.buf[:end + 4]
                return parse_request_head(head)
            # Past the limit only the blank line that ends a head of exactly `limit` may still come.
            if len(self.buf) > limit and not b"\r\n\r\n".startswith(bytes(self.buf[limit:limit + 5])):
                raise HttpError(431, f"request head larger than {limit} bytes")
            start = max(0, len(self.buf) - 3)
            if not await self._fill(deadline):
                if self.buf:
                    raise HttpError(400, "connection closed in the middle of a request head")
                return None

    async def read_body(self, req: HttpRequest, cfg: Config) -> bytes:
        limit = cfg.max_body_bytes
        if req.content_length is not None and req.content_length > limit:
            raise ApiError(413, f"Request body of {req.content_length} bytes is larger than max_body_bytes "
                           f"({limit}).", "request_too_large", close=True)
        if not req.chunked and not req.content_length:
            return b""
        if req.expect_continue and not self.buf:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        deadline = time.monotonic() + cfg.body_timeout_seconds
        try:
            if req.chunked:
                dec = ChunkedDecoder(limit)
                done = dec.feed(bytes(self.buf))
                self.buf.clear()
                while not done:
                    if not await self._fill(deadline):
                        raise HttpError(400, "connection closed in the middle of a chunked body")
                    data = bytes(self.buf)
                    self.buf.clear()
                    done = dec.feed(data)
                self.buf += dec.leftover
                return dec.body()
            n = req.content_length
            while len(self.buf) < n:
                if not await self._fill(deadline):
                    raise HttpError(400, "connection closed before the whole body arrived")
            body = bytes(self.buf[:n])
            del self.buf[:n]
            return body
        except HttpError as exc:
            if exc.status == 413:
                raise ApiError(413, f"Request body is larger than max_body_bytes ({limit}).",
                               "request_too_large", close=True) from None
            raise

    # -- writing --
    async def write(self, data: bytes) -> None:
        """Write and, if the client is slow to read, wait for it (for so long, then give up)."""
        if self.transport.is_closing():
            raise ConnectionResetError("client went away")
        self.responded = True
        self.transport.write(data)
        if self.write_paused:
            self.drain_waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self.bridge.files.config.body_timeout_seconds):
                    await self.drain_waiter
            finally:
                self.drain_waiter = None

    def base_headers(self, req: HttpRequest | None) -> list:
        headers = [("Server", f"lmarena-bridge/{VERSION}")]
        origin = req.header("origin") if req else None
        if origin and self.bridge.routes.cors_allowed(origin):
            headers += [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
                        ("Access-Control-Expose-Headers", "Retry-After, X-Request-Id, Request-Id")]
        return headers

    def keeps_alive(self, req: HttpRequest | None, close: bool = False) -> bool:
        return not close and req is not None and req.keep_alive and not self.eof

    async def send(self, status: int, body: bytes, content_type: str = "application/json",
                   req: HttpRequest | None = None, extra: list | None = None, close: bool = False,
                   head_only: bool = False) -> bool:
        """A complete response; returns whether the connection stays open."""
        keep = self.keeps_alive(req, close)
        headers = self.base_headers(req) + (extra or [])
        headers += [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        if not keep:
            headers.append(("Connection", "close"))
            self.linger = status >= 400
        elif req.version == "HTTP/1.0":
            headers.append(("Connection", "keep-alive"))
        await self.write(response_head(status, headers) + (b"" if head_only else body))
        return keep

    async def send_json(self, status: int, obj, req: HttpRequest | None = None, **kw) -> bool:
        return await self.send(status, wire_bytes(json.dumps(obj, ensure_ascii=False)), req=req, **kw)

    async def send_error(self, err: ApiError, req: HttpRequest | None = None, close: bool = False,
                         head_only: bool = False, body: dict | None = None) -> bool:
        extra = [("Retry-After", str(err.retry_after))] if err.retry_after else []
        if not err.retryable:
            extra.append(("x-should-retry", "false"))
        extra += err.headers
        return await self.send_json(err.status, body or err.body(), req=req, extra=extra,
                                    close=close or err.close, head_only=head_only)


class StreamWriter:
    """Everything of one streamed response that goes on the wire: the status line and headers,
    chunk frames (or an HTTP/1.0 close-delimited body), batching of token bursts, keep-alive
    comments and the end. Formats (OpenAI's chunks, Anthropic's events) only hand it text.

    Tokens that arrive within FLUSH_INTERVAL of the last write wait for the rest of the burst, so
    thousands of tokens become a few chunks; the first text of an answer is never held back."""

    __slots__ = ("conn", "req", "headers", "http10", "pending", "started", "last_write", "timer",
                 "on_gone", "limit", "wrote_text")

    def __init__(self, conn: Connection, req: HttpRequest, headers: list, on_gone, limit: int):
        self.conn, self.req, self.on_gone, self.limit = conn, req, on_gone, limit
        self.http10 = req.version == "HTTP/1.0"
        self.headers = conn.base_headers(req) + [
            ("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-store"),
            ("X-Accel-Buffering", "no")] + headers + [
            ("Connection", "close") if self.http10 else ("Transfer-Encoding", "chunked")]
        self.pending: list[str] = []
        self.started = False
        self.wrote_text = False
        self.last_write = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None

    def _frame(self, data: bytes) -> bytes:
        return data if self.http10 else chunk_frame(data)

    def start(self, text: str, answered: bool) -> None:
        """Send the head with the first text (`answered`: it holds answer text already)."""
        self.started = True
        self.conn.responded = True
        self.wrote_text = answered
        self.conn.transport.write(response_head(200, self.headers) + self._frame(wire_bytes(text)))
        self.last_write = time.monotonic()

    def push(self, text: str) -> None:
        if not text:
            return
        self.pending.append(text)
        if self.started and self.timer is None:
            self.flush()

    def keepalive(self) -> None:
        if not self.pending and not self.conn.transport.is_closing():
            self.conn.transport.write(self._frame(b": keep-alive\n\n"))
        self.last_write = max(self.last_write, time.monotonic())   # never spin, even if the write waits

    def flush(self) -> None:
        transport = self.conn.transport
        if not self.pending or self.timer is not None:
            return
        if transport.is_closing():
            self.pending.clear()
            self.on_gone()
            return
        now = time.monotonic()
        wait = self.last_write + FLUSH_INTERVAL - now
        if wait > 0 and self.wrote_text:
            self.timer = asyncio.get_running_loop().call_later(wait, self._timed_flush)
            return
        data = wire_bytes("".join(self.pending))
        self.pending.clear()
        transport.write(self._frame(data))
        self.wrote_text = True
        self.last_write = now
        if transport.get_write_buffer_size() > self.limit:
            # The client stopped reading: memory stays bounded, the tab stops working for nobody.
            log.warning("a streaming client is not reading; dropping it")
            self.on_gone()
            transport.abort()

    def _timed_flush(self) -> None:
        self.timer = None
        self.flush()

    async def end(self, text: str) -> bool:
        """The rest, the end of the body; returns whether the connection stays open."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pending.append(text)
        data = self._frame(wire_bytes("".join(self.pending)))
        self.pending.clear()
        head = b"" if self.started else response_head(200, self.headers)
        self.started = True
        if self.http10:
            await self.conn.write(head + data)
            return False
        await self.conn.write(head + data + b"0\r\n\r\n")
        return self.conn.keeps_alive(self.req)


# 18. Diagnosis ====================================================================================
#    One list of checks, from the config to LMArena, read from /health's detailed view; `python
#    bridge.py doctor` prints it, `GET /` renders it with the tabs and the recent requests.


def _age(seconds) -> str:
    if seconds is None:
        return "never"
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


NO_TAB_ADVICE = ("open https://arena.ai with the userscript enabled. If its title shows ⛔, the tab cannot "
                 "reach the bridge; its console (F12) says which of two causes: a port other than the "
                 "bridge's (\"Cannot reach the bridge at ws://...\": set localStorage['lmarena-bridge-url'] "
                 "= 'ws://127.0.0.1:<the bridge's port>/ws' there and reload), or the browser blocking "
                 "local network access (net::ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS: allow it under "
                 "lock icon > Site settings, then reload)")


def _obj(value) -> dict:
    return value if isinstance(value, dict) else {}


def doctor_checks(health: dict) -> list[tuple[bool | None, str, str, str]]:
    """(passed, check, detail, what to do) for every link from the bridge to LMArena; passed None
    is a note (shown as "note", neither ok nor FAIL)."""
    checks = []
    add = checks.append
    health = _obj(health)       # a tab's report or another program's answer: any JSON at all
    cfg = _obj(health.get("config"))
    if cfg.get("error"):
        add((False, "config", str(cfg["error"]), "fix the file (the bridge keeps using its last good version)"))
    elif cfg.get("placeholder_ids") and health.get("session_mode") == "retry":
        add((False, "config", f"session_mode is \"retry\" but the session ids in {cfg.get('path', CONFIG_NAME)} "
             "are placeholders: every request fails with session_not_configured", "run `python bridge.py "
             "capture` and click Retry on an answer in the tab, or set \"session_mode\": \"create\""))
    else:
        add((True, "config", f"{cfg.get('path', CONFIG_NAME)} is valid (session_mode "
             f"{health.get('session_mode')})", ""))
    add((True, "bridge", f"version {health.get('version')} answering, {health.get('tasks_in_flight', 0)} "
         "task(s) in flight", ""))
    tabs = [t for t in health.get("tab_details") or () if isinstance(t, dict)] \
        if isinstance(health.get("tab_details"), list) else []
    if not tabs:
        add((False, "tabs", "no LMArena tab is connected", NO_TAB_ADVICE))
    for t in tabs:
        name = str(t.get("name", "tab"))
        status = _obj(t.get("status"))
        version = str(t.get("userscript") or "?")
        older = version_tuple(version) < version_tuple(USERSCRIPT_VERSION)
        add((True, f"{name} userscript", f"{version}" + (f" (older than this bridge's {USERSCRIPT_VERSION}: "
                                                          "paste the new userscript.js)" if older else ""), ""))
        logged = status.get("logged_in")
        last = str(t.get("last_error") or "")
        if "session_not_owned" in last:
            add((False, f"{name} login", "LMArena says you are logged out (or the session is another "
                 "account's)", "log in again in the LMArena tab"))
        elif t.get("cloudflare_check"):
            add((False, f"{name} site", "a Cloudflare check is showing", "open the tab and complete the check"))
        else:
            add((True, f"{name} site", f"{t.get('url') or '?'}; logged in: "
                 f"{'yes' if logged else 'no' if logged is False else 'unknown'}", ""))
        recaptcha = _obj(status.get("recaptcha"))
        if not status:
            add((False, f"{name} recaptcha", "the tab has not reported its state",
                 "update the userscript (paste userscript.js) and reload the tab"))
        elif recaptcha.get("loaded"):
            add((True, f"{name} recaptcha", f"loaded, site key {recaptcha.get('site_key') or 'unknown'}", ""))
        else:
            add((False, f"{name} recaptcha", "reCAPTCHA is not loaded in the page",
                 "reload the LMArena tab; an ad or script blocker may block www.google.com/recaptcha"))
        actions = _obj(status.get("actions"))
        if status:
            found = [k for k in ("generateUploadUrl", "getSignedUrl") if actions.get(k)]
            ok = len(found) == 2
            add((ok, f"{name} uploads", "upload actions found" if ok else "upload actions not found "
                 "(attachments go as data: URLs)", "" if ok else "reload the tab; if it stays, the site "
                 "changed: attachments may fail"))
        budget = t.get("budget") if isinstance(t.get("budget"), dict) else None
        if budget is not None:
            left = budget.get("remaining")
            add((bool(left), f"{name} budget", f"{left} of {budget.get('limit')} requests left, the window "
                 f"resets in {budget.get('reset_seconds')} s", "" if left else "wait for the window to reset"))
        if t.get("resting_seconds"):
            add((False, f"{name} rate", f"resting {t['resting_seconds']} s after LMArena refused requests",
                 "wait, or send one message by hand in the tab"))
        if last and "session_not_owned" not in last:     # a note, not a passed check: never "ok ... error"
            add((None, f"{name} last error", last, "see the bridge's log for that request"))
    models = health.get("models", 0)
    models = models if isinstance(models, int) else 0
    at = health.get("models_reported_at")
    age = time.time() - at if isinstance(at, (int, float)) else None
    source = {"catalog": "the site's model catalog", "page": "the page's data",
              "text/direct": "the /text/direct page"}.get(str(health.get("models_source") or ""), "the page")
    add((models > 0, "models", f"{models} known, " + (f"list from {source} {_age(age)}" if age is not None
                                                      else "no list reported by a tab yet"),
         "" if models else "open https://arena.ai/text/direct in the tab so it reports the model list"))
    browser = health.get("browser")            # the browser launcher, only when launched
    if isinstance(browser, dict) and browser:
        add(browser_check(browser))
    shape = _obj(health.get("request_shape"))
    add((True, "request shape", f"learned {_age(shape.get('age_seconds'))}" + (
        f" ({', '.join(shape.get('fields') or [])})" if shape.get("fields") else " (none needed so far)"), ""))
    return checks


def _check_word(ok) -> str:
    return "ok" if ok else "note" if ok is None else "FAIL"


def status_page(health: dict, checks: list) -> str:
    """The status page: the same facts as `doctor`, the tabs and the recent requests (never prompts).
    Plain HTML that refreshes itself; no scripts, no outside resources."""
    e = html.escape
    rows = "".join(f"<tr class={_check_word(ok)}><td>{_check_word(ok)}</td><td>{e(name)}</td>"
                   f"<td>{e(detail)}{(' — ' + e(todo)) if todo and not ok else ''}</td></tr>"
                   for ok, name, detail, todo in checks)
    def budget(t):
        b = t.get("budget") if isinstance(t.get("budget"), dict) else None
        return "unknown" if b is None else f"{b.get('remaining')}/{b.get('limit')}, resets in {b.get('reset_seconds')} s"
    if "tab_details" not in health:     # not this machine and no key: the summary only, as /health
        rows = ("<tr><td>Checks, tabs and recent requests are shown to this machine, or with the API "
                "key (Authorization: Bearer).</td></tr>")
    tabs = "".join(f"<tr><td>{e(str(t.get('name')))}</td><td>{e(str(t.get('userscript')))}</td>"
                   f"<td>{e(str(t.get('url') or ''))}</td><td>{e(str(t.get('tasks', 0)))}</td>"
                   f"<td>{e(budget(t))}</td>"
                   f"<td>{e(str(t.get('last_error') or ''))}</td></tr>" for t in health.get("tab_details") or [])
    recent = "".join(f"<tr><td>{e(str(r['id']))}</td><td>{e(str(r['model']))}</td><td>{r['status']}"
                     f"{(' ' + e(str(r['error']))) if r.get('error') else ''}</td><td>{r['ms']:.0f} ms</td>"
                     f"<td>{e(', '.join(f'{k} {v:.0f}' for k, v in r.get('stages_ms', {}).items()))}</td></tr>"
                     for r in reversed(health.get("recent_requests") or []))
    failed = sum(1 for ok, *_ in checks if ok is False)
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="5"><title>LMArena Bridge {e(str(health.get('version')))}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;margin:.5em 0 1.5em}}
td,th{{border-bottom:1px solid #ddd;padding:.3em .8em;text-align:left;vertical-align:top}}
.ok td:first-child{{color:#080}}.fail td:first-child{{color:#b00;font-weight:bold}}</style></head><body>
<h1>LMArena Bridge {e(str(health.get('version')))}</h1>
<p>{'' if not checks else 'All checks passed.' if not failed else f'{failed} check(s) failed.'} {health.get('tabs', 0)} tab(s),
{health.get('tasks_in_flight', 0)} task(s) in flight. API base: <code>/v1</code>. This page refreshes every 5 s.</p>
<h2>Checks</h2><table>{rows}</table>
{browser_section(health.get("browser"))}
<h2>Tabs</h2><table><tr><th>tab</th><th>userscript</th><th>page</th><th>tasks</th><th>budget</th><th>last error</th></tr>{tabs}</table>
<h2>Recent requests</h2><table><tr><th>id</th><th>model</th><th>status</th><th>time</th><th>stages (ms)</th></tr>{recent}</table>
</body></html>"""


# 19. Routes =======================================================================================
#    `Routes` is given what it works with (the user files, the tab pool, the conversation memory,
#    the capture, the request statistics, the health report) and touches nothing else.


_LOCAL_HOSTS = {"localhost", "127.0.0.1", "[::1]", "::1"}


def _host_name(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):
        return value[:value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _allowed_methods(route: dict) -> str:
    return ", ".join(sorted(set(route) | ({"HEAD"} if "GET" in route else set()) | {"OPTIONS"}))


def _method_error(route: dict) -> ApiError:
    allow = _allowed_methods(route)
    return ApiError(405, f"Method not allowed here; use {allow}.", "method_not_allowed",
                    headers=[("Allow", allow)])


def parse_json_body(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}", "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply.", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", "invalid_json")
    return data


def chat_from_body(body: bytes, files: "UserFiles", api: ClientApi) -> ChatRequest:
    """Body bytes -> the client's conversation, ready for LMArena. Pure; may run in a thread."""
    cfg = files.config
    data = parse_json_body(body)
    try:
        return prepare(api.conversation(data, cfg), cfg, files.models, files.endpoint_map)
    except ApiError as err:      # the log line and the status page name the model when there is one
        err.model = data.get("model")
        raise


async def off_loop(body: bytes, work, *args):
    """Run `work` (pure) on the event loop for small bodies, in a thread for large ones, so one big
    request never stalls the others (/health stays quick while 64 MiB are parsed)."""
    if len(body) <= THREAD_PARSE_BYTES:
        return work(*args)
    return await asyncio.to_thread(work, *args)


class Routes:
    """The HTTP API. One method per endpoint, each `(conn, req, body, started) -> keep-alive`."""

    def __init__(self, files: "UserFiles", pool: "TabPool", memory: "Conversations", capture: "Capture",
                 stats: "Stats", health):
        self.files, self.pool, self.memory, self.capture, self.stats = files, pool, memory, capture, stats
        self.health = health                    # (detailed) -> the /health answer
        self.host, self.url = "", ""            # where the server listens: see bound()
        self.last_api_request = time.monotonic()
        self.session_counter = itertools.count()  # turns through a model's captured sessions
        self.responses = ResponseStore()          # kept /v1/responses answers
        self.table = {
            "/v1/chat/completions": {"POST": self.route_chat},
            "/chat/completions": {"POST": self.route_chat},
            "/v1/messages": {"POST": self.route_messages},
            "/v1/messages/count_tokens": {"POST": self.route_count_tokens},
            "/v1/responses": {"POST": self.route_responses},
            "/responses": {"POST": self.route_responses},
            "/v1/images/generations": {"POST": self.route_images},
            "/v1/models": {"GET": self.route_models},
            "/models": {"GET": self.route_models},
            "/health": {"GET": self.route_health},
            "/": {"GET": self.route_index},
            "/internal/id_capture": {"POST": self.route_capture},
            "/internal/start_id_capture": {"POST": self.route_capture},
            "/ws": {"GET": None},
        }

    async def handle(self, conn: Connection, req: HttpRequest) -> bool:
        """Answer one request; returns whether the connection stays open for the next one."""
        started = time.monotonic()
        has_body = req.chunked or bool(req.content_length)
        anthropic = req.path.startswith("/v1/messages")
        try:
            host = req.header("host")
            if host is not None and not self.host_allowed(host):
                raise ApiError(403, f"Host {host!r} is not this bridge (DNS rebinding protection; add it to "
                               "allowed_hosts to expose the bridge under that name).", "invalid_host")
            origin = req.header("origin")
            if req.path == "/ws" and req.method in ("GET", "HEAD"):
                if req.method == "HEAD":      # nothing to upgrade: say what this endpoint is
                    raise ApiError(426, "This is the WebSocket endpoint for LMArena tabs.", "upgrade_required",
                                   headers=[("Upgrade", "websocket"), ("Allow", "GET, HEAD, OPTIONS")])
                await self.pool.serve_tab(conn, req)
                return False
            if origin is not None and not self.cors_allowed(origin):
                # Refused before anything reaches a tab, including "simple" text/plain cross-site POSTs.
                raise ApiError(403, f"Origin {origin!r} is not allowed to call this bridge "
                               "(cors_allowed_origins).", "origin_not_allowed")
            route = self.table.get(req.path)
            if route is None and req.path.startswith("/v1/models/"):
                route = {"GET": self.route_model}
            elif route is None and req.path.startswith(("/v1/responses/", "/responses/")):
                route = {"GET": self.route_response_get}
            if req.method == "OPTIONS":
                if route is None and req.target != "*":
                    raise ApiError(404, f"No such endpoint: {req.path}", "not_found")
                allowed = _allowed_methods(route or {"GET": None})
                headers = conn.base_headers(req) + [("Allow", allowed)]
                if origin is not None:
                    requested = req.header("access-control-request-headers") or ""
                    headers += [("Access-Control-Allow-Methods", allowed),
                                ("Access-Control-Allow-Headers", requested or "Authorization, Content-Type"),
                                ("Access-Control-Max-Age", "600")]
                keep = req.keep_alive and not has_body and not conn.eof
                await conn.write(response_head(204, headers + ([] if keep else [("Connection", "close")])))
                return keep
            if route is None:
                raise ApiError(404, f"No such endpoint: {req.method} {req.path}. The API is at /v1 "
                               "(chat/completions, messages, models, images/generations).", "not_found")
            method = "GET" if req.method == "HEAD" else req.method
            handler = route.get(method, False)
            if handler is False or handler is None:
                raise _method_error(route)
            if req.path.startswith(("/v1/", "/internal/", "/chat/", "/models")):
                self.files.refresh()
                self.check_key(req)
            if req.path.startswith("/internal/") and not is_loopback(conn.peer):
                raise ApiError(403, "Internal endpoints answer loopback clients only.", "forbidden")
            body = await conn.read_body(req, self.files.config) if has_body else b""
            has_body = False
            return await handler(conn, req, body, started)
        except ApiError as err:
            if conn.responded:
                return False
            self.stats.log(req, err.status, started, error=err.code, model=getattr(err, "model", None))
            if anthropic:
                return await conn.send_error(err, req, close=has_body or err.close, body=anthropic_error_body(err))
            return await conn.send_error(err, req, close=has_body or err.close, head_only=req.method == "HEAD")
        except Exception as exc:     # a bug on /v1/messages*: a 500 in Anthropic's shape (others: Connection.run)
            if not anthropic or conn.responded or isinstance(exc, (OSError, TimeoutError, HttpError,
                                                                   asyncio.IncompleteReadError)):
                raise
            log.exception("internal error while serving %s", conn.peer)
            err = ApiError(500, "Internal error in the bridge; see its log.", "internal_error")
            self.stats.log(req, 500, started, error=err.code)
            return await conn.send_error(err, req, close=True, body=anthropic_error_body(err))

    def bound(self, host: str, url: str) -> None:
        self.host, self.url = host, url

    def host_allowed(self, host_header: str) -> bool:
        name = _host_name(host_header)
        cfg = self.files.config
        bound = self.host.lower()
        if name in _LOCAL_HOSTS or name == cfg.host.lower() or name == bound:
            return True
        if name in (h.lower() for h in cfg.allowed_hosts):
            return True
        if bound in ("0.0.0.0", "::", ""):
            # Exposed on purpose: an IP literal cannot be a DNS-rebinding name, so LAN clients using the
            # machine's address work; names still need allowed_hosts.
            with contextlib.suppress(ValueError):
                ipaddress.ip_address(name.strip("[]"))
                return True
        return False

    def cors_allowed(self, origin: str) -> bool:
        return origin_matches(origin, self.files.config.cors_allowed_origins)

    def key_ok(self, req: HttpRequest) -> bool:
        """Bearer token, or x-api-key (Anthropic's header, also accepted for OpenAI clients).
        Header bytes (read as latin-1) are compared with the UTF-8 bytes of the key, in constant time."""
        key = self.files.config.api_key
        if not key:
            return True
        auth = req.header("authorization") or ""
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer":
            given = req.header("x-api-key") or ""
        return hmac.compare_digest(given.strip().encode("latin-1", "replace"), key.encode("utf-8"))

    def check_key(self, req: HttpRequest) -> None:
        if not self.key_ok(req):
            raise ApiError(401, "Incorrect or missing API key: send Authorization: Bearer <api_key from "
                           "config.jsonc> (or x-api-key).", "invalid_api_key")

    def new_job(self, chat: ChatRequest, memory: Conversations | None) -> Job:
        """A job for a chat request: its captured session (retry mode, or a model with a pool in
        model_endpoint_map.json), a follow-up of a remembered conversation, or a new one."""
        cfg, files = self.files.config, self.files
        session = followup = new_turns = None
        if cfg.session_mode == "retry" or chat.model in files.endpoint_map:
            sessions = session_candidates(chat.model, cfg, files.endpoint_map)
            session = sessions[next(self.session_counter) % len(sessions)]
            check_session(session)
        elif memory is not None and cfg.continue_conversations:
            found = memory.find(chat)
            if found is not None:
                followup, first_new = found
                followup.taken = True    # until its answer is remembered under a new key (or forgotten)
                new_turns = transcript(chat.turns[first_new:])
        plan = TaskPlan(chat, cfg, session, followup, new_turns, files.shape)
        job = Job(self.pool, chat.model, plan, session.side if session else "a", cfg.max_answer_chars)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task %s prompt: %s", job.id[:8], shown(plan.content()[0] if session is None else
                                                              json_text(chat.templates), 4000))
        return job

    # -- /v1/chat/completions and /v1/messages --
    async def route_chat(self, conn: Connection, req: HttpRequest, body: bytes, started: float,
                         anthropic: bool = False) -> bool:
        self.last_api_request = time.monotonic()
        api = ANTHROPIC_MESSAGES if anthropic else OPENAI_CHAT
        chat = await off_loop(body, chat_from_body, body, self.files, api)
        return await self.answer(conn, req, chat, api.reply(chat), started)

    async def answer(self, conn: Connection, req: HttpRequest, chat: ChatRequest, reply, started: float) -> bool:
        """Run a chat request on the tabs and answer it in its API's shape, streamed or whole."""
        job = self.new_job(chat, self.memory)
        reply.on_stop = job.stop_early
        self.pool.start_job(job)
        conn.watch(job.on_client_gone)
        try:
            if chat.stream:
                return await self.run_stream(conn, req, job, reply, started)
            await self.pool.wait_job(job)
            if job.client_gone:
                self.stats.log(req, 499, started, job)
                return False
            if job.error:
                raise job.error
            reply.render(job.take())
            out = reply.body(job)
            self.memory.remember(job, reply)
            self.stats.log(req, 200, started, job)
            return await conn.send_json(200, out, req=req, head_only=req.method == "HEAD",
                                        extra=[("X-Request-Id", job.id)] + reply.headers())
        except ApiError as err:
            err.model = chat.model
            raise
        finally:
            conn.watch(None)
            if not job.done:
                job.on_client_gone()

    async def route_messages(self, conn, req, body, started) -> bool:
        return await self.route_chat(conn, req, body, started, anthropic=True)

    # -- /v1/responses --
    async def route_responses(self, conn, req, body, started) -> bool:
        self.last_api_request = time.monotonic()
        data = await off_loop(body, parse_json_body, body)
        prev = data.get("previous_response_id")
        history = self.responses.turns(prev) if isinstance(prev, str) and prev else None
        chat = await off_loop(body, self.responses_chat, data, history)
        reply = ResponsesReply(chat)
        options = chat.conv.options
        if options.store:
            carried = options.carried
            reply.on_done = lambda final: final is not None and self.responses.keep(
                final, carried + [reply.output_turn()])
        return await self.answer(conn, req, chat, reply, started)

    def responses_chat(self, data: dict, history: list | None) -> ChatRequest:
        cfg = self.files.config
        try:
            return prepare(responses_conversation(data, cfg, history), cfg, self.files.models, self.files.endpoint_map)
        except ApiError as err:
            err.model = data.get("model")
            raise

    async def route_response_get(self, conn, req, body, started) -> bool:
        found = self.responses.get(urllib.parse.unquote(req.path.rsplit("/", 1)[-1]))
        self.stats.log(req, 200, started)
        return await conn.send_json(200, found, req=req, head_only=req.method == "HEAD")

    async def route_count_tokens(self, conn, req, body, started) -> bool:
        data = await off_loop(body, parse_json_body, body)
        count = count_input_tokens(data, self.files.config)
        self.stats.log(req, 200, started)
        return await conn.send_json(200, {"input_tokens": count}, req=req)

    async def run_stream(self, conn: Connection, req: HttpRequest, job: Job, reply, started: float) -> bool:
        cfg = self.files.config
        # Hold the head until the tab's first message, so quick failures keep their real status.
        await self.pool.wait_job(job, until_first=started + cfg.first_byte_hold_seconds)
        if job.client_gone:
            self.stats.log(req, 499, started, job)
            return False
        if job.error and not job.output:
            raise job.error
        writer = StreamWriter(conn, req, [("X-Request-Id", job.id)] + reply.headers(), job.on_client_gone,
                              cfg.max_pending_output_bytes)
        first = reply.opening() + reply.render(job.take())
        if not job.done:     # a quick answer goes out in one write with its end, below
            writer.start(first + ("" if job.received else ": keep-alive\n\n"), answered=job.output)
            first = ""
            job.sink = lambda: writer.push(reply.render(job.take()))
        interval = cfg.keepalive_interval_seconds
        while not job.done:
            now = time.monotonic()
            left = job.idle_left(self.files.config.stream_response_timeout_seconds, now)
            if left <= 0:
                break
            if now - writer.last_write >= interval:
                writer.keepalive()
                continue
            await job.woken(min(writer.last_write + interval - now, left))
        job.sink = None
        if job.client_gone or conn.lost:
            self.stats.log(req, 499, started, job)
            return False
        tail = first + reply.render(job.take()) + reply.closing(job)
        if not job.error:
            try:                 # the stream ends with its terminator whatever remembering it does
                self.memory.remember(job, reply)
            except Exception:
                log.exception("could not remember the conversation of %s", job.id)
        self.stats.log(req, 200, started, job, error=job.error.code if job.error else None)
        return await writer.end(tail)

    # -- /v1/images/generations --
    async def route_images(self, conn: Connection, req: HttpRequest, body: bytes, started: float) -> bool:
        self.last_api_request = time.monotonic()
        data = await off_loop(body, parse_json_body, body)
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(400, "'prompt' is required.", "invalid_prompt")
        n = data.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
            raise ApiError(400, "'n' must be an integer from 1 to 10.", "invalid_n")
        fmt = data.get("response_format") or "url"
        if fmt not in ("url", "b64_json"):
            raise ApiError(400, "'response_format' must be 'url' or 'b64_json'.", "invalid_response_format")
        models = self.files.models
        model = data.get("model")
        if not (isinstance(model, str) and parse_model_value(models.get(model, "")).is_image):
            default = self.files.config.default_image_model
            if default:
                model = default
            else:
                image_models = [k for k, v in models.items() if parse_model_value(v).is_image]
                if not image_models:
                    raise ApiError(400, "No image model is known: set 'model' to an image model of "
                                   "models.json or set default_image_model.", "invalid_model")
                model = image_models[0]
        chat = prepare(Conversation(model, [Turn("user", prompt)]), self.files.config, models, self.files.endpoint_map)
        jobs = [self.new_job(chat, None) for _ in range(n)]
        for job in jobs:
            self.pool.start_job(job)
        conn.watch(lambda: [j.on_client_gone() for j in jobs])
        try:
            await asyncio.gather(*(self.pool.wait_job(j) for j in jobs))
        finally:
            conn.watch(None)
            for j in jobs:
                if not j.done:
                    j.on_client_gone()
        if any(j.client_gone for j in jobs):
            return False
        urls = [ev[1] for j in jobs if not j.error for ev in j.images]
        errors = [j.error for j in jobs if j.error]
        if not urls:
            err = errors[0] if errors else ApiError(502, "LMArena answered without an image.", "no_image")
            self.stats.log(req, err.status, started, jobs[0], error=err.code)
            raise err
        items = []
        for url in urls:
            if fmt == "url":
                items.append({"url": url, "revised_prompt": prompt})
            else:
                try:
                    b64 = await asyncio.to_thread(fetch_image_b64, url)
                except Exception as exc:
                    log.warning("could not fetch image %s: %s", shown(url, 80), shown(str(exc), 200))
                    continue
                items.append({"b64_json": b64, "revised_prompt": prompt})
        if not items:
            raise ApiError(502, "The images were generated but could not be downloaded for b64_json.",
                           "upstream_error")
        if errors:
            log.info("images: %d of %d tasks failed (%s)", len(errors), n, shown(errors[0].message, 100))
        self.stats.log(req, 200, started, jobs[0])
        return await conn.send_json(200, {"created": int(time.time()), "data": items}, req=req)

    # -- models, health, status page --
    def model_object(self, name: str, value: str) -> dict:
        ref = parse_model_value(value)
        return {"id": name, "object": "model", "created": 0, "owned_by": "lmarena",
                "type": "image" if ref.is_image else "chat", "modality": ref.modality}

    async def route_models(self, conn, req, body, started) -> bool:
        data = [self.model_object(name, v) for name, v in self.files.models.items()]
        self.stats.log(req, 200, started)
        return await conn.send_json(200, {"object": "list", "data": data}, req=req,
                                    head_only=req.method == "HEAD")

    async def route_model(self, conn, req, body, started) -> bool:
        name = urllib.parse.unquote(req.path[len("/v1/models/"):])
        if name not in self.files.models:
            raise ApiError(404, f"The model {name!r} is not in models.json.", "model_not_found")
        return await conn.send_json(200, self.model_object(name, self.files.models[name]),
                                    req=req, head_only=req.method == "HEAD")

    def trusted(self, conn: Connection, req: HttpRequest) -> bool:
        """Details (tab URLs hold conversation ids) go to this machine, or to holders of the key."""
        return is_loopback(conn.peer) or (bool(self.files.config.api_key) and self.key_ok(req))

    async def route_health(self, conn, req, body, started) -> bool:
        self.files.refresh()
        status = self.health(detailed=self.trusted(conn, req))
        return await conn.send_json(200, status, req=req, head_only=req.method == "HEAD")

    async def route_index(self, conn, req, body, started) -> bool:
        self.files.refresh()
        detailed = self.trusted(conn, req)
        accept = req.header("accept") or ""
        if "text/html" in accept or "json" not in accept:
            page = status_page(self.health(detailed=detailed), doctor_checks(self.health(True)) if detailed else [])
            return await conn.send(200, wire_bytes(page), "text/html; charset=utf-8", req=req,
                                   head_only=req.method == "HEAD",
                                   extra=[("Cache-Control", "no-store"),
                                          ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")])
        return await conn.send_json(200, {"name": "LMArena Bridge", "version": VERSION,
                                          "api_base": f"{self.url}/v1", "health": "/health"},
                                    req=req, head_only=req.method == "HEAD")

    # -- /internal/id_capture --
    async def route_capture(self, conn, req, body, started) -> bool:
        data = await off_loop(body, parse_json_body, body) if body.strip() else {}
        settings = self.capture.settings_from(data, self.files.config)
        timeout = data.get("timeout")
        if timeout is None:
            timeout = self.files.config.capture_timeout_seconds
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
            raise ApiError(400, "timeout must be a number of seconds (up to 86400).", "invalid_request_error")
        self.capture.arm(settings, self.pool.tabs, float(timeout))
        if req.path == "/internal/start_id_capture":
            self.stats.log(req, 200, started)
            return await conn.send_json(200, {"status": "armed", "tabs": len(self.pool.tabs)}, req=req)
        fut = asyncio.get_running_loop().create_future()
        self.capture.waiters.append(fut)
        conn.watch(lambda: self.capture.leave(fut, self.pool.tabs))
        try:
            async with asyncio.timeout(float(timeout)):
                result = await fut
        except TimeoutError:
            self.capture.leave(fut, self.pool.tabs)
            raise ApiError(408, f"No Retry click was seen within {float(timeout):g} s.",
                           "capture_timeout") from None
        finally:
            conn.watch(None)
        if "error" in result:
            raise ApiError(500, result["error"], "capture_write_failed")
        self.stats.log(req, 200, started)
        return await conn.send_json(200, result, req=req)


# 20. The bridge ===================================================================================

class Capture:
    """Arming the tabs for the next Retry click (`python bridge.py capture`) and waiting for it.
    Armed only while someone waits (or until the timeout of a fire-and-forget start); a tab's
    `ids_captured` without an armed capture is ignored."""

    def __init__(self):
        self.settings: dict | None = None
        self.waiters: list[asyncio.Future] = []
        self.timer: asyncio.TimerHandle | None = None

    @staticmethod
    def settings_from(data: dict, cfg: Config) -> dict:
        mode = data.get("mode") or cfg.id_updater_last_mode
        target = data.get("target") or data.get("battle_target") or cfg.id_updater_battle_target
        if mode not in ("direct_chat", "battle"):
            raise ApiError(400, "mode must be \"direct_chat\" or \"battle\".", "invalid_request_error")
        if not isinstance(target, str) or target.upper() not in ("A", "B"):
            raise ApiError(400, "target must be \"A\" or \"B\".", "invalid_request_error")
        model = data.get("model") or None
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "model must be a string.", "invalid_request_error")
        return {"mode": mode, "target": target.upper(), "model": model}

    def command(self) -> dict:
        s = self.settings or {}
        return {"command": "activate_id_capture", "mode": s.get("mode"), "battle_target": s.get("target")}

    def arm(self, settings: dict, tabs: list, timeout: float) -> None:
        if not tabs:
            raise no_tab_error()
        self.settings = settings
        for tab in tabs:
            tab.send(self.command())
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(timeout, self.disarm, tabs)
        log.info("id capture armed on %d tab(s): %s%s%s", len(tabs), settings["mode"],
                 f" {settings['target']}" if settings["mode"] == "battle" else "",
                 f" for {shown(settings['model'])}" if settings["model"] else "")

    def leave(self, fut: asyncio.Future, tabs: list) -> None:
        """A waiting client left (or timed out): disarm when nobody waits any more."""
        if fut in self.waiters:
            self.waiters.remove(fut)
        if not fut.done():
            fut.cancel()
        if not self.waiters:
            self.disarm(tabs)

    def disarm(self, tabs: list) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.settings is not None:
            self.settings = None
            for tab in tabs:
                tab.send({"command": "deactivate_id_capture"})

    def resolve(self, result: dict) -> None:
        for fut in self.waiters:
            if not fut.done():
                fut.set_result(result)
        self.waiters.clear()


class Stats:
    """One log line per request, and the recent requests (never prompts) with their stage timings
    for /health, the status page and `doctor`."""

    STAGES = ("sent", "token_ready", "upstream_headers", "first_byte", "first_token", "end")

    def __init__(self):
        self.recent: collections.deque = collections.deque(maxlen=RECENT_REQUESTS)
        self.ids = itertools.count(1)

    def log(self, req: HttpRequest, status: int, started: float, job: Job | None = None,
            error: str | None = None, model: str | None = None) -> None:
        ms = (time.monotonic() - started) * 1000
        rid = job.id[:8] if job is not None else f"r{next(self.ids):07d}"
        if job is None and not req.path.startswith(("/v1/", "/internal/")) and status < 400:
            return
        model = (job.model if job is not None else model if isinstance(model, str) else "-")[:200]
        tab = job.tab_name if job is not None else "-"
        # A router's pick is logged; the answer's `model` stays what the client asked (clients break
        # when it changes).
        routed = job.parser.routed_model if job is not None else None
        if log.isEnabledFor(logging.INFO):
            log.info("%s %s %s model=%s%s tab=%s status=%d%s %.0fms", rid, req.method, req.path, shown(model, 80),
                     f" routed={shown(routed, 80)}" if routed else "", tab, status,
                     f" error={error}" if error else "", ms)
        if job is not None or (status >= 400 and req.path.startswith("/v1/")):   # failed ones too
            start = job.stages.get("start", started) if job is not None else started
            stages = {name: round((job.stages[name] - start) * 1000, 1) for name in self.STAGES
                      if name in job.stages} if job is not None else {}
            self.recent.append({"id": rid, "model": model, "tab": tab, "status": status, "error": error,
                                "ms": round(ms, 1), "at": time.time(), "stages_ms": stages,
                                "attempts": job.attempt + 1 if job is not None else 0, "routed_model": routed})
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s stages (ms from the request): %s; %d attempt(s)", rid,
                          ", ".join(f"{k} {v:g}" for k, v in stages.items()), self.recent[-1]["attempts"])

    def stage_percentiles(self) -> dict:
        out = {}
        for name in self.STAGES:
            values = sorted(r["stages_ms"][name] for r in self.recent if name in r["stages_ms"])
            if values:
                out[name] = {"p50": values[len(values) // 2], "p99": values[min(len(values) - 1,
                                                                            int(len(values) * 0.99))],
                             "n": len(values)}
        return out


class Bridge:
    """The server: listens, owns the tab pool, the conversation memory, capture, stats and the
    background loops, and answers what tabs report (PoolOwner). Tests build several on port 0 in
    one process."""

    def __init__(self, files: UserFiles, host: str | None = None, port: int | None = None):
        self.files = files
        self.host = host if host is not None else files.config.host
        self.port = port if port is not None else files.config.port
        self.connections: set[Connection] = set()
        self.peer_connections: collections.Counter = collections.Counter()   # other machines' addresses
        self.models_lock = asyncio.Lock()       # model reports merged into models.json in turn
        self.server: asyncio.base_events.Server | None = None
        self.stopping = False
        self.background: set[asyncio.Task] = set()
        self.restart_requested = False
        self.exit_event = asyncio.Event()     # set by SIGINT/SIGTERM or the idle restart
        self.update_notice: str | None = None
        files.load_shape()
        self.pool = TabPool(files, self)
        self.capture = Capture()
        self.stats = Stats()
        self.memory = Conversations(on_evict=self.cleanup_conversation)
        self.routes = Routes(files, self.pool, self.memory, self.capture, self.stats, self.health)
        self.browser = None                   # the BrowserLauncher of `--browser`, if any

    @property
    def tabs(self) -> list:
        return self.pool.tabs

    @property
    def jobs(self) -> dict:
        return self.pool.jobs

    # -- lifecycle --
    async def start(self) -> None:
        cfg = self.files.config
        self.server = await asyncio.get_running_loop().create_server(
            lambda: Connection(self), self.host, self.port, backlog=1024)
        sock = self.server.sockets[0].getsockname()
        self.port = sock[1]
        self.routes.bound(self.host, self.url)
        self.spawn(self.pool.ping_loop())
        self.spawn(self.idle_restart_loop())
        if cfg.enable_auto_update and cfg.update_url:
            self.spawn(self.update_check())
        if self.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
            log.warning("listening on %s without an api_key: anyone who can reach this port can use "
                        "your LMArena account. Set api_key in %s.", self.host, CONFIG_NAME)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def spawn(self, coro) -> asyncio.Task:
        return self.track(asyncio.get_running_loop().create_task(coro))

    def track(self, task: asyncio.Task) -> asyncio.Task:
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    async def stop(self, grace: float = 3.0) -> None:
        """Stop accepting, end open answers with an error event, tell tabs, close everything, and
        cancel every task of ours (none is left pending)."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        self.pool.fail_all(ApiError(503, "The bridge is shutting down.", "bridge_shutdown"))
        self.pool.close_all()
        for conn in list(self.connections):
            if not conn.busy:
                conn.transport.abort()
        end = time.monotonic() + grace
        while self.connections and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.transport.abort()
        self.pool.close_all(abort=True)
        current = asyncio.current_task()
        tasks = [t for t in self.background | self.pool.tasks if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)

    # -- PoolOwner: the conversation memory and what tabs report --
    def job_ended(self, job: Job) -> None:
        plan = job.plan
        if plan is None or plan.session is not None or not plan.conversation_id:
            return
        failed = job.error is not None or job.client_gone
        if plan.followup is not None:
            if failed:               # half an answer on LMArena's side: never continue it
                self.memory.forget(plan.followup)
        elif failed or not self.files.config.continue_conversations:
            self.cleanup_conversation(plan.conversation_id)

    def forget_followup(self, entry) -> None:
        self.memory.forget(entry)

    def cleanup_conversation(self, conversation_id: str) -> None:
        """Archive or delete a conversation the bridge created and can no longer continue."""
        action = self.files.config.conversation_cleanup
        if action == "keep":
            return
        tab = self.pool.any_tab()
        if tab is not None:
            tab.send({"command": "cleanup_conversation", "id": conversation_id, "action": action})

    def tab_joined(self, tab: Tab) -> None:
        if self.capture.settings is not None:
            tab.send(self.capture.command())

    def tab_report(self, tab: Tab, kind: str, msg: dict) -> None:
        if kind == "ids_captured":
            self.on_ids_captured(tab, msg.get("session_id"), msg.get("message_id"))
        elif kind == "models":
            self.on_models(tab, msg.get("models"), msg.get("source"))
        elif kind == "request_shape":
            self.on_request_shape(tab, msg.get("endpoint"), msg.get("body"))

    def on_ids_captured(self, tab: Tab, session_id, message_id) -> None:
        settings = self.capture.settings
        if settings is None:
            log.warning("%s reported captured ids, but no capture is armed; ignored", tab.name)
            return
        if is_placeholder_id(session_id) or is_placeholder_id(message_id):
            log.warning("%s reported ids that are not UUIDs; ignored", tab.name)
            return
        self.capture.disarm([t for t in self.pool.tabs if t is not tab])
        try:
            written = self.files.store_session(session_id, message_id, settings)
        except (OSError, ValueError, ConfigError) as exc:
            result = {"error": f"captured the ids but could not save them: {exc}"}
            log.error("%s", result["error"])
        else:
            result = {"session_id": session_id, "message_id": message_id, "mode": settings["mode"],
                      "battle_target": settings["target"], "model": settings.get("model"),
                      "written_to": written}
            log.info("captured session %s / message %s (%s%s) into %s", session_id[:8], message_id[:8],
                     settings["mode"], f" {settings['target']}" if settings["mode"] == "battle" else "",
                     os.path.basename(written))
        self.capture.resolve(result)

    def on_models(self, tab: Tab, models, source=None) -> None:
        if not isinstance(models, list):
            log.debug("%s sent a models report without a list", tab.name)
            return
        known = ("catalog", "page", "text/direct")
        self.files.models_source = source if source in known else ("catalog" if any(
            isinstance(m, dict) and isinstance(m.get("arena"), str) for m in models[:50]) else "page")
        self.track(asyncio.get_running_loop().create_task(self.merge_models(models)))

    async def merge_models(self, models: list) -> None:
        """Off the loop (a list of 20,000 changed ids, the file's fsync), one report at a time."""
        async with self.models_lock:
            try:
                await asyncio.to_thread(self.files.merge_models, models)
            except (OSError, ValueError, ConfigError) as exc:
                log.error("could not update %s: %s", MODELS_NAME, exc)

    def on_request_shape(self, tab: Tab, endpoint, body) -> None:
        shape = learned_shape(endpoint, body)
        if shape is None:
            log.debug("%s sent an unusable request shape; ignored", tab.name)
            return
        if shape != self.files.shape:
            log.info("learned LMArena's request shape from %s (fields: %s)", tab.name,
                     shown(", ".join(sorted(shape)), 200))
        self.files.save_shape(endpoint, shape)

    def health(self, detailed: bool) -> dict:
        now = time.monotonic()
        tabs, files = self.pool.tabs, self.files
        status = {"status": "ok", "version": VERSION, "tabs": len(tabs), "tasks_in_flight": len(self.pool.jobs),
                  "models": len(files.models), "session_mode": files.config.session_mode,
                  "capture_armed": self.capture.settings is not None,
                  "hint": None if tabs else "No tab connected: open arena.ai with the userscript "
                                            "installed; its title starts with ✅ when connected."}
        if self.update_notice:
            status["update_available"] = self.update_notice
        if not detailed:
            return status
        status["tab_details"] = [
            {"name": t.name, "userscript": t.version, "url": t.url, "tasks": len(t.jobs),
             "cloudflare_check": now < t.challenged_until,
             "resting_seconds": max(0, round(t.cool_until - now)), "status": t.status,
             "budget": t.budget_view(now), "last_error": t.last_error} for t in tabs]
        status["config"] = {"path": files.config_path, "error": files.last_error, "placeholder_ids":
                            is_placeholder_id(files.config.session_id) or is_placeholder_id(files.config.message_id)}
        status["models_reported_at"] = files.models_at
        status["models_source"] = files.models_source
        status["request_shape"] = {"fields": sorted(files.shape) if files.shape else [],
                                   "age_seconds": round(time.time() - files.shape_at) if files.shape_at else None}
        status["conversations_remembered"] = len(self.memory.by_key)
        status["stages_ms"] = self.stats.stage_percentiles()
        status["recent_requests"] = list(self.stats.recent)[-20:]
        status["browser"] = self.browser.state() if self.browser is not None else None
        return status

    # -- background --

    async def idle_restart_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            cfg = self.files.config
            timeout = cfg.idle_restart_timeout_seconds
            if not cfg.enable_idle_restart or timeout < 0:
                continue
            if self.pool.jobs or time.monotonic() - self.routes.last_api_request < timeout:
                continue
            log.info("no API requests for %g s: asking tabs to reconnect and restarting", timeout)
            for tab in list(self.pool.tabs):
                tab.send({"command": "reconnect"})
            self.restart_requested = True
            await asyncio.sleep(0.2)
            self.exit_event.set()
            return

    async def update_check(self) -> None:
        try:
            manifest, _ = await asyncio.to_thread(fetch_manifest, self.files.config.update_url)
        except Exception as exc:     # offline or broken manifest: never a problem for serving
            log.info("update check skipped: %s", shown(str(exc), 200))
            return
        if version_tuple(manifest["version"]) > version_tuple(VERSION):
            self.update_notice = manifest["version"][:40]
            log.info("a newer version %s is available (you have %s): run `python bridge.py update`",
                     shown(manifest["version"], 40), VERSION)


# 21. Updates and image downloads ==================================================================

def version_tuple(v) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", str(v))[:4]) or (0,)


def http_get(url: str, timeout: float = 15.0, limit: int = 32 * 2**20) -> bytes:
    import urllib.request   # imported lazily: it costs start-up time and most runs never need it
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL {url!r}")
    req = urllib.request.Request(url, headers={"User-Agent": f"lmarena-bridge/{VERSION}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        data = resp.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{url} is larger than {limit} bytes")
    return data


def fetch_image_b64(url: str) -> str:
    if url.startswith("data:"):
        return url.split(",", 1)[1]
    return base64.b64encode(http_get(url)).decode()


def fetch_manifest(url: str) -> tuple[dict, str]:
    data = json.loads(http_get(url, timeout=10))
    if not isinstance(data, dict) or not isinstance(data.get("version"), str) \
            or not isinstance(data.get("files"), dict):
        raise ValueError("the update manifest needs \"version\" and \"files\"")
    return data, url


def run_update(files: UserFiles, out=print, target_dir: str = HERE) -> int:
    """Download the manifest's program files, verify every hash, back up, then replace."""
    url = files.config.update_url
    if not url:
        out("no update_url is set in config.jsonc; nothing to check")
        return 1
    try:
        manifest, _ = fetch_manifest(url)
    except Exception as exc:
        out(f"could not read the update manifest at {url}: {exc}")
        return 1
    if version_tuple(manifest["version"]) <= version_tuple(VERSION):
        out(f"already up to date (version {VERSION}; the manifest offers {manifest['version']})")
        return 0
    downloads = {}
    for name, spec in manifest["files"].items():
        if name not in PROGRAM_FILES:
            out(f"skipping {name!r}: only program files ({', '.join(PROGRAM_FILES)}) are replaced")
            continue
        if not isinstance(spec, dict) or not isinstance(spec.get("sha256"), str) or not spec.get("url"):
            out(f"the manifest entry for {name} needs \"url\" and \"sha256\"; nothing was replaced")
            return 1
        file_url = urllib.parse.urljoin(url, spec["url"])
        try:
            data = http_get(file_url)
        except Exception as exc:
            out(f"could not download {name} from {file_url}: {exc}; nothing was replaced")
            return 1
        digest = hashlib.sha256(data).hexdigest()
        if not hmac.compare_digest(digest, spec["sha256"].lower()):
            out(f"{name}: sha256 mismatch (expected {spec['sha256']}, got {digest}); nothing was replaced")
            return 1
        downloads[name] = data
    if not downloads:
        out("the manifest lists no program files; nothing was replaced")
        return 1
    backup = os.path.join(target_dir, f"backup-{VERSION}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(backup, exist_ok=True)
    for name in downloads:
        src = os.path.join(target_dir, name)
        if os.path.exists(src):
            with open(src, "rb") as f_in, open(os.path.join(backup, name), "wb") as f_out:
                f_out.write(f_in.read())
    for name, data in downloads.items():
        atomic_write(os.path.join(target_dir, name), data)
    out(f"updated {VERSION} -> {manifest['version']}: replaced {', '.join(sorted(downloads))}; "
        f"backup in {backup}. Restart the bridge (and re-paste userscript.js if it changed).")
    return 0


# 22. Browser launcher (DevTools protocol) =========================================================
#     `python bridge.py browser` and `python bridge.py --browser`: a Chrome, Chromium or Edge of the
#     bridge's own (own profile folder, so the LMArena login stays there and the user's everyday
#     profile is never touched) that puts userscript.js into every LMArena page and is kept running.
#     It speaks the DevTools protocol over `--remote-debugging-pipe` (JSON messages separated by NUL
#     on fds 3 and 4: no port at all) where fds can be handed over (Linux, macOS), else (Windows) over
#     `--remote-debugging-port=0`, a random port on 127.0.0.1 read from DevToolsActivePort, with the
#     `websockets` client. Only these domains are used, because sites score automated browsers lower
#     and every enabled domain is something a page might notice:
#       Target   find, attach to (flattened sessions, paused until prepared) and open pages
#       Page     addScriptToEvaluateOnNewDocument (the userscript before the page's own scripts), reload
#       Runtime  runIfWaitingForDebugger, and evaluating `1` as a liveness ping; never Runtime.enable
#       Browser  getVersion, setPermission (local network access for LMArena origins), close
#     No `--enable-automation` (navigator.webdriver stays false), no extension, no Playwright.

BROWSER_DEFAULT_URL = "https://arena.ai/"
BROWSER_PROFILE_NAME = "browser-profile"       # beside the config, unless --profile
BROWSER_ENV = "BRIDGE_CHROME"                  # the browser to start, when --chrome is not given
# What the launcher adds to the browser's command line; nothing that changes how the browser looks to
# a site (no --disable-background-networking, --disable-sync...: pass them with --browser-arg).
BROWSER_FLAGS = ("--no-first-run", "--no-default-browser-check")
# A DevTools link of any kind (pipe or port) makes Chromium 156 set navigator.webdriver to true; this
# keeps it false, as in the user's everyday browser. Merged with a --disable-blink-features given.
NO_WEBDRIVER_FEATURE = "AutomationControlled"
LMARENA_GRANT_ORIGINS = ("https://arena.ai", "https://lmarena.ai")   # others once a page shows them
# Local Network Access (Chrome 138+): the permission names browsers have used; each one this browser
# accepts is granted (none accepted: an older browser, no check to pass).
LNA_PERMISSIONS = ("local-network-access", "local-network", "loopback-network")
CDP_MAX_MESSAGE = 4 * 2**20       # a DevTools message larger than this is skipped (ours are tiny)
CDP_CALL_SECONDS = 15.0           # one DevTools command
BROWSER_START_SECONDS = 30.0      # the DevTools link must answer within this after start
BROWSER_CLOSE_SECONDS = 5.0       # Browser.close, then SIGTERM, then SIGKILL to its process group
BROWSER_BACKOFF = (1.0, 60.0)     # first and longest wait before starting an exited browser again
BROWSER_STABLE_SECONDS = 120.0    # a browser that ran this long starts its back-off from the first wait
PAGE_PING_INTERVAL = 10.0         # how often each LMArena page is asked to evaluate `1`
PAGE_PING_TIMEOUT = 20.0          # no answer for this long: the page hangs and is reloaded
PAGE_RELOAD_SECONDS = 10.0        # Page.reload not acknowledged within this: close the tab, open a new one


class BrowserError(Exception):
    """The browser could not be started or spoken to (one line for the log and the state)."""


def browser_candidates() -> list[str]:
    """Where Chrome, Chromium and Edge usually live on this system, most likely first."""
    if sys.platform == "darwin":
        apps = [("Google Chrome", "Google Chrome"), ("Chromium", "Chromium"), ("Microsoft Edge", "Microsoft Edge")]
        return [os.path.join(root, f"{app}.app", "Contents", "MacOS", exe) for root in
                ("/Applications", os.path.expanduser("~/Applications")) for app, exe in apps]
    if os.name == "nt":
        roots = [os.environ.get(k) for k in ("PROGRAMFILES", "PROGRAMFILES(X86)", "LOCALAPPDATA")]
        rel = [r"Google\Chrome\Application\chrome.exe", r"Chromium\Application\chrome.exe",
               r"Microsoft\Edge\Application\msedge.exe"]
        return [os.path.join(root, r) for r in rel for root in roots if root]
    names = ("google-chrome-stable", "google-chrome", "chromium", "chromium-browser", "microsoft-edge-stable",
             "microsoft-edge")
    return [os.path.join(d, n) for n in names for d in ("/usr/bin", "/usr/local/bin", "/snap/bin")] + \
        ["/opt/google/chrome/chrome", "/opt/microsoft/msedge/msedge"]


def find_browser(given: str | None) -> str:
    """The browser to start: `given` (--chrome), else $BRIDGE_CHROME, else the first one found on
    PATH or the usual paths. Raises BrowserError with one line saying what to do."""
    import shutil
    chosen = given or os.environ.get(BROWSER_ENV)
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            where = "--chrome" if given else f"${BROWSER_ENV}"
            raise BrowserError(f"no browser at {chosen} (from {where}); give the path of Chrome, Chromium or Edge")
        return found
    for name in ("google-chrome", "chromium", "chromium-browser", "microsoft-edge", "msedge", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    for path in browser_candidates():
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise BrowserError("no Chrome, Chromium or Edge found; install one, or give its path with --chrome PATH "
                       f"or ${BROWSER_ENV}")


def tab_socket_url(base: str) -> str:
    """The tab socket (ws://HOST:PORT/ws) of a bridge given as http(s)://HOST:PORT or as ws(s) URL."""
    u = urllib.parse.urlsplit(base.strip())
    scheme = {"http": "ws", "https": "wss"}.get(u.scheme, u.scheme)
    path = u.path.rstrip("/")
    return urllib.parse.urlunsplit((scheme, u.netloc, path if path.endswith("/ws") else path + "/ws", "", ""))


def local_tab_url(host: str, port: int) -> str:
    """The tab socket of a bridge listening on host:port, as a page on this machine reaches it."""
    host = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"ws://{'[' + host + ']' if ':' in host else host}:{port}/ws"


def url_is_lmarena(url: str) -> bool:
    """An https page of arena.ai, lmarena.ai or a subdomain (the userscript's @match)."""
    try:
        u = urllib.parse.urlsplit(url)
    except ValueError:
        return False
    return origin_is_lmarena(f"{u.scheme}://{u.netloc}")


def launcher_page_script(userscript: str, tab_url: str) -> str:
    """What every page of the launched browser runs before its own scripts: on LMArena pages (top
    frame, https, the userscript's @match) point the userscript at this bridge, then run it. The
    userscript is the file itself, unchanged: it reads its bridge from localStorage."""
    return ("(function () {\n"
            "  // LMArena Bridge launcher: userscript.js for LMArena pages (its @match), top frame only.\n"
            f"  var hosts = {json.dumps(list(LMARENA_HOSTS))}, host = location.hostname;\n"
            "  if (location.protocol !== 'https:' || window.top !== window ||\n"
            "      !hosts.some(function (h) { return host === h || host.endsWith('.' + h); })) return;\n"
            f"  try {{ localStorage.setItem('lmarena-bridge-url', {json.dumps(tab_url)}); }} catch (e) {{}}\n"
            f"{userscript}\n"
            "})();\n")


class DevTools:
    """One DevTools protocol connection to the browser, flattened sessions: numbered commands with a
    timeout each, and events passed to `on_event(method, params, session_id)`. The transport (pipe
    or WebSocket) hands over whole message texts with `feed` and says `lost` when it ends."""

    def __init__(self, write, on_event):
        self.write = write                      # async (text) -> None
        self.on_event = on_event
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.closed = asyncio.Event()
        self.why = ""

    async def call(self, method: str, params: dict | None = None, session: str | None = None,
                   timeout: float = CDP_CALL_SECONDS) -> dict:
        if self.closed.is_set():
            raise BrowserError(f"{method}: the DevTools link is closed ({self.why})")
        mid = next(self.ids)
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        fut = asyncio.get_running_loop().create_future()
        self.pending[mid] = fut
        try:
            await self.write(json.dumps(msg))
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise BrowserError(f"{method}: no answer from the browser within {timeout:g} s") from None
        finally:
            self.pending.pop(mid, None)

    def feed(self, text) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            log.debug("browser: unreadable DevTools message skipped")
            return
        if not isinstance(msg, dict):
            return
        if "id" in msg:
            fut = self.pending.get(msg["id"])
            if fut is not None and not fut.done():
                err = msg.get("error")
                if err is not None:
                    fut.set_exception(BrowserError(str(err.get("message") if isinstance(err, dict) else err)))
                else:
                    fut.set_result(msg.get("result") or {})
            return
        if isinstance(msg.get("method"), str):
            try:
                self.on_event(msg["method"], msg.get("params") or {}, msg.get("sessionId"))
            except Exception:       # one bad event must not end the link
                log.exception("browser: handling %s failed", msg["method"])

    def lost(self, why: str) -> None:
        if self.closed.is_set():
            return
        self.why = why
        self.closed.set()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(BrowserError(f"the DevTools link closed ({why})"))


class DevToolsPipeReader(asyncio.Protocol):
    """The browser's end of --remote-debugging-pipe (its fd 4): NUL-separated JSON messages. A message
    longer than CDP_MAX_MESSAGE is skipped up to its NUL, so nothing the browser sends grows memory."""

    def __init__(self, devtools: DevTools):
        self.devtools = devtools
        self.buffer = bytearray()
        self.skipping = False

    def data_received(self, data: bytes) -> None:
        start = 0
        while True:
            end = data.find(b"\0", start)
            if end < 0:
                if not self.skipping:
                    self.buffer += data[start:]
                    if len(self.buffer) > CDP_MAX_MESSAGE:
                        log.warning("browser: a DevTools message over %d bytes skipped", CDP_MAX_MESSAGE)
                        self.buffer.clear()
                        self.skipping = True
                return
            if self.skipping:
                self.skipping = False
            else:
                self.buffer += data[start:end]
                text = bytes(self.buffer)
                self.buffer.clear()
                self.devtools.feed(text)
            start = end + 1

    def eof_received(self):
        self.devtools.lost("the browser closed its pipe")
        return False

    def connection_lost(self, exc) -> None:
        self.devtools.lost(f"pipe error: {exc}" if exc else "the browser closed its pipe")


class BrowserProcess:
    """The started browser: its pid (leader of a process group of its own, so Ctrl-C in a terminal
    reaches only the bridge, and the bridge can end the whole browser), and its exit."""

    def __init__(self, pid: int, popen=None):
        self.pid, self.popen = pid, popen
        self.returncode: int | None = None
        self.exited = asyncio.get_running_loop().create_task(self._wait())

    async def _wait(self) -> int:
        # A thread blocks in waitpid (no child watcher needed); the browser is always ended by stop().
        if self.popen is not None:
            self.returncode = await asyncio.to_thread(self.popen.wait)
        else:
            _, status = await asyncio.to_thread(os.waitpid, self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def signal_group(self, sig) -> None:
        """`sig` to every process of the browser's group (renderers, zygote, crash handler too)."""
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            if self.popen is not None:          # Windows: no process groups to signal
                self.popen.kill()
            else:
                os.killpg(self.pid, sig)


class BrowserLauncher:
    """Starts the browser, prepares every page it opens, and keeps it running: a crashed or hung
    LMArena page is reloaded, a browser that exits is started again after a back-off (1, 2, 4... 60 s;
    from 1 again once it ran BROWSER_STABLE_SECONDS). Never raises into the bridge: failures are
    logged and kept as `last_error` in `state()`, which /health, doctor and the status page show."""

    @dataclasses.dataclass(slots=True)
    class Page:
        target_id: str
        session: str
        url: str = ""
        busy: bool = False          # being pinged
        hung: bool = False          # its renderer was crashed on purpose (unhang)
        prepared: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
        crashed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def __init__(self, chrome: str, profile: str, url: str = BROWSER_DEFAULT_URL, tab_url: str | None = None,
                 headless: bool = False, extra_args=(), transport: str | None = None,
                 ping_interval: float = PAGE_PING_INTERVAL, ping_timeout: float = PAGE_PING_TIMEOUT,
                 userscript_path: str | None = None):
        self.chrome, self.profile, self.url = chrome, os.path.abspath(profile), url
        self.tab_url = tab_url                  # ws://HOST:PORT/ws of the bridge; set by serve() when None
        self.headless, self.extra_args = headless, list(extra_args)
        self.transport = transport or ("pipe" if os.name == "posix" else "port")
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.userscript_path = userscript_path or os.path.join(HERE, "userscript.js")
        self.version: str | None = None
        self.pid: int | None = None
        self.restarts = 0
        self.page_reloads = 0
        self.last_error: str | None = None
        self.running = False
        self.permissions: list | None = None    # the local-network-access names this browser accepted
        self.granted: set[str] = set()
        self.pages: dict[str, BrowserLauncher.Page] = {}    # by session id
        self.devtools: DevTools | None = None
        self.process: BrowserProcess | None = None
        self.script = ""
        self.stopping = False
        self.closing: asyncio.Task | None = None
        self.task: asyncio.Task | None = None
        self.tasks: set[asyncio.Task] = set()
        self.ready = asyncio.Event()            # set once a started browser is prepared (tests wait on it)

    # -- what /health, doctor and the status page show --
    def state(self) -> dict:
        return {"path": self.chrome, "version": self.version, "profile": self.profile, "pid": self.pid,
                "running": self.running, "headless": self.headless, "devtools": self.transport,
                "restarts": self.restarts, "page_reloads": self.page_reloads, "last_error": self.last_error,
                "lmarena_pages": sum(1 for p in self.pages.values() if url_is_lmarena(p.url)),
                "local_network_access": self.permissions}

    def fail(self, message: str) -> None:
        self.last_error = message
        log.warning("browser: %s", message)

    # -- lifecycle --
    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        """Close the browser (and everything it started) and stop minding it."""
        self.stopping = True
        log.info("browser: closing it")
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        await self.close_browser()

    async def run(self) -> None:
        delay = BROWSER_BACKOFF[0]
        while not self.stopping:
            began = time.monotonic()
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except BrowserError as exc:
                self.fail(str(exc))
            except Exception as exc:        # whatever the browser does, the bridge keeps serving
                log.exception("browser: unexpected error")
                self.last_error = f"unexpected error: {exc!r}"
            finally:
                self.running = False
                await self.close_browser()
            if self.stopping:
                return
            if time.monotonic() - began >= BROWSER_STABLE_SECONDS:
                delay = BROWSER_BACKOFF[0]
            self.restarts += 1
            log.warning("browser: starting it again in %g s (restart %d)", delay, self.restarts)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BROWSER_BACKOFF[1])

    async def run_once(self) -> None:
        """Start the browser, prepare it, and mind its pages until it exits."""
        try:
            with open(self.userscript_path, encoding="utf-8") as f:
                userscript = f.read()
        except OSError as exc:
            raise BrowserError(f"cannot read {self.userscript_path}: {exc.strerror or exc}") from None
        self.script = launcher_page_script(userscript, self.tab_url or "ws://127.0.0.1:5102/ws")
        self.pages.clear()
        self.granted.clear()            # permissions set over DevTools last as long as that browser
        self.ready.clear()
        await self.launch()
        proc, devtools = self.process, self.devtools
        try:
            started = await devtools.call("Browser.getVersion", timeout=BROWSER_START_SECONDS)
        except BrowserError:
            if proc.exited.done():
                raise BrowserError(f"the browser exited at once (code {proc.returncode}); is another browser "
                                   f"using the profile {self.profile}?") from None
            raise
        self.version = started.get("product")
        self.running = True
        log.info("browser: %s (pid %d, profile %s, DevTools over %s)", self.version, proc.pid, self.profile,
                 self.transport)
        for origin in LMARENA_GRANT_ORIGINS + ((self.origin_of(self.url),) if url_is_lmarena(self.url) else ()):
            await self.grant(origin)
        await devtools.call("Target.setDiscoverTargets", {"discover": True})
        await devtools.call("Target.setAutoAttach", {"autoAttach": True, "waitForDebuggerOnStart": True,
                                                     "flatten": True, "filter": [{"type": "page"}]})
        await self.open_url()
        self.ready.set()
        watch = self.spawn(self.watch_pages())
        lost = asyncio.get_running_loop().create_task(devtools.closed.wait())
        try:
            await asyncio.wait([proc.exited, lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            lost.cancel()
        with contextlib.suppress(asyncio.TimeoutError):    # the pipe closes just before the exit is seen
            await asyncio.wait_for(asyncio.shield(proc.exited), 1.0)
        if proc.exited.done():
            raise BrowserError(f"the browser exited (code {proc.returncode})")
        raise BrowserError(f"lost the DevTools link ({devtools.why})")

    async def launch(self) -> None:
        """Start the browser with its own profile and a DevTools link (pipe, or 127.0.0.1 port)."""
        os.makedirs(self.profile, exist_ok=True)
        args = [self.chrome, f"--user-data-dir={self.profile}", *BROWSER_FLAGS]
        if self.headless:
            args.append("--headless")
        if sys.platform.startswith("linux") and os.geteuid() == 0 and "--no-sandbox" not in self.extra_args:
            args.append("--no-sandbox")
            log.info("browser: running as root, so the browser runs with --no-sandbox (Chromium refuses root "
                     "otherwise); run the bridge as a normal user to keep the sandbox")
        args += ["--remote-debugging-pipe" if self.transport == "pipe" else "--remote-debugging-port=0"]
        disabled = [NO_WEBDRIVER_FEATURE]
        for a in self.extra_args:
            if a.startswith("--disable-blink-features="):
                disabled += [f for f in a.split("=", 1)[1].split(",") if f and f not in disabled]
            elif a not in args:
                args.append(a)
        args += [f"--disable-blink-features={','.join(disabled)}", "about:blank"]
        loop = asyncio.get_running_loop()
        log_path = os.path.join(self.profile, "browser.log")
        if self.transport == "pipe":
            await self.launch_pipe(loop, args, log_path)
        else:
            await self.launch_port(loop, args, log_path)
        self.pid = self.process.pid

    def spawn_process(self, args: list, log_path: str, fd_actions=()) -> BrowserProcess:
        """Start the browser in a process group of its own, output to browser.log in the profile.
        POSIX: posix_spawn, which can place our pipe ends on the browser's fds 3 and 4 (and needs no
        fork of this process); Windows: subprocess in a new process group."""
        out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            if os.name != "posix":
                import subprocess
                popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0))
                return BrowserProcess(popen.pid, popen)
            null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                pid = os.posix_spawn(self.chrome, args, os.environ, setpgroup=0, file_actions=[
                    (os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, out, 2),
                    *fd_actions])
            finally:
                os.close(null)
            return BrowserProcess(pid)
        except OSError as exc:
            raise BrowserError(f"cannot start {self.chrome}: {exc.strerror or exc}") from None
        finally:
            os.close(out)

    async def launch_pipe(self, loop, args, log_path) -> None:
        import fcntl
        to_browser, from_us = os.pipe()      # the browser reads commands on its fd 3
        from_browser, to_us = os.pipe()      # and writes answers and events on its fd 4
        # Copies above 9, so dup2 onto 3 and 4 never meets itself (which would keep close-on-exec).
        fds = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser, to_us)]
        for fd in (to_browser, to_us):
            os.close(fd)
        try:
            self.process = self.spawn_process(args, log_path, [(os.POSIX_SPAWN_DUP2, fds[0], 3),
                                                               (os.POSIX_SPAWN_DUP2, fds[1], 4)])
        except BrowserError:
            os.close(from_us)
            os.close(from_browser)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        writer, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(from_us, "wb", 0))

        async def write(text: str) -> None:
            if writer.is_closing():
                raise BrowserError("the browser closed its pipe")
            writer.write(text.encode() + b"\0")

        self.devtools = DevTools(write, self.on_event)
        reader, _ = await loop.connect_read_pipe(lambda: DevToolsPipeReader(self.devtools),
                                                 os.fdopen(from_browser, "rb", 0))

        async def close_pipes(devtools=self.devtools):
            await devtools.closed.wait()
            writer.close()
            reader.close()
        loop.create_task(close_pipes())

    async def launch_port(self, loop, args, log_path) -> None:
        """Where fds cannot be handed over (Windows): a random port on 127.0.0.1, announced in the
        profile's DevToolsActivePort. Chrome binds it to loopback and refuses WebSocket handshakes
        from web pages (Origin check), and the path holds a random id."""
        from websockets.asyncio.client import connect
        active = os.path.join(self.profile, "DevToolsActivePort")
        with contextlib.suppress(FileNotFoundError):
            os.remove(active)
        self.process = self.spawn_process(args, log_path)
        end = time.monotonic() + BROWSER_START_SECONDS
        announced = []
        while len(announced) < 2 and time.monotonic() < end and not self.process.exited.done():
            await asyncio.sleep(0.1)
            with contextlib.suppress(OSError):
                with open(active, encoding="utf-8") as f:
                    announced = f.read().split()
        if len(announced) < 2:
            raise BrowserError("the browser did not announce its DevTools port")
        try:
            ws = await connect(f"ws://127.0.0.1:{int(announced[0])}{announced[1]}", max_size=CDP_MAX_MESSAGE,
                               ping_interval=None, compression=None)
        except (OSError, ValueError) as exc:
            raise BrowserError(f"cannot reach the browser's DevTools port: {exc}") from None

        async def write(text: str) -> None:
            await ws.send(text)

        self.devtools = DevTools(write, self.on_event)

        async def read(devtools=self.devtools):
            try:
                async for text in ws:
                    devtools.feed(text)
            except Exception as exc:
                devtools.lost(f"WebSocket: {exc}")
            finally:
                devtools.lost("the browser closed the WebSocket")
                await ws.close()
        loop.create_task(read())

    async def close_browser(self) -> None:
        """Browser.close (the profile is saved as on a normal exit), then SIGTERM, then SIGKILL to the
        whole process group, so no renderer or helper is left behind. One closing at a time, and a
        cancelled caller does not cut it short (shielded)."""
        if self.closing is None or self.closing.done():
            if self.process is None:
                return
            self.closing = asyncio.get_running_loop().create_task(self._close(self.process, self.devtools))
            self.process = self.devtools = None
            self.running, self.pid = False, None
        await asyncio.shield(self.closing)

    async def _close(self, proc: BrowserProcess, devtools: DevTools | None) -> None:
        for task in list(self.tasks):
            task.cancel()
        if devtools is not None and not proc.exited.done():
            with contextlib.suppress(BrowserError, OSError):
                await devtools.call("Browser.close", timeout=1.0)
        kill = getattr(signal, "SIGKILL", signal.SIGTERM)
        for sig, wait in ((None, BROWSER_CLOSE_SECONDS), (signal.SIGTERM, 2.0), (kill, 2.0)):
            if sig is not None:
                proc.signal_group(sig)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.exited), wait)
            if proc.exited.done():
                break
        proc.signal_group(kill)         # helpers that outlived the browser itself
        if devtools is not None:
            devtools.lost("the browser was closed")

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- pages --
    @staticmethod
    def origin_of(url: str) -> str:
        u = urllib.parse.urlsplit(url)
        return f"{u.scheme}://{u.netloc}"

    async def grant(self, origin: str) -> None:
        """Allow local network access for `origin` (so the page may reach the bridge on 127.0.0.1
        without a prompt) under every name this browser knows: Chrome 156 checks `loopback-network`
        for 127.0.0.1 and knows the older `local-network-access` too. Browser.setPermission, not
        grantPermissions, which would deny every other permission of the origin."""
        if origin in self.granted or self.devtools is None:
            return
        self.granted.add(origin)
        accepted = []
        for name in self.permissions if self.permissions is not None else LNA_PERMISSIONS:
            with contextlib.suppress(BrowserError):
                await self.devtools.call("Browser.setPermission", {"permission": {"name": name},
                                                                   "setting": "granted", "origin": origin})
                accepted.append(name)
        if self.permissions is None:
            self.permissions = accepted
            log.info("browser: local network access granted to LMArena pages (%s)", ", ".join(accepted)
                     if accepted else "this browser has no such permission: older than Chrome 138, none needed")

    async def open_url(self) -> None:
        """Send the first page (the about:blank of the command line) to --url once the userscript is
        in it, or open a new page."""
        page = next(iter(self.pages.values()), None)
        if page is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(page.prepared.wait(), CDP_CALL_SECONDS)
            await self.devtools.call("Page.navigate", {"url": self.url}, page.session)
        else:
            await self.devtools.call("Target.createTarget", {"url": self.url})

    def on_event(self, method: str, params: dict, session: str | None) -> None:
        if method == "Target.attachedToTarget":
            info = params.get("targetInfo") or {}
            sid = params.get("sessionId")
            if info.get("type") == "page" and sid:
                page = self.pages[sid] = self.Page(info.get("targetId", ""), sid, info.get("url", ""))
                self.spawn(self.prepare(page, bool(params.get("waitingForDebugger"))))
            elif sid:
                self.spawn(self.release(sid))
        elif method == "Target.detachedFromTarget":
            self.pages.pop(params.get("sessionId"), None)
        elif method == "Target.targetInfoChanged":
            info = params.get("targetInfo") or {}
            for page in self.pages.values():
                if page.target_id == info.get("targetId"):
                    page.url = info.get("url", page.url)
                    if url_is_lmarena(page.url):
                        self.spawn(self.grant(self.origin_of(page.url)))
        elif method == "Target.targetCrashed":
            for page in list(self.pages.values()):
                if page.target_id == params.get("targetId"):
                    page.crashed.set()
                    self.spawn(self.recover(page, f"crashed ({params.get('status', '?')})"))

    async def prepare(self, page: "BrowserLauncher.Page", waiting: bool) -> None:
        """The userscript goes in before anything of the page runs: new pages wait until released."""
        try:
            # Blink runs new-document scripts only for an enabled Page agent (Page.enable sends us the
            # page's navigation events; unlike Runtime.enable, nothing of it shows in the page).
            await self.devtools.call("Page.enable", session=page.session)
            await self.devtools.call("Page.addScriptToEvaluateOnNewDocument", {"source": self.script}, page.session)
        except BrowserError as exc:
            self.fail(f"could not prepare a page: {exc}")
        finally:
            page.prepared.set()
            if waiting and self.devtools is not None:
                with contextlib.suppress(BrowserError):
                    await self.devtools.call("Runtime.runIfWaitingForDebugger", session=page.session)

    async def release(self, session: str) -> None:
        """A target that is not a page (a worker...): let it run and leave it alone."""
        with contextlib.suppress(BrowserError):
            await self.devtools.call("Runtime.runIfWaitingForDebugger", session=session)
            await self.devtools.call("Target.detachFromTarget", {"sessionId": session})

    async def watch_pages(self) -> None:
        """Every ping_interval: each LMArena page must evaluate `1` within ping_timeout; no page at
        all (the last tab was closed, on systems where the browser stays open): open --url again."""
        while True:
            await asyncio.sleep(self.ping_interval)
            if not self.pages:
                log.info("browser: no page is open; opening %s", self.url)
                with contextlib.suppress(BrowserError):
                    await self.devtools.call("Target.createTarget", {"url": self.url})
                continue
            for page in list(self.pages.values()):
                if url_is_lmarena(page.url) and not page.busy:
                    self.spawn(self.ping(page))

    async def ping(self, page: "BrowserLauncher.Page") -> None:
        page.busy = True
        try:
            await self.devtools.call("Runtime.evaluate", {"expression": "1", "returnByValue": True},
                                     page.session, timeout=self.ping_timeout)
        except BrowserError as exc:
            if page.session in self.pages and "no answer" in str(exc):
                await self.unhang(page)
        finally:
            page.busy = False

    async def unhang(self, page: "BrowserLauncher.Page") -> None:
        """A hung renderer would hang a reload too: crash it (Page.crash works from the renderer's IO
        thread, so it gets through a busy main thread) and let the crash be recovered as any other."""
        self.fail(f"page {shown(page.url, 80)} hangs (no answer within {self.ping_timeout:g} s): crashing its "
                  "renderer to reload it")
        page.crashed.clear()
        page.hung = True
        with contextlib.suppress(BrowserError):
            await self.devtools.call("Page.crash", session=page.session, timeout=PAGE_RELOAD_SECONDS)
        try:
            await asyncio.wait_for(page.crashed.wait(), PAGE_RELOAD_SECONDS)
        except asyncio.TimeoutError:
            await self.reopen(page)

    async def recover(self, page: "BrowserLauncher.Page", why: str) -> None:
        """Reload a crashed page; if the browser does not take the reload, close it and open it anew."""
        self.page_reloads += 1
        if page.hung:
            page.hung = False
            log.info("browser: reloading the page that hung")
        else:
            self.fail(f"page {shown(page.url, 80)} {why}: reloading it")
        try:
            await self.devtools.call("Page.reload", session=page.session, timeout=PAGE_RELOAD_SECONDS)
        except BrowserError:
            await self.reopen(page)

    async def reopen(self, page: "BrowserLauncher.Page") -> None:
        url = page.url if url_is_lmarena(page.url) else self.url
        log.warning("browser: closing page %s and opening it again", shown(url, 80))
        with contextlib.suppress(BrowserError):
            await self.devtools.call("Target.closeTarget", {"targetId": page.target_id})
        with contextlib.suppress(BrowserError):
            await self.devtools.call("Target.createTarget", {"url": url})


def browser_check(b: dict) -> tuple[bool, str, str, str]:
    """doctor's line for the launched browser (from BrowserLauncher.state())."""
    facts = (f"{b.get('version') or b.get('path')}, pid {b.get('pid')}, profile {b.get('profile')}, "
             f"{b.get('restarts', 0)} restart(s), {b.get('page_reloads', 0)} page reload(s)")
    if b.get("running"):
        return True, "browser", facts + (f"; last: {b['last_error']}" if b.get("last_error") else ""), ""
    return (False, "browser", f"not running ({b.get('last_error') or 'starting'}); {facts}",
            "see the bridge's log and browser.log in the profile folder; check --chrome, and that no other "
            "browser uses that profile")


def browser_section(b: dict | None) -> str:
    """The status page's lines on the launched browser (nothing without `--browser`)."""
    if not b:
        return ""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in b.items())
    return f"<h2>Browser</h2><table>{rows}</table>"


def browser_or_exit(given: str | None) -> str:
    """The browser to start, checked before anything else is done: a missing one is one line on
    stderr and exit 1."""
    try:
        return find_browser(given)
    except BrowserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1)


def launcher_from_args(args, files: UserFiles, chrome: str, tab_url: str | None) -> BrowserLauncher:
    """The launcher the command line asks for (`browser`, or serve with `--browser`)."""
    profile = args.profile or os.path.join(os.path.dirname(os.path.abspath(files.config_path)), BROWSER_PROFILE_NAME)
    return BrowserLauncher(chrome, profile, args.url or BROWSER_DEFAULT_URL,
                           tab_socket_url(args.bridge) if args.bridge else tab_url,
                           headless=args.headless, extra_args=args.browser_arg or ())


def add_browser_options(p: argparse.ArgumentParser, serving: bool) -> None:
    if serving:
        p.add_argument("--browser", action="store_true", help="also start a browser of its own with the "
                                                              "userscript in its LMArena pages (options below)")
        p.add_argument("--bridge", help="URL the browser's pages use to reach this bridge (default: where it "
                                        "listens)")
    p.add_argument("--chrome", metavar="PATH", help=f"Chrome, Chromium or Edge to start (default: ${BROWSER_ENV}, "
                                                    "else the first found on the usual paths)")
    p.add_argument("--profile", metavar="DIR", help="the browser's own profile folder (default: "
                                                    f"{BROWSER_PROFILE_NAME} beside the config); your LMArena "
                                                    "login is kept there")
    p.add_argument("--url", help=f"page to open (default {BROWSER_DEFAULT_URL})")
    p.add_argument("--headless", action="store_true", help="no window (log in once without it first)")
    p.add_argument("--browser-arg", action="append", metavar="ARG",
                   help="one more command-line argument for the browser, as --browser-arg=--flag (repeatable)")


async def run_browser(launcher: BrowserLauncher) -> None:
    """`python bridge.py browser`: mind the browser until SIGINT/SIGTERM, then close it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await launcher.start()
    try:
        await stop.wait()
    finally:
        await launcher.stop()


def cmd_browser(args) -> int:
    chrome = browser_or_exit(args.chrome)
    files = load_files(args.config, quiet=True)
    launcher = launcher_from_args(args, files, chrome, tab_socket_url(bridge_base(files.config, None)))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    set_log_level(files.config.log_level)
    print(f"LMArena Bridge browser: {launcher.chrome}, profile {launcher.profile}; its LMArena pages use the "
          f"bridge at {launcher.tab_url}", flush=True)
    asyncio.run(run_browser(launcher))
    return 0


# 23. Command line =================================================================================

SUBCOMMANDS = ("serve", "capture", "models", "update", "doctor", "browser")
USAGE_EPILOG = """commands:
  (none) / serve   run the bridge (the default)
  capture          capture session ids from your next Retry click (advanced: captured sessions)
  models           list the models in models.json
  update           install a newer version from update_url
  doctor           check every link from the bridge to LMArena; --send MODEL also sends a tiny prompt
  browser          start a browser of its own with the userscript in its LMArena pages (--browser: serve too)
Options may follow the command. Exit codes: 0 done, 1 could not do it, 2 bad usage or broken file.
Run `python bridge.py COMMAND --help` for a command's options."""


def build_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"bridge.py{'' if command == 'serve' else ' ' + command}",
                                description="LMArena Bridge: an OpenAI- and Anthropic-compatible API for your "
                                            "LMArena tab.",
                                epilog=USAGE_EPILOG if command == "serve" else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="config.jsonc to use (models.json and model_endpoint_map.json sit beside "
                                    "it; default: the one beside bridge.py)")
    if command == "serve":
        p.add_argument("--host", help="address to listen on (default: config host, 127.0.0.1)")
        p.add_argument("--port", type=int, help="port (default: config port, 5102; 0 takes a free one)")
        add_browser_options(p, serving=True)     # the browser launcher
    if command in ("capture", "doctor", "browser"):
        p.add_argument("--bridge", help="URL of the running bridge (default http://{host}:{port} of the config)")
    if command == "browser":
        add_browser_options(p, serving=False)    # the browser launcher
    if command == "capture":
        p.add_argument("--mode", choices=("direct_chat", "battle"),
                       help="how the captured session is used: one model (direct_chat) or one side of a "
                            "battle (default: the config's id_updater_last_mode)")
        p.add_argument("--target", type=str.upper, choices=("A", "B"),
                       help="in battle mode, the side whose answers you want (default: the config's)")
        p.add_argument("--model", help="add the session to this model's pool in model_endpoint_map.json "
                                       "instead of config.jsonc")
        p.add_argument("--timeout", type=float, help="seconds to wait for the Retry click (default "
                                                     "capture_timeout_seconds, 180)")
    if command == "doctor":
        p.add_argument("--send", metavar="MODEL", help="also send a tiny prompt to MODEL and report the "
                                                       "answer's first words and the time of each stage")
    return p


def load_files(config_path: str | None, quiet: bool = False) -> UserFiles:
    """The user files; exit 2 when a named config is missing or any file is broken."""
    if config_path is not None and not os.path.exists(config_path):
        print(f"error: {config_path} does not exist (check --config)", file=sys.stderr)
        raise SystemExit(2)
    if config_path is None:
        config_path = os.path.join(HERE, CONFIG_NAME)
        example = os.path.join(HERE, EXAMPLE_CONFIG_NAME)
        if not os.path.exists(config_path) and os.path.exists(example):
            try:
                with open(example, encoding="utf-8") as f:
                    atomic_write(config_path, f.read())
                print(f"note: made {CONFIG_NAME} from {EXAMPLE_CONFIG_NAME} (edit it; it is yours)",
                      file=sys.stderr)
            except OSError as exc:
                print(f"note: could not make {CONFIG_NAME} from {EXAMPLE_CONFIG_NAME}: {exc}", file=sys.stderr)
    files = UserFiles(config_path)
    try:
        files.load_all(report=(lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr)))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    return files


def bridge_base(cfg: Config, given: str | None) -> str:
    host = cfg.host if cfg.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return (given or f"http://{'[' + host + ']' if ':' in host else host}:{cfg.port}").rstrip("/")


def call_bridge(base: str, path: str, cfg: Config, body: dict | None = None, timeout: float = 15):
    """(status, JSON answer, headers) from the running bridge within `timeout` seconds in all (one
    deadline for the whole exchange, not per read); raises OSError when it cannot be reached or
    what answers is not HTTP. An answer that is not JSON comes back as None."""
    import threading
    result: list = []

    def run():
        try:
            result.append(_call_bridge(base, path, cfg, body, timeout))
        except BaseException as exc:         # handed to the caller below
            result.append(exc)
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:
        raise TimeoutError(f"no complete answer within {timeout:g} s")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _call_bridge(base: str, path: str, cfg: Config, body: dict | None, timeout: float):
    import http.client
    import urllib.error
    import urllib.request
    headers = {"Content-Type": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers=headers, method="GET" if body is None else "POST")
    def parsed(raw: bytes):
        try:
            return json.loads(raw or b"{}")
        except (ValueError, RecursionError):
            return None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, parsed(resp.read(8 * 2**20)), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, _obj(parsed(exc.read(8 * 2**20))), dict(exc.headers)
    except urllib.error.URLError as exc:
        raise OSError(str(getattr(exc, "reason", exc))) from None
    except (http.client.HTTPException, ValueError) as exc:
        raise OSError(f"what answers there is not an HTTP server ({type(exc).__name__}): another "
                      "program on that port?") from None


def error_message(answer: dict, status: int) -> str:
    err = answer.get("error") if isinstance(answer, dict) else None
    return err.get("message") if isinstance(err, dict) and err.get("message") else f"HTTP {status}"


def cmd_models(args) -> int:
    files = load_files(args.config, quiet=True)
    if not files.models:
        print(f"no models in {files.models_path} (open LMArena with the userscript to fill it)")
        return 0
    width = max(len(n) for n in files.models)
    print(f"{'name'.ljust(width)}  {'id'.ljust(36)}  type")
    for name, value in sorted(files.models.items(), key=lambda kv: kv[0].lower()):
        ref = parse_model_value(value)
        print(f"{name.ljust(width)}  {(ref.id or 'null').ljust(36)}  {ref.modality}")
    return 0


def _ask(prompt: str, choices: tuple, default: str) -> str:
    while True:
        answer = input(f"{prompt} [{'/'.join(choices)}] (default {default}): ").strip()
        if not answer:
            return default
        for c in choices:
            if answer.lower() == c.lower():
                return c
        print(f"please answer one of {', '.join(choices)}")


def cmd_capture(args) -> int:
    files = load_files(args.config, quiet=True)
    cfg = files.config
    mode, target = args.mode, args.target
    if mode is None and sys.stdin.isatty():
        mode = _ask("Capture mode", ("direct_chat", "battle"), cfg.id_updater_last_mode)
    mode = mode or cfg.id_updater_last_mode
    if mode == "battle" and target is None and sys.stdin.isatty():
        target = _ask("Battle target", ("A", "B"), cfg.id_updater_battle_target)
    target = (target or cfg.id_updater_battle_target).upper()
    timeout = args.timeout if args.timeout is not None else cfg.capture_timeout_seconds
    base = bridge_base(cfg, args.bridge)
    body = {"mode": mode, "target": target, "model": args.model, "timeout": timeout}
    try:
        # Arm first, so "armed" is printed only once a tab really is armed; then wait for the click.
        status, answer, _ = call_bridge(base, "/internal/start_id_capture", cfg, body)
        if status != 200:
            print(f"capture failed: {error_message(answer, status)}", file=sys.stderr)
            return 1
        print(f"Capture armed on {answer.get('tabs', 1)} tab(s) ({mode}{' ' + target if mode == 'battle' else ''}"
              f"{', for model ' + args.model if args.model else ''}). In your LMArena tab (its title shows 🎯), "
              f"click Retry on the target answer. Waiting up to {timeout:g} s...", flush=True)
        status, answer, _ = call_bridge(base, "/internal/id_capture", cfg, body, timeout=timeout + 15)
    except (OSError, TimeoutError) as exc:
        print(f"capture failed: the bridge is not reachable at {base} ({exc}); start it with "
              "`python bridge.py` first", file=sys.stderr)
        return 1
    if status != 200:
        print(f"capture failed: {error_message(answer, status)}", file=sys.stderr)
        return 1
    print(f"Captured session_id {answer['session_id']} and message_id {answer['message_id']}; "
          f"written to {answer['written_to']}. The running bridge uses them now.")
    return 0


def cmd_doctor(args, out=print) -> int:
    """One line per link: `ok <check>: <detail>` or `FAIL <check>: <detail> -- <what to do>`."""
    files = load_files(args.config, quiet=True)
    cfg = files.config
    base = bridge_base(cfg, args.bridge)
    if cfg.session_mode == "retry" and (is_placeholder_id(cfg.session_id) or is_placeholder_id(cfg.message_id)):
        out(f"FAIL config: session_mode is \"retry\" but the session ids in {files.config_path} are "
            "placeholders: every request fails with session_not_configured -- run `python bridge.py "
            "capture` and click Retry on an answer in the tab, or set \"session_mode\": \"create\"")
        config_ok = False
    else:
        out(f"ok config: {files.config_path} is valid")
        config_ok = True
    try:
        status, health, _ = call_bridge(base, "/health", cfg)
    except (OSError, TimeoutError) as exc:
        out(f"FAIL bridge: not reachable at {base} ({exc}) -- start it with `python bridge.py`; if it runs "
            "on another port, give that one: `python bridge.py doctor --bridge http://127.0.0.1:<port>` "
            "(doctor reads host and port from this config)")
        return 1
    if not isinstance(health, dict) or not isinstance(health.get("version"), str):
        out(f"FAIL bridge: {base}/health answered {status} with something that is not this bridge's "
            "status -- another program is on that port: is the bridge on another one? Give it with --bridge")
        return 1
    if status != 200 or "tab_details" not in health:
        out(f"FAIL bridge: {base}/health answered {status} without details -- run doctor on the bridge's "
            "machine, or set api_key in this config as in the bridge's")
        return 1
    passed = config_ok
    checks = doctor_checks(health)
    for ok, name, detail, todo in checks[1:] if checks[0][0] else checks:
        passed &= ok is not False
        out(f"ok {name}: {detail}" if ok else f"note {name}: {detail}" if ok is None
            else f"FAIL {name}: {detail} -- {todo}")
    if args.send:
        passed &= doctor_send(base, cfg, args.send, out)
    return 0 if passed else 1


def doctor_send(base: str, cfg: Config, model: str, out) -> bool:
    started = time.monotonic()
    try:
        status, answer, headers = call_bridge(base, "/v1/chat/completions", cfg, {
            "model": model, "messages": [{"role": "user", "content": "Reply with the single word: pong"}]},
            timeout=cfg.stream_response_timeout_seconds + 15)
    except (OSError, TimeoutError) as exc:
        out(f"FAIL send: the bridge stopped answering ({exc}) -- see its log")
        return False
    took = (time.monotonic() - started) * 1000
    if status != 200:
        out(f"FAIL send: {model} answered {status}: {error_message(answer, status)} -- follow the message above")
        return False
    try:
        text = str(answer["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        out(f"FAIL send: {model} answered 200 without a chat completion -- another program on that port?")
        return False
    words = " ".join(text.split()[:8])
    stages = ""
    rid = (headers.get("X-Request-Id") or headers.get("x-request-id") or "")[:8]
    with contextlib.suppress(OSError, TimeoutError, ValueError, KeyError, TypeError, AttributeError):
        _, health, _ = call_bridge(base, "/health", cfg)
        for r in health.get("recent_requests") or []:
            if r["id"] == rid:
                stages = ", ".join(f"{k} {v:.0f} ms" for k, v in r["stages_ms"].items())
    out(f"ok send: {model} answered {words!r} in {took:.0f} ms" + (f" ({stages})" if stages else ""))
    return True


def cmd_update(args) -> int:
    files = load_files(args.config, quiet=True)
    return run_update(files)


async def serve(files: UserFiles, host: str | None, port: int | None, launcher=None) -> bool:
    """Run until SIGINT/SIGTERM (returns False) or an idle restart (returns True); with a browser
    launcher (`--browser`), start it once listening and close it first on the way out."""
    bridge = Bridge(files, host, port)
    try:
        await bridge.start()
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = (f" (another program, perhaps a bridge already running, uses port {bridge.port}: stop it, "
                    "or start this one with --port N and point the tab at it)")
        print(f"error: cannot listen on {bridge.host}:{bridge.port}: {exc.strerror or exc}{hint}", file=sys.stderr)
        raise SystemExit(1)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, bridge.exit_event.set)
    print(f"LMArena Bridge {VERSION} listening on {bridge.url} (API: {bridge.url}/v1, "
          f"status page: {bridge.url}/, tabs: ws://{bridge.url[7:]}/ws)", flush=True)
    if launcher is not None:                     # the browser launcher
        launcher.tab_url = launcher.tab_url or local_tab_url(bridge.host, bridge.port)
        bridge.browser = launcher
        await launcher.start()
    await bridge.exit_event.wait()
    log.info("shutting down" if not bridge.restart_requested else "restarting")
    if launcher is not None:                     # the browser launcher
        await launcher.stop()
    await bridge.stop()
    return bridge.restart_requested


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "serve"
    for i, a in enumerate(argv):
        if a in SUBCOMMANDS:
            command = argv.pop(i)
            break
        if not a.startswith("-") and (i == 0 or argv[i - 1] not in ("--config", "--host", "--port", "--bridge",
                                                                     "--chrome", "--profile", "--url")):
            print(f"error: unknown command {a!r}; use one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
            return 2
    args = build_parser(command).parse_args(argv)
    if command == "models":
        return cmd_models(args)
    if command == "capture":
        return cmd_capture(args)
    if command == "update":
        return cmd_update(args)
    if command == "doctor":
        return cmd_doctor(args)
    if command == "browser":                     # the browser launcher
        return cmd_browser(args)
    chrome = browser_or_exit(args.chrome) if args.browser else None  
    files = load_files(args.config)
    launcher = launcher_from_args(args, files, chrome, None) if args.browser else None
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    set_log_level(files.config.log_level)
    restart = asyncio.run(serve(files, args.host, args.port, launcher))
    if restart:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:])
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
