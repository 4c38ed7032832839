"""Multi-Token Prediction (DeepSeek-V3 report §2.2, Eq. 21-25) and self-speculative decoding.

D sequential modules; module k (k = 1..D) at position i combines the previous depth's hidden
state with the embedding of the token k steps ahead and predicts the token k+1 steps ahead:

    h'_i^k   = M_k [ enorm(Emb(t_{i+k})) ; hnorm(h_i^{k-1}) ]      eh_proj: 2·dim -> dim  (Eq. 21)
    h_i^k    = Block_k(h'_i^k)          i = 0 .. T-k-1, causal, with its own MLA cache      (Eq. 22)
    P_{i+k+1}^k = softmax(head(norm_k(h_i^k)))                                             (Eq. 23)
    L_k      = CE(P^k, t_{i+k+1})       mean over the T-k positions that have a target      (Eq. 24)
    L        = L_main + (λ / D) Σ_k L_k                                                     (Eq. 25)

h^0 is the main model's final-normed hidden state. The paper writes the concatenation as
[hidden ; embedding]; the released checkpoint (and every implementation that loads it) feeds
[embedding ; hidden] to eh_proj, and so do we. Emb and head are the main model's own modules
(shared by reference, not copied); norm_k is the per-module `shared_head.norm` of the checkpoint.
Module k's Block is an MoE layer with layer_id n_layers + k - 1 (the released layer 61 for k=1).

Self-speculative decoding (greedy, batch 1): the main model has verified positions 0..n and
chosen t_{n+1}; module 1 drafts t_{n+2} from [h_n ; t_{n+1}], module k drafts t_{n+k+1} from
[h_n^{k-1} ; draft t_{n+k}]. One main-model forward over [t_{n+1}, drafts] at start_pos n+1
checks them: the longest prefix equal to the main model's argmax is kept, plus the main model's
own next token, so each step commits 1..d+1 tokens and the output equals plain greedy decoding.
Rollback is free: every cache is written at absolute positions, so the next chunk simply starts
at the first stale position and overwrites the rejected entries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_lab.mla import RMSNorm, causal_mask
from dsv3_lab.model import Block, Transformer
from dsv3_lab.rope import positions
from dsv3_lab.train import loss_precision


class MTPModule(nn.Module):
    """One MTP depth: enorm, hnorm, eh_proj, a Block and `norm` (checkpoint: shared_head.norm).

    `embed` and `head` are the main model's modules, held by reference and not registered as
    submodules, so they appear once in a state_dict (under the main model) and are never copied.
    """

    def __init__(self, model: Transformer, layer_id: int):
        super().__init__()
        args = model.args
        self.dim = args.dim
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)  # M_k
        self.block = Block(layer_id, args)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self._shared = (model.embed, model.head)  # a tuple: nn.Module does not register it
        self.freqs_cis = model.freqs_cis  # complex [max_seq_len, d_rope/2], shared table

    @property
    def embed(self) -> nn.Embedding:
        return self._shared[0]

    @property
    def head(self) -> nn.Linear:
        return self._shared[1]

    def forward(self, h_prev: torch.Tensor, ahead: torch.Tensor,
                start_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """h_prev = h^{k-1} [B, L, dim] at positions start_pos.., ahead = t_{i+k} [B, L].

        Returns (h^k [B, L, dim] for the next depth, logits [B, L, vocab] predicting t_{i+k+1}).
        """
        if h_prev.dim() != 3 or h_prev.shape[-1] != self.dim:
            raise ValueError(f"MTPModule: expected h_prev [batch, seq, dim={self.dim}], "
                             f"got {tuple(h_prev.shape)}")
        if ahead.shape != h_prev.shape[:2] or ahead.dtype != torch.long:
            raise ValueError(f"MTPModule: expected tokens as a LongTensor {tuple(h_prev.shape[:2])}"
                             f", got {ahead.dtype} {tuple(ahead.shape)}")
        seqlen = ahead.shape[1]
        e = self.enorm(self.embed(ahead))  # [B, L, dim]
        x = self.eh_proj(torch.cat([e, self.hnorm(h_prev)], dim=-1))  # [B, L, 2·dim] -> [B, L, dim]
        freqs_cis = positions(self.freqs_cis, start_pos, seqlen).to(x.device)  # [L, d/2]
        mask = causal_mask(seqlen, start_pos, x.device)  # [L, start_pos+L] or None
        h = self.block(x, start_pos, freqs_cis, mask)  # h^k [B, L, dim]
        return h, self.head(self.norm(h))  # [B, L, dim], [B, L, vocab]


class MTP(nn.Module):
    """The main model plus D sequential MTP modules (`main`, `layers`).

    `main` is registered, so `train(mtp, ...)` updates the main model and the modules together
    (parameters are de-duplicated: the shared embedding and head appear once). Dropping MTP at
    inference is just using `mtp.main`.
    """

    def __init__(self, model: Transformer, depth: int | None = None):
        super().__init__()
        if not isinstance(model, Transformer):
            raise TypeError(f"MTP: expected a dsv3_lab Transformer, got {type(model).__name__}")
        depth = model.args.n_mtp_layers if depth is None else depth
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"MTP: depth must be an int >= 0, got {depth!r}")
        self.main = model
        self.depth = depth
        n = model.args.n_layers
        self.layers = nn.ModuleList(MTPModule(model, n + k) for k in range(depth))

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every depth for a window tokens [B, T] and main hidden h^0 [B, S, dim].

        h^0 is the main model's hidden state of tokens[:, :S] at positions 0.. (S = T-1 in
        training). Depth k returns [B, L_k, vocab] with L_k = min(S, T-1) - k: row i predicts
        t_{i+k+1} = tokens[:, i+k+1] (every row has its target inside the window).
        """
        if tokens.dim() != 2 or hidden.dim() != 3 or hidden.shape[:1] != tokens.shape[:1]:
            raise ValueError(f"MTP: expected tokens [B, T] and hidden [B, S, dim], got "
                             f"{tuple(tokens.shape)} and {tuple(hidden.shape)}")
        h = hidden[:, : tokens.shape[1] - 1]  # positions with a next token [B, S', dim]
        out = []
        for k, module in enumerate(self.layers, start=1):
            length = h.shape[1] - 1  # depth k needs t_{i+k+1}: one position fewer than k-1
            if length < 1:
                raise ValueError(f"MTP: a window of {tokens.shape[1]} tokens is too short for "
                                 f"depth {k} (need at least {k + 2})")
            h, logits = module(h[:, :length], tokens[:, k:k + length])  # [B, L_k, dim/vocab]
            out.append(logits)
        return out


