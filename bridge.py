#!/usr/bin/env python3
"""LMArena Bridge: an OpenAI-compatible API served from your own logged-in LMArena browser tab.

One file, asyncio, a hand-rolled HTTP/1.1 server with the tab WebSocket on the same port.
Run-time dependencies: ``websockets`` (all WebSocket framing, Sans-I/O) and ``json5`` (config files).

Run
    python bridge.py [--config PATH] [--host H] [--port N]    serve (prints "listening on http://H:P")
    python bridge.py capture [--mode direct_chat|battle] [--target A|B] [--model NAME] [--timeout S]
    python bridge.py models                                     list the known models
    python bridge.py update                                     install a newer version (see update_url)
Exit codes: 0 done, 1 could not do it (explained in one line), 2 bad usage or broken file.

HTTP endpoints (same port as the tab socket)
    POST /v1/chat/completions      OpenAI chat, streaming (SSE) or not
    POST /v1/images/generations    OpenAI image generation (n tasks in parallel)
    GET  /v1/models, /v1/models/{id}
    GET  /health                   {"status", "version", "tabs", "tasks_in_flight", ...}
    POST /internal/id_capture      arms the tabs, waits for a Retry click (loopback + API key)
    GET  /ws                       WebSocket for userscript tabs (LMArena origins only)

Tab protocol (JSON text messages; see PROTOCOL.md section 1)
    bridge -> tab  {"request_id", "payload": {message_templates, target_model_id, session_id,
                   message_id, is_image_request, request: {method, path, body, recaptcha_action}}}
                   {"command": "abort"|"refresh"|"reconnect"|"activate_id_capture"|"send_models"|...}
    tab -> bridge  {"request_id", "data": "<raw LMArena text>" | "[DONE]" | {"error", "status", "retry_after"}}
                   {"type": "hello"|"ids_captured"|"models", ...}

Limits and timeouts (config.jsonc keys; defaults)
    max_head_bytes 65536          request line + headers; 431 above (nginx 8 KiB, node 16 KiB, h11 16 KiB;
                                  larger here because some clients send long cookies to localhost)
    max_body_bytes 64 MiB         request body; 413 above (several base64 images fit)
    max_attachment_bytes 5 MiB    one decoded attachment; LMArena refuses more as a data URL
    head_timeout_seconds 10       whole request head, from its first byte (408)
    body_timeout_seconds 60       whole request body (408)
    keep_alive_timeout_seconds 15 idle time between requests on one connection
    max_connections 512           open HTTP connections; 503 above
    first_byte_hold_seconds 10    streaming: hold the 200 until the tab answers, so errors keep their status
    keepalive_interval_seconds 15 ": keep-alive" SSE comments while waiting
    stream_response_timeout_seconds 360   no data from the tab for that long: 504
Table of contents: grep -n '^# [0-9]' bridge.py
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import contextlib
import dataclasses
import datetime
import difflib
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import mimetypes
import os
import re
import signal
import sys
import tempfile
import time
import urllib.parse
import uuid

import json5
from websockets.frames import Opcode
from websockets.http11 import Request as WsRequest
from websockets.datastructures import Headers as WsHeaders
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol

VERSION = "3.0.0"
log = logging.getLogger("bridge")

# 1. Constants and limits ============================================================================

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_NAME, MODELS_NAME, MAP_NAME = "config.jsonc", "models.json", "model_endpoint_map.json"
PROGRAM_FILES = ("bridge.py", "userscript.js", "README.md")  # the only files `update` may replace

MAX_HEADERS = 100                 # h11 and websockets cap the count too; 100 is generous for clients
MAX_CHUNK_SIZE_DIGITS = 16        # hex digits of one chunk size (64 bits); more is an attack
MAX_TRAILER_BYTES = 8192          # chunked trailers are read and discarded
WS_MAX_MESSAGE = 64 * 2**20       # tab messages carry base64 images: several MiB must pass
WS_PING_INTERVAL = 20.0           # server pings; browsers answer even in throttled background tabs
WS_PING_TIMEOUT = 20.0            # no traffic at all for interval + timeout: the tab is dead
MAX_PENDING_OUTPUT = 8 * 2**20    # bytes queued for a client that does not read; past it we give up
FLUSH_INTERVAL = 0.002            # a burst of tokens within 2 ms of the last write goes out as one chunk
MAX_ANSWER_CHARS = 64 * 2**20     # a non-streaming answer is held in memory: a runaway tab stops here
READ_SIZE = 262144                # one read; all tab messages of a read are flushed to clients together

# Hot-path JSON: skip json.loads' type checks and encoding sniffing (tab messages are UTF-8 text).
_json_decode = json.JSONDecoder().decode
_scan_json_string = json.decoder.scanstring

LMARENA_HOSTS = ("lmarena.ai", "arena.ai")
RETRY_PATH = "/nextjs-api/stream/retry-evaluation-session-message/{session_id}/messages/{message_id}"
RECAPTCHA_RETRY_ACTION = "chat_retry"
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")

# 2. Configuration ===================================================================================

DEFAULT_CONFIG = {
    # The original's options
    "session_id": "YOUR_SESSION_ID",
    "message_id": "YOUR_MESSAGE_ID",
    "id_updater_last_mode": "direct_chat",
    "id_updater_battle_target": "A",
    "use_default_ids_if_mapping_not_found": True,
    "tavern_mode_enabled": False,
    "bypass_enabled": False,
    "api_key": "",
    "stream_response_timeout_seconds": 360,
    "enable_auto_update": True,
    "enable_idle_restart": False,
    "idle_restart_timeout_seconds": -1,
    # Ours
    "host": "127.0.0.1",
    "port": 5102,
    "allowed_tab_origins": [],
    "allow_remote_tabs": False,
    "cors_allowed_origins": ["http://localhost", "http://127.0.0.1", "http://[::1]"],
    "allowed_hosts": [],
    "max_head_bytes": 65536,
    "max_body_bytes": 64 * 2**20,
    "max_attachment_bytes": 5 * 2**20,
    "head_timeout_seconds": 10,
    "body_timeout_seconds": 60,
    "keep_alive_timeout_seconds": 15,
    "max_connections": 512,
    "first_byte_hold_seconds": 10,
    "keepalive_interval_seconds": 15,
    "cloudflare_wait_seconds": 60,
    "strict_models": False,
    "default_image_model": "",
    "capture_timeout_seconds": 180,
    "update_url": "",
    "log_level": "info",
}
_NUMBER_KEYS = {k for k, v in DEFAULT_CONFIG.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class ConfigError(Exception):
    """A user file that cannot be used; the message names the file, line and column."""


def parse_json_file(path: str, text: str):
    """JSON first (fast), JSON5 for comments and trailing commas; errors carry line and column."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return json5.loads(text)
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


def validate_config(path: str, raw) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be an object {{...}}")
    cfg = dict(DEFAULT_CONFIG)
    for key, value in raw.items():
        default = DEFAULT_CONFIG.get(key)
        if key in _NUMBER_KEYS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{path}: \"{key}\" must be a number, not {json.dumps(value)}")
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{path}: \"{key}\" must be true or false, not {json.dumps(value)}")
        elif isinstance(default, list) and not (isinstance(value, list)
                                                and all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{path}: \"{key}\" must be a list of strings")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{path}: \"{key}\" must be a string, not {json.dumps(value)}")
        cfg[key] = value
    if not 0 <= int(cfg["port"]) <= 65535:
        raise ConfigError(f"{path}: \"port\" must be between 0 and 65535")
    if cfg["id_updater_last_mode"] not in ("direct_chat", "battle"):
        raise ConfigError(f"{path}: \"id_updater_last_mode\" must be \"direct_chat\" or \"battle\"")
    if str(cfg["id_updater_battle_target"]).upper() not in ("A", "B"):
        raise ConfigError(f"{path}: \"id_updater_battle_target\" must be \"A\" or \"B\"")
    return cfg


