"""Concept diagrams for notebook 01 (RoPE and YaRN), drawn from dsv3_lab.rope's own numbers.

    draw_rotation()        one pair (x_2i, x_2i+1) as a complex number z_i, rotated by m·ω_i;
                           a query at m and a key at n: their score sees only (m - n)·ω_i
    draw_yarn_pairs(args)  YaRN's treatment of every rotary pair at `args` (default: V3, 32
                           pairs): kept (ramp 0), blended, or divided by s = rope_factor (ramp 1)
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.patches import Arc, FancyArrowPatch

from dsv3_lab import rope
from dsv3_lab.config import ModelArgs
from dsv3_lab.diagrams import FONT, KINDS, canvas, label


def _vector(ax, end, color, text, offset=(0.0, 0.0)):
    ax.add_patch(FancyArrowPatch((0, 0), end, arrowstyle="-|>", mutation_scale=14, color=color,
                                 linewidth=2.0, shrinkA=0, shrinkB=0))
    ax.text(end[0] + offset[0], end[1] + offset[1], text, color=color, fontsize=FONT + 0.5,
            ha="center", va="center")


def _angle(ax, a0, a1, radius, text, color="#444444", text_radius=None):
    lo, hi = sorted((a0, a1))
    ax.add_patch(Arc((0, 0), 2 * radius, 2 * radius, theta1=math.degrees(lo),
                     theta2=math.degrees(hi), color=color, linewidth=1.3))
    mid, r = (lo + hi) / 2, text_radius or radius + 0.22
    ax.text(r * math.cos(mid), r * math.sin(mid), text, color=color, fontsize=FONT,
            ha="center", va="center")


def _plane(ax, title):
    ax.set_xlim(-1.35, 1.45)
    ax.set_ylim(-0.45, 1.45)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.axhline(0, color="#999999", lw=0.8)
    ax.axvline(0, color="#999999", lw=0.8)
    ax.text(1.42, -0.1, "Re  (x_2i)", fontsize=FONT, ha="right", va="top", color="#666666")
    ax.text(0.05, 1.42, "Im  (x_2i+1)", fontsize=FONT, ha="left", va="top", color="#666666")
    ax.set_title(title, fontsize=FONT + 1)


def draw_rotation():
    """Two panels: RoPE rotates one pair by m·ω_i; a query-key score depends on (m - n)·ω_i."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.7))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.86, wspace=0.08)

    # left: z_i = x_2i + j x_2i+1 at position 0 and after the rotation by m·ω_i
    _plane(left, "one pair of q or k, rotated at position m")
    a0, turn = 0.35, 0.75
    z0 = (math.cos(a0), math.sin(a0))
    z1 = (math.cos(a0 + turn), math.sin(a0 + turn))
    _vector(left, z0, KINDS["tensor"][1], "z_i", (0.12, 0.02))
    _vector(left, z1, KINDS["weight"][1], "z_i · e^(j m ω_i)", (-0.05, 0.13))
    _angle(left, a0, a0 + turn, 0.45, "m·ω_i")
    left.text(-1.3, -0.3, "same length |z_i|: only the angle changes", fontsize=FONT,
              color="#444444")

    # right: q at position m, k at position n; the angle between them is (m - n)·ω_i
    _plane(right, "query at m, key at n: score sees (m − n)·ω_i")
    aq, ak = 0.2 + 1.15, 0.2
    q = (0.95 * math.cos(aq), 0.95 * math.sin(aq))
    k = (0.8 * math.cos(ak), 0.8 * math.sin(ak))
    _vector(right, q, KINDS["weight"][1], "q_i · e^(j m ω_i)", (-0.15, 0.12))
    _vector(right, k, KINDS["cache"][1], "k_i · e^(j n ω_i)", (0.2, 0.15))
    _angle(right, ak, aq, 0.42, "(m − n)·ω_i", text_radius=0.62)
    right.text(-1.3, -0.3, "Re(q_i · conj(k_i) · e^(j (m−n) ω_i)): shift m and n together,"
               "\nthe score is unchanged", fontsize=FONT, color="#444444", va="center")
    return fig


def draw_yarn_pairs(args: ModelArgs | None = None):
    """One box per rotary pair at `args` (default V3: qk_rope_head_dim 64 = 32 pairs), coloured
    by YaRN's treatment, with the turns r_i = L·ω_i/2π each pair makes in original_seq_len L."""
    args = ModelArgs.v3_671b() if args is None else args
    if not args.yarn_enabled:
        raise ValueError("draw_yarn_pairs: YaRN is off for these args (it needs max_seq_len > "
                         f"original_seq_len, got {args.max_seq_len} <= {args.original_seq_len})")
    n = args.qk_rope_head_dim // 2
    low, high = rope.yarn_correction_range(args)
    ramp = rope.yarn_ramp(low, high, n).tolist()  # 0: keep, 1: divide by s
    omega = [args.rope_theta ** (-2 * i / args.qk_rope_head_dim) for i in range(n)]
    turns = [args.original_seq_len * w / (2 * math.pi) for w in omega]  # r_i

    cell = min(0.3, 9.4 / n)
    width = n * cell + 1.2
    fig, ax = canvas(width, 2.9)
    x0, y = 0.6, 1.45
    keep, divide = np.array(to_rgb(KINDS["tensor"][1])), np.array(to_rgb(KINDS["weight"][1]))
    for i, r in enumerate(ramp):
        color = (1 - r) * keep + r * divide
        ax.add_patch(plt.Rectangle((x0 + i * cell, y - cell / 2), cell * 0.92, cell,
                                   facecolor=(*color, 0.85), edgecolor="white"))
        if i % 5 == 0 or i == n - 1:
            label(ax, x0 + (i + 0.46) * cell, y + cell / 2 + 0.08, str(i), ha="center",
                  va="bottom")
    label(ax, x0 - 0.1, y, "pair i", ha="right", va="center")

    def bracket(i0, i1, text, color, below=0.35):
        xa, xb = x0 + i0 * cell, x0 + (i1 + 0.92) * cell
        yb = y - cell / 2 - 0.08
        ax.plot([xa, xa, xb, xb], [yb, yb - 0.08, yb - 0.08, yb], color=color, lw=1.3)
        label(ax, (xa + xb) / 2, yb - below, text, ha="center", va="top", color=color)

    s = args.rope_factor
    bracket(0, low, f"kept (ω'_i = ω_i)\npairs 0–{low}: r_i ≥ {turns[low]:.0f} turns",
            KINDS["tensor"][1])
    bracket(low + 1, high - 1, f"blended\npairs {low + 1}–{high - 1}", "#7f3f7f")
    bracket(high, n - 1, f"divided by s = {s:g}\npairs {high}–{n - 1}: r_i < 1 turn",
            KINDS["weight"][1])
    label(ax, x0, 2.75, f"YaRN per pair: {n} rotary pairs (qk_rope_head_dim = "
          f"{args.qk_rope_head_dim}), L = original_seq_len = {args.original_seq_len}, "
          f"β = beta_fast = {args.beta_fast:g}, α = beta_slow = {args.beta_slow:g}",
          va="top", fontsize=FONT)
    label(ax, x0, 2.38, f"ramp: linear in i from floor(corr(β)) = {low} to ceil(corr(α)) = "
          f"{high}   (r_i = L·ω_i / 2π)", va="top", fontsize=FONT, color="#444444")
    return fig
