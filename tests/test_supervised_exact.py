"""The supervised stages' losses are exact across micro-batches: one minibatch cut into micro-batches of 1, 2 or 4
rows gives the optimizer step the same gradient (within 1e-6), for SFT (token-mean over the minibatch's labelled
tokens, however long each example is), the reward model (each ranking counts once, however many pairs it has) and
DPO. Micro-batches are cut by length, so a loss that divided by its own micro-batch's count would weigh the tokens
of short examples more than those of long ones (the gradient-accumulation bug transformers fixed in 4.46).

What runs is the stage actor's own loop (`Supervised.train` -> `_minibatch_updates`: shard, sort by length, cut,
loss with the minibatch's denominators) on one rank. The stand-in for the DeepSpeed engine is pure arithmetic: it
does what DeepSpeed's engine does with a micro-batch loss (backward of loss / gradient_accumulation_steps,
gradients summed until the step), and records the gradient at each optimizer step. Quick: no Ray, no DeepSpeed."""
import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

from actors.supervised import Supervised
from conftest import AccumulatingEngine
from rlhf_ray.batch import RankingBatch, ThumbsBatch
from rlhf_ray.config import StageConfig
from rlhf_ray.sft import IGNORE, collate_sft
from rlhf_ray.stage_data import trim_to_multiple

CFG = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
           num_key_value_heads=2, pad_token_id=0)


def step_gradient(objective: str, model, data, micro: int) -> torch.Tensor:
    """The gradient of the one optimizer step a stage actor takes on `data` (one minibatch) in micro-batches."""
    n = len(data)
    stage = StageConfig(batch_size=n, beta=0.1)
    stage.trainer.micro_batch_size = micro
    actor = Supervised(0, 1, stage, objective, "float32", "cpu", seed=0)
    actor.model = copy.deepcopy(model)
    actor.engine, actor.micro = AccumulatingEngine(actor.model, n // micro), micro
    actor.train(data, 1)
    assert len(actor.engine.steps) == 1
    return actor.engine.steps[0]


def assert_split_free(objective: str, model, data) -> None:
    grads = {m: step_gradient(objective, model, data, m) for m in (1, 2, 4)}
    scale = grads[4].abs().max().item()
    for m in (1, 2):
        assert (grads[m] - grads[4]).abs().max().item() < 1e-6 * max(1.0, scale), (objective, m)


def test_sft_token_mean_is_exact_across_micro_batches_of_unequal_length():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CFG))
    g = torch.Generator().manual_seed(1)
    examples = []
    for length, answer in ((3, 1), (5, 2), (9, 6), (12, 10)):      # short and long examples, few and many labels
        ids = torch.randint(1, 64, (length,), generator=g).tolist()
        examples.append((ids, [IGNORE] * (length - answer) + ids[-answer:]))
    assert_split_free("sft", model, collate_sft(examples, pad_id=0))


def ranking_data(with_ref: bool) -> RankingBatch:
    """Four rankings of 2-4 answers (1 to 6 pairs each), [G, K, L] right-padded, as stage_data.ranking_batch makes."""
    g = torch.Generator().manual_seed(2)
    G, K, L = 4, 4, 7
    ids = torch.randint(1, 64, (G, K, L), generator=g)
    mask = torch.zeros(G, K, L, dtype=torch.long)
    labels = torch.full((G, K, L), IGNORE)
    pairs = torch.zeros(G, K, K)
    for gi, k in enumerate((2, 4, 3, 4)):
        for a in range(k):
            n = 3 + (gi + a) % 5
            mask[gi, a, :n] = 1
            labels[gi, a, 2:n] = ids[gi, a, 2:n]
        for a in range(k):
            for b in range(a + 1, k):
                pairs[gi, a, b] = 1.0
    return RankingBatch(ids * mask, mask, labels, pairs, -torch.rand(G, K, generator=g) * 5 if with_ref else None)


def test_reward_model_loss_is_exact_across_micro_batches():
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(Qwen2Config(**CFG, num_labels=1))
    assert_split_free("rm", model, trim_to_multiple(ranking_data(with_ref=False), 4))


def test_dpo_loss_is_exact_across_micro_batches():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CFG))
    assert_split_free("dpo", model, ranking_data(with_ref=True))


