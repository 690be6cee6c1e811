"""One prompt rendering for every stage: SFT, RM/DPO rankings, labelling, PPO rollouts and evaluation all give
the model the same tokens for the same prompt, chat template or not (data.apply_chat_template)."""
import pytest

from rlhf_ray.config import DataConfig
from rlhf_ray.data import DataError
from rlhf_ray.prompts import render_prompt, render_prompts
from rlhf_ray.sft import IGNORE, sft_example
from rlhf_ray.stage_data import ranking_batch
from rlhf_ray.tiny_world.world import train_tokenizer

PROMPT = "Continue: the object of a class"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("the user asks a question about the object of a class and the answer. " * 40,
                           vocab_size=400)


def test_chat_renders_a_user_turn_and_the_generation_prompt(tok):
    text = tok.decode(render_prompt(tok, PROMPT, chat=True))
    assert text == f"<|user|>\n{PROMPT}\n<|assistant|>\n"
    assert tok.decode(render_prompt(tok, PROMPT, chat=False)) == PROMPT


@pytest.mark.parametrize("chat", [True, False])
def test_every_stage_renders_the_same_prompt(tok, chat):
    ids = render_prompt(tok, PROMPT, chat)
    # SFT: the tokens before the answer's labels
    seq, labels = sft_example(tok, {"messages": [{"role": "user", "content": PROMPT},
                                                 {"role": "assistant", "content": "an answer"}]}, 512, chat)
    first_label = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert seq[:first_label] == ids
    assert tok.decode(seq[first_label:]) == "an answer" + tok.eos_token
    # RM / DPO rankings: every answer's row starts with the prompt
    b = ranking_batch(tok, [(PROMPT, ["a class", "a value"], [(0, 1)])], max_len=256, chat=chat)
    for k in range(2):
        assert b.input_ids[0, k, :len(ids)].tolist() == ids
    # labelling, PPO rollouts and evaluation: render_prompts under the config's data section
    assert render_prompts(tok, [PROMPT], DataConfig(apply_chat_template=chat, max_prompt_tokens=64)) == [ids]


def test_truncation_keeps_the_end_and_empty_prompts_are_one_line_errors(tok):
    full = render_prompt(tok, PROMPT, chat=True)
    assert render_prompt(tok, PROMPT, chat=True, max_tokens=3) == full[-3:]     # the generation prompt survives
    with pytest.raises(DataError, match="prompt tokenises to nothing: ''"):
        render_prompt(tok, "", chat=False)
    with pytest.raises(DataError, match="tokenises to nothing"):
        render_prompt(tok, PROMPT, chat=True, max_tokens=0)


def test_raw_rendering_refuses_multi_turn_conversations(tok):
    conv = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    with pytest.raises(ValueError, match="apply_chat_template: true"):
        sft_example(tok, conv, 512, chat=False)
