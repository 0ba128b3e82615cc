/* jobsite live pages: one WebSocket per page, resumed by seq; htmx redraws what changed.
 *
 * The page is complete without this file (server-rendered, forms post normally). With it:
 * - the socket asks for every event after the seq the page was rendered at (data-live-after),
 *   and after a drop reconnects with exponential backoff from the last seq it saw: a restart
 *   of the server or a network blip loses no event;
 * - a progress event updates its card in place; any other event (a status change, a retry)
 *   asks htmx to redraw the card from the server, and a job the page does not show yet
 *   redraws the region that lists active jobs;
 * - when a job is active and no event came for data-poll-fallback-s, the page polls the
 *   card's JSON API (data-api-url) until events flow again;
 * - a running job silent for data-stall-after-s shows its "No heartbeat" notice, a job
 *   without progress for data-slow-after-s its "Taking longer than expected" notice.
 * A card declares what it needs in data attributes, so other job kinds reuse this module.
 */
(() => {
  "use strict";

  // -- Confirmation before destructive actions (every page) ---------------------------------
  // Without JavaScript the server shows a confirmation page instead (the form lacks `confirmed`).
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.dataset.confirm || form.dataset.confirmed) return;
    const dialog = document.getElementById("confirm-dialog");
    if (!dialog || typeof dialog.showModal !== "function") return;
    event.preventDefault();
    dialog.querySelector("[data-confirm-text]").textContent = form.dataset.confirm;
    dialog.querySelector("[data-confirm-yes]").textContent = form.dataset.confirmYes || "Yes";
    dialog.returnValue = "";
    dialog.addEventListener("close", () => {
      if (dialog.returnValue !== "yes") return;
      form.dataset.confirmed = "1";
      const confirmed = document.createElement("input");
      confirmed.type = "hidden";
      confirmed.name = "confirmed";
      confirmed.value = "1";
      form.appendChild(confirmed);
      form.submit();
    }, { once: true });
    dialog.showModal();
  });

  document.addEventListener("click", (event) => {
    const closer = event.target.closest && event.target.closest("[data-close-details]");
    if (closer && closer.closest("details")) closer.closest("details").open = false;
  });

  const body = document.body;
  if (!body || !body.hasAttribute("data-live")) return;

  // -- Configuration from the page (settings on the server) ----------------------------------
  const seconds = (name, fallback) => {
    const value = parseFloat(body.dataset[name]);
    return (Number.isFinite(value) ? value : fallback) * 1000;
  };
  const config = {
    topic: body.dataset.liveTopic || "",
    pollFallbackMs: seconds("pollFallbackS", 30),
    slowAfterMs: seconds("slowAfterS", 300),
    stallAfterMs: seconds("stallAfterS", 30),
  };
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const PING_EVERY_MS = 20000;
  const PONG_WAIT_MS = 10000;
  const pollEveryMs = Math.min(5000, Math.max(1000, config.pollFallbackMs / 2));

  // Server time = client time + offset, so ages do not depend on the client's clock.
  const clockOffset = (Date.parse(body.dataset.serverNow) || Date.now()) - Date.now();
  const serverNow = () => Date.now() + clockOffset;

  // Exposed for people debugging a page (and for the browser tests).
  const state = {
    lastSeq: parseInt(body.dataset.liveAfter || "0", 10) || 0,
    socket: null,
    connected: false,
    attempts: 0,
    connects: 0,
    events: 0,
    polls: 0,
    polling: false,
    lastMessageAt: Date.now(),
  };
  window.jobsiteLive = state;

  // -- Helpers --------------------------------------------------------------------------------
  const duration = (ms) => {
    const total = Math.max(0, Math.round(ms / 1000));
    if (total < 60) return `${total} s`;
    if (total < 3600) return `${Math.floor(total / 60)} min ${total % 60} s`;
    return `${Math.floor(total / 3600)} h ${Math.floor((total % 3600) / 60)} min`;
  };
  const statusesOf = (card, name) => (card.dataset[name] || "").split(/\s+/).filter(Boolean);
  const isActive = (card, status) => statusesOf(card, "activeStatuses").includes(status || card.dataset.status);
  const isRunning = (card, status) => statusesOf(card, "runningStatuses").includes(status || card.dataset.status);
  const cards = () => Array.from(document.querySelectorAll("[data-job]"));
  const cardFor = (topic) => cards().find((card) => card.dataset.topic === topic) || null;
  const setText = (root, selector, text) => root.querySelectorAll(selector).forEach((el) => { el.textContent = text; });

  function showStatus() {
    const badge = document.querySelector("[data-live-status]");
    if (!badge) return;
    let mode = state.connected ? "live" : (state.attempts ? "reconnecting" : "connecting");
    if (state.polling) mode = "polling";
    if (state.loggedOut) mode = "logged-out";
    const words = { live: "live", connecting: "connecting…", reconnecting: "reconnecting…", polling: "polling", "logged-out": "logged out: reload" };
    badge.dataset.state = mode;
    badge.textContent = words[mode];
  }

  // What the page learnt about each job beyond its card's attributes, by topic.
  const memory = new Map();
  function remember(card) {
    let known = memory.get(card.dataset.topic);
    if (!known || known.card !== card) {
      const previous = known || { alive: 0, moved: 0, done: null, points: [], polledAt: 0 };
      known = {
        ...previous,
        card,
        alive: Math.max(previous.alive, Date.parse(card.dataset.heartbeatAt || "") || 0),
        moved: Math.max(previous.moved, Date.parse(card.dataset.progressAt || "") || serverNow()),
      };
      memory.set(card.dataset.topic, known);
    }
    return known;
  }

  // -- Redraws through htmx -------------------------------------------------------------------
  const dirty = new Set();
  // A person editing inside an element (an open "Retry…" form, a focused field) keeps it
  // until they are done: the redraw waits, marked dirty, and runs once the editor closes.
  const busy = (element) => Boolean(
    element.querySelector("details[open]")
    || (element.contains(document.activeElement) && document.activeElement.matches("input, select, textarea"))
  );
  function redraw(element) {
    if (!element || !window.htmx) return;
    dirty.add(element.id);
    if (busy(element)) return;
    // Not bubbling: a card's redraw must not also redraw the region that contains it.
    element.dispatchEvent(new CustomEvent("jobsite-refresh", { bubbles: false }));
  }
  const debounced = (fn, ms) => {
    let timer = null;
    return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
  };
  const redrawRegion = debounced(() => redraw(document.querySelector("[data-live-region]")), 250);
  const redrawHistory = debounced(() => redraw(document.getElementById("history")), 400);
  function redrawDirty() {
    for (const id of Array.from(dirty)) {
      const element = document.getElementById(id);
      if (element) redraw(element); else dirty.delete(id);
    }
  }
  document.addEventListener("toggle", (event) => {
    if (event.target instanceof HTMLDetailsElement && !event.target.open) redrawDirty();
  }, true);
  document.addEventListener("htmx:afterRequest", (event) => {
    const element = event.detail.elt;
    if (event.detail.successful && element && element.id) dirty.delete(element.id);
  });
  document.addEventListener("htmx:beforeSwap", (event) => {
    // A session that expired answers with the login page: never paste it into a card.
    const url = event.detail.xhr && event.detail.xhr.responseURL;
    if (url && url.includes("/accounts/login/")) {
      event.detail.shouldSwap = false;
      window.location.reload();
    }
  });

  // -- Applying a job's state (an event's payload or the JSON API's answer) ------------------
  function apply(card, job, at, alive) {
    const known = remember(card);
    const before = card.dataset.status;
    card.querySelectorAll("[data-field]").forEach((el) => {
      const value = job[el.dataset.field];
      if (value !== undefined && value !== null) el.textContent = String(value);
    });

    const done = job[card.dataset.doneField];
    const total = job[card.dataset.totalField];
    if (typeof done === "number" && typeof total === "number") {
      const percent = job.status === "saving" || job.status === "completed" ? 100 : (total ? Math.min(100, (100 * done) / total) : 0);
      const bar = card.querySelector("[data-bar]");
      if (bar) bar.style.width = `${percent.toFixed(1)}%`;
      const progress = card.querySelector("[data-progress]");
      if (progress) progress.setAttribute("aria-valuenow", String(Math.round(percent * 10) / 10));
      setText(card, "[data-percent]", String(Math.round(percent * 10) / 10));
      if (known.done !== null && done !== known.done) known.moved = Math.max(known.moved, at);
      known.done = done;
    }

    const tokens = job[card.dataset.rateField];
    const tokensTotal = job[card.dataset.rateTotalField];
    if (typeof tokens === "number" && tokens > 0) {
      const last = known.points[known.points.length - 1];
      if (last && tokens < last[1]) known.points = [];
      if (!last || at > last[0]) known.points.push([at, tokens]);
      while (known.points.length > 2 && at - known.points[0][0] > 15000) known.points.shift();
      if (known.points.length >= 2) {
        const [t0, k0] = known.points[0];
        const [t1, k1] = known.points[known.points.length - 1];
        if (t1 > t0) {
          const rate = ((k1 - k0) * 1000) / (t1 - t0);
          setText(card, "[data-rate]", Math.round(rate).toLocaleString("en-US"));
          if (rate > 0 && typeof tokensTotal === "number" && tokensTotal >= tokens) {
            setText(card, "[data-eta]", duration(((tokensTotal - tokens) / rate) * 1000));
          }
        }
      }
    }

    const heartbeat = Date.parse(job.heartbeat_at || "") || 0;
    known.alive = Math.max(known.alive, heartbeat, alive || 0);

    const status = job.status;
    const changed = Boolean(status) && status !== before;
    if (changed) {
      card.dataset.status = status;
      known.moved = Math.max(known.moved, at);
    }
    if (status) {
      const label = job.cancel_requested && isRunning(card, status) ? "cancelling" : status;
      card.querySelectorAll("[data-status-label]").forEach((el) => {
        el.textContent = label;
        el.className = `badge badge-${label}`;
      });
    }
    return changed;
  }

  function onEvent(message) {
    if (typeof message.seq !== "number" || message.seq <= state.lastSeq) return;
    state.lastSeq = message.seq;
    state.events += 1;
    state.lastMessageAt = Date.now();
    if (state.polling) { state.polling = false; showStatus(); }

    const progress = String(message.type || "").endsWith(".progress");
    const card = cardFor(message.topic);
    if (!card) {
      redrawRegion();
      redrawHistory();
      return;
    }
    // A card drawn after this progress event already shows it (or something newer).
    if (progress && message.seq <= (parseInt(card.dataset.seq || "0", 10) || 0)) return;
    const job = message.payload || {};
    const at = Date.parse(message.created_at) || serverNow();
    const workerWrote = progress || isRunning(card, job.status);
    apply(card, job, at, workerWrote ? at : 0);
    if (!progress) {
      redraw(card);
      redrawHistory();
    }
  }

  async function poll(card) {
    const known = remember(card);
    known.polledAt = Date.now();
    const url = card.dataset.apiUrl;
    if (!url) return;
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!response.ok) return;
      const job = await response.json();
      state.polls += 1;
      const current = cardFor(card.dataset.topic);
      if (!current) return;
      if (apply(current, job, serverNow(), 0)) {
        redraw(current);
        redrawHistory();
      }
    } catch (error) {
      // Offline: the next poll or the socket's replay catches up.
    }
  }

  // -- Every second: ages, notices, the polling fallback --------------------------------------
  let lastPollRound = 0;
  let lastDirtyTry = 0;
  function tick() {
    const now = serverNow();
    let anyActive = false;
    for (const card of cards()) {
      const status = card.dataset.status;
      if (!isActive(card, status)) {
        card.classList.remove("is-slow", "is-stalled");
        continue;
      }
      anyActive = true;
      const known = remember(card);
      let stalled = false;
      if (isRunning(card, status) && known.alive) {
        const age = Math.max(0, now - known.alive);
        setText(card, "[data-heartbeat-age]", String(Math.round(age / 1000)));
        // Heartbeats are written to the row, not pushed: ask the API before calling it a stall.
        if (age > config.stallAfterMs / 2 && Date.now() - known.polledAt > Math.min(5000, config.stallAfterMs / 4)) poll(card);
        stalled = age > config.stallAfterMs;
      }
      const idle = now - known.moved;
      const slow = !stalled && idle > config.slowAfterMs;
      card.classList.toggle("is-stalled", stalled);
      card.classList.toggle("is-slow", slow);
      const stalledNotice = card.querySelector("[data-stalled-notice]");
      if (stalledNotice) stalledNotice.hidden = !stalled;
      const slowNotice = card.querySelector("[data-slow-notice]");
      if (slowNotice) slowNotice.hidden = !slow;
      setText(card, "[data-idle]", duration(idle));
    }

    const silent = Date.now() - state.lastMessageAt > config.pollFallbackMs;
    const polling = anyActive && silent;
    if (polling !== state.polling) { state.polling = polling; showStatus(); }
    if (polling && Date.now() - lastPollRound >= pollEveryMs) {
      lastPollRound = Date.now();
      cards().filter((card) => isActive(card)).forEach(poll);
    }
    if (dirty.size && Date.now() - lastDirtyTry > 3000) {
      lastDirtyTry = Date.now();
      redrawDirty();
    }
  }

  // -- The socket -----------------------------------------------------------------------------
  let pingTimer = null;
  function connect() {
    showStatus();
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${window.location.host}/ws/events/?after=${state.lastSeq}&topic=${encodeURIComponent(config.topic)}`;
    let socket;
    try {
      socket = new WebSocket(url);
    } catch (error) {
      reconnectLater();
      return;
    }
    state.socket = socket;
    let awaitingPong = 0;
    socket.onopen = () => {
      state.connected = true;
      state.attempts = 0;
      state.connects += 1;
      showStatus();
      redrawDirty();
      clearInterval(pingTimer);
      pingTimer = setInterval(() => {
        // A half-open connection (a network blip) never closes by itself: no pong, new socket.
        if (awaitingPong && Date.now() - awaitingPong > PONG_WAIT_MS) { socket.close(); return; }
        if (socket.readyState === WebSocket.OPEN) {
          if (!awaitingPong) awaitingPong = Date.now();
          socket.send(JSON.stringify({ type: "ping" }));
        }
      }, PING_EVERY_MS);
    };
    socket.onmessage = (event) => {
      let message;
      try { message = JSON.parse(event.data); } catch (error) { return; }
      if (message.type === "pong") { awaitingPong = 0; return; }
      onEvent(message);
    };
    socket.onclose = (event) => {
      if (state.socket !== socket) return;
      state.socket = null;
      state.connected = false;
      clearInterval(pingTimer);
      if (event.code === 4401) {  // the session ended: a reload leads to the login page
        state.loggedOut = true;
        showStatus();
        return;
      }
      reconnectLater();
    };
  }

  function reconnectLater() {
    state.attempts += 1;
    showStatus();
    const step = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (state.attempts - 1));
    setTimeout(connect, step / 2 + Math.random() * step / 2);
  }

  function start() {
    cards().forEach(remember);
    connect();
    setInterval(tick, 1000);
    tick();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
