"""The tiny world's RLHF pipeline in one command, every stage on the real actor machinery:

    rlhf-ray pipeline --config configs/tiny_world.yaml

    0. pretrain   a tiny LM on real text (Python's own documentation), if the world is not built yet
    1. SFT        on instruction pairs cut from that text
    2. label      the SFT model samples K answers per prompt (vLLM); simulated labelers rank them by a hidden
                  gold score plus noise. The reward model only ever sees these rankings.
    3. RM         Bradley-Terry on all C(K, 2) pairs per ranking, initialised from the SFT model
    4. PPO        against the learned RM with a KL penalty to the SFT model; the gold reward is logged beside
                  the proxy every step, so overoptimisation shows as it happens
    5. DPO        from the SFT model on the same rankings
    6. evaluate   on held-out prompts: gold (mean ± sd), proxy RM score and KL to SFT for SFT, PPO, DPO and
                  best-of-n from SFT ranked by the RM. Writes summary.md / summary.json and PNG curves.
"""
from __future__ import annotations

import copy
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import ray
import torch

from actors.engine import EngineActor
from actors.group import RankGroup
from actors.reward import RewardActor
from launch.common import actor_env, cluster_device, engine_env, run_cli, start_ray
from launch.ppo import train as ppo_train
from launch.stages import run_stage
from rlhf_ray.batch import build_rollout_batch
from rlhf_ray.config import Config, dump_config
from rlhf_ray.data import DataError
from rlhf_ray.gold import gold_score, simulated_ranking
from rlhf_ray.models import load_tokenizer
from rlhf_ray.sft import prompt_ids
from rlhf_ray.tiny import TinySpec, build_tiny_world, corpus_text


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_task_data(out: Path, cfg: Config) -> dict:
    """Disjoint prompt sets (eval, labelling, PPO) and SFT pairs, all cut from the corpus' sentences."""
    pc = cfg.pipeline
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", corpus_text().replace("\n", " "))]
    sents = sorted({s for s in sents if 7 <= len(s.split()) <= 40 and s[0].isupper()})
    random.Random(cfg.run.seed).shuffle(sents)

    def prompt(s):
        return "Continue: " + " ".join(s.split()[:5])

    groups, i = {}, 0
    for name, n in (("eval", pc.eval_prompts), ("label", pc.label_prompts), ("ppo", pc.ppo_prompts),
                    ("sft", pc.sft_examples)):
        groups[name], i = sents[i:i + n], i + n
    if len(groups["sft"]) < pc.sft_examples // 2:
        raise DataError(f"pipeline: the corpus has only {len(sents)} usable sentences; ask for fewer prompts/examples")
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: str(write_jsonl(out / f"{name}_prompts.jsonl", [{"prompt": prompt(s)} for s in groups[name]]))
             for name in ("eval", "label", "ppo")}
    paths["sft"] = str(write_jsonl(out / "sft.jsonl", [
        {"instruction": prompt(s), "input": "", "output": " ".join(s.split()[5:])} for s in groups["sft"]]))
    return paths


class Sampler:
    """One vLLM engine for labelling and evaluation; models are swapped in with the same in-place weight
    loading the PPO sync uses (a few ms), instead of starting an engine per model."""

    def __init__(self, cfg: Config, run_dir: Path, device: str):
        self.group = RankGroup(EngineActor, "eval-engine", 1, cfg.engine.cpus_per_engine, cfg.engine.gpus_per_engine,
                               (cfg, device), runtime_env=engine_env(cfg, device, str(run_dir)))
        self.engine = self.group.actors[0]
        self.loaded = cfg.models.policy

    def load(self, model_dir: str) -> None:
        if model_dir != self.loaded:
            payload = (Path(model_dir) / "model.safetensors").read_bytes()
            ray.get(self.engine.load_weights.remote(payload))
            ray.get(self.engine.reset_prefix_cache.remote())
            self.loaded = model_dir

    def sample(self, prompts: list[list[int]], n: int, max_tokens: int, seed: int) -> list[dict]:
        return ray.get(self.engine.generate.remote(prompts, n, max_tokens, 1.0, 1.0, seed))

    def sequence_logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        lps = ray.get(self.engine.prompt_logprobs.remote([p + r for p, r in zip(prompts, responses)],
                                                         [len(p) for p in prompts]))
        return torch.tensor([sum(x) for x in lps])


def label(cfg: Config, sampler: Sampler, tokenizer, prompts_path: str, out: Path) -> str:
    """K answers per prompt from the current (SFT) model, ranked by noisy simulated labelers."""
    pc = cfg.pipeline
    prompts = [json.loads(line)["prompt"] for line in Path(prompts_path).read_text().splitlines()]
    ids = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    samples = sampler.sample(ids, pc.k, cfg.generation.max_new_tokens, cfg.run.seed + 1)
    rng = random.Random(cfg.run.seed + 2)
    rows = []
    for i, p in enumerate(prompts):
        texts = tokenizer.batch_decode([s["ids"] for s in samples[i * pc.k:(i + 1) * pc.k]], skip_special_tokens=True)
        if all(t.strip() for t in texts) and len(set(texts)) == len(texts):
            rows.append({"prompt": p, "responses": texts, "ranking": simulated_ranking(texts, rng, pc.labeler_noise)})
    return str(write_jsonl(out / "rankings.jsonl", rows))


