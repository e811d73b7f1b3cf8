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
``caching_precompile``, which would, failed to load this layer's entries on torch 2.13),
and llamadist's own Triton kernels (custom ops, compiled by Triton's JIT into
TRITON_CACHE_DIR) still compile where that cache is new.

Everything here is best effort: a missing, unreadable or foreign file, or a torch
without the API, means compiling as before, with a log line saying why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from itertools import chain
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_loaded: set[Path] = set()  # files loaded by this process (each once)


def artifact_path(folder: str | os.PathLike, stage) -> Path:
    """The file of ``stage``'s compiled layer in ``folder``: one per torch version, device
    kind, dtype, layer range and model, the model told apart by a digest of its config and
    of every parameter and buffer's name, shape and dtype (so a tensor-parallel share, a
    quantized format or another model of the same widths gets a file of its own). Ranks
    of one stage shape (tensor-parallel peers, data-parallel replicas) share a file: each
    writes it whole and atomically, and what a process loaded stays in what it saves."""
    model = stage.model
    digest = hashlib.sha256(repr(model.config).encode())
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    dtype = str(stage.dtype).removeprefix("torch.")
    name = (f"layers{stage.layers.start}-{stage.layers.stop}-{model.config.architecture}-"
            f"{dtype}-{stage.device.type}-torch{torch.__version__}-"
            f"{digest.hexdigest()[:16]}.bin")
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
        CacheArtifactManager._ensure_cache_artifacts_registered()
        merged = defaultdict(list)
        for kind, artifacts in AppendingByteSerializer.to_list(
                data, deserialize_fn=_deserialize_single_cache):
            merged[kind].extend(artifacts)
        info = CacheArtifactManager.populate_caches(merged)
        _keep_for_save(CacheArtifactManager, merged)
        return info
    except Exception as e:  # noqa: BLE001 - the private pieces moved, or not torch's format
        log.info("compile artifacts: torch's private loader pieces failed (%s: %s); "
                 "torch's public loader instead", type(e).__name__, e)
        return load_fn(data)


def _keep_for_save(manager, merged) -> None:
    """Count what was loaded as this process's own, so every later save writes it too:
    torch saves only what the process recorded, and a cache hit on a loaded artifact is
    recorded only if that shape runs, so a process running fewer buckets than the file's
    writer would otherwise write a smaller file (the next start then compiles the rest)."""
    for kind, artifacts in merged.items():
        for artifact in artifacts:
            if artifact not in manager._seen_artifacts:
                manager._new_cache_artifacts[kind].append(artifact)
                manager._seen_artifacts.add(artifact)


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
            os.fchmod(fd, 0o644)  # readable by another user's process (mkstemp makes 0600)
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
