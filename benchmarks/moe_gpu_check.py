"""A tiny random Mixtral on CUDA against transformers on CUDA (fp32 logits, 32 greedy tokens)
and against llamadist on the CPU; then the paged engine's continuous batching on CUDA with
the default runtime (CUDA graphs asked for: in float32 the MoE blocks keep the expert loop,
so decode falls back to eager; bf16 grouped experts inside the graphs are
tests/gpu/test_moe_grouped_gpu.py's and benchmarks/moe_gpu.py's).

    PYTHONPATH=. python benchmarks/moe_gpu_check.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamadist import LLM, SamplingParams  # noqa: E402
from llamadist.runtime.engine import Engine  # noqa: E402
from tests.tiny import MOE_CONFIGS, make_tiny_mixtral  # noqa: E402


def main() -> int:
    import transformers
    ok = True
    root = Path(tempfile.mkdtemp())
    for kind in MOE_CONFIGS:
        folder = make_tiny_mixtral(root / kind, kind)
        hf = transformers.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32)
        hf = hf.to("cuda").eval()
        ids = torch.randint(3, hf.config.vocab_size, (2, 40), generator=torch.Generator()
                            .manual_seed(1)).cuda()
        ours = Engine.load(str(folder), devices=["cuda"], max_seq_len=128, max_batch=2)
        with torch.no_grad():
            ref = hf(ids).logits
            ref_tok = hf.generate(ids[:1, :12], max_new_tokens=32, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, 12:].tolist()
        got = ours.forward(ids, torch.arange(40, device="cuda").expand(2, 40), 0, None,
                           logits="all")
        err = (got - ref).abs().max().item()
        llm = LLM(str(folder), devices="cuda", dtype="float32", max_seq_len=128, max_batch=2)
        prompts = [ids[0, :12].tolist(), ids[1, :7].tolist()]
        reqs, _ = llm.run(prompts, SamplingParams(max_new_tokens=32, ignore_eos=True))
        cpu = LLM(str(folder), devices="cpu", max_seq_len=128, max_batch=2)
        cpu_reqs, _ = cpu.run(prompts, SamplingParams(max_new_tokens=32, ignore_eos=True))
        same = reqs[0].output_ids == ref_tok
        same_cpu = [r.output_ids for r in reqs] == [r.output_ids for r in cpu_reqs]
        print(f"{kind}: max |logit diff| vs transformers on cuda {err:.2e}; 32 greedy "
              f"tokens equal transformers: {same}; cuda batch equals cpu batch: {same_cpu}; "
              f"engine cuda_graphs={llm.engine.cuda_graphs}")
        ok &= err <= 1e-4 and same and same_cpu
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
