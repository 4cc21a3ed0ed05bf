"""The package's layers (see README "How the code is laid out"): a lower layer never imports a higher one,
and the ground floors never load Ray, MLflow or Optuna.

Imports are read from the source with `ast`, function-level (lazy) imports included: a lazy upward import
is still an upward dependency, it only fails later.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "crosspt"

# Lowest first. Layers of the same rank stand side by side and do not import each other.
RANK = {
    "errors": 0,
    "method": 1, "tasks": 1,
    "backbones": 2,          # uses tasks/ for label words
    "config": 3,             # reuses the option enums defined in method/, tasks/, backbones/
    "run": 4,
    "registry": 5,
    "search": 6,
    "bench": 7,
    "cli": 8,
}
# Old import paths kept for registered models: an alias of the layer they re-export.
ALIASES = {"pyfunc_model": "registry"}
HEAVY = ("ray", "mlflow", "optuna")
# Who may import the heavy frameworks at all (DESIGN.md, rules of thumb).
ALLOWED_HEAVY = {"ray": {"run", "registry", "search", "bench", "cli"},
                 "mlflow": {"registry", "search", "cli"},
                 "optuna": {"search", "bench", "cli"}}
GROUND = ("method", "tasks", "backbones", "config")


def layer_of(module: str) -> str | None:
    """`crosspt.run.loop` -> `run`; `crosspt.errors` -> `errors`; not crosspt -> None."""
    parts = module.split(".")
    if parts[0] != "crosspt" or len(parts) < 2:
        return None
    return ALIASES.get(parts[1], parts[1])


def imports_of(path: Path, root: Path = PKG) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, function-level ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = ["crosspt", *path.relative_to(root).with_suffix("").parts]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:                               # relative import: resolve against this file's package
                base = here[:-node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names if mod == "crosspt"]
    return out


def violations(root: Path = PKG) -> list[str]:
    """Every import of a file under `root` (a `crosspt/` folder) that breaks the layer rules."""
    bad = []
    for path in sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts):
        rel = path.relative_to(root)
        own = ALIASES.get(rel.parts[0].removesuffix(".py"), rel.parts[0].removesuffix(".py"))
        if own not in RANK:
            if own != "__init__":
                bad.append(f"{rel}: not in any layer (add it to RANK)")
            continue
        for line, mod in imports_of(path, root):
            top = mod.split(".")[0]
            if top in HEAVY and own not in ALLOWED_HEAVY[top]:
                bad.append(f"{rel}:{line}: layer '{own}' imports {mod}")
            target = layer_of(mod)
            if target is None or target == own or target not in RANK:
                continue
            if RANK[target] > RANK[own] or (RANK[target] == RANK[own]):
                bad.append(f"{rel}:{line}: layer '{own}' (rank {RANK[own]}) imports {mod} "
                           f"(layer '{target}', rank {RANK[target]})")
    return bad


def test_no_layer_imports_a_higher_one():
    assert violations() == []


def test_every_package_folder_is_a_known_layer():
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= set(RANK), folders - set(RANK)


@pytest.mark.parametrize("layer,src,needle", [
    ("method", "def f():\n    from crosspt.run.loop import run_loop\n", "crosspt.run.loop"),   # lazy, upward
    ("tasks", "from crosspt import config\n", "crosspt.config"),
    ("backbones", "from ..search import driver\n", "crosspt.search"),                          # relative
    ("config", "import mlflow\n", "imports mlflow"),
    ("tasks", "from crosspt.method.prompts import PromptSpec\n", "crosspt.method.prompts"),   # side by side
])
def test_the_checker_sees_a_broken_rule(tmp_path, layer, src, needle):
    """The rule is live: a copy of the package with one bad import is reported, at that file and line."""
    (tmp_path / layer).mkdir()
    (tmp_path / layer / "probe.py").write_text(src)
    bad = violations(tmp_path)
    assert len(bad) == 1 and bad[0].startswith(f"{layer}/probe.py:") and needle in bad[0], bad


@pytest.mark.parametrize("modules", [
    ["crosspt"],
    [f"crosspt.{layer}.{p.stem}" for layer in GROUND for p in sorted((PKG / layer).glob("*.py"))
     if p.stem != "__init__"] + ["crosspt.errors"],
], ids=["import crosspt", "ground layers"])
def test_ground_layers_load_no_heavy_framework(modules):
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=PKG.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "", f"{modules[:3]}... loaded {r.stdout.strip()}"


def test_old_pyfunc_import_path_still_loads():
    """Registered models store code that imports `crosspt.pyfunc_model.CrossPTPyfunc`."""
    import crosspt.pyfunc_model as old
    from crosspt.registry import pyfunc

    assert old.CrossPTPyfunc is pyfunc.CrossPTPyfunc and old.CrossPTPredictor is pyfunc.CrossPTPredictor
