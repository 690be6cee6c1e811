"""Multi-turn pieces that need no cluster: an episode's tokens, mask and per-turn rewards; an environment's answers
checked; the step's env/* metrics; turn-stop strings as token ids; the config's limits."""
import pytest
import torch

from rlhf_ray.batch import EpisodeSample, Sample, rollout_from_episodes, rollout_from_samples
from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.env import EnvError, EnvStep, Episode, checked_step, env_stop_ids, episode_metrics, load_env_class


def test_an_episode_keeps_turns_and_observations_token_for_token():
    ep = Episode()
    ep.add_observation([9])                      # reset's first observation
    ep.add_turn([1, 2, 3], [-0.1, -0.2, -0.3])
    ep.reward_turn(0.5)
    ep.add_observation([7, 8])
    ep.add_turn([4, 5], [-0.4, -0.5])
    ep.reward_turn(1.0)
    ep.reward_turn(-0.25)                        # e.g. the error penalty, on the same (last) turn
    assert ep.ids == [9, 1, 2, 3, 7, 8, 4, 5]
    assert ep.action == [0, 1, 1, 1, 0, 0, 1, 1]
    assert ep.logprobs == [0.0, -0.1, -0.2, -0.3, 0.0, 0.0, -0.4, -0.5]
    assert ep.token_rewards() == [0, 0, 0, 0.5, 0, 0, 0, 0.75]
    s = ep.summary()
    assert (s["turns"], s["action_tokens"], s["observation_tokens"], s["reward"]) == (2, 5, 3, 1.25)
    nowhere = Episode()
    nowhere.reward_turn(-1.0)                    # ended before its first turn: nothing to put it on
    assert nowhere.token_rewards() == [] and nowhere.summary()["reward"] == 0


def test_episodes_become_a_batch_with_their_action_mask_and_turn_rewards():
    one = EpisodeSample(ids=[5, 6, 7, 8], logprobs=[-1.0, 0.0, -2.0, -3.0], finished=True, version=0,
                        action=[1, 0, 1, 1], token_rewards=[0.5, 0, 0, 1.0], episode={})
    two = EpisodeSample(ids=[5], logprobs=[-1.0], finished=False, version=0, action=[1], token_rewards=[0.0],
                        episode={})
    b = rollout_from_episodes([[1, 2], [3]], [one, two], pad_id=0)
    assert b.response_mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert b.action_mask.tolist() == [[1, 0, 1, 1], [1, 0, 0, 0]]
    assert b.token_rewards.tolist() == [[0.5, 0, 0, 1.0], [0, 0, 0, 0]]
    single = rollout_from_samples([[1, 2]], [Sample(ids=[5, 6], logprobs=[-1.0, -1.0], finished=True, version=0)], 0)
    assert single.token_rewards is None and torch.equal(single.action_mask, single.response_mask)


def test_an_environments_answer_is_checked():
    assert checked_step(EnvStep("4", 1.0, False, {"tool_calls": 1}), "env").observation == "4"
    for bad, why in ((None, "not an EnvStep"), (EnvStep(observation=4), "observation is int"),
                     (EnvStep(reward=float("nan")), "not a finite number"), (EnvStep(reward=True), "not a finite"),
                     (EnvStep(done=1), "done is int"), (EnvStep(metrics={"x": "1"}), "metrics")):
        with pytest.raises(EnvError, match=why):
            checked_step(bad, "env")


def test_env_classes_load_by_name_or_say_why_not():
    from rlhf_ray.env import Environment
    assert load_env_class("rlhf_ray.env:Environment") is Environment
    with pytest.raises(EnvError, match=r"^env.cls 'rlhf_ray.nope:X': cannot load it \(ModuleNotFoundError"):
        load_env_class("rlhf_ray.nope:X")
    with pytest.raises(EnvError, match="not a class with a step"):
        load_env_class("rlhf_ray.env:checked_step")


