"""`rlhf-ray` command line: one subcommand per entry point.

    rlhf-ray tiny-world [--out assets/tiny] [--teacher]   build the offline tiny model world (+ a 3.1 M teacher)
    rlhf-ray copy-task [--world assets/tiny]         its copy task: prompts with answers and a briefly tuned policy
    rlhf-ray tool-task [--world assets/tiny]         its calculator task (multi-turn): problems and a policy that calls it
    rlhf-ray pipeline --config C [--set k=v]         the three stages end to end (+ DPO, evaluation)
    rlhf-ray sft|rm|dpo --config C [--set k=v]       a supervised stage (SFT, reward model, DPO)
    rlhf-ray ppo --config C [--set k=v] [--resume [auto]]   run PPO (local Ray cluster, or the one it runs on)
    rlhf-ray submit --address URL --config C ...     submit the same run to a cluster with `ray job submit`
    rlhf-ray plan --config C [--set k=v]             per-GPU memory of each role of a layout; refuses misfits
    rlhf-ray label --config C [--set k=v]            rank K answers per prompt with the LLM judge (pairwise)
    rlhf-ray label-server serve|add-labeler|add|export|report --db F ...   the labelling page for people
"""
from __future__ import annotations

import argparse
import gc
import sys

from rlhf_ray.config import STAGES


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "ppo":
        # no cyclic garbage collection through the start-up (imports walked by every collection: ~15 % of them);
        # launch/ppo.py turns it back on after the first step
        gc.disable()
        from launch.ppo import main as ppo_main
        return ppo_main(rest)
    if cmd == "pipeline":
        from launch.pipeline import main as pipeline_main
        return pipeline_main(rest)
    if cmd in STAGES:
        from launch.stages import main as stage_main
        return stage_main(cmd, rest)
    if cmd == "plan":
        from launch.plan import main as plan_main
        return plan_main(rest)
    if cmd == "label":
        from launch.label import main as label_main
        return label_main(rest)
    if cmd == "label-server":
        from launch.label_server import main as label_server_main
        return label_server_main(rest)
    if cmd == "submit":
        from launch.submit import main as submit_main
        return submit_main(rest)
    if cmd == "tiny-world":
        ap = argparse.ArgumentParser(prog="rlhf-ray tiny-world")
        ap.add_argument("--out", default="assets/tiny")
        ap.add_argument("--pretrain-steps", type=int, default=300)
        ap.add_argument("--teacher", action="store_true", help="also <out>/teacher: a 3.1 M base on the same corpus "
                        "and tokenizer, for on-policy distillation (configs/tiny_distill.yaml)")
        args = ap.parse_args(rest)
        from pathlib import Path
        from rlhf_ray.tiny_world.world import TinySpec, build_teacher_base, build_tiny_world
        if not args.teacher or not (Path(args.out) / "policy" / "model.safetensors").is_file():
            build_tiny_world(args.out, TinySpec(pretrain_steps=args.pretrain_steps))
        if args.teacher:
            build_teacher_base(Path(args.out) / "policy", Path(args.out) / "teacher")
        return 0
    if cmd in ("copy-task", "tool-task"):      # a verifiable task beside a tiny world: <world>/copy or <world>/tool
        name = cmd.split("-")[0]
        ap = argparse.ArgumentParser(prog=f"rlhf-ray {cmd}")
        ap.add_argument("--world", default="assets/tiny")
        ap.add_argument("--out", default=None, help=f"default: <world>/{name}")
        ap.add_argument("--seed", type=int, default=0)
        args = ap.parse_args(rest)
        if name == "copy":
            from rlhf_ray.tiny_world.copy_task import build_copy_task as build
        else:
            from rlhf_ray.tiny_world.tool_task import build_tool_task as build
        build(args.world, args.out or f"{args.world}/{name}", args.seed)
        return 0
    print(f"rlhf-ray: unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
