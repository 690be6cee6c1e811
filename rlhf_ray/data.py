"""Prompt data: JSONL rows in, a seeded, resumable stream of prompt strings out."""
from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path


class DataError(ValueError):
    """A missing file or malformed row; the message is one line naming the file, row and field."""


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a bad line is a one-line error naming file and row."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with p.open("rb") as f:
        for row, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{row}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{row}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{row}: expected a JSON object, got {type(obj).__name__}")
            rows.append((row, obj))
    return rows


def load_answer_sets(path: str | Path) -> list[dict]:
    """Rows {"prompt": str, "responses": [two or more distinct, non-empty strings]} (what `rlhf-ray label`
    ranks); a bad row is a one-line DataError naming file and row."""
    rows = []
    for row, obj in read_jsonl(path):
        prompt, answers = obj.get("prompt"), obj.get("responses")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{path}:{row}: 'prompt' must be a non-empty string")
        if (not isinstance(answers, list) or len(answers) < 2 or not all(isinstance(a, str) and a.strip() for a in answers)
                or len(set(answers)) != len(answers)):
            raise DataError(f"{path}:{row}: 'responses' must list two or more distinct, non-empty strings")
        rows.append({"prompt": prompt, "responses": answers})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def load_prompts(path: str | Path, key: str = "prompt", extra_keys: list[str] | tuple = ()) -> list:
    """The prompt strings of a JSONL file; with extra_keys, dicts {"prompt": ..., <key>: ...} carrying those
    fields of each row too (e.g. a reference answer for a rule reward)."""
    prompts = []
    for row, obj in read_jsonl(path):
        if key not in obj:
            raise DataError(f"{path}:{row}: missing field '{key}'")
        if not isinstance(obj[key], str) or not visible(obj[key]):
            raise DataError(f"{path}:{row}: field '{key}' must be a string with visible text, got {obj[key]!r}")
        missing = [k for k in extra_keys if k not in obj]
        if missing:
            raise DataError(f"{path}:{row}: missing field '{missing[0]}' (listed in data.reward_keys)")
        prompts.append({"prompt": obj[key], **{k: obj[k] for k in extra_keys}} if extra_keys else obj[key])
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def visible(text: str) -> bool:
    """Whether `text` has a character that is not whitespace, a control or a format character (e.g. U+200B)."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf") for ch in text)


class PromptStream:
    """Endless batches of prompts (strings, or row dicts): reshuffled each epoch with a seed;
    `state()`/`load_state()` for resume."""

    def __init__(self, prompts: list, batch_size: int, seed: int, shuffle: bool = True):
        self.prompts, self.batch_size, self.seed, self.shuffle = prompts, batch_size, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def next(self) -> list:
        out = []
        while len(out) < self.batch_size:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self.prompts[self._order[self.pos]])
            self.pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._make_order()
