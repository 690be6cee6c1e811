"""The peer side of benchmarks/vs_trl.py: TRL 1.12's PPOTrainer on the same model directories and prompt ids.

Runs in its own virtual environment (TRL 1.12 needs transformers 5.23, which the project's vLLM does not
allow), so it imports nothing from this repository but benchmarks/peer_sampling.py beside it (pure). Prints one
JSON line: the wall time of every PPO step and of its phases: generation (TRL's `batch_generation`), scoring (its
no-grad `forward` / `get_reward` calls: reference logprobs, values, rewards) and the rest, which is the PPO update
(and TRL's metrics, logging, save check and gc.collect); and the sampling settings HF generate used (`sampling`),
read back from the generation config TRL passed to `batch_generation`.

Step spans: from on_train_begin to the first on_step_end, then from each on_step_end to the next: contiguous,
everything in TRL's loop counts.
"""
import argparse
import json
import tempfile
import time

import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          TrainerCallback)
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer

from peer_sampling import effective_sampling  # (beside this file)


class StepClock(TrainerCallback):
    """TRL calls on_train_begin and on_step_end (not on_step_begin): a step is the time between two ends.
    The phase clocks wrap the trainer module's own functions, so TRL's code runs unchanged."""

    def __init__(self):
        self.marks, self.phases, self.current = [], [], {"generate": 0.0, "score": 0.0}
        self.generation_config = None      # as TRL builds it in train() and hands it to batch_generation
        self._wrap("batch_generation", lambda: "generate")
        for name in ("forward", "get_reward"):        # also called in the update, with gradients on
            self._wrap(name, lambda: None if torch.is_grad_enabled() else "score")

    def _wrap(self, name, phase_of):
        fn = getattr(ppo_trainer, name)

        def timed(*args, **kwargs):
            if name == "batch_generation":
                self.generation_config = kwargs.get("generation_config", args[4] if len(args) > 4 else None)
            phase, t0 = phase_of(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if phase:
                    self.current[phase] += time.perf_counter() - t0
        setattr(ppo_trainer, name, timed)

    def on_train_begin(self, args, state, control, **kw):
        self.marks.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        self.marks.append(time.perf_counter())
        step = self.marks[-1] - self.marks[-2]
        self.phases.append({**self.current, "train": step - sum(self.current.values())})
        self.current = {"generate": 0.0, "score": 0.0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True, help="directory with policy/, reward/ and prompt_ids.json")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--bf16", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(f"{a.models}/policy", padding_side="left")
    prompt_ids = json.load(open(f"{a.models}/prompt_ids.json"))
    dataset = Dataset.from_list([{"input_ids": ids} for ids in prompt_ids])
    load = dict(dtype=torch.float32, use_safetensors=True)
    policy = AutoModelForCausalLM.from_pretrained(f"{a.models}/policy", **load)
    ref = AutoModelForCausalLM.from_pretrained(f"{a.models}/policy", **load)
    reward = AutoModelForSequenceClassification.from_pretrained(f"{a.models}/reward", num_labels=1, **load)
    value = AutoModelForSequenceClassification.from_pretrained(f"{a.models}/reward", num_labels=1, **load)
    args = PPOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=a.bf16, report_to=[], save_strategy="no",
        per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, num_mini_batches=1,
        local_rollout_forward_batch_size=a.batch, num_ppo_epochs=a.epochs, response_length=a.response_length,
        total_episodes=a.batch * a.steps, stop_token="eos", temperature=a.temperature, kl_coef=a.kl_coef,
        learning_rate=a.lr, num_sample_generations=0, logging_steps=10 ** 6, seed=0, disable_tqdm=True)
    clock = StepClock()
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=dataset, callbacks=[clock])
    trainer.train()
    steps = [b - a_ for a_, b in zip(clock.marks, clock.marks[1:])]
    print(json.dumps({"step_seconds": steps, "phases": clock.phases, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "sampling": effective_sampling(policy, clock.generation_config)}))


if __name__ == "__main__":
    main()
