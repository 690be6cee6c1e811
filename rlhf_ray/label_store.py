"""People's labels: a queue of tasks (rank a prompt's K answers, or thumbs on one answer) and the labels given, in
one SQLite file. The label server (launch/label_server.py) serves the queue to people through a page; the pipeline's
human label stage fills it and waits on it; `export` writes what the RM, DPO and KTO stages read. No Ray, no web.

SQLite in WAL mode, so the server and a pipeline (other processes) share the file: one writer at a time, readers
never blocked. Every write is one transaction, and a label is unique per (task, labeler): a resubmitted label (a
double click, a retried request) is answered "duplicate" and stored once.

Each labeler sees a task's answers in an order of their own (a shuffle seeded by labeler and task, the same on every
reload) and that order is stored with the label: position bias (the answer shown first ranked first more often than
1/K) is measurable per labeler. A ranking may tie answers: it is stored as tiers, best first ([[2], [0, 3], [1]]),
and exported as a ranking when strict, as scores (tied answers scored alike: no pair between them) when not.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rlhf_ray.labelers import LabeledRanking, aggregate

LEASE_S = 600.0                        # a task shown to a labeler is held for them this long (others get the next)

SCHEMA = """
CREATE TABLE IF NOT EXISTS labelers (
    name TEXT PRIMARY KEY, token_sha256 TEXT UNIQUE NOT NULL, lead INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY, batch TEXT NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('rank', 'thumbs')),
    prompt TEXT NOT NULL, answers TEXT NOT NULL, wanted INTEGER NOT NULL, meta TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_batch ON tasks (batch);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL REFERENCES tasks (id), labeler TEXT NOT NULL,
    shown TEXT NOT NULL, tiers TEXT, thumb INTEGER, reason TEXT NOT NULL DEFAULT '', skipped INTEGER NOT NULL,
    seconds REAL, created REAL NOT NULL, UNIQUE (task_id, labeler));
CREATE TABLE IF NOT EXISTS leases (
    task_id INTEGER NOT NULL, labeler TEXT NOT NULL, until REAL NOT NULL, PRIMARY KEY (task_id, labeler));
"""


class LabelError(ValueError):
    """A request the store refuses (a malformed label, an unknown task): its message is one line for the client."""


@dataclass(frozen=True)
class Labeler:
    name: str
    lead: bool


def number(x: float | None) -> float | None:
    """None for what is not measured (nan: e.g. agreement with one labeler): JSON has no nan."""
    return None if x is None or math.isnan(x) else x


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def shown_order(labeler: str, task_id: int, k: int) -> list[int]:
    """The order `labeler` sees task `task_id`'s k answers in: answer indices, first shown first."""
    order = list(range(k))
    random.Random(f"{labeler}\x00{task_id}").shuffle(order)
    return order


def check_tiers(tiers, k: int) -> list[list[int]]:
    """Tiers best first over answer positions 0..k-1, each exactly once (ties: several in one tier)."""
    if (not isinstance(tiers, list) or not tiers
            or not all(isinstance(t, list) and t and all(type(a) is int for a in t) for t in tiers)):
        raise LabelError("tiers: a list of non-empty lists of answer positions, best first")
    flat = [a for t in tiers for a in t]
    if sorted(flat) != list(range(k)):
        raise LabelError(f"tiers: every answer position 0..{k - 1} exactly once, got {flat}")
    return tiers


def labeled_ranking(prompt: int, labeler: str, tiers: list[list[int]]) -> LabeledRanking:
    """A label's tiers as the aggregation reads them: best first, tied answers by index, each one's tier."""
    ranking = tuple(a for t in tiers for a in sorted(t))
    strict = all(len(t) == 1 for t in tiers)
    return LabeledRanking(prompt, labeler, ranking,
                          None if strict else tuple(level for level, t in enumerate(tiers) for _ in t))


def tiers_to_row(tiers: list[list[int]]) -> dict:
    """A ranking when strict; scores (tier count down to 1, tied answers alike) when it has ties."""
    if all(len(t) == 1 for t in tiers):
        return {"ranking": [t[0] for t in tiers]}
    scores = [0] * sum(map(len, tiers))
    for level, tier in enumerate(tiers):
        for a in tier:
            scores[a] = len(tiers) - level
    return {"scores": scores}