def mtp_loss(mtp: MTP, batch: torch.Tensor, lam: float = 0.3) -> tuple[torch.Tensor, dict]:
    """L = L_main + (λ/D) Σ_k CE_k for a batch [B, S+1]; a `loss_fn` for dsv3_lab.train.

    Metrics: main_loss, and per depth k: mtp{k}_loss, mtp{k}_acc (argmax == t_{i+k+1}).
    With depth 0 the loss is exactly next-token cross-entropy.
    """
    if batch.dim() != 2 or batch.shape[1] < 2:
        raise ValueError(f"mtp_loss: expected a batch [B, S+1], got {tuple(batch.shape)}")
    hidden = mtp.main.hidden(batch[:, :-1])  # h^0 [B, S, dim]
    logits = mtp.main.head(hidden)  # [B, S, vocab]
    loss = F.cross_entropy(loss_precision(logits).flatten(0, 1), batch[:, 1:].flatten())
    metrics = {"main_loss": float(loss.detach())}
    total = loss
    for k, lk in enumerate(mtp(batch, hidden), start=1):
        target = batch[:, k + 1:]  # t_{i+k+1} [B, S-k]
        ce = F.cross_entropy(loss_precision(lk).flatten(0, 1), target.flatten())
        total = total + lam / mtp.depth * ce
        metrics[f"mtp{k}_loss"] = float(ce.detach())
        metrics[f"mtp{k}_acc"] = float((lk.argmax(-1) == target).float().mean())
    return total, metrics


