// The Sluice dashboard page. It holds no data of its own: it reads the token
// from the URL's fragment (never sent to a server), keeps it for this tab
// only, and streams snapshots from /api/events with the token as a bearer
// header (EventSource cannot send headers, hence fetch with a streamed body).
"use strict";

const TOKEN_KEY = "sluice-dashboard-token";
const RETRY_MS = 2000;

function takeToken() {
  const fromUrl = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromUrl) {
    sessionStorage.setItem(TOKEN_KEY, fromUrl);
    // Out of the address bar, history and screenshots.
    history.replaceState(null, "", location.pathname);
    return fromUrl;
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

const $ = (id) => document.getElementById(id);

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

function count(n) {
  return Number(n || 0).toLocaleString("en-US");
}

function si(n, unit) {
  n = Number(n || 0);
  const steps = [[1e9, "G"], [1e6, "M"], [1e3, "k"]];
  for (const [size, prefix] of steps) {
    if (Math.abs(n) >= size) return (n / size).toFixed(1) + " " + prefix + unit;
  }
  return (n >= 10 || n === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + unit;
}

const rate = (n) => si(n, "/s");
const bytesRate = (n) => si(n, "B/s");

function age(secs) {
  if (secs === null || secs === undefined) return "never";
  if (secs < 1) return "just now";
  if (secs < 90) return Math.round(secs) + " s ago";
  if (secs < 5400) return Math.round(secs / 60) + " min ago";
  return Math.round(secs / 3600) + " h ago";
}

// "2026-11-30T17:35:00.0129Z" -> "2026-11-30 17:35:00" (UTC, as the
// control service stamps it); the full value stays in the title.
function when(rfc3339, timeOnly) {
  const m = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})/.exec(rfc3339 || "");
  if (!m) return esc(rfc3339 || "—");
  return `<span title="${esc(rfc3339)}">${timeOnly ? m[2] : m[1] + " " + m[2]}</span>`;
}

function badge(text) {
  return `<span class="badge b-${esc(String(text).replace(/\s+/g, ""))}">${esc(text)}</span>`;
}

// A number with its raw value attached, for tests and copy-paste.
function metric(name, value, shown) {
  return `<span data-metric="${esc(name)}" data-value="${esc(value)}">${esc(shown)}</span>`;
}

function card(label, name, value, shown, extra) {
  return `<div class="card"><div class="label">${esc(label)}</div>` +
    `<div class="value">${metric(name, value, shown)}</div>` +
    `<div class="extra">${esc(extra || "")}</div></div>`;
}

function renderOverview(s) {
  const o = s.overview;
  const cards = [];
  if (o.nodes !== null) {
    cards.push(card("Nodes connected", "nodes", o.nodesConnected, `${o.nodesConnected} / ${o.nodes}`, `view version ${o.viewVersion}`));
  }
  cards.push(card("Services", "services", o.services, count(o.services), ""));
  cards.push(card("Backends serving", "backends", o.backendsServing, `${o.backendsServing} / ${o.backends}`, ""));
  cards.push(card("Policies", "policies", o.policies, count(o.policies), ""));
  cards.push(card("Packets", "packets-rate", o.rate.packets, rate(o.rate.packets), count(o.totals.packets) + " total"));
  cards.push(card("Throughput", "bytes-rate", o.rate.bytes, bytesRate(o.rate.bytes), si(o.totals.bytes, "B") + " total"));
  cards.push(card("New flows", "flows-rate", o.rate.newFlows, rate(o.rate.newFlows), count(o.totals.newFlows) + " total"));
  cards.push(card("Active connections", "active", o.totals.activeConnections, count(o.totals.activeConnections), ""));
  $("overview").innerHTML = cards.join("");
}

function table(head, rows, empty) {
  if (!rows.length) return `<div class="empty">${esc(empty)}</div>`;
  const th = head.map(([label, cls]) => `<th class="${cls || ""}">${esc(label)}</th>`).join("");
  return `<table><thead><tr>${th}</tr></thead><tbody>${rows.join("")}</tbody></table>`;
}

