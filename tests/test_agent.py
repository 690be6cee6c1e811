"""The agents' endpoint in one process: the gateway (actors/agent.py) serving HTTP on loopback to the real `openai`
client, with a scripted stand-in for the engine (it answers each call with ids fixed in advance). Pure logic: how
calls become one trajectory, token for token, what a mismatch does, and what is refused, each in one line. The real
engines, agent workers and a GRPO run are in tests/test_e2e_agents.py."""
import asyncio
import json
import re

import httpx
import openai
import pytest

from actors.agent import Gateway
from actors.engine import turn_seed
from rlhf_ray.agent import AgentError, BadRequest, checked_reward, load_agent, parse_call
from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.tiny_world.tool_task import CHAT_TEMPLATE, CallFormat, calculator_agent

ROW = {"prompt": "Question: What is 12 times 34?\nAnswer:", "answer": "408"}
AGENT = ["agent.cls=rlhf_ray.tiny_world.tool_task:calculator_agent",
         "agent.tool_format=rlhf_ray.tiny_world.tool_task:CallFormat", f"agent.chat_template={CHAT_TEMPLATE}",
         "reward.sources=[{kind: agent}]", "generation.max_new_tokens=40"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from rlhf_ray.tiny_world.world import train_tokenizer
    tok = train_tokenizer("Question: What is 12 times 34?\nAnswer: The answer is 408. <call>1*2= 3\n\n" * 20, 300)
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    return d, tok


def spelled(tok, text: str) -> list[int]:
    """`text` one character per token: ids a model may sample, which tokenising the text would never give."""
    return [i for c in text for i in tok(c, add_special_tokens=False)["input_ids"]]


def gateway(tok_dir, sets=(), script=None) -> Gateway:
    """A gateway whose engine is `script`: {seed of the call: ids}, each call answered with its ids (logprob -0.5
    each; finish "stop" on EOS or the format's stop token, else "length")."""
    d, tok = tok_dir
    gw = Gateway(0, 1, load_config(None, [f"models.policy={d}", *AGENT, *sets]), "cpu")
    stop_ids = set(gw.format_stops)

    async def engine(request):
        ids = script[request["seed"]][:request["max_tokens"]]
        ended = ids[-1] == tok.eos_token_id or ids[-1] in stop_ids
        return 0, (ids, [-0.5] * len(ids), "stop" if ended else "length", ids[-1] if ids[-1] in stop_ids else None)
    gw._generate = engine
    return gw


def run(coro):
    return asyncio.run(coro)


def client(base_url: str, api_key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)


def one_episode(gw: Gateway, seed: int, agent, result: float | None = None):
    """One session on the gateway's loopback endpoint: `agent(base_url, api_key)` runs against it, then the session
    closes with the reward `result` (None: what the agent returned). Returns (what the agent returned, the sample)."""
    async def go():
        base = await gw.serve()
        keys = await gw.open([seed])
        out = await agent(f"{base}/{keys[0]}/v1", gw.api_key)
        samples = await gw.close(keys, [{"reward": out if result is None else result}], True)
        await gw.runner.cleanup()
        return out, samples[0]
    return run(go())


def test_an_openai_client_agents_calls_become_one_trajectory_token_for_token_never_retokenised(tok_dir):
    """The calculator agent (rlhf_ray/tiny_world/tool_task.py) through the endpoint: the model's turns are the
    engine's own ids (spelled one character a token here, as a model may sample them), the tool's result is
    tokenised on its own and appended with action 0, and the reward lands on the last token. Tokenising the
    rendered conversation instead would give other ids."""
    _, tok = tok_dir
    seed = 1234
    turn1, turn2 = spelled(tok, " <call>12*34="), spelled(tok, " It is 408.") + [tok.eos_token_id]
    gw = gateway(tok_dir, script={turn_seed(seed, 0): turn1, turn_seed(seed, 1): turn2})

    reward, s = one_episode(gw, seed, lambda url, key: calculator_agent(url, key, ROW))
    assert reward == 1.0
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    observation = enc(" 408")
    assert s["prompt"] == enc(ROW["prompt"])
    assert s["ids"] == turn1 + observation + turn2
    assert s["action"] == [1] * len(turn1) + [0] * len(observation) + [1] * len(turn2)
    assert s["logprobs"] == [-0.5] * len(turn1) + [0.0] * len(observation) + [-0.5] * len(turn2)
    assert s["token_rewards"] == [0.0] * (len(s["ids"]) - 1) + [1.0]
    assert s["episode"]["turns"] == 2 and s["episode"]["ended"] == "done" and s["finished"]
    assert s["episode"]["metrics"]["calls"] == 2 and s["episode"]["metrics"]["cut_edited"] == 0
    # what re-tokenising the transcript would have trained on instead
    transcript = tok.decode(s["prompt"] + s["ids"])
    assert enc(transcript) != s["prompt"] + s["ids"]


def test_an_agent_that_edits_its_history_is_cut_there_and_still_answered(tok_dir):
    """The first call is recorded; the second sends a changed question: the trajectory stops at the first reply
    (cut "edited"), the second call is answered from its own rendering and counted as untrained."""
    _, tok = tok_dir
    seed = 7
    turn1, turn2 = spelled(tok, " <call>12*34="), spelled(tok, " 408") + [tok.eos_token_id]
    gw = gateway(tok_dir, script={turn_seed(seed, 0): turn1, turn_seed(seed, 1): turn2})

    async def agent(url, key):
        async with client(url, key) as c:
            first = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": ROW["prompt"]}])
            assert first.choices[0].finish_reason == "tool_calls"
            call = first.choices[0].message.tool_calls[0]
            assert call.function.name == "calculator" and json.loads(call.function.arguments) == {"expression": "12*34"}
            edited = [{"role": "user", "content": "Question: What is 99 times 34?\nAnswer:"},
                      first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "408"}]
            second = await c.chat.completions.create(model="m", messages=edited)
            assert second.choices[0].message.content == " 408"
    _, s = one_episode(gw, seed, agent, 1.0)
    assert s["ids"] == turn1 and s["action"] == [1] * len(turn1)
    assert s["token_rewards"][-1] == 1.0
    m = s["episode"]["metrics"]
    assert (m["cut_edited"], m["cut_rerendered"], m["untrained_calls"], m["calls"]) == (1.0, 0.0, 1.0, 2.0)


