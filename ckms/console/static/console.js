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

// Time to converge: hosts acknowledged over seconds since the newest version was created.
// (Seconds are the controller's: converge_s comes with each update.)
function drawChart(svg, fleet) {
  const NS = "http://www.w3.org/2000/svg";
  const w = 600, h = 120, pad = 6;
  const times = fleet.converge_s || [];
  const done = times.length >= fleet.targeted && fleet.targeted > 0;
  const last = times.length ? times[times.length - 1] : 0;
  const span = Math.max(0.001, done ? last : Math.max(last, fleet.elapsed_s || 0));
  const top = Math.max(1, fleet.targeted);
  const x = (t) => pad + (t / span) * (w - 2 * pad);
  const y = (n) => h - pad - (n / top) * (h - 2 * pad);
  const coords = [x(0).toFixed(1) + "," + y(0).toFixed(1)];
  times.forEach((t, i) => {
    coords.push(x(t).toFixed(1) + "," + y(i).toFixed(1));
    coords.push(x(t).toFixed(1) + "," + y(i + 1).toFixed(1));
  });
  coords.push(x(span).toFixed(1) + "," + y(times.length).toFixed(1));
  const line = document.createElementNS(NS, "polyline");
  line.setAttribute("points", coords.join(" "));
  line.setAttribute("class", "series");
  const goal = document.createElementNS(NS, "line");
  goal.setAttribute("x1", pad); goal.setAttribute("x2", w - pad);
  goal.setAttribute("y1", y(top)); goal.setAttribute("y2", y(top));
  goal.setAttribute("class", "goal");
  const label = document.createElementNS(NS, "text");
  label.setAttribute("x", w - pad); label.setAttribute("y", h - pad - 4);
  label.setAttribute("text-anchor", "end");
  label.textContent = times.length + " of " + fleet.targeted + " hosts" +
    (done ? " in " + last.toFixed(2) + " s" : " after " + span.toFixed(1) + " s");
  svg.replaceChildren(goal, line, label);
  svg.setAttribute("aria-label", label.textContent + " since the newest version was created");
  document.getElementById("converge-time").textContent = label.textContent;
}

function startFleet(section) {
  let updates = 0;
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
    updates += 1;
    drawChart($("fleet-chart"), f);
    section.dataset.updates = String(updates);
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
