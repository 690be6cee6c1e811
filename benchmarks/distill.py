"""On-policy distillation in the tiny world: a 3.1 M teacher trained by GRPO on the world's gold, and the 0.6 M
student taught three ways at one budget, over several seeds.

    .venv/bin/python benchmarks/distill.py [--seeds 0 1 2] [--teacher-steps 45] [--steps 40] [--opd-lr 5e-4]

Per seed (runs/bench-distill/seed<N>, each stage kept and reused when its output exists):
1. the world (rlhf_ray/tiny_world/world.py, seeded): its tokenizer and 0.6 M base, and a 3.1 M base pretrained on the
   same corpus with the same tokenizer (TEACHER_SPEC); the pipeline's SFT pairs and prompt sets (launch/pipeline.py
   make_task_data: 256 RL prompts, 128 held-out ones);
2. both bases SFT'd on the same pairs (configs/tiny_world.yaml's sft section);
3. the teacher: GRPO on the gold reward (a rule source, rlhf_ray/tiny_world/gold.py tiny_gold) from its SFT model,
   --teacher-steps steps of 64 prompts x 4 answers, a KL penalty of 2 per nat to its SFT model (RECIPE below);
4. from the student's SFT model, each --steps steps of the same 64 x 4 samples on the same prompt stream:
   - rl:   the same GRPO on the same gold reward;
   - opd:  on-policy distillation, the teacher the only signal (distill.only, gamma 0, coef 1, no KL to SFT);
5. off-policy distillation: the teacher samples answers to the RL prompts until it has written as many tokens as
   opd had it score, and the student's SFT model is fine-tuned on them for one epoch (each teacher token seen once);
6. every model's gold on the held-out prompts (4 answers each, temperature 1) and the students' KL to their SFT model.

"Gold against samples": each RL or OPD step logs the gold of the 256 answers it drew (fresh prompts to the policy
within an epoch of the 256). RL's final gold is the mean over its last 5 steps; OPD reaches it at the first step
whose 5-step trailing mean is at least that. Writes runs/bench-distill/distill.md. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
from benchmarks.machine import cpu_model, git_commit  # noqa: E402
from benchmarks.tables import publish  # noqa: E402

OUT = ROOT / "runs" / "bench-distill"
WINDOW = 5
EVAL_ANSWERS = 4
# GRPO on gold for the teacher and the student alike, otherwise configs/tiny_world.yaml's PPO (its batch: 64 prompts
# x 4, two minibatches, two epochs; its lr), with a fixed KL penalty of 2 per nat in the reward. Gold has a degenerate
# optimum, answers of one or two topic words ("types."): under the world's adaptive penalty (0.5 toward 1.7 nats)
# GRPO found it within 20 steps, at a fixed 1.0 the 3.1 M teacher found it after 35 (gold 9.2, 5 tokens an answer;
# seed 0, 2026-12-07): a teacher whose answers SFT copies at once. At 2.0 an answer's KL costs more than that optimum
# pays. No critic, no reward model.
RECIPE = ["ppo.advantage=grpo", "models.reward=", "models.critic=", "ppo.kl_coef=2.0", "ppo.kl_target=null",
          "reward.sources=[{kind: function, path: 'rlhf_ray.tiny_world.gold:tiny_gold'}]",
          "policy.num_ranks=1", "policy.micro_batch_size=64", "guard.max_kl_per_token=null",
          "logging.wandb.enabled=false", "checkpoint.every=0"]
OPD = ["distill.only=true", "reward.sources=[]", "ppo.kl_coef=0", "teacher.micro_batch_size=64"]


def world_and_data(d: Path, seed: int) -> tuple[dict, object]:
    from launch.pipeline import make_task_data
    from rlhf_ray.config import load_config
    from rlhf_ray.tiny_world.world import TEACHER_SPEC, TinySpec, build_teacher_base, build_tiny_world
    cfg = load_config(str(ROOT / "configs" / "tiny_world.yaml"), [f"run.seed={seed}", f"run.output_dir={d}"])
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)         # every core: Ray, and all else, starts after these
    try:
        if not (d / "world" / "policy" / "model.safetensors").is_file():
            build_tiny_world(d / "world", TinySpec(seed=seed))
        if not (d / "teacher_base" / "model.safetensors").is_file():
            build_teacher_base(d / "world" / "policy", d / "teacher_base", dataclasses.replace(TEACHER_SPEC, seed=seed))
    finally:
        torch.set_num_threads(threads)
    return make_task_data(d / "data", cfg), cfg


def rl_run(cfg, d: Path, name: str, policy: str, prompts: str, steps: int, extra: list[str]) -> dict:
    """One run as `rlhf-ray ppo` runs it, the gold of every step's answers logged (gold/mean); its metrics rows and
    final policy. Kept: a finished run is read back."""
    from launch.ppo import train
    from rlhf_ray.config import load_config
    from rlhf_ray.tiny_world.gold import gold_score
    run_dir = d / name
    done = run_dir / "done.json"
    if not done.is_file():
        sets = [f"models.policy={policy}", f"data.prompts={prompts}", f"run.output_dir={run_dir}",
                f"run.seed={cfg.run.seed}", f"train.steps={steps}", *RECIPE, *extra]
        run_cfg = load_config(str(ROOT / "configs" / "tiny_world.yaml"), sets)
        summary = train(run_cfg, gold_fn=gold_score)
        done.write_text(json.dumps({"policy": str(Path(summary["checkpoint"]) / "policy")}))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "policy": json.loads(done.read_text())["policy"]}


def teacher_answers(cfg, d: Path, teacher: str, prompts: str, tokens: int, device: str) -> str:
    """The teacher's answers to the RL prompts, round after round of one answer per prompt, until they hold
    `tokens` tokens (the last round cut there); written as SFT pairs. Returns the file."""
    from launch.answers import Sampler, write_jsonl
    from launch.pipeline import read_prompts
    from rlhf_ray.config import derive
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.prompts import render_prompts
    path = d / "offpolicy_data.jsonl"
    if path.is_file():
        return str(path)
    tok = load_tokenizer(teacher)
    texts = read_prompts(prompts)
    ids = render_prompts(tok, texts, cfg.data)
    sampler = Sampler.start(derive(cfg, {"models.policy": teacher}), d, device)
    rows, written, r = [], 0, 0
    try:
        while written < tokens:
            for prompt, s in zip(texts, sampler.sample(ids, 1, cfg.generation.max_new_tokens, cfg.run.seed + 100 + r)):
                if written >= tokens:
                    break
                rows.append({"instruction": prompt, "input": "", "output": tok.decode(s["ids"], skip_special_tokens=True)})
                written += len(s["ids"])
            r += 1
    finally:
        sampler.group.shutdown()
    write_jsonl(path, rows)
    return str(path)


def evaluate(cfg, d: Path, models: dict[str, str], student_sft: str, prompts: str, device: str) -> dict:
    """{name: {gold, gold_sd, kl_to_sft}} on the held-out prompts: EVAL_ANSWERS answers each, temperature 1; the KL
    (nats per answer, the answers' own logprob less the student SFT model's) for the student-sized models."""
    from launch.answers import Sampler
    from launch.pipeline import read_prompts
    from rlhf_ray.config import derive
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.prompts import render_prompts
    from rlhf_ray.tiny_world.gold import gold_score
    import torch
    tok = load_tokenizer(student_sft)
    ids = render_prompts(tok, read_prompts(prompts), cfg.data)
    ids_k = [p for p in ids for _ in range(EVAL_ANSWERS)]
    out = {}
    for size in ("student", "teacher"):
        names = [n for n in models if n.startswith("teacher") == (size == "teacher")]
        if not names:
            continue
        sampler = Sampler.start(derive(cfg, {"models.policy": models[names[0]]}), d, device)
        try:
            drawn = {}
            for name in names:
                sampler.load(models[name])
                s = sampler.sample(ids, EVAL_ANSWERS, cfg.generation.max_new_tokens, cfg.run.seed + 3)
                drawn[name] = ([x["ids"] for x in s], torch.tensor([sum(x["logprobs"]) for x in s]))
            if size == "student":
                sampler.load(student_sft)
            for name, (responses, logp) in drawn.items():
                g = torch.tensor([gold_score(t) for t in tok.batch_decode(responses, skip_special_tokens=True)])
                kl = (logp - sampler.sequence_logprobs(ids_k, responses)).mean().item() if size == "student" else None
                out[name] = {"gold": g.mean().item(), "gold_sd": g.std().item(), "kl_to_sft": kl}
        finally:
            sampler.group.shutdown()
    return out


def trailing(xs: list[float], w: int = WINDOW) -> list[float]:
    return [statistics.mean(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]


def one_seed(seed: int, teacher_steps: int, steps: int) -> dict:
    from launch.common import cluster_device, start_ray
    from launch.stages import run_stage
    from rlhf_ray.config import derive
    d = OUT / f"seed{seed}"
    result_file = d / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    t0 = time.time()
    data, cfg = world_and_data(d, seed)
    device = cluster_device(cfg, cfg.policy.gpus_per_rank)
    start_ray(cfg, extra_cpus=cfg.engine.cpus_per_rank + 2)
    sft = {}
    for who, base in (("student", d / "world" / "policy"), ("teacher", d / "teacher_base")):
        out = d / f"sft_{who}"
        sft[who] = str(out) if (out / "model.safetensors").is_file() else run_stage(derive(cfg, {
            "sft.data": data["sft"], "sft.model": str(base), "sft.output": str(out)}), "sft")["model"]
    teacher = rl_run(cfg, d, "teacher_rl", sft["teacher"], data["ppo"], teacher_steps, [])
    rl = rl_run(cfg, d, "rl", sft["student"], data["ppo"], steps, [])
    opd = rl_run(cfg, d, "opd", sft["student"], data["ppo"], steps, [f"models.teacher={teacher['policy']}", *OPD])
    batch = cfg.generation.prompts_per_step * cfg.generation.n
    teacher_tokens = round(sum(r["response/length_mean"] * batch for r in opd["rows"]))   # what opd had it score
    off_data = teacher_answers(cfg, d, teacher["policy"], data["ppo"], teacher_tokens, device)
    off_dir = d / "offpolicy"
    off = str(off_dir) if (off_dir / "model.safetensors").is_file() else run_stage(derive(cfg, {
        "sft.data": off_data, "sft.model": sft["student"], "sft.output": str(off_dir), "sft.epochs": 1}), "sft")["model"]
    models = {"student_sft": sft["student"], "rl": rl["policy"], "opd": opd["policy"], "offpolicy": off,
              "teacher_sft": sft["teacher"], "teacher_rl": teacher["policy"]}
    ev = evaluate(cfg, d, models, sft["student"], data["eval"], device)

    rl_gold, opd_gold = [r["gold/mean"] for r in rl["rows"]], [r["gold/mean"] for r in opd["rows"]]
    rl_final = statistics.mean(rl_gold[-WINDOW:])
    reach = next((i + 1 for i, g in enumerate(trailing(opd_gold)) if i + 1 >= WINDOW and g >= rl_final), None)
    step_s = lambda rows: sum(r["time/step"] for r in rows)          # noqa: E731
    res = {
        "seed": seed, "eval": ev, "batch": batch, "steps": steps, "teacher_steps": teacher_steps,
        "rl_gold_curve": rl_gold, "opd_gold_curve": opd_gold,
        "teacher_gold_curve": [r["gold/mean"] for r in teacher["rows"]],
        "opd_kl_teacher_curve": [r["distill/reverse_kl_per_token"] for r in opd["rows"]],
        "rl_final_gold": rl_final, "opd_final_gold": statistics.mean(opd_gold[-WINDOW:]),
        "opd_steps_to_rl_final": reach,
        "wall_s": {"rl": step_s(rl["rows"]), "opd": step_s(opd["rows"]), "teacher_rl": step_s(teacher["rows"])},
        "teacher_tokens": teacher_tokens,
        "teacher_tokens_per_s": statistics.median(r["perf/teacher_tokens_per_s"] for r in opd["rows"]),
        "teacher_share": statistics.median(r["perf/teacher_share"] for r in opd["rows"]),
        "opd_logprobs_share": statistics.median(r["time/logprobs"] / r["time/step"] for r in opd["rows"]),
        "rl_step_s": statistics.median(r["time/step"] for r in rl["rows"]),
        "opd_step_s": statistics.median(r["time/step"] for r in opd["rows"]),
        "seconds": time.time() - t0,
    }
    import ray
    ray.shutdown()
    result_file.write_text(json.dumps(res, indent=1))
    return res


def opd_at_lr(seed: int, lr: float, steps: int) -> dict:
    """OPD again from the seed's student SFT model with the policy's learning rate `lr` (the teacher, prompts and
    samples of one_seed's run): its held-out gold and KL, training gold curve and where it reaches RL's final."""
    from launch.common import cluster_device, start_ray
    d = OUT / f"seed{seed}"
    out = d / f"opd_lr{lr:g}.json"
    if out.is_file():
        return json.loads(out.read_text())
    base = json.loads((d / "result.json").read_text())
    data, cfg = world_and_data(d, seed)
    device = cluster_device(cfg, cfg.policy.gpus_per_rank)
    start_ray(cfg, extra_cpus=cfg.engine.cpus_per_rank + 2)
    teacher = json.loads((d / "teacher_rl" / "done.json").read_text())["policy"]
    run = rl_run(cfg, d, f"opd_lr{lr:g}", str(d / "sft_student"), data["ppo"], steps,
                 [f"models.teacher={teacher}", *OPD, f"policy.lr={lr}"])
    ev = evaluate(cfg, d, {"student_sft": str(d / "sft_student"), "opd": run["policy"]}, str(d / "sft_student"),
                  data["eval"], device)
    gold = [r["gold/mean"] for r in run["rows"]]
    reach = next((i + 1 for i, g in enumerate(trailing(gold)) if i + 1 >= WINDOW and g >= base["rl_final_gold"]), None)
    res = {"lr": lr, "eval": ev["opd"], "final_gold": statistics.mean(gold[-WINDOW:]), "steps_to_rl_final": reach,
           "curve": gold, "kl_teacher_curve": [r["distill/reverse_kl_per_token"] for r in run["rows"]]}
    import ray
    ray.shutdown()
    out.write_text(json.dumps(res, indent=1))
    return res


def lr_report(results: list[dict], variants: list[dict]) -> str:
    """The OPD runs at another learning rate beside the main table's."""
    lr = variants[0]["lr"]
    lines = ["", f"OPD at policy.lr {lr:g} (the main runs: 1e-4), same teacher, prompts and samples:", "",
             "| seed | held-out gold | gain ÷ teacher's gain | KL to SFT | training gold, last 5 | reaches RL's final at "
             "| reverse KL to the teacher, step 1 → 40 |", "|" + "---|" * 7]
    for r, v in zip(results, variants):
        e, ev = v["eval"], r["eval"]
        ratio = (e["gold"] - ev["student_sft"]["gold"]) / (ev["teacher_rl"]["gold"] - ev["teacher_sft"]["gold"])
        reach = v["steps_to_rl_final"]
        lines.append(f"| {r['seed']} | {e['gold']:.3f} | {ratio:.2f} | {e['kl_to_sft']:.2f} | {v['final_gold']:.3f} | "
                     + (f"step {reach} ({reach / r['steps']:.2f} of RL's samples)" if reach else "not reached")
                     + f" | {v['kl_teacher_curve'][0]:.3f} → {v['kl_teacher_curve'][-1]:.3f} |")
    return "\n".join(lines)


def msd(xs: list[float], fmt: str = "+.3f") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{statistics.mean(xs):{fmt}} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:{fmt.lstrip('+')}}"