def test_a_template_that_renders_earlier_turns_otherwise_is_a_rerendered_cut(tok_dir, tmp_path):
    """Messages that extend the recorded ones, under a template that does not render the model's reply as it wrote
    it (here: drops an assistant turn's text, as templates that strip earlier reasoning do): cut "rerendered"."""
    _, tok = tok_dir
    template = tmp_path / "drops.jinja"
    template.write_text("{%- for m in messages -%}{%- if m.role != 'assistant' -%}{{ m.content }}{%- endif -%}"
                        "{%- endfor -%}")
    seed = 3
    turn1, turn2 = spelled(tok, " 4"), spelled(tok, "08") + [tok.eos_token_id]
    gw = gateway(tok_dir, [f"agent.chat_template={template}", "agent.tool_format="],
                 script={turn_seed(seed, 0): turn1, turn_seed(seed, 1): turn2})

    async def agent(url, key):
        async with client(url, key) as c:
            msgs = [{"role": "user", "content": ROW["prompt"]}]
            first = await c.chat.completions.create(model="m", messages=msgs)
            msgs += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": " go on"}]
            await c.chat.completions.create(model="m", messages=msgs)
    _, s = one_episode(gw, seed, agent, 0.5)
    assert s["ids"] == turn1
    m = s["episode"]["metrics"]
    assert (m["cut_edited"], m["cut_rerendered"], m["untrained_calls"]) == (0.0, 1.0, 1.0)


def test_completions_extend_by_token_ids_and_the_budget_ends_the_episode(tok_dir):
    """/v1/completions with token-id prompts: the ids past the recorded ones are appended as they are; a call whose
    new part fills the budget (generation.max_new_tokens) is answered empty, cut for length, and the episode ends
    "length"."""
    _, tok = tok_dir
    seed = 11
    turn1 = spelled(tok, " <call>12*34=")
    gw = gateway(tok_dir, ["generation.max_new_tokens=20"], script={turn_seed(seed, 0): turn1})

    prompt = tok(ROW["prompt"], add_special_tokens=False)["input_ids"]

    async def agent(url, key):
        async with client(url, key) as c:
            first = await c.completions.create(model="m", prompt=prompt, logprobs=0)
            assert first.choices[0].text == " <call>12*34=" and first.choices[0].finish_reason == "stop"
            assert "".join(first.choices[0].logprobs.tokens) == " <call>12*34="
            assert first.choices[0].logprobs.token_logprobs == [-0.5] * len(turn1)      # the engine's, as recorded
            spent = await c.completions.create(model="m", prompt=prompt + turn1 + [5] * 10)
            assert (spent.choices[0].text, spent.choices[0].finish_reason) == ("", "length")
    _, s = one_episode(gw, seed, agent, 0.0)
    assert s["prompt"] == prompt and s["ids"] == turn1 + [5] * (20 - len(turn1))     # kept up to the budget
    assert s["episode"]["ended"] == "length" and not s["finished"]


