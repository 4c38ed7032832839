"""KV-cache accounting for MHA, GQA, MQA and MLA, and a decode loop for self-caching modules.

Values cached per token per layer (DeepSeek-V2 Table 1; n_h heads, n_g key/value groups, head
dims d_k and d_v, which are both d_h in the table):

    MHA   n_h · (d_k + d_v)        = 2 n_h d_h
    GQA   n_g · (d_k + d_v)        = 2 n_g d_h       (n_h / n_g query heads share a key/value head)
    MQA   d_k + d_v                = 2 d_h           (one key/value head)
    MLA   d_c + d_h^R                                (latent c_kv and the shared rotary key k_pe)

    bytes per token = n_layers · values · bytes_per_element

DeepSeek-V2/V3 use d_c = 4 d_h and d_h^R = d_h / 2, so MLA caches 4.5 d_h values per layer: the
cache of a GQA with 2.25 groups. In BF16 (ISCA 2025, Table 1): DeepSeek-V3 (512 + 64)·61·2 =
70,272 B per token; Qwen-2.5-72B 2·8·128·80·2 = 327,680 B; LLaMA-3.1-405B 2·8·128·126·2 = 516,096 B.

Decoding (`decode`): a prefill of the prompt at start_pos 0, then one position per call at
start_pos = positions so far; every attention layer reads the earlier positions from its own
cache. mode="recompute" instead runs the whole prefix from position 0 at every step (no cache
reuse), the reference that both cached forms must equal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from dsv3_lab.config import ModelArgs
from dsv3_lab.mla import causal_mask
from dsv3_lab.rope import positions

KINDS = ("mha", "gqa", "mqa", "mla")
MODES = ("cache", "recompute")


@dataclass(frozen=True)
class CacheSpec:
    """The shape of one model's KV cache; see the module docstring for the formulas."""

    name: str
    kind: str  # "mha" | "gqa" | "mqa" | "mla"
    n_layers: int
    n_kv_heads: int = 0  # mha: n_h, gqa: n_g, mqa: 1; unused for mla
    k_head_dim: int = 0  # per key head (for MLA's expanded form: d_nope + d_rope)
    v_head_dim: int = 0
    kv_lora_rank: int = 0  # mla: d_c
    qk_rope_head_dim: int = 0  # mla: d_h^R
    bytes_per_element: float = 2.0  # BF16

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"CacheSpec.kind must be one of {KINDS}, got {self.kind!r}")
        need = ("kv_lora_rank", "qk_rope_head_dim") if self.kind == "mla" else (
            "n_kv_heads", "k_head_dim", "v_head_dim")
        for name in ("n_layers",) + need:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CacheSpec.{name} must be a positive integer for kind "
                                 f"{self.kind!r}, got {value!r}")
        if self.kind == "mqa" and self.n_kv_heads != 1:
            raise ValueError(f"CacheSpec: MQA has one key/value head, got n_kv_heads="
                             f"{self.n_kv_heads}")
        if not self.bytes_per_element > 0:
            raise ValueError(f"CacheSpec.bytes_per_element must be > 0, got "
                             f"{self.bytes_per_element}")

    @property
    def values_per_layer(self) -> int:
        """Values cached per token in one layer."""
        if self.kind == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.n_kv_heads * (self.k_head_dim + self.v_head_dim)

    @property
    def values_per_token(self) -> int:
        """Values cached per token over all layers."""
        return self.n_layers * self.values_per_layer

    @property
    def bytes_per_token(self) -> float:
        return self.values_per_token * self.bytes_per_element

    def cache_bytes(self, seq_len: int, batch_size: int = 1) -> float:
        """Bytes of the whole cache for batch_size sequences of seq_len tokens."""
        if seq_len < 0 or batch_size < 0:
            raise ValueError(f"cache_bytes: seq_len and batch_size must be >= 0, got "
                             f"{seq_len}, {batch_size}")
        return self.bytes_per_token * seq_len * batch_size

    def gqa_groups(self, head_dim: int) -> float:
        """n_g of the GQA (key and value heads of head_dim) whose cache equals this one."""
        return self.values_per_layer / (2 * head_dim)

    def with_bytes(self, bytes_per_element: float) -> CacheSpec:
        """The same cache stored with another element size (e.g. 1 for FP8, 0.75 for 6 bits)."""
        return replace(self, bytes_per_element=bytes_per_element)