# ----------------------------------------------------------------------------- parallel baseline
class ParallelHead(nn.Module):
    """One head of Gloeckle et al. (arXiv 2404.19737): a Block on the trunk's h^0 alone.

    Head k predicts t_{i+k+1} from h_i^0 without being told t_{i+1..i+k}: hnorm, one Block,
    norm and the main model's output head (shared by reference, as in MTPModule). It has the
    MTP module's parameters minus enorm and eh_proj.
    """

    def __init__(self, model: Transformer, layer_id: int):
        super().__init__()
        args = model.args
        self.dim = args.dim
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.block = Block(layer_id, args)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self._shared = (model.head,)  # not registered: the head appears once, under `main`
        self.freqs_cis = model.freqs_cis

    def forward(self, h0: torch.Tensor) -> torch.Tensor:
        """h^0 [B, L, dim] at positions 0.. -> logits [B, L, vocab] (row i predicts t_{i+k+1})."""
        if h0.dim() != 3 or h0.shape[-1] != self.dim:
            raise ValueError(f"ParallelHead: expected h0 [batch, seq, dim={self.dim}], "
                             f"got {tuple(h0.shape)}")
        seqlen = h0.shape[1]
        freqs_cis = positions(self.freqs_cis, 0, seqlen).to(h0.device)  # [L, d/2]
        h = self.block(self.hnorm(h0), 0, freqs_cis, causal_mask(seqlen, 0, h0.device))
        return self._shared[0](self.norm(h))  # [B, L, vocab]


class ParallelMTP(nn.Module):
    """Gloeckle-style baseline with MTP's interface (`main`, `depth`, `layers`, forward), so
    `mtp_loss` trains it unchanged: D independent heads, all reading h^0 (no causal chain)."""

    def __init__(self, model: Transformer, depth: int = 1):
        super().__init__()
        if not isinstance(model, Transformer):
            raise TypeError(f"ParallelMTP: expected a dsv3_lab Transformer, got "
                            f"{type(model).__name__}")
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"ParallelMTP: depth must be an int >= 0, got {depth!r}")
        self.main, self.depth = model, depth
        n = model.args.n_layers
        self.layers = nn.ModuleList(ParallelHead(model, n + k) for k in range(depth))

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Logits per depth, shaped as MTP.forward's: depth k [B, L_k, vocab] -> t_{i+k+1}."""
        if tokens.dim() != 2 or hidden.dim() != 3 or hidden.shape[:1] != tokens.shape[:1]:
            raise ValueError(f"ParallelMTP: expected tokens [B, T] and hidden [B, S, dim], got "
                             f"{tuple(tokens.shape)} and {tuple(hidden.shape)}")
        h = hidden[:, : tokens.shape[1] - 1]  # [B, S', dim]
        out = []
        for k, head in enumerate(self.layers, start=1):
            length = h.shape[1] - k  # rows whose target t_{i+k+1} is inside the window
            if length < 1:
                raise ValueError(f"ParallelMTP: a window of {tokens.shape[1]} tokens is too "
                                 f"short for depth {k} (need at least {k + 2})")
            out.append(head(h[:, :length]))  # [B, L_k, vocab], from h^0 only
        return out


# ----------------------------------------------------------------------------- speculative decoding
@dataclass
class SpecStats:
    """What one speculative_generate call measured.

    events: one (n, depth, draft, target, accepted) per verified draft: drafted at main position
    n for position n+depth+1; target is the main model's greedy token there.
    """

    new_tokens: int = 0
    main_forwards: int = 0  # prefill + one verification per step
    mtp_forwards: int = 0  # module calls (one per depth per step)
    proposed: list[int] = field(default_factory=list)  # drafts verified, per depth
    accepted: list[int] = field(default_factory=list)  # drafts accepted, per depth
    seconds: float = 0.0
    events: list[tuple[int, int, int, int, bool]] = field(default_factory=list)

    @property
    def acceptance(self) -> list[float]:
        """Per depth: accepted / verified (depth k is verified only if depths < k were accepted)."""
        return [a / p if p else float("nan") for a, p in zip(self.accepted, self.proposed,
                                                               strict=True)]

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(self.main_forwards, 1)


