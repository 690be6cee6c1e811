"""A rollout that fails in the background reaches the driver as one line, never a hang: the driver's collection
path (`launch.rollout.Sampling.samples`) on a real local Ray cluster, against stand-in engine actors that raise or
die mid-generation (what is tested is the driver's handling, not vLLM), and the judge reward source against
stand-in judge engines that hang, raise or die. Slow: it starts Ray."""
import math
import time

import pytest
import ray

from launch.common import RunError, run_cli
from launch.rollout import Generation, RolloutError, Sampling
from rlhf_ray.config import load_config
from rlhf_ray.rewards import RewardSourceError

pytestmark = pytest.mark.slow


@ray.remote(num_cpus=0)
class BrokenEngine:
    def generate(self, *args):
        raise ValueError("max_tokens must be at least 1, got 0.\n(and a second line a traceback would add)")

    def hang(self, *args):
        time.sleep(60)


def rollout_of(refs) -> Generation:
    return Generation(step=7, prompt_ids=[[1, 2]], prompts=["p"], extras={}, refs=refs, stream_state={})


def test_a_failed_or_dead_engine_is_a_one_line_error_not_a_hang():
    cfg = load_config(None, ["models.policy=p", "data.prompts=x", "generation.n=1"])
    engine = BrokenEngine.remote()
    with pytest.raises(RolloutError) as e:
        Sampling(cfg, None, None, None).samples(rollout_of([engine.generate.remote()]))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("rollout for step 7 failed on an engine: ValueError:"), msg
    assert isinstance(e.value, RunError)

    t0 = time.time()
    ref = engine.hang.remote()
    time.sleep(1)
    ray.kill(engine)                                    # the engine dies mid-generation
    with pytest.raises(RolloutError) as e:
        Sampling(cfg, None, None, None).samples(rollout_of([ref]))
    assert time.time() - t0 < 30 and "\n" not in str(e.value) and "step 7" in str(e.value)


