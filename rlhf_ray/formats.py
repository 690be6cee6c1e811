"""Training-data formats, normalised. Rows come through `datasets` from JSONL, JSON, parquet or a directory
saved with `Dataset.save_to_disk`; every malformed row is a one-line `DataError` naming file, row and field.

SFT rows become {"messages": [{"role", "content"}, ...]} (ending with an assistant turn) or {"text": ...}:
    alpaca    instruction, input (optional), output
    dolly     instruction, context (optional), response
    messages  messages: [{role: system|user|assistant, content}]
    text      text (plain language modelling)
    oasst2    OpenAssistant's message table (one message a row: message_id, parent_id, role prompter|assistant,
              text, rank, lang, deleted, review_result): each tree's top-ranked path, as a conversation
Preference rows become (prompt, [responses], [(winner, loser), ...]):
    pairwise       prompt, chosen, rejected
    ranking        prompt, responses: [K >= 2], and ranking (indices best first) or scores (higher is better)
    hh             Anthropic HH-RLHF: chosen, rejected, each a whole "\n\nHuman: ... \n\nAssistant: ..."
                   transcript; the prompt is what the two share up to the last "Assistant:", the pair their last turns
    ultrafeedback  instruction, completions: [{response, annotations: {aspect: {Rating}}, fine-grained_score,
                   overall_score}]: K-way scores, by default the mean of the fine-grained ratings
                   (ultrafeedback_overall: the critique's overall_score)
    oasst2         the message table again: every prompter message's ranked assistant replies, a K-way ranking
Auto-detection covers all but oasst2, whose rows are messages of trees and name it by `format: oasst2`.
Thumbs rows (KTO) become (prompt, answer, desirable):
    thumbs    prompt, completion, label (true: thumb up), as TRL's unpaired preferences and the label page's export
"""
from __future__ import annotations

import sys
from pathlib import Path

from rlhf_ray.choices import PreferenceFormat, SFTFormat, options
from rlhf_ray.data import DataError, read_jsonl
from rlhf_ray.prefs import ranking_to_pairs, scores_to_pairs

SFT_FORMATS, PREF_FORMATS = options(SFTFormat), options(PreferenceFormat)
ROLES = ("system", "user", "assistant")


def load_rows(path: str | Path) -> list[tuple[int, dict]]:
    """(row number, row) pairs of a JSONL/JSON/parquet file or a saved HF dataset directory, in file order.

    JSONL is read line by line (exact row numbers, types as written: Arrow's schema inference would turn a
    wrongly-typed field into a file-level cast error); the rest goes through `datasets`.
    """
    import datasets
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: file not found")
    if p.suffix == ".jsonl":
        return read_jsonl(p)
    datasets.disable_progress_bars()
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"]
        else:
            kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(p.suffix)
            if kind is None:
                raise DataError(f"{path}: unsupported file type '{p.suffix}' (use .jsonl, .json, .parquet or a dataset dir)")
            ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    except DataError:
        raise
    except Exception as e:                     # datasets' own parse errors are long; keep the first line
        raise DataError(f"{path}: could not be read as a dataset ({str(e).splitlines()[0][:200]})") from None
    return list(enumerate(ds, start=1))


def _text(row: dict, key: str, where: str, optional: bool = False) -> str:
    v = row.get(key)
    if v is None or (optional and v == ""):
        if optional:
            return ""
        raise DataError(f"{where}: missing field '{key}'")
    if not isinstance(v, str) or (not optional and not v.strip()):
        raise DataError(f"{where}: field '{key}' must be a non-empty string")
    return v


def detect_sft_format(row: dict) -> str:
    if "messages" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "instruction" in row and "response" in row:
        return "dolly"
    if "text" in row:
        return "text"
    raise DataError(f"unrecognised SFT row with fields {sorted(row)}")


def normalize_sft_row(row: dict, fmt: str, where: str) -> dict:
    if fmt == "auto":
        try:
            fmt = detect_sft_format(row)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    if fmt in ("alpaca", "dolly"):
        extra_key, answer_key = ("input", "output") if fmt == "alpaca" else ("context", "response")
        instruction = _text(row, "instruction", where)
        extra = _text(row, extra_key, where, optional=True)
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        return {"messages": [{"role": "user", "content": user},
                             {"role": "assistant", "content": _text(row, answer_key, where)}]}
    if fmt == "messages":
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: field 'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise DataError(f"{where}: field 'messages[{i}].role' must be one of {list(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise DataError(f"{where}: field 'messages[{i}].content' must be a string")
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "assistant":
            raise DataError(f"{where}: field 'messages' must end with an assistant turn")
        return {"messages": out}
    if fmt == "text":
        return {"text": _text(row, "text", where)}
    raise DataError(f"{where}: unknown SFT format '{fmt}' (one of {list(SFT_FORMATS)} or auto)")


def load_sft(path: str | Path, fmt: str = "auto") -> list[dict]:
    if fmt == "oasst2":
        return [{"messages": m} for m in oasst2_top_paths(oasst2_trees(path))]
    return [normalize_sft_row(r, fmt, f"{path}:{i}") for i, r in load_rows(path)]


