"""Tests of dsv3_lab.rope: RoPE properties, YaRN frequencies, softmax scale, transformers parity."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3_lab.config import ModelArgs
from dsv3_lab.rope import (
    apply_rotary_emb,
    positions,
    precompute_freqs_cis,
    rope_frequencies,
    softmax_scale,
    yarn_correction_range,
    yarn_mscale,
    yarn_ramp,
)

V3 = ModelArgs.v3_671b()
# a small table with YaRN on (original 64 < max 256) and a 16-dim rotary part
SMALL = ModelArgs.tiny(qk_rope_head_dim=16)
SMALL_PLAIN = ModelArgs.tiny(qk_rope_head_dim=16, original_seq_len=256)  # YaRN off


def rotate(x: torch.Tensor, table: torch.Tensor, pos: int) -> torch.Tensor:
    """Rotate one vector x [d] as if it sat at position pos."""
    return apply_rotary_emb(x.view(1, 1, 1, -1), table[pos : pos + 1]).view(-1)


def vectors(seed: int, *shape: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------- properties (hypothesis)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(0, 127), n=st.integers(0, 127),
       k=st.integers(0, 128), yarn=st.booleans())
def test_relative_position_property(seed, m, n, k, yarn):
    """<R_m q, R_n k> == <R_{m+k} q, R_{n+k} k>: scores depend only on m - n."""
    table = precompute_freqs_cis(SMALL if yarn else SMALL_PLAIN)
    q, key = vectors(seed, 2, 16, dtype=torch.float64)
    s1 = rotate(q, table, m) @ rotate(key, table, n)
    s2 = rotate(q, table, m + k) @ rotate(key, table, n + k)
    # the table is complex64: angles carry float32 rounding, ~1e-7 relative per unit of |q||k|
    assert torch.allclose(s1, s2, atol=2e-5 * q.norm() * key.norm())


def test_relative_position_property_fails_without_rotation_shift():
    """Sanity check that the property above can fail: shifting only q changes the score."""
    table = precompute_freqs_cis(SMALL_PLAIN)
    q, key = vectors(1, 2, 16, dtype=torch.float64)
    s1 = rotate(q, table, 5) @ rotate(key, table, 2)
    s2 = rotate(q, table, 9) @ rotate(key, table, 2)
    assert not torch.allclose(s1, s2, atol=1e-3)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), seq=st.integers(1, 40), start=st.integers(0, 200),
       heads=st.integers(1, 3))
def test_norm_of_every_pair_is_preserved(seed, seq, start, heads):
    table = precompute_freqs_cis(SMALL)
    start = min(start, table.shape[0] - seq)
    x = vectors(seed, 2, seq, heads, 16)
    y = apply_rotary_emb(x, positions(table, start, seq))
    pair_norm = lambda t: t.view(*t.shape[:-1], -1, 2).norm(dim=-1)  # [B, S, H, d/2]
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.allclose(pair_norm(y), pair_norm(x), rtol=1e-5, atol=1e-6)


def test_rotation_equals_block_diagonal_real_matrix():
    """The complex product is the block-diagonal matrix of 2x2 rotations on adjacent pairs."""
    table = precompute_freqs_cis(SMALL)
    freqs = rope_frequencies(SMALL).double()  # [8]
    x = vectors(3, 1, 6, 2, 16, dtype=torch.float64)
    y = apply_rotary_emb(x, table[:6])
    for pos in range(6):
        theta = pos * freqs
        c, s = torch.cos(theta), torch.sin(theta)
        rot = torch.zeros(16, 16, dtype=torch.float64)
        rot[0::2, 0::2] = torch.diag(c)
        rot[0::2, 1::2] = torch.diag(-s)
        rot[1::2, 0::2] = torch.diag(s)
        rot[1::2, 1::2] = torch.diag(c)
        assert torch.allclose(y[0, pos], x[0, pos] @ rot.T, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtype_and_shape_kept_and_computed_in_float32(dtype):
    table = precompute_freqs_cis(SMALL)
    x = vectors(4, 2, 5, 3, 16).to(dtype)
    y = apply_rotary_emb(x, table[:5])
    assert y.dtype == dtype and y.shape == x.shape
    expected = apply_rotary_emb(x.float(), table[:5]).to(dtype)  # float32 math, one rounding
    assert torch.equal(y, expected)


def test_position_zero_is_identity_and_table_shape():
    table = precompute_freqs_cis(SMALL)
    assert table.shape == (SMALL.max_seq_len, SMALL.qk_rope_head_dim // 2)
    assert table.dtype == torch.complex64
    x = vectors(5, 1, 1, 2, 16)
    assert torch.equal(apply_rotary_emb(x, table[:1]), x)


# ---------------------------------------------------------------- YaRN, 671B config
def independent_v3_frequencies() -> list[float]:
    """ω'_i of the 671B config from REFERENCE §2, in float64 with math only."""
    d, theta, s, L = 64, 10000.0, 40.0, 4096

    def corr(r):
        return d * math.log(L / (2 * math.pi * r)) / (2 * math.log(theta))

    low = max(math.floor(corr(32)), 0)
    high = min(math.ceil(corr(1)), d - 1)
    out = []
    for i in range(d // 2):
        w = theta ** (-2 * i / d)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(w / s * ramp + w * (1 - ramp))
    return out


def test_v3_correction_range_and_ramp():
    assert V3.yarn_enabled
    assert yarn_correction_range(V3) == (10, 23)
    ramp = yarn_ramp(10, 23, 32)
    assert torch.all(ramp[:11] == 0) and torch.all(ramp[23:] == 1)
    assert torch.allclose(ramp[11:23], (torch.arange(11, 23) - 10) / 13)


def test_v3_yarn_frequencies_match_independent_computation():
    ours = rope_frequencies(V3)
    ref = torch.tensor(independent_v3_frequencies(), dtype=torch.float64)
    plain = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert ours.dtype == torch.float32 and ours.shape == (32,)
    assert torch.allclose(ours.double(), ref, rtol=1e-6, atol=0)
    assert torch.allclose(ours[:11].double(), plain[:11], rtol=1e-6)  # fast pairs kept
    assert torch.allclose(ours[23:].double(), plain[23:] / 40, rtol=1e-6)  # slow pairs / 40
    between = ours[11:23].double() / plain[11:23]
    assert torch.all((between < 1) & (between > 1 / 40))  # blended
    # the table is exp(j·m·ω'): check a far position against float64 angles
    table = precompute_freqs_cis(V3)
    assert table.shape == (16384, 32)
    m = 12345
    expected = torch.polar(torch.ones(32, dtype=torch.float64), m * ref)
    assert torch.allclose(table[m].to(torch.complex128), expected, atol=2e-3)


def test_no_yarn_when_context_not_extended():
    args = ModelArgs.tiny(qk_rope_head_dim=16, max_seq_len=64, original_seq_len=64)
    plain = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert not args.yarn_enabled
    assert torch.allclose(rope_frequencies(args).double(), plain, rtol=1e-6)
    assert yarn_mscale(args) == 1.0
    assert softmax_scale(args) == (16 + 16) ** -0.5


def test_v3_softmax_scale():
    m = 0.1 * math.log(40) + 1
    assert yarn_mscale(V3) == pytest.approx(1.36889, abs=1e-5)
    assert yarn_mscale(V3) == pytest.approx(m, rel=1e-15)
    assert softmax_scale(V3) == pytest.approx(0.1352338, abs=1e-7)
    assert softmax_scale(V3) == pytest.approx(192**-0.5 * m * m, rel=1e-15)


# ---------------------------------------------------------------- transformers parity
def hf_rotary(args: ModelArgs):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3RotaryEmbedding,
        yarn_apply_mscale,
    )

    config = DeepseekV3Config(
        qk_rope_head_dim=args.qk_rope_head_dim, qk_nope_head_dim=args.qk_nope_head_dim,
        # HF's released config says 163840 = 4096 · 40 (OFFICIAL serves 16384); it only matters
        # for a consistency warning, so give HF the context YaRN is designed for
        max_position_embeddings=int(args.original_seq_len * args.rope_factor),
        rope_parameters=dict(
            rope_type="yarn", rope_theta=args.rope_theta, factor=args.rope_factor,
            original_max_position_embeddings=args.original_seq_len, beta_fast=args.beta_fast,
            beta_slow=args.beta_slow, mscale=args.mscale, mscale_all_dim=args.mscale),
    )
    scaling = yarn_apply_mscale(config.rope_parameters, config.qk_head_dim**-0.5)
    return DeepseekV3RotaryEmbedding(config), scaling


