"""Cases for the Triton paged decode kernel (llamadist.kernels.paged_attention) against the
PyTorch paged path (llamadist.runtime.paged_attention): shared by the CPU interpreter test
(tests/unit/test_paged_kernel.py runs ``python -m tests.paged_kernel_cases`` with
TRITON_INTERPRET=1) and the GPU test (tests/gpu/test_paged_gpu.py)."""

from __future__ import annotations

import sys

import torch

# (H, H_kv, D, block_size, seq lens): GQA with G = 4 (Llama-3-8B's), MHA, G = 8 and a
# head size that is no power of two; lengths across block and tile edges.
CASES = [
    (8, 2, 32, 16, [1, 17, 64, 130]),
    (4, 4, 16, 8, [5, 9, 33]),
    (16, 2, 64, 16, [200, 3]),
    (4, 2, 24, 4, [7, 70]),
]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def run_case(h: int, h_kv: int, d: int, bs: int, lens: list[int], dtype: torch.dtype,
             device: str, splits: int, seed: int = 0) -> tuple[float, float]:
    """Max |kernel - PyTorch| of the outputs (S, H, D) and of the written caches after one
    decode step of sequences of ``lens`` (their last token is this step's)."""
    from llamadist.kernels.paged_attention import paged_decode
    from llamadist.runtime.paged_attention import PagedLayer
    from llamadist.runtime.paged_kv import PagedBatch
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    num_blocks = sum(need) + 3
    # Shuffled block ids (never block 0, the null block), so tables are not contiguous.
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(ids[at:at + n])
        at += n
    batch = PagedBatch.build([(t, n - 1, 1) for t, n in zip(tables, lens)], bs).to(device)
    kv = torch.randn(2, num_blocks, h_kv, bs, d, generator=g).to(device, dtype)
    s = len(lens)
    q = torch.randn(s, h, d, generator=g).to(device, dtype)
    k = torch.randn(s, h_kv, d, generator=g).to(device, dtype)
    v = torch.randn(s, h_kv, d, generator=g).to(device, dtype)
    ref_kv = kv.clone()
    ref = PagedLayer(ref_kv, batch).attend(q, k, v)  # (S, H, D)
    out = paged_decode(q, k, v, kv, batch.slot_mapping, batch.block_tables.to(torch.int32),
                       batch.seq_lens.to(torch.int32), splits)
    return ((out.float() - ref.float()).abs().max().item(),
            (kv.float() - ref_kv.float()).abs().max().item())


