"""Cases for the routed expert GEMV (llamadist.kernels.moe_routed) against the expert loop
of llamadist.model.moe (``expert_fn=None``): run by tests/unit/test_moe_routed.py as
``python -m tests.moe_routed_cases cpu blocks FOLDER...`` / ``cpu model FOLDER`` / ``cpu
configs`` with TRITON_INTERPRET=1 (Triton's CPU interpreter; it must be set before triton
is imported), and imported by the GPU test (tests/gpu/test_moe_grouped_gpu.py) on CUDA.
Prints one line per case, FAIL on the bad ones; the exit status counts them."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_block(folder: str | Path, experts: list[int] | None = None, seed: int = 0):
    """The first MoE block shape of the tiny Mixtral at ``folder``, random (normal 0.1),
    holding ``experts`` (None: all), fused (w13), float32 on the CPU."""
    from llamadist.config import ModelConfig
    from llamadist.model.fuse import fuse_projections
    from llamadist.model.moe import SparseMoE
    cfg = ModelConfig.from_json_file(Path(folder) / "config.json")
    torch.manual_seed(seed)
    full = SparseMoE(cfg)
    for p in full.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    part = SparseMoE(cfg, experts)
    part.load_state_dict(full.state_dict(), strict=False)
    return fuse_projections(part)


def stacks(moe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(w13 (G, 2F, D), w2 (G, D, F), slot (E,) or None) of a fused block, as
    kernel_passes.use_grouped_experts stacks them."""
    held = sorted(int(e) for e in moe.experts)
    w13 = torch.stack([moe.experts[str(e)].w13.weight.detach() for e in held])
    w2 = torch.stack([moe.experts[str(e)].w2.weight.detach() for e in held])
    slot = None
    if held != list(range(moe.num_experts)):
        slot = torch.full((moe.num_experts,), -1, dtype=torch.long, device=w13.device)
        slot[held] = torch.arange(len(held), device=w13.device)
    return w13, w2, slot


def routed_vs_loop(moe, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
                   dtype: torch.dtype) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(max |routed - loop|, routed, loop): the routed kernel on ``moe``'s weights in
    ``dtype`` against the float32 loop over the same (rounded) weights and x."""
    from llamadist.kernels.moe_routed import routed_expert_sum
    w13, w2, slot = stacks(moe)
    w13, w2, xd = w13.to(dtype), w2.to(dtype), x.to(dtype)
    with torch.no_grad():
        for e in moe.experts.values():  # the loop on the rounded weights, in float32
            e.w13.weight.copy_(e.w13.weight.to(dtype).float())
            e.w2.weight.copy_(e.w2.weight.to(dtype).float())
        want = moe.expert_sum(xd.float(), weights, index)
        got = routed_expert_sum(xd, weights, index, w13, w2, slot)
    assert got.dtype == dtype and got.shape == want.shape
    return (got.float() - want).abs().max().item(), got.float(), want


def block_cases(folders: list[str], device: str, dtypes: tuple[torch.dtype, ...],
                alternate: bool = False) -> int:
    """Each Mixtral's block, every expert and a share, batch 1-3, in each of ``dtypes``;
    ``alternate``: the dtypes take turns instead (the interpreter's cut: each batch size
    and each of (every expert, a share) still runs in both of two dtypes)."""
    bad = 0
    for folder in folders:
        probe = make_block(folder)
        e, k = probe.num_experts, probe.top_k
        # every expert; a share (assignments to the others contribute 0, read nothing)
        for share, experts in enumerate((None, list(range(0, e, 2)))):
            for d, dtype in enumerate(dtypes):
                for n in (1, 2, 3):
                    if alternate and (n - 1 + share) % len(dtypes) != d:
                        continue
                    moe = make_block(folder, experts).to(device)
                    x = torch.randn(n, moe.gate.in_features, device=device)
                    weights, index = moe.route(x)
                    err, got, want = routed_vs_loop(moe, x, weights, index, dtype)
                    tol = TOL[dtype] * max(1.0, want.abs().max().item())
                    ok = err <= tol and (experts is not None or want.abs().max() > 0.01)
                    bad += not ok
                    print(f"{Path(folder).name} experts={experts} {dtype} N={n} k={k}: "
                          f"{err:.2e}{'' if ok else '  FAIL'}")
        bad += special_cases(folder, device)
    return bad


def special_cases(folder: str, device: str) -> int:
    """Routings chosen by hand: two tokens routed to the same expert (one reads it twice);
    a share where one token's experts are all held elsewhere (its output is exactly 0)."""
    bad = 0
    moe = make_block(folder).to(device)
    e, k = moe.num_experts, moe.top_k
    x = torch.randn(3, moe.gate.in_features, device=device)
    index = torch.tensor([[1, 0], [1, e - 1], [0, 1]][:3], device=device)[:, :k]
    weights = torch.rand(3, k, device=device)
    err, _, _ = routed_vs_loop(moe, x, weights, index, torch.float32)
    ok = err <= TOL[torch.float32]
    bad += not ok
    print(f"{Path(folder).name} same expert for two tokens {index.tolist()}: {err:.2e}"
          f"{'' if ok else '  FAIL'}")
    share = make_block(folder, [1]).to(device)
    index = torch.tensor([[1, 0], [0, e - 1], [e - 1, 1]], device=device)[:, :k]
    err, got, want = routed_vs_loop(share, x, weights, index, torch.float32)
    unheld = (index != 1).all(-1)  # token 1 (and, top-1, token 2): no held expert
    ok = (err <= TOL[torch.float32] and bool((got[unheld] == 0).all())
          and want[~unheld].abs().max().item() > 1e-3)
    bad += not ok
    print(f"{Path(folder).name} share [1], index {index.tolist()}: {err:.2e}"
          f"{'' if ok else '  FAIL'}")
    return bad