def validate_models(path: str, raw) -> dict:
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ConfigError(f"{path}: must be an object of \"model name\": \"<uuid>\" (or \"<uuid>:image\")")
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
    """The three user files, re-read when they change on disk (checked per API request: a stat is
    cheap, and an edit then takes effect on the very next request). A broken edit keeps the last
    good version and logs why."""

    def __init__(self, config_path: str):
        self.config_path = os.path.abspath(config_path)
        folder = os.path.dirname(self.config_path)
        self.models_path = os.path.join(folder, MODELS_NAME)
        self.map_path = os.path.join(folder, MAP_NAME)
        self.config: dict = dict(DEFAULT_CONFIG)
        self.models: dict = {}
        self.endpoint_map: dict = {}
        self._stamps: dict = {}

    def _spec(self):
        return ((self.config_path, "config", validate_config, {}),
                (self.models_path, "models", validate_models, {}),
                (self.map_path, "endpoint_map", validate_endpoint_map, {}))

    @staticmethod
    def _stamp(path):
        try:
            st = os.stat(path)
            return (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return None

    def load_all(self, report=print) -> None:
        """Startup: a missing file is reported and defaults used; a broken one raises ConfigError."""
        for path, attr, validate, default in self._spec():
            value, text = read_json_file(path, default)
            if text is None:
                report(f"note: {path} not found; using defaults")
            setattr(self, attr, validate(path, value))
            self._stamps[path] = self._stamp(path)

    def refresh(self) -> bool:
        """Reload whichever file changed; True when something was reloaded."""
        changed = False
        for path, attr, validate, default in self._spec():
            stamp = self._stamp(path)
            if stamp == self._stamps.get(path):
                continue
            self._stamps[path] = stamp
            try:
                value, _ = read_json_file(path, default)
                new = validate(path, value)
            except ConfigError as exc:
                log.error("keeping the last good %s: %s", os.path.basename(path), exc)
                continue
            if attr == "config":
                for key in ("host", "port"):
                    if new[key] != self.config[key]:
                        log.warning("%s changed in %s; it takes effect after a restart", key, path)
                set_log_level(new["log_level"])
            setattr(self, attr, new)
            log.info("reloaded %s", os.path.basename(path))
            changed = True
        return changed

    def note_written(self, path: str) -> None:
        self._stamps[path] = self._stamp(path)


def set_log_level(name: str) -> None:
    log.setLevel(logging.DEBUG if str(name).lower() == "debug" else
                 getattr(logging, str(name).upper(), logging.INFO))


def is_placeholder_id(value) -> bool:
    """Empty, containing YOUR_ (any case), or not shaped like a UUID."""
    return not isinstance(value, str) or not value or "your_" in value.lower() or not UUID_RE.match(value)


# 3. Atomic, comment-keeping writes of user files ====================================================

def atomic_write(path: str, content: str | bytes) -> None:
    """Temporary file in the same folder, fsync, rename: a crash leaves the old or the new file."""
    folder = os.path.dirname(os.path.abspath(path))
    data = content.encode("utf-8") if isinstance(content, str) else content
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
    for start, end, rendered in sorted(edits, reverse=True):
        text = text[:start] + rendered + text[end:]
    return text


# 4. Errors =========================================================================================

class ApiError(Exception):
    """An error a client sees, OpenAI-shaped; rendered in one place (`error_body`)."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 type_: str | None = None, retry_after: int | None = None, close: bool = False):
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

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": None}}


def no_tab_error() -> ApiError:
    return ApiError(503, "No LMArena tab is connected to the bridge. Open https://lmarena.ai (or "
                    "arena.ai) in a browser with the LMArena Bridge userscript installed and enabled; its "
                    "title starts with ✅ once connected (check http://127.0.0.1:5102/health).",
                    "no_tab_connected", retry_after=5)


# 5. HTTP/1.1 wire format (pure: bytes in, values out) ===============================================

_TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_TARGET_RE = re.compile(rb"^[\x21-\x7e]+$")
_VALUE_BAD_RE = re.compile(rb"[\x00\r\n]")
_DIGITS_RE = re.compile(rb"^[0-9]+$")
_HEX_RE = re.compile(rb"^[0-9A-Fa-f]+$")


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
    headers = []
    for line in lines[1:]:
        if not line:
            raise HttpError(400, "empty header line")
        if line[0] in b" \t":
            raise HttpError(400, "obsolete line folding is not allowed")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RE.match(name):
            raise HttpError(400, "malformed header field name (whitespace before ':'?)")
        if _VALUE_BAD_RE.search(value):
            raise HttpError(400, "CR, LF or NUL in a header value")
        headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    version = version_b.decode()
    method = method_b.decode()
    target = target_b.decode("ascii")
    content_length = None
    chunked = False
    te_values = [v for k, v in headers if k == "transfer-encoding"]
    cl_values = [v for k, v in headers if k == "content-length"]
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
    hosts = [v for k, v in headers if k == "host"]
    if len(hosts) > 1 or (version == "HTTP/1.1" and not hosts):
        raise HttpError(400, "exactly one Host header is required")
    conn_tokens = {t.strip(" \t").lower() for k, v in headers if k == "connection" for t in v.split(",")}
    keep_alive = ("keep-alive" in conn_tokens) if version == "HTTP/1.0" else ("close" not in conn_tokens)
    expect = next((v for k, v in headers if k == "expect"), None)
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
            405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
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


def sse_event(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


# 6. LMArena translation (pure): OpenAI request -> LMArena task, LMArena stream -> events ==========
#    Everything LMArena-specific lives here: when the site changes, this is the section to adjust.

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
        value = (ms & 0xFFFFFFFFFFFF) << 80 | 0x7 << 76 | seq << 64 | 0b10 << 62 | rand_b
        out.append(str(uuid.UUID(int=value)))
        seq += 1
    return out


def iso_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


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


def _attachment(url: str, name: str | None, mime: str | None, index: int, kind: str,
                limit: int) -> dict:
    if url.startswith("data:"):
        m = _DATA_URL_RE.match(url)
        if not m:
            raise ApiError(400, f"{kind} attachment {index}: malformed data URL", "invalid_attachment")
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
        name = f"{kind}_{index}.{_extension_for(mime)}"
    return {"name": name, "contentType": mime, "url": url}


def content_to_text(content, limit: int, counter: itertools.count) -> tuple[str, list]:
    """OpenAI message content (string or list of parts) -> (text, attachments)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise ApiError(400, "message content must be a string or a list of parts", "invalid_content")
    texts, files = [], []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise ApiError(400, "each content part must be an object", "invalid_content")
        kind = part.get("type")
        if kind in ("text", "input_text"):
            texts.append(str(part.get("text") or ""))
        elif kind in ("image_url", "input_image"):
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise ApiError(400, "image_url part needs image_url.url", "invalid_content")
            files.append(_attachment(url, None, None, next(counter), "image", limit))
        elif kind == "input_audio":
            audio = part.get("input_audio") or {}
            data, fmt = audio.get("data"), str(audio.get("format") or "wav").lower()
            if not isinstance(data, str):
                raise ApiError(400, "input_audio part needs input_audio.data (base64)", "invalid_content")
            mime = _AUDIO_TYPES.get(fmt, f"audio/{fmt}")
            url = data if data.startswith("data:") else f"data:{mime};base64,{data}"
            n = next(counter)
            files.append(_attachment(url, f"audio_{n}.{'wav' if fmt == 'pcm16' else fmt}", mime, n,
                                     "audio", limit))
        elif kind == "file":
            f = part.get("file") or {}
            data, name = f.get("file_data"), f.get("filename")
            if not isinstance(data, str):
                raise ApiError(400, "file part needs file.file_data (a data URL or base64); file_id is "
                               "not supported", "invalid_content")
            mime = None
            if not data.startswith("data:"):
                mime = (mimetypes.guess_type(name)[0] if name else None) or "application/octet-stream"
                data = f"data:{mime};base64,{data}"
            elif name and _DATA_URL_RE.match(data) and not _DATA_URL_RE.match(data).group(1):
                mime = mimetypes.guess_type(name)[0]
            files.append(_attachment(data, name, mime, next(counter), "file", limit))
        elif kind in ("refusal",):
            texts.append(str(part.get("refusal") or ""))
        else:
            raise ApiError(400, f"unsupported content part type {kind!r}", "invalid_content")
    return "\n\n".join(t for t in texts if t) if len(texts) > 1 else "".join(texts), files


def openai_to_templates(messages, *, tavern: bool, bypass: bool, is_image: bool, mode: str,
                        target: str, attachment_limit: int) -> list[dict]:
    """OpenAI messages -> the original's message_templates, with participant positions."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_messages")
    counter = itertools.count(1)
    templates = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ApiError(400, f"messages[{i}] must be an object", "invalid_messages")
        role = msg.get("role")
        if role == "developer":
            role = "system"
        elif role in ("tool", "function"):
            role = "user"         # tool results are shown to the model as user text
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role {role!r} is not supported", "invalid_messages")
        text, files = content_to_text(msg.get("content"), attachment_limit, counter)
        if role == "user" and not text.strip() and not files:
            text = " "            # LMArena rejects empty content
        elif role == "user" and not text:
            text = " "
        templates.append({"role": role, "content": text, "attachments": files})
    if tavern:
        system = [t["content"] for t in templates if t["role"] == "system"]
        rest = [t for t in templates if t["role"] != "system"]
        templates = ([{"role": "system", "content": "\n\n".join(system), "attachments": []}]
                     if system else []) + rest
    battle_side = "b" if str(target).upper() == "B" else "a"
    for t in templates:
        if mode == "battle":
            t["participantPosition"] = battle_side
        else:
            t["participantPosition"] = "b" if t["role"] == "system" else "a"
    if bypass and not is_image:
        templates.append({"role": "user", "content": " ", "participantPosition": "a", "attachments": []})
    return templates


def build_retry_request(templates: list, session_id: str, message_id: str, model_id,
                        is_image: bool) -> dict:
    """The complete LMArena request for the retry endpoint (PROTOCOL 2.2); the tab adds the token."""
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


def resolve_model(name: str, models: dict, strict: bool) -> tuple[str | None, bool]:
    """(modelId or None, is_image) from models.json: "uuid", "uuid:image" or "null:image"."""
    value = models.get(name)
    if value is None:
        if strict:
            close = difflib.get_close_matches(name, list(models), n=5, cutoff=0.4)
            hint = f" Similar: {', '.join(close)}." if close else ""
            raise ApiError(404, f"The model {name!r} is not in models.json.{hint}", "model_not_found")
        return None, False
    model_id, _, kind = value.partition(":")
    model_id = None if model_id in ("", "null") else model_id
    return model_id, kind == "image"


@dataclasses.dataclass(frozen=True, slots=True)
class SessionChoice:
    session_id: str
    message_id: str
    mode: str        # direct_chat | battle
    target: str      # "A" | "B"
    source: str      # where it came from, for messages


def session_candidates(model: str, cfg: dict, endpoint_map: dict) -> list[SessionChoice]:
    entry = endpoint_map.get(model)
    if entry is not None:
        entries = entry if isinstance(entry, list) else [entry]
        out = []
        for e in entries:
            out.append(SessionChoice(e["session_id"], e["message_id"],
                                     e.get("mode") or cfg["id_updater_last_mode"],
                                     str(e.get("battle_target") or cfg["id_updater_battle_target"]).upper(),
                                     f"{MAP_NAME} entry for {model!r}"))
        if out:
            return out
    if not cfg["use_default_ids_if_mapping_not_found"]:
        raise ApiError(400, f"No session is configured for model {model!r} in {MAP_NAME}, and "
                       "use_default_ids_if_mapping_not_found is false. Add one with: python bridge.py "
                       f"capture --model {model!r}", "session_not_configured")
    return [SessionChoice(cfg["session_id"], cfg["message_id"], cfg["id_updater_last_mode"],
                          str(cfg["id_updater_battle_target"]).upper(), CONFIG_NAME)]


def check_session(choice: SessionChoice) -> None:
    if is_placeholder_id(choice.session_id) or is_placeholder_id(choice.message_id):
        raise ApiError(400, f"The session ids in {choice.source} are placeholders or not UUIDs. Capture "
                       "them: run `python bridge.py capture` and click Retry on an answer in your "
                       "LMArena tab.", "session_not_configured")


# -- The response stream -----------------------------------------------------------------------------

_CLOUDFLARE_MARKS = ("<title>Just a moment", "Enable JavaScript and cookies to continue",
                     "cf-mitigated", "challenge-platform", "cf_chl_")
FINISH_REASONS = {"stop": "stop", "unknown": "stop", "length": "length",
                  "content-filter": "content_filter", "content_filter": "content_filter",
                  "tool-calls": "stop", "other": "stop"}


def is_cloudflare(text: str) -> bool:
    return any(mark in text for mark in _CLOUDFLARE_MARKS)


def classify_upstream_error(message: str, status: int | None = None,
                            retry_after=None) -> ApiError:
    """A failure reported by the tab (or found in the stream) -> the error the client sees."""
    text = message if isinstance(message, str) else json.dumps(message)
    if status is None:
        m = re.search(r"\b(?:[Ss]tatus:?|HTTP)\s*(\d{3})\b", text)
        status = int(m.group(1)) if m else None
    detail = text.strip()
    inner = _inner_error_text(detail)
    short = (inner or detail)[:300]
    try:
        retry = max(1, int(float(retry_after))) if retry_after not in (None, "") else None
    except (TypeError, ValueError):
        retry = None
    if is_cloudflare(text):
        return ApiError(503, "LMArena is showing a Cloudflare check. The tab was asked to reload; if it "
                        "keeps failing, open the LMArena tab and complete the check.",
                        "cloudflare_challenge", retry_after=retry or 30)
    if status == 429 or "too many requests" in text.lower() or "rate limit" in text.lower():
        return ApiError(429, f"LMArena rate limit reached; try again later. ({short})", "rate_limited",
                        retry_after=retry or 30)
    if status == 401 or "does not have access to evaluation session" in text:
        return ApiError(403, "LMArena refused the session: it belongs to another account or you are "
                        "logged out. Capture ids again with `python bridge.py capture`. "
                        f"({short})", "session_not_owned")
    if "recaptcha" in text.lower() or (status == 403 and "captcha" in text.lower()):
        return ApiError(403, "LMArena's reCAPTCHA check failed. Open the LMArena tab, interact with the "
                        "page (solve a check if shown), then try again.", "recaptcha_failed")
    if status == 413 or "too large" in text.lower():
        return ApiError(413, f"LMArena refused an attachment as too large (about 5 MB per file as a data "
                        f"URL). ({short})", "attachment_too_large")
    if status == 422 or "violates our terms" in text.lower():
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


class ArenaStreamParser:
    """LMArena's `<side><code>:<JSON>\\n` lines -> events, however the text is cut into chunks.

    Events (tuples): ("text", json_literal, text), ("reasoning", text), ("image", url),
    ("finish", openai_reason, usage_or_None), ("error", ApiError). Lines of the other battle side,
    heartbeats and unknown codes are dropped. Bytes are decoded incrementally (a UTF-8 character
    may be split), and only complete lines are parsed (a JSON string may be split)."""

    __slots__ = ("side", "pending", "decoder", "citations", "tool_args", "finished")

    def __init__(self, side: str = "a"):
        self.side = side
        self.pending = ""
        self.decoder = None
        self.citations: list[dict] = []
        self.tool_args: dict[str, str] = {}
        self.finished = False

    def feed(self, chunk) -> list:
        if isinstance(chunk, (bytes, bytearray)):
            if self.decoder is None:
                self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
            chunk = self.decoder.decode(chunk)
        if "\n" not in chunk:
            self.pending += chunk
            return []
        lines = (self.pending + chunk).split("\n")
        self.pending = lines.pop()
        events = []
        for line in lines:
            self._line(line, events)
        return events

    def close(self) -> list:
        """End of stream: parse a last line that had no newline."""
        events = []
        if self.decoder is not None:
            self.pending += self.decoder.decode(b"", final=True)
        if self.pending.strip():
            self._line(self.pending, events)
        self.pending = ""
        return events

    def _line(self, line: str, events: list) -> None:
        if line.endswith("\r"):
            line = line[:-1]
        if len(line) < 3 or line[2] != ":" or line[0] not in "ab":
            self._odd_line(line, events)
            return
        if line[0] != self.side:
            return
        code, payload = line[1], line[3:]
        if code == "0" and payload[:1] == '"':
            # Text deltas are most of the stream: scan the string literal without a full JSON parse.
            try:
                value, end = _scan_json_string(payload, 1)
            except ValueError:
                end = -1
            if end == len(payload):
                if value == "hasArenaError":
                    events.append(("error", ApiError(502, "LMArena failed to answer this turn "
                                                     "(hasArenaError). Try again or pick another model.",
                                                     "upstream_error")))
                elif value:
                    events.append(("text", payload, value))
                return
        try:
            value = _json_decode(payload)
        except ValueError:
            log.debug("unparsable LMArena line dropped: %.200s", line)
            return
        if code == "0":
            if isinstance(value, str):
                if value == "hasArenaError":
                    events.append(("error", ApiError(502, "LMArena failed to answer this turn "
                                                     "(hasArenaError). Try again or pick another model.",
                                                     "upstream_error")))
                elif value:
                    events.append(("text", payload.strip(), value))
        elif code == "g":
            if isinstance(value, dict):
                value = value.get("text") or value.get("reasoning") or value.get("delta") or ""
            if isinstance(value, str) and value:
                events.append(("reasoning", value))
        elif code == "2":
            for part in value if isinstance(value, list) else [value]:
                if isinstance(part, dict) and part.get("type") == "image":
                    url = part.get("image") or part.get("url")
                    if not url and part.get("data"):
                        url = f"data:{part.get('mimeType') or 'image/png'};base64,{part['data']}"
                    if url:
                        events.append(("image", url))
        elif code == "3":
            events.append(("error", classify_upstream_error(value if isinstance(value, str)
                                                            else json.dumps(value))))
        elif code == "c":
            self._citation(value)
        elif code == "d":
            if not isinstance(value, dict):
                value = {}
            reason = value.get("finishReason") or "stop"
            if reason == "error":
                events.append(("error", ApiError(502, "LMArena ended the answer with an error.",
                                                 "upstream_error")))
                return
            self.finished = True
            events.append(("finish", FINISH_REASONS.get(reason, "stop"), value.get("usage")))
        else:
            log.debug("LMArena line with unhandled code %r ignored", code)

    def _odd_line(self, line: str, events: list) -> None:
        stripped = line.strip()
        if not stripped:
            return
        if is_cloudflare(stripped):
            events.append(("error", classify_upstream_error(stripped, 403)))
        elif stripped.startswith("{") and '"error"' in stripped:
            events.append(("error", classify_upstream_error(stripped)))
        else:
            log.debug("non-LMArena line dropped: %.200s", stripped)

    def _citation(self, value) -> None:
        if not isinstance(value, dict) or value.get("toolCallId") != "citation-source":
            return
        delta = value.get("argsTextDelta")
        if not isinstance(delta, str):
            return
        acc = self.tool_args.get("citation", "") + delta
        try:
            obj = json.loads(acc)
        except ValueError:
            self.tool_args["citation"] = acc      # a delta cut mid-object: wait for the rest
            return
        self.tool_args.pop("citation", None)
        sources = obj.get("source") if isinstance(obj, dict) else None
        for src in sources if isinstance(sources, list) else [sources]:
            if isinstance(src, dict) and isinstance(src.get("url"), str):
                if all(c["url"] != src["url"] for c in self.citations):
                    self.citations.append(src)


def citations_markdown(sources: list[dict]) -> str:
    lines = []
    for s in sources:
        title = s.get("title")
        lines.append(f"- [{title}]({s['url']})" if title else f"- {s['url']}")
    return "\n\nSources:\n" + "\n".join(lines)


def image_markdown(url: str) -> str:
    return f"![Image]({url})"


# 7. OpenAI formatting (pure) ========================================================================

def estimate_tokens(chars: int) -> int:
    """A rough estimate (about 4 characters per token); LMArena's own usage wins when it sends one."""
    return (chars + 3) // 4


def usage_object(prompt_chars: int, completion_chars: int, upstream) -> dict:
    if isinstance(upstream, dict):
        p = upstream.get("promptTokens", upstream.get("inputTokens", upstream.get("prompt_tokens")))
        c = upstream.get("completionTokens", upstream.get("outputTokens",
                                                           upstream.get("completion_tokens")))
        if isinstance(p, int) and isinstance(c, int):
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
                     '"choices":[{"index":0,"delta":{' % (json.dumps(cid), created,
                                                          json.dumps(model, ensure_ascii=False)))

    def content(self, literal: str) -> str:
        return self.head + '"content":' + literal + '},"finish_reason":null}]}\n\n'

    def reasoning(self, literal: str) -> str:
        return self.head + '"reasoning_content":' + literal + '},"finish_reason":null}]}\n\n'

    def role(self) -> str:
        return self.head + '"role":"assistant","content":""},"finish_reason":null}]}\n\n'

    def finish(self, reason: str) -> str:
        return self.head + '},"finish_reason":%s}]}\n\n' % json.dumps(reason)

    def usage(self, usage: dict) -> str:
        return "data: " + json.dumps({"id": self.cid, "object": "chat.completion.chunk",
                                      "created": self.created, "model": self.model, "choices": [],
                                      "usage": usage}, ensure_ascii=False) + "\n\n"


