// Herald live dashboard: an admin signs in, sees the user directory and watches it
// change live from the `users` channel, plus live connection counts from /api/v1/stats.
// Plain ES module on top of the browser client; no build step.

import { Herald } from "/client/herald.js";

const STORE = "herald.dashboard.session";
const METRICS_EVERY_MS = 2000;
const MAX_EVENTS = 60;
const PAGE_SIZE = 100;
const MAX_PAGES = 20;

const $ = (id) => document.getElementById(id);

const state = {
  session: null, // { access, refresh, exp, user }
  users: new Map(), // id -> user
  deleted: new Set(), // ids deleted while the list was loading
  live: new Set(), // ids created or changed by live events while the list was loading
  herald: null,
  metricsTimer: null,
  loading: null,
  refreshing: null, // the refresh in flight, shared by concurrent callers
};

// -- session --------------------------------------------------------------------------------

function decodeExp(jwt) {
  try {
    const payload = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload)).exp ?? 0;
  } catch {
    return 0;
  }
}

function saveSession(pair, user) {
  state.session = {
    access: pair.access_token,
    refresh: pair.refresh_token ?? state.session?.refresh ?? null,
    exp: decodeExp(pair.access_token),
    user: user ?? state.session?.user ?? null,
  };
  sessionStorage.setItem(STORE, JSON.stringify(state.session));
}

function loadSession() {
  try {
    return JSON.parse(sessionStorage.getItem(STORE) ?? "null");
  } catch {
    return null;
  }
}

async function api(path, options = {}) {
  const headers = { ...(options.headers ?? {}) };
  if (options.auth !== false) headers.Authorization = `Bearer ${await accessToken()}`;
  const response = await fetch(path, { ...options, headers });
  const body = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error(body?.error?.message ?? `HTTP ${response.status}`);
    error.status = response.status;
    error.code = body?.error?.code ?? "error";
    throw error;
  }
  return body;
}

/**
 * A valid access token, refreshed shortly before expiry. Refresh tokens are single use
 * (presenting one twice revokes the whole login), so concurrent callers share one
 * refresh.
 */
async function accessToken() {
  const session = state.session;
  if (!session) throw new Error("signed out");
  if (session.exp - Date.now() / 1000 > 60 || !session.refresh) return session.access;
  state.refreshing ??= api("/api/v1/auth/refresh", {
    method: "POST",
    auth: false,
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ refresh_token: session.refresh }),
  })
    .then((pair) => saveSession(pair))
    .finally(() => {
      state.refreshing = null;
    });
  await state.refreshing;
  return state.session.access;
}

async function signIn(event) {
  event.preventDefault();
  const button = $("signin");
  $("login-error").textContent = "";
  button.disabled = true;
  try {
    const form = new URLSearchParams({ username: $("username").value, password: $("password").value });
    const pair = await api("/api/v1/auth/token", {
      method: "POST",
      auth: false,
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
      body: form,
    });
    saveSession(pair, null);
    const me = await api("/api/v1/users/me");
    if (me.role !== "admin") {
      signOut();
      $("login-error").textContent = "This dashboard is for administrators.";
      return;
    }
    saveSession(pair, me);
    start();
  } catch (error) {
    $("login-error").textContent =
      error.status === 401 ? "Wrong username or password." : `Sign-in failed: ${error.message}`;
  } finally {
    button.disabled = false;
  }
}

function signOut() {
  state.herald?.close();
  state.herald = null;
  clearInterval(state.metricsTimer);
  state.session = null;
  state.users.clear();
  sessionStorage.removeItem(STORE);
  $("app").hidden = true;
  $("session").hidden = true;
  $("login").hidden = false;
  $("password").value = "";
}

// -- live connection ------------------------------------------------------------------------

const STATE_TEXT = {
  idle: "offline",
  connecting: "connecting…",
  connected: "live",
  reconnecting: "reconnecting…",
  failed: "disconnected",
  closed: "offline",
};

