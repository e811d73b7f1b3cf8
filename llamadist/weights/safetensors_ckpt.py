"""A Hugging Face folder: config.json, model.safetensors or a sharded index, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from llamadist.config import ModelConfig
from llamadist.weights.base import CheckpointError, Shard


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "F64": torch.float64}


class HFCheckpoint:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = ModelConfig.from_json_file(self.path / "config.json")
        self._handles: dict[Path, object] = {}
        self._file_of = self._index()  # tensor name -> file

    def _index(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
            files = {name: self.path / f for name, f in weight_map.items()}
            for f in set(files.values()):
                if not f.is_file():
                    raise CheckpointError(f"{index} names {f.name}, which is missing from {self.path}")
            return files
        if single.is_file():
            return {name: single for name in self._open(single).keys()}
        if list(self.path.glob("*.bin")) or list(self.path.glob("*.pth")):
            raise CheckpointError(
                f"{self.path} holds only PyTorch .bin/.pth weights; llamadist reads safetensors: "
                "convert with `model.save_pretrained(dir, safe_serialization=True)`")
        raise CheckpointError(
            f"no model.safetensors or model.safetensors.index.json in {self.path}")

    def _open(self, f: Path):
        handle = self._handles.get(f)
        if handle is None:
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises SafetensorError / OSError
                raise CheckpointError(
                    f"{f} is truncated or corrupt and cannot be read as safetensors ({e})") from None
            self._handles[f] = handle
        return handle

    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._file_of[name]).get_slice(name).get_shape())

    def stored_dtype(self, name: str) -> torch.dtype | None:
        """The dtype ``name`` is stored in (None for one torch has no name for here)."""
        return _DTYPES.get(self._open(self._file_of[name]).get_slice(name).get_dtype())

    def get(self, name: str, shard: Shard | None = None) -> torch.Tensor:
        if name not in self._file_of:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.path}")
        f = self._file_of[name]
        try:
            if shard is None:
                return self._open(f).get_tensor(name)
            dim, start, stop = shard
            sl = self._open(f).get_slice(name)
            index = tuple([slice(None)] * dim + [slice(start, stop)])
            return sl[index]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f}: tensor {name!r} could not be read ({e}); "
                                  "the file is truncated or corrupt") from None

    def tokenizer(self):
        from llamadist.generation.tokenizer import load_hf_tokenizer
        return load_hf_tokenizer(self.path, self.config.eos_token_ids, self.config.bos_token_id)
