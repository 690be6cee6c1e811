"""Agents through the OpenAI-compatible endpoint, end to end on the real actor machinery (Ray, DeepSpeed over gloo,
a vLLM CPU engine, the gateway and agent workers; the agents are real `openai`-client code, tests/agents.py): a
GRPO run one step off-policy whose agents misbehave, then, on its actors, the same episodes through the agent and
through env.cls token for token, and 200 agents at once. Slow."""
import json
import re
import time
import zlib

import pytest
import ray

from actors.agent import AgentWorkerActor
from actors.env import EnvWorkerActor
from conftest import OFF_POLICY_LAYOUT, tiny_overrides
from launch.ppo import train
from launch.rollout import episode_seeds
from rlhf_ray.config import load_config
from rlhf_ray.env import ENDINGS, env_stop_ids
from rlhf_ray.models import load_tokenizer
from rlhf_ray.prompts import render_prompts
from rlhf_ray.tiny_world.tool_task import CallFormat, demonstration, problems, sft_until_success

pytestmark = pytest.mark.slow

MODES = ["ok", "ok", "raise", "ok", "hang", "malformed", "ok", "late"]     # each prompt row's agent, by index mod 8
# configs/tiny_agent.yaml as shipped, but for the agent (the calculator agent, misbehaving as each row says)
AGENT = ["agent.cls=tests.agents:faulty", "agent.timeout_s=6", "data.reward_keys=[answer, mode]"]
# the tool task's limits (benchmarks/tool_task.py), the same for the agent (rlhf_ray/tiny_world/tool_task.py) and env.cls
TOOL_ENV = ["env.cls=rlhf_ray.tool_envs:Calculator", "env.turn_stop=['=']", "env.max_turns=3", "env.max_turn_tokens=16",
            "env.timeout_s=10", "reward.sources=[{kind: env}]"]


def tool_policy(world: dict, out) -> str:
    """The world's policy after 80 steps of the tool task's SFT: enough to call the calculator in most episodes
    (not to solve them)."""
    rows = problems(500, 0)
    sft_until_success(world["policy"], out, lambda tok: [demonstration(tok, r) for r in rows], lambda m, t: 0.0,
                      1.0, 10 ** 9, 80, 1e-3, 32, 0, log=lambda *_: None)
    return str(out)


