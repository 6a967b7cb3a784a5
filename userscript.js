// ==UserScript==
// @name         LMArena Bridge
// @namespace    https://github.com/lmarena-bridge/lmarena-bridge
// @version      3.0.0
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
 * Protocol: PROTOCOL.md section 1. Nothing here talks to anything but the page's own site and the
 * local bridge.
 */
(function () {
  'use strict';

  if (window.__lmarenaBridgeLoaded) return; // installed twice: run once
  window.__lmarenaBridgeLoaded = true;

  const VERSION = '3.0.0'; // keep equal to @version above

  const CONFIG = {
    // Where the bridge listens. Override without editing: localStorage['lmarena-bridge-url'].
    bridgeUrl: 'ws://127.0.0.1:5102/ws',
    // Reconnect back-off: base * 2^attempt, capped, with +-jitter so many tabs do not stampede.
    reconnectBaseMs: 1000,
    reconnectMaxMs: 30000,
    reconnectJitter: 0.3,
    // reCAPTCHA v3 Enterprise: how long to wait for the page's grecaptcha, and for one token.
    recaptchaLoadWaitMs: 15000,
    recaptchaTokenWaitMs: 15000,
    // Site keys seen on LMArena (newest first); the page's own key, found at run time, wins.
    recaptchaFallbackKeys: ['6LeTGMcsAAAAALuIlkVwIxaAuZA8VledA6d3Nnb0', '6Led_uYrAAAAAKjxDIF58fgFtX3t8loNAK85bW9I'],
    logPrefix: '[LMArena Bridge]',
  };

  const log = (...args) => console.log(CONFIG.logPrefix, ...args);
  const warn = (...args) => console.warn(CONFIG.logPrefix, ...args);

  const state = {
    ws: null,
    connected: false,
    attempt: 0,
    reconnectTimer: null,
    captureArmed: false,
    capture: null, // {mode, battle_target} of the armed capture
    tasks: new Map(), // request_id -> AbortController
    siteKey: null,
    modelsSent: false,
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

  // ---- Tab title: "✅ " while connected, "🎯 " in front while capture is armed ----------------
  const PREFIXES = ['🎯 ', '✅ '];

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
      const want = (state.captureArmed ? '🎯 ' : '') + (state.connected ? '✅ ' : '') + bareTitle(document.title);
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
    try {
      ws = new WebSocket(bridgeUrl());
    } catch (e) {
      warn('cannot open the bridge socket', e);
      scheduleReconnect();
      return;
    }
    state.ws = ws;
    ws.onopen = () => {
      state.connected = true;
      state.attempt = 0;
      log('connected to the bridge at', bridgeUrl());
      send({ type: 'hello', version: VERSION, url: location.href });
      renderTitle();
      reportModels();
    };
    ws.onmessage = (event) => {
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch (e) {
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
        state.modelsSent = false;
        reportModels();
        break;
      default:
        if (msg.command) log('unknown command ignored:', msg.command);
    }
  }

  // ---- Tasks: the bridge-built LMArena request, sent from the page ---------------------------
  async function runTask(requestId, payload) {
    const controller = new AbortController();
    state.tasks.set(requestId, controller);
    try {
      const request = payload.request;
      if (!request || !request.path) {
        send({ request_id: requestId, data: { error: 'This bridge is too old for this userscript: update bridge.py.' } });
        return;
      }
      for (let attempt = 0; ; attempt++) {
        const body = Object.assign({}, request.body);
        if (request.recaptcha_action) {
          try {
            body.recaptchaV3Token = await mintToken(request.recaptcha_action);
          } catch (e) {
            send({ request_id: requestId, data: { error: 'recaptcha validation failed: could not get a reCAPTCHA token in the tab (' + (e && e.message) + ')', status: 403 } });
            return;
          }
        }
        if (controller.signal.aborted) return;
        const response = await originalFetch.call(window, request.path, {
          method: request.method || 'POST',
          headers: { 'Content-Type': 'text/plain;charset=UTF-8', Accept: '*/*' },
          body: JSON.stringify(body),
          credentials: 'include',
          signal: controller.signal,
        });
        const type = response.headers.get('content-type') || '';
        const challenged = response.headers.get('cf-mitigated') === 'challenge';
        if (!response.ok || challenged || type.includes('text/html')) {
          const text = await response.text().catch(() => '');
          if (response.status === 403 && /recaptcha/i.test(text) && request.recaptcha_action && attempt === 0) {
            log('reCAPTCHA refused the token; retrying once with a fresh one');
            continue;
          }
          send({
            request_id: requestId,
            data: {
              error: (challenged ? 'cf-mitigated: challenge ' : '') + (text || response.statusText || 'request failed'),
              status: response.status,
              retry_after: parseRetryAfter(response.headers.get('retry-after')),
            },
          });
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
        return;
      }
    } catch (e) {
      if (controller.signal.aborted || (e && e.name === 'AbortError')) return; // asked to stop
      send({ request_id: requestId, data: { error: 'fetch failed in the tab: ' + ((e && e.message) || String(e)) } });
    } finally {
      state.tasks.delete(requestId);
    }
  }

  function parseRetryAfter(value) {
    if (!value) return null;
    const seconds = Number(value);
    if (Number.isFinite(seconds)) return Math.max(0, Math.round(seconds));
    const date = Date.parse(value);
    return Number.isFinite(date) ? Math.max(0, Math.round((date - Date.now()) / 1000)) : null;
  }

  // ---- reCAPTCHA v3 Enterprise tokens, minted in page context --------------------------------
  const KEY_PATTERNS = [
    /enterprise\.js\?(?:[^"'\s]*&)?render=([\w-]{20,60})/,
    /\.execute\(\s*["']([\w-]{20,60})["']/,
  ];

  function findKey(text) {
    for (const re of KEY_PATTERNS) {
      const m = re.exec(text || '');
      if (m && m[1] !== 'explicit') return m[1];
    }
    return null;
  }

  // The page's current key, from its inline scripts, script URLs, or (bounded) its own script files.
  async function discoverSiteKey() {
    if (state.siteKey) return state.siteKey;
    const scripts = Array.from(document.scripts);
    for (const script of scripts) {
      const key = findKey(script.src) || findKey((script.textContent || '').slice(0, 2000000));
      if (key) return (state.siteKey = key);
    }
    const sameOrigin = scripts.map((s) => s.src).filter((src) => src && src.startsWith(location.origin)).slice(0, 40);
    for (const src of sameOrigin) {
      try {
        const text = await withTimeout(originalFetch.call(window, src).then((r) => r.text()), 3000, 'script fetch');
        const key = findKey(text);
        if (key) return (state.siteKey = key);
      } catch (e) { /* a script we cannot read: try the next one */ }
    }
    return CONFIG.recaptchaFallbackKeys[0];
  }

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

  let injected = false;
  async function grecaptchaEnterprise(key) {
    const start = Date.now();
    while (Date.now() - start < CONFIG.recaptchaLoadWaitMs) {
      const g = window.grecaptcha && window.grecaptcha.enterprise;
      if (g && typeof g.execute === 'function') return g;
      if (!injected && Date.now() - start > 3000) {
        injected = true; // the page has not loaded it: load it ourselves, once
        const s = document.createElement('script');
        s.src = 'https://www.google.com/recaptcha/enterprise.js?render=' + encodeURIComponent(key);
        (document.head || document.documentElement).appendChild(s);
      }
      await sleep(100);
    }
    throw new Error('grecaptcha.enterprise is not available');
  }

  async function mintToken(action) {
    const key = await discoverSiteKey();
    const g = await grecaptchaEnterprise(key);
    await withTimeout(new Promise((resolve) => g.ready(resolve)), CONFIG.recaptchaTokenWaitMs, 'grecaptcha.ready');
    return withTimeout(g.execute(key, { action }), CONFIG.recaptchaTokenWaitMs, 'grecaptcha.execute');
  }

  // ---- Id capture: the ids of the next Retry the user clicks ---------------------------------
  const RETRY_RE = /\/(?:nextjs-api|api)\/stream\/retry-evaluation-session-message\/([0-9a-fA-F-]{36})\/messages\/([0-9a-fA-F-]{36})/;

  function urlOf(input) {
    if (typeof input === 'string') return input;
    if (input instanceof URL) return input.href;
    if (input && typeof input.url === 'string') return input.url;
    return String(input);
  }

  function maybeCapture(input) {
    if (!state.captureArmed) return;
    const m = RETRY_RE.exec(urlOf(input));
    if (!m) return;
    state.captureArmed = false;
    log('captured session', m[1], 'message', m[2]);
    send({ type: 'ids_captured', session_id: m[1], message_id: m[2] });
    renderTitle();
  }

  // Same name, same length, same `this` and arguments, same result: only a look at the URL first.
  const wrappedFetch = function fetch(input) {
    try {
      maybeCapture(input);
    } catch (e) {
      warn('capture check failed', e);
    }
    return originalFetch.apply(this, arguments);
  };

  try {
    window.fetch = wrappedFetch;
  } catch (e) {
    warn('cannot wrap fetch; id capture will not work', e);
  }

  // ---- Model list (PROTOCOL 2.8): "initialModels" in the page's Next.js flight data -----------
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
      let m;
      while ((m = re.exec(text))) {
        try {
          chunks.push(JSON.parse(m[1]));
        } catch (e) { /* not a plain string literal */ }
      }
    }
    return chunks;
  }

  function extractModels() {
    const text = flightChunks().join('');
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
          try {
            const models = JSON.parse(text.slice(start, i + 1));
            return Array.isArray(models) ? models : null;
          } catch (e) {
            return null;
          }
        }
      }
    }
    return null;
  }

  function reportModels() {
    if (state.modelsSent || !state.connected) return;
    let models = null;
    try {
      models = extractModels();
    } catch (e) {
      warn('model list extraction failed', e);
    }
    if (models && models.length) {
      state.modelsSent = send({ type: 'models', models });
      if (state.modelsSent) log('sent', models.length, 'models to the bridge');
    } else if (document.readyState !== 'complete') {
      window.addEventListener('load', reportModels, { once: true }); // flight data not there yet
    }
  }

  watchTitle();
  connect();
})();