def test_episode_metrics_count_failures_endings_and_the_environments_own_counts():
    eps = [{"turns": 2, "action_tokens": 6, "observation_tokens": 2, "ended": "done", "reward": 1.0,
            "metrics": {"tool_calls": 1}},
           {"turns": 1, "action_tokens": 3, "observation_tokens": 0, "ended": "timeout", "reward": -1.0, "metrics": {}},
           {"turns": 1, "action_tokens": 2, "observation_tokens": 0, "ended": "error", "reward": -1.0,
            "metrics": {"tool_calls": 2, "invalid_calls": 1}},
           {"turns": 4, "action_tokens": 9, "observation_tokens": 5, "ended": "turns", "reward": 0.0, "metrics": {}}]
    m = episode_metrics(eps)
    assert (m["env/turns_mean"], m["env/action_tokens_mean"], m["env/observation_tokens_mean"]) == (2.0, 5.0, 1.75)
    assert (m["env/errors"], m["env/timeouts"], m["env/reward_mean"]) == (1, 1, -0.25)
    assert (m["env/tool_calls_mean"], m["env/invalid_calls_mean"]) == (0.75, 0.25)
    assert (m["env/ended_done_frac"], m["env/ended_turns_frac"], m["env/ended_length_frac"]) == (0.25, 0.25, 0.0)


def test_turn_stop_strings_must_be_one_token_each():
    from rlhf_ray.tiny_world.world import train_tokenizer
    tok = train_tokenizer("The end. Another sentence, and the end.\n\nMore text here. " * 20, 300)
    assert env_stop_ids(tok, ["."]) == tok(".", add_special_tokens=False)["input_ids"]
    with pytest.raises(EnvError, match=r"^env.turn_stop: 'certainly not one token' is \d+ tokens"):
        env_stop_ids(tok, ["certainly not one token"])


def test_the_env_config_is_checked_before_anything_starts():
    base = ["models.policy=p", "data.prompts=d", "reward.sources=[{kind: env}]", "ppo.advantage=grpo",
            "generation.n=2", "generation.prompts_per_step=4", "ppo.minibatch_size=8"]
    load_config(None, base + ["env.cls=rlhf_ray.env:Environment"]).check_ppo()
    for sets, key in ((["env.cls="], "^config: env.cls is required by reward.sources"),
                      (["env.cls=noColon"], "env.cls must read"),
                      (["env.cls=a:B", "env.max_turns=0"], "env.max_turns"),
                      (["env.cls=a:B", "env.max_turn_tokens=999"], "env.max_turn_tokens"),
                      (["env.cls=a:B", "reward.sources=[{kind: function, path: 'a:b'}]"], "reward.sources"),
                      (["env.cls=a:B", "ppo.reward_norm=initial"], "ppo.reward_norm")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, base + sets).check_ppo()


def test_the_tool_tasks_demonstrations_train_the_turns_and_never_the_observation():
    """Token for token what a rollout of the task holds: prompt, call turn, the calculator's observation tokenised
    on its own, final turn and EOS; labels on the two turns only."""
    from rlhf_ray.tiny_world.world import train_tokenizer
    from rlhf_ray.tiny_world.tool_task import IGNORE, demonstration, problems
    tok = train_tokenizer("Question: What is 12 times 34? The answer is 408. <call>1*2= 3\n\n" * 20, 300)
    held = problems(5, 1)
    train = problems(50, 0, {(r["a"], r["b"]) for r in held})
    assert len({(r["a"], r["b"]) for r in train + held}) == 55 and all(r["answer"] == str(r["a"] * r["b"]) for r in train)
    row = train[0]
    ids, labels = demonstration(tok, row)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt, call, obs = enc(row["prompt"]), enc(f" <call>{row['a']}*{row['b']}="), enc(" " + row["answer"])
    final = enc(f" The answer is {row['answer']}.") + [tok.eos_token_id]
    assert ids == prompt + call + obs + final
    assert labels == [IGNORE] * len(prompt) + call + [IGNORE] * len(obs) + final
