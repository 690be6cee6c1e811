"""The house's layers point one way: rlhf_ray (the core, no Ray actor lifecycle) <- actors <- launch. Any import of
a higher layer from a lower one, at module level or inside a function, fails here."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ABOVE = {"rlhf_ray": ("actors", "launch", "benchmarks"), "actors": ("launch", "benchmarks"), "launch": ("benchmarks",)}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_no_import_points_up(layer):
    bad = [f"{path.relative_to(REPO)} imports {name}" for path in sorted((REPO / layer).glob("*.py"))
           for name in imported_modules(path) if name.split(".")[0] in ABOVE[layer]]
    assert not bad, bad


def test_the_core_needs_no_ray():
    assert not [f"{p.name}" for p in (REPO / "rlhf_ray").glob("*.py") if "ray" in {n.split(".")[0] for n in imported_modules(p)}]