def stored_case(device: str) -> int:
    """A decode step whose k / v a projection stored itself at the cache's slots
    (PagedLayer.cache_slots, as q | k | v's int4 kernel does): ``attend(q, None, None)``
    through the kernel gives what attend(q, k, v) gives; without the kernel the layer
    offers no slots and refuses k / v None. Returns 1 where it fails."""
    from llamadist.kernels.paged_attention import paged_decode
    from llamadist.runtime.paged_attention import PagedLayer
    from llamadist.runtime.paged_kv import PagedBatch
    g = torch.Generator().manual_seed(5)
    h, h_kv, d, bs = 8, 2, 32, 4
    batch = PagedBatch.build([([1, 2], 6, 1), ([4, 3, 5], 9, 1)], bs).to(device)
    kv = torch.randn(2, 6, h_kv, bs, d, generator=g).to(device)
    q, k, v = (torch.randn(2, n, d, generator=g).to(device) for n in (h, h_kv, h_kv))
    want = PagedLayer(kv.clone(), batch, paged_decode).attend(q, k, v)
    layer = PagedLayer(kv, batch, paged_decode)
    cache, slots = layer.cache_slots()
    for i, slot in enumerate(slots.tolist()):  # what the projection's kernel stores
        cache[0, slot // bs, :, slot % bs], cache[1, slot // bs, :, slot % bs] = k[i], v[i]
    err = (layer.attend(q, None, None) - want).abs().max().item()
    plain = PagedLayer(kv, batch)
    try:
        plain.attend(q, None, None)
        refused = False
    except RuntimeError:
        refused = True
    ok = err <= TOL[torch.float32] and plain.cache_slots() is None and refused
    print(f"stored k / v: out {err:.2e}, refused without the kernel: {refused}"
          f"{'' if ok else '  FAIL'}")
    return int(not ok)


def early_case() -> int:
    """EARLY_TILE's contract, on Triton's interpreter (CPU): the split kernel uses what the
    kernel before it writes (q, and this step's K/V slot) only as read after enter's wait.
    Both hold NaN at the start of every program (a hook on the interpreter's grid, whose
    calls are counted) and their values appear only at the wait (a stand-in enter stores
    them, as the kernel before would have by then), so any use of a value read before the
    wait shows as NaN in the output. float32 and bfloat16, against the PyTorch path on the
    stored cache; returns the failures."""
    import triton.runtime.interpreter as ti

    from llamadist.kernels import gpu
    from llamadist.kernels import paged_attention as front
    from llamadist.runtime.paged_attention import PagedLayer
    from llamadist.runtime.paged_kv import PagedBatch
    m = gpu.load("paged_attention")
    h, h_kv, d, bs = 8, 2, 32, 16
    g = torch.Generator().manual_seed(11)
    lens = [1, 17, 64, 65, 130]
    need = [-(-n // bs) for n in lens]
    ids = (torch.randperm(sum(need), generator=g) + 1).tolist()
    tables = [ids[sum(need[:i]):sum(need[:i + 1])] for i in range(len(lens))]
    batch = PagedBatch.build([(t, n - 1, 1) for t, n in zip(tables, lens)], bs)
    kv32 = torch.randn(2, sum(need) + 1, h_kv, bs, d, generator=g)
    q32 = torch.randn(len(lens), h, d, generator=g)
    k32, v32 = (torch.randn(len(lens), h_kv, d, generator=g) for _ in range(2))
    slots = batch.slot_mapping.tolist()

    def store(cache, kk, vv):
        for i, slot in enumerate(slots):
            cache[0, slot // bs, :, slot % bs], cache[1, slot // bs, :, slot % bs] = kk[i], vv[i]

    saved = (m.enter, m.dependent, ti.interpreter_builder.set_grid_idx, front.EARLY_TILE,
             front.SPLIT_GRAIN)
    bad = 0
    try:
        front.EARLY_TILE = True
        m.dependent = lambda device: {"PDL": True}
        for dtype in (torch.float32, torch.bfloat16):
            kv, q, k, v = (t.to(dtype) for t in (kv32, q32, k32, v32))
            want = PagedLayer(kv.clone(), batch).attend(q, k, v)
            nan_q, nan_kv = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
            for grain in (front.BLOCK_N, 16):
                front.SPLIT_GRAIN = grain
                for splits in (1, 2, 4):
                    cache, q_in, calls = kv.clone(), q.clone(), [0]

                    def arrive(pdl, c=cache, qi=q_in):  # the kernel before has ended
                        if pdl:
                            qi.copy_(q)
                            store(c, k, v)
                    m.enter = arrive

                    def program(x, y, z, c=cache, qi=q_in, n=calls):  # before the wait
                        n[0] += 1
                        qi.copy_(nan_q)
                        store(c, nan_kv, nan_kv)
                        saved[2](x, y, z)
                    ti.interpreter_builder.set_grid_idx = program
                    out = m.attend(q_in, cache, batch.block_tables.to(torch.int32),
                                   batch.seq_lens.to(torch.int32), splits)
                    ti.interpreter_builder.set_grid_idx = saved[2]
                    programs = len(lens) * h_kv * (splits + (h // h_kv if splits > 1 else 0))
                    err = (out.float() - want.float()).abs().max().item()  # NaN: read early
                    ok = err <= TOL[dtype] and calls[0] == programs
                    bad += not ok
                    print(f"early tile {str(dtype)[6:]} grain={grain} splits={splits}: out "
                          f"{err:.2e}, {calls[0]} programs hooked{'' if ok else '  FAIL'}")
    finally:
        (m.enter, m.dependent, ti.interpreter_builder.set_grid_idx, front.EARLY_TILE,
         front.SPLIT_GRAIN) = saved
    return bad


def patch_interpreter() -> None:
    """Triton's interpreter turns a scalar (a 1-element array) into a loop bound with
    ``int(array)``, which NumPy >= 2.4 refuses for arrays of one dimension; use .item().

    And each call of a @triton.jit helper inside a kernel (``_w_tile``, ``_x_part``: several
    per loop step of every program) patches triton.language again, five
    ``inspect.getmembers`` scans that find nothing left to patch while a launch's patches
    are on (its builtins are already the interpreter's); skip it then: the same Python
    runs, a third of the interpreted MoE cases' time less."""
    import triton.runtime.interpreter as ti
    if getattr(ti, "_llamadist_patched", False):
        return
    original = ti._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    ti._patch_lang_tensor = patched

    langs: dict = {}  # helper -> the language modules among its globals (what triton patches)

    def helper_call(self, *args, **kwargs):  # InterpretedFunction.__call__ of triton 3.7
        # patch as triton does unless each language module the helper sees is patched
        # already (by the launch, or by an earlier helper's call: those are never undone)
        if self.fn not in langs:
            langs[self.fn] = [v for v in self.fn.__globals__.values()
                              if v is ti.tl or v is ti.tl.core]
        if not langs[self.fn] or any(ti.tl.core.is_builtin(m.load) for m in langs[self.fn]):
            ti._patch_lang(self.fn)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise ti.InterpreterError(repr(e)) from e
    ti.InterpretedFunction.__call__ = helper_call
    ti._llamadist_patched = True


def main(device: str = "cpu", dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> int:
    if device == "cpu":
        patch_interpreter()
    from llamadist.kernels import paged_attention as front
    bad = 0
    for name in dtypes:
        dtype = getattr(torch, name)
        for case in CASES:
            for splits in (1, 2, 4):
                err, kv_err = run_case(*case, dtype, device, splits)
                ok = err <= TOL[dtype] and kv_err == 0.0
                bad += not ok
                print(f"{name} {case} splits={splits}: out {err:.2e} kv {kv_err:.1e}"
                      f"{'' if ok else '  FAIL'}")
    # Split ranges finer than a tile (SPLIT_GRAIN < BLOCK_N: programs reading part of one
    # tile, ranges starting inside a tile, splits left empty by short sequences, which the
    # merge does not read) and coarser (several tiles a range).
    default = front.SPLIT_GRAIN
    try:
        for grain in (8, 2 * front.BLOCK_N):
            front.SPLIT_GRAIN = grain
            for case in CASES:
                for splits in (4, 16):
                    err, kv_err = run_case(*case, torch.float32, device, splits)
                    ok = err <= TOL[torch.float32] and kv_err == 0.0
                    bad += not ok
                    print(f"float32 {case} grain={grain} splits={splits}: out {err:.2e} "
                          f"kv {kv_err:.1e}{'' if ok else '  FAIL'}")
    finally:
        front.SPLIT_GRAIN = default
    if device == "cpu":
        bad += early_case()
    bad += stored_case(device)
    # more splits than the merge kernel's tile holds: refused, never a silent drop
    from llamadist.kernels.paged_attention import MAX_SPLITS
    try:
        run_case(*CASES[0], torch.float32, device, MAX_SPLITS + 1)
        print(f"{MAX_SPLITS + 1} splits were not refused  FAIL")
        bad += 1
    except ValueError as e:
        print(f"refused: {e}")
    return bad


def model_case(path: str, device: str = "cpu") -> tuple[list, list]:
    """Greedy tokens of three requests through LLMEngine with the PyTorch paged path, then
    with the kernel and the static buffers of llamadist.runtime.paged_graphs (no capture
    off CUDA): the graph path's bookkeeping end to end. Returns (reference, kernel path)."""
    from llamadist.config import RuntimeConfig
    from llamadist.engine.engine import LLMEngine
    from llamadist.generation.sampling import SamplingParams
    from llamadist.kernels.paged_attention import paged_decode
    from llamadist.runtime.engine import Engine
    from llamadist.runtime.paged_graphs import PagedGraphs
    runtime = RuntimeConfig(max_seq_len=64, max_batch=3, dtype="float32", cpu_kernels=False)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = [[5, 9, 13, 2, 7], [3] * 11, [8, 1]]
    out = []
    for kernel in (False, True):
        model = Engine.load(path, devices=[device], max_batch=3, max_seq_len=64,
                            runtime=runtime)
        engine = LLMEngine(model, None, runtime, block_size=4)
        if kernel:
            for s in model.stages:
                s.paged.decode_fn = paged_decode
            model._paged_graphs = PagedGraphs(model.stages, 3, compile_layers=False,
                                              capture=False)
            model.cuda_graphs = True
        reqs = [engine.add_request(p, params) for p in prompts]
        while engine.has_unfinished:
            engine.step()
        out.append([r.output_ids for r in reqs])
        if kernel:  # the decode-only steps went through the buckets (3, then fewer rows)
            assert model._paged_graphs.decoders[0].buckets
    return out[0], out[1]


if __name__ == "__main__":
    if sys.argv[1:2] == ["model"]:  # python -m tests.paged_kernel_cases model PATH
        patch_interpreter()
        ref, got = model_case(sys.argv[2])
        print("model tokens equal" if ref == got else f"FAIL {ref} != {got}")
        # the kernels' custom ops called outside compile: their implementation directly,
        # not the op, whose dispatch imports torch._dynamo (seconds) at its first call
        dynamo = "torch._dynamo" in sys.modules
        print("torch._dynamo imported" if dynamo else "torch._dynamo not imported")
        sys.exit(0 if ref == got and not dynamo else 1)
    sys.exit(1 if main(*sys.argv[1:2]) else 0)
