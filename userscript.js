// ==UserScript==
// @name         LMArena Bridge
// @namespace    https://github.com/lmarena-bridge/lmarena-bridge
// @version      3.2.0
// @description  Lets the local LMArena Bridge (an OpenAI-compatible API) use this logged-in LMArena tab.
// @author       LMArena Bridge developers
// @match        https://lmarena.ai/*
// @match        https://*.lmarena.ai/*
// @match        https://arena.ai/*
// @match        https://*.arena.ai/*
// @run-at       document-start
// @grant        none
// ==/UserScript==

/*
 * How it works: the bridge (python bridge.py) sends tasks over a WebSocket; each task carries the
 * complete LMArena request built by the bridge. This script sends it from inside the page (so the
 * tab's cookies and a fresh reCAPTCHA token go with it) and streams the raw response text back.
 * Protocol: PROTOCOL.md section 1. Nothing here talks to anything but the page's own site (and the
 * upload URLs the site hands out) and the local bridge.
 *
 * Tab -> bridge: hello, models, status, request_shape, ids_captured, log; per task the events
 * token_ready and upstream_headers, then data chunks and "[DONE]", or one error.
 * Bridge -> tab: tasks, abort, refresh, reconnect, activate_id_capture, deactivate_id_capture,
 * send_models, send_page_source, send_status, keep_token_ready, cleanup_conversation, site_rules.
 * The script never retries a failed request itself: the bridge retries with fresh ids.
 *
 * Added in 3.2 (older bridges ignore the new keys and commands; this script ignores unknown keys):
 * A. Model list. The report is {"type": "models", "models": [...], "source": "catalog" | "page" |
 *    "text/direct"}. First source: GET /nextjs-api/model-catalog (same-origin, the page's cookies,
 *    the original fetch), answering [{"arena": "<name>", "models": [<row>...]}]: flattened to one
 *    object per row and arena, the row unmodified plus "arena": <its group's arena> (a model in several
 *    arenas comes once per arena). A catalog that fails (not 200, not JSON, not a list of groups, no
 *    rows) costs one console line and the next source is asked: the current page's flight data
 *    ("initialModels"), then GET /text/direct with RSC: 1 (on the periodic refresh: /text/direct
 *    before the page). Rows from those two carry no "arena". The status report's models.source
 *    names the same source.
 * B. Budget. After each task's fetch: {"request_id", "event": "upstream_headers", "status": <n>,
 *    "ratelimit": "<raw ratelimit header>", "ratelimit_policy": "<raw ratelimit-policy header>"}, each
 *    of the two keys only when the answer carries that header, error answers (a 429) included. The
 *    bridge parses the values ("limit=1800, remaining=12, reset=240"; "1800;w=300").
 * C. Body knowledge comes from the bridge: a task's payload.request may carry
 *    "fields": {"token_v3": "<field>", "token_v2": "<field>", "attachments": [[key, ..., "*", ...,
 *    key], ...], "never_send": ["<key>", ...]}. The tab deep-copies the body, then (1) deletes every
 *    key named in never_send from every object in the body, at any depth; (2) uploads the data: URL
 *    attachments (PROTOCOL 2.7) of each list found at an attachments path ("*" = every element of an
 *    array; a path that is not there is skipped); (3) when recaptcha_action is set, puts the v3 token
 *    under token_v3, or with recaptcha "v2" the v2 token under token_v2 after deleting token_v3.
 *    A key missing from "fields", or "fields" missing (a bridge older than 3.2), falls back to
 *    LEGACY_FIELDS below.
 * D. Shape rules come from the bridge: {"command": "site_rules", "rules": {"never_copy": [<key>...],
 *    "never_copy_pattern": "<RegExp source>", "id_keys_pattern": "<RegExp source>", "blank":
 *    [<key>...], "empty": [<key>...], "blank_within"?: [<key>...]}}, sent after the tab's hello. A
 *    request_shape report (the page's own create-/post-to-evaluation body) then leaves out, at any
 *    depth: keys named in never_copy; keys matching never_copy_pattern (case-insensitive); keys
 *    matching id_keys_pattern (case-sensitive) whose value is a UUID or a list of UUIDs. It sets to ""
 *    the string values of keys in blank inside the objects named by blank_within (default
 *    ["userMessage", "messages"], array elements counting as inside their array's key), and to [] the
 *    array values of keys in empty. Everything else is kept as the page sent it (a new field too).
 *    A key missing from the rules, rules that are not an object, a pattern that does not compile, or
 *    no site_rules since this connection opened (an older bridge): LEGACY_FIELDS.site_rules, which
 *    drop forceLowRecaptchaScore, secrets, tokens, ids and credential-like keys too.
 */
