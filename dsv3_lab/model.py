"""The DeepSeek-V3 Transformer: pre-norm blocks of MLA + (dense FFN | DeepSeekMoE).

    h⁰ = embed(tokens)                                                  [B, S, dim]
    for layer l:   x = x + attn(attn_norm(x))                            MLA, its own cache
                   x = x + ffn(ffn_norm(x))      dense MLP for l < n_dense_layers, MoE after
    logits = head(norm(h^L))                                            [B, S, vocab_size]

Embedding and output head are separate (untied) matrices. `forward` returns the logits of every
position (the official inference code keeps only the last one). Decoding: a prefill at
start_pos=0, then one token per call at start_pos = tokens so far; every MLA layer reads the
earlier positions from its cache.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3_lab.config import ModelArgs, check_args
from dsv3_lab.mla import MLA, RMSNorm, causal_mask
from dsv3_lab.moe import MLP, MoE
from dsv3_lab.rope import positions, precompute_freqs_cis


class Block(nn.Module):
    """One layer: x + attn(attn_norm(x)), then + ffn(ffn_norm(x))."""

    def __init__(self, layer_id: int, args: ModelArgs, attn_impl: str = "absorb",
                 dispatch: str = "sorted"):
        super().__init__()
        check_args(args, "Block")
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args, attn_impl)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        if layer_id < args.n_dense_layers:
            self.ffn = MLP(args.dim, args.inter_dim)
        else:
            self.ffn = MoE(args, dispatch)

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), start_pos, freqs_cis, mask)  # [B, S, dim]
        return x + self.ffn(self.ffn_norm(x))  # [B, S, dim]


class Transformer(nn.Module):
    """DeepSeek-V3 main model (no MTP: see dsv3_lab.mtp)."""

    def __init__(self, args: ModelArgs, attn_impl: str = "absorb", dispatch: str = "sorted"):
        super().__init__()
        self.args = check_args(args, "Transformer")
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(
            Block(i, args, attn_impl, dispatch) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
        # complex [max_seq_len, d_rope/2] (complex128 when built under float64, as the notebooks
        # build it, complex64 under float32); a plain attribute, not a buffer, because
        # Module.to(dtype) would cast a complex buffer to real and discard the sines
        self.freqs_cis = precompute_freqs_cis(args)

    def hidden(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Final-normed hidden states [B, S, dim] of tokens [B, S] at start_pos.. (MTP input)."""
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"Transformer: expected tokens as a LongTensor [batch, seq], got "
                             f"{tokens.dtype} {tuple(tokens.shape)}")
        if tokens.numel() == 0:
            raise ValueError(f"Transformer: expected at least one sequence and one token, got "
                             f"tokens of shape {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.args.vocab_size):
            raise ValueError(f"Transformer: token ids must be in [0, {self.args.vocab_size})")
        seqlen = tokens.shape[1]
        freqs_cis = positions(self.freqs_cis, start_pos, seqlen).to(tokens.device)  # [S, d/2]
        mask = causal_mask(seqlen, start_pos, tokens.device)  # [S, start_pos+S] or None
        h = self.embed(tokens)  # [B, S, dim]
        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask)
        return self.norm(h)  # [B, S, dim]

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Logits [B, S, vocab_size] for tokens [B, S] at positions start_pos.."""
        return self.head(self.hidden(tokens, start_pos))

    def moe_layers(self) -> list[MoE]:
        """The MoE modules, in layer order (layers n_dense_layers .. n_layers-1)."""
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Prefill the prompt [B, S0], then decode one token per step with the caches.

    temperature 0 = greedy (argmax); otherwise sample from softmax(logits / temperature),
    optionally restricted to the top_k logits. Returns [B, S0 + max_new_tokens].
    """
    if not isinstance(prompt, torch.Tensor) or prompt.dtype != torch.long:
        raise TypeError(f"generate: expected the prompt as a LongTensor of token ids, got "
                        f"{getattr(prompt, 'dtype', type(prompt).__name__)}")
    if prompt.dim() != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(f"generate: expected a prompt [batch>=1, seq>=1], got "
                         f"{tuple(prompt.shape)}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
        raise TypeError(f"generate: max_new_tokens must be an int, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"generate: temperature must be a number, got {temperature!r}")
    if max_new_tokens < 0 or temperature < 0:
        raise ValueError(f"generate: max_new_tokens and temperature must be >= 0, got "
                         f"{max_new_tokens}, {temperature}")
    vocab = model.args.vocab_size
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)
                              or not 1 <= top_k <= vocab):
        raise ValueError(f"generate: top_k must be None or an int in [1, vocab_size={vocab}], "
                         f"got {top_k!r}")
    total = prompt.shape[1] + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(f"generate: prompt + max_new_tokens = {total} is past max_seq_len="
                         f"{model.args.max_seq_len}")
    was_training = model.training
    model.eval()
    tokens, start = prompt, 0
    for _ in range(max_new_tokens):
        logits = model(tokens[:, start:], start)[:, -1]  # [B, vocab]
        logits = logits if logits.dtype == torch.float64 else logits.float()
        start = tokens.shape[1]
        if temperature == 0:
            nxt = logits.argmax(dim=-1)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)  # [B, S+1]
    model.train(was_training)
    return tokens
