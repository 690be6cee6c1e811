"""`rlhf-ray plan --config C`: every role's GPUs and per-GPU memory for the config's layout, and the node count;
exit 1 (naming the role and the overflow) when the layout cannot fit. Pure arithmetic, no cluster needed."""
from __future__ import annotations

import sys

from launch.common import run_cli
from rlhf_ray.planner import format_plan, make_plan


def main(argv: list[str] | None = None) -> int:
    def run(cfg, _):
        plan = make_plan(cfg)
        print(format_plan(plan))
        return 0 if plan.fits else 1
    return run_cli("rlhf-ray plan", "per-GPU memory of a layout, before paying for it", run, argv)


if __name__ == "__main__":
    sys.exit(main())