def completion_body(cid: str, model: str, created: int, content: str, reasoning: str,
                    finish: str, usage: dict) -> dict:
    message = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage}


# 8. Jobs: one task on a tab, from dispatch to its end ===============================================

class Job:
    """A task relayed to a tab. The tab's reader calls `on_tab_data`; for a live stream the output is
    written straight to the client's transport (no queue hop per token); the HTTP handler waits on
    `wake` only for the start, the end and keep-alive ticks."""

    __slots__ = ("bridge", "id", "message", "parser", "fmt", "stream", "tab", "retried", "received",
                 "out", "live", "http10", "content", "reasoning", "images", "completion_chars",
                 "finish_reason", "usage", "error", "done", "client_gone", "wake", "last_activity",
                 "last_output", "model", "dispatcher", "tab_name", "flush_timer")

    def __init__(self, bridge: "Bridge", payload: dict, side: str, model: str, stream: bool,
                 fmt: ChunkFormatter | None):
        self.bridge = bridge
        self.id = str(uuid.uuid4())
        self.message = json.dumps({"request_id": self.id, "payload": payload}, ensure_ascii=False)
        self.parser = ArenaStreamParser(side)
        self.fmt, self.stream, self.model = fmt, stream, model
        self.tab: Tab | None = None
        self.tab_name = "-"
        self.retried = self.received = self.done = self.client_gone = False
        self.out: list[str] = []
        self.live = None                       # the client's transport once the stream head is out
        self.http10 = False
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.images: list[str] = []
        self.completion_chars = 0
        self.finish_reason = "stop"
        self.usage = None
        self.error: ApiError | None = None
        self.wake = asyncio.Event()
        self.last_activity = self.last_output = time.monotonic()
        self.dispatcher: asyncio.Task | None = None
        self.flush_timer: asyncio.TimerHandle | None = None

    # -- from the tab --
    def on_tab_data(self, data) -> None:
        if self.done:
            return
        self.last_activity = time.monotonic()
        if not self.received:
            self.received = True
            self.wake.set()
        if type(data) is str:
            # Fast path: one whole text-delta line of our side (what most tab messages are).
            p = self.parser
            if data[-1:] == "\n" and data[1:4] == '0:"' and data[0] == p.side and not p.pending \
                    and data.find("\n") == len(data) - 1:
                literal = data[3:-1]
                try:
                    text, end = _scan_json_string(literal, 1)
                except ValueError:
                    end = -1
                if end == len(literal) and text and text != "hasArenaError":
                    self._emit(text, literal)
                    return
            if data == "[DONE]":
                self._events(self.parser.close())
                if not self.done:
                    self.complete()
            else:
                self._events(self.parser.feed(data))
        elif isinstance(data, dict) and "error" in data:
            err = classify_upstream_error(data.get("error") or "unknown error", _int_or_none(data.get("status")),
                                          data.get("retry_after"))
            self.bridge.note_upstream_error(self.tab, err)
            self.fail(err, tell_tab=False)
        else:
            log.debug("task %s: unexpected data of type %s ignored", self.id[:8], type(data).__name__)

    def _events(self, events: list) -> None:
        for ev in events:
            kind = ev[0]
            if kind == "text":
                if not self._emit(ev[2], ev[1]):
                    return
            elif kind == "reasoning":
                if self.stream:
                    self.out.append(self.fmt.reasoning(json.dumps(ev[1], ensure_ascii=False)))
                    self.bridge.dirty.add(self)
                else:
                    self.reasoning.append(ev[1])
            elif kind == "image":
                md = ("\n\n" if self.images or self.completion_chars else "") + image_markdown(ev[1])
                self.images.append(ev[1])
                if not self._emit(md):
                    return
            elif kind == "finish":
                self.finish_reason, self.usage = ev[1], ev[2]
                self.complete()
                return
            elif kind == "error":
                self.bridge.note_upstream_error(self.tab, ev[1])
                self.fail(ev[1])
                return

    def _emit(self, text: str, literal: str | None = None) -> bool:
        """Add answer text (`literal`: its JSON string literal, when LMArena sent one); False when
        that ended the job (a non-streaming answer is held in memory, up to MAX_ANSWER_CHARS)."""
        self.completion_chars += len(text)
        if self.stream:
            self.out.append(self.fmt.content(literal or json.dumps(text, ensure_ascii=False)))
            self.bridge.dirty.add(self)
            return True
        self.content.append(text)
        if self.completion_chars > MAX_ANSWER_CHARS:
            self.fail(ApiError(502, f"The answer is larger than the bridge keeps in memory ({MAX_ANSWER_CHARS} "
                               "characters); use stream=true.", "upstream_error"))
            return False
        return True

    def flush(self) -> None:
        """Write pending stream output to the client (called once per batch of tab messages).
        Tokens that arrive within FLUSH_INTERVAL of the last write wait for the rest of it, so a
        burst becomes one chunk instead of thousands (real tokens come slower and go out at once)."""
        live = self.live
        if live is None or not self.out or self.flush_timer is not None:
            return
        if live.is_closing():
            self.on_client_gone()
            return
        wait = self.last_output + FLUSH_INTERVAL - time.monotonic()
        if wait > 0:
            self.flush_timer = asyncio.get_running_loop().call_later(wait, self._timed_flush)
            return
        data = "".join(self.out).encode()
        self.out.clear()
        live.write(data if self.http10 else b"%x\r\n%b\r\n" % (len(data), data))
        self.last_output = time.monotonic()
        if live.get_write_buffer_size() > MAX_PENDING_OUTPUT:
            # The client stopped reading: memory stays bounded, the tab stops working for nobody.
            log.warning("task %s: client is not reading; dropping it", self.id[:8])
            self.on_client_gone()
            live.abort()

    def idle_left(self, timeout: float, now: float) -> float:
        """Seconds left before stream_response_timeout_seconds; at 0 the job fails with 504."""
        if self.tab is None:          # still waiting for a tab: the dispatcher owns that deadline
            self.last_activity = now
        left = self.last_activity + timeout - now
        if left <= 0:
            self.fail(ApiError(504, f"LMArena sent nothing for {timeout:g} s "
                               "(stream_response_timeout_seconds).", "upstream_timeout"))
        return left

    def _timed_flush(self) -> None:
        self.flush_timer = None
        self.flush()

    # -- endings --
    def complete(self) -> None:
        if self.done:
            return
        if self.parser.citations:
            self._emit(citations_markdown(self.parser.citations))
        self._end()

    def fail(self, err: ApiError, tell_tab: bool = True) -> None:
        if self.done:
            return
        self.error = err
        if tell_tab and self.tab is not None:
            self.tab.send({"command": "abort", "request_id": self.id})
        self._end()

    def on_client_gone(self) -> None:
        if self.done:
            self.client_gone = True
            return
        self.client_gone = True
        if self.tab is not None:
            self.tab.send({"command": "abort", "request_id": self.id})
        self._end()

    def _end(self) -> None:
        self.done = True
        if self.flush_timer is not None:      # the handler writes what is left with the ending
            self.flush_timer.cancel()
            self.flush_timer = None
        if self.tab is not None:
            self.tab.jobs.pop(self.id, None)
        if self.dispatcher is not None and not self.dispatcher.done():
            self.dispatcher.cancel()
        self.bridge.jobs.pop(self.id, None)
        self.wake.set()