def test_bad_calls_are_refused_in_one_line_and_counted(tok_dir):
    """Through the openai client and plain HTTP: a wrong key (401), an unknown session (404), malformed bodies
    (400, naming the field), a call after the episode ended (410); the session's count of malformed calls, and the
    gateway's of the others."""
    _, tok = tok_dir
    seed = 5
    gw = gateway(tok_dir, script={turn_seed(seed, 0): spelled(tok, " 408") + [tok.eos_token_id]})

    async def go():
        base = await gw.serve()
        keys = await gw.open([seed])
        url = f"{base}/{keys[0]}/v1"
        msgs = [{"role": "user", "content": ROW["prompt"]}]
        async with openai.AsyncOpenAI(base_url=url, api_key="wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                await c.chat.completions.create(model="m", messages=msgs)
        async with openai.AsyncOpenAI(base_url=f"{base}/nosuch/v1", api_key=gw.api_key, max_retries=0) as c:
            with pytest.raises(openai.NotFoundError, match="no such episode"):
                await c.chat.completions.create(model="m", messages=msgs)
        async with openai.AsyncOpenAI(base_url=url, api_key=gw.api_key, max_retries=0) as c:
            assert [m.id for m in (await c.models.list()).data] == ["policy"]
            for kwargs, says in [({"messages": []}, "messages: must be a non-empty list"),
                                 ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
                                 ({"messages": msgs, "n": 2}, "n: must be 1"),
                                 ({"messages": msgs, "max_tokens": 0}, "max_tokens: must be a positive integer"),
                                 ({"messages": msgs, "stop": ["<call>"]}, "stop: '<call>' is"),
                                 ({"messages": msgs, "stream": True}, "streaming is not supported")]:
                with pytest.raises(openai.BadRequestError, match=says.replace("[", r"\[")):
                    await c.chat.completions.create(model="m", **kwargs)
            async with httpx.AsyncClient() as h:
                r = await h.post(f"{url}/chat/completions", content=b"{not json",
                                 headers={"Authorization": f"Bearer {gw.api_key}"})
                assert r.status_code == 400 and r.json()["error"]["message"] == "the body is not JSON"
            with pytest.raises(openai.BadRequestError, match="top_logprobs: only the sampled token's logprob"):
                await c.chat.completions.create(model="m", messages=msgs, logprobs=True, top_logprobs=3)
            reply = await c.chat.completions.create(model="m", messages=msgs, temperature=0.2, logprobs=True)
            assert reply.choices[0].message.content == " 408"
            assert [t.logprob for t in reply.choices[0].logprobs.content] == [-0.5] * 5
            out = await gw.close(keys, [{"reward": 1.0}], True)
            with pytest.raises(openai.APIStatusError, match="has ended") as late:
                await c.chat.completions.create(model="m", messages=msgs)
            assert late.value.status_code == 410
        counters = await gw.take_counters()
        await gw.runner.cleanup()
        return out[0], counters
    s, counters = run(go())
    m = s["episode"]["metrics"]
    assert (m["malformed_calls"], m["calls"], m["sampling_overridden"]) == (8.0, 1.0, 1.0)
    assert counters == {"agent/unauthorized_calls": 1.0, "agent/unknown_sessions": 1.0, "agent/late_calls": 1.0}


def test_agent_results_and_failures_become_rewards(tok_dir):
    """What each agent result gives its episode: its number with a `kind: agent` source (None is then an error),
    agent.error_reward for an error or a timeout; without the source the number is not used."""
    _, tok = tok_dir
    seeds = [1, 2, 3, 4]
    script = {turn_seed(s, 0): spelled(tok, " 408") + [tok.eos_token_id] for s in seeds}
    for with_reward, results, expect in [
            (True, [{"reward": 0.25}, {"reward": None}, {"error": "ValueError: boom"}, {"timeout": True}],
             [(0.25, "done"), (-1.0, "error"), (-1.0, "error"), (-1.0, "timeout")]),
            (False, [{"reward": 0.25}, {"reward": None}, {"error": "ValueError: boom"}, {"timeout": True}],
             [(0.0, "done"), (0.0, "done"), (-1.0, "error"), (-1.0, "timeout")])]:
        gw = gateway(tok_dir, script=script)

        async def go():
            base = await gw.serve()
            keys = await gw.open(seeds)
            for k in keys:
                async with openai.AsyncOpenAI(base_url=f"{base}/{k}/v1", api_key=gw.api_key, max_retries=0) as c:
                    await c.chat.completions.create(model="m", messages=[{"role": "user", "content": ROW["prompt"]}])
            out = await gw.close(keys, results, with_reward)
            await gw.runner.cleanup()
            return out
        out = run(go())
        assert [(s["token_rewards"][-1], s["episode"]["ended"]) for s in out] == expect
        if with_reward:
            assert "returned None" in out[1]["episode"]["error"]


def test_calls_and_agent_specs_are_checked():
    with pytest.raises(BadRequest, match=r"messages\[0\].tool_calls\[0\].function.arguments: not JSON"):
        parse_call({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]},
                   "chat")
    with pytest.raises(BadRequest, match="prompt: must be a non-empty string or a list of token ids"):
        parse_call({"prompt": [1, "x"]}, "completion")
    with pytest.raises(BadRequest, match="the body must be a JSON object"):
        parse_call([1], "chat")
    call = parse_call({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}],
                       "max_completion_tokens": 5, "stop": "x", "top_p": 0.5}, "chat")
    assert (call.messages[0]["content"], call.max_tokens, call.stop, call.asked_sampling) == ("ab", 5, ["x"], True)
    with pytest.raises(AgentError, match="not an async function"):
        load_agent("rlhf_ray.tiny_world.tool_task:problems")
    with pytest.raises(AgentError, match="cannot load it"):
        load_agent("rlhf_ray.tiny_world.tool_task:nothing")
    assert load_agent("rlhf_ray.tiny_world.tool_task:calculator_agent") is calculator_agent
    with pytest.raises(AgentError, match="not a finite number"):
        checked_reward(float("nan"))
    with pytest.raises(AgentError, match="not a finite number"):
        checked_reward(True)
    fmt = CallFormat()
    assert fmt.parse(" <call>1*2=") == (" ", [{"name": "calculator", "arguments": {"expression": "1*2"}}])
    assert fmt.parse(" 2 = 2") == (" 2 = 2", [])


