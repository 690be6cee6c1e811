"""SFT and preference data formats: each loads; each malformed row is one line naming file, row and field."""
import json

import pytest

from rlhf_ray.data import DataError
from rlhf_ray.formats import load_preferences, load_sft


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "Add", "input": "2 and 3", "output": "5"},
     [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]),
    ({"instruction": "Say hi", "input": "", "output": "hi"},
     [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]),
    ({"instruction": "Sum up", "context": "A long text.", "response": "Short.", "category": "summarization"},
     [{"role": "user", "content": "Sum up\n\nA long text."}, {"role": "assistant", "content": "Short."}]),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello."}]},
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello."}]),
])
def test_sft_formats_normalise_to_messages(tmp_path, row, expected):
    assert load_sft(write_jsonl(tmp_path / "d.jsonl", [row])) == [{"messages": expected}]


def test_plain_text_and_parquet_and_dataset_dir(tmp_path):
    import datasets
    assert load_sft(write_jsonl(tmp_path / "t.jsonl", [{"text": "To be, or not to be"}])) == [{"text": "To be, or not to be"}]
    ds = datasets.Dataset.from_list([{"instruction": "a", "input": "", "output": "b"}])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "dsdir"))
    want = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    assert load_sft(tmp_path / "d.parquet") == want == load_sft(tmp_path / "dsdir")


@pytest.mark.parametrize("rows, fmt, needle", [
    ([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 3}], "auto", ":2: field 'output' must be"),
    ([{"instruction": "a", "output": "b"}, {"instruction": "a"}], "alpaca", ":2: missing field 'output'"),
    ([{"instruction": "", "response": "b"}], "dolly", ":1: field 'instruction' must be a non-empty string"),
    ([{"messages": [{"role": "user", "content": "q"}]}], "auto", ":1: field 'messages' must end with an assistant"),
    ([{"messages": [{"role": "bot", "content": "q"}]}], "auto", ":1: field 'messages[0].role' must be one of"),
    ([{"title": "x"}], "auto", ":1: unrecognised SFT row"),
])
def test_malformed_sft_rows(tmp_path, rows, fmt, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_sft(path, fmt)
    assert str(e.value).startswith(str(path)) and needle in str(e.value) and "\n" not in str(e.value)


def test_broken_json_line_and_missing_file(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"b.jsonl:2: not valid JSON"):
        load_sft(p)
    with pytest.raises(DataError, match="file not found"):
        load_sft(tmp_path / "none.jsonl")


def test_preferences_pairwise_ranking_and_scores(tmp_path):
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"},
            {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
            {"prompt": "r", "responses": ["x", "y", "z"], "scores": [0.5, 2.0, 0.5]}]
    prefs = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    assert prefs[0] == ("p", ["good", "bad"], [(0, 1)])
    assert prefs[1] == ("q", ["a", "b", "c"], [(2, 0), (2, 1), (0, 1)])
    assert sorted(prefs[2][2]) == [(1, 0), (1, 2)]              # the tie between x and z gives no pair


@pytest.mark.parametrize("row, needle", [
    ({"prompt": "p", "chosen": "a"}, ":1: missing field 'rejected'"),
    ({"prompt": "p", "responses": ["a"], "ranking": [0]}, ":1: field 'responses' must be a list of at least 2"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}, ":1: field 'ranking' must be a permutation"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1]}, ":1: field 'scores' must be 2 numbers"),
    ({"prompt": "p", "responses": ["a", "b"]}, ":1: needs 'chosen'/'rejected'"),
    ({"responses": ["a", "b"], "ranking": [0, 1]}, ":1: missing field 'prompt'"),
])
def test_malformed_preference_rows(tmp_path, row, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as e:
        load_preferences(path)
    assert needle in str(e.value) and "\n" not in str(e.value)
