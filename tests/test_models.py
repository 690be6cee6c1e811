"""Model-directory checks: one-line errors for a missing model, non-safetensors weights, a mismatched tokenizer."""
import json
import shutil

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlhf_ray.models import (ModelLoadError, check_tokenizer_matches, load_causal_lm, position_ids_from_mask,
                             response_logprobs)
from rlhf_ray.tiny_world.world import train_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    tok = train_tokenizer("the cat sat on the mat. " * 50 + "a dog ran far away. " * 50, vocab_size=300)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, tok, model


def test_missing_and_non_safetensors_model_dirs(tmp_path):
    with pytest.raises(ModelLoadError, match="directory not found"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="missing config.json"):
        load_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no .safetensors weights"):
        load_causal_lm(tmp_path)


def test_tokenizer_larger_than_embedding_is_named(tiny, tmp_path):
    d, tok, _ = tiny
    check_tokenizer_matches(tok, d, "policy")                  # matching pair passes
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = 10
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(d / "model.safetensors", tmp_path)
    with pytest.raises(ModelLoadError) as e:
        check_tokenizer_matches(tok, tmp_path, "reward")
    assert "reward" in str(e.value) and "do not match" in str(e.value) and "\n" not in str(e.value)


def test_left_padding_does_not_change_response_logprobs(tiny):
    d, tok, _ = tiny
    model = load_causal_lm(d)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    padded = torch.tensor([[0, 0, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 3, 4]]
    with torch.no_grad():
        a = response_logprobs(model, ids, torch.ones_like(ids), 2)
        b = response_logprobs(model, padded, mask, 2)
    assert torch.allclose(a, b, atol=1e-5)


def test_critic_can_start_from_a_causal_lm_with_a_fresh_value_head(tiny):
    from rlhf_ray.models import load_scalar_model, token_values
    d, _, lm = tiny
    critic = load_scalar_model(d, what="critic")                # a CausalLM checkpoint: backbone + new score head
    assert torch.equal(critic.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        v = token_values(critic, ids, torch.ones_like(ids), 2)
    assert v.shape == (1, 2)