# --- OpenAssistant (oasst2): message trees --------------------------------------------------------------------------
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def oasst2_trees(path: str | Path, lang: str | None = None) -> dict[str | None, list[dict]]:
    """The message table as children lists: parent_id -> its messages (roots under None), each list in file order.
    Deleted messages and those their review rejected are left out, with their subtrees; `lang` keeps one language."""
    rows = load_rows(path)
    msgs: dict[str, dict] = {}
    for i, r in rows:
        where = f"{path}:{i}"
        mid = _text(r, "message_id", where)
        role = r.get("role")
        if role not in OASST_ROLES:
            raise DataError(f"{where}: field 'role' must be prompter or assistant, got {role!r}")
        parent = r.get("parent_id")
        if parent is not None and not isinstance(parent, str):
            raise DataError(f"{where}: field 'parent_id' must be a message id or null")
        rank = r.get("rank")
        if rank is not None and (not isinstance(rank, (int, float)) or isinstance(rank, bool) or rank < 0):
            raise DataError(f"{where}: field 'rank' must be a number >= 0 (0 best) or null, got {rank!r}")
        if mid in msgs:
            raise DataError(f"{where}: field 'message_id' {mid!r} repeats row {msgs[mid]['row']}")
        msgs[mid] = {"id": mid, "parent": parent, "role": role, "text": _text(r, "text", where), "rank": rank,
                     "row": i, "keep": not r.get("deleted", False) and r.get("review_result", True) is not False
                     and (lang is None or r.get("lang") == lang)}
    children: dict[str | None, list[dict]] = {}
    for m in msgs.values():
        if m["parent"] is not None and m["parent"] not in msgs:
            raise DataError(f"{path}:{m['row']}: field 'parent_id' {m['parent']!r} names no message in the file")
        if m["parent"] is None and m["role"] != "prompter":
            raise DataError(f"{path}:{m['row']}: a tree's root (parent_id null) must be a prompter message")
        if m["keep"]:
            children.setdefault(m["parent"], []).append(m)
    return children


def _best(replies: list[dict]) -> dict | None:
    ranked = [m for m in replies if m["rank"] is not None]
    return min(ranked, key=lambda m: m["rank"]) if ranked else (replies[0] if len(replies) == 1 else None)


def oasst2_top_paths(children: dict[str | None, list[dict]]) -> list[list[dict]]:
    """Each tree's top-ranked path from its root: at every turn the reply ranked best (an only reply, if unranked),
    cut after its last assistant message; trees with no ranked or only reply to the root give none."""
    out = []
    for root in children.get(None, []):
        path, node = [root], root
        while (nxt := _best(children.get(node["id"], []))) is not None:
            path.append(nxt)
            node = nxt
        while path and path[-1]["role"] != "assistant":
            path.pop()
        if path:
            out.append([{"role": OASST_ROLES[m["role"]], "content": m["text"]} for m in path])
    return out


def oasst2_rankings(children: dict[str | None, list[dict]]) -> list[tuple[str, list[str], list[tuple[int, int]]]]:
    """Every prompter message with two or more ranked assistant replies: its text as the prompt (earlier turns are
    not carried: a preference prompt is one string), the replies ranked by `rank` (0 best; equal ranks tie)."""
    by_id = {m["id"]: m for sibs in children.values() for m in sibs}
    out = []
    for parent, replies in children.items():
        ranked = [m for m in replies if m["role"] == "assistant" and m["rank"] is not None]
        if parent is None or len(ranked) < 2 or by_id.get(parent, {}).get("role") != "prompter":
            continue
        pairs = scores_to_pairs([-m["rank"] for m in ranked])
        if pairs:
            out.append((by_id[parent]["text"], [m["text"] for m in ranked], pairs))
    return out


# --- HH-RLHF and UltraFeedback ----------------------------------------------------------------------------------
HH_ASSISTANT = "\n\nAssistant:"


def hh_row(row: dict, where: str) -> tuple[str, list[str], list[tuple[int, int]]]:
    """An HH-RLHF row: the prompt is the transcript up to its last "\n\nAssistant:" (which both share), the pair the
    two last assistant turns."""
    chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
    parts = []
    for key, t in (("chosen", chosen), ("rejected", rejected)):
        cut = t.rfind(HH_ASSISTANT)
        if not t.lstrip("\n").startswith("Human:") or cut < 0:
            raise DataError(f"{where}: field '{key}' is not an HH transcript "
                            "(\"\\n\\nHuman: ... \\n\\nAssistant: ...\")")
        parts.append((t[:cut + len(HH_ASSISTANT)], t[cut + len(HH_ASSISTANT):].strip()))
    if parts[0][0] != parts[1][0]:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' differ before their last assistant turn")
    if not parts[0][1] or not parts[1][1]:
        raise DataError(f"{where}: field '{'chosen' if not parts[0][1] else 'rejected'}' has an empty last "
                        "assistant turn")
    return parts[0][0].strip(), [parts[0][1], parts[1][1]], [(0, 1)]


