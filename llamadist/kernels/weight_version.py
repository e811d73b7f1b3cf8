"""A process-wide count of the changes that can make a cached decode plan stale.

``cpu_step.StepPlan`` bakes pointers to a stage's weights and the modules' shapes into C
arrays. Checking every (module, weight) of the plan by identity before each step is exact
but reads ~460 dicts that the step before just pushed out of the caches (~220 us a token
for SmolLM2-135M against ~26 us warm). Instead a plan remembers ``current()`` when it was
last checked, and checks again only when the count has moved: O(1) a step. The check it
then makes compares identities and the baked data pointers (a weight moved in memory).
Models are changed before they serve, not while a step may run on another thread.

What moves the count (``changed``):

* any module, parameter or buffer registered on any ``nn.Module`` (assignment of an
  ``nn.Module``, ``nn.Parameter`` or buffer, ``add_module``, ``register_parameter``,
  ModuleList/ModuleDict item assignment...): PyTorch's global registration hooks, which
  ``watch_modules`` installs once (the first time a plan is made);
* a new ``QuantizedTensor`` or ``RowStack`` (a block weight can only be placed after it
  is made) and a changed ``QuantizedTensor.int8_x``;
* the places in llamadist that put weights in by other means (the loader's plain
  attributes, the huge-page move of ``huge_pages.move``).

Not seen: an object placed by ``object.__setattr__``-style paths that are none of the
above (a plain float tensor or an ``eps`` assigned over a plain attribute, a ``del``
with nothing put back, a write into ``module.__dict__`` / ``_parameters`` / ``_modules``
by hand, ``tensor.data = ...``). Code that does those to a model that has already run a
CPU decode step calls ``changed()`` after (``cpu_step.invalidate`` says the same)."""

from __future__ import annotations

import itertools
import threading

from torch.nn.modules import module as _nn_module

_ticks = itertools.count(1)
_count = 0
_lock = threading.Lock()
_watching = False


def changed(*_args) -> None:
    """Note that a module or weight may have been replaced (returns None, so it serves
    as a PyTorch registration hook that leaves the registered value as it is)."""
    global _count
    _count = next(_ticks)  # never back to a value a plan recorded, whatever the threads


def current() -> int:
    return _count


def watch_modules() -> None:
    """Install PyTorch's global module / parameter / buffer registration hooks that call
    ``changed`` (once per process)."""
    global _watching
    if _watching:
        return
    with _lock:
        if not _watching:
            _nn_module.register_module_module_registration_hook(changed)
            _nn_module.register_module_parameter_registration_hook(changed)
            _nn_module.register_module_buffer_registration_hook(changed)
            _watching = True
