"""Rotary Position Embedding (RoPE) with YaRN context extension, as DeepSeek-V3 runs it.

Frequencies, d = qk_rope_head_dim, pairs i = 0 .. d/2 - 1:

    ω_i = rope_theta^(-2i/d)

YaRN (on when max_seq_len > original_seq_len), with L = original_seq_len, s = rope_factor:

    corr(r)  = d · ln(L / (2π r)) / (2 ln rope_theta)         pair index completing r turns in L
    low      = max(floor(corr(beta_fast)), 0),  high = min(ceil(corr(beta_slow)), d - 1)
    ramp_i   = clamp((i - low) / (high - low), 0, 1)
    ω'_i     = ω_i / s · ramp_i + ω_i · (1 - ramp_i)   (fast pairs kept, slow pairs interpolated)

Rotation: DeepSeek-V3 rotates *adjacent* pairs (x_0, x_1), (x_2, x_3), ... viewed as complex
numbers z_i = x_{2i} + j·x_{2i+1}:  z_i ← z_i · exp(j · m · ω_i) at position m.
(transformers' `rotate_half` layout pairs x_i with x_{i+d/2}: a permutation, same q·k.)

Softmax scale: (qk_nope_head_dim + qk_rope_head_dim)^-0.5, times m² with
m = 0.1 · mscale · ln(rope_factor) + 1 when YaRN is on (V3: 0.1352338).
"""

from __future__ import annotations

import math

import torch

from dsv3_lab.config import ModelArgs


def yarn_correction_dim(num_rotations: float, dim: int, base: float, max_seq_len: int) -> float:
    """The (fractional) pair index whose wavelength fits `num_rotations` times in max_seq_len."""
    return dim * math.log(max_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(args: ModelArgs) -> tuple[int, int]:
    """(low, high) pair indices of the YaRN ramp, floor/ceil then clamped (V3: (10, 23))."""
    d = args.qk_rope_head_dim
    low = math.floor(yarn_correction_dim(args.beta_fast, d, args.rope_theta, args.original_seq_len))
    high = math.ceil(yarn_correction_dim(args.beta_slow, d, args.rope_theta, args.original_seq_len))
    return max(low, 0), min(high, d - 1)


def _table_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """float32 (the official code's) or float64; None means torch's default dtype."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"rope: tables are float32 or float64, got {dtype}")
    return dtype


def yarn_ramp(low: float, high: float, n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """ramp_i = clamp((i - low) / (high - low), 0, 1) for i = 0 .. n-1 (0: keep, 1: interpolate)."""
    if low == high:
        high += 0.001  # avoid a division by zero, as the official code does
    ramp = (torch.arange(n, dtype=_table_dtype(dtype)) - low) / (high - low)  # [n]
    return ramp.clamp(0, 1)


def rope_frequencies(args: ModelArgs, dtype: torch.dtype | None = None) -> torch.Tensor:
    """ω'_i per pair [qk_rope_head_dim // 2], YaRN-corrected when YaRN is on.

    dtype: float32 (the official code's; bit-identical to it) or float64; default: torch's
    default dtype, so a model built under float64 (the notebooks) gets a float64 table.
    """
    d, dtype = args.qk_rope_head_dim, _table_dtype(dtype)
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=dtype) / d))  # [d/2]
    if args.yarn_enabled:
        low, high = yarn_correction_range(args)
        # smooth_i = 1 - ramp_i (1: keep the pair, 0: divide it by s); written in this order so
        # that the float32 result is bit-identical to the official code
        smooth = 1 - yarn_ramp(low, high, d // 2, dtype)  # [d/2]
        freqs = freqs / args.rope_factor * (1 - smooth) + freqs * smooth
    return freqs


def precompute_freqs_cis(args: ModelArgs, dtype: torch.dtype | None = None) -> torch.Tensor:
    """exp(j · m · ω'_i) for every position m < max_seq_len: [max_seq_len, d/2], complex64 for
    dtype float32 (the official code), complex128 for float64; default: torch's default dtype."""
    dtype = _table_dtype(dtype)
    freqs = rope_frequencies(args, dtype)  # [d/2]
    t = torch.arange(args.max_seq_len, dtype=dtype)  # [max_seq_len]
    angles = torch.outer(t, freqs)  # [max_seq_len, d/2]
    return torch.polar(torch.ones_like(angles), angles)  # complex [max_seq_len, d/2]


def positions(freqs_cis: torch.Tensor, start_pos: int, seqlen: int) -> torch.Tensor:
    """Rows start_pos .. start_pos+seqlen-1 of freqs_cis, with a clear error past its end."""
    if start_pos < 0 or start_pos + seqlen > freqs_cis.shape[0]:
        raise ValueError(
            f"positions {start_pos}..{start_pos + seqlen - 1} are past max_seq_len="
            f"{freqs_cis.shape[0]} (the rotary table has {freqs_cis.shape[0]} positions)"
        )
    return freqs_cis[start_pos : start_pos + seqlen]  # [seqlen, d/2]


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [batch, seq, heads, d] by freqs_cis [seq, d/2].

    Computed in float32 (float64 stays float64); returns x's dtype and shape.
    """
    if x.dim() != 4:
        raise ValueError(f"apply_rotary_emb: expected x of shape [batch, seq, heads, d], "
                         f"got {tuple(x.shape)}")
    if x.shape[-1] % 2:
        raise ValueError(f"apply_rotary_emb: the rotary dimension must be even, got {x.shape[-1]}")
    if not x.is_floating_point():
        raise TypeError(f"apply_rotary_emb: expected a floating-point x, got {x.dtype}")
    if not freqs_cis.is_complex():
        raise TypeError(f"apply_rotary_emb: expected a complex freqs_cis (precompute_freqs_cis), "
                        f"got {freqs_cis.dtype}")
    if tuple(freqs_cis.shape) != (x.shape[1], x.shape[-1] // 2):
        raise ValueError(
            f"apply_rotary_emb: expected freqs_cis of shape [seq={x.shape[1]}, "
            f"d/2={x.shape[-1] // 2}], got {tuple(freqs_cis.shape)}"
        )
    dtype = x.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    pairs = x.to(work).reshape(*x.shape[:-1], -1, 2)  # [B, S, H, d/2, 2]
    odd = pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1])
    if odd or pairs.stride(-1) != 1:  # view_as_complex needs even offsets and strides: copy
        pairs = pairs.clone(memory_format=torch.contiguous_format)
    z = torch.view_as_complex(pairs)  # [B, S, H, d/2]
    rot = freqs_cis.to(z.dtype).view(1, x.shape[1], 1, -1)  # [1, S, 1, d/2]
    return torch.view_as_real(z * rot).flatten(3).to(dtype)  # [B, S, H, d]


def yarn_mscale(args: ModelArgs) -> float:
    """Attention temperature m = 0.1 · mscale · ln(rope_factor) + 1 (1 when YaRN is off)."""
    if not args.yarn_enabled:
        return 1.0
    return 0.1 * args.mscale * math.log(args.rope_factor) + 1.0


def softmax_scale(args: ModelArgs) -> float:
    """(qk_nope_head_dim + qk_rope_head_dim)^-0.5 · m² (V3: 192^-0.5 · 1.36889² = 0.1352338)."""
    scale = args.qk_head_dim ** -0.5
    if args.yarn_enabled:
        m = yarn_mscale(args)
        scale = scale * m * m  # the official order of operations (same float64 result)
    return scale