function renderNodes(s) {
  if (s.nodes === null) {
    $("nodes").innerHTML = `<div class="empty">Hidden: ${esc(s.nodesHidden)}.</div>`;
    return;
  }
  const rows = s.nodes.map((n) => `<tr data-node="${esc(n.name)}">` +
    `<td><b>${esc(n.name)}</b></td><td>${esc(n.zone || "—")}</td>` +
    `<td>${badge(n.health)}</td>` +
    `<td>${n.connected ? "yes" : "no"}</td>` +
    `<td class="num">${n.appliedVersion} / ${n.desiredVersion}</td>` +
    `<td class="num">${metric("lag", n.lag, n.lag)}</td>` +
    `<td>${esc(age(n.lastReportAgeSecs))}</td>` +
    `<td class="num">${rate(n.rate.packets)}</td>` +
    `<td>${when(n.joinedAt)} UTC</td></tr>`);
  $("nodes").innerHTML = table(
    [["Node"], ["Zone"], ["Health"], ["Connected"], ["Applied / desired", "num"], ["Lag", "num"], ["Last report"], ["Packets", "num"], ["Joined"]],
    rows, "No node has joined yet: sluicectl token create.");
}

function share(b) {
  const now = b.shareNow;
  const pct = now !== null ? now : b.shareTotal;
  if (pct === null) return `<span class="share">—</span>`;
  const label = pct.toFixed(1) + " %" + (now === null ? " (total)" : "");
  // The width is set from data-width after rendering: the page's CSP
  // forbids style attributes in markup.
  return `<span class="share"><span class="bar"><i data-width="${pct.toFixed(1)}"></i></span>` +
    `${metric("share", pct, label)}</span>`;
}

function renderServices(s) {
  if (!s.services.length) {
    $("services").innerHTML = `<div class="empty">No service you may see.</div>`;
    return;
  }
  $("services").innerHTML = s.services.map((svc) => {
    const id = `${svc.namespace}/${svc.name}`;
    const rows = svc.backends.map((b) => `<tr data-backend="${esc(b.address)}:${b.port}">` +
      `<td>${esc(b.address)}:${b.port}</td><td>${badge(b.state)}</td>` +
      `<td class="num">${b.weight}</td><td>${share(b)}</td>` +
      `<td class="num">${metric("packets-rate", b.rate.packets, rate(b.rate.packets))}</td>` +
      `<td class="num">${bytesRate(b.rate.bytes)}</td>` +
      `<td class="num">${rate(b.rate.newFlows)}</td>` +
      `<td class="num">${count(b.totals.activeConnections)}</td>` +
      `<td class="num">${metric("flows", b.totals.newFlows, count(b.totals.newFlows))}</td>` +
      `<td class="svc-meta">${esc(b.source)}</td></tr>`);
    return `<div class="svc" data-service="${esc(id)}">` +
      `<div class="svc-head"><span class="svc-name">${esc(id)}</span>` +
      `<span class="svc-meta">${esc(svc.vip)} · ${esc(svc.ports.join(", "))} · ${esc(svc.algorithm)}</span>` +
      `<div class="svc-stats">` +
      `<div><b>${metric("packets-rate", svc.rate.packets, rate(svc.rate.packets))}</b><span class="lbl">packets</span></div>` +
      `<div><b>${metric("bytes-rate", svc.rate.bytes, bytesRate(svc.rate.bytes))}</b><span class="lbl">throughput</span></div>` +
      `<div><b>${metric("flows-rate", svc.rate.newFlows, rate(svc.rate.newFlows))}</b><span class="lbl">new flows</span></div>` +
      `<div><b>${metric("active", svc.totals.activeConnections, count(svc.totals.activeConnections))}</b><span class="lbl">active conns</span></div>` +
      `<div><b>${metric("packets", svc.totals.packets, count(svc.totals.packets))}</b><span class="lbl">packets total</span></div>` +
      `<div><b>${metric("flows", svc.totals.newFlows, count(svc.totals.newFlows))}</b><span class="lbl">flows total</span></div>` +
      `</div></div>` +
      table([["Backend"], ["State"], ["Weight", "num"], ["Share of new flows"], ["Packets", "num"], ["Throughput", "num"], ["New flows", "num"], ["Active", "num"], ["Flows total", "num"], ["Source"]],
        rows, "No backend: no endpoint matches the selector.") +
      `</div>`;
  }).join("");
  for (const bar of $("services").querySelectorAll(".bar > i[data-width]")) {
    bar.style.width = bar.dataset.width + "%";
  }
}