def _int_or_none(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


# 9. The tab link (WebSocket via websockets' Sans-I/O ServerProtocol) ================================

class Tab(asyncio.Protocol):
    """One connected userscript tab: a worker that runs tasks concurrently. After the handshake it
    becomes the socket's protocol, so every read goes straight to the frame parser (no stream
    reader and no task switch per read: this is the per-token path)."""

    def __init__(self, bridge: "Bridge", proto: ServerProtocol, transport, origin: str, peer):
        self.bridge, self.proto, self.transport = bridge, proto, transport
        self.closed = asyncio.get_running_loop().create_future()
        self.name = f"tab{next(bridge.tab_counter)}"
        self.origin, self.peer = origin, peer
        self.jobs: dict[str, Job] = {}
        self.assigned = 0
        self.version = None
        self.url = None
        self.challenged_until = 0.0     # Cloudflare: not given work until it reloads (or this passes)
        self.refresh_sent = False
        self.last_seen = time.monotonic()
        self.connected_at = time.time()
        self.fragments: list[bytes] | None = None

    def send(self, obj) -> None:
        self.send_text(obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False))

    def send_text(self, text: str) -> None:
        if self.proto.state is not WsState.OPEN:
            return
        self.proto.send_text(text.encode())
        self._write_out()

    def _write_out(self) -> None:
        transport = self.transport
        for data in self.proto.data_to_send():
            if transport.is_closing():
                return
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    transport.write_eof()

    # asyncio.Protocol callbacks
    def data_received(self, data: bytes) -> None:
        try:
            self.receive(data)
        except Exception:
            log.exception("%s: failed to handle tab data; dropping the tab", self.name)
            self.transport.abort()
            return
        if self.proto.state is WsState.CLOSED:
            self.transport.close()

    def eof_received(self) -> bool:
        self.proto.receive_eof()
        self._write_out()
        return False

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def receive(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        self.proto.receive_data(data)
        for frame in self.proto.events_received():
            op = frame.opcode
            if op is Opcode.TEXT or op is Opcode.BINARY:
                if frame.fin:
                    self.on_message(frame.data)
                else:
                    self.fragments = [frame.data]
            elif op is Opcode.CONT and self.fragments is not None:
                self.fragments.append(frame.data)
                if frame.fin:
                    data, self.fragments = b"".join(self.fragments), None
                    self.on_message(data)
        self._write_out()             # pongs and close replies
        self.bridge.flush_dirty()

    def on_message(self, raw: bytes) -> None:
        try:
            msg = _json_decode(raw.decode())
        except ValueError:     # UnicodeDecodeError is a ValueError too
            log.debug("%s sent something that is not JSON; ignored", self.name)
            return
        if type(msg) is not dict:
            return
        rid = msg.get("request_id")
        if rid is not None:
            job = self.jobs.get(rid)
            if job is None:
                log.debug("%s: message for unknown task %.40s ignored", self.name, rid)
                return
            try:
                job.on_tab_data(msg.get("data"))
            except Exception:     # a bug here must not kill the tab link or the other tasks
                log.exception("task %s: failed to handle tab data", job.id[:8])
                job.fail(ApiError(502, "The bridge could not read LMArena's answer.", "upstream_error"))
            return
        try:
            self.on_notice(msg)
        except Exception:         # a malformed report must not take the tab link down
            log.exception("%s: could not handle a %r message", self.name, msg.get("type"))

    def on_notice(self, msg: dict) -> None:
        kind = msg.get("type")
        if kind == "hello":
            self.version, self.url = str(msg.get("version") or "?")[:40], str(msg.get("url") or "")[:300]
            log.info("%s says hello: userscript %s at %s", self.name, self.version, self.url)
        elif kind == "ids_captured":
            self.bridge.on_ids_captured(self, msg.get("session_id"), msg.get("message_id"))
        elif kind == "models":
            self.bridge.on_models(self, msg.get("models"))
        elif kind == "log":
            log.debug("%s: %.300s", self.name, msg.get("message"))
        else:
            log.debug("%s: unknown message type %r ignored", self.name, kind)

    def available(self, now: float) -> bool:
        return self.proto.state is WsState.OPEN and now >= self.challenged_until

    def close(self, code: int = 1001, reason: str = "") -> None:
        if self.proto.state is WsState.OPEN:
            self.proto.send_close(code, reason)
            self._write_out()


def origin_is_lmarena(origin: str) -> bool:
    try:
        u = urllib.parse.urlsplit(origin)
    except ValueError:
        return False
    host = (u.hostname or "").lower()
    return (u.scheme == "https" and u.path in ("", "/") and not u.username
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


# 10. HTTP connection driver (asyncio) ===============================================================

class Connection(asyncio.Protocol):
    """One client connection: reads requests under deadlines, answers them in order (pipelining),
    keeps alive, upgrades /ws to a tab link. Never sends an error once a response has started.

    It is the socket's asyncio protocol: bytes land in `buf` as they arrive (pipelined requests
    included), and a client that leaves is noticed at once, also while a job runs (the job is told,
    and the tab aborts), without a reader task per request."""

    def __init__(self, bridge: "Bridge"):
        # Per-connection state
        self.bridge = bridge
        self.transport: asyncio.Transport | None = None
        self.peer = None
        self.buf = bytearray()
        self.eof = False              # the client sent EOF or the connection is gone
        self.waiter: asyncio.Future | None = None        # run() waits for bytes
        self.drain_waiter: asyncio.Future | None = None  # run() waits for the client to read
        self.write_paused = False
        self.read_paused = False
        self.linger = False           # an error answer was sent with Connection: close
        self.busy = False             # a request is being answered (idle ones close at shutdown)
        self.task: asyncio.Task | None = None
        # Per-request state
        self.responded = False
        self.on_gone = None           # called when the client leaves while a job runs

    # asyncio.Protocol callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        bridge = self.bridge
        if bridge.stopping or len(bridge.connections) >= bridge.files.config["max_connections"]:
            err = ApiError(503, "Too many open connections.", "too_many_connections", retry_after=1)
            transport.write(response_head(503, [("Content-Type", "application/json"), ("Retry-After", "1"),
                                                ("Content-Length", str(len(json.dumps(err.body())))),
                                                ("Connection", "close")]) + json.dumps(err.body()).encode())
            transport.close()
            return
        bridge.connections.add(self)
        self.task = asyncio.get_running_loop().create_task(self.run())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None:
            if not self.waiter.done():
                self.waiter.set_result(None)
        elif len(self.buf) > self.bridge.files.config["max_head_bytes"] and not self.read_paused:
            # Nobody is reading (a job runs): keep pipelined bytes, but not without bound.
            self.read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._gone()
        return False

    def connection_lost(self, exc) -> None:
        self._gone()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_exception(ConnectionResetError("client went away"))
        self.bridge.connections.discard(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def _gone(self) -> None:
        self.eof = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        if self.on_gone is not None:
            on_gone, self.on_gone = self.on_gone, None
            on_gone()

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
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self.waiter
        finally:
            self.waiter = None
        return len(self.buf) > size

    async def run(self) -> None:
        cfg = self.bridge.files.config
        first = True
        try:
            while True:
                req = await self.read_head(first, cfg)
                if req is None:
                    return
                first = False
                self.responded = False
                self.busy = True
                if not await self.bridge.handle(self, req):
                    return
                self.busy = False
                if self.bridge.stopping:
                    return
                cfg = self.bridge.files.config
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
        except Exception:             # a bug: say so once, never leave the client hanging
            log.exception("internal error while serving %s", self.peer)
            if not self.responded:
                with contextlib.suppress(Exception):
                    await self.send_error(ApiError(500, "Internal error in the bridge; see its log.",
                                                   "internal_error"), close=True)
        finally:
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

    async def read_head(self, first: bool, cfg: dict) -> HttpRequest | None:
        limit = int(cfg["max_head_bytes"])
        # Idle: between keep-alive requests (or before the first byte) we wait without a response.
        idle = cfg["keep_alive_timeout_seconds"] if not first else cfg["head_timeout_seconds"]
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
        deadline = time.monotonic() + cfg["head_timeout_seconds"]
        start = 0
        while True:
            end = self.buf.find(b"\r\n\r\n", start)
            if end >= 0:
                if end > limit:
                    raise HttpError(431, f"request head larger than {limit} bytes")
                head = bytes(self.buf[:end])
                del self.buf[:end + 4]
                return parse_request_head(head)
            if len(self.buf) > limit:
                raise HttpError(431, f"request head larger than {limit} bytes")
            start = max(0, len(self.buf) - 3)
            if not await self._fill(deadline):
                if self.buf:
                    raise HttpError(400, "connection closed in the middle of a request head")
                return None

    async def read_body(self, req: HttpRequest, cfg: dict) -> bytes:
        limit = int(cfg["max_body_bytes"])
        if req.content_length is not None and req.content_length > limit:
            raise ApiError(413, f"Request body of {req.content_length} bytes is larger than max_body_bytes "
                           f"({limit}).", "request_too_large", close=True)
        if not req.chunked and not req.content_length:
            return b""
        if req.expect_continue and not self.buf:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        deadline = time.monotonic() + cfg["body_timeout_seconds"]
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
        if self.transport.is_closing():
            raise ConnectionResetError("client went away")
        self.transport.write(data)
        if self.write_paused:
            # Only a client that is slow to read makes us wait, and only for so long.
            self.drain_waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self.bridge.files.config["body_timeout_seconds"]):
                    await self.drain_waiter
            finally:
                self.drain_waiter = None

    def base_headers(self, req: HttpRequest | None) -> list:
        headers = [("Server", f"lmarena-bridge/{VERSION}")]
        origin = req.header("origin") if req else None
        if origin and self.bridge.cors_allowed(origin):
            headers += [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
                        ("Access-Control-Expose-Headers", "Retry-After, X-Request-Id")]
        return headers

    async def send(self, status: int, body: bytes, content_type: str = "application/json",
                   req: HttpRequest | None = None, extra: list | None = None, close: bool = False,
                   head_only: bool = False) -> bool:
        """A complete response; returns whether the connection stays open."""
        keep = not close and req is not None and req.keep_alive and not self.eof
        headers = self.base_headers(req) + (extra or [])
        headers += [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        if not keep:
            headers.append(("Connection", "close"))
            self.linger = status >= 400
        elif req.version == "HTTP/1.0":
            headers.append(("Connection", "keep-alive"))
        self.responded = True
        await self.write(response_head(status, headers) + (b"" if head_only else body))
        return keep

    async def send_json(self, status: int, obj, req: HttpRequest | None = None, **kw) -> bool:
        return await self.send(status, json.dumps(obj, ensure_ascii=False).encode(), req=req, **kw)

    async def send_error(self, err: ApiError, req: HttpRequest | None = None, close: bool = False,
                         head_only: bool = False) -> bool:
        extra = [("Retry-After", str(err.retry_after))] if err.retry_after else []
        if err.status == 405 and getattr(err, "allow", None):
            extra.append(("Allow", err.allow))
        return await self.send_json(err.status, err.body(), req=req, extra=extra,
                                    close=close or err.close, head_only=head_only)

    def watch(self, on_gone) -> None:
        """Call `on_gone()` at once if the client leaves while a job runs (None: stop watching)."""
        self.on_gone = on_gone
        if on_gone is not None and self.eof:
            on_gone()


# 11. Routes =========================================================================================

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
    err = ApiError(405, f"Method not allowed here; use {allow}.", "method_not_allowed")
    err.allow = allow
    return err


class Routes:
    """HTTP routes of the Bridge (kept apart from its tab and job machinery)."""

    async def handle(self, conn: Connection, req: HttpRequest) -> bool:
        """Answer one request; returns whether the connection stays open for the next one."""
        cfg = self.files.config
        started = time.monotonic()
        has_body = req.chunked or bool(req.content_length)
        try:
            host = req.header("host")
            if host is not None and not self.host_allowed(host):
                raise ApiError(403, f"Host {host!r} is not this bridge (DNS rebinding protection; add it to "
                               "allowed_hosts to expose the bridge under that name).", "invalid_host")
            origin = req.header("origin")
            if req.path == "/ws" and req.method == "GET":
                await self.serve_tab(conn, req)
                return False
            if origin is not None and not self.cors_allowed(origin):
                # Refused before anything reaches a tab, including "simple" text/plain cross-site POSTs.
                raise ApiError(403, f"Origin {origin!r} is not allowed to call this bridge "
                               "(cors_allowed_origins).", "origin_not_allowed")
            route = self.routes.get(req.path)
            if route is None and req.path.startswith("/v1/models/"):
                route = {"GET": self.route_model}
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
                keep = req.keep_alive and not has_body
                conn.responded = True
                await conn.write(response_head(204, headers + ([] if keep else [("Connection", "close")])))
                return keep
            if route is None:
                raise ApiError(404, f"No such endpoint: {req.method} {req.path}. The API is at /v1 "
                               "(chat/completions, models, images/generations).", "not_found")
            method = "GET" if req.method == "HEAD" else req.method
            handler = route.get(method, False)
            if handler is False or handler is None:
                raise _method_error(route)
            if req.path.startswith(("/v1/", "/internal/", "/chat/", "/models")):
                self.files.refresh()
                cfg = self.files.config
                self.check_key(req, cfg)
            if req.path.startswith("/internal/") and not is_loopback(conn.peer):
                raise ApiError(403, "Internal endpoints answer loopback clients only.", "forbidden")
            body = await conn.read_body(req, cfg) if has_body else b""
            has_body = False
            return await handler(conn, req, body, started)
        except ApiError as err:
            if conn.responded:
                return False
            self.log_request(req, err.status, started)
            return await conn.send_error(err, req, close=has_body or err.close,
                                         head_only=req.method == "HEAD")

    def host_allowed(self, host_header: str) -> bool:
        name = _host_name(host_header)
        cfg = self.files.config
        if name in _LOCAL_HOSTS or name == str(cfg["host"]).lower() or name == self.host.lower():
            return True
        if name in (h.lower() for h in cfg["allowed_hosts"]):
            return True
        if self.host in ("0.0.0.0", "::", ""):
            # Exposed on purpose: an IP literal cannot be a DNS-rebinding name, so LAN clients using the
            # machine's address work; names still need allowed_hosts.
            with contextlib.suppress(ValueError):
                ipaddress.ip_address(name.strip("[]"))
                return True
        return False

    def cors_allowed(self, origin: str) -> bool:
        return origin_matches(origin, self.files.config["cors_allowed_origins"])

    def check_key(self, req: HttpRequest, cfg: dict) -> None:
        key = cfg["api_key"]
        if not key:
            return
        auth = req.header("authorization") or ""
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer":
            given = req.header("x-api-key") or ""
        if not hmac.compare_digest(given.strip().encode("utf-8", "replace"), str(key).encode("utf-8")):
            raise ApiError(401, "Incorrect or missing API key: send Authorization: Bearer <api_key from "
                           "config.jsonc>.", "invalid_api_key")

    def log_request(self, req: HttpRequest, status: int, started: float, job: Job | None = None,
                     model: str | None = None) -> None:
        ms = (time.monotonic() - started) * 1000
        if job is not None:
            log.info("%s %s %s model=%s tab=%s status=%d %.0fms", job.id[:8], req.method, req.path,
                     model or job.model, job.tab_name, status, ms)
        elif req.path.startswith(("/v1/", "/internal/")) or status >= 400:
            log.info("-------- %s %s status=%d %.0fms", req.method, req.path, status, ms)

    # -- /v1/chat/completions --
    def parse_json_body(self, body: bytes) -> dict:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"The request body is not valid JSON: {exc}", "invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "The request body must be a JSON object.", "invalid_json")
        return data

    def build_chat_job(self, data: dict, stream: bool) -> tuple[Job, int]:
        """Validate an OpenAI chat request and turn it into a Job (not dispatched yet)."""
        cfg, models = self.files.config, self.files.models
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required (a name from GET /v1/models).", "invalid_model")
        if data.get("tools") or data.get("functions"):
            raise ApiError(400, "Tool / function calling is not supported through LMArena; remove "
                           "'tools' from the request.", "tools_not_supported")
        n = data.get("n", 1)
        if n not in (1, None):
            raise ApiError(400, "Only n=1 is supported for chat completions.", "invalid_n")
        model_id, is_image = resolve_model(model, models, bool(cfg["strict_models"]))
        pool = session_candidates(model, cfg, self.files.endpoint_map)
        choice = pool[next(self.pool_counter) % len(pool)]
        check_session(choice)
        templates = openai_to_templates(
            data.get("messages"), tavern=bool(cfg["tavern_mode_enabled"]), bypass=bool(cfg["bypass_enabled"]),
            is_image=is_image, mode=choice.mode, target=choice.target,
            attachment_limit=int(cfg["max_attachment_bytes"]))
        request = build_retry_request(templates, choice.session_id, choice.message_id, model_id, is_image)
        payload = {"message_templates": templates, "target_model_id": model_id,
                   "session_id": choice.session_id, "message_id": choice.message_id,
                   "is_image_request": is_image, "request": request}
        side = ("b" if choice.target == "B" else "a") if choice.mode == "battle" else "a"
        created = int(time.time())
        fmt = ChunkFormatter(f"chatcmpl-{uuid.uuid4().hex}", model, created) if stream else None
        job = Job(self, payload, side, model, stream, fmt)
        prompt_chars = sum(len(t["content"]) for t in templates)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task %s prompt: %s", job.id[:8], json.dumps(templates, ensure_ascii=False)[:4000])
        return job, prompt_chars

    def start_job(self, job: Job) -> None:
        self.jobs[job.id] = job
        tab = self.pick_tab()
        if tab is not None:
            self.assign(job, tab)
        else:                     # no tab right now: fail at once, or wait after a Cloudflare check
            job.dispatcher = self.spawn(self.dispatch(job))

    async def route_chat(self, conn: Connection, req: HttpRequest, body: bytes, started: float) -> bool:
        self.last_api_request = time.monotonic()
        data = self.parse_json_body(body)
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false.", "invalid_stream")
        job, prompt_chars = self.build_chat_job(data, stream)
        include_usage = bool(isinstance(data.get("stream_options"), dict)
                             and data["stream_options"].get("include_usage"))
        self.start_job(job)
        conn.watch(job.on_client_gone)
        try:
            if stream:
                return await self.run_stream(conn, req, job, prompt_chars, include_usage, started)
            await self.wait_job(job)
            if job.client_gone:
                self.log_request(req, 499, started, job)
                return False
            if job.error:
                raise job.error
            cid = f"chatcmpl-{uuid.uuid4().hex}"
            usage = usage_object(prompt_chars, job.completion_chars, job.usage)
            out = completion_body(cid, job.model, int(time.time()), "".join(job.content),
                                  "".join(job.reasoning), job.finish_reason, usage)
            self.log_request(req, 200, started, job)
            return await conn.send_json(200, out, req=req, head_only=req.method == "HEAD")
        except ApiError as err:
            self.log_request(req, err.status, started, job)
            return await conn.send_error(err, req)
        finally:
            conn.watch(None)
            if not job.done:
                job.on_client_gone()

    async def wait_job(self, job: Job, until_first: float | None = None) -> None:
        """Wait until the job ends (or, with `until_first`, until the tab's first message or that
        deadline), enforcing stream_response_timeout_seconds."""
        while not job.done and not (until_first is not None and job.received):
            now = time.monotonic()
            left = job.idle_left(self.files.config["stream_response_timeout_seconds"], now)
            if left <= 0 or (until_first is not None and now >= until_first):
                return
            if until_first is not None:
                left = min(left, until_first - now)
            job.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await job.wake.wait()

    async def run_stream(self, conn: Connection, req: HttpRequest, job: Job, prompt_chars: int,
                         include_usage: bool, started: float) -> bool:
        cfg = self.files.config
        # Hold the head until the tab's first message, so quick failures keep their real status.
        await self.wait_job(job, until_first=started + cfg["first_byte_hold_seconds"])
        if job.client_gone:
            self.log_request(req, 499, started, job)
            return False
        if job.error and not job.out:
            raise job.error
        http10 = req.version == "HTTP/1.0"
        headers = conn.base_headers(req) + [
            ("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-store"),
            ("X-Accel-Buffering", "no"), ("X-Request-Id", job.id)]
        headers.append(("Connection", "close") if http10 else ("Transfer-Encoding", "chunked"))
        conn.responded = True
        first = job.fmt.role() + "".join(job.out) + ("" if job.received or job.done else ": keep-alive\n\n")
        job.out.clear()
        data = first.encode()
        opening = response_head(200, headers) + (data if http10 else chunk_frame(data))
        if not job.done:     # a quick answer goes out in one write with its end, below
            conn.transport.write(opening)
            opening = b""
        job.http10 = http10
        job.live = conn.transport
        interval = cfg["keepalive_interval_seconds"]
        while not job.done:
            now = time.monotonic()
            left = job.idle_left(self.files.config["stream_response_timeout_seconds"], now)
            if left <= 0:
                break
            if now - job.last_output >= interval:
                job.out.append(": keep-alive\n\n")
                job.flush()
                job.last_output = max(job.last_output, now)   # never spin, even if the write waits
                continue
            job.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(job.last_output + interval - now, left)):
                    await job.wake.wait()
        if job.client_gone or conn.transport.is_closing():
            self.log_request(req, 499, started, job)
            return False
        tail = job.out
        if job.error:
            tail.append(sse_event(job.error.body()).decode())
            status = job.error.status
        else:
            tail.append(job.fmt.finish(job.finish_reason))
            if include_usage:
                tail.append(job.fmt.usage(usage_object(prompt_chars, job.completion_chars, job.usage)))
            status = 200
        tail.append("data: [DONE]\n\n")
        data = "".join(tail).encode()
        job.out = []
        job.live = None
        self.log_request(req, status, started, job)
        if http10:
            await conn.write(opening + data)
            return False
        await conn.write(opening + chunk_frame(data) + b"0\r\n\r\n")
        return req.keep_alive and not conn.eof

    # -- /v1/images/generations --
    async def route_images(self, conn: Connection, req: HttpRequest, body: bytes, started: float) -> bool:
        self.last_api_request = time.monotonic()
        data = self.parse_json_body(body)
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
        if not (isinstance(model, str) and models.get(model, "").endswith(":image")):
            default = self.files.config["default_image_model"]
            if default:
                model = default
            elif not isinstance(model, str) or not model:
                image_models = [k for k, v in models.items() if v.endswith(":image")]
                if not image_models:
                    raise ApiError(400, "No image model is known: set 'model' to an image model of "
                                   "models.json or set default_image_model.", "invalid_model")
                model = image_models[0]
        jobs = []
        for _ in range(n):
            job, _ = self.build_chat_job({"model": model, "messages": [{"role": "user", "content": prompt}]},
                                         False)
            jobs.append(job)
        for job in jobs:
            self.start_job(job)
        conn.watch(lambda: [j.on_client_gone() for j in jobs])
        try:
            await asyncio.gather(*(self.wait_job(j) for j in jobs))
        finally:
            conn.watch(None)
            for j in jobs:
                if not j.done:
                    j.on_client_gone()
        if any(j.client_gone for j in jobs):
            return False
        urls = [u for j in jobs if not j.error for u in j.images]
        errors = [j.error for j in jobs if j.error]
        if not urls:
            err = errors[0] if errors else ApiError(502, "LMArena answered without an image.", "no_image")
            self.log_request(req, err.status, started, jobs[0], model)
            raise err
        items = []
        for url in urls:
            if fmt == "url":
                items.append({"url": url, "revised_prompt": prompt})
            else:
                try:
                    b64 = await asyncio.to_thread(fetch_image_b64, url)
                except Exception as exc:
                    log.warning("could not fetch image %s: %s", url[:80], exc)
                    continue
                items.append({"b64_json": b64, "revised_prompt": prompt})
        if not items:
            raise ApiError(502, "The images were generated but could not be downloaded for b64_json.",
                           "upstream_error")
        if errors:
            log.info("images: %d of %d tasks failed (%s)", len(errors), n, errors[0].message[:100])
        self.log_request(req, 200, started, jobs[0], model)
        return await conn.send_json(200, {"created": int(time.time()), "data": items}, req=req)

    # -- models, health, index --
    async def route_models(self, conn, req, body, started) -> bool:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "lmarena",
                 "type": "image" if str(v).endswith(":image") else "chat"}
                for name, v in self.files.models.items()]
        self.log_request(req, 200, started)
        return await conn.send_json(200, {"object": "list", "data": data}, req=req,
                                    head_only=req.method == "HEAD")

    async def route_model(self, conn, req, body, started) -> bool:
        name = urllib.parse.unquote(req.path[len("/v1/models/"):])
        if name not in self.files.models:
            raise ApiError(404, f"The model {name!r} is not in models.json.", "model_not_found")
        v = self.files.models[name]
        return await conn.send_json(200, {"id": name, "object": "model", "created": 0, "owned_by": "lmarena",
                                          "type": "image" if v.endswith(":image") else "chat"},
                                    req=req, head_only=req.method == "HEAD")

    async def route_health(self, conn, req, body, started) -> bool:
        now = time.monotonic()
        tabs = [{"name": t.name, "userscript": t.version, "url": t.url, "tasks": len(t.jobs),
                 "cloudflare_check": not t.available(now)} for t in self.tabs]
        status = {"status": "ok", "version": VERSION, "tabs": len(self.tabs),
                  "tasks_in_flight": len(self.jobs), "tab_details": tabs,
                  "capture_armed": self.capture_settings is not None,
                  "models": len(self.files.models),
                  "hint": None if self.tabs else "No tab connected: open lmarena.ai with the userscript "
                                                  "installed; its title starts with ✅ when connected."}
        if self.update_notice:
            status["update_available"] = self.update_notice
        return await conn.send_json(200, status, req=req, head_only=req.method == "HEAD")

    async def route_index(self, conn, req, body, started) -> bool:
        return await conn.send_json(200, {"name": "LMArena Bridge", "version": VERSION,
                                          "api_base": f"{self.url}/v1", "health": "/health"},
                                    req=req, head_only=req.method == "HEAD")

    # -- /internal/id_capture --
    async def route_capture(self, conn, req, body, started) -> bool:
        data = self.parse_json_body(body) if body.strip() else {}
        cfg = self.files.config
        mode = data.get("mode") or cfg["id_updater_last_mode"]
        target = str(data.get("target") or data.get("battle_target") or cfg["id_updater_battle_target"]).upper()
        if mode not in ("direct_chat", "battle") or target not in ("A", "B"):
            raise ApiError(400, "mode must be direct_chat or battle, target A or B.", "invalid_request")
        model = data.get("model") or None
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "model must be a string.", "invalid_request")
        if not self.tabs:
            raise no_tab_error()
        self.capture_settings = {"mode": mode, "target": target, "model": model}
        for tab in self.tabs:
            tab.send(self.capture_command())
        log.info("id capture armed on %d tab(s): %s%s%s", len(self.tabs), mode,
                 f" {target}" if mode == "battle" else "", f" for {model}" if model else "")
        if req.path == "/internal/start_id_capture":
            return await conn.send_json(200, {"status": "armed"}, req=req)
        timeout = data.get("timeout") or cfg["capture_timeout_seconds"]
        fut = asyncio.get_running_loop().create_future()
        self.capture_waiters.append(fut)
        try:
            async with asyncio.timeout(float(timeout)):
                result = await fut
        except TimeoutError:
            if fut in self.capture_waiters:
                self.capture_waiters.remove(fut)
            if not self.capture_waiters:
                self.capture_settings = None
                for tab in self.tabs:
                    tab.send({"command": "deactivate_id_capture"})
            raise ApiError(408, f"No Retry click was seen within {float(timeout):g} s.",
                           "capture_timeout") from None
        if "error" in result:
            raise ApiError(500, result["error"], "capture_write_failed")
        return await conn.send_json(200, result, req=req)


