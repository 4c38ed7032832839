"""Tests of dsv3_lab.fp8 against an independent, loop-by-block computation of the official rules."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dsv3_lab.config import ModelArgs
from dsv3_lab.fp8 import (
    E4M3,
    E5M2,
    FP8Linear,
    act_dequant,
    act_quant,
    convert_to_fp8,
    deepgemm_diff,
    fp8_gemm,
    fp8_values,
    from_fp8_checkpoint,
    limited_accum_matmul,
    round_mantissa,
    to_fp8_checkpoint,
    weight_dequant,
    weight_quant,
)

E4M3_TABLE = fp8_values(E4M3).double()  # the 253 finite values, sorted


def nearest_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E4M3 value from the value table (ties to the even code)."""
    v = v.double().clamp(-448, 448)
    idx = torch.searchsorted(E4M3_TABLE, v).clamp(1, len(E4M3_TABLE) - 1)
    lo, hi = E4M3_TABLE[idx - 1], E4M3_TABLE[idx]
    pick_hi = (hi - v) < (v - lo)
    tie = (hi - v) == (v - lo)
    hi_code_even = (hi.float().to(E4M3).view(torch.uint8) & 1) == 0
    return torch.where(pick_hi | (tie & hi_code_even), hi, lo)


def ref_block_quant(x: torch.Tensor, rows: int, cols: int):
    """Loop over (rows × cols) blocks of a 2-D tensor: s = max(amax, 1e-4)/448, q = x/s."""
    n, k = x.shape
    q = torch.empty(n, k, dtype=torch.float64)
    s = torch.empty(math.ceil(n / rows), math.ceil(k / cols), dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            block = x[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols].float()
            amax = max(block.abs().max().item(), 1e-4)
            s[i, j] = torch.tensor(amax, dtype=torch.float32) / 448  # float32, as the kernel
            q[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] = nearest_e4m3(block / s[i, j])
    return q, s


def random_tensor(seed: int, shape, outliers: int = 2, zero_rows: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    idx = torch.randint(0, flat.numel(), (outliers,), generator=g)
    flat[idx] *= 1000.0  # outliers
    if zero_rows and x.shape[0] > 1:
        x[0] = 0.0  # an all-zero tile/block
    return x


def test_e4m3_cast_is_nearest_value_rounding():
    v = torch.linspace(-460, 460, 20001)
    v = torch.cat([v, torch.linspace(-0.03, 0.03, 5001), E4M3_TABLE.float()])
    assert torch.equal(v.to(E4M3).double(), nearest_e4m3(v))
    assert len(fp8_values(E4M3)) == 253 and fp8_values(E4M3).max() == 448
    assert fp8_values(E5M2).max() == 57344
    assert fp8_values(E4M3)[fp8_values(E4M3) > 0].min() == 2.0 ** -9


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 6), blocks=st.integers(1, 3),
       block_size=st.sampled_from([16, 32, 128]))
def test_act_quant_matches_reference(seed, rows, blocks, block_size):
    x = random_tensor(seed, (rows, blocks * block_size))
    q, s = act_quant(x, block_size)
    q_ref, s_ref = ref_block_quant(x, 1, block_size)
    assert q.dtype == E4M3 and q.shape == x.shape and s.dtype == torch.float32
    assert s.shape == (rows, blocks)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.double(), q_ref)
    # every tile with amax >= 1e-4 reaches exactly ±448; nothing saturates past it or is NaN
    tiles = q.float().view(rows, blocks, block_size)
    assert torch.isfinite(tiles).all() and tiles.abs().max() <= 448
    big = x.view(rows, blocks, block_size).abs().amax(-1) >= 1e-4
    assert (tiles.abs().amax(-1)[big] == 448).all()
    assert (tiles.abs().amax(-1)[~big] < 448).all()


def test_act_quant_leading_dims_and_zero_tile():
    x = torch.randn(2, 3, 256)
    x[1, 2, :128] = 0
    q, s = act_quant(x)
    assert q.shape == (2, 3, 256) and s.shape == (2, 3, 2)
    assert s[1, 2, 0] == torch.tensor(1e-4) / 448 and (q[1, 2, :128].float() == 0).all()
    torch.testing.assert_close(act_dequant(q, s), x, rtol=0.07, atol=1e-6)


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 300), k=st.integers(1, 300),
       block_size=st.sampled_from([32, 128]))
