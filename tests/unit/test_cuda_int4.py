"""kernels.cuda_int4 on the CPU: the decode its kernel applies to tinygemm's words gives
back every code at the k its mma operand stands for; every form of int4_rows.cu compiles
through NVRTC for sm_80 and sm_90 (the nvidia-cuda-nvrtc wheel of the test extra: NVRTC
needs no GPU) without local memory; the rows rule; and the clear refusals off CUDA. The
kernel's numbers are checked on a GPU (tests/gpu/test_cuda_int4_gpu.py)."""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import re
import subprocess
from pathlib import Path

import pytest
import torch

from llamadist.kernels import cuda_int4 as C
from llamadist.kernels import wquant_torch as WT

needs_nvrtc = pytest.mark.skipif(C.nvrtc() is None, reason="no libnvrtc (the test extra's "
                                 "nvidia-cuda-nvrtc-cu12 wheel brings one on Linux x86_64)")


@pytest.mark.parametrize("tiles", [2, 4, 8])
def test_decode_gives_each_code_at_its_operand_k(tiles):
    """Per lane (row g = lane / 4 of the n-tile, c = lane % 4) and word w, the kernel's
    ``codes(word, 8 s)`` is mma's b0 for k16 step s (k = 2c, 2c + 1) and ``codes(word,
    8 s + 4)`` its b1 (k = 2c + 8, 2c + 9): bf16 128 + code in each half, low half first."""
    n, k = 16, 32 * tiles * 3
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(tiles))
    words = WT.tinygemm_layout(codes, tiles)
    seen = torch.full((n, k), -1)
    for nt, kt, lane, w in itertools.product(range(n // 8), range(k // (16 * tiles)),
                                             range(32), range(tiles // 2)):
        word = int(words[nt, kt, lane, w]) & 0xFFFFFFFF
        g, c = lane // 4, lane % 4
        for s, b in itertools.product(range(2), range(2)):
            v = ((word >> (8 * s + 4 * b)) & 0x000F000F) | 0x43004300
            for half in range(2):
                kk = kt * 16 * tiles + 32 * w + 16 * s + 8 * b + 2 * c + half
                seen[nt * 8 + g, kk] = ((v >> (16 * half)) & 0xFFFF) - 0x4300
    assert torch.equal(seen, codes)


# the rule's forms (rows 1-16 of small and Llama-sized weights) on Llama's tiles and
# groups; the other tiles and groups, codes - 8 first, and a form of 16 warps once each
RULE_FORMS = sorted({C.rows_config(m, n, 4096) for m in range(1, 17)
                     for n in (256, 4096, 6144, 28672)}, key=C.RowsConfig.label)
FORMS = ([(tiles, group, cfg, False) for tiles, group in [(8, 32), (8, 128)]
          for cfg in RULE_FORMS]
         + [(tiles, group, C.RowsConfig(), False) for tiles, group in [(2, 32), (4, 64), (8, 256)]]
         + [(8, 128, C.RowsConfig(), True), (8, 128, C.RowsConfig(16, 1, 4, 3), False),
            (8, 128, C.RowsConfig(w_as_a=False), False), (8, 32, C.RowsConfig(8, 4, 8, 3), False),
            (8, 128, C.RowsConfig(8, 4, 1, 4, persist=True), False),
            (4, 64, C.RowsConfig(4, 2, 16, 3, persist=True), True)]
         # k-pair forms (KP, a measurement switch: cuda_int4.KPAIR)
         + [(8, 128, C.RowsConfig(8, 4, 1, 2, kpair=True), False),
            (8, 32, C.RowsConfig(16, 2, 4, 2, kpair=True), False),
            (4, 64, C.RowsConfig(4, 3, 2, 4, kpair=True), True),
            (8, 128, C.RowsConfig(8, 4, 1, 3, kpair=2), False),
            (8, 32, C.RowsConfig(16, 2, 4, 3, kpair=2), False)])


def _nvdisasm() -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    return p if p.exists() else None


def sass_of(cubin: bytes, tmp_path: Path) -> str | None:
    """A cubin's SASS (triton's nvdisasm), None where nvdisasm is not installed."""
    dis = _nvdisasm()
    if dis is None:
        return None
    f = tmp_path / "k.cubin"
    f.write_bytes(cubin)
    return subprocess.run([str(dis), "-c", str(f)], capture_output=True, text=True,
                          check=True).stdout


@needs_nvrtc
@pytest.mark.parametrize("arch", ["80", "90"])
def test_every_form_compiles_without_local_memory(arch, tmp_path):
    for tiles, group, cfg, exact in FORMS:
        if arch == "80" and (tiles, group) not in [(8, 128), (2, 32)]:
            continue  # sm_80: two forms suffice (the same source, another target)
        cubin = C.compile_cubin(arch, C.defines(tiles, group, cfg, exact))
        assert cubin[:4] == b"\x7fELF", (tiles, group, cfg)
        sass = sass_of(cubin, tmp_path)
        if sass is None:
            continue
        mma = len(re.findall(r"\bHMMA\.16816\.F32\.BF16\b", sass))
        assert mma > 0, (tiles, group, cfg)
        assert not re.search(r"\b(LDL|STL)\b", sass), f"local memory: {tiles, group, cfg}"


@needs_nvrtc
def test_norm_forms_compile_and_the_dependent_ones_keep_registers():
    """NORM (add + RMSNorm in the kernel, cuda_int4.launch_norm) compiles for the rule's
    forms up to NORM_MAX_ROWS rows of Llama-3-8B's q | k | v and gate | up (GLU), on sm_80
    and sm_90; as dependent launches (the decode graphs' on sm_90) the rule's form for the
    norm (its spill check compiles the norm's kernel: 8 x 4 x 2 gate | up spills 8 bytes at
    4 rows, 8 x 4 x 4 does not) spills nothing."""
    for arch, pdl in [("80", False), ("90", False), ("90", True)]:
        for m in (1, 2, 4):
            for n, glu in ((6144, False), (28672, True)):  # Llama-3-8B's qkv, gate | up
                cfg = C.rule_form(m, n, 4096, 8, 128, 132, 232448, arch, pdl, glu, norm=True)
                spilled = C.spill_bytes(arch, C.defines(8, 128, cfg, pdl=pdl, glu=glu,
                                                        norm=True))
                assert spilled is not None, (arch, cfg)
                if pdl:
                    assert spilled == 0, (arch, m, n, glu, cfg, spilled)
    for cfg in (C.RowsConfig(8, 4, 1, 2, kpair=1), C.RowsConfig(8, 4, 4, 3, kpair=2)):
        for glu in (False, True):  # k-pair forms with the norm in their own x buffer
            assert C.spill_bytes("90", C.defines(8, 128, cfg, pdl=True, glu=glu,
                                                 norm=True)) == 0, (cfg, glu)


@needs_nvrtc
def test_min_blocks_reaches_ptxas(monkeypatch):
    """MIN_BLOCKS (a measurement switch, 1 in the product) asks ptxas for registers that
    let that many blocks share an SM: gate | up's one-row form (8 x 4 x 2, GLU, dependent)
    takes more than 80 registers, two blocks of 256 threads an SM; asked for three, at most
    80. The ask is capped by the threads an SM holds (2 048)."""
    cfg = C.RowsConfig(8, 4, 1, 2)

    def registers(min_blocks: int) -> int:
        monkeypatch.setattr(C, "MIN_BLOCKS", min_blocks)
        d = C.launch_defines(8, 128, cfg, "90", pdl=True, glu=True)
        assert d["MINB"] == min_blocks
        log = C._compiled("90", tuple(sorted(d.items())))[1]
        return int(re.search(r"Used (\d+) registers", log).group(1))

    assert registers(3) <= 80 < registers(1)
    monkeypatch.setattr(C, "MIN_BLOCKS", 8)
    assert C.launch_defines(8, 128, C.RowsConfig(16, 4, 1, 2), "90")["MINB"] == 4


@needs_nvrtc
def test_rule_forms_do_not_spill():
    """The rule's 2-stage forms where ptxas keeps them in registers, else the first of the
    same at 4 stages, at 8 warps, at both that does not spill: on sm_80 / sm_90, plain or
    dependent, at Llama's 8 tiles and groups of 128 / 32 and the 4 tiles of K = 576
    (SmolLM2), only 4 rows at 4 tiles and groups of 32 on sm_80 spill, as every such form
    does there (session 21's 8 x 4 x 4 among them), and the least of them is taken. The
    forms that spill are ptxas's choice: these are NVRTC 12.9.86's (the test extra's pin)."""
    chosen, spilled = {}, set()
    for arch, pdl in [("80", False), ("90", False), ("90", True)]:
        for tiles, group in [(8, 128), (8, 32), (4, 32), (4, 64)]:
            for m in (1, 4):
                for n in (4096, 28672):  # one block an SM (16 warps), several waves (8)
                    cfg = C.rule_form(m, n, 4096, tiles, group, 132, 232448, arch, pdl)
                    assert cfg.rows == C.row_capacity(m) and cfg.nb == 4
                    spill = {(w, s): C.spill_bytes(arch, C.defines(
                        tiles, group, dataclasses.replace(cfg, warps=w, stages=s), pdl=pdl))
                        for w in {8, C.rows_config(m, n, 4096).warps} for s in (2, 4)}
                    assert spill[cfg.warps, cfg.stages] == min(spill.values()), \
                        (arch, pdl, tiles, group, cfg, spill)
                    if spill[cfg.warps, cfg.stages]:
                        spilled.add((arch, pdl, tiles, group, m))
                    chosen[arch, pdl, tiles, group, m, n] = cfg
    assert spilled == {("80", False, 4, 32, 4)}
    # Llama-3-8B int4 g128 on an H200 keeps the measured forms; 8 x 4 x 2 at 4 tiles and
    # groups of 32 spills as a dependent launch on sm_90 (16 bytes), so it takes 4 stages
    assert chosen["90", True, 8, 128, 1, 28672] == C.RowsConfig(8, 4, 1, 2)
    assert chosen["90", True, 8, 128, 1, 4096] == C.RowsConfig(16, 4, 1, 2)
    assert C.spill_bytes("90", C.defines(4, 32, C.RowsConfig(8, 4, 1, 2), pdl=True)) > 0
    assert chosen["90", True, 4, 32, 1, 28672] == C.RowsConfig(8, 4, 1, 4)
    # 16 x 4 x 2 at 4 tiles and groups of 64 spills on sm_90 (plain): 16 x 4 x 4 does not
    # and comes before 8 warps
    assert chosen["90", False, 4, 64, 1, 4096] == C.RowsConfig(16, 4, 1, 4)


@needs_nvrtc
def test_glu_rule_forms_compile_without_spilling():
    """The GLU variant (silu(gate) * up in the sums' epilogue) takes the product's own form
    (the same warps sum each output: the same bits); at 1-16 rows of Llama-3-8B's gate_up
    (g128) and SmolLM2's (K = 576: 4 tiles, g32), on sm_80 and sm_90, plain and
    dependent, it compiles in those forms to another cubin than the product's, kept in
    registers (NVRTC 12.9.86) except where the product's own form spills too (4 rows at 4
    tiles and groups of 32 on sm_80, where every form does: test_rule_forms_do_not_spill)."""
    spilled = set()
    for arch, pdl in [("80", False), ("90", False), ("90", True)]:
        for n, k, tiles, group in [(28672, 4096, 8, 128), (3072, 576, 4, 32)]:
            for m in (1, 4, 8, 16):
                cfg = C.rule_form(m, n, k, tiles, group, 132, 232448, arch, pdl)
                glu = C.launch_defines(tiles, group, cfg, arch, pdl, glu=True)
                assert glu["GLU"] == 1 and cfg.nb % 2 == 0
                plain = C.launch_defines(tiles, group, cfg, arch, pdl)
                if C.spill_bytes(arch, glu):
                    spilled.add((arch, pdl, tiles, group, m))
                    assert C.spill_bytes(arch, plain), (arch, pdl, n, m, cfg)
                assert C.compile_cubin(arch, glu) != C.compile_cubin(arch, plain)
    assert spilled == {("80", False, 4, 32, 4)}
    # bulk copies and staggered k-tiles (measured options, off) compile with GLU too
    cfg = C.RowsConfig(8, 4, 1, 4)
    for tma, stagger in [(True, False), (False, True)]:
        cubin = C.compile_cubin("90", C.defines(8, 128, cfg, tma=tma, stagger=stagger, glu=True))
        assert cubin[:4] == b"\x7fELF"


@needs_nvrtc
@pytest.mark.parametrize("refused", [("--no-such-option",), ("--ptxas-options=-bogus",)])
def test_an_nvrtc_without_the_spill_report_keeps_the_rule(refused, monkeypatch):
    """Where NVRTC (or ptxas) refuses the report's option, the kernel still compiles and
    the rule's form stands: no report, no fallback. With the report, the cubin is the one
    compiled without it."""
    d = C.defines(4, 32, C.RowsConfig(8, 4, 1, 2), pdl=True)
    key = tuple(sorted(d.items()))
    C._compiled.cache_clear()
    try:
        assert C._compiled("90", key)[0] == C.compile_cubin("90", d)
        assert C.spill_bytes("90", d) == 16
        C._compiled.cache_clear()
        monkeypatch.setattr(C, "PTXAS_REPORT", refused)
        assert C.spill_bytes("90", d) is None
        assert C._compiled("90", key)[0] == C.compile_cubin("90", d)
        assert C.rule_form(1, 28672, 4096, 4, 32, 132, 232448, "90", True).stages == 2
    finally:
        C._compiled.cache_clear()


def test_rule_form_takes_the_first_that_does_not_spill_else_the_least(monkeypatch):
    """The order: the rule's form, 4 stages, 8 warps, both; every candidate fitted to the
    device's shared memory (spill counts stood in by a table)."""
    table = {}
    monkeypatch.setattr(C, "spill_bytes", lambda arch, d: table[d["WARPS"], d["STAGES"]])

    def form(**spills):
        table.clear()
        table.update({(int(w[1:3]), int(w[4])): v for w, v in spills.items()})
        return C.rule_form(1, 4096, 4096, 8, 128, 132, 232448, "90", True)

    assert form(w16s2=0) == C.RowsConfig(16, 4, 1, 2)
    assert form(w16s2=8, w16s4=0) == C.RowsConfig(16, 4, 1, 4)
    assert form(w16s2=8, w16s4=8, w08s2=0) == C.RowsConfig(8, 4, 1, 2)
    assert form(w16s2=8, w16s4=8, w08s2=8, w08s4=0) == C.RowsConfig(8, 4, 1, 4)
    assert form(w16s2=24, w16s4=16, w08s2=8, w08s4=16) == C.RowsConfig(8, 4, 1, 2)
    assert form(w16s2=8, w16s4=16, w08s2=8, w08s4=8) == C.RowsConfig(16, 4, 1, 2)  # a tie
    # on a 99 KiB device the 4-stage 16-warp candidate is fitted (fewer stages or warps)
    table.update({(16, 2): 8, (16, 4): 0, (8, 2): 8, (8, 4): 8, (16, 3): 0, (16, 1): 0,
                  (8, 3): 0})
    small = C.rule_form(1, 4096, 4096, 8, 128, 132, 101376, "90", True)
    assert small.smem_bytes(8, 128) <= 101376 and small != C.RowsConfig(16, 4, 1, 4)
    # a rule form of 8 warps already (a grid of several waves): each candidate asked once
    asked = []
    monkeypatch.setattr(C, "spill_bytes", lambda arch, d: asked.append(
        (d["WARPS"], d["STAGES"])) or 8)
    assert C.rule_form(1, 28672, 4096, 8, 128, 132, 232448, "90", True) == \
        C.RowsConfig(8, 4, 1, 2)
    assert asked == [(8, 2), (8, 4)]


def test_k_pair_forms():
    """A k-pair form (KP): up to 4 rows, no persist; its shared memory holds x's rows whole
    (an even number of k-tiles), so it needs K; its label ends in k."""
    cfg = C.RowsConfig(8, 4, 1, 2, kpair=True)
    assert cfg.label() == "w8nb4s2r1k" and C.defines(8, 128, cfg)["KP"] == 1
    assert C.defines(8, 128, C.RowsConfig(8, 4, 1, 2))["KP"] == 0
    with pytest.raises(ValueError, match="K"):
        cfg.ring_bytes(8, 128)
    slots = 8 * 2 * (2 * 32 * 4 + 2 * 1 * 8) * 4
    assert cfg.ring_bytes(8, 128, 4096) == slots + 32 * (64 + 4) * 4
    assert cfg.ring_bytes(8, 128, 640) == slots + 6 * (64 + 4) * 4  # 5 k-tiles: 6 held
    assert cfg.smem_bytes(8, 128, 4096) > cfg.ring_bytes(8, 128, 4096)
    reg = C.RowsConfig(8, 4, 1, 2, kpair=2)  # straight into registers: no ring
    assert reg.label() == "w8nb4s2r1kr" and C.defines(8, 128, reg)["KP"] == 2
    assert reg.ring_bytes(8, 128, 4096) == 32 * (64 + 4) * 4
    with pytest.raises(ValueError, match="kpair"):
        C.RowsConfig(kpair=3)
    with pytest.raises(ValueError, match="4 rows"):
        C.RowsConfig(8, 4, 8, 2, kpair=True)
    with pytest.raises(ValueError, match="persist"):
        C.RowsConfig(8, 4, 1, 2, kpair=True, persist=True)


@needs_nvrtc
def test_rule_form_reads_the_device(monkeypatch):
    """A launch's form from the device's SMs, shared memory and architecture (an H200's
    here, faked: the same glue a GPU runs), once a shape and launch kind."""
    class Props:
        multi_processor_count, shared_memory_per_block_optin, major, minor = 132, 232448, 9, 0

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props)
    C._rule_form.cache_clear()
    try:
        assert C._rule_form(0, 1, 4096, 4096, 8, 128, True) == C.RowsConfig(16, 4, 1, 2)
        assert C._rule_form(0, 3, 28672, 4096, 4, 32, True) == C.RowsConfig(8, 4, 4, 4)
        Props.multi_processor_count = 100  # o's 128 blocks: more than one an SM
        assert C._rule_form(0, 1, 4096, 4096, 8, 128, False) == C.RowsConfig(8, 4, 1, 2)
        # KPAIR (a measurement): calls of up to 4 rows take the k-pair form it gives
        monkeypatch.setattr(C, "KPAIR", lambda rows, n, k: (8, 1 if n < 4 * k else 4, 3))
        assert C._rule_form(0, 2, 28672, 4096, 8, 128, True, C._switches()) == \
            C.RowsConfig(8, 4, 2, 3, kpair=True)
        assert C._rule_form(0, 1, 4096, 4096, 8, 128, True, C._switches()) == \
            C.RowsConfig(8, 1, 1, 3, kpair=True)
        assert not C._rule_form(0, 8, 4096, 4096, 8, 128, True, C._switches()).kpair
    finally:
        C._rule_form.cache_clear()


@needs_nvrtc
@pytest.mark.parametrize("cfg", [C.RowsConfig(8, 4, 1, 4), C.RowsConfig(8, 4, 8, 4, persist=True),
                                 C.RowsConfig(4, 2, 16, 4), C.RowsConfig(8, 4, 1, 2, kpair=True),
                                 C.RowsConfig(8, 4, 1, 3, kpair=2)],
                         ids=C.RowsConfig.label)
def test_dependent_launch_form_waits_once(cfg, tmp_path):
    """PDL: one griddepcontrol.wait (ACQBULK) and one launch_dependents (PREEXIT), the
    wait after the words' first copies and before x's; no local memory."""
    sass = sass_of(C.compile_cubin("90", C.defines(8, 128, cfg, pdl=True)), tmp_path)
    if sass is None:
        pytest.skip("nvdisasm (triton's) not installed")
    assert sass.count("ACQBULK") == 1 and sass.count("PREEXIT") == 1, cfg
    assert not re.search(r"\b(LDL|STL)\b", sass)
    wait = sass.index("ACQBULK")
    before = "LDG.E.NA.128.CONSTANT" if cfg.kpair == 2 else "LDGSTS"  # (2: registers)
    assert before in sass[:wait] and "LDGSTS" in sass[wait:]  # words before, x after


@needs_nvrtc
def test_compile_error_names_the_source_and_log():
    with pytest.raises(RuntimeError, match=r"could not compile int4_rows\.cu.*"):
        C.compile_cubin("90", {}, source="__global__ void f() { undefined_thing(); }")


def test_no_nvrtc_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(C, "nvrtc", lambda: None)
    with pytest.raises(RuntimeError, match="nvidia-cuda-nvrtc"):
        C.compile_cubin("90", C.defines(8, 128, C.RowsConfig()))


def test_not_available_off_cuda():
    assert WT.int4_rows_ok(torch.device("cpu")) is False


def test_rows_rule():
    """The decode rows go to int4_rows where it runs, up to ROWS_MAX_M; past that, and
    where it does not run, the former rule (tinygemm, the tiles, dequantize)."""
    n, k = 4096, 4096
    for m in range(1, WT.ROWS_MAX_M + 1):
        assert WT.int4_product(m, n, k, cuda_rows=True) == "rows"
        assert WT.int4_product(m, n, k) == ("tinygemm" if m <= WT.TINYGEMM_MAX_M else "mma")
    assert WT.ROWS_MAX_M <= C.MAX_ROWS
    m = WT.ROWS_MAX_M + 1
    assert WT.int4_product(m, n, k, cuda_rows=True) == WT.int4_product(m, n, k)
    assert [C.rows_config(m, n, k).rows for m in (1, 2, 3, 5, 8, 9, 16)] == \
        [1, 2, 4, 8, 8, 16, 16]
    # W is the mma's A operand up to 8 rows (two n-tiles an mma), x past that
    assert [C.rows_config(m, n, k).a_w for m in (1, 8, 9)] == [True, True, False]
    assert not C.RowsConfig(4, 3, 1, 4).a_w and not C.RowsConfig(w_as_a=False).a_w
    # up to 4 rows: 2 stages, and 16 warps where the grid is at most one block an SM and
    # K >= 4 096 (Llama-3-8B's o and down on 132 SMs), else 8; 5-8 rows: 8 warps, 4 stages
    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
    assert [C.rows_config(1, n, k).warps for n, k in shapes] == [8, 16, 8, 16]
    assert [C.rows_config(4, n, k, sms=127).warps for n, k in shapes] == [8, 8, 8, 8]
    assert C.rows_config(1, 576, 576).warps == 8  # SmolLM2's o: 9 k-tiles, fewer than 16
    assert C.rows_config(1, 4096, 4095).warps == 8
    assert {(C.rows_config(m, n, k).nb, C.rows_config(m, n, k).stages)
            for m in (1, 2, 3, 4) for n, k in shapes} == {(4, 2)}
    assert {(C.rows_config(m, n, k).warps, C.rows_config(m, n, k).stages)
            for m in (5, 8) for n, k in shapes} == {(8, 4)}
    # persistent blocks only at 5-8 rows of a wide weight (gate_up: several waves of blocks)
    assert [C.rows_config(m, 28672, 4096).persist for m in (1, 4, 5, 8, 9)] == \
        [False, False, True, True, False]
    assert not any(C.rows_config(8, n, k).persist
                   for n, k in [(6144, 4096), (4096, 4096), (4096, 14336)])


def test_source_ships_with_the_package():
    assert C.SOURCE.exists()
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"*.cu"' in pyproject


def test_rule_fits_smaller_shared_memory():
    """On a 99 KiB device (A10, L4) the rule's 8-row forms drop stages, then warps, until
    a block fits; on an H200's 227 KiB they stay as chosen."""
    for n, k in [(4096, 4096), (4096, 14336), (28672, 4096), (6144, 4096)]:
        for group in (32, 128):
            for m in (1, 8, 16):
                cfg = C.rows_config(m, n, k)
                assert cfg.fit(8, group, 232448) == cfg
                small = cfg.fit(8, group, 101376)
                assert small.smem_bytes(8, group) <= 101376
                assert (small.rows, small.nb) == (cfg.rows, cfg.nb)
                assert small.stages >= 2 and small.warps >= 1
    big = C.RowsConfig(8, 2, 8, 4)
    assert big.smem_bytes(8, 128) > 101376 and big.fit(8, 128, 101376).stages < 4


def test_zero_rows_do_not_take_the_kernel():
    assert WT.int4_product(0, 4096, 4096, cuda_rows=True) == WT.int4_product(0, 4096, 4096)


def test_launch_names_what_is_wrong_before_any_gpu_work():
    x = torch.zeros(2, 256, dtype=torch.float16)
    packed = torch.zeros(4, 2, 32, 4, dtype=torch.int32)
    sz = torch.zeros(2, 32, 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16.*one CUDA device"):
        C.launch(x, packed, sz, 32, 128, 8)
    with pytest.raises(ValueError, match=r"packed must be .*\(4, 2, 32, 4\)"):
        C.launch(x.bfloat16(), packed[:, :1], sz, 32, 128, 8)
    with pytest.raises(ValueError, match="x has 17 rows"):
        C.launch(torch.zeros(17, 256, dtype=torch.bfloat16), packed, sz, 32, 128, 8)
    shifted = torch.zeros(packed.numel() + 1, dtype=torch.int32)[1:].view(packed.shape)
    with pytest.raises(ValueError, match="16-byte boundary"):
        C.launch(x.bfloat16(), shifted, sz, 32, 128, 8)


@needs_nvrtc
def test_rope_forms_compile_without_local_memory(tmp_path):
    """ROPE (q and k rotated in the epilogue): the rule's forms for Llama-3-8B's q | k | v at
    1-16 rows as dependent launches on sm_90 (whose spill check compiles the ROPE kernel:
    at one row 8 x 4 x 2 spills there, so it takes 8 x 4 x 4) and plain on sm_80, and the
    k-pair forms: no spills, no local memory."""
    for arch, pdl in (("90", True), ("80", False)):
        forms = {C.rule_form(m, 6144, 4096, 8, 128, 132, 232448, arch, pdl, rope=128)
                 for m in (1, 2, 4, 8, 16)}
        if arch == "90":
            assert C.rule_form(1, 6144, 4096, 8, 128, 132, 232448, "90", True, rope=128) == \
                C.RowsConfig(8, 4, 1, 4)
        for cfg in sorted(forms, key=C.RowsConfig.label) + [
                C.RowsConfig(8, 4, 1, 2, kpair=1), C.RowsConfig(8, 2, 1, 3, kpair=2)]:
            d = C.defines(8, 128, cfg, pdl=pdl, rope=128)
            assert C.spill_bytes(arch, d) in (0, None), (arch, cfg)
            sass = sass_of(C.compile_cubin(arch, d), tmp_path)
            assert sass is None or not re.search(r"\b(LDL|STL)\b", sass), (arch, cfg)


def test_rope_arguments_are_checked():
    """launch's rope (cos, sin, rot): what is wrong is named before any GPU work."""
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    cs = torch.zeros(2, 128, dtype=torch.bfloat16)
    assert C._check_rope(None, x, 1024, False) == 0
    assert C._check_rope((cs, cs, 768), x, 1024, False) == 128
    for rope, n, glu, words in [((cs, cs, 768), 1024, True, "gate | up"),
                                ((cs.float(), cs, 768), 1024, False, "cos must be bfloat16"),
                                ((cs, cs[:1], 768), 1024, False, "sin must be"),
                                ((cs, cs, 700), 1024, False, "multiple"),
                                ((cs, cs, 0), 1000, False, "dividing N")]:
        with pytest.raises(ValueError, match=words):
            C._check_rope(rope, x, n, glu)


@needs_nvrtc
def test_kv_forms_compile_without_local_memory(tmp_path):
    """KVW (k and v also stored in the paged cache, with ROPE): the rule's forms for
    Llama-3-8B's q | k | v at 1-16 rows as dependent launches on sm_90 (the spill check
    compiles the KVW kernel), with the norm in the prologue too, plain on sm_80, and a
    k-pair form: no spills, no local memory."""
    for arch, pdl in (("90", True), ("80", False)):
        for norm in (False, True):
            forms = {C.rule_form(m, 6144, 4096, 8, 128, 132, 232448, arch, pdl, norm=norm,
                                 rope=128, kvw=True) for m in ((1, 2, 4) if norm else
                                                               (1, 2, 4, 8, 16))}
            for cfg in sorted(forms, key=C.RowsConfig.label) + [
                    C.RowsConfig(8, 2, 1, 3, kpair=2)]:
                d = C.defines(8, 128, cfg, pdl=pdl, norm=norm, rope=128, kvw=True)
                assert C.spill_bytes(arch, d) in (0, None), (arch, cfg, norm)
                sass = sass_of(C.compile_cubin(arch, d), tmp_path)
                assert sass is None or not re.search(r"\b(LDL|STL)\b", sass), (arch, cfg)


def test_kv_arguments_are_checked():
    """launch's kv (cache, slots, qcols): what is wrong is named before any GPU work."""
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    cs = torch.zeros(2, 64, dtype=torch.bfloat16)
    rope = (cs, cs, 384)  # q 4 heads of 64, k 2, v 2: N 512
    cache = torch.zeros(2, 3, 2, 16, 64, dtype=torch.bfloat16)
    slots = torch.tensor([3, 9])
    assert not C._check_kv(None, x, 512, rope)
    assert C._check_kv((cache, slots, 256), x, 512, rope)
    assert C._check_kv((cache, slots.int(), 256), x, 512, rope)
    for kv, r, words in [((cache, slots, 256), None, "needs rope"),
                         ((cache.float(), slots, 256), rope, "cache must be bfloat16"),
                         ((cache[..., :32], slots, 256), rope, "cache must be"),
                         ((cache, slots, 192), rope, "k's columns 192..384"),
                         ((cache[:, :, :1], slots, 256), rope, "cache's 1 heads"),
                         ((cache, slots[:1], 256), rope, "slots must be"),
                         ((cache, slots.float(), 256), rope, "slots must be")]:
        with pytest.raises(ValueError, match=words):
            C._check_kv(kv, x, 512, r)


def _ptx_params(defines: dict) -> list[str]:
    """The .param types of int4_rows's entry in NVRTC's PTX for these -D values."""
    ptx = C._compile("90", defines, None, C.SOURCE, target="PTX")[0]
    entry = re.search(r"\.entry int4_rows\((.*?)\)", ptx.rstrip(b"\0").decode(), re.S).group(1)
    return [re.search(r"\.param \.(\w+)", p).group(1) for p in entry.split(",")]


@needs_nvrtc
@pytest.mark.parametrize("norm,epilogue", [(False, "rope"), (False, "rope+kv"), (True, ""),
                                           (True, "rope"), (True, "rope+kv")])
def test_launches_pass_the_parameters_of_the_kernel_they_build(norm, epilogue, monkeypatch):
    """launch / launch_norm with rope and kv: the kernel they ask for (its -D values) takes
    exactly the parameters they pass, in order and type (a kernel built for other switches
    reads its parameters from the wrong places: on a GPU an illegal address that ends the
    process). The device's part is stood in for on the CPU; NVRTC's PTX says what the
    kernel takes."""
    import contextlib
    asked, passed = {}, []
    cfg = C.RowsConfig(8, 4, 4, 2)

    def kernel(index, tiles, group, form, **switches):
        asked.update(C.launch_defines(tiles, group, form, "90", **switches))
        return "fn"

    for name, value in (("device_index", lambda d: 0), ("pdl_launch", lambda i: True),
                        ("smem_optin", lambda i: 232448), ("kernel", kernel),
                        ("_rule_form", lambda *a, **kw: cfg), ("_check_args", lambda *a: None),
                        ("_launch_ex", lambda fn, b, t, args, smem, pdl: passed.extend(args))):
        monkeypatch.setattr(C, name, value)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    m, k, group, d = 2, 256, 64, 64
    n, qcols, rot = 8 * d, 4 * d, 6 * d
    x = torch.zeros(m, k, dtype=torch.bfloat16)
    packed = torch.zeros(n // 8, k // 128, 32, 4, dtype=torch.int32)
    sz = torch.zeros(k // group, n, 2, dtype=torch.bfloat16)
    cs = torch.zeros(m, d, dtype=torch.bfloat16)
    rope = (cs, cs, rot) if epilogue else None
    kv = (torch.zeros(2, 3, 2, 16, d, dtype=torch.bfloat16), torch.zeros(m, dtype=torch.int64),
          qcols) if epilogue == "rope+kv" else None
    if norm:
        C.launch_norm(x, x, torch.ones(k, dtype=torch.bfloat16), 1e-5, packed, sz, n, group,
                      8, rope=rope, kv=kv)
    else:  # (without either, launch goes through torch's launcher: its own arguments)
        C.launch(x, packed, sz, n, group, 8, rope=rope, kv=kv)
    assert asked["NORM"] == norm and asked["ROPE"] == (d if rope else 0)
    assert asked["KVW"] == (kv is not None)

    def ptx_type(a) -> str:
        if a is None or isinstance(a, torch.Tensor):
            return "u64"
        return {ctypes.c_float: "f32", ctypes.c_longlong: "u64"}.get(type(a), "u32")
    assert [ptx_type(a) for a in passed] == _ptx_params(asked)


def test_the_norm_forms_fit_the_device_or_are_not_taken(monkeypatch):
    """NORM's x rows sit whole in shared memory: the rule's form sheds warps until it fits
    (Llama-3-8B's q | k | v at 4 rows on a 99 KiB device, K 8 192), and where no form fits
    (K 16 384 there) norm_fits says so, so int4_norm leaves the norm to its own kernel
    rather than raising; on an H200 (227 KiB) both fit."""
    cfg = C.rows_config(4, 6144, 8192).fit(8, 128, 101376, 8192, norm=True)
    assert cfg.warps < C.rows_config(4, 6144, 8192).warps
    assert cfg.smem_bytes(8, 128, 8192, norm=True) <= 101376
    for have, fits in ((101376, {8192: True, 16384: False}),
                       (232448, {8192: True, 16384: True})):
        monkeypatch.setattr(C, "smem_optin", lambda i: have)
        monkeypatch.setattr(C, "pdl_launch", lambda i: False)
        monkeypatch.setattr(C, "_rule_form", lambda index, rows, n, k, tiles, group, *a, **kw:
                            C.rows_config(rows, n, k).fit(tiles, group, have, k, norm=True))
        for k, want in fits.items():
            assert C.norm_fits(4, 6144, k, 8, 128, 0) == want, (have, k)