# 12. The Bridge: tabs, jobs, routes =================================================================

class Bridge(Routes):
    """Owns the config, the tabs, the jobs and the server. Tests build several on port 0."""

    def __init__(self, files: UserFiles, host: str | None = None, port: int | None = None):
        self.files = files
        self.host = host if host is not None else files.config["host"]
        self.port = port if port is not None else int(files.config["port"])
        self.tabs: list[Tab] = []
        self.jobs: dict[str, Job] = {}
        self.dirty: set[Job] = set()
        self.tab_counter = itertools.count(1)
        self.pool_counter = itertools.count()
        self.tab_event = asyncio.Event()       # set (and replaced) whenever tabs come or go
        self.cloudflare_since = 0.0
        self.capture_waiters: list[asyncio.Future] = []
        self.capture_settings: dict | None = None
        self.connections: set[Connection] = set()
        self.server: asyncio.base_events.Server | None = None
        self.last_api_request = time.monotonic()
        self.stopping = False
        self.background: set[asyncio.Task] = set()
        self.restart_requested = False
        self.exit_event = asyncio.Event()     # set by SIGINT/SIGTERM or the idle restart
        self.update_notice: str | None = None
        self.routes = {
            "/v1/chat/completions": {"POST": self.route_chat},
            "/chat/completions": {"POST": self.route_chat},
            "/v1/images/generations": {"POST": self.route_images},
            "/v1/models": {"GET": self.route_models},
            "/models": {"GET": self.route_models},
            "/health": {"GET": self.route_health},
            "/": {"GET": self.route_index},
            "/internal/id_capture": {"POST": self.route_capture},
            "/internal/start_id_capture": {"POST": self.route_capture},
            "/ws": {"GET": None},
        }

    # -- lifecycle --
    async def start(self) -> None:
        cfg = self.files.config
        self.server = await asyncio.get_running_loop().create_server(
            lambda: Connection(self), self.host, self.port, backlog=1024)
        sock = self.server.sockets[0].getsockname()
        self.port = sock[1]
        self.spawn(self.ping_loop())
        self.spawn(self.idle_restart_loop())
        if cfg["enable_auto_update"] and cfg["update_url"]:
            self.spawn(self.update_check())
        if self.host not in ("127.0.0.1", "localhost", "::1") and not cfg["api_key"]:
            log.warning("listening on %s without an api_key: anyone who can reach this port can use "
                        "your LMArena account. Set api_key in %s.", self.host, CONFIG_NAME)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    async def stop(self, grace: float = 3.0) -> None:
        """Stop accepting, end open answers with an error event, tell tabs, close everything."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        for job in list(self.jobs.values()):
            job.fail(ApiError(503, "The bridge is shutting down.", "bridge_shutdown"))
        for tab in list(self.tabs):
            tab.close(1001, "bridge shutting down")
        for task in list(self.background):
            task.cancel()
        for conn in list(self.connections):
            if not conn.busy:
                conn.transport.abort()
        end = time.monotonic() + grace
        while self.connections and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.transport.abort()

    # -- tabs --
    def pick_tab(self, exclude: Tab | None = None) -> Tab | None:
        now = time.monotonic()
        best = None
        for tab in self.tabs:
            if tab is exclude or not tab.available(now):
                continue
            if best is None or (len(tab.jobs), tab.assigned) < (len(best.jobs), best.assigned):
                best = tab
        return best

    def tab_changed(self) -> None:
        self.tab_event.set()
        self.tab_event = asyncio.Event()

    def assign(self, job: Job, tab: Tab) -> None:
        job.tab, job.tab_name = tab, tab.name
        job.last_activity = time.monotonic()
        tab.jobs[job.id] = job
        tab.assigned += 1
        tab.send_text(job.message)

    async def dispatch(self, job: Job) -> None:
        """Give the job to the least busy tab; after a Cloudflare challenge wait for a tab to return."""
        tab = self.pick_tab()
        if tab is None:
            wait = self.files.config["cloudflare_wait_seconds"]
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
                tab = self.pick_tab()
            if tab is None:
                job.fail(ApiError(503, "LMArena is showing a Cloudflare check and no tab came back in "
                                  f"{wait:g} s. Open the LMArena tab and complete the check.",
                                  "cloudflare_challenge", retry_after=30))
                return
        if not job.done:
            self.assign(job, tab)

    def note_upstream_error(self, tab: Tab | None, err: ApiError) -> None:
        if err.code != "cloudflare_challenge" or tab is None:
            return
        self.cloudflare_since = time.monotonic()
        tab.challenged_until = time.monotonic() + self.files.config["cloudflare_wait_seconds"]
        if not tab.refresh_sent:
            tab.refresh_sent = True
            log.warning("%s hit a Cloudflare check; asking it to reload", tab.name)
            tab.send({"command": "refresh"})

    def add_tab(self, tab: Tab) -> None:
        self.tabs.append(tab)
        self.cloudflare_since = 0.0 if tab.available(time.monotonic()) else self.cloudflare_since
        log.info("%s connected from %s (%d tab%s)", tab.name, tab.origin, len(self.tabs),
                 "" if len(self.tabs) == 1 else "s")
        if self.capture_settings is not None:
            tab.send(self.capture_command())
        self.tab_changed()

    def remove_tab(self, tab: Tab) -> None:
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
            other = None if (job.received or job.retried) else self.pick_tab(exclude=tab)
            if other is not None:
                job.retried = True
                log.info("task %s: %s vanished before answering; retrying on %s", job.id[:8], tab.name,
                         other.name)
                self.assign(job, other)
            else:
                job.fail(ApiError(502, "The LMArena tab closed or reloaded while answering. Try again.",
                                  "tab_disconnected"), tell_tab=False)
        self.flush_dirty()
        self.tab_changed()

    def flush_dirty(self) -> None:
        if self.dirty:
            jobs, self.dirty = self.dirty, set()
            for job in jobs:
                job.flush()

    async def ping_loop(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(WS_PING_INTERVAL)
            now = time.monotonic()
            for tab in list(self.tabs):
                if now - tab.last_seen > WS_PING_INTERVAL + WS_PING_TIMEOUT:
                    log.warning("%s stopped answering pings; dropping it", tab.name)
                    tab.transport.abort()
                elif tab.proto.state is WsState.OPEN:
                    n += 1
                    tab.proto.send_ping(str(n).encode())
                    tab._write_out()

    async def serve_tab(self, conn: Connection, req: HttpRequest) -> None:
        origin = req.header("origin") or ""
        cfg = self.files.config
        # The head was already parsed by our HTTP layer: one ServerProtocol validates the handshake
        # and renders the 101 (or the refusal), a second one in state OPEN handles the frames.
        handshake = ServerProtocol(max_size=WS_MAX_MESSAGE)
        ws_req = WsRequest(req.target, WsHeaders([(k, v) for k, v in req.headers]))
        if not (origin_is_lmarena(origin) or origin in cfg["allowed_tab_origins"]):
            response = handshake.reject(403, f"Origin {origin or '(none)'} may not connect as a tab: only "
                                        "LMArena pages (and allowed_tab_origins) may.\n")
            log.warning("refused a tab socket from origin %r", origin)
        elif not cfg["allow_remote_tabs"] and not is_loopback(conn.peer):
            # A tab sees every prompt; Origin is only a header, so a remote process could forge it.
            response = handshake.reject(403, "Tabs must run on this machine (allow_remote_tabs).\n")
            log.warning("refused a tab socket from %s (not this machine)", conn.peer)
        else:
            response = handshake.accept(ws_req)
        conn.responded = True
        if response.status_code != 101:
            await conn.write(response.serialize())
            return
        conn.transport.write(response.serialize())
        proto = ServerProtocol(max_size=WS_MAX_MESSAGE, state=WsState.OPEN)
        tab = Tab(self, proto, conn.transport, origin, conn.peer)
        # No await since the head was read, so nothing sits in the stream reader: hand the socket
        # to the tab (a client must wait for the 101 before sending frames anyway).
        leftover, conn.buf = bytes(conn.buf), bytearray()
        conn.transport.set_protocol(tab)
        self.add_tab(tab)
        try:
            if leftover:
                tab.data_received(leftover)
            await tab.closed
        finally:
            self.connections.discard(conn)      # the socket was the tab's since the handshake
            self.remove_tab(tab)

    # -- capture and models --
    def capture_command(self) -> dict:
        s = self.capture_settings or {}
        return {"command": "activate_id_capture", "mode": s.get("mode"), "battle_target": s.get("target")}

    def on_ids_captured(self, tab: Tab, session_id, message_id) -> None:
        if is_placeholder_id(session_id) or is_placeholder_id(message_id):
            log.warning("%s reported ids that are not UUIDs; ignored", tab.name)
            return
        settings = self.capture_settings or {"mode": self.files.config["id_updater_last_mode"],
                                             "target": self.files.config["id_updater_battle_target"],
                                             "model": None}
        self.capture_settings = None
        for other in self.tabs:
            if other is not tab:
                other.send({"command": "deactivate_id_capture"})
        try:
            written = self.store_session(session_id, message_id, settings)
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
        for fut in self.capture_waiters:
            if not fut.done():
                fut.set_result(result)
        self.capture_waiters.clear()

    def store_session(self, session_id: str, message_id: str, settings: dict) -> str:
        """Write captured ids: into config.jsonc, or into a model's pool in model_endpoint_map.json."""
        model = settings.get("model")
        if not model:
            path = self.files.config_path
            text = _read_text(path)
            new = jsonc_update(text, {"session_id": session_id, "message_id": message_id,
                                      "id_updater_last_mode": settings["mode"],
                                      "id_updater_battle_target": settings["target"]})
            validate_config(path, parse_json_file(path, new))
            atomic_write(path, new)
            self.files.note_written(path)
            self.files.config.update(session_id=session_id, message_id=message_id,
                                     id_updater_last_mode=settings["mode"],
                                     id_updater_battle_target=settings["target"])
            return path
        path = self.files.map_path
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
        self.files.note_written(path)
        self.files.endpoint_map = mapping
        return path

    def on_models(self, tab: Tab, models) -> None:
        if not isinstance(models, list):
            log.debug("%s sent a models report without a list", tab.name)
            return
        try:
            self.merge_models(models)
        except (OSError, ValueError, ConfigError) as exc:
            log.error("could not update %s: %s", MODELS_NAME, exc)

    def merge_models(self, page_models: list) -> dict:
        """Merge the page's model list into models.json: add new, update changed ids, keep the rest."""
        path = self.files.models_path
        text = _read_text(path)
        current = parse_json_file(path, text) if text and text.strip() else {}
        updates, added, changed = {}, [], []
        for m in page_models:
            if not isinstance(m, dict):
                continue
            name, mid = m.get("publicName"), m.get("id")
            if not isinstance(name, str) or not isinstance(mid, str) or not name or not mid:
                continue
            caps = m.get("capabilities")
            out_caps = caps.get("outputCapabilities") if isinstance(caps, dict) else None
            makes_images = isinstance(out_caps, dict) and out_caps.get("image") not in (None, False)
            value = f"{mid}:image" if makes_images else mid
            if name not in current:
                added.append(name)
            elif current[name] != value:
                changed.append(name)
            else:
                continue
            updates[name] = value
        if not updates:
            log.info("model list from the page: %d models, models.json already up to date", len(page_models))
            return {}
        new = jsonc_update(text, updates)
        models = validate_models(path, parse_json_file(path, new))
        atomic_write(path, new)
        self.files.note_written(path)
        self.files.models = models
        log.info("models.json updated: %d added%s, %d changed%s", len(added),
                 f" ({', '.join(added[:5])}{'...' if len(added) > 5 else ''})" if added else "",
                 len(changed), f" ({', '.join(changed[:5])})" if changed else "")
        return updates

    # -- background --
    async def idle_restart_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            cfg = self.files.config
            timeout = cfg["idle_restart_timeout_seconds"]
            if not cfg["enable_idle_restart"] or timeout is None or timeout < 0:
                continue
            if self.jobs or time.monotonic() - self.last_api_request < timeout:
                continue
            log.info("no API requests for %g s: asking tabs to reconnect and restarting", timeout)
            for tab in list(self.tabs):
                tab.send({"command": "reconnect"})
            self.restart_requested = True
            await asyncio.sleep(0.2)
            self.exit_event.set()
            return

    async def update_check(self) -> None:
        try:
            manifest, _ = await asyncio.to_thread(fetch_manifest, self.files.config["update_url"])
        except Exception as exc:     # offline or broken manifest: never a problem for serving
            log.info("update check skipped: %s", exc)
            return
        if version_tuple(manifest["version"]) > version_tuple(VERSION):
            self.update_notice = manifest["version"]
            log.info("a newer version %s is available (you have %s): run `python bridge.py update`",
                     manifest["version"], VERSION)


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except FileNotFoundError:
        return None


