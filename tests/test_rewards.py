"""Rule and remote reward sources (rlhf_ray/rewards.py) against a real HTTP server on loopback."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.rewards import HttpScorer, RewardSourceError, check_scores, combine, load_function, text_scorer


class Scorer(BaseHTTPRequestHandler):
    mode = "ok"
    calls: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Scorer.calls.append((len(body["responses"]), self.headers.get("Authorization")))
        if Scorer.mode == "missing" or (Scorer.mode == "flaky" and len(Scorer.calls) == 1):
            self.send_response(404 if Scorer.mode == "missing" else 503)
            self.end_headers()
            return
        if Scorer.mode == "garbage":
            payload = b"<html>oops</html>"
        elif Scorer.mode == "short":
            payload = json.dumps({"rewards": [1.0]}).encode()
        elif "answer" in body:                                     # row fields travel beside the texts
            payload = json.dumps({"rewards": [float(a in r) for r, a in zip(body["responses"], body["answer"])]}).encode()
        else:
            payload = json.dumps({"rewards": [float(len(r)) for r in body["responses"]]}).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Scorer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    Scorer.calls, Scorer.mode = [], "ok"
    yield f"http://127.0.0.1:{srv.server_address[1]}/score"
    srv.shutdown()


def test_http_scorer_batches_requests_and_sends_the_token_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("SCORER_TOKEN", "s3cret")
    score = HttpScorer(server, batch_size=2, auth_env="SCORER_TOKEN")
    assert score(["p"] * 5, ["a", "bb", "ccc", "dddd", "e"]) == [1.0, 2.0, 3.0, 4.0, 1.0]
    assert [n for n, _ in Scorer.calls] == [2, 2, 1]
    assert Scorer.calls[0][1] == "Bearer s3cret"


def test_http_scorer_retries_a_5xx_then_succeeds(server):
    Scorer.mode = "flaky"
    assert HttpScorer(server, retries=2, backoff_s=0.01)(["p"], ["abc"]) == [3.0]
    assert len(Scorer.calls) == 2


@pytest.mark.parametrize("mode, needle", [("garbage", "non-JSON"), ("short", "expected 2 rewards")])
def test_http_scorer_garbage_is_a_clear_error_naming_the_endpoint(server, mode, needle):
    Scorer.mode = mode
    with pytest.raises(RewardSourceError, match=needle) as e:
        HttpScorer(server, retries=0)(["p", "p"], ["a", "b"])
    assert server in str(e.value) and "\n" not in str(e.value)


def test_http_scorer_does_not_retry_a_4xx(server):
    Scorer.mode = "missing"
    with pytest.raises(RewardSourceError, match=r"failed after 1 attempt\(s\) \(HTTP 404\)"):
        HttpScorer(server, retries=3, backoff_s=0.01)(["p"], ["a"])
    assert len(Scorer.calls) == 1


def test_http_scorer_gives_up_after_its_retries_on_a_dead_endpoint():
    with pytest.raises(RewardSourceError, match=r"failed after 2 attempt\(s\)"):
        HttpScorer("http://127.0.0.1:9/score", retries=1, timeout_s=1, backoff_s=0.01)(["p"], ["a"])


def test_missing_token_variable_is_named():
    with pytest.raises(RewardSourceError, match="NO_SUCH_TOKEN_VAR"):
        HttpScorer("http://127.0.0.1:9/", auth_env="NO_SUCH_TOKEN_VAR")


def test_function_sources_load_by_module_colon_name_and_are_checked():
    fn = text_scorer("function", "rlhf_ray.rule_rewards:ends_with_period")
    assert fn(["p", "p"], ["It works.", "it does not"]) == [1.0, 0.0]
    with pytest.raises(RewardSourceError, match="cannot load"):
        load_function("rlhf_ray.rule_rewards:nope")
    with pytest.raises(RewardSourceError, match="reward 1 is nan"):
        check_scores([1.0, float("nan")], 2, "reward function 'm:f'")
    with pytest.raises(RewardSourceError, match="reward 0 is True"):
        check_scores([True], 1, "reward function 'm:f'")
    wrong = text_scorer("function", "builtins:max")             # max(prompts, responses): a list of strings
    with pytest.raises(RewardSourceError, match="'builtins:max'.*reward 0 is 'p'"):
        wrong(["p"], ["a"])


def test_sources_combine_with_weights():
    assert combine(torch.tensor([[1.0, 2.0], [3.0, -1.0]]), [0.5, 2.0]).tolist() == [4.5, -0.5]


def test_reward_source_config_checks():
    base = ["models.policy=p", "data.prompts=x.jsonl"]
    ok = load_config(None, base + ['reward.sources=[{kind: function, path: "m:f", weight: 2}, {kind: model, path: rm}]'])
    assert [s.kind for s in ok.check_ppo().reward_sources()] == ["function", "model"]
    assert ok.critic_init() == "rm" and ok.needs_critic()
    rule_only = load_config(None, base + ['reward.sources=[{kind: function, path: "m:f"}]', "ppo.advantage=grpo",
                                          "generation.n=4", "generation.prompts_per_step=2"])
    assert not rule_only.check_ppo().needs_critic() and rule_only.critic_init() == "p"
    for sets, needle in ((['reward.sources=[{kind: function, path: "no_colon"}]'], "reward.sources[0].path"),
                         (['reward.sources=[{kind: http, path: "ftp://x"}]'], "http(s) URL"),
                         ([], "models.reward"),
                         (["models.reward=rm", "ppo.advantage=rloo", "generation.n=1"], "generation.n"),
                         (["ppo.dual_clip=0.5"], "ppo.dual_clip"),
                         (["ppo.advantage=ppo"], "ppo.advantage"),
                         (["ppo.kl_estimator=k4"], "ppo.kl_estimator"),
                         (['reward.sources=[{kind: function, path: "m:f", wieght: 1}]'], "wieght")):
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            load_config(None, base + sets).check_ppo()


def test_row_fields_reach_function_and_http_sources(server):
    fn = text_scorer("function", "rlhf_ray.rule_rewards:contains_answer")
    assert fn(["2+2?", "3+3?"], ["it is 4", "five"], answer=["4", "6"]) == [1.0, 0.0]
    plain = text_scorer("function", "rlhf_ray.rule_rewards:ends_with_period")   # takes no fields: gets none
    assert plain(["p", "q"], ["Done.", "no"], answer=["4", "6"]) == [1.0, 0.0]
    assert HttpScorer(server, batch_size=1)(["p", "q"], ["x 4", "y"], answer=["4", "6"]) == [1.0, 0.0]
