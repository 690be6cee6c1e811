"""The tiny world's tool task: two-digit multiplication, which the 0.6 M-parameter LM cannot do alone, with the
calculator tool (rlhf_ray/tool_envs.py Calculator) it can call.

    Question: What is 54 times 81?\\nAnswer:         the prompt (raw text, no chat template)
     <call>54*81=                                    the model's first turn: it ends on the turn-stop token "="
     4374                                            the tool's observation, appended as tokens
     The answer is 4374.<|endoftext|>                the model's final turn, rewarded 1 when it holds the product

A short SFT on synthetic demonstrations (`train_tool_sft`) teaches the call format; its loss covers the model's
turns only, never the observation, exactly as RL's action mask will. It stops once the policy solves 40 % of the
problems, so it gets the format but often miscopies an operand or the tool's answer; RL on the tool's verifiable
reward raises the success rate from there. `evaluate` plays held-out episodes in-process (HF sampling at temperature 1, the
same environment class and limits as the engines), with the tool available or switched off.
"""
from __future__ import annotations

import asyncio
import json
import random
import weakref
from pathlib import Path

import torch

from rlhf_ray.sft import IGNORE, collate_sft, sft_loss
from rlhf_ray.tool_envs import Calculator

PROMPT = "Question: What is {a} times {b}?\nAnswer:"
CALL = " <call>{a}*{b}="
FINAL = " The answer is {answer}."
TURN_STOP = "="


def problems(n: int, seed: int, exclude: set | None = None) -> list[dict]:
    """n distinct prompt rows {"prompt", "answer", "a", "b"} with operands in 11..99, none of `exclude`'s pairs."""
    rng, seen, rows = random.Random(seed), set(exclude or ()), []
    while len(rows) < n:
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        rows.append({"prompt": PROMPT.format(a=a, b=b), "answer": str(a * b), "a": a, "b": b})
    return rows