# 13. Updates and image downloads (blocking; run in threads or from the CLI) ========================

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
    url = files.config["update_url"]
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


# 14. Command line ===================================================================================

SUBCOMMANDS = ("serve", "capture", "models", "update")


def build_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"bridge.py{'' if command == 'serve' else ' ' + command}",
                                description="LMArena Bridge: an OpenAI-compatible API for your LMArena tab.")
    p.add_argument("--config", default=os.path.join(HERE, CONFIG_NAME),
                   help="config.jsonc to use (models.json and model_endpoint_map.json sit beside it)")
    if command == "serve":
        p.add_argument("--host", help="address to listen on (default: config host, 127.0.0.1)")
        p.add_argument("--port", type=int, help="port (default: config port, 5102; 0 takes a free one)")
    elif command == "capture":
        p.add_argument("--bridge", help="URL of the running bridge (default http://{host}:{port} of the config)")
        p.add_argument("--mode", choices=("direct_chat", "battle"))
        p.add_argument("--target", type=str.upper, choices=("A", "B"))
        p.add_argument("--model", help="add the session to this model's pool in model_endpoint_map.json")
        p.add_argument("--timeout", type=float, help="seconds to wait for the Retry click")
    return p


def load_files(config_path: str, quiet: bool = False) -> UserFiles:
    files = UserFiles(config_path)
    try:
        files.load_all(report=(lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr)))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    return files