def evaluate(cfg: Config, sampler: Sampler, reward: RankGroup, tokenizer, prompts_path: str,
             policies: dict[str, str], sft_dir: str) -> dict:
    """Gold, proxy and KL to SFT on held-out prompts, for each policy and for best-of-n from SFT."""
    prompts = [json.loads(line)["prompt"] for line in Path(prompts_path).read_text().splitlines()]
    ids = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    max_tokens, pad = cfg.generation.max_new_tokens, tokenizer.pad_token_id

    def proxy(prompt_rep, responses):
        batch = build_rollout_batch(prompt_rep, responses, [[0.0] * len(r) for r in responses], pad)
        return torch.cat(reward.run("scores", batch))

    def gold(responses):
        return torch.tensor([gold_score(t) for t in tokenizer.batch_decode(responses, skip_special_tokens=True)])

    results, drawn = {}, {}
    for name, model_dir in policies.items():
        sampler.load(model_dir)
        s = sampler.sample(ids, 1, max_tokens, cfg.run.seed + 3)
        drawn[name] = ([x["ids"] for x in s], torch.tensor([sum(x["logprobs"]) for x in s]))
    sampler.load(sft_dir)
    for name, (responses, logp) in drawn.items():
        kl = (logp - sampler.sequence_logprobs(ids, responses)).mean().item() if name != "sft" else 0.0
        g = gold(responses)
        results[name] = {"gold_mean": g.mean().item(), "gold_sd": g.std().item(),
                         "proxy_mean": proxy(ids, responses).mean().item(), "kl_to_sft": kl}
    # best-of-n from SFT ranked by the learned RM: KL = log n - (n-1)/n (Stiennon et al. 2020)
    n_max = max(cfg.pipeline.best_of_n)
    s = sampler.sample(ids, n_max, max_tokens, cfg.run.seed + 4)
    responses = [x["ids"] for x in s]
    scores = proxy([p for p in ids for _ in range(n_max)], responses).view(len(ids), n_max)
    golds = gold(responses).view(len(ids), n_max)
    for n in cfg.pipeline.best_of_n:
        best = scores[:, :n].argmax(-1)
        g = golds[torch.arange(len(ids)), best]
        results[f"best_of_{n}"] = {"gold_mean": g.mean().item(), "gold_sd": g.std().item(),
                                   "proxy_mean": scores[:, :n].max(-1).values.mean().item(),
                                   "kl_to_sft": math.log(n) - (n - 1) / n}
    return results