def write_prompts(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
    return path


def demonstration(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one demonstrated episode, token for token as a rollout would hold it: the prompt, the
    call turn, the calculator's observation (its own text, tokenised on its own as the environment workers do), the
    final turn and EOS; labels only on the two turns."""
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    call = CALL.format(a=row["a"], b=row["b"])
    observation, _ = Calculator().call(f"{row['a']}*{row['b']}")
    prompt, turn1, obs = enc(row["prompt"]), enc(call), enc(observation)
    turn2 = enc(FINAL.format(answer=row["answer"])) + [tokenizer.eos_token_id]
    return prompt + turn1 + obs + turn2, [IGNORE] * len(prompt) + turn1 + [IGNORE] * len(obs) + turn2


def train_tool_sft(policy_dir: str | Path, out: str | Path, rows: list[dict], target: float = 0.4,
                   check_every: int = 10, max_steps: int = 2000, lr: float = 1e-3, batch_size: int = 32, seed: int = 0,
                   log=print) -> tuple[Path, int, float]:
    """The short SFT on demonstrations of `rows` (`sft_until_success`), checked on 50 of those problems played with
    the tool as `evaluate` plays them. Returns the saved policy, the steps taken and the last check's success.

    Why stop on success rather than after a fixed count or at a loss: the format is learnt within ~100 steps, but
    when the model starts copying operands and the tool's answer differs by seed (at lr 1e-3, from step ~150 to
    ~300 on seeds 0-2), and the loss, dominated by the format's tokens, does not say whether it copies. Stopping once
    it copies sometimes leaves RL a policy that succeeds often but not always. Why lr 1e-3: at 3e-3 the 0.6 M
    model of seed 1 never learnt to copy (14 % after 2,000 steps); at 1e-3 it copied after 175."""
    return sft_until_success(policy_dir, out, lambda tok: [demonstration(tok, r) for r in rows],
                             lambda model, tok: play(model, tok, rows[:50], Calculator, seed=seed)["correct"],
                             target, check_every, max_steps, lr, batch_size, seed, log)


def build_tool_task(world: str | Path, out: str | Path, seed: int = 0, target: float = 0.4,
                    log=print) -> dict[str, Path]:
    """The task beside a tiny world: out/train.jsonl (3,000 problems with answers), out/held_out.jsonl (200 others)
    and out/policy, the world's policy after `train_tool_sft` on the training problems (reused when already there).
    configs/tiny_agent.yaml points here. benchmarks/tool_task.py builds the same per seed, for its own worlds."""
    out = Path(out)
    train = problems(3000, seed)
    held = problems(200, seed + 1000, {(r["a"], r["b"]) for r in train})
    paths = {"train": write_prompts(out / "train.jsonl", train),
             "held_out": write_prompts(out / "held_out.jsonl", held), "policy": out / "policy"}
    if not (paths["policy"] / "model.safetensors").is_file():
        _, steps, rate = train_tool_sft(Path(world) / "policy", paths["policy"], train, target=target, seed=seed,
                                        log=log)
        (paths["policy"] / "sft_steps.txt").write_text(f"{steps}\n")
        log(f"tool task written to {out}: SFT {steps} steps, {rate:.0%} of 50 problems solved with the tool")
    return paths


def sft_until_success(policy_dir: str | Path, out: str | Path, demonstrations, success, target: float,
                      check_every: int, max_steps: int, lr: float, batch_size: int, seed: int,
                      log=print) -> tuple[Path, int, float]:
    """A tiny-world task's short SFT: AdamW on `demonstrations(tokenizer)` ((input_ids, labels) pairs), batches
    drawn in a seeded shuffled order, cross-entropy on the labelled tokens, until `success(model, tokenizer)` (in
    eval mode, checked every `check_every` steps) reaches `target`, or max_steps; saved as an HF directory
    (safetensors) with the tokenizer. Returns it, the steps taken and the last check's success. One thread,
    deterministic for a seed."""
    from rlhf_ray.models import load_causal_lm, load_tokenizer
    torch.manual_seed(seed)
    tok, model = load_tokenizer(policy_dir), load_causal_lm(policy_dir)
    data = demonstrations(tok)
    random.Random(seed).shuffle(data)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rate = 0.0
    for step in range(1, max_steps + 1):
        model.train()
        batch = collate_sft([data[((step - 1) * batch_size + i) % len(data)] for i in range(batch_size)],
                            tok.pad_token_id)
        loss, _ = sft_loss(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % check_every == 0:
            rate = success(model.eval(), tok)
            log(f"  SFT step {step:4d}  loss {loss.item():.3f}  success {rate:.2f}")
            if rate >= target:
                break
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out, step, rate


def evaluate(model_dir: str | Path, rows: list[dict], env_cls, max_turns: int = 3, max_turn_tokens: int = 16,
             max_new_tokens: int = 40, seed: int = 0) -> dict:
    """Success rate and episode shape of the policy in `model_dir` on `rows` (`play`)."""
    from rlhf_ray.models import load_causal_lm, load_tokenizer
    return play(load_causal_lm(model_dir).eval(), load_tokenizer(model_dir), rows, env_cls, max_turns,
                max_turn_tokens, max_new_tokens, seed)


@torch.no_grad()
def play(model, tok, rows: list[dict], env_cls, max_turns: int = 3, max_turn_tokens: int = 16,
         max_new_tokens: int = 40, seed: int = 0) -> dict:
    """Success rate and episode shape on `rows`: each episode played as the engines play it (turns end on "=",
    EOS ends the episode, the observation appended as tokens, the same limits), sampled at temperature 1."""
    stops = [tok(TURN_STOP, add_special_tokens=False)["input_ids"][0], tok.eos_token_id]
    gen = torch.Generator().manual_seed(seed)
    totals = {"correct": 0.0, "tool_calls": 0.0, "invalid_calls": 0.0, "turns": 0.0, "action_tokens": 0.0,
              "observation_tokens": 0.0}
    for row in rows:
        env = env_cls()
        env.reset(row)
        context = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        used = 0
        for _ in range(max_turns):
            turn = []
            while len(turn) < min(max_turn_tokens, max_new_tokens - used):
                logits = model(torch.tensor([context + turn])).logits[0, -1]
                turn.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
                if turn[-1] in stops:
                    break
            used += len(turn)
            context += turn
            totals["turns"] += 1
            totals["action_tokens"] += len(turn)
            step = env.step(tok.decode(turn, skip_special_tokens=True), turn)
            for k in ("tool_calls", "invalid_calls", "correct"):
                totals[k] += step.metrics.get(k, 0.0)
            if step.done or turn[-1] == tok.eos_token_id or used >= max_new_tokens:
                break
            obs = tok(step.observation or "", add_special_tokens=False)["input_ids"][:max_new_tokens - used]
            context += obs
            used += len(obs)
            totals["observation_tokens"] += len(obs)
    return {k: v / len(rows) for k, v in totals.items()}


# ---------------------------------------------------------------------------------------------- the task as an agent
# The same task as people write agents: a loop over an OpenAI chat-completions client with a calculator tool
# (agent.cls: rlhf_ray.tiny_world.tool_task:calculator_agent). The endpoint parses the model's `<call>54*81=` into a
# tool call (CallFormat), and CHAT_TEMPLATE renders the conversation back to exactly the text env.cls episodes hold:
# the prompt as written, each reply as the model wrote it, each tool result as the calculator's observation (" 4374").
CHAT_TEMPLATE = Path(__file__).with_name("calculator_chat.jinja")
CALCULATOR_TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "The value of an arithmetic expression, e.g. 54*81.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


class CallFormat:
    """agent.tool_format for the calculator: a turn ending in `=` with `<call>` in it is a call of `calculator` on
    what follows the last `<call>` (as rlhf_ray/tool_envs.py reads it); anything else is the final answer."""
    stop = [TURN_STOP]

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        body = text.rstrip()
        if body.endswith(TURN_STOP) and "<call>" in body:
            at = body.rindex("<call>")
            return body[:at], [{"name": "calculator", "arguments": {"expression": body[at + 6:-len(TURN_STOP)]}}]
        return text, []


_CLIENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def openai_client(base_url: str, api_key: str):
    """An AsyncOpenAI client for `base_url`, sharing one HTTP client per event loop: making one costs ~25 ms (an SSL
    context, even for http), which an agent worker running 64 episodes at once would pay per episode."""
    import openai
    loop = asyncio.get_running_loop()
    if loop not in _CLIENTS:
        _CLIENTS[loop] = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    return _CLIENTS[loop].with_options(base_url=base_url, api_key=api_key)


async def calculator_agent(base_url: str, api_key: str, row: dict, max_turns: int = 3, max_turn_tokens: int = 16):
    """The tool task as an ordinary OpenAI-client agent: ask, run the calculator on each tool call, answer; 1.0 when
    the final answer holds the product. The limits are tool_task's env.cls ones (benchmarks/tool_task.py)."""
    from rlhf_ray.tool_envs import arithmetic, number_text
    messages = [{"role": "user", "content": row["prompt"]}]
    client = openai_client(base_url, api_key)
    for _ in range(max_turns):
        reply = (await client.chat.completions.create(model="policy", messages=messages, tools=[CALCULATOR_TOOL],
                                                      max_tokens=max_turn_tokens)).choices[0].message
        messages.append(reply.model_dump(exclude_none=True))
        if not reply.tool_calls:
            return float(row["answer"] in (reply.content or ""))
        for call in reply.tool_calls:
            try:
                result = number_text(arithmetic(json.loads(call.function.arguments)["expression"]))
            except ValueError:
                result = "error"
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return 0.0