def test_the_cli_prints_a_run_error_in_one_line_and_exits_1(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models: {policy: p}\n")

    def fail(config, args):
        raise RolloutError("rollout for step 3 failed on an engine: RayActorError: The actor died unexpectedly")
    assert run_cli("rlhf-ray ppo", "test", fail, ["--config", str(cfg)]) == 1
    assert capsys.readouterr().err == ("error: rollout for step 3 failed on an engine: RayActorError: "
                                       "The actor died unexpectedly\n")


@ray.remote(num_cpus=0)
class BrokenScorer:
    def scores_by_source(self, *args):
        from rlhf_ray.rewards import RewardSourceError
        raise RewardSourceError("reward function 'm:f': expected 16 rewards, got [0.5]\n(a second line)")


def test_an_actor_exception_reaches_the_cli_as_one_line(capsys, tmp_path):
    """A reward source answering wrongly (or any exception in an actor that kills no actor) is not a fault to
    recover from: the CLI prints the method and the root cause in one line and exits 1."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models: {policy: p}\n")
    scorer = BrokenScorer.remote()
    assert run_cli("rlhf-ray ppo", "test", lambda c, a: ray.get(scorer.scores_by_source.remote()),
                   ["--config", str(cfg)]) == 1
    assert capsys.readouterr().err == ("error: BrokenScorer.scores_by_source failed: RewardSourceError: reward "
                                       "function 'm:f': expected 16 rewards, got [0.5]\n")


def test_a_dead_actor_past_the_restart_bound_stops_the_run_in_one_line():
    """fault_tolerance.max_actor_restarts reaches the recovery: with it at 0, a dead engine is named, with the
    cause, in one RunError; the liveness probe finds exactly that actor (real Ray groups of stand-in ranks)."""
    from types import SimpleNamespace

    from actors.group import RankGroup
    from launch.ppo import dead_actors, recover
    from launch.roles import Actors

    class Standin:            # a rank that only answers whether it is alive (what the recovery asks first);
        def __init__(self, rank, world_size):      # defined here so that Ray ships it by value to its workers
            self.rank = rank

        def ready(self):
            return True
    remote = ray.remote(num_cpus=0)(Standin)
    groups = {role: RankGroup(remote, role, 2 if role == "engine" else 1, 0.1, 0.0)
              for role in ("policy", "reference", "reward", "engine")}
    actors = Actors(groups["policy"], None, groups["reference"], groups["reward"], groups["engine"])
    ray.kill(actors.engines[1])
    assert dead_actors(actors, timeout=10) == [("engine", 1)]
    cfg = load_config(None, ["models.policy=p", "data.prompts=x", "fault_tolerance.max_actor_restarts=0"])
    error = ray.exceptions.RayActorError()
    with pytest.raises(RunError) as e:
        recover(SimpleNamespace(cfg=cfg, actors=actors, restarts=0), 5, error, None)
    assert str(e.value).startswith("step 5: engine rank 1 died (RayActorError") and \
        str(e.value).endswith("fault_tolerance.max_actor_restarts (0) already used") and "\n" not in str(e.value)
    actors.shutdown()


def test_roles_sharing_processes_live_and_die_together_and_are_replaced_once():
    from actors.group import RankGroup
    from actors.host import RoleHostActor, RoleView

    class Counter:
        """A stand-in role: plain class, built in a RoleHost like Reference or Reward (defined here, so Ray ships
        it by value)."""

        def __init__(self, rank, world_size, start):
            self.n = start

        def bump(self):
            self.n += 1
            return self.n

        def pid(self):
            import os
            return os.getpid()

    hosts = RankGroup(RoleHostActor, "a+b", 2, 0.01, 0, ([("a", Counter, (0,)), ("b", Counter, (100,))],))
    a, b = RoleView(hosts, "a"), RoleView(hosts, "b")
    assert a.base is b.base is hosts
    assert a.run("bump") == [1, 1] and b.run("bump") == [101, 101]        # each rank keeps its own roles' state
    assert a.run("pid") == b.run("pid") and len(set(a.run("pid"))) == 2    # rank i of both: one process each
    ray.kill(hosts.actors[1])
    deadline = time.time() + 30
    while True:           # ray.kill is asynchronous: a call sent at once may still be served on a busy box
        try:
            ray.get(hosts.actors[1].ready.remote())
        except ray.exceptions.RayActorError:
            break
        assert time.time() < deadline, "a killed host still answers after 30 s"
        time.sleep(0.1)
    for view in (a, b):                                                    # both roles died with the process
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(view.actors[1].bump.remote())
    a.base.respawn([1])
    assert a.run("bump") == [2, 1] and b.run("bump") == [102, 101]         # rank 1 fresh, rank 0 untouched
    a.shutdown()
    b.shutdown()                                                           # a second shutdown does nothing


@ray.remote(num_cpus=0)
class StandInJudge:
    """A judge engine's contract (Engine.label_logprobs), scripted: what is tested is the judge source's handling
    of slow, failing and dead engines (actors/judge.py), not vLLM."""

    def __init__(self, script: list[str]):
        self.script, self.calls = list(script), 0

    def ready(self):
        return True

    def label_logprobs(self, prompt_token_ids, label_ids):
        self.calls += 1
        what = self.script.pop(0) if self.script else "ok"
        if what == "hang":
            time.sleep(30)
        if what == "raise":
            raise RuntimeError("CUDA error: an illegal memory access\n(second line)")
        return [[math.log(0.5), math.log(0.25)] for _ in prompt_token_ids]    # expected score 1/3 on values (0, 1)


def started(*scripts: list[str]) -> list:
    """Stand-in judges, each answering before it is handed over (a real judge engine is up before step 1: judge
    timeouts are per call, and a worker starting on a busy box can take longer than the 1 s these tests allow)."""
    judges = [StandInJudge.remote(s) for s in scripts]
    ray.get([j.ready.remote() for j in judges])
    return judges


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [{"good": 1, "bad": 2}.get(text, 3)] if text in ("good", "bad") else
                [ord(c) % 100 for c in text]}


def judge_scorer(*sets):
    from actors.judge import JudgeScorer
    cfg = load_config(None, ["reward.sources=[{kind: judge}]", "judge.model=j", "judge.score_labels=[bad, good]",
                             "judge.score_values=[0.0, 1.0]", "judge.verdict_labels=[good, bad]", "judge.batch_size=2",
                             "judge.timeout_s=1", *sets])
    return JudgeScorer(cfg, CharTokenizer())


def test_a_judge_call_that_fails_is_retried_a_bounded_number_of_times_then_fails_in_one_line_or_falls_back():
    prompts, responses = ["p"] * 4, ["r1", "r2", "r3", "r4"]
    scorer = judge_scorer("judge.retries=1")                   # two engines: chunk k goes to engine k, retries rotate
    scorer.attach(started(["raise"], []))
    assert scorer(prompts, responses) == pytest.approx([1 / 3] * 4)
    stats = scorer.take_stats()
    assert (stats["answers"], stats["retries"], stats["fallbacks"]) == (4, 1, 0)
    assert stats["label_mass"] == pytest.approx(4 * 0.75)

    scorer = judge_scorer("judge.retries=1")                   # hangs twice: 2 x timeout_s, then one line
    scorer.attach(started(["hang", "hang"]))
    t0 = time.time()
    with pytest.raises(RewardSourceError) as e:
        scorer(prompts[:2], responses[:2])
    assert time.time() - t0 < 10 and "\n" not in str(e.value)
    assert str(e.value).startswith("judge: a call for 2 answers failed 2 times (last: no answer within "
                                   "judge.timeout_s 1 s)"), str(e.value)

    scorer = judge_scorer("judge.retries=0", "judge.fallback_score=-1")   # fails: scored with the fallback, counted
    scorer.attach(started(["raise"]))
    assert scorer(prompts, responses) == pytest.approx([-1, -1, 1 / 3, 1 / 3])
    assert scorer.take_stats()["fallbacks"] == 2

    dead = StandInJudge.remote([])                             # a dead engine is not retried: the run replaces it
    ray.kill(dead)
    scorer = judge_scorer("judge.retries=3")
    scorer.attach([dead])
    with pytest.raises(ray.exceptions.ActorDiedError):
        scorer(prompts[:2], responses[:2])
    assert scorer.take_stats()["retries"] == 0


def test_the_label_stage_never_makes_a_label_up():
    """Ranking K answers with a judge that fails past its retries is a one-line error even with a fallback score
    set (that is for rewards), and a dead judge's error goes up as it is (the command prints it in one line)."""
    from actors.judge import judge_rankings
    cfg = load_config(None, ["judge.model=j", "judge.score_labels=[bad, good]", "judge.score_values=[0.0, 1.0]",
                             "judge.verdict_labels=[good, bad]", "judge.timeout_s=1", "judge.retries=0",
                             "judge.fallback_score=0"])
    answers = [["x", "y", "z"]]
    ranked = judge_rankings(cfg, started([]), CharTokenizer(), ["p"], answers, seed=0)[0]
    assert sorted(ranked.ranking) == [0, 1, 2] and len(ranked.verdicts) == 3
    assert all(v.p == pytest.approx(0.5) for v in ranked.verdicts.values())   # "good" first at 2:1 in both orders
    with pytest.raises(RewardSourceError, match=r"^judge: a call for 6 answers failed 1 times") as e:
        judge_rankings(cfg, started(["raise"]), CharTokenizer(), ["p"], answers, seed=0)
    assert "\n" not in str(e.value)
    dead = StandInJudge.remote([])
    ray.kill(dead)
    with pytest.raises(ray.exceptions.ActorDiedError):
        judge_rankings(cfg, [dead], CharTokenizer(), ["p"], answers, seed=0)
