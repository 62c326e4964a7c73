// The SMTP+ web console: one page over the admin JSON API.  Every value
// that came from the server is put into the page with textContent or as an
// attribute value, never parsed as HTML.  The CSRF token lives in this
// script's memory only; a reloaded page asks /console/session for it again.
"use strict";

(() => {
  const PRIORITIES = [
    [1, "1 (very high)"], [2, "2 (high)"], [3, "3 (normal)"], [4, "4 (low)"], [5, "5 (very low)"],
  ];
  const AGGREGATIONS = [
    "day", "week", "month", "year", "subject", "dynamic_subject",
    "sender_email", "sender_name", "sender_email_subject", "user",
  ];
  const MESSAGE_STATUSES = ["queued", "scheduled", "sending", "deferred", "sent", "bounced", "partial", "deleted"];
  const EVENT_TYPES = ["sender_domain", "send_problem", "bounce", "delivery_delay", "account_block"];
  const QUEUE_STATUSES = ["queued", "scheduled", "sending", "deferred"];
  const VIEWS = ["users", "settings", "messages", "queue", "notifications", "statistics"];
  const SVG = "http://www.w3.org/2000/svg";

  const state = { csrf: null, users: [], editing: null, message: null, cursors: {}, tickets: {} };
  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // --- small DOM helpers ---------------------------------------------------

  function el(tag, text, attributes) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
    return node;
  }

  function row(cells) {
    const tr = el("tr");
    for (const cell of cells) {
      const td = el("td");
      if (cell instanceof Node) td.append(cell);
      else td.textContent = cell === null || cell === undefined ? "" : String(cell);
      tr.append(td);
    }
    return tr;
  }

  function fillOptions(select, values, chosen) {
    for (const value of values) {
      const [key, label] = Array.isArray(value) ? value : [value, value.replaceAll("_", " ")];
      const option = el("option", label, { value: String(key) });
      // The default a form's reset() returns to.
      option.defaultSelected = key === chosen;
      select.append(option);
    }
  }

  function say(text) {
    $("status").textContent = text;
  }

  function when(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
  }

  function list(items) {
    return (items || []).join("; ");
  }

  async function copy(text, what) {
    try {
      await navigator.clipboard.writeText(text);
      say(`${what} copied to the clipboard.`);
    } catch {
      say(`Copying is not allowed here: select the ${what.toLowerCase()} and copy it by hand.`);
    }
  }

  // --- the API ---------------------------------------------------------------

  async function call(method, path, body) {
    const headers = { Accept: "application/json" };
    if (method !== "GET") headers["X-CSRF-Token"] = state.csrf || "";
    const init = { method, headers, credentials: "same-origin" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (response.status === 401 && path !== "/console/session") {
      showSignIn("Your session has ended: sign in again.");
      throw new ApiError(401, "not signed in");
    }
    if (response.status === 204) return null;
    const type = response.headers.get("Content-Type") || "";
    const data = type.startsWith("application/json") ? await response.json() : await response.text();
    if (!response.ok) {
      const message = data && data.error ? data.error.message : `HTTP ${response.status}`;
      throw new ApiError(response.status, message);
    }
    return data;
  }

  function query(path, params) {
    const search = new URLSearchParams();
    for (const [name, value] of Object.entries(params)) if (value) search.set(name, value);
    const text = search.toString();
    return text ? `${path}?${text}` : path;
  }

  // The answer of the latest request of this kind, or null when a newer one
  // was sent meanwhile: a slow answer must not overwrite a newer search.
  async function latest(kind, request) {
    const ticket = (state.tickets[kind] || 0) + 1;
    state.tickets[kind] = ticket;
    const answer = await request;
    return state.tickets[kind] === ticket ? answer : null;
  }

  // Runs an action, reporting its failure in the status line.
  function guarded(action) {
    return async (event) => {
      if (event) event.preventDefault();
      try {
        await action(event);
      } catch (error) {
        if (!(error instanceof ApiError && error.status === 401)) say(`Error: ${error.message}`);
      }
    };
  }

  // --- sign-in and navigation --------------------------------------------------

  function showSignIn(message) {
    state.csrf = null;
    for (const name of VIEWS) $(`view-${name}`).hidden = true;
    $("nav").hidden = true;
    $("sign-out").hidden = true;
    $("view-sign-in").hidden = false;
    $("sign-in-error").textContent = message || "";
    $("sign-in-token").focus();
  }

  function signedIn(csrf) {
    state.csrf = csrf;
    $("view-sign-in").hidden = true;
    $("nav").hidden = false;
    $("sign-out").hidden = false;
    route();
  }

  async function signIn(event) {
    event.preventDefault();
    const token = $("sign-in-token").value;
    const response = await fetch("/console/session", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      credentials: "same-origin",
      body: JSON.stringify({ token }),
    });
    $("sign-in-token").value = "";
    if (response.status !== 201) {
      $("sign-in-error").textContent = "Wrong admin token.";
      $("sign-in-token").focus();
      return;
    }
    signedIn((await response.json()).csrf_token);
  }

  async function signOut() {
    await call("DELETE", "/console/session");
    say("Signed out.");
    showSignIn();
  }

  // moveFocus: a page changed by the navigation takes the focus to its
  // heading, so that a screen reader announces the new page.
  function route(moveFocus) {
    if (!state.csrf) return;
    let name = location.hash.slice(1);
    if (!VIEWS.includes(name)) name = "users";
    for (const other of VIEWS) $(`view-${other}`).hidden = other !== name;
    for (const link of document.querySelectorAll("#nav a")) {
      if (link.getAttribute("href") === `#${name}`) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    document.title = `${$(`${name}-title`).textContent} · SMTP+ console`;
    if (moveFocus === true) $(`${name}-title`).focus();
    say("");
    LOADERS[name]().catch((error) => {
      if (!(error instanceof ApiError && error.status === 401)) say(`Error: ${error.message}`);
    });
  }

  // --- users ---------------------------------------------------------------------

  async function loadUsers() {
    const answer = await latest("users", call("GET", "/api/v1/users"));
    if (!answer) return;
    state.users = answer.users;
    renderUsers();
  }

  function renderUsers() {
    const needle = $("user-filter").value.trim().toLowerCase();
    const wanted = $("user-state").value;
    const body = $("users-table").tBodies[0];
    body.replaceChildren();
    for (const user of state.users) {
      if (wanted === "enabled" && !user.enabled) continue;
      if (wanted === "disabled" && user.enabled) continue;
      const text = [user.username, user.notes, ...user.authorized_domains, ...user.authorized_senders].join(" ");
      if (needle && !text.toLowerCase().includes(needle)) continue;
      const edit = el("button", "Edit", { type: "button", "aria-label": `Edit ${user.username}` });
      edit.addEventListener("click", () => startEdit(user.username));
      body.append(row([
        user.username, (user.enabled ? "enabled" : "disabled") + (user.sandbox ? ", sandbox" : ""), user.priority,
        list(user.authorized_domains), list(user.authorized_senders), user.notes, edit,
      ]));
    }
    if (!body.rows.length) body.append(row([state.users.length ? "No user matches." : "No users yet."]));
  }

  function showPassword(username, password) {
    $("password-user").textContent = username;
    $("password-value").textContent = password;
    $("password-panel").hidden = false;
    $("password-copy").focus();
  }

  function hidePassword() {
    $("password-value").textContent = "";
    $("password-panel").hidden = true;
  }

  async function createUser() {
    const fields = {
      priority: Number($("new-priority").value),
      authorized_domains: $("new-domains").value,
      authorized_senders: $("new-senders").value,
      notes: $("new-notes").value,
      aggregation: $("new-aggregation").value,
      priority_budget: Number($("new-budget").value || 0),
      sandbox: $("new-sandbox").checked,
    };
    const username = $("new-username").value.trim();
    if (username) fields.username = username;
    const user = await call("POST", "/api/v1/users", fields);
    $("create-user-form").reset();
    say(`User ${user.username} created.`);
    showPassword(user.username, user.password);
    await loadUsers();
  }

  function startEdit(username) {
    const user = state.users.find((u) => u.username === username);
    if (!user) return;
    state.editing = username;
    $("edit-title").textContent = `Edit user ${username}`;
    $("edit-priority").value = String(user.priority);
    $("edit-domains").value = list(user.authorized_domains);
    $("edit-senders").value = list(user.authorized_senders);
    $("edit-aggregation").value = user.aggregation;
    $("edit-notes").value = user.notes;
    $("edit-enabled").checked = user.enabled;
    $("edit-budget").value = String(user.priority_budget);
    $("edit-sandbox").checked = user.sandbox;
    $("edit-user-form").hidden = false;
    $("edit-priority").focus();
  }

  function closeEdit() {
    state.editing = null;
    $("edit-user-form").hidden = true;
  }

  function editPath() {
    return `/api/v1/users/${encodeURIComponent(state.editing)}`;
  }

  async function saveUser() {
    const user = await call("PATCH", editPath(), {
      priority: Number($("edit-priority").value),
      authorized_domains: $("edit-domains").value,
      authorized_senders: $("edit-senders").value,
      aggregation: $("edit-aggregation").value,
      notes: $("edit-notes").value,
      enabled: $("edit-enabled").checked,
      priority_budget: Number($("edit-budget").value || 0),
      sandbox: $("edit-sandbox").checked,
    });
    say(`User ${user.username} saved.`);
    closeEdit();
    await loadUsers();
  }

  async function regeneratePassword() {
    const username = state.editing;
    if (!confirm(`Regenerate the password of ${username}? The current one stops working at once.`)) return;
    const result = await call("POST", `${editPath()}/password`);
    closeEdit();
    showPassword(result.username, result.password);
    say(`New password for ${result.username}.`);
  }

  async function deleteUser() {
    const username = state.editing;
    if (!confirm(`Delete the user ${username}? It can no longer log in.`)) return;
    await call("DELETE", editPath());
    closeEdit();
    say(`User ${username} deleted.`);
    await loadUsers();
  }

  // --- client settings ---------------------------------------------------------

  async function loadSettings() {
    const settings = await call("GET", "/api/v1/settings");
    const ports = settings.listening_ports || [];
    const tlsPorts = settings.listening_tls_ports || [];
    const submission = ports.includes(587) ? 587 : ports[0];
    const implicit = tlsPorts.includes(465) ? 465 : tlsPorts[0];
    const entries = [
      ["SMTP server (host)", settings.hostname],
      ["Port with STARTTLS", submission === undefined ? "none listening" : String(submission)],
      ["All STARTTLS ports", ports.join(", ") || "none"],
      ["Port with implicit TLS (SSL/TLS)", implicit === undefined ? "none configured" : String(implicit)],
      ["Encryption", settings.encryption],
      ["Authentication", (settings.auth_mechanisms || []).join(", ")],
      ["Username and password", "those of an SMTP user (Users page)"],
    ];
    const dl = $("settings-list");
    dl.replaceChildren();
    for (const [term, value] of entries) dl.append(el("dt", term), el("dd", value));
    const lines = [
      `SMTP server: ${settings.hostname}`,
      submission === undefined ? null : `Port: ${submission} (encryption: STARTTLS)`,
      implicit === undefined ? null : `Or port: ${implicit} (encryption: SSL/TLS)`,
      `Authentication: ${(settings.auth_mechanisms || []).join(" or ")}`,
      "Username: <the SMTP user's name>",
      "Password: <its password>",
    ];
    $("settings-text").textContent = lines.filter((line) => line !== null).join("\n");
  }

  // --- messages --------------------------------------------------------------------

  function messageFilters() {
    return {
      user: $("messages-user").value.trim(),
      status: $("messages-status").value,
      recipient: $("messages-recipient").value.trim(),
    };
  }

  async function loadMessages(more) {
    const body = $("messages-table").tBodies[0];
    const params = { ...messageFilters(), limit: "50" };
    if (more) params.cursor = state.cursors.messages;
    const page = await latest("messages", call("GET", query("/api/v1/messages", params)));
    if (!page) return;
    if (!more) body.replaceChildren();
    for (const message of page.messages) {
      const open = el("button", message.id, { type: "button", "aria-label": `Details of message ${message.id}` });
      open.addEventListener("click", guarded(() => showMessage(message.id)));
      body.append(row([
        when(message.created_at), open, message.user, message.header_from || message.mail_from,
        message.subject, message.priority, message.status,
      ]));
    }
    if (!body.rows.length) body.append(row(["No messages."]));
    state.cursors.messages = page.next_cursor;
    $("messages-more").hidden = !page.next_cursor;
  }

  function renderMessage(message) {
    state.message = message.id;
    $("message-title").textContent = `Message ${message.id}`;
    const fields = [
      ["Status", message.status], ["User", message.user], ["Envelope sender", message.mail_from],
      ["From", message.header_from], ["Subject", message.subject], ["Priority", message.priority],
      ["Campaign", message.campaign_code], ["Received", when(message.created_at)],
      ["Updated", when(message.updated_at)], ["Next attempt", when(message.next_attempt_at)],
    ];
    const dl = $("message-fields");
    dl.replaceChildren();
    for (const [term, value] of fields) {
      if (value !== null && value !== undefined && value !== "") dl.append(el("dt", term), el("dd", value));
    }
    const body = $("message-recipients").tBodies[0];
    body.replaceChildren();
    for (const r of message.recipients || []) body.append(row([r.address, r.status, r.attempts, r.last_response]));
    $("message-detail").hidden = false;
  }

  async function showMessage(id) {
    renderMessage(await call("GET", `/api/v1/messages/${encodeURIComponent(id)}`));
    $("message-retry").focus();
  }

  async function messageAction(method, suffix, question, done) {
    const id = state.message;
    if (question && !confirm(question(id))) return;
    const message = await call(method, `/api/v1/messages/${encodeURIComponent(id)}${suffix}`);
    renderMessage(message);
    say(done(id));
    await loadMessages(false);
  }

  // --- queue -----------------------------------------------------------------------

  // The queue counts are the smtpplus_queue_messages gauge of /metrics.
  function queueCounts(text) {
    const counts = {};
    const pattern = /^smtpplus_queue_messages\{([^}]*)\}\s+([0-9.eE+-]+)/;
    for (const line of text.split("\n")) {
      const match = pattern.exec(line);
      if (!match) continue;
      const labels = Object.fromEntries(
        [...match[1].matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1], m[2]]),
      );
      counts[`${labels.priority}/${labels.status}`] = Math.round(Number(match[2]));
    }
    return counts;
  }

  async function loadQueue() {
    const counts = queueCounts(await call("GET", "/metrics"));
    const get = (priority, status) => counts[`${priority}/${status}`] || 0;
    const head = $("queue-table").tHead.rows[0];
    head.replaceChildren(el("th", "Priority", { scope: "col" }));
    for (const status of QUEUE_STATUSES) head.append(el("th", status, { scope: "col" }));
    head.append(el("th", "total", { scope: "col" }));
    const body = $("queue-table").tBodies[0];
    body.replaceChildren();
    for (const [priority, label] of PRIORITIES) {
      const cells = QUEUE_STATUSES.map((status) => get(priority, status));
      const tr = row([...cells, cells.reduce((a, b) => a + b, 0)]);
      tr.prepend(el("th", label, { scope: "row" }));
      body.append(tr);
    }
    const urgent = get(1, "queued") + get(1, "sending");
    let waiting = 0;
    for (const priority of [2, 3, 4, 5]) waiting += get(priority, "queued") + get(priority, "deferred");
    $("queue-summary").textContent = urgent && waiting
      ? `Bulk is paused: ${waiting} message(s) of priority 2 to 5 wait behind ${urgent} of priority 1.`
      : `Nothing waits behind priority 1. ${waiting} message(s) of priority 2 to 5 are waiting.`;
  }

  // --- notifications -----------------------------------------------------------------

  async function loadNotifications(more) {
    const body = $("notifications-table").tBodies[0];
    const params = { type: $("notifications-type").value, user: $("notifications-user").value.trim(), limit: "50" };
    if (more) params.cursor = state.cursors.notifications;
    const page = await latest("notifications", call("GET", query("/api/v1/notifications", params)));
    if (!page) return;
    if (!more) body.replaceChildren();
    for (const event of page.notifications) {
      body.append(row([when(event.created_at), event.type.replaceAll("_", " "), event.user, event.message_id, event.detail]));
    }
    if (!body.rows.length) body.append(row(["No notifications."]));
    state.cursors.notifications = page.next_cursor;
    $("notifications-more").hidden = !page.next_cursor;
  }

  // --- statistics ----------------------------------------------------------------------

  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // One bar per group: its height the messages, its dark part the recipients sent.
  function drawChart(result) {
    const groups = result.groups;
    const box = $("statistics-chart");
    box.replaceChildren();
    if (!groups.length) {
      box.append(el("p", "No messages counted yet."));
      return;
    }
    // Drawn at the box's own width (within bounds), so the labels keep their size on a phone.
    const width = Math.round(Math.min(960, Math.max(300, box.clientWidth || 640)));
    const height = 220;
    const top = 16;
    const bottom = 40;
    const left = 36;
    const slot = (width - left) / groups.length;
    const highest = Math.max(1, ...groups.map((g) => Math.max(g.messages, g.sent)));
    const scale = (height - top - bottom) / highest;
    const chart = svg("svg", {
      viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": "statistics-chart-title", class: "chart",
    });
    chart.append(svg("title", { id: "statistics-chart-title" },
      `Bar chart by ${result.policy}: ` + groups.map((g) => `${g.key || "(none)"} ${g.messages} messages`).join(", ")));
    chart.append(svg("line", { x1: left, y1: height - bottom, x2: width, y2: height - bottom, class: "axis" }));
    chart.append(svg("text", { x: left - 6, y: top + 4, "text-anchor": "end", class: "tick" }, String(highest)));
    chart.append(svg("text", { x: left - 6, y: height - bottom, "text-anchor": "end", class: "tick" }, "0"));
    groups.forEach((group, index) => {
      const barWidth = Math.min(64, Math.max(2, slot * 0.7));
      const x = left + index * slot + (slot - barWidth) / 2;
      const barHeight = group.messages * scale;
      const sentHeight = Math.min(group.sent, group.messages) * scale;
      const bar = svg("rect", {
        x, y: height - bottom - barHeight, width: barWidth, height: barHeight, class: "bar", "data-key": group.key,
      });
      bar.append(svg("title", {}, `${group.key || "(none)"}: ${group.messages} messages, ${group.sent} sent`));
      chart.append(bar);
      chart.append(svg("rect", {
        x, y: height - bottom - sentHeight, width: barWidth, height: sentHeight, class: "sent",
      }));
      if (groups.length <= 14) {
        chart.append(svg("text", {
          x: x + barWidth / 2, y: height - bottom - barHeight - 4, "text-anchor": "middle", class: "value",
        }, String(group.messages)));
      }
      const label = group.key.length > 12 ? `${group.key.slice(0, 11)}…` : group.key;
      chart.append(svg("text", {
        x: x + barWidth / 2, y: height - bottom + 16, "text-anchor": "middle", class: "label",
      }, groups.length > 14 && index % Math.ceil(groups.length / 14) ? "" : label));
    });
    box.append(chart);
  }

  async function loadStatistics() {
    const result = await latest("statistics", call("GET", query("/api/v1/stats", {
      policy: $("statistics-policy").value, user: $("statistics-user").value.trim(),
    })));
    if (!result) return;
    drawChart(result);
    const body = $("statistics-table").tBodies[0];
    body.replaceChildren();
    for (const g of result.groups) {
      const tr = row([g.messages, g.recipients, g.sent, g.deferred, g.bounced, g.rejected]);
      tr.prepend(el("th", g.key === "" ? "(none)" : g.key, { scope: "row" }));
      body.append(tr);
    }
    $("statistics-table").caption.textContent = `Statistics by ${result.policy.replaceAll("_", " ")}`;
  }

  const LOADERS = {
    users: loadUsers,
    settings: loadSettings,
    messages: () => loadMessages(false),
    queue: loadQueue,
    notifications: () => loadNotifications(false),
    statistics: loadStatistics,
  };

  // --- start ---------------------------------------------------------------------------

  function wire() {
    for (const select of document.querySelectorAll("select.priority")) fillOptions(select, PRIORITIES, 3);
    for (const select of document.querySelectorAll("select.aggregation")) fillOptions(select, AGGREGATIONS);
    fillOptions($("messages-status"), MESSAGE_STATUSES);
    fillOptions($("notifications-type"), EVENT_TYPES);

    $("sign-in-form").addEventListener("submit", guarded(signIn));
    $("sign-out").addEventListener("click", guarded(signOut));
    $("create-user-form").addEventListener("submit", guarded(createUser));
    $("edit-user-form").addEventListener("submit", guarded(saveUser));
    $("edit-password").addEventListener("click", guarded(regeneratePassword));
    $("edit-delete").addEventListener("click", guarded(deleteUser));
    $("edit-close").addEventListener("click", closeEdit);
    $("password-copy").addEventListener("click", () => copy($("password-value").textContent, "Password"));
    $("password-hide").addEventListener("click", hidePassword);
    $("user-filter").addEventListener("input", renderUsers);
    $("user-state").addEventListener("change", renderUsers);
    $("settings-copy").addEventListener("click", () => copy($("settings-text").textContent, "Settings"));
    $("messages-form").addEventListener("submit", guarded(() => loadMessages(false)));
    $("messages-more").addEventListener("click", guarded(() => loadMessages(true)));
    $("message-retry").addEventListener("click", guarded(() => messageAction(
      "POST", "/retry", null, (id) => `Message ${id} will be tried now.`)));
    $("message-delete").addEventListener("click", guarded(() => messageAction(
      "DELETE", "", (id) => `Delete message ${id}? It will not be delivered.`, (id) => `Message ${id} deleted.`)));
    $("message-close").addEventListener("click", () => { $("message-detail").hidden = true; });
    $("queue-refresh").addEventListener("click", guarded(loadQueue));
    $("notifications-form").addEventListener("submit", guarded(() => loadNotifications(false)));
    $("notifications-more").addEventListener("click", guarded(() => loadNotifications(true)));
    $("statistics-form").addEventListener("submit", guarded(loadStatistics));
    window.addEventListener("hashchange", () => route(true));
  }

  async function start() {
    wire();
    const response = await fetch("/console/session", { credentials: "same-origin" });
    if (response.ok) signedIn((await response.json()).csrf_token);
    else showSignIn();
  }

  document.addEventListener("DOMContentLoaded", () => {
    start().catch((error) => showSignIn(`The console could not start: ${error.message}`));
  });
})();
