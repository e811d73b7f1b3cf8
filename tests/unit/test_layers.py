"""The pure model imports nothing above llamadist.config (DESIGN principle 1): no kernels,
no runtime, no torch.distributed. Checked twice: what a fresh interpreter has loaded after
importing the model, and what the model's source files import (ast, so an import inside a
function counts too)."""

from __future__ import annotations

import ast
import graphlib
import json
import subprocess
import sys
from pathlib import Path

import llamadist

PACKAGE = Path(llamadist.__file__).parent
MODEL_DIR = PACKAGE / "model"
ALLOWED = ("llamadist.config", "llamadist.model")


def test_importing_the_model_loads_no_kernels_or_runtime():
    code = ("import json, sys; import llamadist.model.llama, llamadist.model.fuse, "
            "llamadist.model.rope, llamadist.model.cache; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('llamadist'))))")
    root = str(Path(llamadist.__file__).parent.parent)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True, cwd=root)
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert "llamadist.model.llama" in loaded  # the check looked at the right interpreter
    above = [m for m in loaded if m != "llamadist" and not m.startswith(ALLOWED)]
    assert above == [], f"importing llamadist.model loaded {above}"


def _imports(path: Path) -> list[str]:
    """Every module an import statement in ``path`` names (relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    here = list(path.relative_to(PACKAGE.parent).parent.parts)  # the file's package
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            found += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return found


def test_model_sources_import_only_config_and_model():
    files = sorted(MODEL_DIR.glob("*.py"))
    assert any(f.name == "llama.py" for f in files)
    bad = {}
    for f in files:
        for mod in _imports(f):
            if mod.startswith("torch.distributed") or (
                    mod.startswith("llamadist") and mod != "llamadist"
                    and not mod.startswith(ALLOWED)):
                bad.setdefault(f.name, []).append(mod)
    assert bad == {}, f"llamadist/model imports above config: {bad}"


# README's architecture table: a package (or top-level module) imports its own layer and
# those below it, never above; ``__main__`` and ``__init__`` sit over everything.
LAYERS = {"config": 0, "kernels": 0, "model": 1, "weights": 2, "planning": 2,
          "generation": 2, "parallel": 3, "distributed": 3, "runtime": 4, "engine": 5,
          "api": 6, "serve": 6, "cli": 6, "__main__": 7, "__init__": 7}


def _part(module: str) -> str:
    """llamadist.runtime.stage -> runtime; llamadist.api -> api; llamadist -> __init__."""
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else "__init__"


def test_every_import_keeps_the_layer_order():
    """Checked by source (ast: an import inside a function counts too) over every module."""
    files = {".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(
        ".__init__"): f for f in sorted(PACKAGE.rglob("*.py"))}
    graph, against = {}, []
    for name, f in files.items():
        mine = _part(name)
        graph[name] = set()
        for mod in _imports(f):
            while mod and mod not in files:  # llamadist.x.y.func -> llamadist.x.y
                mod = mod.rpartition(".")[0]
            if mod.startswith("llamadist.") and mod != name:
                graph[name].add(mod)
                if LAYERS.get(_part(mod), -1) > LAYERS.get(mine, -1):
                    against.append(f"{name} -> {mod}")
    parts = {_part(n) for n in graph}
    assert parts - set(LAYERS) == set(), "a package not in README's layer table (add it there)"
    assert {"kernels", "runtime", "serve", "cli"} <= parts
    assert against == [], f"imports against the layer order: {against}"
    graphlib.TopologicalSorter(graph).prepare()  # CycleError names an import circle