(function () {
  'use strict';

  if (window.__lmarenaBridgeLoaded) return; // installed twice: run once
  window.__lmarenaBridgeLoaded = true;

  const VERSION = '3.2.0'; // keep equal to @version above

  // FALLBACK ONLY, for bridges older than 3.2: the names of LMArena's body fields that a 3.2 bridge
  // sends with each task ("fields", protocol C above) and once per connection ("site_rules", D). Do
  // not add body knowledge anywhere else in this script: it belongs in bridge.py.
  const LEGACY_FIELDS = Object.freeze({
    token_v3: 'recaptchaV3Token',
    token_v2: 'recaptchaV2Token',
    attachments: [['userMessage', 'experimental_attachments'], ['messages', '*', 'experimental_attachments']],
    never_send: ['forceLowRecaptchaScore', 'secrets'],
    site_rules: {
      never_copy: ['recaptchaV3Token', 'recaptchaV2Token', 'modelAId', 'modelBId', 'forceLowRecaptchaScore',
        'secrets'],
      never_copy_pattern: 'token|secret|password|credential|cookie|auth|signature|api_?key',
      id_keys_pattern: '^(id|.*Id|.*Ids)$',
      blank: ['content'],
      blank_within: ['userMessage', 'messages'],
      empty: ['experimental_attachments'],
    },
  });

  const CONFIG = {
    // Where the bridge listens. Override without editing: localStorage['lmarena-bridge-url'].
    bridgeUrl: 'ws://127.0.0.1:5102/ws',
    // Reconnect back-off: base * 2^attempt, capped, with +-jitter so many tabs do not stampede.
    reconnectBaseMs: 1000,
    reconnectMaxMs: 30000,
    reconnectJitter: 0.3,
    // A socket that closes this soon without ever opening is an "immediate failure"; after this
    // many in a row the console explains Chrome's local network access permission and the title
    // shows "⛔ " (a public page may not reach 127.0.0.1 until the user allows it).
    quickFailureMs: 3000,
    quickFailuresForHint: 3,
    // How long to wait for the page to finish loading before reading its scripts and model list.
    pageLoadWaitMs: 15000,
    // reCAPTCHA Enterprise: how long to wait for the page's grecaptcha, and for one token.
    recaptchaLoadWaitMs: 15000,
    recaptchaTokenWaitMs: 15000,
    // The invisible v2 check may show the user a challenge: allow time to solve it.
    recaptchaV2WaitMs: 90000,
    // v3 site keys seen on LMArena (newest first); the page's own key, found at run time, wins.
    recaptchaFallbackKeys: ['6LeTGMcsAAAAALuIlkVwIxaAuZA8VledA6d3Nnb0', '6Led_uYrAAAAAKjxDIF58fgFtX3t8loNAK85bW9I'],
    // v2 site keys seen on LMArena (newest first), for the invisible checkbox-less widget.
    recaptchaV2FallbackKeys: ['6Le3_cYsAAAAAGwWOK2RLDgNI15Bh8C0yLBOL1yL', '6Ld7ePYrAAAAAB34ovoFoDau1fqCJ6IyOjFEQaMn'],
    // Ready token (keep_token_ready): tokens live ~2 min and are single use. One is used only while
    // younger than tokenMaxAgeMs; a replacement is minted once it is tokenRefreshAgeMs old.
    tokenMaxAgeMs: 100000,
    tokenRefreshAgeMs: 85000,
    tokenRetryMs: 10000, // after a failed mint, try again this much later
    keepTokenMaxSeconds: 86400, // an absurd window from the bridge is cut to this
    // Scanning the page's scripts for site keys and server-action ids: at most this many files,
    // each within this time, each read up to this many characters.
    maxScriptFiles: 80,
    scriptFetchTimeoutMs: 5000,
    maxScriptChars: 8000000,
    // Server actions (PROTOCOL 2.7 and cleanup) looked up in the page's script chunks.
    actionNames: ['generateUploadUrl', 'getSignedUrl', 'archiveEvaluationSession', 'deleteEvaluationSession'],
    actionTimeoutMs: 30000,
    uploadTimeoutMs: 120000,
    // A signed attachment URL without a readable expiry is reused for this long.
    signedUrlDefaultTtlMs: 10 * 60 * 1000,
    signedUrlMarginMs: 60 * 1000,
    // Model list: the site's catalog, else the page's own, else fetched from this page as a raw RSC
    // payload; refreshed while connected.
    modelsCatalogPath: '/nextjs-api/model-catalog',
    modelsPagePath: '/text/direct',
    modelsRefreshMs: 30 * 60 * 1000,
    modelsFetchTimeoutMs: 15000,
    logPrefix: '[LMArena Bridge]',
  };

  const log = (...args) => console.log(CONFIG.logPrefix, ...args);
  const warn = (...args) => console.warn(CONFIG.logPrefix, ...args);

  const state = {
    // The link
    ws: null,
    connected: false,
    attempt: 0,
    reconnectTimer: null,
    quickFailures: 0, // sockets in a row that closed at once without opening
    blocked: false, // "⛔ ": failing like a local-network-access refusal
    unreachable: false, // failing at once although local network access is granted: a wrong port
    // Id capture
    captureArmed: false,
    capture: null, // {mode, battle_target} of the armed capture
    // Tasks
    tasks: new Map(), // request_id -> AbortController
    lastError: null,
    // reCAPTCHA
    keys: null, // Promise of {v3, v2}: the keys found in the page (null where none was found)
    keysFresh: false, // the next key scan reads the page's current HTML, bypassing the cache
    fallbackV3: 0, // index into the fallback lists, advanced when a fallback key was refused
    fallbackV2: 0,
    usedFallbackV3: false,
    usedFallbackV2: false,
    injectedKeys: new Set(), // keys we loaded enterprise.js for ourselves
    keeper: { action: null, until: 0, token: null, minting: null, timer: null, gen: 0 },
    // Server actions
    actions: null, // Promise of {name: id}
    signedUrls: new Map(), // sha256 hex -> {url, until}
    noUploadFlowLogged: false,
    // Models
    models: { count: 0, source: null }, // the last report sent: source "catalog", "page" or "text/direct"
    modelsReport: null, // Promise of the report under way
    modelsTimer: null,
    // The page
    loaded: null, // Promise: the page has loaded (or pageLoadWaitMs passed)
    // Shape rules from the bridge (site_rules), compiled; null: LEGACY_FIELDS.site_rules
    siteRules: null,
  };

  // Our own requests use the original fetch, so they never go through the capture wrapper.
  const originalFetch = window.fetch;

  function bridgeUrl() {
    try {
      return window.localStorage.getItem('lmarena-bridge-url') || CONFIG.bridgeUrl;
    } catch (e) {
      return CONFIG.bridgeUrl;
    }
  }

  // ---- Small helpers --------------------------------------------------------------------------
  const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  function withTimeout(promise, ms, what) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(what + ' timed out')), ms);
      Promise.resolve(promise).then(
        (v) => { clearTimeout(timer); resolve(v); },
        (e) => { clearTimeout(timer); reject(e); });
    });
  }

  function parseJson(text) {
    try {
      return JSON.parse(text);
    } catch (e) {
      return undefined;
    }
  }

  function errorText(e) {
    return (e && e.message) || String(e);
  }

  // An error that carries the HTTP status LMArena (or its storage) answered with.
  function httpError(message, status) {
    const e = new Error(message);
    e.status = status;
    return e;
  }

  function pageLoaded() {
    if (!state.loaded) {
      state.loaded = new Promise((resolve) => {
        if (document.readyState === 'complete') return resolve();
        window.addEventListener('load', () => resolve(), { once: true });
        setTimeout(resolve, CONFIG.pageLoadWaitMs); // a stuck image must not stall us
      });
    }
    return state.loaded;
  }

  function parseRetryAfter(value) {
    if (!value) return null;
    const seconds = Number(value);
    if (Number.isFinite(seconds)) return Math.max(0, Math.round(seconds));
    const date = Date.parse(value);
    return Number.isFinite(date) ? Math.max(0, Math.round((date - Date.now()) / 1000)) : null;
  }

  function deepCopy(value) {
    if (value === undefined) return undefined;
    return typeof structuredClone === 'function' ? structuredClone(value) : JSON.parse(JSON.stringify(value));
  }

  function logToBridge(message, level) {
    send({ type: 'log', level: level || 'warning', message: String(message).slice(0, 2000) });
  }

  // ---- Tab title: "✅ " connected, "🎯 " in front while capture is armed, "⛔ " blocked ---------
  const PREFIXES = ['🎯 ', '✅ ', '⛔ '];

  function bareTitle(title) {
    let t = title || '';
    for (let changed = true; changed;) {
      changed = false;
      for (const p of PREFIXES) {
        if (t.startsWith(p)) {
          t = t.slice(p.length);
          changed = true;
        }
      }
    }
    return t;
  }

  function renderTitle() {
    try {
      const link = state.connected ? '✅ ' : state.blocked ? '⛔ ' : '';
      const want = (state.captureArmed ? '🎯 ' : '') + link + bareTitle(document.title);
      if (document.title !== want) document.title = want;
    } catch (e) {
      warn('title update failed', e);
    }
  }

  function watchTitle() {
    // The page (Next.js) rewrites the title on navigation: put our prefix back, never twice.
    try {
      const observer = new MutationObserver(() => renderTitle());
      const attach = () => {
        const head = document.head || document.documentElement;
        if (head) observer.observe(head, { subtree: true, childList: true, characterData: true });
        renderTitle();
      };
      if (document.head) attach();
      else document.addEventListener('DOMContentLoaded', attach, { once: true });
    } catch (e) {
      warn('cannot watch the title', e);
    }
  }

  // ---- The link to the bridge ---------------------------------------------------------------
  function send(obj) {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    try {
      ws.send(JSON.stringify(obj));
      return true;
    } catch (e) {
      warn('send failed', e);
      return false;
    }
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    let ws;
    const startedAt = Date.now();
    let opened = false;
    try {
      ws = new WebSocket(bridgeUrl());
    } catch (e) {
      warn('cannot open the bridge socket', e);
      scheduleReconnect();
      return;
    }
    state.ws = ws;
    ws.onopen = () => {
      opened = true;
      state.connected = true;
      state.attempt = 0;
      state.quickFailures = 0;
      state.blocked = false;
      state.unreachable = false;
      log('connected to the bridge at', bridgeUrl());
      state.siteRules = null; // this bridge may be older: legacy rules until it sends its own
      send({ type: 'hello', version: VERSION, url: location.href });
      renderTitle();
      afterHello();
    };
    ws.onmessage = (event) => {
      const msg = parseJson(event.data);
      if (msg === undefined) {
        warn('ignored a message that is not JSON');
        return;
      }
      try {
        handleMessage(msg);
      } catch (e) {
        warn('message handler failed', e);
      }
    };
    ws.onclose = () => {
      if (state.ws !== ws) return;
      state.ws = null;
      state.connected = false;
      // Nobody can receive the answers any more: stop the fetches.
      for (const controller of state.tasks.values()) controller.abort();
      state.tasks.clear();
      if (!opened && Date.now() - startedAt < CONFIG.quickFailureMs) {
        state.quickFailures++;
      } else {
        state.quickFailures = 0;
        state.blocked = false; // failing differently now: "⛔ " no longer applies
        state.unreachable = false;
      }
      if (state.quickFailures >= CONFIG.quickFailuresForHint && !state.blocked && !state.unreachable) {
        explainBlockedSocket();
      }
      renderTitle();
      scheduleReconnect();
    };
    ws.onerror = () => {}; // onclose follows and reconnects
  }

  function scheduleReconnect() {
    clearTimeout(state.reconnectTimer);
    const base = Math.min(CONFIG.reconnectMaxMs, CONFIG.reconnectBaseMs * 2 ** state.attempt);
    const delay = base * (1 + CONFIG.reconnectJitter * (Math.random() * 2 - 1));
    state.attempt = Math.min(state.attempt + 1, 16);
    state.reconnectTimer = setTimeout(connect, delay);
  }

  // Chrome's Local Network Access: a public https page may not open ws://127.0.0.1 until the user
  // allows it for the site; the socket then fails at once (net::ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS
  // in the console; the script cannot see that text, only the immediate failure).
  async function localNetworkPermission() {
    if (!navigator.permissions || typeof navigator.permissions.query !== 'function') return null;
    for (const name of ['local-network-access', 'loopback-network', 'local-network']) {
      try {
        return (await navigator.permissions.query({ name })).state;
      } catch (e) { /* this browser does not know the name: try the next */ }
    }
    return null;
  }

  async function explainBlockedSocket() {
    state.blocked = true;
    renderTitle();
    // The query can stay unanswered while Chrome holds its own permission request: do not wait long.
    const permission = await withTimeout(localNetworkPermission(), 1000, 'permission query').catch(() => null);
    const url = bridgeUrl();
    if (permission === 'granted') {
      // Not a local-network-access refusal: nothing listens there (a wrong port, or no bridge). The
      // title shows no "⛔ " then, since its advice (allow local network access) would be wrong.
      state.blocked = false;
      state.unreachable = true;
      renderTitle();
      warn('Cannot reach the bridge at ' + url + ' (every attempt fails at once), although this ' +
        'site may use the local network: nothing answers there. Start the bridge (python bridge.py) ' +
        'and check that its port matches (localStorage "lmarena-bridge-url" sets another); this tab ' +
        'keeps retrying.');
      return;
    }
    warn('⛔ Cannot reach the bridge at ' + url + ': every attempt fails at once' +
      (permission ? ' (local network access for this site: ' + permission + ')' : '') + '.\n' +
      'If the console shows net::ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS, your browser blocks this ' +
      'site from talking to programs on your computer. To allow it: click the lock (site information) ' +
      'icon left of the address bar -> Site settings -> set "Local network access" (called "Apps on ' +
      'device" or "Access other apps and services on this device" / "devices on your local network" in ' +
      'some versions) to Allow for this site, then reload this tab.\n' +
      'Otherwise make sure the bridge is running (python bridge.py). This tab keeps retrying.');
  }

  // Once the link is up: the model list and a status report, when the page has loaded.
  function afterHello() {
    pageLoaded().then(async () => {
      if (!state.connected) return;
      await reportModels({}).catch((e) => warn('model report failed', e));
      await sendStatus().catch((e) => warn('status report failed', e));
    });
    if (!state.modelsTimer) {
      state.modelsTimer = setInterval(() => {
        if (state.connected) reportModels({ preferFetch: true }).catch((e) => warn('model refresh failed', e));
      }, CONFIG.modelsRefreshMs);
    }
  }

  function handleMessage(msg) {
    if (!msg || typeof msg !== 'object') return;
    if (msg.request_id && msg.payload) {
      runTask(String(msg.request_id), msg.payload);
      return;
    }
    switch (msg.command) {
      case 'abort': {
        const controller = state.tasks.get(msg.request_id);
        if (controller) controller.abort();
        break;
      }
      case 'refresh':
      case 'reconnect':
        log('the bridge asked for a reload (' + msg.command + ')');
        location.reload();
        break;
      case 'activate_id_capture':
        state.captureArmed = true;
        state.capture = { mode: msg.mode || null, battle_target: msg.battle_target || null };
        log('id capture armed: click Retry on the answer whose ids you want');
        renderTitle();
        break;
      case 'deactivate_id_capture':
        state.captureArmed = false;
        renderTitle();
        break;
      case 'send_models':
      case 'send_page_source':
        reportModels({}).catch((e) => warn('model report failed', e));
        break;
      case 'send_status':
        sendStatus().catch((e) => warn('status report failed', e));
        break;
      case 'keep_token_ready':
        keepTokenReady(msg.action, msg.seconds);
        break;
      case 'cleanup_conversation':
        cleanupConversation(msg.id, msg.action);
        break;
      case 'site_rules':
        state.siteRules = compileSiteRules(msg.rules);
        break;
      default:
        if (msg.command) log('unknown command ignored:', msg.command);
    }
  }

  // ---- Tasks: the bridge-built LMArena request, sent from the page ---------------------------
  // The body's field names (protocol C): the task's own "fields", key by key, else LEGACY_FIELDS.
  function taskFields(request) {
    const given = request.fields && typeof request.fields === 'object' && !Array.isArray(request.fields)
      ? request.fields : {};
    const isName = (v) => typeof v === 'string' && v.length > 0;
    const isNames = (v) => Array.isArray(v) && v.every(isName);
    const pick = (key, ok) => (ok(given[key]) ? given[key] : LEGACY_FIELDS[key]);
    return {
      token_v3: pick('token_v3', isName),
      token_v2: pick('token_v2', isName),
      attachments: pick('attachments', (v) => Array.isArray(v) && v.every((path) => isNames(path) && path.length)),
      never_send: pick('never_send', isNames),
    };
  }

  // Deletes every key in `names` from every object in `value`, at any depth.
  function removeKeys(value, names) {
    if (Array.isArray(value)) {
      for (const v of value) removeKeys(v, names);
    } else if (value && typeof value === 'object') {
      for (const k of Object.keys(value)) {
        if (names.has(k)) delete value[k];
        else removeKeys(value[k], names);
      }
    }
  }

  // The arrays found at `path` (keys; "*" = every element of an array); a missing step finds none.
  function listsAt(node, path, i, out) {
    if (i === path.length) {
      if (Array.isArray(node)) out.push(node);
    } else if (path[i] === '*') {
      if (Array.isArray(node)) for (const element of node) listsAt(element, path, i + 1, out);
    } else if (node && typeof node === 'object' && !Array.isArray(node) &&
        Object.prototype.hasOwnProperty.call(node, path[i])) {
      listsAt(node[path[i]], path, i + 1, out);
    }
    return out;
  }

  function taskError(requestId, error, status, retryAfter) {
    state.lastError = String(error).slice(0, 300);
    const data = { error, status: status || null, retry_after: retryAfter == null ? null : retryAfter };
    send({ request_id: requestId, data });
  }

  async function runTask(requestId, payload) {
    const controller = new AbortController();
    const signal = controller.signal;
    state.tasks.set(requestId, controller);
    try {
      const request = payload.request;
      if (!request || !request.path) {
        taskError(requestId, 'This bridge is too old for this userscript: update bridge.py.');
        return;
      }
      const method = String(request.method || 'POST').toUpperCase();
      const hasBody = method !== 'GET' && method !== 'HEAD';
      const fields = taskFields(request);
      const body = hasBody ? (deepCopy(request.body) || {}) : null;
      if (body && typeof body === 'object') {
        removeKeys(body, new Set(fields.never_send)); // before the token goes in
        try {
          await uploadAttachments(body, fields.attachments);
        } catch (e) {
          if (signal.aborted) return;
          taskError(requestId, 'attachment upload failed in the tab: ' + errorText(e), e.status || null);
          return;
        }
      }
      if (signal.aborted) return;
      const action = request.recaptcha_action;
      if (action && body && typeof body === 'object') {
        try {
          if (request.rediscover_site_key) forgetSiteKeys(); // the last token was refused
          if (request.recaptcha === 'v2') {
            delete body[fields.token_v3];
            body[fields.token_v2] = await mintV2Token();
          } else {
            const ready = request.rediscover_site_key ? null : await takeReadyToken(action);
            body[fields.token_v3] = ready || (await mintV3Token(action));
          }
          if (request.rediscover_site_key) topUpToken(); // the ready token must use the new key too
        } catch (e) {
          if (signal.aborted) return;
          taskError(requestId, 'recaptcha validation failed: could not get a reCAPTCHA token in the tab (' +
            errorText(e) + ')', 403);
          return;
        }
        if (signal.aborted) return;
        send({ request_id: requestId, event: 'token_ready' });
      }
      const response = await originalFetch.call(window, request.path, {
        method,
        headers: { 'Content-Type': 'text/plain;charset=UTF-8', Accept: '*/*' },
        body: hasBody ? (typeof body === 'string' ? body : JSON.stringify(body)) : undefined,
        credentials: 'include',
        signal,
      });
      const headersEvent = { request_id: requestId, event: 'upstream_headers', status: response.status };
      const ratelimit = response.headers.get('ratelimit'); // the site's budget (protocol B): raw values
      if (ratelimit !== null) headersEvent.ratelimit = ratelimit;
      const ratelimitPolicy = response.headers.get('ratelimit-policy');
      if (ratelimitPolicy !== null) headersEvent.ratelimit_policy = ratelimitPolicy;
      send(headersEvent);
      const type = response.headers.get('content-type') || '';
      const challenged = response.headers.get('cf-mitigated') === 'challenge';
      if (!response.ok || challenged || type.includes('text/html')) {
        const text = await response.text().catch(() => '');
        const error = (challenged ? 'cf-mitigated: challenge ' : '') + (text || response.statusText || 'request failed');
        taskError(requestId, error, response.status, parseRetryAfter(response.headers.get('retry-after')));
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder('utf-8');
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const text = decoder.decode(value, { stream: true });
        if (text) send({ request_id: requestId, data: text });
      }
      const rest = decoder.decode();
      if (rest) send({ request_id: requestId, data: rest });
      send({ request_id: requestId, data: '[DONE]' });
    } catch (e) {
      if (signal.aborted || (e && e.name === 'AbortError')) return; // asked to stop
      taskError(requestId, 'fetch failed in the tab: ' + errorText(e));
    } finally {
      state.tasks.delete(requestId);
    }
  }

  // ---- The page's scripts: where site keys and server-action ids are found --------------------
  // Yields texts to search: (fresh) the page's current HTML from the server, the inline scripts, the
  // script URLs, then the same-origin script files. `fresh` matters after a deploy or key rotation:
  // the loaded page still holds the old values, its current HTML names the new files.
  async function* pageScriptTexts(fresh) {
    const srcs = [];
    const addSrc = (src) => {
      try {
        const url = new URL(src, location.href);
        if (url.origin === location.origin && !srcs.includes(url.href)) srcs.push(url.href);
      } catch (e) { /* not a URL */ }
    };
    if (fresh) {
      try {
        const response = await withTimeout(originalFetch.call(window, location.pathname + location.search,
          { credentials: 'include', cache: 'no-store' }), CONFIG.scriptFetchTimeoutMs, 'page fetch');
        const html = (await response.text()).slice(0, CONFIG.maxScriptChars);
        yield html;
        const re = /<(?:script|link)\b[^>]*?\b(?:src|href)=["']([^"']+\.js(?:\?[^"']*)?)["']/gi;
        for (let m; (m = re.exec(html));) addSrc(m[1].replace(/&amp;/g, '&'));
      } catch (e) {
        warn('could not read the page again', errorText(e));
      }
    }
    const scripts = Array.from(document.scripts);
    for (const script of scripts) {
      if (!script.src && script.textContent) yield script.textContent.slice(0, CONFIG.maxScriptChars);
    }
    for (const script of scripts) {
      if (script.src) {
        yield script.src;
        addSrc(script.src);
      }
    }
    try {
      for (const entry of performance.getEntriesByType('resource')) {
        if (entry.initiatorType === 'script' || /\.js(\?|$)/.test(entry.name)) addSrc(entry.name);
      }
    } catch (e) { /* no resource timing */ }
    for (const src of srcs.slice(0, CONFIG.maxScriptFiles)) {
      let text = null;
      try {
        const request = originalFetch.call(window, src, { cache: fresh ? 'no-cache' : 'default' });
        const response = await withTimeout(request, CONFIG.scriptFetchTimeoutMs, 'script fetch');
        if (response.ok) text = (await response.text()).slice(0, CONFIG.maxScriptChars);
      } catch (e) { /* a script we cannot read: try the next one */ }
      if (text) yield text;
    }
  }

  // ---- reCAPTCHA Enterprise tokens, minted in page context (PROTOCOL 2.5) -------------------
  const V3_KEY_PATTERNS = [
    /enterprise\.js\?(?:[^"'\s]*&)?render=([\w-]{20,60})/g,
    /\.execute\(\s*["']([\w-]{20,60})["']/g,
  ];
  // The v2 key: a render call with a sitekey, or a configuration entry naming it.
  const V2_KEY_PATTERNS = [
    /\.render\((?:(?!\.render\()[^;]){0,400}?\bsitekey["']?\s*:\s*["']([\w-]{20,60})["']/gi,
    /recaptcha_?v2_?site_?key["']?\s*[:=]\s*["']([\w-]{20,60})["']/gi,
  ];

  function firstKey(patterns, text, except) {
    for (const re of patterns) {
      re.lastIndex = 0;
      for (let m; (m = re.exec(text || ''));) {
        if (m[1] !== 'explicit' && m[1] !== except) return m[1];
      }
    }
    return null;
  }

  function scanKeys() {
    if (!state.keys) {
      const fresh = state.keysFresh;
      state.keysFresh = false;
      state.keys = (async () => {
        await pageLoaded();
        const found = { v3: null, v2: null };
        for await (const text of pageScriptTexts(fresh)) {
          found.v3 = found.v3 || firstKey(V3_KEY_PATTERNS, text, null);
          found.v2 = found.v2 || firstKey(V2_KEY_PATTERNS, text, found.v3);
          if (found.v3 && found.v2) break;
        }
        if (found.v2 && found.v2 === found.v3) found.v2 = null;
        return found;
      })();
    }
    return state.keys;
  }

  async function v3SiteKey() {
    const found = await scanKeys();
    state.usedFallbackV3 = !found.v3;
    const list = CONFIG.recaptchaFallbackKeys;
    return found.v3 || list[state.fallbackV3 % list.length];
  }

  async function v2SiteKey() {
    const found = await scanKeys();
    state.usedFallbackV2 = !found.v2;
    const list = CONFIG.recaptchaV2FallbackKeys;
    return found.v2 || list[state.fallbackV2 % list.length];
  }

  // The bridge saw a token refused: find the keys again (a rotated key then works without an update
  // of this script); where a fallback key was in use, the next fallback is tried.
  function forgetSiteKeys() {
    if (state.usedFallbackV3) state.fallbackV3++;
    if (state.usedFallbackV2) state.fallbackV2++;
    state.keys = null;
    state.keysFresh = true;
    const k = state.keeper;
    k.gen++; // a ready token (or one being minted) belongs to the old key
    k.token = null;
    log('forgetting the reCAPTCHA site keys; looking for them again');
  }

  async function grecaptchaEnterprise(key, need) {
    const start = Date.now();
    let injected = false;
    while (Date.now() - start < CONFIG.recaptchaLoadWaitMs) {
      const g = window.grecaptcha && window.grecaptcha.enterprise;
      if (g && typeof g[need] === 'function') return g;
      if (!injected && Date.now() - start > 3000) {
        injected = true; // the page has not loaded it: load it ourselves
        injectEnterprise(key);
      }
      await sleep(100);
    }
    throw new Error('grecaptcha.enterprise is not available');
  }

  function injectEnterprise(key) {
    if (state.injectedKeys.has(key)) return false;
    state.injectedKeys.add(key);
    const s = document.createElement('script');
    s.src = 'https://www.google.com/recaptcha/enterprise.js?render=' + encodeURIComponent(key);
    (document.head || document.documentElement).appendChild(s);
    return true;
  }

  async function readyEnterprise(g) {
    if (typeof g.ready === 'function') {
      await withTimeout(new Promise((resolve) => g.ready(resolve)), CONFIG.recaptchaTokenWaitMs, 'grecaptcha.ready');
    }
  }

  async function mintV3Token(action) {
    const key = await v3SiteKey();
    const g = await grecaptchaEnterprise(key, 'execute');
    await readyEnterprise(g);
    try {
      return await withTimeout(g.execute(key, { action }), CONFIG.recaptchaTokenWaitMs, 'grecaptcha.execute');
    } catch (e) {
      // A key the page never loaded (a rotation we found in its new scripts): load it, try once more.
      const pageHasKey = Array.from(document.scripts).some((s) => s.src.includes('render=' + key));
      if (pageHasKey || !injectEnterprise(key)) throw e;
      await sleep(1500);
      const g2 = await grecaptchaEnterprise(key, 'execute');
      await readyEnterprise(g2);
      return withTimeout(g2.execute(key, { action }), CONFIG.recaptchaTokenWaitMs, 'grecaptcha.execute');
    }
  }

  // v2: an invisible widget, executed at once; its callback gets the token (PROTOCOL 2.5).
  async function mintV2Token() {
    const key = await v2SiteKey();
    const g = await grecaptchaEnterprise(key, 'render');
    await readyEnterprise(g);
    const box = document.createElement('div');
    box.style.cssText = 'position:fixed;right:0;bottom:0;z-index:2147483647';
    (document.body || document.documentElement).appendChild(box);
    log('asking for a reCAPTCHA v2 token; if a challenge appears in this tab, solve it');
    try {
      return await withTimeout(new Promise((resolve, reject) => {
        const widget = g.render(box, {
          sitekey: key,
          size: 'invisible',
          callback: (token) => resolve(token),
          'error-callback': () => reject(new Error('reCAPTCHA v2 reported an error')),
          'expired-callback': () => reject(new Error('reCAPTCHA v2 token expired')),
        });
        const result = g.execute(widget);
        if (result && typeof result.catch === 'function') result.catch(reject);
      }), CONFIG.recaptchaV2WaitMs, 'reCAPTCHA v2');
    } finally {
      box.remove();
    }
  }

  // -- The ready token (keep_token_ready): one fresh v3 token minted ahead for the next task --
  function keepTokenReady(action, seconds) {
    const k = state.keeper;
    const secs = Number(seconds);
    if (typeof action !== 'string' || !action || !Number.isFinite(secs)) return;
    if (k.action !== action) {
      k.gen++;
      k.token = null;
    }
    k.action = action;
    k.until = Date.now() + Math.min(Math.max(secs, 0), CONFIG.keepTokenMaxSeconds) * 1000;
    topUpToken();
  }

  function freshReadyToken() {
    const k = state.keeper;
    const t = k.token;
    return t && t.gen === k.gen && Date.now() - t.at < CONFIG.tokenMaxAgeMs ? t : null;
  }

  function topUpToken(delayMs) {
    const k = state.keeper;
    clearTimeout(k.timer);
    k.timer = null;
    if (delayMs > 0) {
      k.timer = setTimeout(() => topUpToken(), delayMs);
      return;
    }
    if (!k.action || Date.now() >= k.until || k.minting) return; // window over, or already minting
    const t = freshReadyToken();
    if (t) {
      const age = Date.now() - t.at;
      if (age < CONFIG.tokenRefreshAgeMs) {
        k.timer = setTimeout(() => topUpToken(), CONFIG.tokenRefreshAgeMs - age);
        return;
      }
    }
    const gen = k.gen;
    const action = k.action;
    const at = Date.now(); // the token's age counts from when we asked for it
    let failed = false;
    k.minting = mintV3Token(action).then(
      (value) => {
        if (gen === k.gen && action === k.action) k.token = { value, at, gen };
      },
      (e) => {
        failed = true;
        state.lastError = 'could not mint a reCAPTCHA token ahead: ' + errorText(e);
        warn(state.lastError);
      });
    k.minting.finally(() => {
      k.minting = null;
      topUpToken(failed ? CONFIG.tokenRetryMs : 0);
    });
  }

  // A task takes the ready token when it has one for its action (or one is being minted: that is
  // sooner than starting another); the next one is minted in the background.
  async function takeReadyToken(action) {
    const k = state.keeper;
    if (k.action !== action) return null;
    for (let i = 0; i < 2; i++) {
      const t = freshReadyToken();
      if (t) {
        k.token = null;
        topUpToken();
        return t.value;
      }
      if (!k.minting) break;
      await k.minting.catch(() => {});
    }
    return null;
  }

  // ---- Server actions (PROTOCOL 2.7): ids from the page's script chunks --------------------
  const ACTION_RE = /createServerReference\)\(\s*["']([0-9a-fA-F]{40,44})["'](?:(?!createServerReference)[^;]){0,400}?["']([A-Za-z_$][\w$]*)["']\s*\)/g;

  function actionIds(fresh) {
    if (!state.actions || fresh) {
      state.actions = (async () => {
        await pageLoaded();
        const ids = {};
        for await (const text of pageScriptTexts(fresh)) {
          ACTION_RE.lastIndex = 0;
          for (let m; (m = ACTION_RE.exec(text));) {
            if (CONFIG.actionNames.includes(m[2]) && !ids[m[2]]) ids[m[2]] = m[1];
          }
          if (CONFIG.actionNames.every((n) => ids[n])) break;
        }
        return ids;
      })();
    }
    return state.actions;
  }

  // Flight rows ("0:{...}\n1:{...}\n") -> the action's result: the row with {"success", "data"}.
  function actionResult(text) {
    for (const line of String(text).split('\n')) {
      const m = /^[0-9a-fA-F]+:(.*)$/.exec(line);
      if (!m) continue;
      const value = parseJson(m[1]);
      if (value && typeof value === 'object' && !Array.isArray(value) && 'success' in value) {
        if (value.success) return value.data;
        throw new Error('the site refused: ' + JSON.stringify(value.error || value).slice(0, 300));
      }
    }
    throw new Error('unexpected server action answer: ' + String(text).slice(0, 200));
  }

  async function callAction(name, args) {
    for (let attempt = 0; attempt < 2; attempt++) {
      const id = (await actionIds(attempt > 0))[name];
      if (!id) throw new Error('server action ' + name + ' not found in the page\'s scripts');
      const response = await withTimeout(originalFetch.call(window, location.pathname, {
        method: 'POST',
        headers: { 'Next-Action': id, Accept: 'text/x-component', 'Content-Type': 'text/plain;charset=UTF-8' },
        body: JSON.stringify(args),
        credentials: 'include',
      }), CONFIG.actionTimeoutMs, name);
      const text = await response.text().catch(() => '');
      if (response.status === 404 && /Server action not found/i.test(text) && attempt === 0) {
        log('server action ' + name + ' is stale (the site was updated); looking for its new id');
        continue;
      }
      if (!response.ok) {
        throw httpError(name + ' answered ' + response.status + ': ' + text.slice(0, 300), response.status);
      }
      return actionResult(text);
    }
    throw httpError('server action ' + name + ' not found after looking again', 404);
  }

  // -- Attachments: data: URLs go up through the site's own upload flow -----------------------
  function decodeDataUrl(url) {
    const comma = url.indexOf(',');
    if (comma < 0) throw new Error('malformed data: URL');
    const meta = url.slice(5, comma).split(';');
    const data = url.slice(comma + 1);
    const mime = meta[0] || 'application/octet-stream';
    let bytes;
    if (meta.slice(1).some((p) => p.toLowerCase() === 'base64')) {
      const bin = atob(data.replace(/\s+/g, ''));
      bytes = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    } else {
      bytes = new TextEncoder().encode(decodeURIComponent(data));
    }
    return { mime, bytes };
  }

  async function sha256Hex(bytes) {
    const digest = await crypto.subtle.digest('SHA-256', bytes);
    return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
  }

  // When a signed URL stops working: X-Amz-Date + X-Amz-Expires, or Expires (epoch seconds).
  function signedUrlUntil(url) {
    try {
      const q = new URL(url, location.href).searchParams;
      const amzDate = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/.exec(q.get('X-Amz-Date') || '');
      const amzExpires = Number(q.get('X-Amz-Expires'));
      if (amzDate && Number.isFinite(amzExpires)) {
        const d = amzDate.slice(1).map(Number);
        return Date.UTC(d[0], d[1] - 1, d[2], d[3], d[4], d[5]) + amzExpires * 1000;
      }
      const expires = Number(q.get('Expires'));
      if (Number.isFinite(expires) && expires > 1e9) return expires * 1000;
    } catch (e) { /* not a URL we can read */ }
    return Date.now() + CONFIG.signedUrlDefaultTtlMs;
  }

  // The attachment lists at `paths` (the task's fields.attachments): data: URLs are uploaded first.
  async function uploadAttachments(body, paths) {
    const lists = [];
    for (const path of paths) {
      for (const list of listsAt(body, path, 0, [])) if (!lists.includes(list)) lists.push(list);
    }
    for (const list of lists) {
      for (let i = 0; i < list.length; i++) {
        const a = list[i];
        if (a && typeof a.url === 'string' && a.url.startsWith('data:')) list[i] = await uploadOne(a);
      }
    }
  }

  async function uploadOne(attachment) {
    const { mime, bytes } = decodeDataUrl(attachment.url);
    const contentType = attachment.contentType || mime;
    const name = attachment.name || 'file';
    const hash = await sha256Hex(bytes);
    const cached = state.signedUrls.get(hash);
    if (cached && cached.until - CONFIG.signedUrlMarginMs > Date.now()) {
      return { name, contentType, url: cached.url };
    }
    const ids = await actionIds(false);
    if (!ids.generateUploadUrl || !ids.getSignedUrl) {
      if (!state.noUploadFlowLogged) {
        state.noUploadFlowLogged = true;
        const text = 'no upload flow found in the page (server actions generateUploadUrl/getSignedUrl); ' +
          'attachments are sent as data: URLs';
        warn(text);
        logToBridge(text);
      }
      return attachment;
    }
    const upload = await callAction('generateUploadUrl', [name, contentType]);
    if (!upload || typeof upload.uploadUrl !== 'string' || !upload.key) {
      throw new Error('generateUploadUrl gave no uploadUrl');
    }
    const put = await withTimeout(originalFetch.call(window, upload.uploadUrl, {
      method: 'PUT',
      headers: { 'Content-Type': contentType },
      body: bytes,
    }), CONFIG.uploadTimeoutMs, 'upload');
    if (!put.ok) {
      const text = await put.text().catch(() => '');
      throw httpError('the upload answered ' + put.status + ' ' + text.slice(0, 200), put.status);
    }
    const signed = await callAction('getSignedUrl', [upload.key]);
    const url = typeof signed === 'string' ? signed : signed && signed.url;
    if (typeof url !== 'string') throw new Error('getSignedUrl gave no url');
    state.signedUrls.set(hash, { url, until: signedUrlUntil(url) });
    log('uploaded', name, '(' + bytes.length + ' bytes)');
    return { name, contentType, url };
  }

  // -- Conversations the bridge created and no longer needs ------------------------------------
  async function cleanupConversation(id, action) {
    const name = action === 'archive' ? 'archiveEvaluationSession' : action === 'delete' ? 'deleteEvaluationSession' : null;
    if (!name || typeof id !== 'string' || !UUID_RE.test(id)) {
      logToBridge('cleanup_conversation ignored: needs a conversation id and action "archive" or "delete"');
      return;
    }
    try {
      await callAction(name, [id]);
      log(action === 'delete' ? 'deleted' : 'archived', 'conversation', id);
    } catch (e) {
      const text = 'could not ' + action + ' conversation ' + id + ': ' + errorText(e);
      warn(text);
      logToBridge(text);
    }
  }

  // ---- Id capture and request shapes: a look at the page's own fetches ----------------------
  const RETRY_RE = /\/(?:nextjs-api|api)\/stream\/retry-evaluation-session-message\/([0-9a-fA-F-]{36})\/messages\/([0-9a-fA-F-]{36})/;
  const EVALUATION_RE = /\/(?:nextjs-api|api)\/stream\/(create-evaluation|post-to-evaluation)(?:[/?#]|$)/;

  function urlOf(input) {
    if (typeof input === 'string') return input;
    if (input instanceof URL) return input.href;
    if (input && typeof input.url === 'string') return input.url;
    return String(input);
  }

  function maybeCapture(url) {
    if (!state.captureArmed) return;
    const m = RETRY_RE.exec(url);
    if (!m) return;
    state.captureArmed = false;
    log('captured session', m[1], 'message', m[2]);
    send({ type: 'ids_captured', session_id: m[1], message_id: m[2] });
    renderTitle();
  }

  // The bridge's shape rules (site_rules, protocol D), compiled; a key it leaves out (or gets wrong)
  // is taken from LEGACY_FIELDS.site_rules. Rules that are not an object: null (the legacy rules).
  function compileSiteRules(rules) {
    const legacy = LEGACY_FIELDS.site_rules;
    if (!rules || typeof rules !== 'object' || Array.isArray(rules)) {
      warn('site_rules without usable rules: using the built-in ones');
      return null;
    }
    const names = (key) => new Set(Array.isArray(rules[key]) && rules[key].every((x) => typeof x === 'string')
      ? rules[key] : legacy[key]);
    const pattern = (key, flags) => {
      const source = typeof rules[key] === 'string' ? rules[key] : legacy[key];
      if (source === '') return /(?!)/; // no pattern: matches no key
      try {
        return new RegExp(source, flags);
      } catch (e) {
        warn('site_rules: ' + key + ' is not a valid pattern (' + errorText(e) + '); using the built-in one');
        return new RegExp(legacy[key], flags);
      }
    };
    return {
      neverCopy: names('never_copy'),
      neverCopyRe: pattern('never_copy_pattern', 'i'),
      idKeysRe: pattern('id_keys_pattern', ''),
      blank: names('blank'),
      blankWithin: names('blank_within'),
      empty: names('empty'),
    };
  }

  const LEGACY_RULES = compileSiteRules(LEGACY_FIELDS.site_rules);
  const isUuid = (x) => typeof x === 'string' && UUID_RE.test(x);

  // The page's body by the shape rules: no token, id, secret or credential-like key, the user's
  // content blanked, attachments emptied; every other field (a new one the site started to require,
  // too) stays as the page sent it. `key`: the name of the object or array `value` is the value of
  // (elements of an array keep their array's name).
  function requestShape(value, key, rules) {
    if (Array.isArray(value)) {
      if (rules.empty.has(key)) return [];
      return value.map((v) => requestShape(v, key, rules));
    }
    if (!value || typeof value !== 'object') return value;
    const out = {};
    for (const [k, v] of Object.entries(value)) {
      if (rules.neverCopy.has(k) || rules.neverCopyRe.test(k)) continue;
      if (rules.idKeysRe.test(k) && (isUuid(v) || (Array.isArray(v) && v.every(isUuid)))) continue;
      if (rules.blank.has(k) && typeof v === 'string' && rules.blankWithin.has(key)) {
        out[k] = '';
        continue;
      }
      out[k] = requestShape(v, k, rules);
    }
    return out;
  }

  function reportShape(endpoint, text) {
    const body = parseJson(text);
    if (!body || typeof body !== 'object' || Array.isArray(body)) return;
    send({ type: 'request_shape', endpoint, body: requestShape(body, null, state.siteRules || LEGACY_RULES) });
  }

  function watchPageRequest(input, init) {
    const url = urlOf(input);
    maybeCapture(url);
    const m = EVALUATION_RE.exec(url);
    if (!m || !state.connected) return;
    const body = init && init.body !== undefined ? init.body : null;
    if (typeof body === 'string') reportShape(m[1], body);
    else if (body == null && input && typeof input.clone === 'function') {
      input.clone().text().then((text) => reportShape(m[1], text), () => {});
    }
  }

  // Same name, same length, same `this` and arguments, same result: only a look at the URL first.
  const wrappedFetch = function fetch(input) {
    try {
      watchPageRequest(input, arguments[1]);
    } catch (e) {
      warn('request check failed', e);
    }
    return originalFetch.apply(this, arguments);
  };

  try {
    window.fetch = wrappedFetch;
  } catch (e) {
    warn('cannot wrap fetch; id capture will not work', e);
  }

  // ---- Model list (PROTOCOL 2.8): "initialModels" in Next.js flight data ---------------------
  function flightChunks() {
    const chunks = [];
    try {
      if (Array.isArray(self.__next_f)) {
        for (const entry of self.__next_f) {
          if (Array.isArray(entry) && typeof entry[1] === 'string') chunks.push(entry[1]);
        }
      }
    } catch (e) {
      warn('cannot read __next_f', e);
    }
    if (chunks.length) return chunks;
    const re = /self\.__next_f\.push\(\[1,\s*("(?:[^"\\]|\\.)*")\]\)/g;
    for (const script of Array.from(document.scripts)) {
      const text = script.textContent || '';
      for (let m; (m = re.exec(text));) {
        const s = parseJson(m[1]);
        if (typeof s === 'string') chunks.push(s);
      }
    }
    return chunks;
  }

  // The JSON array after "initialModels": in flight text (the page's pushes joined, or a raw RSC body).
  function modelsFromFlight(text) {
    const at = text.indexOf('"initialModels":');
    if (at < 0) return null;
    const start = text.indexOf('[', at);
    if (start < 0) return null;
    let depth = 0;
    let inString = false;
    for (let i = start; i < text.length; i++) {
      const c = text[i];
      if (inString) {
        if (c === '\\') i++;
        else if (c === '"') inString = false;
      } else if (c === '"') inString = true;
      else if (c === '[' || c === '{') depth++;
      else if (c === ']' || c === '}') {
        depth--;
        if (depth === 0) {
          const models = parseJson(text.slice(start, i + 1));
          return Array.isArray(models) ? models : null;
        }
      }
    }
    return null;
  }

  // The site's catalog (PROTOCOL 2.8), flattened: each row of each arena group, unmodified, plus
  // "arena". null (with one console line saying why) when it cannot be used.
  async function fetchCatalog() {
    let why;
    try {
      const response = await withTimeout(originalFetch.call(window, CONFIG.modelsCatalogPath, {
        headers: { Accept: 'application/json' },
        credentials: 'include',
        cache: 'no-store',
      }), CONFIG.modelsFetchTimeoutMs, 'the model catalog');
      const text = await response.text();
      const catalog = response.status === 200 ? parseJson(text) : undefined;
      if (response.status !== 200) why = 'answered ' + response.status;
      else if (catalog === undefined) why = 'is not JSON';
      else if (!Array.isArray(catalog)) why = 'is not a list of arenas';
      else {
        const models = [];
        for (const group of catalog) {
          if (!group || typeof group.arena !== 'string' || !Array.isArray(group.models)) continue;
          for (const row of group.models) {
            if (row && typeof row === 'object' && !Array.isArray(row)) models.push(Object.assign({}, row, { arena: group.arena }));
          }
        }
        if (models.length) return models;
        why = 'holds no models';
      }
    } catch (e) {
      why = 'could not be read (' + errorText(e) + ')';
    }
    warn('the model catalog ' + CONFIG.modelsCatalogPath + ' ' + why + '; falling back to the page data');
    return null;
  }

  // Pages without the list (the leaderboard, a conversation) ask the chat page for its RSC payload.
  async function fetchModels() {
    const response = await originalFetch.call(window, CONFIG.modelsPagePath, {
      headers: { RSC: '1' },
      credentials: 'include',
      cache: 'no-store',
    });
    if (!response.ok) throw new Error(CONFIG.modelsPagePath + ' answered ' + response.status);
    return modelsFromFlight(await response.text());
  }

  function reportModels(opts) {
    if (!state.modelsReport) {
      state.modelsReport = (async () => {
        await pageLoaded();
        if (!state.connected) return;
        // The catalog first; then this page's data and /text/direct (the refresh prefers the latter:
        // the loaded page's list only gets older).
        const sources = opts.preferFetch ? ['catalog', 'text/direct', 'page'] : ['catalog', 'page', 'text/direct'];
        let models = null;
        let source = null;
        for (const s of sources) {
          if (s === 'catalog') {
            models = await fetchCatalog();
          } else if (s === 'page') {
            models = modelsFromFlight(flightChunks().join(''));
          } else {
            models = await fetchModels().catch((e) => {
              warn('could not fetch the model list', errorText(e));
              return null;
            });
          }
          if (models && models.length) {
            source = s;
            break;
          }
        }
        if (source) {
          if (send({ type: 'models', models, source })) {
            state.models = { count: models.length, source };
            log('sent', models.length, 'models to the bridge (from ' + source + ')');
          }
        } else {
          warn('no model list found in the catalog, this page or ' + CONFIG.modelsPagePath);
        }
      })().finally(() => { state.modelsReport = null; });
    }
    return state.modelsReport;
  }

  // ---- Status report (for the bridge's doctor and status page) -----------------------------
  function loggedIn() {
    try {
      return /(?:^|;\s*)arena-auth-prod-v1(?:\.0)?=/.test(document.cookie) ? true : null;
    } catch (e) {
      return null; // httpOnly cookies are invisible anyway: unknown
    }
  }

  async function sendStatus() {
    await pageLoaded();
    const keys = await scanKeys().catch(() => ({ v3: null, v2: null }));
    const ids = await actionIds(false).catch(() => ({}));
    const g = window.grecaptcha && window.grecaptcha.enterprise;
    const actions = {};
    for (const name of CONFIG.actionNames) actions[name] = Boolean(ids[name]);
    send({
      type: 'status',
      recaptcha: {
        loaded: Boolean(g && typeof g.execute === 'function'),
        site_key: keys.v3,
        v2_site_key: keys.v2,
      },
      actions,
      logged_in: loggedIn(),
      models: { count: state.models.count, source: state.models.source },
      token_ready: Boolean(freshReadyToken()),
      last_error: state.lastError,
    });
  }

  watchTitle();
  connect();
})();