def mha(name: str, n_layers: int, n_heads: int, head_dim: int, v_head_dim: int | None = None,
        bytes_per_element: float = 2.0) -> CacheSpec:
    return CacheSpec(name, "mha", n_layers, n_heads, head_dim, v_head_dim or head_dim,
                     bytes_per_element=bytes_per_element)


def gqa(name: str, n_layers: int, n_groups: int, head_dim: int,
        bytes_per_element: float = 2.0) -> CacheSpec:
    return CacheSpec(name, "gqa", n_layers, n_groups, head_dim, head_dim,
                     bytes_per_element=bytes_per_element)


def mqa(name: str, n_layers: int, head_dim: int, bytes_per_element: float = 2.0) -> CacheSpec:
    return CacheSpec(name, "mqa", n_layers, 1, head_dim, head_dim,
                     bytes_per_element=bytes_per_element)


def mla(name: str, n_layers: int, kv_lora_rank: int, qk_rope_head_dim: int,
        bytes_per_element: float = 2.0) -> CacheSpec:
    return CacheSpec(name, "mla", n_layers, kv_lora_rank=kv_lora_rank,
                     qk_rope_head_dim=qk_rope_head_dim, bytes_per_element=bytes_per_element)


def from_args(args: ModelArgs, attn_impl: str = "absorb", bytes_per_element: float = 2.0,
              name: str = "") -> CacheSpec:
    """The cache dsv3_lab.mla.MLA keeps: latent ("absorb") or expanded keys/values ("naive")."""
    if attn_impl == "absorb":
        return mla(name or "MLA latent", args.n_layers, args.kv_lora_rank, args.qk_rope_head_dim,
                   bytes_per_element)
    if attn_impl == "naive":
        return mha(name or "MLA expanded", args.n_layers, args.n_heads, args.qk_head_dim,
                   args.v_head_dim, bytes_per_element)
    raise ValueError(f"from_args: attn_impl must be 'naive' or 'absorb', got {attn_impl!r}")


#: Published configurations (BF16 caches). DeepSeek-67B (DeepSeek LLM: 95 layers, GQA with 8
#: key/value heads of 128) is the baseline of V2's "93.3% smaller KV cache".
KNOWN: dict[str, CacheSpec] = {
    "DeepSeek-V3": from_args(ModelArgs.v3_671b(), "absorb", name="DeepSeek-V3"),
    "DeepSeek-V2": mla("DeepSeek-V2", 60, 512, 64),
    "DeepSeek-67B": gqa("DeepSeek-67B", 95, 8, 128),
    "Qwen-2.5-72B": gqa("Qwen-2.5-72B", 80, 8, 128),
    "LLaMA-3.1-405B": gqa("LLaMA-3.1-405B", 126, 8, 128),
}


# ----------------------------------------------------------------------------- measuring
def allocated_cache_bytes(module: nn.Module) -> int:
    """Bytes of the cache tensors a module allocated: its non-persistent buffers.

    (dsv3_lab's MLA registers its caches as non-persistent buffers, so they stay out of the
    state dict; persistent buffers such as the MoE gate bias are not counted.)
    """
    persistent = set(module.state_dict(keep_vars=True))
    return sum(b.numel() * b.element_size() for name, b in module.named_buffers()
               if name not in persistent)


def max_seq_len_of(module: nn.Module) -> int | None:
    """The smallest `max_seq_len` attribute of the module or its submodules (None if none)."""
    limits = [getattr(m, "max_seq_len", None) for m in module.modules()]
    limits.append(getattr(getattr(module, "args", None), "max_seq_len", None))  # Transformer
    limits = [n for n in limits if isinstance(n, int)]
    return min(limits) if limits else None


