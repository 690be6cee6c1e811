"""The divergence guard's verdicts (pure logic): non-finite losses and skipped optimizer steps stop a run at once,
KL to the reference over the bound stops it after `patience` consecutive steps and holds back checkpoints."""
import math

from rlhf_ray.config import load_config
from rlhf_ray.guard import DivergenceGuard


def healthy(**kw) -> dict:
    return {"policy/loss": 0.01, "value/loss": 0.2, "kl/ref_per_seq": 2.0, "response/length_mean": 20.0,
            "reward/score_mean": 0.1, "policy/approx_kl": 0.001, "policy/skipped_steps": 0, **kw}


def guard(**sets):
    return DivergenceGuard(load_config(None, [f"guard.{k}={v}" for k, v in sets.items()]).guard)


def test_non_finite_metrics_and_skipped_steps_stop_at_once():
    for bad in ({"policy/loss": math.nan}, {"value/loss": math.inf}, {"kl/ref_per_seq": math.nan}):
        stop, publish = guard().check(7, healthy(**bad))
        key = next(iter(bad))
        assert stop == f"step 7: {key} is {bad[key]}: the run diverged" and not publish
    stop, publish = guard().check(3, healthy(**{"value/skipped_steps": 2.0}))
    assert stop.startswith("step 3: value/skipped_steps = 2") and not publish


def test_kl_over_the_bound_strikes_then_stops_and_a_healthy_step_resets():
    g = guard(max_kl_per_token=0.5, patience=3)
    over = healthy(**{"kl/ref_per_seq": 20.0})           # 1 nat per token over 20 tokens
    assert g.check(1, over) == (None, False)              # over: no stop yet, but no checkpoint either
    assert g.check(2, over) == (None, False)
    assert g.check(3, healthy()) == (None, True) and g.strikes == 0
    g.check(4, over), g.check(5, over)
    stop, publish = g.check(6, over)
    assert stop.startswith("step 6: KL to the reference 1 nats/token, over guard.max_kl_per_token (0.5) for 3 "
                           "consecutive steps") and not publish


def test_the_kl_bound_can_be_switched_off():
    assert guard(max_kl_per_token="null").check(1, healthy(**{"kl/ref_per_seq": 1e6})) == (None, True)