@pytest.mark.parametrize("args", [V3, ModelArgs.tiny()], ids=["671b", "tiny"])
def test_matches_transformers_up_to_pair_permutation(args):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        apply_rotary_pos_emb,
        apply_rotary_pos_emb_interleave,
    )

    rotary, hf_scale = hf_rotary(args)
    d = args.qk_rope_head_dim
    assert rotary.attention_scaling == 1.0  # mscale == mscale_all_dim: cos/sin not rescaled
    assert torch.allclose(rotary.inv_freq, rope_frequencies(args), rtol=1e-6, atol=0)
    assert hf_scale == pytest.approx(softmax_scale(args), rel=1e-12)

    seq, start = 24, args.max_seq_len - 24  # the far end of the table
    pos = torch.arange(start, start + seq)[None]  # [1, S]
    q = vectors(6, 2, seq, 3, d)  # ours: [B, S, H, d]
    k = vectors(7, 2, seq, 1, d)  # one shared k_pe head, as in MLA
    cos, sin = rotary(q, pos)  # [1, S, d]
    q_hf, k_hf = apply_rotary_pos_emb_interleave(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    table = positions(precompute_freqs_cis(args), start, seq)
    q_ours, k_ours = apply_rotary_emb(q, table), apply_rotary_emb(k, table)

    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # [evens | odds]
    atol = 1e-5  # both round the angles m·ω in float32 the same way (measured: 5e-7)
    assert torch.allclose(q_hf.transpose(1, 2), q_ours[..., perm], atol=atol)
    assert torch.allclose(k_hf.transpose(1, 2), k_ours[..., perm], atol=atol)
    # attention scores are identical: the permutation is the same for q and k
    s_hf = torch.einsum("bhsd,bhtd->bhst", q_hf, k_hf.expand_as(q_hf))
    s_ours = torch.einsum("bshd,bthd->bhst", q_ours, k_ours.expand_as(q_ours))
    assert torch.allclose(s_hf, s_ours, atol=atol * d)

    # the half-split (rotate_half) path on de-interleaved inputs is the same permutation
    q_half, _ = apply_rotary_pos_emb(q[..., perm].transpose(1, 2), k[..., perm].transpose(1, 2),
                                     cos, sin)
    assert torch.allclose(q_half.transpose(1, 2), q_ours[..., perm], atol=atol)
    # ... and not the same numbers without the permutation
    assert not torch.allclose(q_half.transpose(1, 2), q_ours, atol=1e-2)


# ---------------------------------------------------------------- errors
def test_odd_rotary_dimension_is_rejected():
    with pytest.raises(ValueError, match="qk_rope_head_dim must be even"):
        ModelArgs.tiny(qk_rope_head_dim=7)
    table = precompute_freqs_cis(SMALL)
    with pytest.raises(ValueError, match="must be even"):
        apply_rotary_emb(torch.zeros(1, 2, 1, 15), table[:2])


def test_positions_past_max_seq_len_are_rejected():
    table = precompute_freqs_cis(SMALL)  # 256 positions
    assert positions(table, 250, 6).shape == (6, 8)
    with pytest.raises(ValueError, match="past max_seq_len=256"):
        positions(table, 250, 7)
    with pytest.raises(ValueError, match="past max_seq_len"):
        positions(table, -1, 2)


def test_bad_inputs_are_rejected():
    table = precompute_freqs_cis(SMALL)
    with pytest.raises(ValueError, match=r"\[batch, seq, heads, d\]"):
        apply_rotary_emb(torch.zeros(2, 16), table[:2])
    with pytest.raises(ValueError, match="freqs_cis of shape"):
        apply_rotary_emb(torch.zeros(1, 3, 1, 16), table[:2])
    with pytest.raises(TypeError, match="floating-point"):
        apply_rotary_emb(torch.zeros(1, 2, 1, 16, dtype=torch.long), table[:2])
    with pytest.raises(TypeError, match="complex"):
        apply_rotary_emb(torch.zeros(1, 2, 1, 16), table[:2].real)


def test_views_at_odd_offsets_and_strides_are_rotated():
    """Slices such as q[..., d_nope:] with an odd d_nope cannot be viewed as complex in place."""
    table = precompute_freqs_cis(SMALL)
    big = vectors(8, 2, 5, 3, 17)
    x = big[..., 1:]  # odd storage offset, odd strides
    expected = apply_rotary_emb(x.contiguous(), table[:5])
    assert torch.equal(apply_rotary_emb(x, table[:5]), expected)
    assert torch.equal(apply_rotary_emb(x.transpose(0, 1).transpose(0, 1), table[:5]), expected)


# ---------------------------------------------------------------- concept diagrams (notebook 01)
def test_rope_diagrams_draw_legibly_and_count_v3_pairs():
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from dsv3_lab.diagrams.rope import draw_rotation, draw_yarn_pairs
    from dsv3_lab.plot import check_legible

    for fig in (draw_rotation(), draw_yarn_pairs()):
        check_legible(fig)  # <= 11 in wide, no text under 9 pt
        plt.close(fig)
    fig = draw_yarn_pairs(V3)
    cells = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)
             and p.get_width() < 1]  # one box per rotary pair
    assert len(cells) == V3.qk_rope_head_dim // 2 == 32
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "pairs 0–10" in texts and "pairs 11–22" in texts and "pairs 23–31" in texts
    plt.close(fig)


def test_yarn_pairs_diagram_needs_yarn_on():
    from dsv3_lab.diagrams.rope import draw_yarn_pairs

    with pytest.raises(ValueError, match="max_seq_len > original_seq_len"):
        draw_yarn_pairs(ModelArgs(max_seq_len=4096))
