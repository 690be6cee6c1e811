"""SFT and preference data formats: each loads; each malformed row is one line naming file, row and field."""
import json
from pathlib import Path

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


# --- the published data sets' own shapes (fixtures in tests/fixtures/formats, written to each schema) -------------
FIX = Path(__file__).parent / "fixtures" / "formats"


def test_oasst2_message_trees_give_top_ranked_conversations_and_ranked_siblings():
    convs = load_sft(FIX / "oasst2_messages.jsonl", "oasst2")
    assert convs[0]["messages"] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},                  # rank 0 of three
        {"role": "user", "content": "And its population?"},
        {"role": "assistant", "content": "About 2.1 million people live in the city proper."}]
    assert [c["messages"][-1]["content"] for c in convs[1:]] == ["Blätter fallen leis / ...",   # an only reply
                                                                  "Why did the chicken cross the road?"]
    prefs = load_preferences(FIX / "oasst2_messages.jsonl", "oasst2")
    # the deleted reply and the one its review rejected are left out; a prompt left with one ranked reply gives none
    assert prefs == [("What is the capital of France?", ["The capital of France is Paris.", "Paris, I think. Or Lyon.",
                                                         "France's capital city is Paris, on the Seine."],
                      [(0, 1), (0, 2), (2, 1)]),
                     ("And its population?", ["About 2.1 million people live in the city proper.", "Lots."], [(0, 1)])]


def test_ultrafeedback_scores_by_fine_grained_ratings_or_overall_and_skips_rows_without_preference(capsys):
    prefs = load_preferences(FIX / "ultrafeedback.jsonl")                       # detected
    assert prefs[0][0] == "Explain photosynthesis in one sentence." and len(prefs[0][1]) == 4
    # means of the ratings (N/A left out): 5, 3.33, 2.5, 2.5 -> the last two tie, no pair between them
    assert sorted(prefs[0][2]) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    assert prefs[1] == ("Say hi.", ["Hi!", "Hello."], [(0, 1)])
    overall = load_preferences(FIX / "ultrafeedback.jsonl", "ultrafeedback_overall")    # 8.5, 6, 7, 3; then 9, 9
    assert len(overall) == 1 and sorted(overall[0][2]) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 1), (2, 3)]
    assert "1 of 2 rows skipped: their completions all score alike" in capsys.readouterr().err


def test_hh_rlhf_transcripts_split_into_the_shared_prompt_and_the_last_turns():
    prefs = load_preferences(FIX / "hh_rlhf.jsonl")                             # detected: no prompt field
    assert prefs[0] == ("Human: How do I boil an egg?\n\nAssistant:",
                        ["Put it in boiling water for about nine minutes.", "Eggs are not for boiling."], [(0, 1)])
    assert prefs[1][0].startswith("Human: Hi\n\nAssistant: Hello!") and prefs[1][1] == ["Try 'The Hobbit'.", "No."]


@pytest.mark.parametrize("fmt, row, needle", [
    ("hh", {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
     ":1: fields 'chosen' and 'rejected' differ before their last assistant turn"),
    ("hh", {"chosen": "just text", "rejected": "\n\nHuman: c\n\nAssistant: d"}, ":1: field 'chosen' is not an HH"),
    ("hh", {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: d"},
     ":1: field 'chosen' has an empty last assistant turn"),
    ("ultrafeedback", {"instruction": "i", "completions": [{"response": "a"}]},
     ":1: field 'completions' must be a list of at least 2"),
    ("ultrafeedback", {"instruction": "i", "completions": [
        {"response": "a", "annotations": {"honesty": {"Rating": "x"}}}, {"response": "b", "annotations": {}}]},
     ":1: field 'completions[0].annotations.honesty.Rating' must be a number or N/A, got 'x'"),
    ("ultrafeedback_overall", {"instruction": "i", "completions": [{"response": "a", "overall_score": 1},
                                                                   {"response": "b"}]},
     ":1: field 'completions[1].overall_score' must be a number"),
    ("oasst2", {"message_id": "a", "parent_id": None, "role": "user", "text": "t"},
     ":1: field 'role' must be prompter or assistant, got 'user'"),
    ("oasst2", {"message_id": "a", "parent_id": "nope", "role": "assistant", "text": "t", "rank": 0},
     ":1: field 'parent_id' 'nope' names no message in the file"),
    ("oasst2", {"message_id": "a", "parent_id": None, "role": "prompter", "text": "t", "rank": -1},
     ":1: field 'rank' must be a number >= 0"),
    ("oasst2", {"message_id": "a", "parent_id": None, "role": "prompter"}, ":1: missing field 'text'"),
])
def test_malformed_rows_of_the_published_formats(tmp_path, fmt, row, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as e:
        load_preferences(path, fmt)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("stage, fixture, fmt, rows", [
    ("sft", "oasst2_messages.jsonl", "oasst2", 3), ("rm", "oasst2_messages.jsonl", "oasst2", 2),
    ("rm", "ultrafeedback.jsonl", "auto", 2), ("dpo", "hh_rlhf.jsonl", "hh", 2)])
def test_each_published_format_goes_through_its_stage_s_data_path(tiny_world, stage, fixture, fmt, rows):
    """What `rlhf-ray sft|rm|dpo` makes of the file before training: rows split train / held-out by prompt and
    tokenised with the model's tokenizer (launch/stages.py stage_tensors)."""
    from launch.stages import stage_tensors
    from rlhf_ray.config import load_config
    from rlhf_ray.models import load_tokenizer
    cfg = load_config("configs/tiny_world.yaml", [f"{stage}.data={FIX / fixture}", f"{stage}.format={fmt}",
                                                  f"{stage}.eval_fraction=0.4"])
    train, held = stage_tensors(cfg, stage, load_tokenizer(tiny_world["policy"]))
    assert len(train) + len(held) == rows and len(train) >= 1
