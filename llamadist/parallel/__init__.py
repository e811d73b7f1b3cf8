"""Parallelism as passes over a built model: ``tensor`` (column/row-parallel modules, the
vocab-parallel embedding and head, ``apply_tensor_parallel``, ``tensor_parallel_pass``),
``tp_layout`` (the loader's torch-free slices; the head arithmetic lives in planning.tp_shapes)
and ``expert`` (each rank's share of a mixture-of-experts layer's experts,
``apply_expert_parallel``, ``expert_parallel_pass``); ``context`` (one sequence over
context-parallel ranks: the exact merge of partial attention, ring-attention prefill,
sharded-KV decode) and ``context_kv`` (a sharded one-sequence cache the unchanged model
runs through; not wired into the engine yet)."""