def test_weight_quant_matches_reference_with_partial_blocks(seed, n, k, block_size):
    w = random_tensor(seed, (n, k))
    q, s = weight_quant(w, block_size)
    q_ref, s_ref = ref_block_quant(w, block_size, block_size)
    assert q.dtype == E4M3 and s.shape == (math.ceil(n / block_size), math.ceil(k / block_size))
    assert torch.equal(s, s_ref)
    assert torch.equal(q.double(), q_ref)
    assert torch.isfinite(q.float()).all() and q.float().abs().max() <= 448
    # dequantisation error: at most half an E4M3 step of q, times the block's scale
    deq = weight_dequant(q, s, block_size)
    scale_el = s.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:n, :k]
    exponent = torch.floor(torch.log2((w.abs() / scale_el).clamp_min(2.0 ** -6)))
    half_step = 2.0 ** (exponent - 3) / 2  # E4M3: 3 mantissa bits; subnormal step 2^-9
    assert ((w - deq).abs() <= half_step * scale_el * (1 + 1e-5) + 1e-12).all()


def test_ue8m0_scales_are_powers_of_two():
    x = random_tensor(3, (4, 256))
    q, s = act_quant(x, scale_fmt="ue8m0")
    _, s_plain = act_quant(x)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    assert (s >= s_plain).all() and (s < 2 * s_plain).all()
    assert q.float().abs().max() <= 448
    _, sw = weight_quant(x, scale_fmt="ue8m0")
    assert torch.equal(torch.exp2(torch.log2(sw).round()), sw)


@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 40), n=st.integers(1, 300),
       kb=st.integers(1, 4))
def test_fp8_gemm_equals_dequantised_matmul(seed, m, n, kb):
    a, b = random_tensor(seed, (m, kb * 128)), random_tensor(seed + 1, (n, kb * 128))
    aq, a_s = act_quant(a)
    bq, b_s = weight_quant(b)
    c = fp8_gemm(aq, a_s, bq, b_s)
    ref = act_dequant(aq, a_s).double() @ weight_dequant(bq, b_s).double().T
    assert c.dtype == torch.float32 and c.shape == (m, n)
    torch.testing.assert_close(c.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_fp8_gemm_close_to_float32_by_deepgemm_metric():
    torch.manual_seed(0)
    a, b = torch.randn(3, 64, 512), torch.randn(384, 512)
    aq, a_s = act_quant(a)
    bq, b_s = weight_quant(b)
    c = fp8_gemm(aq, a_s, bq, b_s)
    assert c.shape == (3, 64, 384)
    assert deepgemm_diff(c, a @ b.T) < 1e-3
    assert deepgemm_diff(c, -(a @ b.T)) > 1.9  # the metric does see a wrong result


def test_round_mantissa_matches_bf16_and_fp16_casts():
    x = torch.randn(10_000) * 50
    assert torch.equal(round_mantissa(x, 7), x.to(torch.bfloat16).float())
    assert torch.equal(round_mantissa(x, 10), x.to(torch.float16).float())
    t = round_mantissa(x, 5, "truncate")
    assert (t.abs() <= x.abs()).all() and ((x - t).abs() < x.abs() * 2.0 ** -5).all()


def test_limited_accumulation_and_promotion():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 1024, generator=g).to(E4M3).float()
    b = torch.randn(16, 1024, generator=g).to(E4M3).float()
    exact = a.double() @ b.double().T
    rel = lambda c: float((c.double() - exact).norm() / exact.norm())
    assert rel(limited_accum_matmul(a, b, mantissa_bits=23, mode="nearest")) < 1e-6
    plain = rel(limited_accum_matmul(a, b, mantissa_bits=13))
    promoted = rel(limited_accum_matmul(a, b, mantissa_bits=13, promote_every=128))
    assert plain > 1e-3 and promoted < plain / 5
    curve = limited_accum_matmul(a, b, 13, 128, ks=[256, 1024])
    assert curve.shape == (2, 16, 16)
    assert torch.equal(curve[1], limited_accum_matmul(a, b, 13, 128))
    assert torch.equal(curve[0], limited_accum_matmul(a[:, :256], b[:, :256], 13, 128))


