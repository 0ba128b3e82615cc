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
 * - rows that follow a job (data-follow, e.g. a history row) copy its fields from events, and
 *   their refresh button reads the job's JSON API and redraws only that row;
 * - accordion rows open one at a time, and stay open across redraws.
 * A card declares what it needs in data attributes, so other job kinds reuse this module.
 */
(() => {
  "use strict";

  // -- A refused form (every page) -------------------------------------------------------------
  // A page drawn again with a refused form (400) may have it far below the top: its first field
  // with an error takes the focus and is scrolled to, or the form itself for a reason about the
  // whole form, so the person sees why at once.
  function showRefusal() {
    const error = document.querySelector("form .field-error, form .alert-error");
    if (!error) return;
    const holder = error.closest("[id$='_error']");
    const field = holder ? document.getElementById(holder.id.replace(/_error$/, "")) : null;
    const form = error.closest("form");
    const details = form.closest("details");
    if (details) details.open = true;
    (field || form).scrollIntoView({ block: "center" });
    const focusable = field || form.querySelector("input:not([type=hidden]), select, textarea");
    if (focusable) focusable.focus({ preventScroll: true });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", showRefusal);
  else showRefusal();

  // -- Confirmation before destructive actions (every page) ---------------------------------
  // Without JavaScript the server shows a confirmation page instead (the form lacks `confirmed`).
  function ask(form, onYes) {
    const dialog = document.getElementById("confirm-dialog");
    if (!dialog || typeof dialog.showModal !== "function") return false;
    dialog.querySelector("[data-confirm-text]").textContent = form.dataset.confirm;
    dialog.querySelector("[data-confirm-yes]").textContent = form.dataset.confirmYes || "Yes";
    dialog.returnValue = "";
    dialog.addEventListener("close", () => {
      if (dialog.returnValue !== "yes") return;
      const confirmed = document.createElement("input");
      confirmed.type = "hidden";
      confirmed.name = "confirmed";
      confirmed.value = "1";
      form.appendChild(confirmed);
      onYes();
    }, { once: true });
    dialog.showModal();
    return true;
  }
  document.addEventListener("submit", (event) => {
    const form = event.target;
    // A form htmx sends (hx-post) has had its default prevented; it asks in htmx:confirm below.
    if (event.defaultPrevented) return;
    if (!(form instanceof HTMLFormElement) || !form.dataset.confirm || form.dataset.confirmed) return;
    if (ask(form, () => { form.dataset.confirmed = "1"; form.submit(); })) event.preventDefault();
  });
  document.addEventListener("htmx:confirm", (event) => {
    const form = event.detail.elt;
    if (!(form instanceof HTMLFormElement) || !form.dataset.confirm) return;
    if (ask(form, () => event.detail.issueRequest(true))) event.preventDefault();
  });

  // -- Messages (every page) --------------------------------------------------------------------
  // A message answers the action just taken ("Extraction 12 is queued."); on a live page it turns
  // stale as the job moves on. Each one can be dismissed; a success or an info leaves by itself
  // after MESSAGE_TTL_MS (not while the pointer or the focus is on it); an error or a warning stays.
  // A message about a job (data-about="<topic> <status>": "Training run 5 is generating pairs")
  // leaves as soon as the job is seen in another status, on its card or in a later event (it
  // failed meanwhile): it would otherwise contradict the page below it.
  const MESSAGE_TTL_MS = 20000;
  function dropContradicted(topic, status) {
    if (!topic || !status) return;
    document.querySelectorAll("[data-message][data-about]").forEach((message) => {
      const [about, said] = message.dataset.about.split(" ");
      if (about === topic && said && said !== status) message.remove();
    });
  }
  window.jobsiteDropContradicted = dropContradicted;
  function armMessages(root) {
    (root || document).querySelectorAll("[data-message]:not([data-armed])").forEach((message) => {
      message.dataset.armed = "1";
      const close = message.querySelector("[data-dismiss]");
      if (close) close.hidden = false;
      const [about] = (message.dataset.about || "").split(" ");
      const card = about && Array.from(document.querySelectorAll("[data-job]")).find((c) => c.dataset.topic === about);
      if (card) dropContradicted(about, card.dataset.status);
      if (!message.isConnected) return;
      // Messages sit above the page's content, never over it: an error that answers a form sent
      // further down is brought into view (a success is seen in what changed).
      if (root && root !== document && message.matches(".message-error, .message-warning")) {
        message.scrollIntoView({ block: "nearest" });
      }
      if (!message.matches(".message-success, .message-info")) return;
      const leave = () => {
        if (!message.isConnected) return;
        if (message.matches(":hover, :focus-within")) { setTimeout(leave, 5000); return; }
        message.remove();
      };
      setTimeout(leave, MESSAGE_TTL_MS);
    });
  }
  document.addEventListener("DOMContentLoaded", () => armMessages(document));
  document.addEventListener("htmx:load", (event) => armMessages(event.detail && event.detail.elt));

  document.addEventListener("click", (event) => {
    const dismiss = event.target.closest && event.target.closest("[data-dismiss]");
    if (dismiss && dismiss.closest("[data-message]")) {
      const message = dismiss.closest("[data-message]");
      // The focus goes to the next message's button (or the page's content), not back to <body>.
      const next = Array.from(document.querySelectorAll("[data-message] [data-dismiss]")).find((b) => b !== dismiss);
      message.remove();
      const main = document.querySelector("main");
      if (next) next.focus();
      else if (main) { main.tabIndex = -1; main.focus({ preventScroll: true }); }
    }
    const closer = event.target.closest && event.target.closest("[data-close-details]");
    if (closer && closer.closest("details")) closer.closest("details").open = false;
  });

  // "Select all" ticks every box of its form that carries the same data-pick.
  document.addEventListener("change", (event) => {
    const all = event.target.closest && event.target.closest("[data-select-all]");
    if (!all || !all.form) return;
    all.form.querySelectorAll("input[type=checkbox][data-pick]").forEach((box) => { box.checked = all.checked; });
  });

  // -- Accordion rows (every page) -----------------------------------------------------------
  // An item ([data-accordion-item]) opens its panel ([data-accordion-panel]) when its head row
  // is clicked; one item is open at a time and clicking the open one closes it. Without
  // JavaScript the toggle is a link the server answers with that item open (?open=<id>).
  // Which item is open survives htmx redraws of the rows.
  const accordion = { open: null };
  window.jobsiteAccordion = accordion;
  function applyOpen() {
    document.querySelectorAll("[data-accordion-item]").forEach((item) => {
      const panel = item.querySelector("[data-accordion-panel]");
      const open = Boolean(panel) && item.dataset.accordionItem === accordion.open;
      item.classList.toggle("is-open", open);
      if (panel) panel.hidden = !open;
      item.querySelectorAll("[data-accordion-toggle]").forEach((toggle) => toggle.setAttribute("aria-expanded", String(open)));
    });
  }
  function openItem(id) {
    accordion.open = id;
    applyOpen();
  }
  document.addEventListener("click", (event) => {
    const target = event.target;
    if (!(target instanceof Element)) return;
    const opener = target.closest("[data-accordion-open]");
    if (opener) {
      event.preventDefault();
      openItem(opener.dataset.accordionOpen);
      const item = document.querySelector(`[data-accordion-item="${CSS.escape(opener.dataset.accordionOpen)}"]`);
      if (item) item.scrollIntoView({ block: "nearest", behavior: "smooth" });
      return;
    }
    const head = target.closest("[data-accordion-head]");
    const item = head && head.closest("[data-accordion-item]");
    if (!item || !item.querySelector("[data-accordion-panel]")) return;
    const toggle = target.closest("[data-accordion-toggle]");
    if (!toggle && target.closest("a, button, input, select, textarea, label, form")) return;
    event.preventDefault();
    openItem(accordion.open === item.dataset.accordionItem ? null : item.dataset.accordionItem);
  });
  // htmx settles the class attribute of a redrawn element after the swap: apply after both.
  document.addEventListener("htmx:afterSwap", applyOpen);
  document.addEventListener("htmx:afterSettle", applyOpen);
  // Proceed, Delete: the row closes as the action is sent (after any confirmation).
  document.addEventListener("htmx:beforeRequest", (event) => {
    const elt = event.detail.elt;
    if (elt instanceof HTMLFormElement && elt.hasAttribute("data-accordion-close")) openItem(null);
  });
  const startAccordion = () => {
    const open = document.querySelector("[data-accordion-item].is-open");
    accordion.open = open ? open.dataset.accordionItem : null;
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", startAccordion);
  else startAccordion();

  // Reviewing pair after pair from the keyboard: each decision redraws the page, which would
  // drop the focus back to its top. It moves to the same button of the next pair instead (or
  // stays on this pair's row when it is the last).
  // Only the same decision's button, never the other one: a second Enter must not flip a pair.
  let refocus = null;
  let lastReviewAt = 0;
  // Only a form sent by a person counts: a live redraw requested meanwhile neither drops the
  // pending refocus nor takes it when it settles first.
  const submitterOf = (event) => {
    const trigger = event.detail.requestConfig && event.detail.requestConfig.triggeringEvent;
    return trigger && trigger.submitter;
  };
  document.addEventListener("htmx:beforeRequest", (event) => {
    const button = submitterOf(event);
    if (!button) return;
    const row = button.closest && button.closest("tr[data-pair]");
    refocus = null;
    if (!row || !button.value) return;
    lastReviewAt = Date.now();
    refocus = { row: row.id, decision: button.value.split(":").pop() };
  });
  document.addEventListener("htmx:afterSettle", (event) => {
    if (!refocus || !submitterOf(event)) return;
    const { row: id, decision } = refocus;
    refocus = null;
    let row = document.getElementById(id);
    for (row = row && row.nextElementSibling; row; row = row.nextElementSibling) {
      if (!row.matches("tr[data-pair]")) continue;
      const same = Array.from(row.querySelectorAll("button[name=one]"))
        .find((b) => !b.disabled && b.value.endsWith(`:${decision}`));
      if (same) { same.focus(); return; }
    }
  });

  // A form sent by htmx that the server refuses (403 not staff, 404 gone) shows the server's
  // page in place of the main content, as the same form shows it without JavaScript.
  // (The form is the request's element; the event's own `elt` can be the element swapped.)
  const sentByForm = (detail) => (detail.requestConfig && detail.requestConfig.elt || detail.elt) instanceof HTMLFormElement;
  document.addEventListener("htmx:beforeSwap", (event) => {
    const status = event.detail.xhr && event.detail.xhr.status;
    if ((status === 403 || status === 404) && sentByForm(event.detail)) {
      event.detail.shouldSwap = true;
      event.detail.isError = false;
    }
  });

  // Any other refusal of a form (a server error) and a form that never reached the server say so,
  // at the top of the page: an action is never silently lost.
  function showError(text) {
    const main = document.querySelector("main");
    if (!main) return;
    let list = main.querySelector(":scope > .messages");
    if (!list) {
      list = document.createElement("ul");
      list.className = "messages";
      main.prepend(list);
    }
    const item = document.createElement("li");
    item.className = "message message-error";
    item.setAttribute("role", "alert");
    item.dataset.message = "";
    const sentence = document.createElement("span");
    sentence.textContent = text;
    const close = document.createElement("button");
    close.type = "button";
    close.className = "message-close";
    close.dataset.dismiss = "";
    close.setAttribute("aria-label", "Dismiss");
    item.append(sentence, " ", close);
    list.append(item);
    armMessages(list);
    item.scrollIntoView({ block: "nearest" });
  }
  document.addEventListener("htmx:responseError", (event) => {
    if (!sentByForm(event.detail)) return;  // a live redraw tries again by itself
    const status = event.detail.xhr ? event.detail.xhr.status : 0;
    showError(`The server could not do this (error ${status}); nothing may have changed. Reload the page to see `
      + "where things stand, then try again; if it keeps failing, the server's log says why.");
  });
  document.addEventListener("htmx:sendError", (event) => {
    if (!sentByForm(event.detail)) return;
    showError("The server could not be reached, so this was not sent. Try again once it is back.");
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
    // Every event up to this seq has reached the page (the stream's own cursor, from its pongs);
    // a reconnect asks for what follows. Events above it are told apart by their seq (`seen`):
    // one committed late, below a seq already seen, still counts.
    resumeAfter: parseInt(body.dataset.liveAfter || "0", 10) || 0,
    socket: null,
    unreachable: false,
    connected: false,
    attempts: 0,
    connects: 0,
    events: 0,
    polls: 0,
    rowRefreshes: 0,
    staleRedraws: 0,
    polling: false,
    lastMessageAt: Date.now(),
    // The server's clock as the page reckons it (its own clock, moved by the offset the page was
    // drawn with): what event times are compared with.
    serverNow,
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
  // Counts read as the server draws them (intcomma): 12,480 whether drawn or updated live.
  const shown = (value) => (typeof value === "number" ? value.toLocaleString("en-US") : String(value));
  const setText = (root, selector, text) => root.querySelectorAll(selector).forEach((el) => { el.textContent = text; });

  // The server cannot be reached (no socket, and a poll got no answer at all): a job's silence
  // then says nothing of its worker, so no card is called stalled, and a banner says why.
  function setReachable(ok) {
    if (state.unreachable === !ok) return;
    state.unreachable = !ok;
    document.querySelectorAll("[data-offline]").forEach((banner) => { banner.hidden = ok; });
    showStatus();
  }

  function showStatus() {
    const badge = document.querySelector("[data-live-status]");
    if (!badge) return;
    let mode = state.connected ? "live" : (state.attempts ? "reconnecting" : "connecting");
    if (state.polling && !state.unreachable) mode = "polling";
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
      // The time left the server drew (as of the last progress) is where the countdown starts.
      const drawn = parseFloat((card.querySelector("[data-eta]") || { dataset: {} }).dataset.leftS);
      const progressAt = Date.parse(card.dataset.progressAt || "");
      const left = Number.isFinite(drawn) && progressAt ? { seconds: drawn, at: progressAt } : null;
      const previous = known || { alive: 0, moved: 0, done: null, points: [], polledAt: 0, left, stallRedrawnAt: 0, lastProgress: null };
      // A card drawn for another step of the job (a training run's generation, then its training)
      // starts its pace afresh: the last step's time left would count down in the new one.
      const step = `${card.dataset.status} ${card.dataset.totalField}`;
      const pace = !known || known.step === step ? {} : { points: [], left, rateTotal: undefined };
      known = {
        ...previous,
        ...pace,
        step,
        card,
        // A card of a job its shards run draws its most silent running shard's heartbeat: that one
        // is the card's, however fresh another shard's may be.
        alive: card.querySelector("[data-shards]") ? Date.parse(card.dataset.heartbeatAt || "") || 0
          : Math.max(previous.alive, Date.parse(card.dataset.heartbeatAt || "") || 0),
        moved: Math.max(previous.moved, Date.parse(card.dataset.progressAt || "") || serverNow()),
      };
      memory.set(card.dataset.topic, known);
    }
    return known;
  }

  // -- Redraws through htmx -------------------------------------------------------------------
  const dirty = new Set();
  // A person editing inside an element (an open "Retry…" form, a focused field, ticked boxes) keeps it
  // until they are done: the redraw waits, marked dirty, and runs once the editor closes. A field
  // typed into and left is not a reason to wait: its value is carried over the redraw (below).
  const busy = (element) => Boolean(
    // A confirmation asked (Delete, Cancel…): the form it will send stays until it is answered.
    (document.getElementById("confirm-dialog") || {}).open
    || element.querySelector("details[open]")
    || element.querySelector("input[data-pick]:checked")
    || (element.contains(document.activeElement) && document.activeElement.matches("input, select, textarea"))
    // A pair's review button with the focus, within a while of the last decision: someone deciding
    // pair after pair from the keyboard (not for ever: a redraw from elsewhere must land).
    || (element.contains(document.activeElement) && document.activeElement.matches("tr[data-pair] button")
        && Date.now() - lastReviewAt < REVIEW_HOLD_MS)
  );
  const REVIEW_HOLD_MS = 20000;
  // A field typed into ("3" epochs, a corpus picked) is marked until its form is sent.
  document.addEventListener("input", (event) => {
    const field = event.target;
    if (!(field instanceof Element) || !field.matches("input:not([data-pick]):not([type=file]), select, textarea")) return;
    field.dataset.edited = "1";
  });
  document.addEventListener("htmx:beforeRequest", (event) => {
    const form = event.detail.elt;
    if (form instanceof HTMLFormElement) form.querySelectorAll("[data-edited]").forEach((el) => delete el.dataset.edited);
  });

  // Whatever redraws a part of the page (a live update, an action's answer to hx-target main,
  // whenever it comes), a field typed into there and not sent keeps what was typed, so the form
  // never sends a default the person did not choose. Fields are found again by their form (its
  // action, and which of the forms with that action) and their name (and value, for a box).
  let carried = [];
  const sentForm = (elt) => (elt instanceof HTMLFormElement ? elt : (elt && elt.closest && elt.closest("form")) || null);
  const sameAction = (action) => Array.from(document.forms).filter((form) => form.getAttribute("action") === action);
  function carryEdits(event) {
    const target = event.detail.target;
    if (!event.detail.shouldSwap || !target || !target.querySelectorAll) return;
    const sent = sentForm(event.detail.requestConfig && event.detail.requestConfig.elt);
    Array.from(target.querySelectorAll("[data-edited]"))
      .filter((field) => field.form && field.form !== sent && field.name)
      .forEach((field) => {
        const action = field.form.getAttribute("action");
        carried.push({
          action, nth: sameAction(action).indexOf(field.form), name: field.name, value: field.value,
          box: field.matches("[type=checkbox], [type=radio]"), checked: field.checked,
        });
      });
  }
  document.addEventListener("htmx:afterSettle", () => {
    if (!carried.length) return;
    const fields = carried;
    carried = [];
    fields.forEach(({ action, nth, name, value, box, checked }) => {
      const form = sameAction(action)[nth];
      if (!form) return;
      const field = Array.from(form.elements).find((el) => el.name === name && (!box || el.value === value));
      if (!field || field.disabled) return;
      if (box) field.checked = checked;
      else if (field.matches("select") && !Array.from(field.options).some((option) => option.value === value)) return;
      else field.value = value;
      field.dataset.edited = "1";
    });
  });

  // A redraw asked for while a request of the same part of the page (the element, the region
  // around it, or a card in it) is on its way waits for that request's answer, then runs: hx-sync
  // would abort the older request instead, which htmx reports as an error.
  const waiting = new Set();
  const inFlight = (element) => {
    const part = element.closest("[data-live-region]") || element;
    return part.classList.contains("htmx-request") || Boolean(part.querySelector(".htmx-request"));
  };
  function redraw(element) {
    if (!element || !window.htmx) return;
    dirty.add(element.id);
    if (busy(element)) return;
    if (inFlight(element)) {
      waiting.add(element.id);
      return;
    }
    waiting.delete(element.id);
    // Not bubbling: a card's redraw must not also redraw the region that contains it.
    element.dispatchEvent(new CustomEvent("jobsite-refresh", { bubbles: false }));
  }
  function redrawWaiting() {
    for (const id of Array.from(waiting)) {
      const element = document.getElementById(id);
      if (!element) waiting.delete(id);
      else if (!inFlight(element)) redraw(element);
    }
  }
  // After the answer's settle (an outerHTML swap reports the request on the detached element,
  // which no longer reaches the document); every second too, for an answer that never swapped.
  ["htmx:afterSettle", "htmx:afterRequest"].forEach((name) => {
    document.addEventListener(name, () => { if (waiting.size) setTimeout(redrawWaiting, 0); });
  });
  const debounced = (fn, ms) => {
    let timer = null;
    return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
  };
  const redrawRegion = debounced(() => redraw(document.querySelector("[data-live-region]")), 250);
  const redrawHistory = debounced(() => redraw(document.getElementById("history")), 400);
  // Elements still marked because a redraw could not land (a person was busy in them). One whose
  // redraw is on its way is left alone: its answer clears the mark. Asked again meanwhile, it was
  // queued behind its own request and drawn twice for one event.
  function redrawDirty() {
    for (const id of Array.from(dirty)) {
      const element = document.getElementById(id);
      if (!element) dirty.delete(id);
      else if (!inFlight(element)) redraw(element);
    }
  }
  document.addEventListener("toggle", (event) => {
    if (event.target instanceof HTMLDetailsElement && !event.target.open) redrawDirty();
  }, true);
  document.addEventListener("htmx:beforeSwap", (event) => {
    // A session that expired answers with the login page: never paste it into a card.
    const url = event.detail.xhr && event.detail.xhr.responseURL;
    if (url && url.includes("/accounts/login/")) {
      event.detail.shouldSwap = false;
      window.location.reload();
      return;
    }
    // A redraw asked for before the person started typing may answer after: it is dropped then,
    // and the element stays dirty, to be drawn once they are done.
    const config = event.detail.requestConfig;
    const target = event.detail.target;
    const trigger = config && config.triggeringEvent;
    const liveRedraw = Boolean(trigger) && trigger.type === "jobsite-refresh";
    if (liveRedraw && target && target.id && busy(target)) {
      event.detail.shouldSwap = false;
      dirty.add(target.id);
      return;
    }
    carryEdits(event);  // any swap that lands: a live redraw or an action's answer
    if (liveRedraw && event.detail.shouldSwap) {
      if (target && target.matches("[data-live-region]")) noteShownCards(target);
      // Drawn: no longer dirty. Cleared here, while the element is still in the page: after an
      // outerHTML swap htmx reports the request on a detached element that has lost its id,
      // and a mark left behind would redraw the element every few seconds for ever.
      const element = event.detail.elt;
      if (element && element.id) dirty.delete(element.id);
      if (target && target.id) dirty.delete(target.id);
    }
  });

  // A region's redraw and a card's redraw can cross: the region, rendered before an event, may
  // answer after the card drawn since, and would paste the older card over the newer. Every card
  // carries the seq it shows (data-seq: drawn at, or the last progress event applied to it); a
  // card that came back older than the one it replaced is drawn again at once.
  let shownBefore = null;
  function noteShownCards(region) {
    shownBefore = new Map(Array.from(region.querySelectorAll("[data-job]"))
      .map((card) => [card.dataset.topic, parseInt(card.dataset.seq || "0", 10) || 0]));
  }
  // After the settle, not the swap: htmx attaches a new card's hx-trigger listener during the
  // settle, and a redraw asked for before then would be lost.
  document.addEventListener("htmx:afterSettle", () => {
    if (!shownBefore) return;
    const before = shownBefore;
    shownBefore = null;
    before.forEach((seq, topic) => {
      const card = cardFor(topic);
      if (card && (parseInt(card.dataset.seq || "0", 10) || 0) < seq) {
        state.staleRedraws += 1;
        redraw(card);
      }
    });
  });

  // -- Time left -------------------------------------------------------------------------------
  // Samples run longest first, so a batch late in a run holds fewer tokens: tokens/s alone
  // promises too little time (seen 2-5x short on a small model, where each batch's own cost
  // dominates), samples/s alone too much. The recent progress points are fitted as
  //   seconds = perSample * samples + perToken * tokens
  // (least squares over their increments); where that fit is not determined, the two simple
  // estimates are averaged. points: [ms, tokens, samples], oldest first. Returns seconds or null.
  function timeLeft(points, tokensLeft, samplesLeft) {
    if (points.length < 2 || tokensLeft < 0 || samplesLeft < 0) return null;
    let ss = 0, kk = 0, sk = 0, sy = 0, ky = 0;
    for (let i = 1; i < points.length; i += 1) {
      const dy = (points[i][0] - points[i - 1][0]) / 1000;
      const dk = points[i][1] - points[i - 1][1];
      const ds = points[i][2] - points[i - 1][2];
      ss += ds * ds; kk += dk * dk; sk += ds * dk; sy += ds * dy; ky += dk * dy;
    }
    // Two costs are fitted only from three increments or more, and only where samples and tokens
    // did not move in step: fitted from fewer, or from nearly proportional ones, a batch's noise
    // swings them (and the time left with them) several-fold from one event to the next.
    const det = ss * kk - sk * sk;
    if (points.length >= 4 && det > 0.02 * ss * kk) {
      const perSample = (sy * kk - ky * sk) / det;
      const perToken = (ky * ss - sy * sk) / det;
      if (perSample >= 0 && perToken >= 0) return perSample * samplesLeft + perToken * tokensLeft;
    }
    const [t0, k0, s0] = points[0];
    const [t1, k1, s1] = points[points.length - 1];
    if (t1 <= t0 || k1 <= k0 || s1 <= s0) return null;
    return ((t1 - t0) / 1000) * (tokensLeft / (k1 - k0) + samplesLeft / (s1 - s0)) / 2;
  }
  window.jobsiteTimeLeft = timeLeft;  // for people debugging a page, and the browser tests

  // What the card shows is a countdown from the last time left shown, moved towards each new
  // estimate by a share that grows with the time since (a quarter after a second, most of it
  // after ten): one slow or quick batch nudges it, a lasting change of pace takes it over
  // within seconds. left: {seconds, at (ms)}.
  const LEFT_SETTLE_MS = 4000;
  function smoothLeft(previous, estimate, at) {
    if (previous && at === previous.at) return previous;  // the same progress, applied again
    if (!previous || at < previous.at) return { seconds: estimate, at };
    const counted = Math.max(0, previous.seconds - (at - previous.at) / 1000);
    const share = 1 - Math.exp(-(at - previous.at) / LEFT_SETTLE_MS);
    return { seconds: counted + share * (estimate - counted), at };
  }
  window.jobsiteSmoothLeft = smoothLeft;
  // Counts down between events, and over a card drawn again by the server. The figure is shown
  // again the moment it changes: the page's every-second tick runs at whatever phase the page
  // started at, and alone it showed the time left up to a second late.
  function showLeft(card, known, now) {
    clearTimeout(known.leftTimer);
    if (!known.left || !isRunning(card)) return;
    const ms = Math.max(0, known.left.seconds * 1000 - (now - known.left.at));
    setText(card, "[data-eta]", duration(ms));
    if (ms <= 0) return;
    // duration() rounds to whole seconds: the figure changes when ms next crosses a half second.
    known.leftTimer = setTimeout(() => {
      if (known.card === card && card.isConnected && !card.classList.contains("is-stalled")
          && !card.classList.contains("is-slow") && !state.unreachable) {
        showLeft(card, known, serverNow());
      }
    }, ((ms + 500) % 1000) + 1);
  }
  // Before the browser paints a card drawn again: a live redraw rendered before the last progress
  // the page applied (the request crossed that event: the card's data-seq is older, and so is its
  // last move, data-progress-at) would show the job going backwards until the next event, so that
  // progress is applied again over it, when it is of the status drawn. An action's answer is
  // drawn from the rows after the action: never painted over. Then the countdown goes on from
  // the page's own figure, not the server's as of the last progress.
  document.addEventListener("htmx:afterSwap", (event) => {
    const trigger = event.detail.requestConfig && event.detail.requestConfig.triggeringEvent;
    const liveRedraw = Boolean(trigger) && trigger.type === "jobsite-refresh";
    for (const card of cards()) {
      const known = remember(card);
      const last = known.lastProgress;
      if (liveRedraw && last && last.seq > (parseInt(card.dataset.seq || "0", 10) || 0)
          && last.job.status === card.dataset.status && last.at > (Date.parse(card.dataset.progressAt || "") || 0)) {
        apply(card, last.job, last.at, 0);
        card.dataset.seq = String(last.seq);
      }
      showLeft(card, known, serverNow());
    }
  });

  // The status as the server says it everywhere (a training run's status_label: "stopped", "removed",
  // "generating failed"); a job kind without one says its status, and an event written before runs
  // carried their label says a run stopped on request the same way.
  const statusLabel = (job) => job.status_label
    || (String(job.status).endsWith("_failed") && job.error_type === "CANCELLED" ? "stopped" : job.status);

  // What a card and a following row both show: the job's fields ([data-field]) and its badge.
  function copyFields(root, job) {
    root.querySelectorAll("[data-field]").forEach((el) => {
      const value = job[el.dataset.field];
      if (value !== undefined && value !== null) el.textContent = shown(value);
    });
  }
  const BADGE_OF_LABEL = { stopped: "cancelled", cancelling: "cancelling", removed: "removed" };
  function setBadges(root, label, status) {
    root.querySelectorAll("[data-status-label]").forEach((el) => {
      el.textContent = label;
      el.className = `badge badge-${BADGE_OF_LABEL[label] || status}`;
    });
  }

  // -- Applying a job's state (an event's payload or the JSON API's answer) ------------------
  // The work of `texts` embedded, in chunks: the card's first data-embed-chunks texts are chunks,
  // the rest queries weighing data-embed-query-weight of a chunk each (their mean lengths).
  function embedWork(card, texts) {
    if (typeof texts !== "number") return undefined;
    const chunks = parseInt(card.dataset.embedChunks, 10) || 0;
    const weight = parseFloat(card.dataset.embedQueryWeight);
    return Math.min(texts, chunks) + (Number.isFinite(weight) ? weight : 1) * Math.max(0, texts - chunks);
  }

  function apply(card, job, at, alive) {
    const known = remember(card);
    const before = card.dataset.status;
    copyFields(card, job);

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

    // A training run embedding its texts: long chunks first, then short queries, so the pace is
    // of their weighed length (embedWork), not of texts, which would promise the queries far too long.
    const embedding = job.is_embedding === true && card.dataset.embedChunks !== undefined;
    const tokens = embedding ? embedWork(card, job.texts_embedded) : job[card.dataset.rateField];
    const tokensTotal = embedding ? embedWork(card, job.texts_total) : job[card.dataset.rateTotalField];
    const samples = embedding ? tokens : (typeof done === "number" ? done : 0);
    const samplesLeft = embedding ? tokensTotal - tokens : total - done;
    // A new step of the job (a training run's embedding, then its epochs) counts something else.
    if (typeof tokensTotal === "number" && known.rateTotal !== undefined && tokensTotal !== known.rateTotal) {
      known.points = [];
      known.left = null;
      setText(card, "[data-eta]", "—");
    }
    if (typeof tokensTotal === "number") known.rateTotal = tokensTotal;
    if (typeof tokens === "number" && tokens > 0) {
      const last = known.points[known.points.length - 1];
      if (last && tokens < last[1]) known.points = [];
      // Only points that moved: a poll that finds the same counts would drop its wait from the fit.
      if (!last || (at > last[0] && tokens !== last[1])) known.points.push([at, tokens, samples]);
      while (known.points.length > 2 && at - known.points[0][0] > 15000) known.points.shift();
      if (known.points.length >= 2) {
        const [t0, k0] = known.points[0];
        const [t1, k1] = known.points[known.points.length - 1];
        if (t1 > t0) {
          const rate = ((k1 - k0) * 1000) / (t1 - t0);
          setText(card, "[data-rate]", Math.round(rate).toLocaleString("en-US"));
          const left = typeof tokensTotal === "number" && typeof total === "number" && typeof done === "number"
            ? timeLeft(known.points, tokensTotal - tokens, samplesLeft) : null;
          if (rate > 0 && left !== null) {
            known.left = smoothLeft(known.left, left, at);
            showLeft(card, known, at);
          }
        }
      }
    }

    const heartbeat = Date.parse(job.heartbeat_at || "") || 0;
    // A job its shards run (no worker of its own) is as alive as its most silent running shard,
    // which its heartbeat_at is: another shard's progress says nothing of that one.
    // Events list the shards as `shards`, the JSON API as `shard_list` (its `shards` is the count).
    const shardList = Array.isArray(job.shards) ? job.shards : job.shard_list;
    const byShards = (job.shard_count ?? job.shards) > 1 && Array.isArray(shardList) && shardList.length > 0
      && !job.worker;
    known.alive = byShards ? heartbeat : Math.max(known.alive, heartbeat, alive || 0);

    // An extraction's shards ([data-shard] rows): their counts move with every progress of any of
    // them; a change of a shard's status comes as its own event, which draws the card again.
    if (Array.isArray(shardList)) {
      for (const shard of shardList) {
        const row = card.querySelector(`[data-shard="${shard.index}"]`);
        if (!row || typeof shard.samples_processed !== "number" || row.dataset.shardStatus !== shard.status) continue;
        const percent = shard.total_samples ? Math.min(100, (100 * shard.samples_processed) / shard.total_samples) : 100;
        setText(row, '[data-shard-field="samples_processed"]', shown(shard.samples_processed));
        setText(row, '[data-shard-field="percent"]', String(Math.round(percent * 10) / 10));
        const bar = row.querySelector("[data-shard-bar]");
        if (bar) bar.style.width = `${percent.toFixed(1)}%`;
        if (shard.heartbeat_at) row.dataset.shardHeartbeatAt = shard.heartbeat_at;
      }
    }

    const status = job.status;
    const changed = Boolean(status) && status !== before;
    if (changed) {
      card.dataset.status = status;
      known.moved = Math.max(known.moved, at);
    }
    if (status) {
      const label = job.cancel_requested && isRunning(card, status) ? "cancelling" : statusLabel(job);
      setBadges(card, label, status);
    }
    return changed;
  }

  // -- Rows that follow a job ([data-follow], e.g. a history row) ----------------------------
  // They copy the job's fields from every event and poll; their [data-refresh] buttons read
  // the job's JSON API (data-api-url) and redraw only that row when its status changed.
  const followers = (topic) => Array.from(document.querySelectorAll("[data-follow]"))
    .filter((row) => row.dataset.topic === topic);
  function follow(row, job) {
    copyFields(row, job);
    const changed = Boolean(job.status) && job.status !== row.dataset.status;
    if (job.status) setBadges(row, statusLabel(job), job.status);
    return changed;
  }
  async function refreshRow(row) {
    row.classList.add("is-refreshing");
    try {
      const response = await fetch(row.dataset.apiUrl, { credentials: "same-origin", headers: { Accept: "application/json" } });
      const current = document.getElementById(row.id) || row;
      if (response.status === 404) {  // removed meanwhile: the list itself changed
        redraw(document.getElementById("history"));
        return;
      }
      if (!response.ok) return;
      const job = await response.json();
      // The API names the row's progress text `progress`; events name it `progress_label`.
      const changed = follow(current, { ...job, progress_label: job.progress_label ?? job.progress });
      state.rowRefreshes += 1;
      if (changed && current.dataset.redrawUrl && window.htmx) {
        window.htmx.ajax("GET", current.dataset.redrawUrl, { target: current, swap: "outerHTML" });
      }
    } catch (error) {
      // Offline: the next event or refresh catches up.
    } finally {
      row.classList.remove("is-refreshing");
    }
  }
  document.addEventListener("click", (event) => {
    const button = event.target.closest && event.target.closest("[data-refresh]");
    const row = button && button.closest("[data-follow]");
    if (!row || !row.dataset.apiUrl) return;
    event.preventDefault();
    refreshRow(row);
  });

  // A message as the socket delivers it, e.g. to replay a run's progress into a page by hand.
  state.receive = (message) => onEvent(message);
  const seen = new Set();
  function onEvent(message) {
    if (typeof message.seq !== "number" || message.seq <= state.resumeAfter || seen.has(message.seq)) return;
    seen.add(message.seq);
    state.lastSeq = Math.max(state.lastSeq, message.seq);
    state.events += 1;
    state.lastMessageAt = Date.now();
    if (state.polling) { state.polling = false; showStatus(); }

    const progress = String(message.type || "").endsWith(".progress");
    followers(message.topic).forEach((row) => follow(row, message.payload || {}));
    // Lists of things that are not jobs (the corpora) say which topic redraws them.
    document.querySelectorAll("[data-redraw-on]").forEach((list) => {
      if (list.dataset.redrawOn === message.topic) redraw(list);
    });
    const card = cardFor(message.topic);
    if (!card) {
      redrawRegion();
      redrawHistory();
      return;
    }
    const job = message.payload || {};
    if (message.seq <= (parseInt(card.dataset.seq || "0", 10) || 0)) {
      // An event from before the card was drawn (replayed, or committed late): the card shows its
      // progress or something newer. Any other change is asked of the server, which knows whether
      // it came before or after what the card shows; the event's payload is not drawn over it.
      if (!progress) redraw(card);
      if (!progress && job.status && job.status !== card.dataset.status) redrawHistory();
      return;
    }
    dropContradicted(message.topic, job.status);  // newer than the card, so than its message too
    const at = Date.parse(message.created_at) || serverNow();
    // Only a progress is written by the job's worker, as it works: any other event may come from
    // a person (a Stop, a Cancel) or the watchdog, and says of the worker only its payload's
    // heartbeat_at, not that it is alive now (a stalled job must stay flagged after a Stop).
    // A card drawn while its phase waited for a worker ("Waiting for a worker") learns from
    // the first progress that one holds it now: drawn again, it says what the worker does.
    const claimed = progress && isActive(card) && !isRunning(card);
    apply(card, job, at, progress ? at : 0);
    // A progress shows now: remembered, for a redraw that crosses it. Any other event asks for
    // a redraw, rendered after it: what the server draws then is newer than any progress before.
    remember(card).lastProgress = progress ? { seq: message.seq, job, at } : null;
    if (progress) card.dataset.seq = String(message.seq);  // it shows this event now
    if (!progress || claimed) {
      redraw(card);
      redrawHistory();
    }
    // A job dismissed (from another page, the admin, the API) leaves the jobs needing attention.
    if (String(message.type || "").endsWith(".dismissed")) redrawRegion();
  }

  async function poll(card) {
    const known = remember(card);
    known.polledAt = Date.now();
    const url = card.dataset.apiUrl;
    if (!url) return;
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      setReachable(true);
      if (!response.ok) return;
      const answer = await response.json();
      // The API names the progress text `progress`; events (and the fields drawn) `progress_label`.
      const job = { ...answer, progress_label: answer.progress_label ?? answer.progress };
      state.polls += 1;
      followers(card.dataset.topic).forEach((row) => follow(row, job));
      dropContradicted(card.dataset.topic, job.status);
      const current = cardFor(card.dataset.topic);
      if (!current) return;
      if (apply(current, job, serverNow(), 0)) {
        redraw(current);
        redrawHistory();
      }
    } catch (error) {
      // Offline: the next poll or the socket's replay catches up.
      if (!state.connected) setReachable(false);
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
      const retry = card.querySelector("[data-retry-at]");
      if (retry) {
        // An automatic retry's wait, counted down between redraws (the server drew it once).
        const left = Date.parse(retry.dataset.retryAt) - now;
        retry.textContent = left > 500 ? `Automatic retry in ${duration(left)}` : "Automatic retry starting";
      }
      const known = remember(card);
      let stalled = false;
      if (isRunning(card, status) && known.alive) {
        const age = Math.max(0, now - known.alive);
        setText(card, "[data-heartbeat-age]", String(Math.round(age / 1000)));
        // Heartbeats are written to the row, not pushed: ask the API before calling it a stall.
        if (age > config.stallAfterMs / 2 && Date.now() - known.polledAt > Math.min(5000, config.stallAfterMs / 4)) poll(card);
        stalled = age > config.stallAfterMs && !state.unreachable;
      }
      // Each running shard's heartbeat age counts up, and a silent one is marked stalled, as the
      // server marks it: the row says which host went quiet.
      card.querySelectorAll("[data-shard][data-shard-heartbeat-at]").forEach((row) => {
        const beat = Date.parse(row.dataset.shardHeartbeatAt);
        if (!beat) return;
        const age = Math.max(0, now - beat);
        setText(row, "[data-shard-age]", String(Math.round(age / 1000)));
        const silent = age > config.stallAfterMs && !state.unreachable;
        row.classList.toggle("is-stalled", silent);
        const mark = row.querySelector("[data-shard-stalled]");
        if (mark) mark.hidden = !silent;
      });
      const idle = now - known.moved;
      const slow = !stalled && idle > config.slowAfterMs;
      if (stalled) {
        // Nothing moves: no rate, no time left. The part of the page around the card is drawn
        // again (at once, then every half minute), so that it says whether any worker runs at all.
        setText(card, "[data-rate]", "—");
        setText(card, "[data-eta]", "—");
        if (Date.now() - known.stallRedrawnAt > 30000) {
          known.stallRedrawnAt = Date.now();
          redrawRegion();
        }
      } else if (slow) {
        // No progress past the slow limit: the last pace says nothing of now, and the time left
        // it gave would count down to "0 s" beside "Taking longer than expected".
        setText(card, "[data-rate]", "—");
        setText(card, "[data-eta]", "—");
      } else if (state.unreachable) {
        setText(card, "[data-rate]", "—");  // nothing is known of its pace meanwhile
        setText(card, "[data-eta]", "—");
      } else {
        known.stallRedrawnAt = 0;
        showLeft(card, known, now);
      }
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
    if (waiting.size) redrawWaiting();
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
    const url = `${scheme}//${window.location.host}/ws/events/?after=${state.resumeAfter}&topic=${encodeURIComponent(config.topic)}`;
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
      setReachable(true);
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
      if (message.type === "pong") {
        awaitingPong = 0;
        if (typeof message.seq === "number" && message.seq > state.resumeAfter) {
          state.resumeAfter = message.seq;
          seen.forEach((seq) => { if (seq <= message.seq) seen.delete(seq); });
        }
        return;
      }
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
