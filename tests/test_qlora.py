"""QLoRA in one process (bitsandbytes on the CPU): the config's rules, what a 4-bit policy exports (the weights it
computes with, merged in full precision, as a plain HF model), the reference as the base with adapters off, int8 for
frozen roles, and the planner's 4-bit accounting. The e2e run (DeepSpeed, the engine, resume) is in
tests/test_e2e_faults.py's DAPO test."""
import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

from actors.base import adapters_off, add_lora, dequantized, export_items, full_numel, is_quantized, save_unquantized
from rlhf_ray.config import ConfigError, LoraConfig, load_config
from rlhf_ray.models import Quant, load_causal_lm, load_scalar_model, response_logprobs, sequence_scores
from rlhf_ray.planner import CUDA_CONTEXT, GiB, PRESETS, make_plan, weight_bytes
from rlhf_ray.tiny_world.world import train_tokenizer

NF4 = Quant("nf4", True, "float32")


@pytest.fixture(params=[False, True], ids=["bnb-plain-cpu", "bnb-avx512bf16-cpu"])
def bnb_cpu(request, monkeypatch):
    """bitsandbytes as it behaves on a CPU without, then with, AVX-512 bf16, whatever this CPU has: its Linear4bit
    reads has_avx512bf16() when built, and where true repacks the 4-bit weight in place for an inference kernel on the
    first eval forward without grad (bitsandbytes 0.50.2, nn/modules.py Linear4bit.forward). Forcing it reaches that
    branch on every CPU, and the plain one on a CPU that has the kernel."""
    import bitsandbytes.nn.modules as bnb_modules
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: request.param)
    return request.param


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small Qwen2 LM and scalar model (hidden 128: whole NF4 blocks of 64), seeded random weights."""
    d = tmp_path_factory.mktemp("q")
    tok = train_tokenizer("the cat sat on the mat. " * 50 + "a dog ran far away. " * 50, vocab_size=300)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(d / "lm")
    Qwen2ForSequenceClassification(Qwen2Config(**{**cfg.to_dict(), "num_labels": 1})).save_pretrained(d / "rm")
    for m in ("lm", "rm"):
        tok.save_pretrained(d / m)
    return d


def base(extra=()):
    return ["models.policy=p", "models.reward=r", "data.prompts=x", *extra]


def test_config_rules_name_the_key_in_one_line():
    cases = [
        (["policy.quantization=nf4"], "policy.quantization nf4 freezes the base in 4 bits: it needs policy.lora.rank"),
        (["policy.quantization=int8", "policy.lora.rank=8"], "int8 is for frozen roles only"),
        (["policy.quantization=nf4", "policy.lora.rank=8", "policy.zero_stage=3"], "policy.zero_stage must be 0, 1 or 2"),
        (["reference.quantization=nf4", "reference.zero_stage=3"], "reference.quantization nf4 loads whole quantised"),
        (["sft.trainer.quantization=nf4"], "sft.trainer.quantization must be none"),
        (["policy.quantization=fp8"], "policy.quantization"),
    ]
    for sets, message in cases:
        with pytest.raises(ConfigError) as e:
            load_config(None, base(sets))
        assert message in str(e.value) and "\n" not in str(e.value), (sets, str(e.value))
    ppo_cases = [
        (["reference.from_policy_base=true"], "reference.from_policy_base needs policy.lora.rank > 0"),
        (["reference.from_policy_base=true", "policy.lora.rank=8", "models.reference=other"], "models.reference must be unset"),
        (["reference.from_policy_base=true", "policy.lora.rank=8", "reference.quantization=nf4"],
         "reference.quantization must be none"),
        (["reward.zero_stage=3", "reward.sources=[{kind: model, quantization: nf4}]"], "reward.zero_stage must be 0"),
    ]
    for sets, message in ppo_cases:
        with pytest.raises(ConfigError, match=message):
            load_config(None, base(sets)).check_ppo()


def test_reward_sources_take_the_role_quantization_unless_they_name_their_own():
    cfg = load_config(None, base(["reward.quantization=int8", "models.monitor=m", "reward.monitor_quantization=nf4",
                                  "reward.sources=[{kind: model}, {kind: model, path: r2, quantization: none}]"]))
    assert [s.quantization for s in cfg.reward_sources()] == ["int8", "none"]
    assert cfg.quantized_roles() == {"policy": "none", "reference": "none", "critic": "none",
                                     "reward.sources[0]": "int8", "reward.sources[1]": "none", "reward.monitor": "nf4"}


def test_a_reference_from_the_policy_base_has_no_actors_and_leaves_placements():
    cfg = load_config(None, base(["policy.lora.rank=8", "reference.from_policy_base=true",
                                  "placement.share_process=[[engine, reference, reward]]"])).check_ppo()
    assert not cfg.needs_reference()
    assert cfg.present(["engine", "reference", "reward"]) == ["engine", "reward"]


def test_nf4_policy_exports_what_it_computes_with_as_a_plain_hf_model(tiny, tmp_path, bnb_cpu):
    model = load_causal_lm(tiny / "lm", quant=NF4)
    q = model.model.layers[0].self_attn.q_proj
    assert is_quantized(q.weight) and full_numel(q.weight) == 128 * 128
    assert not is_quantized(model.lm_head.weight)          # the output head stays full precision
    ids = torch.randint(2, 250, (3, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        start = response_logprobs(model, ids, mask, 6)
    model = add_lora(model, LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:                            # trained adapters: B no longer 0
                p.normal_(std=0.05)
        policy = response_logprobs(model, ids, mask, 6)
        with adapters_off(model):
            off = response_logprobs(model, ids, mask, 6)
    assert torch.equal(off, start) and (policy - start).abs().max() > 1e-2
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)   # untouched by adapters_off

    state = {n: fn().detach().clone() for n, _, fn in export_items(model)}
    assert all(v.dtype == torch.float32 for v in state.values())
    assert {k for k in state if "lora" in k or "base_layer" in k} == set()
    save_unquantized(model, str(tmp_path), state)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    exported = load_causal_lm(tmp_path)                     # from_pretrained, no bitsandbytes involved
    with torch.no_grad():
        merged = response_logprobs(exported, ids, mask, 6)
    assert (merged - policy).abs().max() < 1e-4            # the merge is the 4-bit policy's own weights


def test_nf4_critic_keeps_its_value_head_full_precision_and_trainable(tiny, bnb_cpu):
    critic = add_lora(load_scalar_model(tiny / "rm", quant=NF4), LoraConfig(rank=4), head="score")
    assert not is_quantized(critic.score.weight) and critic.score.weight.requires_grad
    ids, mask = torch.randint(2, 250, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        critic.eval()
        sequence_scores(critic, ids, mask)                  # the values PPO reads first, no grad (eval mode)
        for name, p in critic.named_parameters():
            if "lora_B" in name:                            # B starts at 0, which would leave every A's gradient 0
                p.normal_(std=0.05)
    critic.train()
    sequence_scores(critic, ids, mask).sum().backward()
    lora = {n: p for n, p in critic.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 7 * 2                           # A and B on the 7 linear layers of each of 2 blocks
    assert critic.score.weight.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in lora.values())
    assert all(p.grad is None for n, p in critic.named_parameters() if "lora_" not in n and n != "score.weight")


def test_a_4bit_layer_infers_and_trains_with_the_matrix_it_exports_whatever_the_cpu(tiny, bnb_cpu):
    """The policy's old logprobs (eval, no grad), its training forward and the engines' weights all use one matrix:
    the NF4 codes times their scales in compute_dtype, whichever kernel the CPU offers."""
    model = load_causal_lm(tiny / "lm", quant=NF4)
    layer = model.model.layers[0].mlp.up_proj
    W = dequantized(layer.weight).float().clone()
    x = torch.randn(5, 128)
    model.eval()
    with torch.no_grad():
        inferred = layer(x)
    model.train()
    x_grad = x.clone().requires_grad_(True)
    trained = layer(x_grad)
    trained.sum().backward()
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(dequantized(layer.weight).float(), W)                 # the export reads the same matrix
    assert (inferred - x @ W.T).abs().max() < 1e-5 and (trained - x @ W.T).abs().max() < 1e-5   # in float32
    assert torch.allclose(x_grad.grad, W.sum(0).expand_as(x), atol=1e-5)


def test_dequantized_refuses_a_weight_repacked_for_the_cpu_kernel(tiny):
    """Should anything repack a 4-bit weight for bitsandbytes' AVX-512 kernel, its bytes are no longer NF4 codes in
    the plain layout (and its scales are bf16): reading them as such gave weights 0.34 off. Refused, by name."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    layer = load_causal_lm(tiny / "lm", quant=NF4).model.layers[0].mlp.up_proj
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)
    with pytest.raises(RuntimeError, match="repacked for bitsandbytes' AVX-512 bf16 kernel"):
        dequantized(layer.weight)


