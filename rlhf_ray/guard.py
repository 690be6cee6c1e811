"""The divergence guard: a run whose losses went non-finite, whose optimizer skipped steps, or whose policy ran
away from the reference stops with one line naming the step and the metric, instead of logging NaN to the end
and publishing checkpoints of ruined weights (config section `guard`)."""
from __future__ import annotations

import math

# metrics that are never NaN or infinite in a healthy step
MUST_BE_FINITE = ("policy/loss", "value/loss", "kl/ref_per_seq", "reward/score_mean", "policy/approx_kl")
# optimizer steps DeepSpeed skipped this step because the gradients were not finite
SKIPPED = ("policy/skipped_steps", "value/skipped_steps")


class DivergenceGuard:
    def __init__(self, cfg, strikes: int = 0):
        self.cfg, self.strikes = cfg, strikes      # strikes: consecutive steps over the KL bound so far

    def check(self, step: int, m: dict) -> tuple[str | None, bool]:
        """(why the run must stop, or None; whether a checkpoint of this step's state may be published)."""
        for key in MUST_BE_FINITE:
            if key in m and not math.isfinite(m[key]):
                return f"step {step}: {key} is {m[key]}: the run diverged", False
        for key in SKIPPED:
            if m.get(key, 0) > 0:
                return f"step {step}: {key} = {m[key]:g}: optimizer steps skipped on non-finite gradients", False
        bound = self.cfg.max_kl_per_token
        if bound is None or "kl/ref_per_seq" not in m:      # no bound, or no update this step: nothing moved
            return None, True
        per_token = m["kl/ref_per_seq"] / max(m["response/length_mean"], 1.0)
        if per_token <= bound:
            self.strikes = 0
            return None, True
        self.strikes += 1
        if self.strikes >= self.cfg.patience:
            return (f"step {step}: KL to the reference {per_token:.3g} nats/token, over guard.max_kl_per_token "
                    f"({bound:g}) for {self.strikes} consecutive steps: the policy ran away (against a learned reward "
                    f"model; a verifiable reward may move it this far by learning: raise the bound or set it null)"), False
        return None, False
