"""Parallelism as passes over a built model: ``tensor`` (column/row-parallel modules, the
vocab-parallel embedding and head, ``apply_tensor_parallel``, ``tensor_parallel_pass``),
``tp_layout`` (the loader's torch-free slices; the head arithmetic lives in planning.tp_shapes)
and ``expert`` (each rank's share of a mixture-of-experts layer's experts,
``apply_expert_parallel``, ``expert_parallel_pass``)."""
