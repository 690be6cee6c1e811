"use strict";
window.addEventListener("hashchange", () => location.reload());
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const $ = (id) => document.getElementById(id);
const fmt = (x, d = 2) => (x === null || x === undefined) ? "–" : (typeof x === "number" ? x.toFixed(d) : String(x));

async function get(path) {
  const r = await fetch(path, {headers: {"Authorization": "Bearer " + token}});
  if (!r.ok) throw new Error((await r.json().catch(() => ({}))).detail || ("HTTP " + r.status));
  return r;
}

async function load() {
  const rep = await (await get("/api/report")).json();
  $("agreement").textContent = fmt(rep.agreement);
  $("progress").textContent = `${rep.progress.done} of ${rep.progress.tasks} tasks complete`;
  const body = $("labelers").tBodies[0];
  body.replaceChildren();
  for (const [name, r] of Object.entries(rep.labelers)) {
    const tr = document.createElement("tr");
    for (const v of [name, r.labels, r.skips, fmt(r.median_seconds, 1), fmt(r.position_bias), fmt(r.thumbs_up),
                     fmt(r.with_aggregate), fmt(r.reliability)]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.append(td);
    }
    body.append(tr);
  }
}

for (const b of document.querySelectorAll("button[data-kind]")) {
  b.addEventListener("click", async () => {
    const text = await (await get("/api/export/" + b.dataset.kind)).text();
    const a = $("download");
    a.href = URL.createObjectURL(new Blob([text], {type: "application/x-ndjson"}));
    a.download = b.dataset.kind + ".jsonl";
    a.textContent = `${b.dataset.kind}.jsonl (${text.split("\n").filter(Boolean).length} rows)`;
    a.hidden = false;
  });
}

(async () => {
  if (!token) { $("message").textContent = "No token: open /lead.html#token=<a lead's token>."; return; }
  try { await load(); setInterval(load, 10000); } catch (e) { $("message").textContent = "Refused: " + e.message; }
})();