function renderPolicies(s) {
  const rows = s.policies.map((p) => `<tr data-policy="${esc(p.namespace)}/${esc(p.name)}">` +
    `<td><b>${esc(p.namespace)}/${esc(p.name)}</b></td><td>${esc(p.target)}</td>` +
    `<td class="num">${metric("allowed", p.allowed, count(p.allowed))}</td>` +
    `<td class="num">${metric("denied", p.denied, count(p.denied))}</td></tr>`);
  $("policies").innerHTML = table(
    [["Policy"], ["Protects"], ["Allowed flows", "num"], ["Denied flows", "num"]],
    rows, "No network policy you may see.");
}

function renderFlows(s) {
  if (s.flows === null) {
    $("flows").innerHTML = `<div class="empty">Flow events are cluster-wide: they need the permission to list nodes.</div>`;
    return;
  }
  const rows = s.flows.map((f) => `<tr class="flow">` +
    `<td>${when(f.time, true)}</td><td>${esc(f.node)}</td><td>${esc(f.kind)}</td><td>${badge(f.verdict || "—")}</td>` +
    `<td>${esc(f.reason)}</td><td>${esc(f.client)}</td><td>${esc(f.vip)}</td><td>${esc(f.service || "—")}</td>` +
    `<td>${esc(f.backend || "—")}</td><td>${esc(f.protocol)}</td><td>${esc(f.countedAs)}</td></tr>`);
  $("flows").innerHTML = table(
    [["Time (UTC)"], ["Node"], ["Kind"], ["Verdict"], ["Reason"], ["Client"], ["VIP"], ["Service"], ["Backend"], ["Protocol"], ["Counted as"]],
    rows, "No flow event yet (flows appear here as the nodes report them).");
}

function render(s) {
  $("refused").hidden = true;
  $("main").hidden = false;
  const clock = (/T(\d{2}:\d{2}:\d{2})/.exec(s.time) || [])[1] || s.time;
  $("who").textContent = `${s.user}${s.groups.length ? " (" + s.groups.join(", ") + ")" : ""} · updated ${clock} UTC`;
  renderOverview(s);
  renderNodes(s);
  renderServices(s);
  renderPolicies(s);
  renderFlows(s);
  document.body.dataset.updated = s.time;
}

function setLive(state, text) {
  $("live").dataset.state = state;
  $("live-text").textContent = text;
}

function showRefused(status, message) {
  setLive("refused", status === 401 ? "not authenticated" : "not authorized");
  $("refused-title").textContent = `${status} ${status === 401 ? "Not authenticated" : "Not authorized"}`;
  $("refused-message").textContent = message;
  $("refused").hidden = false;
  $("main").hidden = true;
  document.body.dataset.refused = String(status);
}

// One server-sent event block: "event: NAME\ndata: JSON".
function handle(block) {
  let event = "message";
  let data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  if (!data) return true;
  const body = JSON.parse(data);
  if (event === "snapshot") {
    setLive("live", "live");
    render(body);
    return true;
  }
  if (event === "refused") {
    showRefused(body.status, body.error);
    return false;
  }
  return true;
}

async function stream(token) {
  const response = await fetch("/api/events", {
    headers: token ? { Authorization: "Bearer " + token } : {},
    cache: "no-store",
  });
  if (response.status === 401 || response.status === 403) {
    const body = await response.json().catch(() => ({ error: response.statusText }));
    showRefused(response.status, body.error);
    return false;
  }
  if (!response.ok) throw new Error("HTTP " + response.status);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return true;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!handle(block)) return false;
    }
  }
}

async function main() {
  const token = takeToken();
  for (;;) {
    let again = true;
    try {
      again = await stream(token);
    } catch (e) {
      again = true;
    }
    if (!again) return;
    setLive("reconnecting", "reconnecting…");
    await new Promise((r) => setTimeout(r, RETRY_MS));
  }
}

main();