def test_agents_train_through_the_endpoint_match_env_episodes_token_for_token_and_serve_200_at_once(tiny_world,
                                                                                                    tmp_path, capsys):
    policy = tool_policy(tiny_world, tmp_path / "tool-policy")
    prompts = tmp_path / "tool.jsonl"
    rows = problems(8, 1)          # one step's prompts: every step has one row of each mode
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"], "mode": MODES[i % 8]}) + "\n"
                               for i, r in enumerate(rows)))
    run_dir = tmp_path / "run"
    cfg = load_config("configs/tiny_agent.yaml", tiny_overrides(tiny_world, run_dir) + AGENT + [
        f"models.policy={policy}", f"data.prompts={prompts}", "generation.max_new_tokens=40", "generation.n=4",
        "ppo.minibatch_size=16", "ppo.missing_eos_penalty=0", "policy.num_ranks=1", "train.steps=3",
        # one step off-policy: the next step's agents run while the trainers update (an engine of its own)
        "rollout.max_staleness=1", "ppo.is_correction=tis", *OFF_POLICY_LAYOUT])
    summary = train(cfg, keep_actors=True)
    actors = summary["actors"]
    try:
        # 1. the run: agents that raise, hang, send a malformed call or call after their episode, each counted, one
        # line, the run going on; the others' episodes several calls long, token for token (checked below)
        m = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["rollout/staleness_max"] for r in m] == [0, 1, 1]
        # 8 prompts a step, each mode's 4 episodes together. The hanging ones always time out; on a loaded box (the
        # suite's other worker, the update beside the next step's agents) a slow "ok" one may too
        for r in m:
            assert r["agent/errors"] == 4 and r["agent/timeouts"] >= 4, r
            assert r["agent/malformed_calls_mean"] == pytest.approx(4 / 32)
            assert sum(r[f"agent/ended_{why}_frac"] for why in ENDINGS) == pytest.approx(1.0)
            assert r["agent/cut_edited_mean"] == r["agent/cut_rerendered_mean"] == 0
        assert sum(r.get("agent/late_calls", 0) for r in m) >= 4          # counted when they come
        lines = [line for line in capsys.readouterr().out.splitlines() if "agent episodes failed" in line]
        assert len(lines) == 3 and all(re.fullmatch(r"step \d: \d+ of 32 agent episodes failed \(4 errors, \d+ "
                                                    r"timeouts\); the first: RuntimeError: the agent crashed", line)
                                       for line in lines), lines
        assert max(r["agent/turns_mean"] for r in m) > 1.2 and all(r["agent/observation_tokens_mean"] > 0 for r in m)
        # the last step's episodes ran in the one before
        assert all(r["time/busy/gateway"] > 0 and r["time/generate"] > 0 for r in m[:-1])

        # 2. the same episodes through the agent (the gateway) and through env.cls on the same engine and seeds:
        # equal token for token, logprobs and rewards included
        tok = load_tokenizer(policy)
        ok = [dict(r, mode="ok") for r in problems(16, 2)]
        n, seeds = 2, episode_seeds(99, (1,), 16, 2)
        flat = [s for row in seeds for s in row]
        env_cfg = load_config("configs/tiny_grpo.yaml", [f"models.policy={policy}", *TOOL_ENV])
        env_worker = EnvWorkerActor.remote(0, 1, env_cfg, "cpu")
        ray.get(env_worker.ready.remote())        # started (its imports) before env.timeout_s counts its answers
        ids = render_prompts(tok, [r["prompt"] for r in ok], cfg.data)
        through_env = ray.get(actors.engines[0].episodes.remote(
            ids, ok, n, 40, 1.0, 1.0, flat, env_cfg.env, env_stop_ids(tok, ["="]), [env_worker]))
        gateway = actors.gateway.actors[0]
        through_agent = ray.get(gateway.episodes.remote([r for r in ok for _ in range(n)], flat, actors.agent.actors,
                                                        True, 120.0))
        assert len(through_env) == len(through_agent) == 32
        for i, (e, a) in enumerate(zip(through_env, through_agent)):
            assert a["prompt"] == ids[i // n]
            assert a["ids"] == e["ids"] and a["action"] == e["action"], i
            assert a["logprobs"] == pytest.approx(e["logprobs"], abs=1e-5)
            assert a["token_rewards"] == e["token_rewards"]
            assert a["episode"]["turns"] == e["episode"]["turns"]
        assert sum(e["episode"]["turns"] >= 2 for e in through_env) >= 8       # multi-turn: tool calls answered
        # re-tokenising the transcript (what a text-in endpoint would train on) is not the episode
        retokenised = [tok(tok.decode(p + a["ids"]), add_special_tokens=False)["input_ids"] != p + a["ids"]
                       for p, a in zip([p for p in ids for _ in range(n)], through_agent)]
        assert any(retokenised)

        # 3. 200 agents at once on loopback, three calls each: no call lost or crossed (each trajectory holds its own
        # tag three times and no other, and each agent's replies are its session's recorded turns)
        tags = [f"t{i:03d}x" for i in range(200)]
        tagged = AgentWorkerActor.remote(0, 1, load_config(None, ["agent.cls=tests.agents:tagged"]), "cpu")
        t0 = time.perf_counter()
        out = ray.get(gateway.episodes.remote([{"tag": t} for t in tags], list(range(200)), [tagged], True, 120.0))
        print(f"200 agents, 3 calls each: {time.perf_counter() - t0:.1f} s")
        fmt = CallFormat()
        for tag, s in zip(tags, out):
            text = tok.decode(s["prompt"] + s["ids"])
            assert s["episode"]["ended"] == "done" and s["episode"]["turns"] == 3, s["episode"]
            assert text.count(tag) == 3 and sum(t in text for t in tags) == 1
            turns, i, act = [], 0, s["action"]
            while i < len(act):
                j = i
                while j < len(act) and act[j] == act[i]:
                    j += 1
                if act[i]:
                    turns.append(fmt.parse(tok.decode(s["ids"][i:j], skip_special_tokens=True))[0] or "")
                i = j
            assert s["token_rewards"][-1] == float(zlib.crc32("|".join(turns).encode()) % 100_000)
        counts = ray.get(gateway.take_counters.remote())
        assert counts.get("agent/unknown_sessions", 0) == 0 and counts.get("agent/unauthorized_calls", 0) == 0
    finally:
        actors.shutdown()