def plot_ppo(metrics_path: Path, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(steps, [r["reward/score_mean"] for r in rows], label="proxy (learned RM)")
    a.set_xlabel("PPO step"); a.set_ylabel("proxy reward"); a.grid(alpha=0.3)
    a2 = a.twinx()
    a2.plot(steps, [r["gold/mean"] for r in rows], color="tab:orange", label="gold (hidden)")
    a2.set_ylabel("gold reward")
    a.legend(handles=a.get_lines() + a2.get_lines(), loc="lower right")
    a.set_title("proxy vs gold reward")
    b.plot(steps, [r["kl/ref_per_seq"] for r in rows], color="tab:green")
    b.set_xlabel("PPO step"); b.set_ylabel("KL to SFT (nats / sequence)"); b.grid(alpha=0.3)
    b.set_title("KL to the SFT model")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def summary_table(ev: dict, rm_eval: dict, seconds: dict) -> str:
    sft = ev["sft"]
    lines = ["| policy | gold (mean ± sd) | gain vs SFT (SFT sd) | proxy RM | KL to SFT (nats/seq) |",
             "|---|---|---|---|---|"]
    for name, r in ev.items():
        gain = (r["gold_mean"] - sft["gold_mean"]) / max(sft["gold_sd"], 1e-8)
        lines.append(f"| {name} | {r['gold_mean']:.3f} ± {r['gold_sd']:.3f} | {gain:+.2f} | {r['proxy_mean']:+.3f} "
                     f"| {r['kl_to_sft']:.3f} |")
    lines += ["", f"RM held-out pairwise accuracy: {rm_eval['accuracy']:.3f} (mean margin {rm_eval['margin']:.3f})",
              "", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in seconds.items()]
    return "\n".join(lines)


def run_pipeline(cfg: Config) -> dict:
    from tqdm import tqdm
    pc = cfg.pipeline
    run_dir = Path(cfg.run.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    device = cluster_device(cfg, cfg.policy.gpus_per_rank)
    seconds, t_all = {}, time.perf_counter()
    bar = tqdm(total=7, desc="pipeline", unit="stage", dynamic_ncols=True)

    def stage(name):
        bar.set_postfix_str(name)
        return time.perf_counter()

    def done(name, t0):
        seconds[name] = time.perf_counter() - t0
        bar.update(1)

    t0 = stage("pretrain")
    world = Path(pc.world_dir).resolve()
    if not (world / "policy" / "model.safetensors").is_file():
        build_tiny_world(world, TinySpec(pretrain_steps=pc.pretrain_steps, seed=cfg.run.seed))
    base = str(world / "policy")
    data = make_task_data(run_dir / "data", cfg)
    done("pretrain", t0)

    def with_(**sets):
        c = copy.deepcopy(cfg)
        for dotted, v in sets.items():
            obj = c
            *path, last = dotted.split("__")
            for p in path:
                obj = getattr(obj, p)
            setattr(obj, last, v)
        return c

    # the sampler engine and the evaluation reward model live beside each stage's actors
    start_ray(cfg, extra_cpus=cfg.engine.cpus_per_engine + cfg.reward.cpus_per_rank)
    t0 = stage("sft")
    sft = run_stage(with_(sft__data=data["sft"], sft__model=base, sft__output=str(run_dir / "sft")), "sft")
    done("sft", t0)

    t0 = stage("label")
    tokenizer = load_tokenizer(sft["model"])
    sampler = Sampler(with_(models__policy=sft["model"]), run_dir, device)
    rankings = label(cfg, sampler, tokenizer, data["label"], run_dir / "data")
    done("label", t0)

    t0 = stage("rm")
    rm = run_stage(with_(rm__data=rankings, rm__model=sft["model"], rm__output=str(run_dir / "rm")), "rm")
    done("rm", t0)

    t0 = stage("ppo")
    ppo_cfg = with_(models__policy=sft["model"], models__reward=rm["model"], models__reference=None,
                    models__critic=None, data__prompts=data["ppo"], data__apply_chat_template=True,
                    run__output_dir=str(run_dir / "ppo"), run__name=f"{cfg.run.name}-ppo")
    ppo = ppo_train(ppo_cfg, gold_fn=gold_score)
    done("ppo", t0)

    t0 = stage("dpo")
    dpo = run_stage(with_(dpo__data=rankings, dpo__model=sft["model"], dpo__output=str(run_dir / "dpo")), "dpo")
    done("dpo", t0)

    t0 = stage("evaluate")
    reward = RankGroup(RewardActor, "eval-reward", 1, cfg.reward.cpus_per_rank, cfg.reward.gpus_per_rank,
                       (with_(models__reward=rm["model"]), device), distributed=cfg.reward.zero_stage == 3,
                       runtime_env={"env_vars": actor_env(device)})
    ev = evaluate(cfg, sampler, reward, tokenizer, data["eval"],
                  {"sft": sft["model"], "ppo": ppo["checkpoint"] + "/policy", "dpo": dpo["model"]}, sft["model"])
    reward.shutdown()
    sampler.group.shutdown()
    done("evaluate", t0)
    bar.close()
    seconds["total"] = time.perf_counter() - t_all

    table = summary_table(ev, rm["eval"], seconds)
    plot = plot_ppo(Path(ppo["metrics"]), run_dir / "ppo_curves.png")
    summary = {"eval": ev, "rm_eval": rm["eval"], "seconds": seconds,
               "ppo_gain_sd": (ev["ppo"]["gold_mean"] - ev["sft"]["gold_mean"]) / max(ev["sft"]["gold_sd"], 1e-8),
               "models": {"sft": sft["model"], "rm": rm["model"], "ppo": ppo["checkpoint"] + "/policy",
                          "dpo": dpo["model"]}, "plot": str(plot)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (run_dir / "summary.md").write_text(table + "\n")
    if cfg.logging.wandb.enabled and cfg.logging.wandb.mode != "disabled":
        import wandb
        run = wandb.init(project=cfg.logging.wandb.project, entity=cfg.logging.wandb.entity, mode=cfg.logging.wandb.mode,
                         name=f"{cfg.run.name}-summary", dir=str(run_dir), reinit="finish_previous")
        run.log({f"eval/{p}/{k}": v for p, r in ev.items() for k, v in r.items()})
        run.log({"ppo_curves": wandb.Image(str(plot))})
        run.finish()
    print("\n" + table, flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    summary = run_cli("rlhf-ray pipeline", "SFT -> RM from rankings -> PPO, and DPO", lambda cfg, _: run_pipeline(cfg), argv)
    if summary == 2:
        return 2
    print(f"\nsummary: {Path(summary['plot']).parent / 'summary.md'}\ncurves:  {summary['plot']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
