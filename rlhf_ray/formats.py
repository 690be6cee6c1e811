"""Training-data formats, normalised. Rows come through `datasets` from JSONL, JSON, parquet or a directory
saved with `Dataset.save_to_disk`; every malformed row is a one-line `DataError` naming file, row and field.

SFT rows become {"messages": [{"role", "content"}, ...]} (ending with an assistant turn) or {"text": ...}:
    alpaca    instruction, input (optional), output
    dolly     instruction, context (optional), response
    messages  messages: [{role: system|user|assistant, content}], OASST-style conversations
    text      text (plain language modelling)
Preference rows become (prompt, [responses], [(winner, loser), ...]):
    pairwise  prompt, chosen, rejected                       (HH-style)
    ranking   prompt, responses: [K >= 2], and ranking (indices best first) or scores (higher is better)
"""
from __future__ import annotations

from pathlib import Path

from rlhf_ray.data import DataError, read_jsonl
from rlhf_ray.prefs import ranking_to_pairs, scores_to_pairs

SFT_FORMATS = ("alpaca", "dolly", "messages", "text")
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
    return [normalize_sft_row(r, fmt, f"{path}:{i}") for i, r in load_rows(path)]


def normalize_preference_row(row: dict, where: str) -> tuple[str, list[str], list[tuple[int, int]]]:
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


def load_preferences(path: str | Path) -> list[tuple[str, list[str], list[tuple[int, int]]]]:
    return [normalize_preference_row(r, f"{path}:{i}") for i, r in load_rows(path)]
