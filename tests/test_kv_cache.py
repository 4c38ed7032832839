"""Tests of dsv3_lab.kv_cache: published cache sizes, allocated bytes, three ways to decode."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3_lab.config import ModelArgs
from dsv3_lab.kv_cache import (
    KNOWN,
    AttentionDecoder,
    CacheSpec,
    allocated_cache_bytes,
    decode,
    from_args,
    gqa,
    mha,
    mqa,
)
from dsv3_lab.mla import MLA
from dsv3_lab.model import Transformer, generate
from dsv3_lab.rope import precompute_freqs_cis


# ---------------------------------------------------------------- published numbers
def test_isca_table1_bytes_per_token_bf16():
    assert KNOWN["DeepSeek-V3"].bytes_per_token == 70_272
    assert KNOWN["Qwen-2.5-72B"].bytes_per_token == 327_680
    assert KNOWN["LLaMA-3.1-405B"].bytes_per_token == 516_096


def test_v3_latent_vs_expanded_values():
    v3 = ModelArgs.v3_671b()
    assert from_args(v3, "absorb").values_per_layer == 576
    assert from_args(v3, "naive").values_per_layer == 40_960
    assert from_args(v3, "naive").bytes_per_token == 40_960 * 61 * 2


def test_v2_table1_formulas_and_gqa_equivalent():
    n_h, d_h, n_g, layers = 128, 128, 8, 60
    assert mha("m", layers, n_h, d_h).values_per_token == 2 * n_h * d_h * layers
    assert gqa("g", layers, n_g, d_h).values_per_token == 2 * n_g * d_h * layers
    assert mqa("q", layers, d_h).values_per_token == 2 * d_h * layers
    v2 = KNOWN["DeepSeek-V2"]
    assert v2.values_per_token == 4.5 * d_h * layers
    assert v2.gqa_groups(d_h) == 2.25


def test_v2_93_percent_decomposes_into_elements_and_6_bit_quantisation():
    v2, base = KNOWN["DeepSeek-V2"], KNOWN["DeepSeek-67B"]
    element_ratio = v2.values_per_token / base.values_per_token
    assert round(1 - element_ratio, 3) == 0.822
    quantised = v2.with_bytes(6 / 8).bytes_per_token / base.bytes_per_token
    assert round(1 - quantised, 3) == 0.933


def test_cache_at_128k_context():
    assert KNOWN["DeepSeek-V3"].cache_bytes(128 * 1024) == 70_272 * 131_072
    assert KNOWN["DeepSeek-V3"].cache_bytes(10, batch_size=3) == 70_272 * 30


def test_spec_errors():
    with pytest.raises(ValueError, match="kind"):
        CacheSpec("x", "sparse", 1, 1, 1, 1)
    with pytest.raises(ValueError, match="n_kv_heads"):
        CacheSpec("x", "gqa", 2, 0, 8, 8)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        CacheSpec("x", "mla", 2)
    with pytest.raises(ValueError, match="one key/value head"):
        CacheSpec("x", "mqa", 2, 2, 8, 8)
    with pytest.raises(ValueError, match="bytes_per_element"):
        mha("x", 1, 1, 1, bytes_per_element=0)
    with pytest.raises(ValueError, match="attn_impl"):
        from_args(ModelArgs.tiny(), "flash")


# ---------------------------------------------------------------- allocated bytes
@pytest.mark.parametrize("impl", ["naive", "absorb"])
@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.float64, 8)])
def test_allocated_bytes_match_the_formula(impl, dtype, size):
    args = ModelArgs.tiny(max_batch_size=3, max_seq_len=40)
    model = Transformer(args, attn_impl=impl).to(dtype)
    spec = from_args(args, impl, bytes_per_element=size)
    per_slot = allocated_cache_bytes(model) / (args.max_batch_size * args.max_seq_len)
    assert per_slot == spec.bytes_per_token
    assert allocated_cache_bytes(model) == sum(
        layer.attn.cache_bytes() for layer in model.layers)


# ---------------------------------------------------------------- three ways to decode
def tiny_models(cfg: dict, seed: int) -> dict[str, Transformer]:
    args = ModelArgs.tiny(max_batch_size=2, max_seq_len=32, n_layers=2, **cfg)
    torch.manual_seed(seed)
    ref = Transformer(args, attn_impl="naive").double()
    with torch.no_grad():
        for p in ref.parameters():  # larger weights than the default: sharper logits
            p.mul_(3)
    models = {"recompute": ref}
    for impl in ("naive", "absorb"):
        m = Transformer(args, attn_impl=impl).double()
        m.load_state_dict(ref.state_dict())
        models[impl] = m
    return models


@settings(max_examples=5, deadline=None)
@given(cfg=st.fixed_dictionaries(dict(
    n_heads=st.integers(1, 4), q_lora_rank=st.sampled_from([0, 16]),
    kv_lora_rank=st.sampled_from([8, 16]), qk_nope_head_dim=st.sampled_from([4, 8]),
    qk_rope_head_dim=st.sampled_from([2, 4]), v_head_dim=st.sampled_from([4, 8]))),
    prompt_len=st.integers(1, 6), seed=st.integers(0, 1000))
def test_three_ways_agree(cfg, prompt_len, seed):
    models = tiny_models(cfg, seed)
    prompt = torch.randint(0, 256, (2, prompt_len), generator=torch.Generator().manual_seed(seed))
    steps = 10
    runs = {name: decode(m, prompt, steps, mode="recompute" if name == "recompute" else "cache")
            for name, m in models.items()}
    ref = runs["recompute"]
    assert ref.outputs.shape == (2, prompt_len + steps, 256)
    assert len(ref.step_seconds) == steps
    for name in ("naive", "absorb"):
        assert torch.equal(runs[name].inputs, ref.inputs), name
        assert (runs[name].outputs - ref.outputs).abs().max() <= 1e-9, name
    # greedy decoding is what generate() does, and every output equals one full forward
    assert torch.equal(generate(models["absorb"], prompt, steps), ref.inputs)
    full = models["naive"](ref.inputs[:, :-1], 0)
    assert (full - ref.outputs[:, :-1]).abs().max() <= 1e-9


def test_given_inputs_and_bare_attention_module():
    args = ModelArgs.tiny(max_batch_size=2, max_seq_len=20)
    naive = MLA(args, "naive").double()
    absorb = MLA(args, "absorb").double()
    absorb.load_state_dict(naive.state_dict())
    freqs = precompute_freqs_cis(args)
    x = torch.randn(2, 12, args.dim, dtype=torch.float64)
    out = {}
    for name, attn in (("naive", naive), ("absorb", absorb)):
        step = AttentionDecoder(attn, freqs)
        res = decode(step, x[:, :4], 8, given=x[:, 4:])
        assert torch.equal(res.inputs, x)
        assert res.cache_bytes == attn.cache_bytes()
        out[name] = res.outputs
    whole = AttentionDecoder(naive, freqs)(x, 0)
    assert (out["naive"] - whole).abs().max() <= 1e-10
    assert (out["absorb"] - whole).abs().max() <= 1e-10


# ---------------------------------------------------------------- errors
def test_decode_errors():
    args = ModelArgs.tiny(max_batch_size=2, max_seq_len=12)
    model = Transformer(args)
    prompt = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="past the cache"):
        decode(model, prompt, 8)  # 13 positions > 12
    with pytest.raises(ValueError, match="past the cache"):
        decode(model, torch.zeros(1, 13, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="mode"):
        decode(model, prompt, 1, mode="fast")
    with pytest.raises(ValueError, match="steps"):
        decode(model, prompt, -1)
    with pytest.raises(ValueError, match="given"):
        decode(model, prompt, 3, given=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt"):
        decode(model, torch.zeros(1, 0, dtype=torch.long), 1)
    with pytest.raises(TypeError, match="LongTensor"):
        decode(AttentionDecoder(MLA(args), precompute_freqs_cis(args)),
               torch.zeros(1, 2, args.dim), 1)
    decode(model, prompt, 7)  # exactly fills the cache: fine