def report(results: list[dict]) -> str:
    ev = lambda r, k: r["eval"][k]["gold"]                              # noqa: E731
    gain = lambda r, k: ev(r, k) - ev(r, "student_sft")                  # noqa: E731
    teacher_gain = lambda r: ev(r, "teacher_rl") - ev(r, "teacher_sft")  # noqa: E731
    r0 = results[0]
    lines = [f"# On-policy distillation in the tiny world ({cpu_model()}, commit {git_commit()}, {datetime.date.today()}, "
             f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})", "",
             f"Teacher 3.1 M (GRPO on gold, {r0['teacher_steps']} steps), student 0.6 M; every student run "
             f"{r0['steps']} steps of {r0['batch']} answers. Held-out gold: {EVAL_ANSWERS} answers to each of 128 "
             "prompts; KL: nats per answer to the student's SFT model.", "",
             "| seed | student SFT | teacher SFT | teacher RL | RL | OPD | off-policy | OPD gain ÷ teacher's gain | "
             "OPD gain ÷ teacher's gap | KL RL / OPD / off |", "|" + "---|" * 10]
    for r in results:
        e = r["eval"]
        lines.append(f"| {r['seed']} | {ev(r, 'student_sft'):.3f} | {ev(r, 'teacher_sft'):.3f} | {ev(r, 'teacher_rl'):.3f}"
                     f" | {ev(r, 'rl'):.3f} | {ev(r, 'opd'):.3f} | {ev(r, 'offpolicy'):.3f}"
                     f" | {gain(r, 'opd') / teacher_gain(r):.2f} | {gain(r, 'opd') / gain(r, 'teacher_rl'):.2f}"
                     f" | {e['rl']['kl_to_sft']:.2f} / {e['opd']['kl_to_sft']:.2f} / {e['offpolicy']['kl_to_sft']:.2f} |")
    col = lambda f: [f(r) for r in results]                              # noqa: E731
    lines.append(f"| **mean ± sd** | {msd(col(lambda r: ev(r, 'student_sft')), '.3f')} | "
                 f"{msd(col(lambda r: ev(r, 'teacher_sft')), '.3f')} | {msd(col(lambda r: ev(r, 'teacher_rl')), '.3f')} | "
                 f"{msd(col(lambda r: ev(r, 'rl')), '.3f')} | {msd(col(lambda r: ev(r, 'opd')), '.3f')} | "
                 f"{msd(col(lambda r: ev(r, 'offpolicy')), '.3f')} | "
                 f"{msd(col(lambda r: gain(r, 'opd') / teacher_gain(r)), '.2f')} | "
                 f"{msd(col(lambda r: gain(r, 'opd') / gain(r, 'teacher_rl')), '.2f')} | |")
    lines += ["", "Gold of the answers drawn in training (5-step trailing mean) against samples drawn:", "",
              "| seed | RL final (last 5) | OPD final | OPD reaches RL's final at | share of RL's samples | "
              "RL wall s | OPD wall s | teacher tokens scored | teacher tokens/s | teacher's share of the step |",
              "|" + "---|" * 10]
    for r in results:
        reach = r["opd_steps_to_rl_final"]
        lines.append(f"| {r['seed']} | {r['rl_final_gold']:.3f} | {r['opd_final_gold']:.3f} | "
                     + (f"{reach * r['batch']:,} samples (step {reach}) | {reach / r['steps']:.2f}" if reach
                        else "not reached | –")
                     + f" | {r['wall_s']['rl']:.0f} | {r['wall_s']['opd']:.0f} | {r['teacher_tokens']:,}"
                     f" | {r['teacher_tokens_per_s']:,.0f} | {r['teacher_share']:.2f} |")
    share = [r["opd_steps_to_rl_final"] / r["steps"] if r["opd_steps_to_rl_final"] else None for r in results]
    lines.append(f"| **mean ± sd** | {msd(col(lambda r: r['rl_final_gold']), '.3f')} | "
                 f"{msd(col(lambda r: r['opd_final_gold']), '.3f')} | | {msd(share, '.2f')} | "
                 f"{msd(col(lambda r: r['wall_s']['rl']), '.0f')} | {msd(col(lambda r: r['wall_s']['opd']), '.0f')} | | "
                 f"{msd(col(lambda r: r['teacher_tokens_per_s']), ',.0f')} | {msd(col(lambda r: r['teacher_share']), '.2f')} |")
    ratio = statistics.mean(col(lambda r: gain(r, "opd") / teacher_gain(r)))
    reached = [x is not None and x <= 1 / 3 for x in share]
    lines += ["", f"- [{'met' if ratio >= 0.9 else 'missed'}] OPD's held-out gold gain >= 0.9 x the teacher's gain over "
              f"its SFT model (mean {ratio:.2f})",
              f"- [{'met' if all(reached) else 'missed'}] OPD reaches RL's final training gold within 1/3 of RL's "
              f"samples ({sum(reached)} of {len(reached)} seeds)"]
    lines += ["", "Training-sample gold by step (5-step trailing mean), per seed: RL / OPD", ""]
    for r in results:
        pick = [i for i in range(len(r["rl_gold_curve"])) if (i + 1) % 5 == 0]
        tr, to = trailing(r["rl_gold_curve"]), trailing(r["opd_gold_curve"])
        lines.append(f"- seed {r['seed']}: " + ", ".join(f"{i + 1}: {tr[i]:.2f} / {to[i]:.2f}" for i in pick))
    lines += ["", "OPD's reverse KL to the teacher (nats per token), steps 1, 10, 20, ..., last:", ""]
    for r in results:
        c = r["opd_kl_teacher_curve"]
        lines.append(f"- seed {r['seed']}: " + ", ".join(f"{c[i]:.3f}" for i in sorted({0, *range(9, len(c), 10),
                                                                                            len(c) - 1})))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--teacher-steps", type=int, default=45)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--opd-lr", type=float, default=None, help="also OPD at this policy.lr, beside the main runs")
    args = ap.parse_args()
    results = [one_seed(s, args.teacher_steps, args.steps) for s in args.seeds]
    text = report(results)
    if args.opd_lr is not None:
        text += "\n" + lr_report(results, [opd_at_lr(s, args.opd_lr, args.steps) for s in args.seeds])
    publish(text, OUT / "distill.md")


if __name__ == "__main__":
    main()
