// ckms console: live fleet table over Server-Sent Events, and the revoke confirmation.
"use strict";

function text(tag, value) {
  const el = document.createElement(tag);
  el.textContent = value;
  return el;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.floor(seconds);
  if (s < 120) return s + " s";
  if (s < 7200) return Math.floor(s / 60) + " min";
  if (s < 172800) return Math.floor(s / 3600) + " h";
  return Math.floor(s / 86400) + " d";
}

function hostStatus(h) {
  if (h.failed) return "failed";
  if (h.drift) return "drift";
  return h.converged ? "converged" : "pending";
}

function renderRows(tbody, hosts) {
  const rows = hosts.map((h) => {
    const tr = document.createElement("tr");
    tr.dataset.host = h.host;
    const th = document.createElement("th");
    th.scope = "row";
    const a = text("a", h.host);
    a.href = "/hosts/" + encodeURIComponent(h.host);
    th.appendChild(a);
    tr.appendChild(th);
    const versions = Object.keys(h.versions).sort((x, y) => x - y)
      .map((v) => "v" + v + " " + h.versions[v]).join(", ");
    tr.appendChild(text("td", versions));
    tr.appendChild(text("td", hostStatus(h)));
    tr.appendChild(text("td", ago(h.age_s)));
    tr.appendChild(text("td", h.latency_ms === null ? "-" : Math.round(h.latency_ms) + " ms"));
    return tr;
  });
  tbody.replaceChildren(...rows);
}

function drawChart(svg, points, targeted) {
  const NS = "http://www.w3.org/2000/svg";
  const w = 600, h = 120, pad = 4;
  const t0 = points[0].t, span = Math.max(1, points[points.length - 1].t - t0);
  const top = Math.max(1, targeted);
  const coords = points.map((p) => {
    const x = pad + ((p.t - t0) / span) * (w - 2 * pad);
    const y = h - pad - (p.converged / top) * (h - 2 * pad);
    return x.toFixed(1) + "," + y.toFixed(1);
  });
  const line = document.createElementNS(NS, "polyline");
  line.setAttribute("points", coords.join(" "));
  line.setAttribute("class", "series");
  const goal = document.createElementNS(NS, "line");
  goal.setAttribute("x1", pad); goal.setAttribute("x2", w - pad);
  goal.setAttribute("y1", pad); goal.setAttribute("y2", pad);
  goal.setAttribute("class", "goal");
  const label = document.createElementNS(NS, "text");
  label.setAttribute("x", w - pad); label.setAttribute("y", h - pad - 2);
  label.setAttribute("text-anchor", "end");
  label.textContent = (span / 1000).toFixed(1) + " s";
  svg.replaceChildren(goal, line, label);
}

function startFleet(section) {
  const points = [];
  const source = new EventSource(section.dataset.stream);
  const $ = (id) => document.getElementById(id);
  source.addEventListener("fleet", (ev) => {
    const f = JSON.parse(ev.data);
    if (f.error) { $("fleet-summary").textContent = f.error; return; }
    $("fleet-progress").value = f.converged_pct;
    $("fleet-pct").textContent = f.converged_pct;
    $("fleet-converged").textContent = f.converged;
    $("fleet-targeted").textContent = f.targeted;
    $("fleet-failed").textContent = f.failed;
    $("fleet-drift").textContent = f.drift;
    section.dataset.converged = f.converged;
    section.dataset.targeted = f.targeted;
    renderRows(document.querySelector("#fleet-table tbody"), f.hosts);
    points.push({ t: Date.now(), converged: f.converged });
    drawChart($("fleet-chart"), points, f.targeted);
    section.dataset.updates = String(points.length);
  });
}

function guardRevoke(form) {
  const confirm = document.getElementById("revoke-confirm");
  const button = document.getElementById("revoke");
  const check = () => { button.disabled = confirm.value.trim() !== form.dataset.key; };
  confirm.addEventListener("input", check);
  check();
}

document.addEventListener("DOMContentLoaded", () => {
  const fleet = document.getElementById("fleet");
  if (fleet && fleet.dataset.stream) startFleet(fleet);
  const revoke = document.getElementById("revoke-form");
  if (revoke) guardRevoke(revoke);
});
