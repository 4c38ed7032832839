"""Tests of dsv3_lab.mla: RMSNorm, causal mask, MLA naive == absorbed, cached decoding, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3_lab.config import ModelArgs, attention_params
from dsv3_lab.mla import MLA, RMSNorm, causal_mask
from dsv3_lab.rope import positions, precompute_freqs_cis, softmax_scale


def small_args(**overrides) -> ModelArgs:
    values = dict(dim=32, n_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
                  qk_rope_head_dim=4, v_head_dim=6, max_batch_size=3, max_seq_len=24,
                  original_seq_len=8)  # YaRN on, so the mscale² correction is exercised
    values.update(overrides)
    return ModelArgs.tiny(**values)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, norms included (default init leaves them at 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(p.shape[1]))
    return module


def pair(args: ModelArgs, seed: int = 0, dtype=torch.float64) -> tuple[MLA, MLA]:
    naive = randomize(MLA(args, "naive"), seed).to(dtype)
    absorb = MLA(args, "absorb").to(dtype)
    absorb.load_state_dict(naive.state_dict())
    return naive, absorb


def run(attn: MLA, x: torch.Tensor, freqs: torch.Tensor, start_pos: int) -> torch.Tensor:
    seqlen = x.shape[1]
    return attn(x, start_pos, positions(freqs, start_pos, seqlen), causal_mask(seqlen, start_pos))


def chunked(attn: MLA, x: torch.Tensor, freqs: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Feed x [B, S, dim] in consecutive chunks of the given sizes, return all outputs."""
    outs, start = [], 0
    for n in sizes:
        outs.append(run(attn, x[:, start:start + n], freqs, start))
        start += n
    return torch.cat(outs, dim=1)


def reference(attn: MLA, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """MLA written out per head and per position with plain matrix products (Eq. 1-11)."""
    H, dn, dr, dv = attn.n_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        h = x[b]  # [S, dim]
        if attn.q_lora_rank:
            q = attn.q_norm(h @ attn.wq_a.weight.T) @ attn.wq_b.weight.T
        else:
            q = h @ attn.wq.weight.T
        q = q.view(-1, H, dn + dr)  # [S, H, dn + dr]
        kv = h @ attn.wkv_a.weight.T  # [S, kv_lora_rank + dr]
        c_kv = attn.kv_norm(kv[:, :attn.kv_lora_rank])  # [S, c]
        rot = lambda t: torch.view_as_real(  # rotate adjacent pairs by e^{i m w}
            torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2))
            * freqs[: t.shape[0]].to(torch.complex128).view(t.shape[0], *[1] * (t.dim() - 2), -1)
        ).flatten(-2)
        k_pe = rot(kv[:, attn.kv_lora_rank:])  # [S, dr], one head
        up = (c_kv @ attn.wkv_b.weight.T).view(-1, H, dn + dv)  # [S, H, dn + dv]
        heads = []
        for i in range(H):
            q_i = torch.cat([q[:, i, :dn], rot(q[:, i, dn:])], dim=-1)  # [S, dn + dr]
            k_i = torch.cat([up[:, i, :dn], k_pe], dim=-1)  # [S, dn + dr]
            s = q_i @ k_i.T * attn.softmax_scale  # [S, S]
            s = s + torch.full_like(s, float("-inf")).triu(1)
            heads.append(s.softmax(-1) @ up[:, i, dn:])  # [S, dv]
        out[b] = torch.cat(heads, dim=-1) @ attn.wo.weight.T
    return out


configs = st.fixed_dictionaries(dict(
    n_heads=st.integers(1, 4),
    q_lora_rank=st.sampled_from([0, 4, 12]),
    kv_lora_rank=st.integers(2, 12),
    qk_nope_head_dim=st.integers(1, 8),
    qk_rope_head_dim=st.sampled_from([2, 4, 6]),
    v_head_dim=st.integers(1, 8),
))