@pytest.mark.parametrize("sets, says", [
    (["agent.cls=nocolon"], "agent.cls must read 'package.module:function', got 'nocolon'"),
    (["agent.cls=a:b", "env.cls=a:B", "reward.sources=[{kind: env}]"], "agent.cls and env.cls are two ways"),
    (["reward.sources=[{kind: agent}]"], "agent.cls is required by reward.sources[0] (kind agent)"),
    (["agent.cls=a:b", "agent.timeout_s=0"], "agent.timeout_s must be > 0"),
    (["agent.cls=a:b", "agent.tool_format=x"], "agent.tool_format must read 'package.module:Class'"),
])
def test_agent_config_is_checked(sets, says):
    base = ["models.policy=p", "data.prompts=d.jsonl", "reward.sources=[{kind: function, path: 'a:b'}]"]
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(None, base + sets).check_ppo()


def test_a_steps_failed_episodes_are_one_line_and_an_unreachable_loopback_is_refused():
    from rlhf_ray.agent import unreachable
    from rlhf_ray.env import failure_line
    ok = {"ended": "done", "error": None}
    assert failure_line([ok, ok], "agent") is None
    line = failure_line([ok, {"ended": "timeout", "error": None}, {"ended": "error", "error": "RuntimeError: boom"},
                         {"ended": "error", "error": "ValueError: x"}], "agent")
    assert line == "3 of 4 agent episodes failed (2 errors, 1 timeout); the first: RuntimeError: boom"
    assert unreachable("0.0.0.0", "10.0.0.1", ["10.0.0.2"]) is None
    assert unreachable("127.0.0.1", "10.0.0.1", ["10.0.0.1", "10.0.0.1"]) is None
    assert unreachable("127.0.0.1", "10.0.0.1", ["10.0.0.1", "10.0.0.2"]) == (
        "agent.host 127.0.0.1: agent worker 1 runs on node 10.0.0.2 and the gateway on 10.0.0.1, which it cannot "
        "reach on loopback; set agent.host: 0.0.0.0, or pin both to one node with agent.node_resource")