class LabelStore:
    """The queue and its labels in one SQLite file (module docstring). Each call opens its own connection: one store
    object serves a threaded web server and a polling pipeline alike."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")         # a property of the file: set once, kept
            db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise LabelError(f"{self.path}: not a label store ({e})") from None
        finally:
            db.close()

    @contextmanager
    def _db(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            # a writer takes the write lock at once (one at a time; waits, up to the timeout, rather than fails); a
            # reader takes none: under WAL it reads its snapshot beside any writer
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    # --- people -------------------------------------------------------------------------------------------------
    def add_labeler(self, name: str, lead: bool = False) -> str:
        """A new labeler (or a new token for an existing one, the old one revoked); returns the token, shown once:
        only its hash is stored."""
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise LabelError(f"labeler name {name!r}: letters, digits, '-' and '_' only")
        token = secrets.token_urlsafe(24)
        with self._db() as db:
            db.execute("INSERT INTO labelers VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                       "token_sha256 = excluded.token_sha256, lead = excluded.lead", (name, token_hash(token),
                                                                                    int(lead), time.time()))
        return token

    def who(self, token: str | None) -> Labeler | None:
        """The labeler holding `token`, or None (no token, or not one of ours)."""
        if not token:
            return None
        with self._db(write=False) as db:
            row = db.execute("SELECT name, lead FROM labelers WHERE token_sha256 = ?", (token_hash(token),)).fetchone()
        return Labeler(row["name"], bool(row["lead"])) if row else None

    # --- the queue ------------------------------------------------------------------------------------------------
    def add_tasks(self, batch: str, rows: list[dict], kind: str = "rank", wanted: int = 1) -> list[int]:
        """Queue rows {prompt, responses: [K answers]} (rank: K >= 2; thumbs: each answer its own task) under
        `batch`; any other keys of a row are kept as the task's meta. Returns the new task ids, in row order."""
        if kind not in ("rank", "thumbs"):
            raise LabelError(f"kind {kind!r}: rank or thumbs")
        if wanted < 1:
            raise LabelError(f"wanted {wanted}: at least 1 label a task")
        items = []
        for i, r in enumerate(rows):
            answers = r.get("responses")
            if not isinstance(r.get("prompt"), str) or not isinstance(answers, list) or not all(
                    isinstance(a, str) for a in answers) or len(answers) < (2 if kind == "rank" else 1):
                raise LabelError(f"row {i}: needs 'prompt' (a string) and 'responses' (a list of "
                                 f"{'at least 2 ' if kind == 'rank' else ''}strings)")
            meta = {k: v for k, v in r.items() if k not in ("prompt", "responses")}
            if kind == "rank":
                items.append((r["prompt"], answers, meta))
            else:
                items += [(r["prompt"], [a], {**meta, "answer_index": j}) for j, a in enumerate(answers)]
        now = time.time()
        with self._db() as db:
            return [db.execute("INSERT INTO tasks (batch, kind, prompt, answers, wanted, meta, created) VALUES "
                               "(?, ?, ?, ?, ?, ?, ?)", (batch, kind, p, json.dumps(a), wanted, json.dumps(m), now)
                               ).lastrowid for p, a, m in items]

    def next_task(self, labeler: str, batch: str | None = None) -> dict | None:
        """The oldest task `labeler` has not labelled (nor skipped) that still wants labels, counting those others
        hold; held for them LEASE_S. Its answers come in the labeler's own order, each with its position there."""
        now = time.time()
        with self._db() as db:
            db.execute("DELETE FROM leases WHERE until < ?", (now,))
            row = db.execute(
                "SELECT t.* FROM tasks t WHERE (? IS NULL OR t.batch = ?)"
                " AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.task_id = t.id AND l.labeler = ?)"
                " AND (EXISTS (SELECT 1 FROM leases s WHERE s.task_id = t.id AND s.labeler = ?)"
                "      OR (SELECT COUNT(*) FROM labels l WHERE l.task_id = t.id AND l.skipped = 0)"
                "       + (SELECT COUNT(*) FROM leases s WHERE s.task_id = t.id) < t.wanted)"
                " ORDER BY t.id LIMIT 1", (batch, batch, labeler, labeler)).fetchone()
            if row is None:
                return None
            db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)", (row["id"], labeler, now + LEASE_S))
        answers = json.loads(row["answers"])
        order = shown_order(labeler, row["id"], len(answers))
        return {"task": row["id"], "kind": row["kind"], "prompt": row["prompt"],
                "answers": [answers[i] for i in order], "batch": row["batch"]}

    def submit(self, labeler: str, task_id: int, tiers: list | None = None, thumb: bool | None = None,
               reason: str = "", skip: bool = False, seconds: float | None = None) -> bool:
        """Store `labeler`'s label of a task: tiers of shown positions, best first (rank), or thumb up/down (thumbs),
        or a skip. Positions are mapped back to answer indices here, from the order this labeler was shown. Returns
        False when this labeler had already labelled the task (the first label stands)."""
        with self._db() as db:
            task = db.execute("SELECT kind, answers FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if task is None:
                raise LabelError(f"task {task_id}: no such task")
            k = len(json.loads(task["answers"]))
            shown = shown_order(labeler, task_id, k)
            stored_tiers, stored_thumb = None, None
            if not skip:
                if task["kind"] == "rank":
                    if thumb is not None:
                        raise LabelError(f"task {task_id}: a ranking task takes tiers, not a thumb")
                    stored_tiers = [[shown[p] for p in t] for t in check_tiers(tiers, k)]
                else:
                    if not isinstance(thumb, bool) or tiers is not None:
                        raise LabelError(f"task {task_id}: a thumbs task takes thumb true (up) or false (down)")
                    stored_thumb = int(thumb)
            if not isinstance(reason, str) or len(reason) > 2000:
                raise LabelError("reason: a string of at most 2000 characters")
            cur = db.execute(
                "INSERT INTO labels (task_id, labeler, shown, tiers, thumb, reason, skipped, seconds, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (task_id, labeler) DO NOTHING",
                (task_id, labeler, json.dumps(shown), None if stored_tiers is None else json.dumps(stored_tiers),
                 stored_thumb, reason, int(skip), seconds, time.time()))
            db.execute("DELETE FROM leases WHERE task_id = ? AND labeler = ?", (task_id, labeler))
            return cur.rowcount == 1

    def batch_tasks(self, batch: str) -> list[dict]:
        """The tasks of `batch` in the order queued: {task, kind, prompt, answers}."""
        with self._db(write=False) as db:
            rows = db.execute("SELECT id, kind, prompt, answers FROM tasks WHERE batch = ? ORDER BY id",
                              (batch,)).fetchall()
        return [{"task": r["id"], "kind": r["kind"], "prompt": r["prompt"], "answers": json.loads(r["answers"])}
                for r in rows]

    # --- reading back ---------------------------------------------------------------------------------------------
    def progress(self, labeler: str | None = None, batch: str | None = None) -> dict:
        """Tasks in all (or in `batch`), those with all the labels they want, and `labeler`'s own count."""
        with self._db(write=False) as db:
            q = ("SELECT COUNT(*) AS tasks, COALESCE(SUM((SELECT COUNT(*) FROM labels l WHERE l.task_id = t.id AND "
                 "l.skipped = 0) >= t.wanted), 0) AS done FROM tasks t WHERE (? IS NULL OR t.batch = ?)")
            row = dict(db.execute(q, (batch, batch)).fetchone())
            if labeler is not None:
                row["mine"] = db.execute(
                    "SELECT COUNT(*) FROM labels l JOIN tasks t ON t.id = l.task_id WHERE l.labeler = ? "
                    "AND (? IS NULL OR t.batch = ?)", (labeler, batch, batch)).fetchone()[0]
        return row

    def labels(self, batch: str | None = None, kind: str | None = None) -> list[dict]:
        """Every label given (skips included), each with its task, in the order given."""
        with self._db(write=False) as db:
            rows = db.execute(
                "SELECT l.*, t.batch, t.kind, t.prompt, t.answers, t.meta FROM labels l JOIN tasks t ON t.id = "
                "l.task_id WHERE (? IS NULL OR t.batch = ?) AND (? IS NULL OR t.kind = ?) ORDER BY l.id",
                (batch, batch, kind, kind)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            for key in ("shown", "tiers", "answers", "meta"):
                d[key] = json.loads(d[key]) if d[key] is not None else None
            d["thumb"] = None if d["thumb"] is None else bool(d["thumb"])
            d["skipped"] = bool(d["skipped"])
            out.append(d)
        return out

    def export(self, kind: str, batch: str | None = None) -> list[dict]:
        """What the stages read, one row per label given (skips left out), each with who, when and the order shown:
        `rankings` {prompt, responses, ranking | scores} (RM, DPO), `pairs` {prompt, chosen, rejected} (every
        strict pair of every ranking), `thumbs` {prompt, completion, label} (KTO: label true is desirable)."""
        if kind not in ("rankings", "pairs", "thumbs"):
            raise LabelError(f"export {kind!r}: rankings, pairs or thumbs")
        out = []
        for lab in self.labels(batch, "thumbs" if kind == "thumbs" else "rank"):
            if lab["skipped"]:
                continue
            who = {"labeler": lab["labeler"], "time": lab["created"], "shown": lab["shown"], "task": lab["task_id"]}
            if kind == "thumbs":
                out.append({"prompt": lab["prompt"], "completion": lab["answers"][0], "label": lab["thumb"],
                            "reason": lab["reason"], **who})
            elif kind == "rankings":
                out.append({"prompt": lab["prompt"], "responses": lab["answers"], **tiers_to_row(lab["tiers"]),
                            "tiers": lab["tiers"], **who})
            else:
                tiers = lab["tiers"]
                out += [{"prompt": lab["prompt"], "chosen": lab["answers"][w], "rejected": lab["answers"][lo], **who}
                        for i, hi in enumerate(tiers) for lower in tiers[i + 1:] for w in hi for lo in lower]
        return out

    def report(self, batch: str | None = None) -> dict:
        """For the team lead: per labeler their labels, skips, median seconds, position bias (how often the answer
        shown first was put in the top tier, against the 1/K a labeler without bias would give), thumbs-up share,
        agreement with the aggregate and the reliability the labels imply (rlhf_ray/labelers.py; None for a labeler
        who shares no ranked task with another: one labeler alone implies nothing); the pool's inter-labeler
        agreement."""
        labs = self.labels(batch)
        per: dict[str, dict] = {}
        for lab in labs:
            p = per.setdefault(lab["labeler"], {"labels": 0, "skips": 0, "seconds": [], "first_top": [],
                                                "thumbs_up": []})
            p["labels"] += not lab["skipped"]
            p["skips"] += lab["skipped"]
            if lab["seconds"] is not None:
                p["seconds"].append(lab["seconds"])
            if lab["kind"] == "rank" and not lab["skipped"]:
                p["first_top"].append((lab["shown"][0] in lab["tiers"][0]) - len(lab["tiers"][0]) / len(lab["shown"]))
            if lab["kind"] == "thumbs" and not lab["skipped"]:
                p["thumbs_up"].append(lab["thumb"])
        ranked = [labeled_ranking(lab["task_id"], lab["labeler"], lab["tiers"])
                  for lab in labs if lab["kind"] == "rank" and not lab["skipped"] and len(lab["tiers"]) > 1]
        agg = aggregate(ranked) if ranked else None
        raters: dict[int, set[str]] = {}
        for r in ranked:
            raters.setdefault(r.prompt, set()).add(r.labeler)
        shared = {name for names in raters.values() if len(names) > 1 for name in names}   # agreement is measurable
        out = {}
        for name, p in sorted(per.items()):
            secs = sorted(p["seconds"])
            out[name] = {"labels": p["labels"], "skips": p["skips"],
                         "median_seconds": secs[len(secs) // 2] if secs else None,
                         "position_bias": sum(p["first_top"]) / len(p["first_top"]) if p["first_top"] else None,
                         "thumbs_up": sum(p["thumbs_up"]) / len(p["thumbs_up"]) if p["thumbs_up"] else None,
                         "with_aggregate": number(agg.with_aggregate[name]) if name in shared else None,
                         "reliability": number(agg.reliability[name]) if name in shared else None}
        return {"labelers": out, "agreement": number(agg.agreement) if agg else None,
                "progress": self.progress(batch=batch)}
