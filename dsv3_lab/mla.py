"""Multi-head Latent Attention (DeepSeek-V3 report, Eq. 1-11), naive and absorbed.

For a token h_t [dim], H heads, d_nope = qk_nope_head_dim, d_rope = qk_rope_head_dim:

    c_q      = q_norm(W_DQ h_t)                        [q_lora_rank]            (Eq. 6)
    q_nope   = W_UQ c_q,  q_pe = RoPE(W_QR c_q)       [H, d_nope], [H, d_rope] (Eq. 7-8; wq_b)
    c_kv     = kv_norm(W_DKV h_t)                      [kv_lora_rank]           (Eq. 1; wkv_a)
    k_pe     = RoPE(W_KR h_t)                          [d_rope], ONE head shared (Eq. 3; wkv_a)
    k_nope   = W_UK c_kv,  v = W_UV c_kv               [H, d_nope], [H, d_v]    (Eq. 2, 5; wkv_b)
    q = [q_nope ; q_pe],  k = [k_nope ; k_pe]          head dim d_nope + d_rope (Eq. 4, 9)
    o_h      = Σ_j softmax_j(q_h · k_{j,h} · scale) v_{j,h}                     (Eq. 10)
    u_t      = W_O [o_1 ; ... ; o_H]                                            (Eq. 11; wo)

Absorbed form (the official default): the score q_nope·k_nope = q_nope·(W_UK c_kv)
= (W_UKᵀ q_nope)·c_kv, so the query is moved into the latent space once and keys are never
expanded; likewise o_h = W_UV (Σ_j p_j c_kv_j). The cache then holds only c_kv (after kv_norm)
and the rotated k_pe: kv_lora_rank + qk_rope_head_dim values per token per layer (576 for V3).

Tensor layout: [batch, seq, heads, head_dim]. Softmax in float32.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from dsv3_lab.config import ModelArgs, check_args
from dsv3_lab.rope import apply_rotary_emb, softmax_scale

ATTN_IMPLS = ("naive", "absorb")


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight, computed in float32 (float64 stays float64)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm: expected last dimension {self.dim}, got {tuple(x.shape)}")
        if x.dtype not in (self.weight.dtype, torch.float64):  # float64 stays float64
            raise TypeError(f"RMSNorm: expected a {self.weight.dtype} (the module's dtype) or "
                            f"float64 input, got {x.dtype}; convert the input, or the module "
                            f"with .to(dtype)")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = x.to(work)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(work) * y).to(x.dtype)


def causal_mask(seqlen: int, start_pos: int = 0, device=None) -> torch.Tensor | None:
    """Additive mask [seqlen, start_pos + seqlen]: query i (position start_pos+i) sees keys <= it.

    None for a single query token (it may see every cached key).
    """
    if seqlen == 1:
        return None
    mask = torch.full((seqlen, start_pos + seqlen), float("-inf"), device=device)
    return mask.triu_(start_pos + 1)  # [S, start_pos + S]


class MLA(nn.Module):
    """Multi-head Latent Attention with official submodule names and its own KV cache."""

    def __init__(self, args: ModelArgs, attn_impl: str = "absorb"):
        super().__init__()
        check_args(args, "MLA")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"MLA: attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.attn_impl = attn_impl
        self.dim, self.n_heads = args.dim, args.n_heads
        self.q_lora_rank, self.kv_lora_rank = args.q_lora_rank, args.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = args.qk_nope_head_dim, args.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = args.qk_head_dim, args.v_head_dim
        self.max_batch_size, self.max_seq_len = args.max_batch_size, args.max_seq_len
        H = self.n_heads
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(self.dim, H * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(self.dim, self.q_lora_rank, bias=False)  # W_DQ
            self.q_norm = RMSNorm(self.q_lora_rank)
            self.wq_b = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)  # W_UQ, W_QR
        self.wkv_a = nn.Linear(self.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank)
        self.wkv_b = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim),
                               bias=False)  # W_UK, W_UV
        self.wo = nn.Linear(H * self.v_head_dim, self.dim, bias=False)
        self.softmax_scale = softmax_scale(args)
        # the cache holds valid entries for rows < cache_batch at positions < cache_len
        self.cache_len, self.cache_batch = 0, 0
        B, T = args.max_batch_size, args.max_seq_len
        if attn_impl == "naive":  # expanded keys and values: H·(d_qk + d_v) per token
            self.register_buffer("k_cache", torch.zeros(B, T, H, self.qk_head_dim),
                                 persistent=False)
            self.register_buffer("v_cache", torch.zeros(B, T, H, self.v_head_dim),
                                 persistent=False)
        else:  # latent: kv_lora_rank + qk_rope_head_dim per token
            self.register_buffer("kv_cache", torch.zeros(B, T, self.kv_lora_rank),
                                 persistent=False)
            self.register_buffer("pe_cache", torch.zeros(B, T, self.qk_rope_head_dim),
                                 persistent=False)

    def _check(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MLA: expected x of shape [batch, seq, dim={self.dim}], "
                             f"got {tuple(x.shape)}")
        bsz, seqlen, _ = x.shape
        if x.dtype != self.wkv_a.weight.dtype:
            raise TypeError(f"MLA: expected a {self.wkv_a.weight.dtype} input (the module's "
                            f"dtype), got {x.dtype}; convert the input, or the module with "
                            f".to(dtype)")
        if bsz == 0 or seqlen == 0:
            raise ValueError(f"MLA: expected at least one sequence and one position, got x of "
                             f"shape {tuple(x.shape)}")
        if not isinstance(start_pos, int) or isinstance(start_pos, bool):
            raise TypeError(f"MLA: start_pos must be an int, got {start_pos!r}")
        if bsz > self.max_batch_size:
            raise ValueError(f"MLA: batch {bsz} is larger than the cache (max_batch_size="
                             f"{self.max_batch_size})")
        if start_pos < 0 or start_pos + seqlen > self.max_seq_len:
            raise ValueError(f"MLA: positions {start_pos}..{start_pos + seqlen - 1} are past the "
                             f"cache (max_seq_len={self.max_seq_len})")
        if freqs_cis.shape[0] != seqlen:
            raise ValueError(f"MLA: freqs_cis has {freqs_cis.shape[0]} positions, x has {seqlen}")
        if start_pos > 0 and (start_pos > self.cache_len or bsz > self.cache_batch):
            raise ValueError(
                f"MLA: start_pos={start_pos} (batch {bsz}) would read cache positions that were "
                f"never written: the cache holds positions 0..{self.cache_len - 1} of "
                f"{self.cache_batch} sequences; prefill from start_pos=0 first, then continue at "
                f"start_pos <= {self.cache_len}")

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, S, dim] at positions start_pos..start_pos+S-1 -> [B, S, dim].

        Keys and values of earlier positions come from the cache; this chunk's are written to it
        (detached) and used directly, so gradients flow through a plain start_pos=0 forward.
        """
        self._check(x, start_pos, freqs_cis)
        bsz, seqlen, _ = x.shape
        end_pos = start_pos + seqlen
        # positions past end_pos are stale from now on (a rollback or a new, shorter prefill)
        self.cache_len = end_pos
        self.cache_batch = bsz if start_pos == 0 else min(bsz, self.cache_batch)
        H, d_nope = self.n_heads, self.qk_nope_head_dim
        if self.q_lora_rank == 0:
            q = self.wq(x)  # [B, S, H·d_qk]
        else:
            q = self.wq_b(self.q_norm(self.wq_a(x)))  # c_q [B, S, q_lora_rank] -> [B, S, H·d_qk]
        q = rearrange(q, "b s (h d) -> b s h d", h=H)  # split heads [B, S, H, d_qk]
        q_nope, q_pe = torch.split(q, [d_nope, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs_cis)  # [B, S, H, d_rope]
        kv = self.wkv_a(x)  # [B, S, kv_lora_rank + d_rope]
        kv, k_pe = torch.split(kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis)  # [B, S, 1, d_rope]
        c_kv = self.kv_norm(kv)  # [B, S, kv_lora_rank]
        if self.attn_impl == "naive":
            kv_up = rearrange(self.wkv_b(c_kv), "b s (h d) -> b s h d", h=H)  # [B,S,H,d_nope+d_v]
            k_nope, v = torch.split(kv_up, [d_nope, self.v_head_dim], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)  # [B, S, H, d_qk]
            k = torch.cat([k_nope, k_pe.expand(-1, -1, H, -1)], dim=-1)  # [B, S, H, d_qk]
            k = self._update("k_cache", k, bsz, start_pos)  # [B, T, H, d_qk]
            v = self._update("v_cache", v, bsz, start_pos)  # [B, T, H, d_v]
            scores = torch.einsum("bshd,bthd->bsht", q, k) * self.softmax_scale  # [B, S, H, T]
        else:
            w = rearrange(self.wkv_b.weight, "(h d) c -> h d c", h=H)  # [W_UK ; W_UV] per head
            q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w[:, :d_nope])  # W_UKᵀ q [B,S,H,c]
            c_kv = self._update("kv_cache", c_kv, bsz, start_pos)  # [B, T, kv_lora_rank]
            k_pe = self._update("pe_cache", k_pe.squeeze(2), bsz, start_pos)  # [B, T, d_rope]
            scores = (torch.einsum("bshc,btc->bsht", q_lat, c_kv)
                      + torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * self.softmax_scale
        if mask is not None:
            if tuple(mask.shape) != (seqlen, end_pos):
                raise ValueError(f"MLA: expected mask of shape [{seqlen}, {end_pos}], "
                                 f"got {tuple(mask.shape)}")
            scores = scores + mask.unsqueeze(1).to(scores.dtype)  # [S, 1, T] broadcast
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        probs = scores.softmax(dim=-1, dtype=work).type_as(x)  # [B, S, H, T]
        if self.attn_impl == "naive":
            o = torch.einsum("bsht,bthd->bshd", probs, v)  # [B, S, H, d_v]
        else:
            o_lat = torch.einsum("bsht,btc->bshc", probs, c_kv)  # [B, S, H, kv_lora_rank]
            o = torch.einsum("bshc,hdc->bshd", o_lat, w[:, d_nope:])  # W_UV o_lat [B,S,H,d_v]
        return self.wo(rearrange(o, "b s h d -> b s (h d)"))  # merge heads -> [B, S, dim]

    def _update(self, name: str, new: torch.Tensor, bsz: int, start_pos: int) -> torch.Tensor:
        """Write `new` (this chunk) into cache `name`; return [cached prefix ; new] along seq."""
        cache = getattr(self, name)
        end_pos = start_pos + new.shape[1]
        with torch.no_grad():
            if cache.dtype != new.dtype:
                raise TypeError(f"MLA: cache {name} is {cache.dtype} but activations are "
                                f"{new.dtype}; convert the whole module (e.g. .double())")
            cache[:bsz, start_pos:end_pos] = new.detach()
        if start_pos == 0:
            return new
        if not new.requires_grad:  # decoding: read the cache in place, no copy of the prefix
            return cache[:bsz, :end_pos]
        return torch.cat([cache[:bsz, :start_pos], new], dim=1)

    def cache_bytes(self) -> int:
        """Bytes of the cache tensors this module allocated (max_batch_size × max_seq_len)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