def ultrafeedback_row(row: dict, where: str, score: str = "fine_grained"
                      ) -> tuple[str, list[str], list[tuple[int, int]]] | None:
    """An UltraFeedback row: its completions scored by the mean of their fine-grained ratings (the annotations'
    Ratings; "N/A" left out), or by the critique's overall_score; equal scores give no pair, and a row whose
    completions all score alike gives None (the published set has many: they are skipped and counted)."""
    prompt = _text(row, "instruction", where)
    comps = row.get("completions")
    if not isinstance(comps, list) or len(comps) < 2:
        raise DataError(f"{where}: field 'completions' must be a list of at least 2 completions")
    responses, scores = [], []
    for j, c in enumerate(comps):
        here = f"{where}: field 'completions[{j}]"
        if not isinstance(c, dict) or not isinstance(c.get("response"), str) or not c["response"].strip():
            raise DataError(f"{here}.response' must be a non-empty string")
        responses.append(c["response"])
        if score == "overall":
            v = c.get("overall_score")
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise DataError(f"{here}.overall_score' must be a number")
            scores.append(float(v))
            continue
        ann = c.get("annotations")
        if not isinstance(ann, dict) or not ann:
            raise DataError(f"{here}.annotations' must map aspects to {{Rating}}")
        ratings = []
        for aspect, a in ann.items():
            r = a.get("Rating") if isinstance(a, dict) else None
            if r in (None, "N/A"):
                continue
            try:
                ratings.append(float(r))
            except (TypeError, ValueError):
                raise DataError(f"{here}.annotations.{aspect}.Rating' must be a number or N/A, got {r!r}") from None
        if not ratings:
            raise DataError(f"{here}.annotations' has no rating")
        scores.append(sum(ratings) / len(ratings))
    pairs = scores_to_pairs(scores)
    return (prompt, responses, pairs) if pairs else None       # all scored alike: no preference (counted, skipped)


def detect_preference_format(row: dict) -> str:
    if "completions" in row and "instruction" in row:
        return "ultrafeedback"
    if "prompt" not in row and "chosen" in row and "rejected" in row:
        return "hh"
    return "pairwise" if "chosen" in row or "rejected" in row else "ranking"


def normalize_preference_row(row: dict, where: str, fmt: str = "auto"
                             ) -> tuple[str, list[str], list[tuple[int, int]]] | None:
    fmt = detect_preference_format(row) if fmt == "auto" else fmt
    if fmt == "hh":
        return hh_row(row, where)
    if fmt in ("ultrafeedback", "ultrafeedback_overall"):
        return ultrafeedback_row(row, where, "overall" if fmt == "ultrafeedback_overall" else "fine_grained")
    if fmt not in ("pairwise", "ranking"):
        raise DataError(f"{where}: unknown preference format '{fmt}' (one of {list(PREF_FORMATS)} or auto)")
    prompt = _text(row, "prompt", where)
    if "chosen" in row or "rejected" in row:
        return prompt, [_text(row, "chosen", where), _text(row, "rejected", where)], [(0, 1)]
    responses = row.get("responses")
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) and r for r in responses):
        raise DataError(f"{where}: field 'responses' must be a list of at least 2 non-empty strings")
    k = len(responses)
    if row.get("ranking") is not None:
        ranking = row["ranking"]
        if not isinstance(ranking, list) or sorted(ranking) != list(range(k)):
            raise DataError(f"{where}: field 'ranking' must be a permutation of 0..{k - 1} (best first)")
        return prompt, responses, ranking_to_pairs(ranking)
    if row.get("scores") is not None:
        scores = row["scores"]
        if (not isinstance(scores, list) or len(scores) != k
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
            raise DataError(f"{where}: field 'scores' must be {k} numbers (one per response)")
        pairs = scores_to_pairs(scores)
        if not pairs:
            raise DataError(f"{where}: field 'scores' are all equal: no preference")
        return prompt, responses, pairs
    raise DataError(f"{where}: needs 'chosen'/'rejected', or 'responses' with 'ranking' or 'scores'")


def load_preferences(path: str | Path, fmt: str = "auto") -> list[tuple[str, list[str], list[tuple[int, int]]]]:
    if fmt == "oasst2":
        return oasst2_rankings(oasst2_trees(path))
    rows = [normalize_preference_row(r, f"{path}:{i}", fmt) for i, r in load_rows(path)]
    kept = [r for r in rows if r is not None]
    if len(kept) < len(rows):
        print(f"{path}: {len(rows) - len(kept)} of {len(rows)} rows skipped: their completions all score alike",
              file=sys.stderr)
    return kept


def load_thumbs(path: str | Path) -> list[tuple[str, str, bool]]:
    """Unpaired thumbs: rows {prompt, completion, label} (label true: desirable)."""
    out = []
    for i, r in load_rows(path):
        where = f"{path}:{i}"
        label = r.get("label")
        if not isinstance(label, bool):
            raise DataError(f"{where}: field 'label' must be true (thumb up) or false (thumb down), got {label!r}")
        out.append((_text(r, "prompt", where), _text(r, "completion", where), label))
    return out