@pytest.mark.parametrize("in_f,out_f,bias", [(200, 300, False), (64, 40, True), (256, 128, False)])
def test_fp8_linear_gradients_close_to_float32(in_f, out_f, bias):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias)
    fp8 = FP8Linear.from_linear(copy.deepcopy(lin))
    x = torch.randn(3, 70, in_f, requires_grad=True)
    x8 = x.detach().clone().requires_grad_()
    y, y8 = lin(x), fp8(x8)
    grad = torch.randn_like(y)
    y.backward(grad)
    y8.backward(grad)
    assert y8.shape == y.shape and y8.dtype == torch.float32
    assert deepgemm_diff(y8.detach(), y.detach()) < 1e-3
    assert deepgemm_diff(x8.grad, x.grad) < 1e-3
    assert deepgemm_diff(fp8.weight.grad, lin.weight.grad) < 2e-3
    assert not torch.equal(fp8.weight.grad, lin.weight.grad)  # it really is quantised
    if bias:
        torch.testing.assert_close(fp8.bias.grad, lin.bias.grad)


def test_fp8_linear_keeps_tiny_gradients():
    # gradients far below the inference clamp (amax 1e-4) must keep E4M3's relative precision
    torch.manual_seed(2)
    lin = nn.Linear(128, 64, bias=False)
    fp8 = FP8Linear.from_linear(copy.deepcopy(lin))
    x = torch.randn(256, 128, requires_grad=True)
    x8 = x.detach().clone().requires_grad_()
    grad = torch.randn(256, 64) * 1e-9
    lin(x).backward(grad)
    fp8(x8).backward(grad)
    assert deepgemm_diff(x8.grad, x.grad) < 1e-3
    assert deepgemm_diff(fp8.weight.grad, lin.weight.grad) < 2e-3


def test_fp8_linear_forward_is_quantised_gemm_and_handles_no_tokens():
    torch.manual_seed(1)
    layer = FP8Linear(256, 130)
    x = torch.randn(5, 256)
    xq, xs = act_quant(x)
    wq, ws = weight_quant(layer.weight.detach())
    ref = act_dequant(xq, xs) @ weight_dequant(wq, ws).T
    torch.testing.assert_close(layer(x).detach(), ref, rtol=1e-5, atol=1e-5)
    empty = torch.zeros(0, 256, requires_grad=True)
    out = layer(empty)
    out.sum().backward()
    assert out.shape == (0, 130) and layer.weight.grad.abs().sum() == 0


def test_convert_transformer_keeps_head_gate_embed_and_trains():
    from dsv3_lab.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs.tiny(n_layers=2), attn_impl="naive")
    ref = copy.deepcopy(model)
    converted = convert_to_fp8(model)
    assert converted and all("head" not in n and "gate" not in n for n in converted)
    assert type(model.head) is nn.Linear and isinstance(model.embed, nn.Embedding)
    assert all(type(m) is FP8Linear for n, m in model.named_modules() if n in converted)
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n != "head")
    tokens = torch.randint(0, 256, (2, 16))
    logits, logits_ref = model(tokens), ref(tokens)
    assert deepgemm_diff(logits.detach(), logits_ref.detach()) < 1e-3
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for n, p in model.named_parameters() if n.endswith("w1.weight"))


def test_fp8_checkpoint_round_trip():
    from dsv3_lab.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs.tiny(n_layers=2))
    state = to_fp8_checkpoint(model)
    key = "layers.0.attn.wq_a.weight"
    assert state[key].dtype == E4M3 and state[key + "_scale_inv"].shape == (1, 1)
    assert state["head.weight"].dtype == torch.float32 and "head.weight_scale_inv" not in state
    assert "embed.weight_scale_inv" not in state
    restored = from_fp8_checkpoint(state)
    assert set(restored) == set(model.state_dict())
    twin = Transformer(ModelArgs.tiny(n_layers=2))
    twin.load_state_dict(restored)
    w, w_back = model.layers[0].attn.wq_a.weight, twin.layers[0].attn.wq_a.weight
    assert not torch.equal(w, w_back)
    tokens = torch.randint(0, 256, (2, 16))
    assert deepgemm_diff(twin(tokens).detach(), model(tokens).detach()) < 1e-3


