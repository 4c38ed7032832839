"""Fine-grained FP8 (DeepSeek-V3 report §3.3) with PyTorch's real float8 dtypes, on any device.

Formats: E4M3 (`torch.float8_e4m3fn`, max 448, min normal 2⁻⁶, min subnormal 2⁻⁹, no infinity)
for every GEMM input; E5M2 (max 57344) is not used by V3. Scales are float32 multipliers:

    activations, 1×128 tiles:   s[m, j] = max(amax(x[m, 128j:128j+128]), 1e-4) / 448
                                 q = E4M3(x / s)                      s: x.shape[:-1] + (K/128,)
    weights, 128×128 blocks:    s[i, j] = max(amax(W[128i:.., 128j:..]), 1e-4) / 448
                                 s: [ceil(N/128), ceil(K/128)], edge blocks partial
                                 (the released checkpoint stores s as `weight_scale_inv`)
    dequantise:                 x ≈ q · s  (each element times the scale of its tile or block)
    scale_fmt="ue8m0" rounds every scale up to a power of two: s ← 2^ceil(log2 s) (V3.1).

Block-scaled GEMM (official `fp8_gemm`), C [M, N] = A [M, K] · Bᵀ, B [N, K]:

    C[m, n] = Σ_kb ( Σ_{k ∈ kb} qa[m, k] · qb[n, k] ) · sa[m, kb] · sb[n // 128, kb]   (float32)

The inner sums run on tensor cores, whose accumulator keeps ~14 bits (ISCA: FP22, 13 mantissa
bits); V3 promotes each partial sum to float32 every N_C = 128 elements, where the scales are
applied. `limited_accum_matmul` simulates that accumulator with and without promotion.

FP8 training (`FP8Linear`): all three GEMMs of a linear take E4M3 inputs, outputs float32:
    Fprop  y  = x Wᵀ     x in 1×128 tiles (along K), W in 128×128 blocks
    Dgrad  dx = dy W     dy in 1×128 tiles (along N), the same W blocks transposed
    Wgrad  dW = dyᵀ x    dy and the cached FP8 x re-quantised in 128×1 tiles (along tokens)
Dimensions that are not a multiple of the block are zero-padded, which changes no product.
Gradient tiles take the floor GRAD_AMAX_MIN instead of 1e-4: gradients are often smaller.
Controls for experiments (FP8Linear scaling=): "tensor", one E4M3 scale per tensor (the
recipe V3's tiles replace); "e5m2", V3's tiles and blocks with E5M2 values (2 mantissa bits).
Embedding, output head, MoE gate, norms and the attention core stay in full precision.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
E4M3_MAX = 448.0
AMAX_MIN = 1e-4  # the official clamp: an all-zero tile gets scale 1e-4/448, not 0
GRAD_AMAX_MIN = 1e-12  # training: gradients are often < 1e-4; this floor only avoids 0/0
BLOCK_SIZE = 128
SCALE_FMTS = (None, "ue8m0")


def fp8_values(dtype: torch.dtype = E4M3) -> torch.Tensor:
    """Every finite value of an 8-bit float format, sorted, as float32 (E4M3: 253 values)."""
    if dtype not in (E4M3, E5M2):
        raise TypeError(f"fp8_values: expected torch.float8_e4m3fn or float8_e5m2, got {dtype}")
    v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()  # all codes
    return torch.unique(v[torch.isfinite(v)])  # ±0 merge; NaN/inf dropped


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name}: expected a floating-point tensor, got {kind}")


def _check_block(block_size: int, name: str) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{name}: block_size must be a positive int, got {block_size!r}")


def _scale(amax: torch.Tensor, scale_fmt: str | None, amax_min: float = AMAX_MIN):
    """s = max(amax, 1e-4) / 448, optionally rounded up to a power of two (ue8m0)."""
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    s = amax.float().clamp_min(amax_min) / E4M3_MAX
    return pow2_ceil(s) if scale_fmt == "ue8m0" else s


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= s (s > 0), exactly: 2^ceil(log2 s) from the float's exponent
    bits (frexp) rather than from log2, whose last bit varies between CPU kernels."""
    mantissa, exponent = torch.frexp(s)  # s = mantissa · 2^exponent, mantissa in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)  # s already a power of two
    return torch.ldexp(torch.ones_like(s), exponent)


