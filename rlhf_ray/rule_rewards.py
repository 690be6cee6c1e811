"""Rule-based rewards usable as `reward.sources: [{kind: function, path: "rlhf_ray.rule_rewards:<name>"}]`.

Each takes the batch's prompts and responses as text (plus, as keyword lists, the prompt rows' fields named in
data.reward_keys) and returns one float per response. Write your own in
any module importable on the cluster's nodes (an installed package, or Ray's runtime_env working_dir).
"""
from __future__ import annotations


def ends_with_period(prompts: list[str], responses: list[str]) -> list[float]:
    """1 for an answer that ends a sentence, else 0: a format reward."""
    return [1.0 if r.rstrip().endswith((".", "!", "?")) else 0.0 for r in responses]


def contains_answer(prompts: list[str], responses: list[str], answer: list[str]) -> list[float]:
    """1 when the row's reference answer appears in the response (case-insensitive), else 0: a verifiable
    reward in the style of GSM8K / R1. Needs data.reward_keys: [answer]."""
    return [1.0 if str(a).strip().lower() in r.lower() else 0.0 for r, a in zip(responses, answer)]