@torch.no_grad()
def speculative_generate(model: Transformer, mtp: MTP, prompt: torch.Tensor,
                         max_new_tokens: int,
                         n_draft: int | None = None) -> tuple[torch.Tensor, SpecStats]:
    """Greedy self-speculative decoding of prompt [1, S0]: -> (tokens [1, S0+new], SpecStats).

    Drafts n_draft (default mtp.depth) tokens per step with MTP modules 1..n_draft, verifies
    them with one main-model forward, keeps the accepted prefix and the main model's next token.
    The tokens equal `generate(model, prompt, max_new_tokens)` (greedy).
    """
    if mtp.main is not model:
        raise ValueError("speculative_generate: mtp must be built on this model (mtp.main)")
    if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] == 0:
        raise ValueError(f"speculative_generate: expected a prompt [1, seq>=1] (batch 1), "
                         f"got {tuple(prompt.shape)}")
    depth = mtp.depth if n_draft is None else n_draft
    if not 0 <= depth <= mtp.depth or max_new_tokens < 0:
        raise ValueError(f"speculative_generate: need 0 <= n_draft <= {mtp.depth} and "
                         f"max_new_tokens >= 0, got {n_draft}, {max_new_tokens}")
    total = prompt.shape[1] + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(f"speculative_generate: prompt + max_new_tokens = {total} is past "
                         f"max_seq_len={model.args.max_seq_len}")
    stats = SpecStats(proposed=[0] * depth, accepted=[0] * depth)
    if max_new_tokens == 0:
        return prompt.clone(), stats
    modes = mtp.training
    mtp.eval()
    start = time.perf_counter()
    seq = prompt[0].tolist()  # committed tokens t_0 .. t_{n+1}
    # hist[k][:, j] = h_j^k (main hidden for k = 0); valid[k]: module k's cache and hist[k] hold
    # correct entries (all inputs committed) at positions <= valid[k]
    h = model.hidden(prompt, 0)  # prefill [1, S0, dim]
    hist = [h.new_zeros(1, total, model.args.dim) for _ in range(depth + 1)]
    valid = [-1] * (depth + 1)
    hist[0][:, : prompt.shape[1]] = h
    seq.append(int(model.head(h[:, -1]).argmax(-1)))
    n = prompt.shape[1] - 1  # last main position with a hidden state; seq has n + 2 tokens
    stats.main_forwards = 1
    while len(seq) < total:
        d = min(depth, total - len(seq) - 1)  # drafts this step (never past `total`)
        drafts: list[int] = []
        for k in range(1, d + 1):  # module k re-runs from its first stale position to n
            s = valid[k] + 1
            ahead = [seq[j + k] if j + k < len(seq) else drafts[j + k - len(seq)]
                     for j in range(s, n + 1)]  # t_{j+k}, committed or drafted
            h_k, logits = mtp.layers[k - 1](hist[k - 1][:, s:n + 1],
                                            torch.tensor([ahead], device=h.device), start_pos=s)
            hist[k][:, s:n + 1] = h_k  # [1, n-s+1, dim]
            drafts.append(int(logits[0, -1].argmax()))
            stats.mtp_forwards += 1
        chunk = torch.tensor([[seq[n + 1]] + drafts], device=h.device)  # [1, d+1] at n+1..
        h = model.hidden(chunk, n + 1)  # [1, d+1, dim]
        hist[0][:, n + 1:n + 2 + d] = h
        greedy = model.head(h)[0].argmax(-1).tolist()  # main's tokens for n+2 .. n+d+2
        stats.main_forwards += 1
        a = 0
        while a < d and drafts[a] == greedy[a]:
            a += 1
        for k in range(1, min(a + 1, d) + 1):  # verified drafts: all before them accepted
            stats.proposed[k - 1] += 1
            stats.accepted[k - 1] += k <= a
            stats.events.append((n, k, drafts[k - 1], greedy[k - 1], k <= a))
        seq += drafts[:a] + [greedy[a]]
        n_new = n + a + 1
        for k in range(1, d + 1):  # entries at j are right iff t_{j+k} was committed
            valid[k] = max(-1, min(n, n_new - k))
        n = n_new
    stats.seconds = time.perf_counter() - start
    stats.new_tokens = max_new_tokens
    mtp.train(modes)
    return torch.tensor([seq[:total]], device=prompt.device), stats
