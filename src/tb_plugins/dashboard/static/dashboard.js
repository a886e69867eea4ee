// The tb dashboard: polls /api/status and /api/usage and draws the page from them.
//
// Scope and model names come from the ledger, i.e. from whoever called the application, so
// every one of them enters the page as text (textContent, an SVG <title>'s text, a data-*
// attribute) and never as markup: nothing in this file parses HTML. Times are shown in UTC
// and measured against the server's clock ("now" in each answer), not the browser's.
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const DEFAULT_REFRESH = 5; // seconds
  const ACTIONS = ["allow", "clamp", "downgrade", "deny"];

  const page = new URLSearchParams(window.location.search);
  const refresh = readRefresh(page.get("refresh"));
  const usageQuery = new URLSearchParams();
  for (const name of ["since", "until", "bucket", "limit"]) {
    const value = page.get(name);
    if (value !== null && value !== "") usageQuery.set(name, value);
  }
  let unit = "tokens";
  let lastUsage = null;
  let refreshes = 0;

  function readRefresh(text) {
    if (text === null || text.trim() === "") return DEFAULT_REFRESH;
    const n = Number(text);
    if (!Number.isFinite(n) || n < 0) return DEFAULT_REFRESH;
    return n === 0 ? 0 : Math.max(n, 0.5);
  }

  // -- building elements ----------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  function cell(row, text, className) {
    const td = el("td", className, text);
    row.appendChild(td);
    return td;
  }

  // -- formatting (as `tb status` does) -------------------------------------------------------

  const two = (n) => String(n).padStart(2, "0");

  function amount(unitName, value) {
    if (value === null || value === undefined) return "-";
    if (unitName === "usd") {
      return "$" + value.toLocaleString("en-US", { minimumFractionDigits: 4, maximumFractionDigits: 4 });
    }
    return Math.round(value).toLocaleString("en-US");
  }

  function percent(utilization) {
    return utilization === null ? "∞" : Math.round(utilization * 100) + "%";
  }

  function level(utilization) {
    if (utilization === null || utilization >= 1) return "full";
    return utilization >= 0.8 ? "warn" : "ok";
  }

  function utcDay(ts) {
    return new Date(ts * 1000).toISOString().slice(0, 10);
  }

  // 14:20 UTC on the server's day, else 12-09 14:20 UTC; "now" when not after now; "-" for none.
  function clock(ts, now) {
    if (ts === null || ts === undefined) return "-";
    if (ts <= now) return "now";
    const d = new Date(ts * 1000);
    const hm = two(d.getUTCHours()) + ":" + two(d.getUTCMinutes()) + " UTC";
    return utcDay(ts) === utcDay(now) ? hm : two(d.getUTCMonth() + 1) + "-" + two(d.getUTCDate()) + " " + hm;
  }

  function timeOfDay(ts, now, seconds) {
    const d = new Date(ts * 1000);
    let text = two(d.getUTCHours()) + ":" + two(d.getUTCMinutes());
    if (seconds) text += ":" + two(d.getUTCSeconds());
    return utcDay(ts) === utcDay(now) ? text : two(d.getUTCMonth() + 1) + "-" + two(d.getUTCDate()) + " " + text;
  }

  function span(seconds) {
    const s = Math.max(Math.floor(seconds), 0);
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m";
    if (s < 86400) return Math.floor(s / 3600) + "h" + two(Math.floor((s % 3600) / 60)) + "m";
    return Math.floor(s / 86400) + "d" + Math.floor((s % 86400) / 3600) + "h";
  }

  // -- the sections ---------------------------------------------------------------------------

  function drawBudgets(status) {
    const now = status.now;
    const rows = status.budgets.map((b) => {
      const tr = el("tr", "budget");
      tr.dataset.scope = b.scope;
      tr.dataset.unit = b.unit;
      tr.dataset.window = b.window;
      cell(tr, b.scope, "scope name");
      cell(tr, b.budget, "budget-name name");
      const used = cell(tr, null, "used");
      const bar = el("div", "bar");
      const fill = el("div", "fill " + level(b.utilization));
      fill.style.width = (b.utilization === null ? 100 : Math.min(Math.max(b.utilization, 0), 1) * 100) + "%";
      bar.appendChild(fill);
      bar.title = amount(b.unit, b.spent + b.reserved) + " of " + amount(b.unit, b.limit) + " " + b.unit;
      used.appendChild(bar);
      used.appendChild(el("span", "pct", percent(b.utilization)));
      cell(tr, amount(b.unit, b.spent), "num spent");
      cell(tr, amount(b.unit, b.reserved), "num held");
      cell(tr, amount(b.unit, b.remaining), "num left");
      cell(tr, b.resets_at === null ? "never" : "in " + span(b.resets_at - now), "resets");
      const forecast = clock(b.forecast_exhausted_at, now);
      cell(tr, forecast, "forecast" + (forecast === "now" ? " spent" : forecast === "-" ? "" : " due"));
      return tr;
    });
    document.querySelector("#budgets tbody").replaceChildren(...rows);
    document.getElementById("budgets-empty").hidden = rows.length > 0;
    document.getElementById("clock").textContent = "server time " + timeOfDay(now, now, true) + " UTC";
  }

  function drawTotals(usage) {
    const t = usage.totals;
    const tiles = [
      ["requests", amount("requests", t.requests)],
      ["refused", amount("requests", t.denied)],
      ["tokens", amount("tokens", t.tokens)],
      ["USD", amount("usd", t.usd)],
    ].map(([label, value]) => {
      const tile = el("div", "tile");
      tile.dataset.total = label;
      tile.appendChild(el("div", "value", value));
      tile.appendChild(el("div", "label muted", label));
      return tile;
    });
    document.getElementById("totals").replaceChildren(...tiles);
    const until = usage.until === null ? "now" : timeOfDay(usage.until, usage.now, false) + " UTC";
    document.getElementById("period").textContent =
      "from " + timeOfDay(usage.since, usage.now, false) + " UTC to " + until + ", buckets of " + span(usage.bucket);
  }

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (step * power >= value) return step * power;
    }
    return 10 * power;
  }

  function drawChart(usage) {
    const box = document.getElementById("chart");
    // drawn at the size it is shown, so its text is not scaled
    const W = Math.max(480, Math.round(box.clientWidth) || 760), H = 250, L = 64, R = 16, T = 12, B = 28;
    const n = usage.buckets.length;
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
    chart.appendChild(svg("title")).textContent = "spend per bucket, per scope (" + unit + ")";
    const values = usage.series.flatMap((s) => s[unit]);
    const top = niceMax(Math.max(0, ...values));
    const x = (i) => (n === 1 ? (L + W - R) / 2 : L + (i * (W - L - R)) / (n - 1));
    const y = (v) => T + (H - T - B) * (1 - v / top);
    chart.appendChild(svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "plot" }));
    for (const f of [0, 0.5, 1]) {
      chart.appendChild(svg("line", { x1: L, x2: W - R, y1: y(top * f), y2: y(top * f), class: "grid" }));
      const label = svg("text", { x: L - 6, y: y(top * f) + 4, class: "axis", "text-anchor": "end" });
      label.textContent = amount(unit === "usd" ? "usd" : "tokens", top * f);
      chart.appendChild(label);
    }
    const ticks = n === 1 ? [0] : [0, Math.floor((n - 1) / 2), n - 1];
    for (const i of ticks) {
      const label = svg("text", { x: x(i), y: H - 10, class: "axis", "text-anchor": n === 1 ? "middle" : i === 0 ? "start" : i === n - 1 ? "end" : "middle" });
      label.textContent = timeOfDay(usage.buckets[i], usage.now, usage.bucket < 60);
      chart.appendChild(label);
    }
    usage.series.forEach((s, k) => {
      const points = s[unit].map((v, i) => [x(i), y(v)]);
      const d = points.map(([px, py], i) => (i ? "L" : "M") + px.toFixed(1) + "," + py.toFixed(1)).join("");
      // earlier (larger) series are drawn wider, so a line that another covers still shows
      const width = Math.max(1.5, 6 - 0.6 * k);
      const path = svg("path", { d: d, class: "series c" + k, "stroke-width": width });
      path.appendChild(svg("title")).textContent = s.scope;
      chart.appendChild(path);
      s[unit].forEach((v, i) => {
        if (!(v > 0)) return;
        const dot = svg("circle", { cx: points[i][0], cy: points[i][1], r: width / 2 + 1.5, class: "dot c" + k });
        dot.appendChild(svg("title")).textContent =
          s.scope + ": " + amount(unit === "usd" ? "usd" : "tokens", v) + " at " + timeOfDay(usage.buckets[i], usage.now, true) + " UTC";
        chart.appendChild(dot);
      });
    });
    if (!usage.series.length) {
      const empty = svg("text", { x: (L + W - R) / 2, y: H / 2, class: "axis", "text-anchor": "middle" });
      empty.textContent = "no usage in this period";
      chart.appendChild(empty);
    }
    box.replaceChildren(chart);
    const legend = usage.series.map((s, k) => {
      const li = el("li");
      li.dataset.scope = s.scope;
      li.appendChild(el("span", "swatch c" + k));
      li.appendChild(el("span", "name", s.scope));
      const total = s[unit].reduce((a, b) => a + b, 0);
      li.appendChild(el("span", "muted", " " + amount(unit === "usd" ? "usd" : "tokens", total)));
      return li;
    });
    document.getElementById("legend").replaceChildren(...legend);
  }

  function drawTop(id, rows) {
    const out = rows.map((r) => {
      const tr = el("tr");
      tr.dataset.key = r.key;
      cell(tr, r.key, "name");
      cell(tr, amount("requests", r.requests), "num");
      cell(tr, amount("requests", r.denied), "num");
      cell(tr, amount("tokens", r.tokens), "num");
      cell(tr, amount("usd", r.usd), "num");
      return tr;
    });
    if (!out.length) {
      const tr = el("tr");
      const td = cell(tr, "none in this period", "muted");
      td.colSpan = 5;
      out.push(tr);
    }
    document.querySelector("#" + id + " tbody").replaceChildren(...out);
  }

  function drawDecisions(usage) {
    const rows = usage.decisions.map((d) => {
      const tr = el("tr", "decision");
      tr.dataset.action = d.action;
      cell(tr, timeOfDay(d.ts, usage.now, true), "time");
      const action = cell(tr, null, "action");
      action.appendChild(el("span", "badge " + (ACTIONS.includes(d.action) ? d.action : "other"), d.action));
      const model = d.model === d.requested_model ? d.model : d.requested_model + " → " + d.model;
      cell(tr, model, "model name");
      const scopes = cell(tr, d.scopes.filter((s) => s !== "global").join(", "), "scopes name");
      if (d.note) {
        scopes.appendChild(el("div", "note", d.note));
      }
      cell(tr, d.action === "deny" ? "-" : amount("tokens", d.tokens), "num");
      cell(tr, d.action === "deny" ? "-" : amount("usd", d.usd), "num");
      return tr;
    });
    if (!rows.length) {
      const tr = el("tr");
      cell(tr, "no calls in this period", "muted").colSpan = 6;
      rows.push(tr);
    }
    document.querySelector("#decisions tbody").replaceChildren(...rows);
  }

  // -- polling --------------------------------------------------------------------------------

  async function getJSON(path) {
    const response = await fetch(path, { cache: "no-store", headers: { Accept: "application/json" } });
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      throw new Error((body && typeof body.error === "string" && body.error) || path + ": HTTP " + response.status);
    }
    return body;
  }

  function showError(message) {
    const box = document.getElementById("error");
    box.textContent = message;
    box.hidden = false;
  }

  async function tick() {
    try {
      const query = usageQuery.toString();
      const [status, usage] = await Promise.all([
        getJSON("/api/status"),
        getJSON("/api/usage" + (query ? "?" + query : "")),
      ]);
      drawBudgets(status);
      lastUsage = usage;
      drawTotals(usage);
      drawChart(usage);
      drawTop("top-scopes", usage.top.scopes);
      drawTop("top-users", usage.top.users);
      drawDecisions(usage);
      document.getElementById("error").hidden = true;
      refreshes += 1;
      document.body.dataset.refreshes = String(refreshes);
    } catch (e) {
      showError("Cannot update: " + (e && e.message ? e.message : String(e)));
    } finally {
      if (refresh > 0) window.setTimeout(tick, refresh * 1000);
    }
  }

  document.getElementById("refresh").textContent =
    refresh > 0 ? "· refreshes every " + refresh + " s" : "· refresh off";
  window.addEventListener("resize", () => {
    if (lastUsage) drawChart(lastUsage);
  });
  document.getElementById("unit").addEventListener("change", (event) => {
    unit = event.target.value;
    if (lastUsage) drawChart(lastUsage);
  });
  tick();
})();
