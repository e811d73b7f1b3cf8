"""The checkpoint interface every reader implements (``Checkpoint``), its error and the
shard a tensor-parallel rank reads. The readers (gguf, safetensors_ckpt) import this;
``checkpoint.open_checkpoint``, which picks a reader, imports them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from llamadist.config import ModelConfig

if TYPE_CHECKING:
    from llamadist.generation.tokenizer import Tokenizer

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
