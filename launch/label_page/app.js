// The labelling page: one task at a time from /api/next, its label posted to /api/label. Model answers are set
// with textContent only (never innerHTML): whatever they hold shows as characters.
"use strict";
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const $ = (id) => document.getElementById(id);
const LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
let task = null, tiers = [], shownAt = 0, busy = false;

async function api(path, body) {
  const opts = {headers: {"Authorization": "Bearer " + token}};
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.detail || data.error || ("HTTP " + r.status));
  return data;
}

function say(text) { $("message").textContent = text; }

function rankedPositions() { return tiers.flat(); }

function renderRanking() {
  const names = tiers.map((t) => t.map((p) => LETTERS[p]).join(" = "));
  $("ranking").textContent = names.length ? names.join("  >  ") : "(click the best answer)";
  for (const li of $("answers").children) {
    const p = Number(li.dataset.pos);
    const level = tiers.findIndex((t) => t.includes(p));
    li.classList.toggle("ranked", level >= 0);
    li.querySelector(".badge").textContent = level >= 0 ? "#" + (level + 1) : "";
  }
  $("submit").disabled = !task || rankedPositions().length !== task.answers.length;
}

function pick(pos) {
  if (!task || task.kind !== "rank" || pos >= task.answers.length || rankedPositions().includes(pos)) return;
  if ($("tie").checked && tiers.length) tiers[tiers.length - 1].push(pos);
  else tiers.push([pos]);
  $("tie").checked = false;
  if (rankedPositions().length === task.answers.length - 1) {   // the last one left can only go last
    const last = task.answers.findIndex((_, p) => !rankedPositions().includes(p));
    tiers.push([last]);
  }
  renderRanking();
}

function undo() {
  if (!tiers.length) return;
  tiers[tiers.length - 1].pop();
  if (!tiers[tiers.length - 1].length) tiers.pop();
  renderRanking();
}

async function send(label) {
  if (!task || busy) return;
  busy = true;
  try {
    await api("/api/label", {task: task.task, seconds: (performance.now() - shownAt) / 1000, ...label});
    await load();
  } catch (e) {
    say("Not saved: " + e.message);
  } finally {
    busy = false;
  }
}

function show(t) {
  task = t; tiers = [];
  $("task").hidden = !t;
  if (!t) return;
  $("prompt").textContent = t.prompt;
  const list = $("answers");
  list.replaceChildren();
  t.answers.forEach((text, pos) => {
    const li = document.createElement("li");
    li.className = "answer";
    li.dataset.pos = pos;
    const head = document.createElement("div");
    head.className = "head";
    const name = document.createElement("span");
    name.textContent = t.kind === "rank" ? `Answer ${LETTERS[pos]} (key ${pos + 1})` : "Answer";
    const badge = document.createElement("span");
    badge.className = "badge";
    head.append(name, badge);
    const body = document.createElement("pre");
    body.className = "text";
    body.textContent = text;
    li.append(head, body);
    if (t.kind === "rank") li.addEventListener("click", () => pick(pos));
    list.append(li);
  });
  $("rank-controls").hidden = t.kind !== "rank";
  $("thumb-controls").hidden = t.kind !== "thumbs";
  $("reason").value = "";
  $("instructions").textContent = t.kind === "rank"
    ? "Click the answers from best to worst (or press their numbers). Tick the box to tie the next one with the last."
    : "Is this a good answer to the prompt?";
  renderRanking();
  shownAt = performance.now();
}

let polling = null;
async function load() {
  const next = await api("/api/next");
  const p = next.progress;
  $("progress").textContent = `you labelled ${p.mine} · ${p.done} of ${p.tasks} tasks complete`;
  show(next.task);
  clearTimeout(polling);
  if (!next.task) {
    say("Nothing to label right now: this page checks again every few seconds.");
    polling = setTimeout(load, 5000);
  } else {
    say("");
  }
}

document.addEventListener("keydown", (e) => {
  if (!task || e.target.tagName === "TEXTAREA" || e.ctrlKey || e.metaKey || e.altKey) return;
  const k = e.key.toLowerCase();
  if (task.kind === "rank" && /^[1-9]$/.test(k)) pick(Number(k) - 1);
  else if (task.kind === "rank" && k === "t") $("tie").checked = !$("tie").checked;
  else if (task.kind === "rank" && k === "backspace") undo();
  else if (task.kind === "rank" && k === "enter" && !$("submit").disabled) send({tiers});
  else if (k === "s") send({skip: true});
  else if (task.kind === "thumbs" && (k === "u" || k === "d")) send({thumb: k === "u", reason: $("reason").value});
  else return;
  e.preventDefault();
});

$("undo").addEventListener("click", undo);
$("submit").addEventListener("click", () => send({tiers}));
$("skip").addEventListener("click", () => send({skip: true}));
$("skip-thumb").addEventListener("click", () => send({skip: true}));
$("up").addEventListener("click", () => send({thumb: true, reason: $("reason").value}));
$("down").addEventListener("click", () => send({thumb: false, reason: $("reason").value}));

(async () => {
  if (!token) { say("No token: open the link your team lead gave you (it ends in #token=...)."); return; }
  try {
    const me = await api("/api/me");
    $("who").textContent = "labelling as " + me.name;
    await load();
  } catch (e) {
    say("Refused: " + e.message);
  }
})();
window.addEventListener("hashchange", () => location.reload());   // a new link pasted: start over with its token
