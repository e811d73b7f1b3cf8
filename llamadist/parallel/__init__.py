"""Parallelism as passes over a built model: ``tensor`` (column/row-parallel modules, the
vocab-parallel embedding and head, ``apply_tensor_parallel``, ``tensor_parallel_pass``) and
``tp_layout`` (the loader's torch-free slices; the head arithmetic lives in planning.tp_shapes)."""
