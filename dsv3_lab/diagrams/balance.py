"""Concept diagrams for auxiliary-loss-free load balancing (notebook 05), drawn by code.

    draw_update_rule(load, gamma)                       one step of the bias rule from a batch's
                                                        loads: b_i ← b_i + γ·sign(c̄ − c_i)
    draw_bias_choice(scores, bias_before, bias_after, k)  one token's s + b before and after an
                                                        update, with its top-k marked

The rule (V3 §2.1.2, LF Algorithm 1) and the choice (V3 Eq. 16) are the ones `dsv3_lab.balance`
and `dsv3_lab.moe.Gate` implement; the figures only draw the tensors they are given.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

UP, DOWN, CHOSEN, OTHER = "#2ca02c", "#d62728", "#ff7f0e", "#c7c7c7"


def _vector(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.numel() < 2:
        raise ValueError(f"{name}: expected a 1-D tensor with one value per expert, got {x!r}")
    return x.detach().to(torch.float64)


def draw_update_rule(load: torch.Tensor, gamma: float):
    """Bars of the batch load c_i per expert, the mean c̄, and the step ±γ each bias takes."""
    c = _vector(load, "draw_update_rule")
    step = gamma * torch.sign(c.mean() - c)  # [E]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.2, 4.6), sharex=True, height_ratios=(2.2, 1))
    experts = torch.arange(len(c))
    colors = [DOWN if v < 0 else UP if v > 0 else OTHER for v in step.tolist()]
    ax.bar(experts, c, color=colors)
    ax.axhline(float(c.mean()), color="black", ls="--", lw=1.2, label="mean load c̄")
    ax.set_ylabel("tokens $c_i$ (batch)")
    ax.set_title("$b_i \\leftarrow b_i + \\gamma\\,\\mathrm{sign}(\\bar c - c_i)$ after every step")
    ax.legend(loc="upper right")
    ax2.bar(experts, step / gamma, color=colors)
    ax2.axhline(0, color="black", lw=0.8)
    ax2.set_ylim(-1.5, 1.5)
    ax2.set_yticks([-1, 0, 1], ["−γ", "0", "+γ"])
    ax2.set_ylabel("bias step")
    ax2.set_xlabel("expert i  (red: overloaded, pushed down; green: underloaded, lifted)")
    ax2.set_xticks(experts.tolist()[:: max(1, len(c) // 8)])
    fig.tight_layout()
    return fig


def draw_bias_choice(scores: torch.Tensor, bias_before: torch.Tensor, bias_after: torch.Tensor,
                     chosen_before, chosen_after):
    """One token's biased scores s + b before and after an update; the chosen experts in orange.

    `chosen_before` / `chosen_after` are the expert indices the gate chose (with group-limited
    routing they need not be the plain top-k of s + b). Ticks mark the unbiased s.
    """
    s = _vector(scores, "draw_bias_choice")
    before = _vector(bias_before, "draw_bias_choice")
    after = _vector(bias_after, "draw_bias_choice")
    panels = [("before", s + before, set(map(int, chosen_before))),
              ("after", s + after, set(map(int, chosen_after)))]
    if len(panels[0][2]) != len(panels[1][2]) or not panels[0][2]:
        raise ValueError("draw_bias_choice: expected the same number (>= 1) of chosen experts "
                         "before and after")
    k = len(panels[0][2])
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.4), sharey=True)
    experts = torch.arange(len(s))
    for ax, (when, values, mine), (_, _, other) in zip(axes, panels, panels[::-1], strict=True):
        colors = [CHOSEN if i in mine else OTHER for i in range(len(s))]
        ax.bar(experts, values, color=colors)
        ax.plot(experts, s, "_", color="black", ms=9, mew=1.6, label="unbiased s (weights)")
        for i in sorted(mine - other):
            ax.annotate("in" if when == "after" else "out", (i, float(values[i])),
                        xytext=(0, 4), textcoords="offset points", ha="center", fontsize=10,
                        color=DOWN)
        ax.set_title(f"{when} the update: chosen {k} (orange)")
        ax.set_xlabel("expert i")
        ax.set_xticks(experts.tolist()[:: max(1, len(s) // 8)])
    axes[0].set_ylabel("s + b (one token)")
    axes[0].legend(loc="lower left", fontsize=10)
    fig.tight_layout()
    return fig