function start() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("session").hidden = false;
  $("who").textContent = state.session.user?.username ?? "";

  const herald = new Herald({ getToken: accessToken });
  state.herald = herald;
  herald.on("state", (s) => {
    $("status").dataset.state = s;
    $("status-text").textContent = STATE_TEXT[s] ?? s;
  });
  herald.on("connected", ({ node }) => {
    $("node").textContent = node ? `worker ${node}` : "";
  });
  herald.on("recovered", ({ recovered }) => {
    if (!recovered) loadUsers(); // events were lost: refetch the directory
  });
  herald.on("error", (error) => {
    if (error.terminal) {
      addEvent("error", "Live updates stopped", error.detail || error.code);
      if (["unauthorized", "user_disabled", "token_expired"].includes(error.code)) signOut();
    }
  });
  // Load the directory once the hub confirmed the subscription: whatever changes after
  // that arrives as an event, whatever changed before is in the list.
  let loaded = false;
  herald.on("subscribed", ({ channel }) => {
    if (channel === "users" && !loaded) {
      loaded = true;
      loadUsers();
    }
  });
  herald.subscribe("users", onUserEvent);
  pollMetrics();
  state.metricsTimer = setInterval(pollMetrics, METRICS_EVERY_MS);
}

function onUserEvent(msg) {
  const data = msg.data ?? {};
  const kind = msg.event.replace(/^user\./, "");
  if (msg.event === "user.deleted") {
    state.deleted.add(data.id);
    const name = state.users.get(data.id)?.username ?? data.id;
    state.users.delete(data.id);
    removeRow(data.id);
    addEvent(kind, "User deleted", name);
  } else if (data.user) {
    state.users.set(data.user.id, data.user);
    state.live.add(data.user.id);
    upsertRow(data.user, true);
    const detail =
      msg.event === "user.status_changed"
        ? `${data.user.username}: ${data.old} → ${data.new}`
        : msg.event === "user.updated"
          ? `${data.user.username}: ${Object.keys(data.changes ?? {}).join(", ") || "profile"}`
          : data.user.username;
    addEvent(kind, EVENT_TITLES[msg.event] ?? msg.event, detail);
  }
  updateCounts();
}

const EVENT_TITLES = {
  "user.created": "User created",
  "user.updated": "Profile updated",
  "user.status_changed": "Status changed",
};

async function loadUsers() {
  if (state.loading) return state.loading;
  state.loading = (async () => {
    state.deleted.clear();
    state.live.clear();
    const fetched = new Map();
    try {
      for (let page = 1; page <= MAX_PAGES; page++) {
        const body = await api(`/api/v1/users?size=${PAGE_SIZE}&page=${page}&sort=-created_at`);
        for (const user of body.items) fetched.set(user.id, user);
        if (!body.has_next) break;
      }
    } catch (error) {
      addEvent("error", "Could not load users", error.message);
      return;
    }
    // Merge: a live event newer than the page we fetched wins.
    for (const [id, user] of fetched) {
      if (state.deleted.has(id)) continue;
      const known = state.users.get(id);
      if (!known || known.updated_at <= user.updated_at) state.users.set(id, user);
    }
    for (const id of [...state.users.keys()]) {
      if (!fetched.has(id) && !state.live.has(id)) {
        // Gone since (a deletion we missed): keep only users the server still has.
        state.users.delete(id);
      }
    }
    renderAll();
  })().finally(() => {
    state.loading = null;
  });
  return state.loading;
}

// -- rendering ------------------------------------------------------------------------------

const AVATAR_COLOURS = ["#4f46e5", "#0891b2", "#059669", "#d97706", "#db2777", "#7c3aed", "#2563eb"];

function colourFor(text) {
  let h = 0;
  for (const ch of text) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  return AVATAR_COLOURS[h % AVATAR_COLOURS.length];
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function formatDate(iso, withTime = false) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  return withTime
    ? date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" })
    : date.toLocaleDateString(undefined, { dateStyle: "medium" });
}