def act_quant(x: torch.Tensor, block_size: int = BLOCK_SIZE, scale_fmt: str | None = None):
    """x [..., K] -> (q float8_e4m3fn [..., K], s float32 [..., K // block_size]), 1×128 tiles."""
    _check_float(x, "act_quant")
    _check_block(block_size, "act_quant")
    if x.dim() == 0 or x.shape[-1] % block_size:
        raise ValueError(f"act_quant: the last dimension must be a multiple of block_size="
                         f"{block_size}, got shape {tuple(x.shape)} (pad it, or pick a block)")
    tiles = x.float().unflatten(-1, (x.shape[-1] // block_size, block_size))  # [..., K/b, b]
    s = _scale(tiles.abs().amax(-1), scale_fmt)  # [..., K/b]
    q = (tiles / s.unsqueeze(-1)).to(E4M3).flatten(-2)  # [..., K]
    return q, s


def act_dequant(q: torch.Tensor, s: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Inverse of act_quant: q [..., K] · s [..., K/b] per tile -> float32 [..., K]."""
    if q.shape[:-1] + (q.shape[-1] // block_size,) != s.shape or q.shape[-1] % block_size:
        raise ValueError(f"act_dequant: scales {tuple(s.shape)} do not match values "
                         f"{tuple(q.shape)} in tiles of {block_size}")
    tiles = q.float().unflatten(-1, (s.shape[-1], block_size))  # [..., K/b, b]
    return (tiles * s.unsqueeze(-1)).flatten(-2)


def _pad(x: torch.Tensor, block_size: int, dim: int) -> torch.Tensor:
    """Zero-pad dimension `dim` of x up to a multiple of block_size (zeros change no amax)."""
    extra = -x.shape[dim] % block_size
    if not extra:
        return x
    pad = [0] * (2 * x.dim())
    pad[2 * (x.dim() - 1 - dim % x.dim()) + 1] = extra
    return nn.functional.pad(x, pad)


def _blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, K] -> zero-padded blocks [ceil(N/b), b, ceil(K/b), b]."""
    padded = _pad(_pad(w, block_size, 0), block_size, 1)  # [Np, Kp]
    return padded.unflatten(1, (-1, block_size)).unflatten(0, (-1, block_size))


def weight_quant(w: torch.Tensor, block_size: int = BLOCK_SIZE, scale_fmt: str | None = None):
    """w [N, K] -> (q float8_e4m3fn [N, K], s float32 [ceil(N/b), ceil(K/b)]), 128×128 blocks."""
    _check_float(w, "weight_quant")
    _check_block(block_size, "weight_quant")
    if w.dim() != 2:
        raise ValueError(f"weight_quant: expected a 2-D weight [out, in], got {tuple(w.shape)}")
    n, k = w.shape
    blocks = _blocks(w.float(), block_size)  # [N/b, b, K/b, b], zero-padded
    s = _scale(blocks.abs().amax(dim=(1, 3), keepdim=True), scale_fmt)  # [N/b, 1, K/b, 1]
    q = (blocks / s).flatten(2).flatten(0, 1)[:n, :k].to(E4M3)  # [N, K]
    return q, s[:, 0, :, 0]


def weight_dequant(q: torch.Tensor, s: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """FP8 weight [N, K] times its `weight_scale_inv` s [ceil(N/b), ceil(K/b)] -> float32."""
    if q.dim() != 2:
        raise ValueError(f"weight_dequant: expected a 2-D weight, got {tuple(q.shape)}")
    n, k = q.shape
    expected = (-(-n // block_size), -(-k // block_size))
    if tuple(s.shape) != expected:
        raise ValueError(f"weight_dequant: expected block scales of shape {expected} for a "
                         f"[{n}, {k}] weight in {block_size}×{block_size} blocks, "
                         f"got {tuple(s.shape)}")
    blocks = _blocks(q.float(), block_size) * s.float()[:, None, :, None]  # [N/b, b, K/b, b]
    return blocks.flatten(2).flatten(0, 1)[:n, :k]  # [N, K]


def fp8_gemm(a, a_s, b, b_s, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """a [..., K] E4M3 with 1×128 scales a_s [..., K/b]; b [N, K] E4M3 with 128×128 scales
    b_s [ceil(N/b), K/b] -> float32 [..., N] (per-K-block partial products, scaled, summed)."""
    for t, name in ((a, "a"), (b, "b")):
        if t.dtype not in (E4M3, E5M2):
            raise TypeError(f"fp8_gemm: expected {name} in an FP8 dtype, got {t.dtype}")
    k = a.shape[-1]
    if b.dim() != 2 or b.shape[1] != k or k % block_size:
        raise ValueError(f"fp8_gemm: expected a [..., K] and b [N, K] with K a multiple of "
                         f"{block_size}, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a_s.shape != a.shape[:-1] + (k // block_size,):
        raise ValueError(f"fp8_gemm: a_s must have shape {tuple(a.shape[:-1])} + "
                         f"({k // block_size},), got {tuple(a_s.shape)}")
    if tuple(b_s.shape) != (-(-b.shape[0] // block_size), k // block_size):
        raise ValueError(f"fp8_gemm: b_s must have shape [ceil(N/{block_size}), "
                         f"{k // block_size}], got {tuple(b_s.shape)}")
    n, nk = b.shape[0], k // block_size
    a32 = a.float().reshape(-1, nk, block_size)  # [M, K/b, b]
    b32 = b.float().reshape(n, nk, block_size)  # [N, K/b, b]
    sa = a_s.reshape(-1, nk).float()  # [M, K/b]
    sb = b_s.float().repeat_interleave(block_size, 0)[:n]  # [N, K/b]: row n uses block n // b
    out = a32.new_zeros(a32.shape[0], n)  # float32 accumulator [M, N]
    for j in range(nk):  # per K-block: exact FP8 products, then scale and add in float32
        out += (a32[:, j] @ b32[:, j].T) * sa[:, j, None] * sb[None, :, j]
    return out.view(*a.shape[:-1], n)  # [..., N]


def deepgemm_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's test metric 1 − 2·Σxy / Σ(x² + y²): 0 when equal; their tests need < 0.001."""
    x, y = x.detach().double(), y.detach().double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


# ----------------------------------------------------------------- accumulation precision
def round_mantissa(x: torch.Tensor, bits: int, mode: str = "nearest") -> torch.Tensor:
    """Round float32 x to `bits` explicit mantissa bits (FP32: 23, FP22: 13, BF16: 7, E4M3: 3).

    mode "nearest" (ties to even) or "truncate" (toward zero: the low bits are dropped). Works on
    the float32 bit pattern (sign-magnitude, so a carry moves into the exponent as it should);
    the exponent range is float32's. Returns float32.
    """
    if mode not in ("nearest", "truncate"):
        raise ValueError(f"round_mantissa: mode must be 'nearest' or 'truncate', got {mode!r}")
    if not 1 <= bits <= 23:
        raise ValueError(f"round_mantissa: bits must be in 1..23, got {bits}")
    drop = 23 - bits
    i = x.float().contiguous().view(torch.int32)  # bit pattern
    if mode == "nearest" and drop:
        i = i + ((1 << (drop - 1)) - 1) + ((i >> drop) & 1)  # half-way rounds to even
    return (i & -(1 << drop)).view(torch.float32)  # clear the dropped bits


def limited_accum_matmul(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int = 13,
                         promote_every: int | None = None, chunk: int = 1,
                         mode: str = "truncate", ks=None) -> torch.Tensor:
    """a [M, K] @ b [N, K]ᵀ with an accumulator that keeps `mantissa_bits` -> float32 [M, N].

    Every `chunk` products (summed in float64, then rounded to float32) are added to the
    accumulator, which is then rounded to `mantissa_bits` (`mode`). With promote_every=N_C, after
    every N_C elements the accumulator is added to a float32 total and restarted from zero
    (V3's promotion to CUDA-core registers). With `ks` (multiples of chunk), return instead the
    results over the first k columns for each k in ks, stacked [len(ks), M, N]: one pass gives
    a whole error-versus-K curve.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"limited_accum_matmul: expected a [M, K] and b [N, K], got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if chunk < 1 or (promote_every is not None and (promote_every < 1 or promote_every % chunk)):
        raise ValueError(f"promote_every ({promote_every}) must be a positive multiple of chunk "
                         f"({chunk})")
    wanted = [a.shape[1]] if ks is None else list(ks)
    if any(k % chunk or not 0 < k <= a.shape[1] for k in wanted):
        raise ValueError(f"ks must be multiples of chunk={chunk} in 1..{a.shape[1]}, got {ks}")
    a64, b64 = a.double(), b.double()
    acc = torch.zeros(a.shape[0], b.shape[0])  # limited-precision accumulator [M, N]
    total = torch.zeros(a.shape[0], b.shape[0])  # float32 registers [M, N]
    out = {}
    for k0 in range(0, max(wanted), chunk):
        part = (a64[:, k0:k0 + chunk] @ b64[:, k0:k0 + chunk].T).float()  # [M, N]
        acc = round_mantissa(acc + part, mantissa_bits, mode)
        if promote_every and (k0 + chunk) % promote_every == 0:
            total += acc
            acc = torch.zeros_like(acc)
        if k0 + chunk in wanted:
            out[k0 + chunk] = total + acc
    return out[wanted[0]] if ks is None else torch.stack([out[k] for k in wanted])


# ----------------------------------------------------------------- FP8 training
def quant_dequant(x: torch.Tensor, block_size: int = BLOCK_SIZE, dim: int = -1,
                  amax_min: float = AMAX_MIN) -> torch.Tensor:
    """x rounded through E4M3 in 1×block tiles along `dim` (zero-padded to a multiple of the
    block), returned as float32 of x's shape (float64 for a float64 x): exactly what an FP8 GEMM
    sees of x. The scale is float32 as in the official kernels."""
    d, n, work = dim % x.dim(), x.shape[dim], _work(x)
    tiles = _pad(x.to(work), block_size, d).unflatten(d, (-1, block_size))  # tile axis d + 1
    s = _scale(tiles.abs().amax(d + 1, keepdim=True), None, amax_min)  # one scale per tile
    y = (tiles / s).to(E4M3).to(work) * s  # quantise, dequantise
    return y.flatten(d, d + 1).narrow(d, 0, n)


def quant_dequant_groups(x: torch.Tensor, rows: int | None, cols: int | None, fmt=E4M3,
                         amax_min: float = AMAX_MIN) -> torch.Tensor:
    """2-D x [M, K] rounded through `fmt` with one float32 scale s = max(amax, floor) / max(fmt)
    per rows × cols group (None: the whole dimension, so (None, None) is one scale per tensor).
    For the deliberately worse recipes of FP8Linear (per-tensor scaling, E5M2 everywhere)."""
    work = _work(x)
    if x.numel() == 0:
        return x.to(work)
    m, k = x.shape
    r, c = rows or m, cols or k
    g = _pad(_pad(x.to(work), r, 0), c, 1).unflatten(1, (-1, c)).unflatten(0, (-1, r))
    amax = g.abs().amax(dim=(1, 3), keepdim=True).float()  # [M/r, 1, K/c, 1]
    s = amax.clamp_min(amax_min) / torch.finfo(fmt).max
    y = (g / s).to(fmt).to(work) * s  # [M/r, r, K/c, c]
    return y.flatten(2).flatten(0, 1)[:m, :k]


def _work(x: torch.Tensor) -> torch.dtype:
    """The simulation's working precision: float64 for a float64 tensor, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _FP8LinearFunction(torch.autograd.Function):
    """y = x Wᵀ with E4M3 inputs in Fprop, Dgrad and Wgrad (see the module docstring).

    The GEMMs multiply the dequantised operands in float32: products of E4M3 values are exact
    in float32, so this equals the block-scaled GEMM up to float32 summation order (and runs
    as one matmul on a CPU). A float64 model runs them in float64: then the only rounding is
    E4M3's, and the result does not depend on the CPU's float32 kernels (portable outputs).
    Gradient tiles use the floor GRAD_AMAX_MIN instead of the
    inference kernel's 1e-4, which would coarsen the many gradient tiles smaller than 1e-4.
    Controls (deliberately worse recipes): scaling="tensor" gives x, W and dy one E4M3 scale
    per tensor; scaling="e5m2" keeps V3's tiles and blocks but rounds to E5M2 (2 mantissa bits).
    """

    @staticmethod
    def forward(ctx, x, weight, block_size, scaling="tile"):
        k = weight.shape[1]
        work = _work(x)
        ctx.scaling = scaling
        if scaling != "tile":  # the controls: per-tensor E4M3, or V3's groups in E5M2
            b = None if scaling == "tensor" else block_size
            fmt = E5M2 if scaling == "e5m2" else E4M3
            xd = quant_dequant_groups(x.reshape(-1, k).to(work), 1 if b else None, b, fmt)
            wd = quant_dequant_groups(weight.detach().to(work), b, b, fmt)  # [N, K]
            ctx.save_for_backward(xd, wd)
            ctx.group, ctx.fmt = b, fmt
            ctx.block_size, ctx.x_shape = block_size, x.shape
            return (xd @ wd.T).reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)
        x2 = _pad(x.reshape(-1, k).to(work), block_size, 1)  # [M, Kp]
        xq, xs = act_quant(x2, block_size)  # 1×128 tiles along K; cached for Wgrad in FP8
        wq, ws = weight_quant(weight.detach(), block_size)  # 128×128 blocks [N, K]
        w = weight_dequant(wq, ws, block_size).to(work)  # [N, K]
        xd = act_dequant(xq, xs, block_size).to(work)[:, :k]  # [M, K]
        y = xd @ w.T  # Fprop [M, N]
        # the backward needs exactly these dequantised values (E4M3 codes times their scales):
        # keep them rather than decode the FP8 cache again (the same numbers, less work)
        ctx.save_for_backward(xd, w)
        ctx.block_size, ctx.x_shape = block_size, x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        b = ctx.block_size
        work = _work(dy)
        dy2 = dy.reshape(-1, dy.shape[-1]).to(work)  # [M, N]
        dx = dw = None
        if ctx.scaling != "tile":
            xd, wd = ctx.saved_tensors
            g, fmt, lo = ctx.group, ctx.fmt, GRAD_AMAX_MIN
            if ctx.needs_input_grad[0]:  # dy in 1×b tiles along N (or per tensor)
                dy_q = quant_dequant_groups(dy2, 1 if g else None, g, fmt, lo)
                dx = (dy_q @ wd.to(work)).reshape(ctx.x_shape).to(dy.dtype)  # [M, K]
            if ctx.needs_input_grad[1]:  # dy and x in b×1 tiles along tokens (or per tensor)
                dy_t = quant_dequant_groups(dy2, g, 1 if g else None, fmt, lo)
                dw = dy_t.T @ quant_dequant_groups(xd, g, 1 if g else None, fmt)  # [N, K]
            return dx, dw, None, None
        # dequantised FP8 x [M, K] and W blocks [N, K], already in the working precision
        x_cached, w = ctx.saved_tensors
        if ctx.needs_input_grad[0]:  # Dgrad: dx = dy W (the same blocks, transposed), over N
            g = quant_dequant(dy2, b, amax_min=GRAD_AMAX_MIN)  # 1×128 tiles along N
            dx = (g @ w).reshape(ctx.x_shape).to(dy.dtype)  # [M, K]
        if ctx.needs_input_grad[1]:  # Wgrad: dW = dyᵀ x, reduction over the M tokens
            g_t = quant_dequant(dy2, b, 0, GRAD_AMAX_MIN)  # 128×1 tiles (along tokens) [M, N]
            x_t = quant_dequant(x_cached, b, dim=0)  # re-quantised in 128×1 tiles [M, K]
            dw = g_t.T @ x_t  # [N, K]
        return dx, dw, None, None


SCALINGS = ("tile", "tensor", "e5m2")  # V3's recipe; per-tensor E4M3; V3's groups in E5M2


class FP8Linear(nn.Linear):
    """Drop-in nn.Linear training with FP8 GEMM inputs; master weight and outputs float32.

    scaling="tile" is V3's recipe; "tensor" (one scale per tensor) and "e5m2" (V3's groups,
    E5M2 values) are deliberately worse ones, controls for an experiment's sensitivity.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 block_size: int = BLOCK_SIZE, device=None, dtype=None, scaling: str = "tile"):
        _check_block(block_size, "FP8Linear")
        if scaling not in SCALINGS:
            raise ValueError(f"FP8Linear: scaling must be one of {SCALINGS}, got {scaling!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.block_size, self.scaling = block_size, scaling

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = BLOCK_SIZE,
                    scaling: str = "tile") -> FP8Linear:
        """An FP8Linear sharing `linear`'s Parameters (optimisers keep working)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  block_size=block_size, device="meta", scaling=scaling)
        new.weight = linear.weight
        if linear.bias is not None:
            new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear: expected input [..., {self.in_features}], "
                             f"got {tuple(x.shape)}")
        y = _FP8LinearFunction.apply(x, self.weight, self.block_size, self.scaling)  # [.., out]
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        extra = "" if self.scaling == "tile" else f", scaling={self.scaling!r}"
        return super().extra_repr() + f", block_size={self.block_size}" + extra


FULL_PRECISION = ("head", "gate")  # module names V3 keeps out of FP8 (embedding is no Linear)


def _skipped(name: str, skip) -> bool:
    return any(part in skip for part in name.split("."))


def convert_to_fp8(model: nn.Module, block_size: int = BLOCK_SIZE,
                   skip=FULL_PRECISION, scaling: str = "tile") -> list[str]:
    """Replace every nn.Linear of `model` in place by an FP8Linear, except modules named in
    `skip` (and anything under them). Returns the converted module names. `scaling` picks the
    recipe: "tile" (V3), or the controls "tensor" and "e5m2" (see FP8Linear)."""
    converted = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not _skipped(full, skip):
                setattr(module, child_name, FP8Linear.from_linear(child, block_size, scaling))
                converted.append(full)
    return converted


def to_fp8_checkpoint(model: nn.Module, block_size: int = BLOCK_SIZE, skip=FULL_PRECISION,
                      scale_fmt: str | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict in the released checkpoint's format: every (FP8) linear weight
    becomes E4M3 `…weight` plus float32 `…weight_scale_inv` [ceil(N/b), ceil(K/b)]."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not _skipped(name, skip):
            q, s = weight_quant(module.weight.detach(), block_size, scale_fmt)
            state[f"{name}.weight"], state[f"{name}.weight_scale_inv"] = q, s
    return state


def from_fp8_checkpoint(state: dict[str, torch.Tensor], block_size: int = BLOCK_SIZE,
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Dequantise every `…weight` that has a `…weight_scale_inv`; drop the scales."""
    out = {}
    for key, value in state.items():
        if key.endswith("weight_scale_inv"):
            if key[: -len("_scale_inv")] not in state:
                raise ValueError(f"from_fp8_checkpoint: {key} has no weight "
                                 f"{key[: -len('_scale_inv')]}")
            continue
        scale = state.get(key + "_scale_inv")
        if scale is None and value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise ValueError(f"from_fp8_checkpoint: {key} is {value.dtype} but the checkpoint "
                             f"has no {key}_scale_inv; an FP8 weight cannot be used without its "
                             f"128x128 block scales")
        out[key] = value if scale is None else weight_dequant(value, scale, block_size).to(dtype)
    return out
