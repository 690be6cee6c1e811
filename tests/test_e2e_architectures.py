"""The model families users bring, each through PPO on the real stack: a tiny random-init policy of each (the tiny
world's tokenizer, weights drawn wide enough that its next-token distributions are far from uniform) trains 3
steps; the engine's sampling logprobs must match the policy's own, before the first sync and after each one, to
1e-4 (`rollout/logprob_diff_max`). That checks that vLLM loads the family, that the weight sync names and shapes
every tensor as vLLM expects (GPT-2's transposed Conv1D, untied output embeddings, ...) and that both sides
compute the same function. Llama also takes the fp32 fast-step path (`ppo.reuse_sample_logprobs`: the engine's
sampling logprobs as pi_old, no policy forward in scoring; GAE with a critic); its bf16 variant is in
test_e2e_fast_step.py. Slow: one PPO run per family."""
import json
import math

import pytest
import transformers

from conftest import HYBRID, tiny_overrides
from launch.ppo import train
from rlhf_ray.config import load_config
from rlhf_ray.models import load_tokenizer

pytestmark = pytest.mark.slow

# head_dim 64 (vLLM's CPU attention takes only some head sizes), grouped-query attention (2 heads, 1 KV head)
SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=512)
FAMILIES = {                      # Qwen2, the tiny world's own family, is held to the same bound in test_e2e_ppo.py
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**SMALL, "tie_word_embeddings": True}),
    "mistral-untied": ("MistralConfig", "MistralForCausalLM",
                       {**SMALL, "sliding_window": None, "tie_word_embeddings": False}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=128, n_layer=2, n_head=2, n_positions=512)),
}
RUN = {"llama": ["ppo.reuse_sample_logprobs=true", "ppo.advantage=gae", "policy.micro_batch_size=4"]}


def build_policy(family: str, tokenizer_dir: str, out) -> str:
    import torch
    config_cls, model_cls, kw = FAMILIES[family]
    tok = load_tokenizer(tokenizer_dir)
    cfg = getattr(transformers, config_cls)(vocab_size=len(tok), bos_token_id=tok.eos_token_id,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                            initializer_range=0.2, **kw)
    torch.manual_seed(0)
    getattr(transformers, model_cls)(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_and_policy_agree_for_every_family(family, tiny_world, tmp_path):
    policy = build_policy(family, tiny_world["policy"], tmp_path / family)
    run_dir = tmp_path / "run"
    cfg = load_config("configs/tiny_ppo.yaml", tiny_overrides(tiny_world, run_dir) + [
        f"models.policy={policy}", "ppo.advantage=grpo", *HYBRID, "policy.lr=1e-3",
        "logging.wandb.enabled=false", *RUN.get(family, [])])
    train(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["rollout/logprob_diff_max"] for r in rows]
    print(f"{family}: engine-policy logprob gaps {gaps}, entropy {[r['policy/entropy'] for r in rows]}")
    assert len(rows) == 3 and all(g < 1e-4 for g in gaps), gaps
    assert rows[-1]["kl/ref_per_seq"] > 0                # the policy moved: the syncs carried new weights
    assert all(math.isfinite(r["policy/loss"]) and r["policy/entropy"] > 0 for r in rows)   # entropy: outside the graph
    assert all(math.isfinite(r.get("value/loss", 0.0)) for r in rows)