class AttentionDecoder(nn.Module):
    """Wrap an attention module attn(x, start_pos, freqs_cis, mask) as step(x, start_pos).

    Supplies the rotary rows of the positions and the causal mask, so a bare attention layer
    (x [B, S, dim] -> [B, S, dim]) can be driven by `decode` with given inputs.
    """

    def __init__(self, attn: nn.Module, freqs_cis: torch.Tensor):
        super().__init__()
        self.attn, self.freqs_cis = attn, freqs_cis

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        seqlen = x.shape[1]
        freqs = positions(self.freqs_cis, start_pos, seqlen).to(x.device)  # [S, d_rope/2]
        return self.attn(x, start_pos, freqs, causal_mask(seqlen, start_pos, x.device))


@dataclass
class DecodeResult:
    """What `decode` produced and measured."""

    inputs: torch.Tensor  # [B, S0 + steps, ...]: the prompt, then what each step fed in
    outputs: torch.Tensor  # [B, S0 + steps, ...]: the output at every position fed in
    step_seconds: list[float] = field(default_factory=list)  # wall time of each decode step
    cache_bytes: int = 0  # bytes of cache tensors the model has allocated


@torch.no_grad()
def decode(model: Callable[[torch.Tensor, int], torch.Tensor], prompt: torch.Tensor,
           steps: int, given: torch.Tensor | None = None, mode: str = "cache") -> DecodeResult:
    """Prefill `prompt` [B, S0, ...], then decode `steps` positions one at a time.

    model(inputs [B, S, ...], start_pos) -> outputs [B, S, ...] and keeps its own cache.
    The input of each step is given[:, i] when `given` [B, steps, ...] is passed, otherwise the
    greedy token outputs[:, -1].argmax(-1) (outputs are then logits [B, S, vocab]).
    mode "cache": each step feeds one position at start_pos = positions so far;
    mode "recompute": each step runs the whole sequence from position 0 and keeps the last output.
    """
    if mode not in MODES:
        raise ValueError(f"decode: mode must be one of {MODES}, got {mode!r}")
    if prompt.dim() < 2 or prompt.shape[1] == 0:
        raise ValueError(f"decode: expected a prompt [batch, seq>=1, ...], got "
                         f"{tuple(prompt.shape)}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"decode: steps must be an int >= 0, got {steps!r}")
    if given is not None and (given.shape[:2] != (prompt.shape[0], steps)
                              or given.shape[2:] != prompt.shape[2:]):
        raise ValueError(f"decode: expected given of shape {(prompt.shape[0], steps)} + "
                         f"{tuple(prompt.shape[2:])}, got {tuple(given.shape)}")
    if given is None and prompt.dtype != torch.long:
        raise TypeError("decode: greedy decoding needs a LongTensor prompt of token ids; pass "
                        "`given` inputs to decode hidden states")
    total, limit = prompt.shape[1] + steps, None
    if isinstance(model, nn.Module):
        limit = max_seq_len_of(model)
    if limit is not None and total > limit:
        raise ValueError(f"decode: prompt ({prompt.shape[1]}) + steps ({steps}) = {total} "
                         f"positions are past the cache (max_seq_len={limit})")
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        inputs, outputs = prompt, [model(prompt, 0)]  # prefill: [B, S0, ...]
        seconds = []
        for i in range(steps):
            nxt = given[:, i : i + 1] if given is not None else \
                outputs[-1][:, -1:].argmax(-1)  # [B, 1, ...]
            inputs = torch.cat([inputs, nxt.to(inputs.dtype)], dim=1)
            start = time.perf_counter()
            if mode == "cache":
                out = model(nxt, inputs.shape[1] - 1)  # [B, 1, ...]
            else:
                out = model(inputs, 0)[:, -1:]  # whole prefix again, keep the last position
            seconds.append(time.perf_counter() - start)
            outputs.append(out)
    finally:
        if was_training:
            model.train()
    cache = allocated_cache_bytes(model) if isinstance(model, nn.Module) else 0
    return DecodeResult(inputs, torch.cat(outputs, dim=1), seconds, cache)
