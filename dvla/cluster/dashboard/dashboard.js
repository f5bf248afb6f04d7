// dvla's live dashboard: polls /status and draws the run with inline SVG.
//
// Plain script, no build step and no third-party code: the page must work on an offline
// cluster and be readable by whoever debugs it there. /status only carries running
// totals (busy seconds per lane, env steps), so the per-interval pictures are made here
// from the differences between consecutive snapshots, kept for the last five minutes.
// Every value is written with textContent or an SVG attribute, never as HTML, so a
// worker name or stop reason is always shown as text.
"use strict";

(() => {
  const POLL_MS = 1000; // one snapshot a second: cheap for the coordinator, smooth here
  const FETCH_TIMEOUT_MS = 3000; // a hung request must not stop the polling loop
  const MAX_BACKOFF_MS = 5000; // while disconnected, retry at most this far apart
  const WINDOW_S = 300; // how much history the tab keeps and draws
  const MIN_SPAN_S = 10; // a fresh page still gets a readable time axis
  const LANES = ["sample", "infer", "learn", "sync"];
  const SVG_NS = "http://www.w3.org/2000/svg";
  const LANE_W = 1000; // viewBox width of the lane tracks and charts
  const CHART_H = 200; // viewBox height of the charts

  /** Snapshots in the window: {t, busy: {lane: busy_s}, steps, success}. */
  let history = [];
  let runName = null;
  let polls = 0;
  let failures = 0;

  const $ = (id) => document.getElementById(id);

  /** A finite number, or null for anything else (a missing or malformed field). */
  function num(v) {
    return typeof v === "number" && Number.isFinite(v) ? v : null;
  }

  function obj(v) {
    return v !== null && typeof v === "object" && !Array.isArray(v) ? v : {};
  }

  function fmtInt(v) {
    return v === null ? "–" : Math.round(v).toLocaleString("en-US");
  }

  function fmtNum(v, digits) {
    return v === null ? "–" : v.toFixed(digits);
  }

  function fmtDuration(s) {
    if (s === null) return "–";
    const total = Math.max(0, Math.floor(s));
    const h = Math.floor(total / 3600);
    const m = Math.floor((total % 3600) / 60);
    const sec = total % 60;
    const mm = String(m).padStart(2, "0");
    const ss = String(sec).padStart(2, "0");
    return h > 0 ? `${h}:${mm}:${ss}` : `${m}:${ss}`;
  }

  function setValue(id, value, text) {
    const el = $(id);
    el.dataset.value = value === null || value === undefined ? "" : String(value);
    el.textContent = text;
  }

  function svg(tag, attrs) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    return el;
  }

  // ------------------------------------------------------------------- polling

  async function poll() {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    try {
      const r = await fetch("status", { // relative: works under a proxy prefix
        signal: ctl.signal,
        cache: "no-store",
        headers: { Accept: "application/json" },
      });
      let body = null;
      try {
        body = await r.json(); // under the same abort signal as the request
      } catch (err) {
        if (r.ok) throw err;
      }
      if (!r.ok) {
        const why = body && typeof body.error === "string" ? `: ${body.error}` : "";
        throw new Error(`HTTP ${r.status}${why}`);
      }
      failures = 0;
      polls += 1;
      document.body.dataset.polls = String(polls);
      const st = obj(body); // a snapshot is an object; anything else draws as empty
      ingest(st);
      render(st);
      setConnection("live", `live · updated ${new Date().toLocaleTimeString()}`);
    } catch (err) {
      failures += 1;
      const why = err && err.name === "AbortError" ? "no answer in time" : String(err.message || err);
      // Keep the last picture: after a run ends it is what the operator wants to see.
      setConnection("disconnected", `disconnected (${why}) · showing the last picture`);
    } finally {
      clearTimeout(timer);
      const delay = failures ? Math.min(POLL_MS * 2 ** (failures - 1), MAX_BACKOFF_MS) : POLL_MS;
      setTimeout(poll, delay);
    }
  }

  function setConnection(state, text) {
    document.body.dataset.connection = state;
    $("connection").textContent = text;
  }

  /** Add a snapshot to the window; a new run or a restarted coordinator starts afresh. */
  function ingest(st) {
    const name = typeof st.name === "string" ? st.name : "";
    if (runName !== name) history = [];
    runName = name;
    const t = num(st.uptime_s);
    if (t === null) return;
    const prev = history.length ? history[history.length - 1] : null;
    if (prev && t < prev.t) history = []; // uptime went back: a restarted coordinator
    else if (prev && t === prev.t) return; // the same instant twice
    const busy = {};
    for (const [lane, s] of Object.entries(obj(st.lanes))) busy[lane] = num(obj(s).busy_s);
    history.push({
      t,
      busy,
      steps: num(obj(st.throughput).env_steps),
      success: num(st.success_rate),
    });
    while (history.length > 2 && history[1].t < t - WINDOW_S) history.shift();
  }

  /** Per-interval values between consecutive snapshots: [{t0, t1, value}]. */
  function intervals(pick) {
    const out = [];
    for (let i = 1; i < history.length; i++) {
      const a = history[i - 1];
      const b = history[i];
      const va = pick(a);
      const vb = pick(b);
      const dt = b.t - a.t;
      if (va === null || vb === null || !(dt > 0)) continue;
      out.push({ t0: a.t, t1: b.t, value: Math.max(0, (vb - va) / dt) });
    }
    return out;
  }

  // ----------------------------------------------------------------- rendering

  function render(st) {
    renderHeader(st);
    const end = history.length ? history[history.length - 1].t : 0;
    const first = history.length ? history[0].t : 0;
    const span = Math.min(WINDOW_S, Math.max(MIN_SPAN_S, end - first));
    const start = end - span;
    renderLanes(st, start, span);
    renderCharts(start, span);
    renderWorkers(st);
    renderAccounting(st);
    $("axis-start").textContent = `−${fmtDuration(span)}`;
    $("axis-end").textContent = `now (uptime ${fmtDuration(end)})`;
  }

  function renderHeader(st) {
    const state = typeof st.state === "string" ? st.state : "unknown";
    $("run-name").textContent = runName || "dvla";
    const badge = $("state");
    badge.dataset.value = state;
    const reason = typeof st.stop_reason === "string" && st.stop_reason !== "running" ? st.stop_reason : "";
    badge.textContent = reason && state !== "running" ? `${state}: ${reason}` : state;
    const it = num(st.iteration);
    setValue("iteration", it, fmtInt(it));
    const version = num(st.policy_version);
    setValue("policy-version", version, fmtInt(version));
    const up = num(st.uptime_s);
    setValue("uptime", up, fmtDuration(up));
    const tp = obj(st.throughput);
    const steps = num(tp.env_steps);
    setValue("env-steps", steps, fmtInt(steps));
    const rates = intervals((h) => h.steps);
    const recent = rates.length ? rates[rates.length - 1].value : num(tp.env_steps_per_s);
    setValue("steps-per-s", recent, fmtInt(recent));
    $("steps-per-s").title = `average over the run: ${fmtInt(num(tp.env_steps_per_s))}`;
    const success = num(st.success_rate);
    setValue("success-rate", success, fmtNum(success, 3));
    const batch = num(obj(st.infer).mean_batch) ?? num(st.infer_mean_batch);
    setValue("infer-batch", batch, fmtNum(batch, 1));
    const ckpt = num(obj(st.checkpoint).last_iteration); // -1 until the first one
    const saved = ckpt !== null && ckpt >= 0;
    setValue("checkpoint", saved ? ckpt : null, saved ? `iteration ${fmtInt(ckpt)}` : "none yet");
    document.title = `${runName || "dvla"} · ${state} · iteration ${fmtInt(it)}`;
  }

  function laneRow(name) {
    const existing = document.querySelector(`.lane[data-lane="${CSS.escape(name)}"]`);
    if (existing) return existing;
    // A lane this page does not know yet (a newer dvla): draw it like the others.
    const row = document.createElement("div");
    row.className = "lane";
    row.dataset.lane = name;
    const label = document.createElement("span");
    label.className = "lane-name";
    label.textContent = name;
    const track = svg("svg", { class: "track", viewBox: `0 0 ${LANE_W} 100`, preserveAspectRatio: "none" });
    const share = document.createElement("span");
    share.className = "lane-share";
    row.append(label, track, share);
    $("lanes").append(row);
    return row;
  }

  function renderLanes(st, start, span) {
    const lanes = obj(st.lanes);
    const names = [...LANES, ...Object.keys(lanes).filter((n) => !LANES.includes(n))];
    const x = (t) => ((t - start) / span) * LANE_W;
    for (const name of names) {
      const row = laneRow(name);
      const track = row.querySelector("svg");
      const parts = intervals((h) => (name in h.busy ? h.busy[name] : null));
      const shapes = gridLines(start, span, 100);
      for (const p of parts) {
        if (p.t1 <= start) continue;
        const x0 = Math.max(0, x(p.t0));
        // Shaded by the busy share; a lane summed over processes can pass 1.
        const rect = svg("rect", {
          class: "busy",
          x: x0.toFixed(2),
          y: 0,
          width: Math.max(0.5, x(p.t1) - x0).toFixed(2),
          height: 100,
          "fill-opacity": Math.min(1, p.value).toFixed(3),
        });
        const title = svg("title", {});
        title.textContent = `${name}: busy ${(100 * p.value).toFixed(0)}% of ${(p.t1 - p.t0).toFixed(1)} s`;
        rect.append(title);
        shapes.push(rect);
      }
      track.replaceChildren(...shapes);
      const last = parts.length ? parts[parts.length - 1].value : null;
      const whole = num(obj(lanes[name]).share);
      row.dataset.samples = String(parts.length);
      row.dataset.share = last === null ? "" : last.toFixed(3);
      const pct = (v) => (v === null ? "–" : `${Math.round(100 * v)}%`);
      row.querySelector(".lane-share").textContent = `${pct(last)} (run ${pct(whole)})`;
    }
  }

  /** Vertical lines every "nice" number of seconds, counted back from now. */
  function gridLines(start, span, height) {
    const step = [5, 10, 15, 30, 60, 120].find((s) => span / s <= 10) || 300;
    const lines = [];
    const end = start + span;
    for (let t = end - step; t > start; t -= step) {
      const xv = (((t - start) / span) * LANE_W).toFixed(2);
      lines.push(svg("line", { class: "grid", x1: xv, x2: xv, y1: 0, y2: height, "vector-effect": "non-scaling-stroke" }));
    }
    return lines;
  }

  function renderCharts(start, span) {
    const rates = intervals((h) => h.steps).map((p) => ({ t: p.t1, v: p.value }));
    const peak = rates.reduce((m, p) => Math.max(m, p.v), 0);
    const top = niceCeiling(peak);
    $("steps-scale").textContent = `0 to ${fmtInt(top)}, per poll interval`;
    drawCurve($("chart-steps"), rates, start, span, top);
    const success = history.filter((h) => h.success !== null).map((h) => ({ t: h.t, v: h.success }));
    drawCurve($("chart-success"), success, start, span, 1);
  }

  function niceCeiling(v) {
    if (!(v > 0)) return 1;
    const mag = 10 ** Math.floor(Math.log10(v));
    const n = [1, 2, 2.5, 5, 10].find((m) => m * mag >= v * 1.05) || 10;
    return n * mag;
  }

  function drawCurve(figure, points, start, span, top) {
    const shapes = gridLines(start, span, CHART_H);
    const visible = points.filter((p) => p.t >= start);
    const xy = visible.map((p) => {
      const xv = ((p.t - start) / span) * LANE_W;
      const yv = CHART_H - (Math.min(p.v, top) / top) * (CHART_H - 4) - 2;
      return `${xv.toFixed(2)},${yv.toFixed(2)}`;
    });
    if (xy.length) {
      const [x0] = xy[0].split(",");
      const [x1] = xy[xy.length - 1].split(",");
      shapes.push(svg("polygon", { class: "area", points: `${x0},${CHART_H} ${xy.join(" ")} ${x1},${CHART_H}` }));
      shapes.push(svg("polyline", { class: "line", points: xy.join(" "), "vector-effect": "non-scaling-stroke" }));
    }
    figure.querySelector("svg").replaceChildren(...shapes);
    figure.dataset.points = String(visible.length);
    figure.dataset.last = visible.length ? String(visible[visible.length - 1].v) : "";
    figure.dataset.peak = visible.length ? String(Math.max(...visible.map((p) => p.v))) : "";
  }

  function renderWorkers(st) {
    const workers = Array.isArray(st.workers) ? st.workers.filter((w) => w && typeof w === "object") : [];
    const slots = obj(st.slots);
    const el = $("slots");
    for (const k of ["total", "placed", "pending"]) el.dataset[k] = String(num(slots[k]) ?? "");
    el.textContent = num(slots.total)
      ? `slots: ${fmtInt(num(slots.placed))} of ${fmtInt(num(slots.total))} placed, ${fmtInt(num(slots.pending))} pending`
      : "";
    const rows = workers.map((w) => {
      const tr = document.createElement("tr");
      const state = typeof w.state === "string" ? w.state : "unknown";
      tr.dataset.worker = String(w.id ?? w.name ?? "");
      tr.dataset.state = state;
      const slotList = Array.isArray(w.slots) ? w.slots.join(", ") : "";
      const beat = num(w.last_heartbeat_s);
      const cells = [
        String(w.name ?? w.id ?? "?"),
        state,
        String(w.host ?? ""),
        slotList || "–",
        num(w.capacity) === null ? "–" : fmtInt(num(w.capacity)),
        beat === null ? "–" : `${beat.toFixed(1)} s ago`,
        fmtInt(num(w.sampler_restarts) ?? 0),
        typeof w.reason === "string" ? w.reason : "",
      ];
      cells.forEach((text, i) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (i === 1) td.className = `badge state-${state.replace(/[^a-z]/g, "")}`;
        tr.append(td);
      });
      tr.title = `id ${String(w.id ?? "?")}`;
      return tr;
    });
    $("workers").querySelector("tbody").replaceChildren(...rows);
    $("workers").dataset.count = String(rows.length);
    $("workers").hidden = rows.length === 0;
    $("no-workers").hidden = rows.length > 0;
  }

  function renderAccounting(st) {
    const acc = obj(st.accounting);
    for (const item of document.querySelectorAll("#accounting [data-counter]")) {
      const v = num(acc[item.dataset.counter]);
      item.dataset.value = v === null ? "" : String(v);
      item.querySelector("dd").textContent = fmtInt(v);
    }
    // produced == consumed + dropped_stale + discarded + discarded_dead_worker + in_flight
    const parts = ["consumed", "dropped_stale", "discarded", "discarded_dead_worker", "in_flight"].map((k) => num(acc[k]));
    const produced = num(acc.produced);
    const el = $("balance");
    if (produced === null || parts.includes(null)) {
      el.dataset.balanced = "";
      el.textContent = "";
      return;
    }
    const ok = parts.reduce((a, b) => a + b, 0) === produced;
    el.dataset.balanced = String(ok);
    el.textContent = ok ? "books balance" : "books do not balance";
  }

  poll();
})();