def thumbs_data() -> ThumbsBatch:
    """Eight judged answers (five up, three down) of unequal length, each with its KL slot, [N, 2, L]."""
    g = torch.Generator().manual_seed(4)
    N, L = 8, 9
    ids = torch.randint(1, 64, (N, 2, L), generator=g)
    mask = torch.zeros(N, 2, L, dtype=torch.long)
    labels = torch.full((N, 2, L), IGNORE)
    for i in range(N):
        for k in range(2):
            n = 3 + (i * 3 + k) % 7
            mask[i, k, :n] = 1
            labels[i, k, 2:n] = ids[i, k, 2:n]
    desirable = torch.tensor([True, False, True, True, False, True, False, True])
    # reference logprobs well under the model's on the KL slot, so z0 (clamped at 0) is positive and varies by row
    ref = torch.stack([-torch.rand(N, generator=g) * 20 - 10, -torch.rand(N, generator=g) * 20 - 40], 1)
    return ThumbsBatch(ids * mask, mask, labels, desirable, ref)


def test_kto_loss_is_exact_across_micro_batches():
    """KTO's reference point z0 is a minibatch statistic, taken once before the micro-batches: the step's gradient
    does not depend on how the minibatch is cut (a z0 per micro-batch would)."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CFG))
    assert_split_free("kto", model, thumbs_data())


@pytest.mark.parametrize("objective", ["rm", "dpo"])
def test_a_ranking_without_pairs_weighs_nothing(objective):
    """A ranking whose answers all tied has no pair: it adds nothing to the loss and dilutes no other ranking's
    weight, however the minibatch is cut."""
    torch.manual_seed(0)
    cls = Qwen2ForSequenceClassification if objective == "rm" else Qwen2ForCausalLM
    model = cls(Qwen2Config(**CFG, **({"num_labels": 1} if objective == "rm" else {})))
    data = ranking_data(with_ref=objective == "dpo")
    data.pairs[1] = 0.0
    assert_split_free(objective, model, data)


def test_the_run_seed_reaches_the_trainers_update_randomness():
    """Two runs that differ only in run.seed shuffle their PPO minibatches differently (the policy's and the
    critic's randomness derives from (run seed, role, step, rank)); the same seed repeats them exactly."""
    from actors.policy import Policy
    from rlhf_ray.batch import Experience
    from rlhf_ray.config import load_config
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CFG))
    g = torch.Generator().manual_seed(3)
    B, P, T = 8, 3, 4
    exp = Experience(torch.randint(1, 64, (B, P + T), generator=g), torch.ones(B, P + T, dtype=torch.long),
                     torch.ones(B, T), old_logprobs=torch.full((B, T), -4.0), ref_logprobs=torch.full((B, T), -4.0),
                     advantages=torch.randn(B, T, generator=g))

    def first_step(seed: int) -> torch.Tensor:
        cfg = load_config("configs/tiny_ppo.yaml", [f"run.seed={seed}", "policy.num_ranks=1"])
        cfg.ppo.minibatch_size, cfg.ppo.epochs = 4, 1                   # two minibatches: the order matters
        actor = Policy(0, 1, cfg, "cpu")
        actor.model = copy.deepcopy(model)
        actor.engine, actor.micro = AccumulatingEngine(actor.model, 1), 4
        actor.train(exp, 5)
        return actor.engine.steps[0]

    assert torch.equal(first_step(1), first_step(1))
    assert not torch.allclose(first_step(1), first_step(2))


def test_kto_weights_and_beta_from_the_stage_config_reach_the_loss():
    """kto.desirable_weight / undesirable_weight / beta: the actor's loss is kto_loss with the stage's values."""
    from rlhf_ray.prefs import kto_loss
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CFG))
    data = thumbs_data()
    losses = {}
    for w in ((1.0, 1.0), (2.0, 0.5)):
        stage = StageConfig(batch_size=len(data), beta=0.3, desirable_weight=w[0], undesirable_weight=w[1])
        actor = Supervised(0, 1, stage, "kto", "float32", "cpu", seed=0)
        actor.model, actor.micro, actor.device = copy.deepcopy(model), len(data), "cpu"
        actor._kto_z0(data)
        with torch.no_grad():
            losses[w] = actor._loss(data)[0].item()
            lp = actor._answer_logprobs(data)[:, 0]
        want = kto_loss(lp, data.ref_logprobs[:, 0], data.desirable, actor._z0, 0.3, *w)[0].item()
        assert losses[w] == pytest.approx(want, rel=1e-6)
    assert losses[(1.0, 1.0)] != pytest.approx(losses[(2.0, 0.5)])
