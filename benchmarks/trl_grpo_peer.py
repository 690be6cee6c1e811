"""The peer side of benchmarks/vs_trl_grpo.py: TRL 1.12's GRPOTrainer on the same policy, prompts and reward.

Runs in its own virtual environment (.venv-trl: TRL 1.12 needs transformers 5.23, which the project's vLLM does not
allow). It imports from this repository only the tiny world's pure gold function (rlhf_ray/tiny_world/gold.py), so both
systems optimise the very same reward: gold + 0.2 x ends-with-period. Prints one JSON line: the wall-clock time of
every generation step (one generation of prompts x n completions, then its optimizer steps), the completion
tokens and the gold mean of each, the time from the process's start to the end of training, and the sampling
settings HF generate used, read back from the trainer (`sampling`).

Step spans: one mark at on_train_begin, one at every on_step_end (TRL calls no on_step_begin); a generation step
is `minibatches` optimizer steps, so its time is from the on_step_end that closed the previous generation step to
the one that closes it: contiguous, everything the trainer's loop does in between counts (fetching the batch,
generation, rewards, the optimizer steps, TRL's logging and save checks, its callbacks).
"""
import argparse
import json
import os
import sys
import tempfile
import time

T_START = time.time()              # as close to the process's start as Python allows (imports follow)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from peer_sampling import effective_sampling  # noqa: E402  (beside this file)

from rlhf_ray.tiny_world.gold import gold_score  # noqa: E402


class Clock(TrainerCallback):
    """A mark at on_train_begin and at every optimizer step's on_step_end; a generation step is `minibatches` of
    them, so consecutive generation-step ends are contiguous spans of TRL's whole loop."""

    def __init__(self):
        self.marks, self.tokens, self.gold = [], [], []

    def on_train_begin(self, args, state, control, **kw):
        self.marks.append(time.time())

    def on_step_end(self, args, state, control, **kw):
        self.marks.append(time.time())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field per line")
    ap.add_argument("--steps", type=int, default=30, help="generation steps")
    ap.add_argument("--prompts-per-step", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    a = ap.parse_args()
    clock = Clock()

    def gold(prompts, completions, completion_ids, **kw):
        clock.tokens.append(sum(len(ids) for ids in completion_ids))
        scores = [gold_score(c) for c in completions]
        clock.gold.append(sum(scores) / len(scores))
        return scores

    def ends_with_period(prompts, completions, **kw):
        return [1.0 if c.rstrip().endswith((".", "!", "?")) else 0.0 for c in completions]

    tok = AutoTokenizer.from_pretrained(a.policy, padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in open(a.prompts)]
    policy = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32, use_safetensors=True)
    batch = a.prompts_per_step * a.n
    args = GRPOConfig(
        # bf16=False: TRL's configs default to bf16 mixed precision (autocast), even on CPU; the comparison is fp32
        output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
        logging_steps=10 ** 6,
        seed=a.seed, disable_tqdm=True, learning_rate=a.lr, beta=a.beta, loss_type="grpo", scale_rewards="group",
        num_generations=a.n, per_device_train_batch_size=batch // a.minibatches, gradient_accumulation_steps=1,
        steps_per_generation=a.minibatches, num_iterations=1, max_completion_length=a.max_new_tokens,
        # sampling as rlhf-ray's engines sample (vLLM, only temperature and top_p set): top-k off (TRL: 0),
        # min-p off (None: no warper), no repetition penalty; the driver asserts `sampling` below equals its config
        temperature=a.temperature, top_p=a.top_p, top_k=0, min_p=None, repetition_penalty=1.0,
        reward_weights=[1.0, 0.2], max_steps=a.steps * a.minibatches,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, disable_dropout=True)
    trainer = GRPOTrainer(model=policy, reward_funcs=[gold, ends_with_period], args=args, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), callbacks=[clock])
    trainer.train()
    t_end = time.time()
    ends = clock.marks[::a.minibatches]                  # the start, then the end of each generation step
    print(json.dumps({"step_seconds": [b - e for e, b in zip(ends, ends[1:])], "tokens": clock.tokens,
                      "gold": clock.gold, "to_train_end": t_end - T_START, "threads": torch.get_num_threads(),
                      "bf16": trainer.args.bf16, "dtype": str(next(policy.parameters()).dtype),
                      "sampling": effective_sampling(policy, trainer.generation_config),
                      "trl": __import__("trl").__version__}))


if __name__ == "__main__":
    main()