def cmd_models(args) -> int:
    files = load_files(args.config, quiet=True)
    if not files.models:
        print(f"no models in {files.models_path} (open LMArena with the userscript to fill it)")
        return 0
    width = max(len(n) for n in files.models)
    print(f"{'name'.ljust(width)}  {'id'.ljust(36)}  type")
    for name, value in sorted(files.models.items(), key=lambda kv: kv[0].lower()):
        mid, _, kind = value.partition(":")
        print(f"{name.ljust(width)}  {(mid or 'null').ljust(36)}  {'image' if kind == 'image' else 'text'}")
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
    import urllib.error
    import urllib.request
    files = load_files(args.config, quiet=True)
    cfg = files.config
    mode, target = args.mode, args.target
    if mode is None and sys.stdin.isatty():
        mode = _ask("Capture mode", ("direct_chat", "battle"), cfg["id_updater_last_mode"])
    mode = mode or cfg["id_updater_last_mode"]
    if mode == "battle" and target is None and sys.stdin.isatty():
        target = _ask("Battle target", ("A", "B"), str(cfg["id_updater_battle_target"]).upper())
    target = (target or cfg["id_updater_battle_target"]).upper()
    timeout = args.timeout if args.timeout is not None else cfg["capture_timeout_seconds"]
    host = cfg["host"] if cfg["host"] not in ("0.0.0.0", "::", "") else "127.0.0.1"
    base = (args.bridge or f"http://{'[' + host + ']' if ':' in host else host}:{cfg['port']}").rstrip("/")
    body = json.dumps({"mode": mode, "target": target, "model": args.model, "timeout": timeout}).encode()
    headers = {"Content-Type": "application/json"}
    if cfg["api_key"]:
        headers["Authorization"] = f"Bearer {cfg['api_key']}"
    print(f"Capture armed ({mode}{' ' + target if mode == 'battle' else ''}"
          f"{', for model ' + args.model if args.model else ''}). In your LMArena tab (its title shows 🎯), "
          f"click Retry on the target answer. Waiting up to {timeout:g} s...", flush=True)
    request = urllib.request.Request(base + "/internal/id_capture", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout + 15) as resp:
            result = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except Exception:
            message = f"HTTP {exc.code}"
        print(f"capture failed: {message}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"capture failed: the bridge is not reachable at {base} ({reason}); start it with "
              "`python bridge.py` first", file=sys.stderr)
        return 1
    print(f"Captured session_id {result['session_id']} and message_id {result['message_id']}; "
          f"written to {result['written_to']}. The running bridge uses them now.")
    return 0