def test_errors():
    with pytest.raises(ValueError, match="multiple of block_size=128"):
        act_quant(torch.randn(4, 100))
    with pytest.raises(TypeError, match="floating-point"):
        act_quant(torch.ones(4, 128, dtype=torch.long))
    with pytest.raises(ValueError, match="2-D"):
        weight_quant(torch.randn(128))
    with pytest.raises(ValueError, match="scale_fmt"):
        act_quant(torch.randn(2, 128), scale_fmt="e8m0")
    with pytest.raises(ValueError, match="block_size"):
        weight_quant(torch.randn(8, 8), block_size=0)
    aq, a_s = act_quant(torch.randn(2, 256))
    bq, b_s = weight_quant(torch.randn(4, 256))
    with pytest.raises(TypeError, match="FP8 dtype"):
        fp8_gemm(aq.float(), a_s, bq, b_s)
    with pytest.raises(ValueError, match="b_s must have shape"):
        fp8_gemm(aq, a_s, bq, b_s.T)
    with pytest.raises(ValueError, match="expected block scales"):
        weight_dequant(bq, torch.ones(2, 2))
    with pytest.raises(ValueError, match="expected input"):
        FP8Linear(64, 8)(torch.randn(2, 32))
    with pytest.raises(ValueError, match="mode"):
        round_mantissa(torch.ones(2), 3, "up")
    with pytest.raises(ValueError, match="a \\[M, K\\]"):
        limited_accum_matmul(torch.ones(2, 3), torch.ones(2, 4))


def test_per_tensor_control_uses_one_scale_and_loses_the_small_rows():
    from dsv3_lab.fp8 import quant_dequant, quant_dequant_groups

    torch.manual_seed(2)
    x = torch.randn(64, 96, dtype=torch.float64)
    x[3] *= 1e5  # one token-correlated outlier row
    q = quant_dequant_groups(x, None, None)
    s = x.abs().max().float() / 448  # the one scale (float32, as in the kernels)
    assert torch.equal(q, ((x / s).to(torch.float8_e4m3fn).double() * s))
    rows = torch.arange(64) != 3
    tile_err = (quant_dequant(x, 32)[rows] - x[rows]).norm() / x[rows].norm()
    tensor_err = (q[rows] - x[rows]).norm() / x[rows].norm()
    assert tile_err < 0.05 < 0.3 < tensor_err  # per tensor: the ordinary rows underflow
    # groups of 1×32 are quant_dequant's tiles; 32×1 its tiles along dim 0
    assert torch.equal(quant_dequant_groups(x, 1, 32), quant_dequant(x, 32))
    assert torch.equal(quant_dequant_groups(x, 32, 1), quant_dequant(x, 32, dim=0))
    e5 = quant_dequant_groups(x, 1, 32, E5M2)  # V3's tiles, E5M2 values: coarser
    e5_err = (e5[rows] - x[rows]).norm() / x[rows].norm()
    assert 1.5 * tile_err < e5_err < 0.1


def test_fp8_linear_per_tensor_and_e5m2_controls():
    from dsv3_lab.fp8 import quant_dequant_groups
    from dsv3_lab.model import Transformer

    torch.manual_seed(3)
    w = torch.randn(40, 64, dtype=torch.float64) * 0.1
    for scaling, group, fmt in (("tensor", None, E4M3), ("e5m2", 32, E5M2)):
        lin = nn.Linear(64, 40, bias=False, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(w)
        layer = FP8Linear.from_linear(lin, block_size=32, scaling=scaling)
        assert f"scaling='{scaling}'" in repr(layer)
        x = torch.randn(3, 7, 64, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        row = 1 if group else None
        xd = quant_dequant_groups(x.detach().reshape(-1, 64), row, group, fmt)
        wd = quant_dequant_groups(w, group, group, fmt)
        assert torch.equal(y.detach().reshape(-1, 40), xd @ wd.T)
        dy = torch.randn_like(y)
        y.backward(dy)
        dy2 = dy.reshape(-1, 40)
        g = quant_dequant_groups(dy2, row, group, fmt, 1e-12)
        torch.testing.assert_close(x.grad.reshape(-1, 64), g @ wd)
        g_t = quant_dequant_groups(dy2, group, row, fmt, 1e-12)
        torch.testing.assert_close(lin.weight.grad,
                                   g_t.T @ quant_dequant_groups(xd, group, row, fmt))
    model = Transformer(ModelArgs.tiny(), attn_impl="naive")
    names = convert_to_fp8(model, block_size=32, scaling="e5m2")
    assert names and all(model.get_submodule(n).scaling == "e5m2" for n in names)
    with pytest.raises(ValueError, match="scaling"):
        FP8Linear(64, 8, scaling="row")