def test_int8_frozen_reward_model_scores_close_to_full_precision(tiny):
    full = load_scalar_model(tiny / "rm")
    int8 = load_scalar_model(tiny / "rm", quant=Quant("int8"))
    assert type(int8.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Params"
    ids = torch.randint(2, 250, (16, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a, b = sequence_scores(full, ids, mask), sequence_scores(int8, ids, mask)
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99, (a, b)


def test_planner_counts_4bit_weights_and_answers_the_16gb_question():
    arch = PRESETS["llama2-7b"]
    nf4 = weight_bytes(arch, True, "nf4") / GiB
    bf16_rest = 2 * (2 * 32000 * 4096 + 65 * 4096)           # embeddings, lm_head, norms
    assert nf4 == pytest.approx((bf16_rest + arch.linear_params() * (0.5 + 1 / 64 + 4 / 16384)) / GiB)
    assert 3.5 < nf4 < 4.0 and weight_bytes(arch) / GiB == pytest.approx(12.55, abs=0.01)
    shipped = "configs/llama2_7b_qlora_16gb.yaml"
    plan = make_plan(load_config(shipped))
    assert not plan.fits and [r.role for r in plan.roles] == ["policy", "reward", "critic", "engine"]   # no reference
    assert plan.roles[0].per_gpu["weights"] / GiB == pytest.approx(3.7, abs=0.1)
    assert make_plan(load_config(shipped, ["placement.gpu_memory_gib=40"])).fits
    assert not make_plan(load_config(shipped, ["plan.engine_weights=nf4"])).fits
    assert make_plan(load_config(shipped, ["plan.engine_weights=nf4", "ppo.advantage=grpo"])).fits
    # the hybrid layout (GRPO: no critic): policy, engine and reward in one process, one CUDA context between them
    hybrid = ["ppo.advantage=grpo", "placement.colocate=[]", "placement.share_process=[[policy, engine, reward]]"]
    merged, shared = make_plan(load_config(shipped, hybrid)), make_plan(load_config(shipped, hybrid + [
        "plan.engine_weights=shared"]))
    separate = make_plan(load_config(shipped, ["ppo.advantage=grpo"]))           # three processes on the GPU
    # policy and reward: one context fewer (the engine's own lies within its gpu_memory_utilization either way)
    assert separate.gpu_groups[0][2] - merged.gpu_groups[0][2] == pytest.approx(CUDA_CONTEXT)
    assert not merged.fits and merged.gpu_groups[0][:2] == (["policy", "engine", "reward"], 1)   # bf16 engine copy
    engine = next(r for r in shared.roles if r.role == "engine")           # the base read in place: adapters only
    assert engine.per_gpu["weights"] == 2 * arch.lora_params(16) and shared.fits
    assert 14 < shared.gpu_groups[0][2] / GiB < 15 and shared.engine_concurrent_seqs >= 8
    with pytest.raises(ConfigError, match="plan.engine_weights shared needs a quantised LoRA policy sharing"):
        make_plan(load_config(shipped, ["plan.engine_weights=shared"]))


def test_double_quant_and_compute_dtype_reach_the_loaded_layers(tiny):
    cfg = load_config(None, base(["policy.lora.rank=8", "policy.quantization=nf4", "policy.double_quant=false",
                                  "policy.compute_dtype=bfloat16"]))
    quant = Quant.of(cfg.policy, cfg.train.dtype)
    assert quant == Quant("nf4", False, "bfloat16")
    layer = load_causal_lm(tiny / "lm", quant=quant).model.layers[0].mlp.up_proj
    assert layer.compute_dtype == torch.bfloat16 and not layer.weight.quant_state.nested
    default = load_causal_lm(tiny / "lm", quant=Quant.of(load_config(None, base()).reference, "float32", "nf4"))
    state = default.model.layers[0].mlp.up_proj.weight.quant_state
    assert state.nested and state.dtype == torch.float32                 # double quantisation on by default
