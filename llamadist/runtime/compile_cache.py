"""torch.compile's artifacts of the decoder layer kept in one file per stage, so that a
stage's next process (a restarted worker, the next ``serve``) loads them instead of
compiling (issues 13 and 15).

torch's "mega-cache" (``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``,
torch >= 2.7) serializes what this process compiled or found in its caches: Inductor's
FX graphs (with their Triton kernels bundled on GPUs), AOTAutograd's entries, autotuning
results and the dynamic-shape profile. Loading puts them back into Inductor's on-disk
caches, so the first compile of each shape is a cache hit. On the host that compiled
them Inductor's own cache directory (/tmp/torchinductor_$USER) already holds them; the
file matters where that directory is new: a fresh container or host, another user.
Dynamo still traces each graph (the file holds no Python bytecode; torch's experimental
``caching_precompile``, which would, failed to load this layer's entries on torch 2.13).

Everything here is best effort: a missing, unreadable or foreign file, or a torch
without the API, means compiling as before, with a log line saying why.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_loaded: set[Path] = set()  # files loaded by this process (each once)


def artifact_path(folder: str | os.PathLike, stage) -> Path:
    """The file of ``stage``'s compiled layer in ``folder``: one per torch version, device
    kind, dtype, model shape and layer range (two stages of a process write the same
    artifacts to their two files; two processes never write one file)."""
    c = stage.model.config
    shape = f"h{c.hidden_size}-i{c.intermediate_size}-a{c.num_heads}-kv{c.num_kv_heads}"
    dtype = str(stage.dtype).removeprefix("torch.")
    name = (f"layers{stage.layers.start}-{stage.layers.stop}-{shape}-{dtype}-"
            f"{stage.device.type}-torch{torch.__version__}.bin")
    return Path(folder) / name.replace("/", "_").replace("+", "_")


def _api(name: str):
    fn = getattr(getattr(torch, "compiler", None), name, None)
    if fn is None:
        log.info("torch %s has no torch.compiler.%s: compile artifacts are not kept",
                 torch.__version__, name)
    return fn


def load(path: str | os.PathLike) -> bool:
    """Load ``path``'s artifacts into torch's caches (once per process) -> whether any were
    loaded. Never raises: a missing or bad file leaves compilation as it was."""
    path = Path(path)
    if path in _loaded:
        return True
    fn = _api("load_cache_artifacts")
    if fn is None:
        return False
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        log.info("compile artifacts: no %s yet; compiling", path)
        return False
    except OSError as e:
        log.warning("compile artifacts: cannot read %s (%s); compiling", path, e)
        return False
    try:
        info = _load_chunks(data, fn)
    except Exception as e:  # noqa: BLE001 - torch's loader on a foreign or damaged file
        info = None
        why = f"{type(e).__name__}: {e}"
    else:
        why = "torch could not read it"
    if info is None:
        log.warning("compile artifacts: %s is unusable (%s); compiling", path, why)
        return False
    _loaded.add(path)
    log.info("compile artifacts: loaded %s (%d bytes: %d Inductor, %d AOTAutograd "
             "entries)", path, len(data), len(getattr(info, "inductor_artifacts", ())),
             len(getattr(info, "aot_autograd_artifacts", ())))
    return True


def _load_chunks(data: bytes, load_fn):
    """Every chunk of ``data`` into torch's caches -> torch's CacheInfo, or None.

    Each save_cache_artifacts() appends the artifacts new since the previous one as a
    chunk of (kind, artifacts) pairs, but torch's loader makes a dict of the pairs, so
    only the last chunk of each kind survives (a file written after buckets 1, 2 and 4
    loaded bucket 4's graphs only: 2 cache hits of 6 on the CPU). Merged here through
    torch's own (private) pieces; where they are missing, torch's loader as it is."""
    try:
        from collections import defaultdict

        from torch.compiler._cache import CacheArtifactManager, _deserialize_single_cache
        from torch.utils._appending_byte_serializer import AppendingByteSerializer
    except ImportError:
        return load_fn(data)
    try:
        CacheArtifactManager._ensure_cache_artifacts_registered()
        merged = defaultdict(list)
        for kind, artifacts in AppendingByteSerializer.to_list(
                data, deserialize_fn=_deserialize_single_cache):
            merged[kind].extend(artifacts)
    except Exception:  # noqa: BLE001 - not torch's format (torch's loader would say so too)
        return None
    return CacheArtifactManager.populate_caches(merged)


def save(path: str | os.PathLike) -> bool:
    """Write every artifact this process compiled or loaded so far to ``path`` (atomically:
    a reader never sees half a file) -> whether it was written."""
    path = Path(path)
    fn = _api("save_cache_artifacts")
    if fn is None:
        return False
    try:
        out = fn()
        if out is None:  # nothing compiled yet
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(out[0])
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except Exception as e:  # noqa: BLE001 - a cache that cannot be written costs nothing
        log.warning("compile artifacts: cannot write %s (%s: %s)", path, type(e).__name__, e)
        return False
    log.info("compile artifacts: saved %s (%d bytes)", path, len(out[0]))
    return True