def cmd_update(args) -> int:
    files = load_files(args.config, quiet=True)
    return run_update(files)


async def serve(files: UserFiles, host: str | None, port: int | None) -> bool:
    """Run until SIGINT/SIGTERM (returns False) or an idle restart (returns True)."""
    bridge = Bridge(files, host, port)
    try:
        await bridge.start()
    except OSError as exc:
        print(f"error: cannot listen on {bridge.host}:{bridge.port}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(1)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, bridge.exit_event.set)
    print(f"LMArena Bridge {VERSION} listening on {bridge.url} (API: {bridge.url}/v1, "
          f"tabs: ws://{bridge.url[7:]}/ws)", flush=True)
    await bridge.exit_event.wait()
    log.info("shutting down" if not bridge.restart_requested else "restarting")
    await bridge.stop()
    return bridge.restart_requested


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "serve"
    for i, a in enumerate(argv):
        if a in SUBCOMMANDS:
            command = argv.pop(i)
            break
        if not a.startswith("-") and (i == 0 or argv[i - 1] not in ("--config", "--host", "--port")):
            print(f"error: unknown command {a!r}; use one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
            return 2
    args = build_parser(command).parse_args(argv)
    if command == "models":
        return cmd_models(args)
    if command == "capture":
        return cmd_capture(args)
    if command == "update":
        return cmd_update(args)
    files = load_files(args.config)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    set_log_level(files.config["log_level"])
    restart = asyncio.run(serve(files, args.host, args.port))
    if restart:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:])
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
