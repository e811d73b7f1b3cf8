"""The pure model imports nothing above llamadist.config (DESIGN principle 1): no kernels,
no runtime, no torch.distributed. Checked twice: what a fresh interpreter has loaded after
importing the model, and what the model's source files import (ast, so an import inside a
function counts too)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import llamadist

MODEL_DIR = Path(llamadist.__file__).parent / "model"
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
    here = ["llamadist", "model"]
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
