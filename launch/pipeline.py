"""The tiny world's RLHF pipeline in one command, every stage on the real actor machinery:

    rlhf-ray pipeline --config configs/tiny_world.yaml

    0. pretrain   a tiny LM on real text (Python's own documentation), if the world is not built yet
    1. SFT        on instruction pairs cut from that text
    2. label      the SFT model samples K answers per prompt (vLLM); simulated labelers rank them by a hidden
                  gold score plus noise, or (pipeline.labels: judge) an LLM judge does, from pairwise verdicts
                  asked in both orders. The reward model only ever sees these rankings.
    3. RM         Bradley-Terry on all C(K, 2) pairs per ranking, initialised from the SFT model; a second,
                  held-out monitor RM on rankings of other prompts (pipeline.monitor_prompts)
    4. PPO        against the learned RM with a KL penalty to the SFT model; the monitor RM and the gold reward
                  are logged beside the proxy every step, so overoptimisation shows as it happens
    5. DPO        from the SFT model on the same rankings
    6. evaluate   on held-out prompts: gold (mean ± sd), proxy RM score and KL to SFT for SFT, PPO, DPO and
                  best-of-n from SFT ranked by the RM, and an Elo leaderboard of them from head-to-head games
                  that gold decides. Writes summary.md / summary.json and PNG curves.

Every stage renders prompts with `rlhf_ray.prompts.render_prompt` under data.apply_chat_template, and every
stage's config is derived from the pipeline's through `rlhf_ray.config.derive` (typed and validated, as --set).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from actors.group import RankGroup
from actors.reward import RewardActor
from launch.answers import Judge, Sampler, answer_sets, write_jsonl
from launch.common import RunError, actor_env, cluster_device, run_cli, start_ray
from launch.ppo import train as ppo_train
from launch.rounds import (Audit, HumanLabels, JudgeLabels, LabelSource, PoolLabels, Progress, SimulatedLabels,
                           audit_rows)
from launch.stages import run_stage
from rlhf_ray import checkpoint as ckpt
from rlhf_ray.batch import build_rollout_batch, cat
from rlhf_ray.config import Config, derive, dump_config, resolve_paths
from rlhf_ray.data import DataError, read_jsonl
from rlhf_ray.drift import DriftCheck, gold_pairs, pooled_audits
from rlhf_ray.label_store import LabelStore
from rlhf_ray.metrics import best_of_n, curve_agreement, moving_average
from rlhf_ray.models import load_tokenizer
from rlhf_ray.prefs import games_per_prompt, leaderboard
from rlhf_ray.prompts import render_prompts
from rlhf_ray.tiny_world.gold import GOLDS, SimulatedLabeler, simulated_thumbs
from rlhf_ray.tiny_world.world import TinySpec, build_tiny_world, corpus_text


def make_task_data(out: Path, cfg: Config) -> dict:
    """Disjoint prompt sets (eval, labelling, the monitor RM's labelling, PPO) and SFT pairs, all cut from the
    corpus' sentences."""
    pc = cfg.pipeline
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", corpus_text().replace("\n", " "))]
    sents = sorted({s for s in sents if 7 <= len(s.split()) <= 40 and s[0].isupper()})
    random.Random(cfg.run.seed).shuffle(sents)

    def prompt(s):
        return "Continue: " + " ".join(s.split()[:5])

    groups, i = {}, 0
    later = pc.round_labels * (pc.rounds - 1)       # later rounds' label prompts, after the first round's
    for name, n in (("eval", pc.eval_prompts), ("label", pc.label_prompts + later), ("monitor", pc.monitor_prompts),
                    ("ppo", pc.ppo_prompts), ("sft", pc.sft_examples)):
        groups[name], i = sents[i:i + n], i + n
    if len(groups["sft"]) < pc.sft_examples:
        raise DataError(f"pipeline: the corpus has only {len(sents)} usable sentences, {len(groups['sft'])} left for "
                        f"pipeline.sft_examples={pc.sft_examples}; ask for fewer prompts/examples")
    out.mkdir(parents=True, exist_ok=True)
    label, groups["label"] = groups["label"], groups["label"][:pc.label_prompts]
    for r in range(2, pc.rounds + 1):
        start = pc.label_prompts + (r - 2) * pc.round_labels
        groups[f"label_r{r}"] = label[start:start + pc.round_labels]
    paths = {name: str(write_jsonl(out / f"{name}_prompts.jsonl", [{"prompt": prompt(s)} for s in groups[name]]))
             for name in groups if name != "sft"}
    paths["sft"] = str(write_jsonl(out / "sft.jsonl", [
        {"instruction": prompt(s), "input": "", "output": " ".join(s.split()[5:])} for s in groups["sft"]]))
    return paths


def read_prompts(path: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines()]


def rm_gold_accuracy(rm_dir: str | Path, rankings: str | Path, cfg: Config) -> float:
    """A trained reward model against gold, on answers it never trained on (pass the rankings of prompts disjoint
    from its own: the RM on the monitor's, the monitor RM on the RM's). Of each prompt's answer pairs whose gold
    differs, the share it orders as gold does. The answers are scored as the RM stage scores them (rendered prompt,
    answer, EOS)."""
    from rlhf_ray.models import load_scalar_model
    from rlhf_ray.prompts import render_prompt
    rm, tok = load_scalar_model(str(rm_dir)), load_tokenizer(str(rm_dir))
    right = total = 0
    for line in Path(rankings).read_text().splitlines():
        row = json.loads(line)
        p = render_prompt(tok, row["prompt"], cfg.data.apply_chat_template, cfg.rm.max_len // 2)
        with torch.no_grad():
            v = [rm(input_ids=torch.tensor([(p + tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
                                            [:cfg.rm.max_len]])).logits.item() for r in row["responses"]]
        a, b = gold_pairs(v, [GOLDS[cfg.pipeline.gold](r) for r in row["responses"]])
        right, total = right + a, total + b
    return right / max(total, 1)


def label_source(cfg: Config, judge: Judge | None, store: LabelStore | None) -> LabelSource:
    """Who ranks, from pipeline.labels / pipeline.labelers (launch/rounds.py)."""
    pc, gold = cfg.pipeline, GOLDS[cfg.pipeline.gold]
    if store is not None:
        return HumanLabels(store, pc.people_per_task, pc.weigh_labelers, pc.label_wait_s)
    if judge is not None:
        return JudgeLabels(judge, gold)
    if pc.labelers:
        return PoolLabels([SimulatedLabeler(lab.name, lab.noise, lab.bias, lab.strength, gold) for lab in pc.labelers],
                          pc.weigh_labelers)
    return SimulatedLabels(pc.labeler_noise, gold)


def label(cfg: Config, sampler: Sampler, tokenizer, source: LabelSource, prompts_path: str, out: Path, seed: int,
          count: int | None = None) -> dict:
    """K answers per prompt (the first `count` prompts of the file) from the sampler's current model, ranked by
    `source`, written to `out`. Returns {path, labels (rankings made), report (the judge's agreement with gold on
    these answers, or the pool's reliabilities and agreement; None for single simulated labelers)}."""
    rows = answer_sets(cfg, sampler, tokenizer, read_prompts(prompts_path)[:count], cfg.pipeline.k, seed)
    report = source.rank(rows, seed)
    return {"path": str(write_jsonl(out, rows)), "labels": len(rows), "report": report}


def evaluate(cfg: Config, sampler: Sampler, reward: RankGroup, tokenizer, prompts_path: str,
             policies: dict[str, str], sft_dir: str) -> tuple[dict, list[dict]]:
    """Gold, proxy (and monitor) RM scores and KL to SFT on held-out prompts, for each policy
    (pipeline.eval_samples answers per prompt) and for best-of-n from SFT ranked by the proxy RM. Best-of-n draws
    2 x max(n) answers per prompt and averages over their disjoint groups of n (16 groups of 2, ..., 2 of 16):
    the same expectation as one group per prompt, with less sampling noise.

    Also the leaderboard (rlhf_ray.prefs.leaderboard) of all these entries: a game is two entries' answers to the
    same prompt (answer j against answer j), won by the higher gold, ties dropped. Returns (per-entry means,
    leaderboard rows best first)."""
    ids = render_prompts(tokenizer, read_prompts(prompts_path), cfg.data)
    k = cfg.pipeline.eval_samples
    ids_k = [p for p in ids for _ in range(k)]
    max_tokens, pad = cfg.generation.max_new_tokens, tokenizer.pad_token_id

    def rm_scores(prompt_rep, responses):
        """(proxy, monitor) scores; the monitor's is None without a monitor RM."""
        batch = build_rollout_batch(prompt_rep, responses, [[0.0] * len(r) for r in responses], pad)
        s = cat(reward.run("scores", batch))
        return s.total, s.monitor

    def gold(responses):
        return torch.tensor([GOLDS[cfg.pipeline.gold](t)
                             for t in tokenizer.batch_decode(responses, skip_special_tokens=True)])

    results, drawn, per_prompt = {}, {}, {}          # per_prompt[entry][prompt]: its answers' gold
    for name, model_dir in policies.items():
        sampler.load(model_dir)
        s = sampler.sample(ids, k, max_tokens, cfg.run.seed + 3)
        drawn[name] = ([x["ids"] for x in s], torch.tensor([sum(x["logprobs"]) for x in s]))
    sampler.load(sft_dir)
    for name, (responses, logp) in drawn.items():
        kl = (logp - sampler.sequence_logprobs(ids_k, responses)).mean().item() if name != "sft" else 0.0
        g, (proxy, monitor) = gold(responses), rm_scores(ids_k, responses)
        per_prompt[name] = g.view(len(ids), k).tolist()
        results[name] = {"gold_mean": g.mean().item(), "gold_sd": g.std().item(), "proxy_mean": proxy.mean().item(),
                         **({"monitor_mean": monitor.mean().item()} if monitor is not None else {}), "kl_to_sft": kl}
    # best-of-n from SFT ranked by the learned RM: KL = log n - (n-1)/n (Stiennon et al. 2020)
    m = 2 * max(cfg.pipeline.best_of_n)
    s = sampler.sample(ids, m, max_tokens, cfg.run.seed + 4)
    responses = [x["ids"] for x in s]
    scores = rm_scores([p for p in ids for _ in range(m)], responses)[0].view(len(ids), m)
    golds = gold(responses).view(len(ids), m)
    for n in cfg.pipeline.best_of_n:
        g, proxy = best_of_n(scores, golds, n)
        per_prompt[f"best_of_{n}"] = g.tolist()
        results[f"best_of_{n}"] = {"gold_mean": g.mean().item(), "gold_sd": g.std().item(),
                                   "proxy_mean": proxy.mean().item(), "kl_to_sft": math.log(n) - (n - 1) / n}
    # every n is on the board, a ladder of known KL to place the trained policies on; but best-of-n entries do
    # not play each other: they pick from the same samples (best-of-2's first group lies inside best-of-4's), so
    # their answer j often is the same answer (a tie) and their other games are not independent draws
    names = list(per_prompt)
    bon = [i for i, name in enumerate(names) if name.startswith("best_of_")]
    games = games_per_prompt([per_prompt[name] for name in names], apart=set(itertools.combinations(bon, 2)))
    return results, leaderboard(names, games, seed=cfg.run.seed)


def zscore(x: list[float]) -> list[float]:
    m, sd = statistics.mean(x), statistics.stdev(x) if len(x) > 1 else 0.0
    return [(v - m) / (sd or 1.0) for v in x]


def plot_ppo(rows: list[dict], out: Path, window: int, round_starts: list[int] = ()) -> Path:
    """Left: proxy, monitor and gold reward per PPO step, each z-scored over the run (their shapes are what
    must agree; their scales differ), with a moving average; right: KL to the SFT model. A dotted line where a
    round's new reward model took over (the proxy's scale changes there)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, color in (("reward/score_mean", "proxy (the RM PPO optimises)", "tab:blue"),
                              ("monitor/score_mean", "monitor (held-out RM)", "tab:purple"),
                              ("gold/mean", "gold (hidden)", "tab:orange")):
        if key in rows[0]:
            z = zscore([r[key] for r in rows])
            a.plot(steps, z, color=color, alpha=0.3, lw=1)
            a.plot(steps, moving_average(z, window), color=color, lw=2, label=label)
    a.set_xlabel("PPO step"); a.set_ylabel(f"reward, z-scored over steps ({window}-step average bold)")
    a.grid(alpha=0.3); a.legend(loc="lower right", fontsize=8)
    a.set_title("proxy vs held-out monitor vs gold")
    b.plot(steps, [r["kl/ref_per_seq"] for r in rows], color="tab:green")
    b.set_xlabel("PPO step"); b.set_ylabel("KL to SFT (nats / sequence)"); b.grid(alpha=0.3)
    b.set_title("KL to the SFT model")
    for x in round_starts:
        for ax in (a, b):
            ax.axvline(x + 0.5, color="grey", ls=":", lw=1)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def monitor_figures(rows: list[dict], window: int) -> dict:
    """How the held-out monitor RM (and, for contrast, the proxy) tracks gold over the PPO steps."""
    steps, gold = [r["step"] for r in rows], [r["gold/mean"] for r in rows]
    return {name: curve_agreement([r[key] for r in rows], gold, steps, window)
            for name, key in (("monitor", "monitor/score_mean"), ("proxy", "reward/score_mean")) if key in rows[0]}


def summary_table(ev: dict, board: list[dict], rm_eval: dict, monitor_eval: dict | None, monitor: dict,
                  seconds: dict, rounds: list[dict] | None = None) -> str:
    sft = ev["sft"]
    has_monitor = "monitor_mean" in sft
    lines = ["| policy | gold (mean ± sd) | gain vs SFT (SFT sd) | proxy RM |" + (" monitor RM |" if has_monitor else "")
             + " KL to SFT (nats/seq) |", "|---|---|---|---|" + ("---|" if has_monitor else "") + "---|"]
    for name, r in ev.items():
        gain = (r["gold_mean"] - sft["gold_mean"]) / max(sft["gold_sd"], 1e-8)
        lines.append(f"| {name} | {r['gold_mean']:.3f} ± {r['gold_sd']:.3f} | {gain:+.2f} | {r['proxy_mean']:+.3f} |"
                     + (f" {r['monitor_mean']:+.3f} |" if "monitor_mean" in r else (" |" if has_monitor else ""))
                     + f" {r['kl_to_sft']:.3f} |")
    lines += ["", "| entry | rating ± sd | 95 % interval | online Elo | games | win rate |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['rating']:.0f} ± {r['rating_sd']:.0f} | {r['rating_lo']:.0f}..{r['rating_hi']:.0f} | "
              f"{r['elo']:.0f} | {r['games']} | {r['win_rate']:.2f} |" for r in board]
    lines += ["", "Leaderboard: a game is two entries' answers to the same held-out prompt (answer j vs answer j), "
              "won by the higher gold, ties dropped; best-of-n entries share samples and do not play each other. "
              "Rating: the Bradley-Terry fit in Elo points (mean 1000), ± and interval from a bootstrap over "
              "prompts; online Elo over the same games beside it."]
    lines += ["", f"RM held-out pairwise accuracy: {rm_eval['accuracy']:.3f} (mean margin {rm_eval['margin']:.3f})"]
    if monitor_eval:
        lines.append(f"Monitor RM held-out pairwise accuracy: {monitor_eval['accuracy']:.3f}")
    for name, m in monitor.items():
        lines.append(f"PPO steps, {name} vs gold: Pearson r {m['pearson']:+.2f}; peak step {m['peak_step']} "
                     f"(gold's {m['reference_peak_step']})")
    if rounds:
        lines += ["", "| round | labels (fresh + audit) | RM held-out acc | PPO steps | audit acc first → last | "
                  "gold, last steps | proxy, last steps | KL, last steps | DPO labels | ended by |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        f = lambda v, spec: "–" if v is None else format(v, spec)     # noqa: E731
        kept = lambda x: "" if x.get("kept") is None else f"; kept step {x['kept']}"     # noqa: E731
        lines += [f"| {x['round']} | {x['labels']} + {x['audit_labels']} | {x['rm_accuracy']:.3f} | {x['ppo_steps']} | "
                  f"{f(x['audit_first'], '.2f')} → {f(x['audit_last'], '.2f')} | {f(x['gold_end'], '.3f')} | "
                  f"{f(x['proxy_end'], '+.3f')} | {f(x['kl_end'], '.2f')} | {x['dpo_labels']} | "
                  f"{x['stopped'] or 'its steps'}{kept(x)} |" for x in rounds]
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in seconds.items()]
    return "\n".join(lines)


def ppo_checkpoint_policy(ppo: dict, cfg: Config, start: str) -> str:
    """The PPO policy the evaluation (and the next round) takes: the run's newest published checkpoint. The divergence
    guard publishes none from a step over its KL bound, so that may be an earlier step's (said in one line), or none
    at all (a one-line error: there is nothing trustworthy to go on from). A last round the drift rule ended keeps
    its policy of the last audit the RM passed (`kept`: that step; 0 keeps `start`, the policy it began from)."""
    if ppo.get("kept") is not None:
        print(f"pipeline: the last round keeps its policy of step {ppo['kept']}, the last audit the reward model "
              f"passed ({ppo['stopped']})", flush=True)
        return str(Path(ppo["checkpoint"]) / "policy") if ppo["checkpoint"] else start
    if ppo["checkpoint"] is None:
        raise RunError(f"pipeline: PPO published no checkpoint to evaluate: its last step's KL to the reference was "
                       f"over guard.max_kl_per_token ({cfg.guard.max_kl_per_token:g}) and checkpoint.every is "
                       f"{cfg.checkpoint.every} (set it to keep earlier steps, or lower the policy's learning rate)")
    step = ckpt.load_state(Path(ppo["checkpoint"]))["step"]
    if step != ppo["steps"]:
        print(f"pipeline: going on from PPO's checkpoint of step {step}: later steps were over "
              f"guard.max_kl_per_token and not published", flush=True)
    return str(Path(ppo["checkpoint"]) / "policy")


def round_name(stage: str, r: int) -> str:
    """Round 1's stages keep the one-pass names (rm, ppo, dpo); later rounds' are rm_r2, ppo_r2, ..."""
    return stage if r == 1 else f"{stage}_r{r}"


def round_record(r: int, ppo: dict, window: int) -> dict:
    """A round's PPO in numbers: steps run, why it stopped early (if it did), and its last `window` steps' means."""
    rows = [json.loads(line) for line in Path(ppo["metrics"]).read_text().splitlines()]
    tail = rows[-window:]
    mean = lambda key: statistics.mean(x[key] for x in tail) if tail and key in tail[0] else None  # noqa: E731
    audits = [x["audit/accuracy"] for x in rows if "audit/accuracy" in x]
    return {"round": r, "ppo_steps": len(rows), "stopped": ppo["stopped"], "kept": ppo.get("kept"),
            "gold_end": mean("gold/mean"), "proxy_end": mean("reward/score_mean"), "kl_end": mean("kl/ref_per_seq"),
            "audit_first": audits[0] if audits else None, "audit_last": audits[-1] if audits else None}


class Stages:
    """A round's stages on the pipeline's shared machinery: the sampler engine, the label source, the record of
    finished stages (each stage's result kept under its name: a resumed pipeline skips it), the stage clock."""

    def __init__(self, cfg: Config, run_dir: Path, data: dict, progress: Progress, sampler: Sampler, tokenizer,
                 source: LabelSource, sft: str, monitor: str | None, gold, resume: bool, stage, done):
        self.cfg, self.run_dir, self.data, self.progress = cfg, run_dir, data, progress
        self.sampler, self.tokenizer, self.source = sampler, tokenizer, source
        self.sft, self.monitor, self.gold, self.resume = sft, monitor, gold, resume
        self.stage, self.done, self.out = stage, done, run_dir / "data"

    def label(self, key: str, policy: str, prompts: str, seed: int, count: int | None = None) -> dict:
        """`count` prompts' K answers from `policy`, ranked by the label source."""
        def run():
            self.sampler.load(policy)
            return label(self.cfg, self.sampler, self.tokenizer, self.source, prompts,
                         self.out / f"{key}_rankings.jsonl", seed, count)
        return self.progress.run(key, run)

    def reward_model(self, r: int, data: str, start: str) -> dict:
        name = round_name("rm", r)
        return self.progress.run(name, lambda: run_stage(derive(self.cfg, {
            "rm.data": data, "rm.model": start, "rm.output": str(self.run_dir / name)}), "rm"))

    def ppo(self, r: int, policy: str, rm: str, steps: int, last: bool) -> dict:
        """Round r's PPO, watched by the audit (its rankings in data/audit_r<r>_rankings.jsonl). Under on_drift a
        round but the last ends when the RM drifts; with pipeline.keep_trusted and audits, the audit rule ends the
        last one too, keeping the policy of the last audit the RM passed (no later round would refresh the RM).
        The monitor rule does not end the last round: it names no step the RM was right at, and in the
        over-optimising world it fired while gold rose (benchmarks/README.md, the closed loop)."""
        pc = self.cfg.pipeline
        keep = last and pc.keep_trusted and pc.audit_prompts > 0
        check = DriftCheck(pc.drift_drop, pooled_audits(pc.drift_audits, steps, pc.audit_every),
                           2 * pc.monitor_window if pc.drift_monitor and not keep else 0)
        audit = Audit(self.source, self.tokenizer, self.out / f"audit_r{r}_rankings.jsonl", pc.audit_prompts,
                      pc.audit_every, self.cfg.generation.n, self.cfg.run.seed + 1000 * r, check,
                      (pc.refresh == "on_drift" and not last) or keep, self.gold)
        return self.progress.run(round_name("ppo", r), lambda: ppo_round(
            self.cfg, r, policy, self.sft, rm, self.monitor, self.data["ppo"], self.run_dir, steps, audit, self.gold,
            self.resume, keep))

    def dpo(self, r: int, data: str, start: str) -> dict:
        """Round r's DPO from `start`, the KL to the SFT model (pipeline.kl_anchor sft; round 1 starts there) or
        to `start` (round)."""
        name = round_name("dpo", r)
        anchor = self.sft if r > 1 and self.cfg.pipeline.kl_anchor == "sft" else ""    # "": the starting weights
        return self.progress.run(name, lambda: run_stage(derive(self.cfg, {
            "dpo.data": data, "dpo.model": start, "dpo.reference": anchor,
            "dpo.output": str(self.run_dir / name)}), "dpo"))


class Loop:
    """The rounds' state: each branch's current policy, the reward model, the PPO branch's rankings so far, the
    last round's audit rankings (the next round's first labels), PPO steps left, and each round's record."""

    def __init__(self, st: Stages, first: dict):
        self.st, self.first = st, first
        self.ppo_policy = self.dpo_policy = self.rm_dir = st.sft
        self.ppo_labels, self.audits = [first["path"]], []
        self.remaining, self.plan = st.cfg.train.steps, st.cfg.round_plan()
        self.rms, self.ppos, self.dpos, self.records = [], [], [], []

    def round(self, r: int) -> None:
        st, pc, data = self.st, self.st.cfg.pipeline, self.st.data
        last = r == pc.rounds
        t0 = st.stage(f"label r{r}")
        if r == 1:                     # the SFT model's answers, labelled before the monitor RM was trained
            fresh = dpo_fresh = self.first
            rm_data, rm_from = self.first["path"], st.sft
        else:                          # each branch's own policy's answers to this round's prompts
            seed = st.cfg.run.seed + 10 * r
            fresh = st.label(f"label_r{r}", self.ppo_policy, data[f"label_r{r}"], seed,
                             max(pc.round_labels - len(self.audits), 0))      # the audits' rankings count
            dpo_fresh = st.label(f"label_dpo_r{r}", self.dpo_policy, data[f"label_r{r}"], seed + 1)
            new = [str(write_jsonl(st.out / f"audit_r{r - 1}_kept.jsonl", self.audits)), fresh["path"]]
            self.ppo_labels += new
            # scratch: from the SFT model on every ranking so far; warm: from the last RM on the new ones
            sources, rm_from = (self.ppo_labels, st.sft) if pc.rm_refresh == "scratch" else (new, self.rm_dir)
            rm_data = str(write_jsonl(st.out / f"rm_r{r}_rankings.jsonl",
                                      [row for path in sources for _, row in read_jsonl(path)]))
        st.done("label", t0)

        t0 = st.stage(f"rm r{r}")
        rm = st.reward_model(r, rm_data, rm_from)
        self.rm_dir = rm["model"]
        st.done("rm", t0)

        t0 = st.stage(f"ppo r{r}")
        steps = self.remaining if last or pc.refresh == "on_drift" else self.plan[r - 1]
        ppo = st.ppo(r, self.ppo_policy, self.rm_dir, steps, last)
        self.ppo_policy = ppo_checkpoint_policy(ppo, st.cfg, self.ppo_policy)
        self.remaining -= ppo["steps"]
        self.audits = audit_rows(st.out / f"audit_r{r}_rankings.jsonl", ppo["steps"])
        st.done("ppo", t0)

        t0 = st.stage(f"dpo r{r}")
        dpo = st.dpo(r, dpo_fresh["path"], self.dpo_policy)
        self.dpo_policy = dpo["model"]
        st.done("dpo", t0)
        self.rms.append(rm), self.ppos.append((ppo, self.ppo_policy)), self.dpos.append(dpo)
        self.records.append({**round_record(r, ppo, pc.monitor_window), "labels": fresh["labels"],
                             "audit_labels": len(self.audits), "dpo_labels": dpo_fresh["labels"],
                             "rm_accuracy": rm["eval"]["accuracy"]})


def run_pipeline(cfg: Config, resume: bool = False) -> dict:
    """Every stage, round by round (pipeline.rounds); resume: keep the stages a killed run finished
    (<run.output_dir>/pipeline_state.json) and resume its unfinished PPO round from its newest checkpoint."""
    from dataclasses import asdict
    from tqdm import tqdm
    from rlhf_ray.preflight import judge_tokenizer
    cfg = resolve_paths(cfg.check_pipeline())    # every stage's settings, before the first one starts
    pc = cfg.pipeline
    gold = GOLDS[pc.gold]
    world_judge = pc.labels == "judge" and not cfg.judge.model      # the world's stand-in judge, built below
    if pc.labels == "judge" and not world_judge:
        judge_tokenizer(cfg)                       # the judge's model and labels, before hours of SFT
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(run_dir, json.loads(json.dumps(asdict(cfg))), resume)
    device = cluster_device(cfg, cfg.policy.gpus_per_rank)      # resolves train.dtype auto: the dump says what ran
    seconds, t_all = {}, time.perf_counter()
    bar = tqdm(total=5 + 4 * pc.rounds + world_judge + pc.kto, desc="pipeline", unit="stage", dynamic_ncols=True)

    def stage(name):
        bar.set_postfix_str(name)
        return time.perf_counter()

    def done(name, t0):
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
        bar.update(1)

    t0 = stage("pretrain")
    world = Path(pc.world_dir)
    if not (world / "policy" / "model.safetensors").is_file():
        build_tiny_world(world, TinySpec(pretrain_steps=pc.pretrain_steps, seed=cfg.run.seed))
    base = str(world / "policy")
    data = make_task_data(run_dir / "data", cfg)
    done("pretrain", t0)
    if world_judge:
        from rlhf_ray.tiny_world.judge import TinyJudgeSpec, build_tiny_judge
        t0 = stage("judge")      # taught gold on corpus text, no more answers than the labelers would rank
        spec = TinyJudgeSpec(examples=pc.label_prompts * pc.k, seed=cfg.run.seed)
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)      # every core: Ray, and all else, starts after this stage
        try:
            cfg = derive(cfg, {"judge.model": build_tiny_judge(world, cfg.judge_format(), spec)})
        finally:
            torch.set_num_threads(threads)
        judge_tokenizer(cfg)
        done("judge", t0)
    dump_config(cfg, run_dir / "config.yaml")

    # the sampler engine and the evaluation reward model live beside each stage's actors (and the judge's
    # engines beside the sampler while labelling, and beside PPO's actors when rounds or audits need it later)
    judge_cpus = cfg.judge.engine.num_ranks * cfg.judge.engine.cpus_per_rank if pc.labels == "judge" else 0
    start_ray(cfg, extra_cpus=cfg.engine.cpus_per_rank + cfg.reward.cpus_per_rank + judge_cpus)
    t0 = stage("sft")
    sft = progress.run("sft", lambda: run_stage(
        derive(cfg, {"sft.data": data["sft"], "sft.model": base, "sft.output": str(run_dir / "sft")}), "sft"))
    done("sft", t0)

    t0 = stage("label")
    tokenizer = load_tokenizer(sft["model"])
    sampler = Sampler.start(derive(cfg, {"models.policy": sft["model"]}), run_dir, device)
    judge = Judge.start(cfg, run_dir, device) if pc.labels == "judge" else None
    store = LabelStore(pc.label_db or run_dir / "labels.sqlite") if pc.labels == "human" else None
    page = None
    if store is not None and pc.label_page:
        from launch.label_server import start_page
        page = start_page(store, pc.label_page)
    try:                                       # a failed stage leaves no engine behind (in-process callers go on)
        source = label_source(cfg, judge, store)
        out = run_dir / "data"
        first = progress.run("label", lambda: label(cfg, sampler, tokenizer, source, data["label"],
                                                    out / "label_rankings.jsonl", cfg.run.seed + 1))
        held = progress.run("label_monitor", lambda: label(cfg, sampler, tokenizer, source, data["monitor"],
                                                           out / "monitor_rankings.jsonl", cfg.run.seed + 5)
                            ) if pc.monitor_prompts else None
        if judge is not None and pc.rounds == 1 and not pc.audit_prompts:
            judge.shutdown()                       # nothing more for it to label
        done("label", t0)

        t0 = stage("rm")
        monitor_rm = progress.run("rm_monitor", lambda: run_stage(derive(cfg, {
            "rm.data": held["path"], "rm.model": sft["model"], "rm.output": str(run_dir / "rm_monitor")}), "rm")
                                  ) if held else None
        done("rm", t0)
        monitor_dir = monitor_rm["model"] if monitor_rm else None

        # the rounds (docs/rounds.md): label the current policy's answers -> a reward model on every ranking so
        # far -> PPO on from the last policy; DPO on from its own last model on its own answers' labels
        loop = Loop(Stages(cfg, run_dir, data, progress, sampler, tokenizer, source, sft["model"], monitor_dir, gold,
                           resume, stage, done), first)
        for r in range(1, pc.rounds + 1):
            loop.round(r)
            if loop.remaining <= 0:
                break
        rm_dir, rms, ppos, dpos, rounds = loop.rm_dir, loop.rms, loop.ppos, loop.dpos, loop.records
        kto = None
        if pc.kto:                 # one pass, beside round 1's DPO: thumbs on the answers its rankings judge
            t0 = stage("kto")
            kto = progress.run("kto", lambda: run_stage(derive(cfg, {
                "kto.data": str(write_jsonl(out / "label_thumbs.jsonl", simulated_thumbs(
                    [row for _, row in read_jsonl(first["path"])], random.Random(cfg.run.seed + 7), pc.labeler_noise,
                    gold))), "kto.model": sft["model"], "kto.output": str(run_dir / "kto")}), "kto"))
            done("kto", t0)

        t0 = stage("evaluate")
        eval_cfg = derive(cfg, {"models.policy": sft["model"], "models.reward": rm_dir, "models.monitor": monitor_dir})
        reward = RankGroup(RewardActor, "eval-reward", 1, cfg.reward.cpus_per_rank, cfg.reward.gpus_per_rank,
                           (eval_cfg, device), distributed=cfg.reward.zero_stage == 3,
                           runtime_env={"env_vars": actor_env(device)})
        n = len(rounds)
        policies = {"sft": sft["model"], **{("ppo" if r == n else f"ppo_r{r}"): ppos[r - 1][1] for r in range(1, n + 1)},
                    **{("dpo" if r == n else f"dpo_r{r}"): dpos[r - 1]["model"] for r in range(1, n + 1)},
                    **({"kto": kto["model"]} if kto else {})}
        ev, board = evaluate(eval_cfg, sampler, reward, tokenizer, data["eval"], policies, sft["model"])
        reward.shutdown()
        done("evaluate", t0)
    finally:
        sampler.group.shutdown()
        if judge is not None:
            judge.shutdown()
        if page is not None:
            page.stop()
    bar.close()
    seconds["total"] = time.perf_counter() - t_all

    rows, offset = [], 0
    for ppo, _ in ppos:          # every round's PPO steps on one axis
        part = [json.loads(line) for line in Path(ppo["metrics"]).read_text().splitlines()]
        rows += [{**x, "step": x["step"] + offset} for x in part]
        offset += len(part)
    monitor = monitor_figures(rows, pc.monitor_window)
    rm, dpo = rms[-1], dpos[-1]
    table = summary_table(ev, board, rm["eval"], monitor_rm and monitor_rm["eval"], monitor, seconds,
                          rounds if pc.rounds > 1 else None)
    plot = plot_ppo(rows, run_dir / "ppo_curves.png", pc.monitor_window,
                    [sum(x["ppo_steps"] for x in rounds[:i]) for i in range(1, n)])
    report = first["report"]
    summary = {"eval": ev, "leaderboard": board, "rm_eval": rm["eval"], "monitor_rm_eval": monitor_rm and monitor_rm["eval"],
               "labels": pc.labels, "judge_eval": report if pc.labels == "judge" else None,
               "labeler_pool": report if pc.labels != "judge" else None, "rounds": rounds,
               "labels_used": {"ppo": sum(x["labels"] + x["audit_labels"] for x in rounds),     # the audits' count
                               "dpo": sum(x["dpo_labels"] for x in rounds)},
               "held_out": {name: {"before": st["eval_before"], "after": st["eval"]}
                            for name, st in (("sft", sft), ("rm", rm), ("monitor_rm", monitor_rm), ("dpo", dpo),
                                             ("kto", kto)) if st},
               "monitor": monitor, "seconds": seconds,
               "ppo_gain_sd": (ev["ppo"]["gold_mean"] - ev["sft"]["gold_mean"]) / max(ev["sft"]["gold_sd"], 1e-8),
               "models": {"sft": sft["model"], "rm": rm["model"], "monitor_rm": monitor_dir,
                          "ppo": ppos[-1][1], "dpo": dpo["model"],
                          **{f"{kind}_r{r}": m for r in range(1, n) for kind, m in
                             (("rm", rms[r - 1]["model"]), ("ppo", ppos[r - 1][1]), ("dpo", dpos[r - 1]["model"]))}},
               "plot": str(plot)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (run_dir / "summary.md").write_text(table + "\n")
    if cfg.logging.wandb.enabled and cfg.logging.wandb.mode != "disabled":
        import wandb
        run = wandb.init(project=cfg.logging.wandb.project, entity=cfg.logging.wandb.entity, mode=cfg.logging.wandb.mode,
                         name=f"{cfg.run.name}-summary", dir=str(run_dir), reinit="finish_previous")
        run.log({f"eval/{p}/{k}": v for p, r in ev.items() for k, v in r.items()})
        run.log({f"monitor/{name}_vs_gold_{k}": v for name, m in monitor.items() for k, v in m.items()})
        for x in rounds:
            run.log({f"rounds/{k}": v for k, v in x.items() if isinstance(v, (int, float))})
        run.log({"ppo_curves": wandb.Image(str(plot))})
        run.finish()
    print("\n" + table, flush=True)
    return summary


def ppo_round(cfg: Config, r: int, policy: str, sft: str, rm: str, monitor: str | None, prompts: str, run_dir: Path,
              steps: int, audit: Audit, gold, resume: bool, keep_trusted: bool = False) -> dict:
    """Round r's PPO: from the last round's policy against this round's RM, the KL still to the SFT model
    (models.reference; pipeline.kl_anchor round: to the round's starting policy); a fresh critic from the new RM (its values were learned for the last one) and fresh optimizer and
    KL-controller states; the prompt order and sampling seeded anew each round. Resumes a killed round."""
    sets = {"models.policy": policy, "models.reward": rm, "models.monitor": monitor, "data.prompts": prompts,
            "run.output_dir": str(run_dir / round_name("ppo", r)), "run.name": f"{cfg.run.name}-{round_name('ppo', r)}",
            "train.steps": steps}
    if r > 1:                          # the KL anchor (pipeline.kl_anchor round: the starting policy, models.policy)
        sets.update({"models.reference": sft if cfg.pipeline.kl_anchor == "sft" else None,
                     "run.seed": cfg.run.seed + r - 1})
    pc = cfg.pipeline
    if keep_trusted:                   # a checkpoint at every audit, as many kept as the drift rule looks back
        sets.update({"checkpoint.every": pc.audit_every,
                     "checkpoint.keep": max(cfg.checkpoint.keep, audit.check.audits + 2)})
    watch = audit if (pc.audit_prompts or audit.stop_on_drift) else None
    if resume:                         # the drift rule picks up the killed round's past
        audit.replay = run_dir / round_name("ppo", r) / "metrics.jsonl"
    result = ppo_train(derive(cfg, sets), resume="auto" if resume else False, gold_fn=gold, watch=watch)
    out = {k: result[k] for k in ("run_dir", "metrics", "checkpoint", "steps", "stopped")}
    if keep_trusted and result["stopped"] and audit.check.trusted is not None:
        found = ckpt.latest(ckpt.checkpoint_root(result["run_dir"]), upto=audit.check.trusted)
        out.update({"checkpoint": str(found) if found else None,
                    "kept": ckpt.load_state(found)["step"] if found else 0})
    return out


def main(argv: list[str] | None = None) -> int:
    summary = run_cli("rlhf-ray pipeline", "SFT -> RM from rankings -> PPO, and DPO (in rounds: pipeline.rounds)",
                      lambda cfg, args: run_pipeline(cfg, resume=bool(args.resume)), argv, resume_flag=True)
    if isinstance(summary, int):              # bad input or a failed run: said in one line
        return summary
    print(f"\nsummary: {Path(summary['plot']).parent / 'summary.md'}\ncurves:  {summary['plot']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
