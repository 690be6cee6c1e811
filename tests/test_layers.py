"""The house's layers point one way: rlhf_ray (the core, no Ray actor lifecycle) <- actors <- launch. Any import of
a higher layer from a lower one, at module level or inside a function, fails here; subpackages included.

Inside the core, the tiny world (rlhf_ray/tiny_world/: what tests and measures the library) may use the library,
never the other way. Inside launch, the entry points share what they share through the modules below them
(common, roles, rollout, answers, reaper), not through each other: only the pipeline, which chains the stage
drivers, calls them (`run_stage`, the PPO `train`), and the CLI dispatches to every entry point."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ABOVE = {"rlhf_ray": ("actors", "launch", "benchmarks"), "actors": ("launch", "benchmarks"), "launch": ("benchmarks",)}
ENTRY_POINTS = {"launch.cli", "launch.ppo", "launch.stages", "launch.pipeline", "launch.label", "launch.submit",
                "launch.plan"}
CHAINS = {("launch.pipeline", "launch.ppo"), ("launch.pipeline", "launch.stages")}   # the pipeline runs the stages


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def modules(layer: str) -> list[Path]:
    found = sorted((REPO / layer).rglob("*.py"))
    assert found, layer
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_no_import_points_up(layer):
    bad = [f"{path.relative_to(REPO)} imports {name}" for path in modules(layer)
           for name in imported_modules(path) if name.split(".")[0] in ABOVE[layer]]
    assert not bad, bad


def test_the_core_needs_no_ray():
    assert not [str(p.relative_to(REPO)) for p in modules("rlhf_ray")
                if "ray" in {n.split(".")[0] for n in imported_modules(p)}]


def test_the_library_does_not_import_the_tiny_world():
    world = REPO / "rlhf_ray" / "tiny_world"
    assert (world / "__init__.py").is_file() and len(modules("rlhf_ray/tiny_world")) > 2
    product = [p for layer in ("rlhf_ray", "actors") for p in modules(layer) if world not in p.parents]
    bad = [f"{p.relative_to(REPO)} imports {n}" for p in product for n in imported_modules(p)
           if n.startswith("rlhf_ray.tiny_world")]
    assert not bad, bad


def test_entry_points_do_not_import_each_other():
    launch = {module_name(p): p for p in modules("launch")}
    assert ENTRY_POINTS <= set(launch), ENTRY_POINTS - set(launch)
    bad = [f"{name} imports {n}" for name, p in launch.items() if name != "launch.cli"
           for n in imported_modules(p) if n in ENTRY_POINTS and n != name and (name, n) not in CHAINS]
    bad += [f"{name} (below the entry points) imports {n}" for name, p in launch.items() if name not in ENTRY_POINTS
            for n in imported_modules(p) if n in ENTRY_POINTS]
    assert not bad, bad


def test_the_ppo_step_is_its_phases_and_reads_no_flag():
    """launch/ppo.py `ppo_step` reads like the algorithm box: at most 40 lines, its phases in order, and no config
    read in it (a feature changes the rollout source or a phase's helper, not the loop)."""
    tree = ast.parse((REPO / "launch" / "ppo.py").read_text())
    step = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "ppo_step")
    assert step.end_lineno - step.lineno + 1 <= 40
    flags = [ast.unparse(n) for n in ast.walk(step) if isinstance(n, ast.Attribute) and n.attr in ("cfg", "config")]
    assert not flags, flags
    timed = sorted((n.lineno, n.args[0].value) for n in ast.walk(step)
                   if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "timer")
    phases = [name for _, name in timed]
    assert phases == ["logprobs", "advantage", "train", "weight_sync"], phases
