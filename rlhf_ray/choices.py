"""Every algorithm choice the config names, defined once. The config types its keys with these, and the code that
implements them (rlhf_ray/algos.py) checks its registry against them, so a choice cannot exist in one place and
not the other. No torch here: the config (and `rlhf-ray plan`) loads without it."""
from __future__ import annotations

import typing
from typing import Literal

AdvantageEstimator = Literal["gae", "grpo", "rloo", "reinforce++"]       # only gae needs a critic
KLEstimator = Literal["k1", "k2", "k3"]
KLPlacement = Literal["reward", "loss"]
LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
ISCorrection = Literal["none", "tis", "mask"]
RatioLevel = Literal["token", "sequence"]        # sequence: GSPO's one length-normalised ratio per answer
RewardNorm = Literal["none", "initial"]          # initial: scores standardised by the first batch's mean and sd
Quantization = Literal["none", "nf4", "int8"]    # a frozen base in 4-bit NF4 or 8-bit LLM.int8 (bitsandbytes)
ComputeDtype = Literal["float32", "bfloat16"]
SFTFormat = Literal["alpaca", "dolly", "messages", "text", "oasst2"]        # data formats (rlhf_ray/formats.py)
PreferenceFormat = Literal["pairwise", "ranking", "hh", "ultrafeedback", "ultrafeedback_overall", "oasst2"]


def options(choice) -> tuple[str, ...]:
    """The names a choice allows, e.g. options(LossAggregation)."""
    return typing.get_args(choice)