def reference(x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor, slot: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts' weighted sum in float64, token by token: (N, D)."""
    f = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for n in range(index.shape[0]):
        for j in range(index.shape[1]):
            g = int(index[n, j]) if slot is None else int(slot[index[n, j]])
            if g < 0:
                continue
            h = w13[g].double() @ x[n].double()  # (2F,)
            act = torch.nn.functional.silu(h[:f]) * h[f:]
            out[n] += float(weights[n, j]) * (w2[g].double() @ act)
    return out


def shape_cases(device: str, dtypes: tuple[torch.dtype, ...],
                shapes: tuple[tuple[int, int, int, int], ...] = ((4, 600, 1100, 2),)) -> int:
    """(G, D, F, k) shapes whose D and F span several weight tiles, none a multiple of a
    tile, at batch 1-3 (token 0 routed like the last: one expert read for two tokens),
    every expert and a share (each token one expert held, the others not), against
    ``reference``: float32 within 1e-5 of the output's scale."""
    from llamadist.kernels.moe_routed import routed_expert_sum
    bad = 0
    for g, d, f, k in shapes:
        gen = torch.Generator().manual_seed(g + d + f)
        w13 = (torch.randn(g, 2 * f, d, generator=gen) / d ** 0.5).to(device)
        w2 = (torch.randn(g, d, f, generator=gen) / f ** 0.5).to(device)
        slot = torch.tensor([i // 2 if i % 2 == 0 else -1 for i in range(2 * g)],
                            device=device)  # a share: the even experts of 2G
        for share in (False, True):
            for n in (1, 2, 3):
                x = torch.randn(n, d, generator=gen).to(device)
                # a share: each token's first expert held (even), the others not (odd)
                index = torch.stack([
                    torch.cat([2 * torch.randperm(g, generator=gen)[:1],
                               2 * torch.randperm(g, generator=gen)[:k - 1] + 1]) if share
                    else torch.randperm(g, generator=gen)[:k] for _ in range(n)])
                index[0] = index[-1]  # two tokens routed alike (n > 1)
                index = index.to(device)
                weights = torch.softmax(torch.randn(n, k, generator=gen), -1)
                weights = weights.sort(-1, descending=True).values.to(device)  # first: largest
                for dtype in dtypes:
                    sl = slot if share else None
                    want = reference(x.to(dtype), weights, index, w13.to(dtype), w2.to(dtype),
                                     sl)
                    got = routed_expert_sum(x.to(dtype), weights, index, w13.to(dtype),
                                            w2.to(dtype), sl)
                    scale = want.abs().max().item()
                    err = (got.double() - want).abs().max().item()
                    ok = err <= TOL[dtype] * max(1.0, scale) and scale > 0.1
                    bad += not ok
                    print(f"shape G={g} D={d} F={f} k={k} share={share} {dtype} N={n}: "
                          f"{err:.2e} (scale {scale:.2f}){'' if ok else '  FAIL'}")
    return bad


def config_kinds():
    """One RoutedConfig of each kind the sweep times (benchmarks/moe_routed_sweep.py), with
    tiles small enough that the odd shapes of ``config_cases`` span several of them:
    prefetch 0 / 1 / 2, x in the tile's layout, split-K of the down kernel (whole ranges,
    a last one short, more splits than tiles), other warps and tiles, and DEFAULT."""
    from llamadist.kernels.moe_routed import DEFAULT, Cut, RoutedConfig
    return [DEFAULT,
            RoutedConfig(Cut(16, 32), Cut(8, 64)),
            RoutedConfig(Cut(16, 32, prefetch=1), Cut(8, 64, prefetch=1, split=2)),
            RoutedConfig(Cut(8, 32, prefetch=2), Cut(16, 32, prefetch=2, split=3)),
            RoutedConfig(Cut(32, 16, warps=2, x_tile=True),
                         Cut(4, 64, warps=8, prefetch=2, x_tile=True)),
            RoutedConfig(Cut(16, 64, prefetch=2, x_tile=True),
                         Cut(8, 32, prefetch=1, split=64, x_tile=True))]


def config_cases(device: str, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
                 g: int = 4, d: int = 83, f: int = 149) -> int:
    """Every ``config_kinds`` config on (G, D, F) with tails in D and F, top-1 and top-2,
    every expert and a share (experts not held: group -1; token 0 holds none of its
    experts, its output is exactly 0), batch 1-3, against ``reference``: float32 within
    1e-5 and bfloat16 within 2e-2 of the output's scale (the dtypes take turns over the
    four (k, share) cases of a config: each config runs in both)."""
    from llamadist.kernels.moe_routed import routed_expert_sum
    bad = 0
    gen = torch.Generator().manual_seed(d + f)
    w13 = torch.randn(g, 2 * f, d, generator=gen) / d ** 0.5
    w2 = torch.randn(g, d, f, generator=gen) / f ** 0.5
    slot = torch.tensor([i // 2 if i % 2 == 0 else -1 for i in range(2 * g)])  # even held
    for cfg in config_kinds():
        for i, (k, share) in enumerate([(1, False), (1, True), (2, False), (2, True)]):
            dtype = dtypes[(i + i // 2) % len(dtypes)]
            n = k + share  # 1, 2, 2, 3 tokens
            x = torch.randn(n, d, generator=gen)
            if share:  # token 0: its experts held elsewhere (odd); the others' first held
                index = torch.stack([torch.randperm(g, generator=gen)[:k] * 2 + (t == 0)
                                     for t in range(n)])
            else:
                index = torch.stack([torch.randperm(g, generator=gen)[:k] for _ in range(n)])
            weights = torch.softmax(torch.randn(n, k, generator=gen), -1)
            args = [t.to(device) for t in (x.to(dtype), weights, index, w13.to(dtype),
                                           w2.to(dtype))]
            sl = slot.to(device) if share else None
            want = reference(*args, sl)
            got = routed_expert_sum(*args, sl, config=cfg)
            scale = want.abs().max().item()
            err = (got.double() - want).abs().max().item()
            ok = (err <= TOL[dtype] * max(1.0, scale) and scale > 0.1 and got.dtype == dtype
                  and (not share or bool((got[0] == 0).all())))
            bad += not ok
            print(f"config {cfg.label()} k={k} share={share} {dtype} N={n}: "
                  f"{err:.2e} (scale {scale:.2f}){'' if ok else '  FAIL'}")
    return bad


def model_case(folder: str, device: str = "cpu") -> tuple[list, list, float, int]:
    """Greedy tokens of one request, then of two at once, through the expert loop and
    through use_grouped_experts (force: the grouped GEMM's reference for prefill, the
    routed kernel for decode where expert_path chooses it): (loop tokens, kernel tokens,
    max |logits difference| over the steps, calls of the routed kernel)."""
    from llamadist.generation.generate import generate
    from llamadist.generation.sampling import SamplingParams
    from llamadist.kernels import moe_routed
    from llamadist.runtime.engine import Engine
    from llamadist.runtime.kernel_passes import use_grouped_experts
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    calls = [0]
    kernel_fn = moe_routed.routed_expert_sum

    def counted(*a, **kw):
        calls[0] += 1
        return kernel_fn(*a, **kw)
    moe_routed.routed_expert_sum = counted  # moe_grouped.expert_sum calls it by this name

    def run(kernel: bool, prompts: list[list[int]]):
        eng = Engine.load(folder, devices=[device], max_batch=2, max_seq_len=64)
        if kernel:
            assert sum(use_grouped_experts(s.model, force=True) for s in eng.stages) > 0
        steps = []
        orig = eng.forward

        def forward(*a, **kw):
            out = orig(*a, **kw)
            steps.append(out[:, -1].float().clone())
            return out
        eng.forward = forward
        tokens = [r.token_ids for r in generate(eng, None, prompts, params)]
        return tokens, torch.stack(steps)
    want, got, diff = [], [], 0.0
    for prompts in ([[5, 6, 7, 8, 9, 10]], [[40, 41, 300], [7, 7, 7, 7, 7]]):
        (w, ref), (g, logits) = run(False, prompts), run(True, prompts)
        want, got = want + w, got + g
        diff = max(diff, (logits - ref).abs().max().item())
    moe_routed.routed_expert_sum = kernel_fn
    return want, got, diff, calls[0]


def main(argv: list[str]) -> int:
    from tests.paged_kernel_cases import patch_interpreter
    device = "cuda" if torch.cuda.is_available() and argv[0] == "gpu" else "cpu"
    if device == "cpu":
        patch_interpreter()
    if argv[1] == "configs":
        return config_cases(device)
    if argv[1] == "blocks":
        dtypes = (torch.float32, torch.bfloat16)
        if device == "cuda":
            return block_cases(argv[2:], device, dtypes) + shape_cases(device, dtypes)
        # The interpreter takes ~5 s a case of the GPU's wide shape (CI runs this on 2
        # cores): float32 only, and D and F over two tiles each of DEFAULT's cuts
        # (gate/up: 2 of 128 columns, 35 row tiles of 16; down: 2 of 512 columns, 50 row
        # tiles of 4), tails in all. The tiny blocks: the two dtypes take turns over the
        # batch sizes (the kernel's code is the same for both; each case runs in each).
        return (block_cases(argv[2:], device, dtypes, alternate=True)
                + shape_cases(device, (torch.float32,), ((4, 200, 550, 2),)))
    want, got, diff, calls = model_case(argv[2], device)
    ok = want == got and diff < 1e-4 and calls > 0
    print(f"model {Path(argv[2]).name}: tokens equal {want == got}, logits {diff:.2e}, "
          f"routed kernel calls={calls}{'' if ok else '  FAIL'}")
    return int(not ok)


if __name__ == "__main__":  # python -m tests.moe_routed_cases cpu|gpu blocks|model|configs ...
    raise SystemExit(main(sys.argv[1:]))
