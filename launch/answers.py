"""K answers per prompt and their rankings by the LLM judge: what `rlhf-ray label` does, and the pipeline's label
and evaluation stages share.

    Sampler   one vLLM engine; models swapped in with the PPO sync's in-place weight loading
    Judge     the LLM judge's engines (actors/judge.py asks them), pairwise rankings and pointwise scores
"""
from __future__ import annotations

import json
from pathlib import Path

import ray
import torch
from safetensors.torch import load_file

from actors.engine import EngineActor
from actors.group import RankGroup
from actors.sync_group import pack
from launch.common import engine_env
from launch.roles import judge_group
from rlhf_ray.config import Config
from rlhf_ray.judge import label_ids
from rlhf_ray.prompts import render_prompts


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Whole or not at all: written beside, then renamed into place (a stage that fails leaves no half file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


class Judge:
    """The LLM judge for the label stage (the judge section; actors/judge.py judge_rankings), on `engines`."""

    def __init__(self, cfg: Config, engines: list, group: RankGroup | None = None):
        from rlhf_ray.preflight import judge_tokenizer
        self.cfg, self.engines, self.group, self.tokenizer = cfg, engines, group, judge_tokenizer(cfg)

    @classmethod
    def start(cls, cfg: Config, run_dir: Path, device: str) -> "Judge":
        """The judge's own engines, started for this stage (`shutdown` stops them)."""
        group = judge_group(cfg, device, run_dir)
        return cls(cfg, group.actors, group)

    def rank(self, prompts: list[str], answers: list[list[str]], seed: int) -> list:
        from actors.judge import judge_rankings
        return judge_rankings(self.cfg, self.engines, self.tokenizer, prompts, answers, seed)

    def scores(self, prompts: list[str], answers: list[str]) -> list[float]:
        """Each answer's pointwise expected score (a failed call past its retries is a one-line error)."""
        from actors.judge import JudgeClient, pointwise_scores
        fmt = self.cfg.judge_format()
        labels = label_ids(self.tokenizer, fmt.score_labels, "judge.score_labels")
        return [s.score for s in pointwise_scores(JudgeClient(self.cfg.judge, self.engines), self.tokenizer, fmt,
                                                  labels, prompts, answers, fallback=False)]

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()


class Sampler:
    """One vLLM engine for labelling and evaluation; models are swapped in with the same in-place weight
    loading the PPO sync uses (a few ms), instead of starting an engine per model."""

    def __init__(self, engine, model_dir: str, group: RankGroup | None = None):
        """On `engine`, which holds `model_dir`'s weights; `group`, when this sampler started it."""
        self.engine, self.loaded, self.group = engine, model_dir, group

    @classmethod
    def start(cls, cfg: Config, run_dir: Path, device: str) -> "Sampler":
        e = cfg.engine                     # one engine of the policy's kind
        group = RankGroup(EngineActor, "eval-engine", 1, e.cpus_per_rank, e.gpus_per_rank, (cfg, device),
                          runtime_env=engine_env(cfg, device, str(run_dir)),
                          gpu_bundles=e.tensor_parallel_size if device == "cuda" else 1)
        return cls(group.actors[0], cfg.models.policy, group)

    def load(self, model_dir: str) -> None:
        if model_dir != self.loaded:
            meta, flat = pack(load_file(str(Path(model_dir) / "model.safetensors")))
            ray.get(self.engine.load_weights.remote(meta, flat.numpy()))
            ray.get(self.engine.weights_loaded.remote(0))       # version 0: no PPO update behind these weights
            self.loaded = model_dir

    def sample(self, prompts: list[list[int]], n: int, max_tokens: int, seed: int) -> list[dict]:
        return ray.get(self.engine.generate.remote(prompts, n, max_tokens, 1.0, 1.0, seed))

    def sequence_logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        lps = ray.get(self.engine.prompt_logprobs.remote([p + r for p, r in zip(prompts, responses)],
                                                         [len(p) for p in prompts]))
        return torch.tensor([sum(x) for x in lps])


def answer_sets(cfg: Config, sampler: Sampler, tokenizer, prompts: list[str], k: int, seed: int) -> list[dict]:
    """K answers per prompt sampled on `sampler`, rows {prompt, responses}; a prompt whose answers are not K
    distinct, non-empty texts is left out (nothing to rank)."""
    samples = sampler.sample(render_prompts(tokenizer, prompts, cfg.data), k, cfg.generation.max_new_tokens, seed)
    rows = []
    for i, p in enumerate(prompts):
        texts = tokenizer.batch_decode([s["ids"] for s in samples[i * k:(i + 1) * k]], skip_special_tokens=True)
        if all(t.strip() for t in texts) and len(set(texts)) == len(texts):
            rows.append({"prompt": p, "responses": texts})
    return rows


def judge_ranked(rows: list[dict], judge: Judge, seed: int) -> list[dict]:
    """Each row's ranking by the judge, with its Bradley-Terry strengths and how many of its pair verdicts
    flipped with the order kept beside it."""
    for r, ranked in zip(rows, judge.rank([r["prompt"] for r in rows], [r["responses"] for r in rows], seed)):
        r.update(ranking=ranked.ranking, judge_strengths=ranked.strengths, judge_pairs=len(ranked.verdicts),
                 judge_flips=sum(v.flipped for v in ranked.verdicts.values()),
                 judge_verdicts=[[a, b, v.p_first, v.p_second] for (a, b), v in sorted(ranked.verdicts.items())])
    return rows
