"""Concept diagrams for DeepSeekMoE routing (notebook 04), drawn by code.

    draw_routing_pipeline()                       one token through the V3 gate, step by step
    draw_token_scores(biased, kept, chosen)       one token's biased scores as a groups × experts
                                                  heatmap: kept groups framed, chosen experts marked

The pipeline follows V3 §2.1.2 (Eq. 13-16, node-limited routing) and the official `Gate`:

    s = sigmoid(u·e_i)  ->  s + b  ->  group score = top-2 sum per group  ->  keep the best
    n_limited_groups, the rest -inf  ->  top-K of s + b  ->  g = s / Σ s · route_scale (unbiased)
    ->  Σ g_i FFN_i(u) + shared expert
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

from dsv3_lab.diagrams import FONT, arrow, box, canvas, label


def draw_routing_pipeline():
    """The V3 router for one token at the 671B shape, as two rows of boxes; returns the Figure.

    Top row: what chooses the experts (biased scores, groups, top-K). Bottom row: what weighs
    them (the unbiased s). The dashed arrow is the only path from s to the weights: the bias b
    never reaches them.
    """
    fig, ax = canvas(10.4, 3.9)
    w, h = 2.15, 0.95
    top, bottom = 2.85, 0.9
    xs = [1.2, 3.75, 6.3, 8.95]
    steps = [
        ("u_t [7168]\n→ s = σ(u_t·e_i)\n[256] (Eq. 15)", "tensor"),
        ("s + b  [256]\nb: bias, only\nfor choosing (Eq. 16)", "op"),
        ("8 groups of 32:\ngroup score =\nsum of top-2 s + b", "op"),
        ("keep best 4 groups,\nothers → −∞;\ntop-8 of s + b", "op"),
    ]
    for x, (text, kind) in zip(xs, steps, strict=True):
        box(ax, x, top, w, h, text, kind)
    for a, b in zip(xs[:-1], xs[1:], strict=True):
        arrow(ax, (a + w / 2, top), (b - w / 2, top))
    bottom_steps = [
        (xs[1], "weights g = s of the\nchosen 8 / their sum\n× route_scale 2.5 (Eq. 13)", "out"),
        (xs[2], "8 routed experts\nFFN_i(u_t)\n(SwiGLU, width 2048)", "weight"),
        (xs[3], "Σ g_i FFN_i(u_t)\n+ shared expert(u_t)\n(Eq. 12)", "out"),
    ]
    for x, text, kind in bottom_steps:
        box(ax, x, bottom, w, h, text, kind)
    # the chosen indices come down from the top-8 box; the unbiased s comes from the first box
    arrow(ax, (xs[3] - 0.3, top - h / 2), (xs[1] + w / 2 - 0.05, bottom + h / 2 - 0.05),
          text="indices", text_offset=(0.1, 0.12))
    arrow(ax, (xs[0], top - h / 2), (xs[1] - w / 2, bottom), text="unbiased s",
          linestyle="--", text_offset=(0.12, 0.08))
    arrow(ax, (xs[1] + w / 2, bottom), (xs[2] - w / 2, bottom))
    arrow(ax, (xs[2] + w / 2, bottom), (xs[3] - w / 2, bottom))
    label(ax, 0.1, 3.65, "choose (biased):", fontsize=FONT, color="#ff7f0e", weight="bold")
    label(ax, 0.1, 0.85, "weigh (unbiased):", fontsize=FONT, color="#9467bd", weight="bold")
    return fig


def draw_token_scores(biased: torch.Tensor, kept, chosen, route_groups: int = 2):
    """Heatmap of one token's biased scores s + b, shaped [groups, experts per group].

    `kept` are the kept group indices, `chosen` the chosen expert indices (flat, 0..E-1).
    Kept groups get a frame, the top-`route_groups` scores of every group (which make its group
    score) a small dot, the chosen experts a star. Returns the Figure.
    """
    if biased.dim() != 2:
        raise ValueError(f"draw_token_scores: expected scores [groups, experts per group], "
                         f"got shape {tuple(biased.shape)}")
    n_groups, size = biased.shape
    values = biased.detach().to(torch.float64)
    group_scores = values.topk(route_groups, dim=-1).values.sum(-1)  # [G]
    fig, (ax, side) = plt.subplots(1, 2, figsize=(9.6, 3.6), width_ratios=(5.2, 1),
                                   sharey=True)
    image = ax.imshow(values.numpy(), cmap="viridis", aspect="auto")
    for g in range(n_groups):
        for e in values[g].topk(route_groups).indices.tolist():
            ax.plot(e, g, "o", color="white", ms=3.5)
    for g in kept:
        ax.add_patch(Rectangle((-0.5, g - 0.5), size, 1, fill=False, edgecolor="#d62728", lw=2.2))
    chosen = [int(i) for i in chosen]
    ax.plot([i % size for i in chosen], [i // size for i in chosen], "*", color="#ff7f0e",
            ms=13, mec="black", mew=0.6, label=f"chosen {len(chosen)} experts", ls="none")
    ax.set_xlabel(f"expert within its group (0..{size - 1})")
    ax.set_ylabel("group (node)")
    ax.set_yticks(range(n_groups))
    ax.set_xticks(range(0, size, 4))
    ax.grid(False)
    ax.set_title("one token's s + b: kept groups framed, top-2 per group dotted")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)
    colors = ["#d62728" if g in set(int(k) for k in kept) else "#7f7f7f" for g in range(n_groups)]
    side.barh(range(n_groups), group_scores.numpy(), color=colors)
    side.set_xlabel("group score")
    side.set_xlim(group_scores.min().item() * 0.95, group_scores.max().item() * 1.02)
    side.set_title("top-2 sum")
    fig.colorbar(image, ax=[ax, side], label="s + b", fraction=0.04, pad=0.02)
    return fig
