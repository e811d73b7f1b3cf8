"""Whole-step costs from planning.profile: the numbers `bench --shape` divides by."""

import pytest

from llamadist.config import named_shape
from llamadist.planning.profile import decode_step_bytes, prefill_flops, profile

# SmolLM2-135M (tied head): 134,515,008 parameters; hidden 576; 30 layers of 3 KV heads x 64.
SMOL_PARAMS = 134_515_008


def test_decode_step_bytes_smollm2_by_hand():
    prof = profile(named_shape("smollm2-135m"), dtype="float32", seq_len=256)
    # No context: every parameter once (tied matrix once) plus one embedding row.
    assert decode_step_bytes(prof, 1, 0) == (SMOL_PARAMS + 576) * 4
    # KV: 30 layers x (K + V) x 3 heads x 64 x 4 bytes = 46,080 bytes per cached position.
    kv = 30 * 2 * 3 * 64 * 4
    assert decode_step_bytes(prof, 8, 100) == (SMOL_PARAMS + 8 * 576) * 4 + 8 * 100 * kv
    # A mean context over decode steps is fractional.
    assert decode_step_bytes(prof, 2, 10.5) == pytest.approx((SMOL_PARAMS + 2 * 576) * 4
                                                             + 2 * 10.5 * kv)


def test_decode_step_bytes_untied_reads_head_not_embedding():
    prof = profile(named_shape("llama3-8b"), dtype="bfloat16", seq_len=1024)
    # Untied: the embedding is gathered (one row), the 128256 x 4096 head is read whole.
    assert decode_step_bytes(prof, 1, 0) == prof.total_weight_bytes - prof.embed.weight_bytes \
        + 4096 * 2


def test_prefill_flops_matches_profile_at_its_seq_len_and_scales():
    cfg = named_shape("smollm2-135m")
    prof = profile(cfg, seq_len=64)
    # At the profile's own seq_len, one sequence costs what the profile's rows say.
    assert prefill_flops(prof, 1, 64) == sum(r.prefill_flops for r in prof.rows)
    assert prefill_flops(prof, 3, 64) == 3 * prefill_flops(prof, 1, 64)
    # By hand at T=2: projections 2 * matmul params * T per layer, attention 4 * q_size
    # per (query, key) pair with 1 + 2 pairs, head 2 * V * d once.
    matmul = 576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536
    per_layer = 2 * matmul * 2 + 4 * 576 * 3
    assert prefill_flops(prof, 1, 2) == 30 * per_layer + 2 * 49152 * 576
