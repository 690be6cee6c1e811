"""Rule rewards the end-to-end tests score with (reward.sources path "tests.reward_fns:..."; the Ray workers import
it from the repository root, their working directory): real user code for the reward actor, not a stand-in."""


def uniform_or_varied(prompts, responses, mode):
    """Per the prompt row's `mode`: "uniform" scores every answer 0 (each group's rewards all equal: no signal for
    a group estimator); "varied" scores an answer by its length in characters mod 3, which differs within most
    groups of sampled answers."""
    return [0.0 if m == "uniform" else float(len(r) % 3) for r, m in zip(responses, mode)]