function buildRow(user) {
  const tr = el("tr");
  tr.dataset.id = user.id;
  tr.dataset.search = [user.username, user.email, user.full_name, user.role, user.status]
    .filter(Boolean)
    .join(" ")
    .toLowerCase();

  const who = el("td");
  const cell = el("div", "user-cell");
  const avatar = el("span", "avatar", (user.full_name || user.username || "?").slice(0, 1).toUpperCase());
  avatar.style.background = colourFor(user.username ?? "");
  const names = el("div");
  names.append(el("div", "user-name", user.username));
  if (user.full_name) names.append(el("div", "user-full", user.full_name));
  cell.append(avatar, names);
  who.append(cell);

  const role = el("td");
  role.append(el("span", `badge ${user.role}`, user.role));
  const status = el("td");
  status.append(el("span", `badge ${user.status}`, user.status));
  const verified = el("td", user.is_verified ? "check" : "muted", user.is_verified ? "✓" : "—");

  const joined = el("td", "muted", formatDate(user.created_at));
  joined.title = formatDate(user.created_at, true);
  const email = el("td", "email", user.email);
  email.title = user.email;
  tr.append(who, email, role, status, verified, joined);
  return tr;
}

function sortedUsers() {
  return [...state.users.values()].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
}

function renderAll() {
  const body = $("user-rows");
  body.replaceChildren(...sortedUsers().map(buildRow));
  applyFilter();
  updateCounts();
}

function upsertRow(user, flash) {
  const body = $("user-rows");
  const row = buildRow(user);
  const existing = body.querySelector(`tr[data-id="${CSS.escape(user.id)}"]`);
  if (existing) {
    existing.replaceWith(row);
  } else {
    // Keep newest first.
    const after = [...body.children].find((tr) => (state.users.get(tr.dataset.id)?.created_at ?? "") < user.created_at);
    body.insertBefore(row, after ?? null);
  }
  if (flash) {
    row.classList.add("flash");
    requestAnimationFrame(() => requestAnimationFrame(() => row.classList.remove("flash")));
  }
  applyFilter();
}

function removeRow(id) {
  const row = $("user-rows").querySelector(`tr[data-id="${CSS.escape(id)}"]`);
  if (!row) return;
  row.classList.add("leaving");
  setTimeout(() => {
    row.remove();
    applyFilter();
  }, 400);
}

function applyFilter() {
  const query = $("filter").value.trim().toLowerCase();
  let shown = 0;
  for (const row of $("user-rows").children) {
    const match = !query || row.dataset.search.includes(query);
    row.hidden = !match;
    if (match && !row.classList.contains("leaving")) shown += 1;
  }
  $("empty").hidden = shown > 0;
}

function updateCounts() {
  $("stat-users").textContent = state.users.size.toLocaleString();
}

function addEvent(kind, title, detail) {
  const list = $("events");
  const item = el("li");
  const time = new Date().toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  item.append(el("span", `kind ${kind}`), el("span", "what", title), el("span", "when", time));
  if (detail) item.append(el("span", "detail", detail));
  list.prepend(item);
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
  $("events-empty").hidden = true;
}

// -- connection counts ----------------------------------------------------------------------

async function pollMetrics() {
  try {
    const stats = await api("/api/v1/stats");
    $("stat-websocket").textContent = stats.connections.websocket.toLocaleString();
    $("stat-sse").textContent = stats.connections.sse.toLocaleString();
    $("stat-subscriptions").textContent = stats.subscriptions.toLocaleString();
    $("stat-published").textContent = stats.published.toLocaleString();
  } catch {
    /* the next poll will tell */
  }
}

// -- boot -----------------------------------------------------------------------------------

$("login-form").addEventListener("submit", signIn);
$("signout").addEventListener("click", signOut);
$("filter").addEventListener("input", applyFilter);

const saved = loadSession();
if (saved?.access && (saved.exp > Date.now() / 1000 + 5 || saved.refresh)) {
  state.session = saved;
  start();
}