# ---------------------------------------------------------------- naive == absorbed
@settings(max_examples=25, deadline=None)
@given(cfg=configs, sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       bsz=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_naive_equals_absorbed_any_chunks(cfg, sizes, bsz, seed):
    args = small_args(**cfg)
    naive, absorb = pair(args, seed)
    x = torch.randn(bsz, sum(sizes), args.dim, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    freqs = precompute_freqs_cis(args)
    a, b = chunked(naive, x, freqs, sizes), chunked(absorb, x, freqs, sizes)
    assert a.shape == b.shape == x.shape
    assert (a - b).abs().max() <= 1e-10
    # and both equal one forward over the whole sequence (which overwrites the cache)
    assert (run(naive, x, freqs, 0) - b).abs().max() <= 1e-10


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_float32_naive_equals_absorbed(q_lora_rank):
    args = small_args(q_lora_rank=q_lora_rank)
    naive, absorb = pair(args, seed=1, dtype=torch.float32)
    x = torch.randn(2, 10, args.dim, generator=torch.Generator().manual_seed(0))
    freqs = precompute_freqs_cis(args)
    a, b = chunked(naive, x, freqs, [7, 1, 2]), chunked(absorb, x, freqs, [7, 1, 2])
    assert (a - b).abs().max() <= 1e-5


def test_odd_latent_and_head_dims():
    # q_pe and k_pe then start at odd offsets of their projections (RoPE views pairs as complex)
    args = small_args(kv_lora_rank=5, qk_nope_head_dim=3, q_lora_rank=0)
    naive, absorb = pair(args, seed=2)
    x = torch.randn(1, 1, args.dim, dtype=torch.float64)
    freqs = precompute_freqs_cis(args)
    assert (run(naive, x, freqs, 0) - run(absorb, x, freqs, 0)).abs().max() <= 1e-10


@pytest.mark.parametrize("impl", ["naive", "absorb"])
@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_matches_plain_reference(impl, q_lora_rank):
    args = small_args(q_lora_rank=q_lora_rank)
    attn = randomize(MLA(args, impl), 3).double()
    x = torch.randn(2, 9, args.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    freqs = precompute_freqs_cis(args)
    with torch.no_grad():
        got, want = run(attn, x, freqs, 0), reference(attn, x, freqs)
    assert (got - want).abs().max() <= 1e-10
    assert args.yarn_enabled
    assert attn.softmax_scale == softmax_scale(args) != args.qk_head_dim ** -0.5


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_prefill_then_decode_equals_full(impl):
    args = small_args()
    attn = randomize(MLA(args, impl), 5).double()
    x = torch.randn(3, 16, args.dim, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(6))
    freqs = precompute_freqs_cis(args)
    with torch.no_grad():
        full = run(attn, x, freqs, 0)
        steps = chunked(attn, x, freqs, [5] + [1] * 11)  # prefill 5, then one token per step
    assert (full - steps).abs().max() <= 1e-10


def test_gradients_flow_through_a_training_forward():
    args = small_args()
    attn = randomize(MLA(args, "absorb"), 7)
    x = torch.randn(2, 6, args.dim, requires_grad=True)
    run(attn, x, precompute_freqs_cis(args), 0).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- structure and caches
def test_submodule_names_no_biases_and_parameter_count():
    with_q = MLA(small_args())
    without_q = MLA(small_args(q_lora_rank=0))
    assert {n for n, _ in with_q.named_children()} == {"wq_a", "q_norm", "wq_b", "wkv_a",
                                                       "kv_norm", "wkv_b", "wo"}
    assert {n for n, _ in without_q.named_children()} == {"wq", "wkv_a", "kv_norm", "wkv_b", "wo"}
    for m in (with_q, without_q):
        assert all(not isinstance(c, torch.nn.Linear) or c.bias is None for c in m.modules())
    assert sum(p.numel() for p in with_q.parameters()) == attention_params(small_args())
    assert sum(p.numel() for p in without_q.parameters()) == attention_params(
        small_args(q_lora_rank=0))


def test_671b_attention_parameters():
    with torch.device("meta"):
        attn = MLA(ModelArgs.v3_671b())
    assert sum(p.numel() for p in attn.parameters()) == 187_107_328


def test_caches_are_non_persistent_buffers_of_the_right_size():
    args = small_args()
    naive, absorb = MLA(args, "naive"), MLA(args, "absorb")
    B, T, H = args.max_batch_size, args.max_seq_len, args.n_heads
    assert naive.k_cache.shape == (B, T, H, args.qk_head_dim)
    assert naive.v_cache.shape == (B, T, H, args.v_head_dim)
    assert absorb.kv_cache.shape == (B, T, args.kv_lora_rank)
    assert absorb.pe_cache.shape == (B, T, args.qk_rope_head_dim)
    for m in (naive, absorb):
        assert not any("cache" in k for k in m.state_dict())
    assert naive.cache_bytes() == B * T * H * (args.qk_head_dim + args.v_head_dim) * 4
    assert absorb.cache_bytes() == B * T * (args.kv_lora_rank + args.qk_rope_head_dim) * 4
    assert absorb.double().cache_bytes() == 2 * B * T * (args.kv_lora_rank
                                                         + args.qk_rope_head_dim) * 4


def test_absorbed_cache_holds_normalised_latent_and_rotated_key():
    args = small_args()
    attn = randomize(MLA(args, "absorb"), 8).double()
    x = torch.randn(1, 5, args.dim, dtype=torch.float64)
    freqs = precompute_freqs_cis(args)
    with torch.no_grad():
        run(attn, x, freqs, 0)
        kv = attn.wkv_a(x)
    c_kv = attn.kv_norm(kv[..., :args.kv_lora_rank])
    assert torch.allclose(attn.kv_cache[:1, :5], c_kv)
    assert not torch.allclose(attn.pe_cache[:1, :5], kv[..., args.kv_lora_rank:])  # rotated
    assert torch.allclose(attn.pe_cache[:1, :1], kv[:, :1, args.kv_lora_rank:])  # position 0


# ---------------------------------------------------------------- RMSNorm and mask
def test_rmsnorm_formula_and_scale_invariance():
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(4, 6, dtype=torch.float64)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.arange(1.0, 7.0)
    assert torch.allclose(norm(x), want.double())
    assert torch.allclose(norm(1000 * x), norm(x))  # c_kv's scale does not depend on h's
    with pytest.raises(ValueError, match="last dimension 6"):
        norm(torch.randn(2, 5))


def test_causal_mask():
    assert causal_mask(1, 7) is None
    m = causal_mask(3, 2)
    assert m.shape == (3, 5)
    allowed = torch.isfinite(m)
    assert allowed.tolist() == [[True] * 3 + [False] * 2, [True] * 4 + [False],
                                [True] * 5]
    assert (m[allowed] == 0).all()


# ---------------------------------------------------------------- errors
def test_errors():
    args = small_args()
    attn = MLA(args)
    freqs = precompute_freqs_cis(args)
    with pytest.raises(ValueError, match="attn_impl"):
        MLA(args, "flash")
    with pytest.raises(ValueError, match="larger than the cache"):
        run(attn, torch.randn(args.max_batch_size + 1, 2, args.dim), freqs, 0)
    with pytest.raises(ValueError, match="past the cache"):
        long = precompute_freqs_cis(small_args(max_seq_len=2 * args.max_seq_len))
        run(attn, torch.randn(1, 2, args.dim), long, args.max_seq_len - 1)
    with pytest.raises(ValueError, match="past the cache"):
        attn(torch.randn(1, 4, args.dim), args.max_seq_len - 2, freqs[:4], None)
    with pytest.raises(ValueError, match="dim=32"):
        attn(torch.randn(1, 2, 31), 0, freqs[:2], None)
    with pytest.raises(ValueError, match="freqs_cis"):
        attn(torch.randn(1, 2, args.dim), 0, freqs[:3], None)
    with pytest.raises(ValueError, match="mask"):
        attn(torch.randn(1, 3, args.dim), 0, freqs[:3], causal_mask(3, 1))


def test_bad_inputs():
    args = small_args()
    attn, freqs = MLA(args), precompute_freqs_cis(args)
    norm = RMSNorm(8)
    with pytest.raises(TypeError, match="RMSNorm: expected a torch.float32"):
        norm(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="RMSNorm: expected a torch.float32"):
        norm(torch.ones(2, 8).half())
    for bad in (torch.zeros(1, 2, args.dim, dtype=torch.long),
                torch.zeros(1, 2, args.dim, dtype=torch.bfloat16)):
        with pytest.raises(TypeError, match=r"MLA: expected a torch.float32 input"):
            attn(bad, 0, freqs[:2], causal_mask(2))
    with pytest.raises(ValueError, match="at least one sequence and one position"):
        attn(torch.zeros(1, 0, args.dim), 0, freqs[:0], None)
    with pytest.raises(ValueError, match="at least one sequence and one position"):
        attn(torch.zeros(0, 2, args.dim), 0, freqs[:2], causal_mask(2))
    with pytest.raises(TypeError, match="MLA: expected a dsv3_lab.config.ModelArgs"):
        MLA(vars(args))


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_decode_may_not_read_unwritten_cache_positions(impl):
    args = small_args()
    attn, freqs = MLA(args, impl), precompute_freqs_cis(args)
    x = torch.randn(2, 6, args.dim)
    with pytest.raises(ValueError, match="never written"):  # no prefill yet
        attn(x[:, :1], 3, positions(freqs, 3, 1), None)
    attn(x[:, :4], 0, positions(freqs, 0, 4), causal_mask(4))  # prefill positions 0..3
    attn(x[:, 4:5], 4, positions(freqs, 4, 1), None)  # next position: fine
    with pytest.raises(ValueError, match=r"cache holds positions 0\.\.4 of 2 sequences"):
        attn(x[:, 5:6], 6, positions(freqs, 6, 1), None)  # skips position 5
    with pytest.raises(ValueError, match="never written"):  # a third sequence was never filled
        attn(torch.randn(3, 1, args.dim), 5, positions(freqs, 5, 1), None)
    attn(x[:, 2:3], 2, positions(freqs, 2, 1), None)  # a rollback rewrites position 2 ...
    with pytest.raises(ValueError, match="never written"):  # ... and invalidates 3, 4
        attn(x[:, 4:5], 4, positions(freqs, 4, 1), None)
