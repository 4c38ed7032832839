"""Concept diagrams of notebook 07: V3's FP8 recipe as schematics of the report's Figures 6 and 7.

draw_fp8_linear()         Figure 6: one linear layer's three GEMMs (Fprop, Dgrad, Wgrad) take
                          FP8 inputs and accumulate in FP32; master weights stay FP32
draw_fine_grained()       Figure 7a: activations scaled per 1×128 tile, weights per 128×128
                          block; each K-block's partial product is scaled on the CUDA cores
draw_promotion()          Figure 7b: the tensor cores accumulate N_C = 128 elements (4 WGMMAs)
                          in limited precision, then the partial sum is promoted to FP32
"""

from __future__ import annotations

from matplotlib.patches import Rectangle

from dsv3_lab.diagrams import KINDS, arrow, box, canvas, label

TILE = ["#c6dbef", "#9ecae1", "#6baed6", "#4292c6"]  # shades: one scale per group
BLOCK = ["#fcbba1", "#fc9272", "#fb6a4a", "#ef3b2c"]


def draw_fp8_linear():
    """Figure 6 as a schematic: where FP8 enters the forward and backward pass of a linear."""
    fig, ax = canvas(10.4, 4.3)
    columns = [
        (1.75, "Fprop:  y = x Wᵀ", ("x → FP8\n1×128 tiles", "tensor"),
         ("W → FP8\n128×128", "weight"), "y (BF16)"),
        (5.2, "Dgrad:  ∂x = ∂y W", ("∂y → FP8\n1×128 tiles", "tensor"),
         ("same W\nFP8 blocks", "weight"), "∂x (BF16)"),
        (8.65, "Wgrad:  ∂W = ∂yᵀ x", ("∂y → FP8\n128×1 tiles", "tensor"),
         ("cached FP8 x\n→ 128×1 tiles", "tensor"), "∂W (FP32) → AdamW\n→ master W (FP32)"),
    ]
    for x, gemm, (left, kind_l), (right, kind_r), out in columns:
        box(ax, x - 0.78, 3.35, 1.45, 0.7, left, kind=kind_l, fontsize=10)
        box(ax, x + 0.78, 3.35, 1.45, 0.7, right, kind=kind_r, fontsize=10)
        box(ax, x, 2.0, 2.9, 0.75, gemm + "\nFP8 inputs, FP32 accumulation", kind="op",
            fontsize=10)
        arrow(ax, (x - 0.78, 3.0), (x - 0.4, 2.38))
        arrow(ax, (x + 0.78, 3.0), (x + 0.4, 2.38))
        box(ax, x, 0.75, 2.3, 0.7, out, kind="out", fontsize=10)
        arrow(ax, (x, 1.62), (x, 1.1))
    label(ax, 0.3, 4.05, "One linear layer in V3's FP8 training (schematic of V3 Figure 6)",
          fontsize=10.5)
    label(ax, 5.2, 0.1, "embedding, output head, MoE gate, norms and attention stay in BF16/FP32",
          ha="center", fontsize=10, color="#444444")
    return fig


def _grid(ax, x, y, w, h, nx, ny, colors, edge):
    """A w × h rectangle at lower-left (x, y) cut into nx × ny cells, shaded by group."""
    for i in range(nx):
        for j in range(ny):
            ax.add_patch(Rectangle((x + i * w / nx, y + j * h / ny), w / nx, h / ny,
                                   facecolor=colors[(i + j) % len(colors)], edgecolor=edge,
                                   linewidth=0.8))


def draw_fine_grained():
    """Figure 7a: 1×128 activation tiles, 128×128 weight blocks, scaled partial products."""
    fig, ax = canvas(10.4, 4.4)
    edge_a, edge_b = KINDS["tensor"][1], KINDS["weight"][1]
    # activations A [M, K]: rows are tokens, each row cut into K/128 tiles
    _grid(ax, 0.4, 0.7, 3.2, 2.4, 4, 8, TILE, edge_a)
    label(ax, 2.0, 3.35, "activations A [M tokens × K]", ha="center", fontsize=10.5)
    label(ax, 2.0, 0.35, "one scale per 1×128 tile\n(per token, 128 channels)", ha="center",
          va="center", fontsize=10)
    # weight B [K, N]: 128×128 blocks
    _grid(ax, 4.4, 0.7, 2.4, 2.4, 3, 4, BLOCK, edge_b)
    label(ax, 5.6, 3.35, "weight Wᵀ [K × N]", ha="center", fontsize=10.5)
    label(ax, 5.6, 0.35, "one scale per\n128×128 block", ha="center", va="center", fontsize=10)
    label(ax, 4.0, 1.9, "×", ha="center", va="center", fontsize=16)
    # the computation per K-block
    box(ax, 8.65, 2.75, 3.0, 0.65, "tensor cores: Σ over one\n128-wide K-block (FP8 × FP8)",
        kind="op", fontsize=10)
    box(ax, 8.65, 1.75, 3.0, 0.65, "CUDA cores: × s_A[m, kb] · s_B[kb, n]\nadd in FP32",
        kind="op", fontsize=10)
    box(ax, 8.65, 0.75, 3.0, 0.5, "C [M × N] (FP32 / BF16)", kind="out", fontsize=10)
    arrow(ax, (8.65, 2.42), (8.65, 2.08))
    arrow(ax, (8.65, 1.42), (8.65, 1.0))
    label(ax, 8.65, 3.35, "for every K-block kb:", ha="center", fontsize=10.5)
    label(ax, 0.4, 4.05, "Fine-grained quantisation (V3 Figure 7a): an outlier only shares its "
          "scale with its own tile or block", fontsize=10.5)
    return fig


def draw_promotion(n_c: int = 128, wgmma_k: int = 32, groups: int = 3):
    """Figure 7b: WGMMAs accumulate N_C elements in the tensor core, then promote to FP32."""
    if n_c % wgmma_k:
        raise ValueError(f"draw_promotion: n_c={n_c} must be a multiple of wgmma_k={wgmma_k}")
    per = n_c // wgmma_k  # WGMMA instructions per promotion interval (4 for V3)
    fig, ax = canvas(10.4, 3.3)
    cell, gap = 0.62, 0.35
    x = 0.5
    label(ax, 0.1, 2.0, "tensor cores\n(~14-bit\naccumulator)", fontsize=10, va="center")
    label(ax, 0.1, 0.85, "CUDA cores\n(FP32\nregisters)", fontsize=10, va="center")
    for g in range(groups):
        x0 = x + 1.6
        for i in range(per):
            box(ax, x0 + i * cell + cell / 2, 2.0, cell - 0.06, 0.5, f"W{g * per + i + 1}",
                kind="op", fontsize=9.5)
        mid = x0 + per * cell / 2
        label(ax, mid, 2.45, f"N_C = {n_c} elements", ha="center", va="bottom", fontsize=10)
        box(ax, mid, 0.85, per * cell - 0.1, 0.5, "× scales, + FP32", kind="cache", fontsize=10)
        arrow(ax, (mid, 1.75), (mid, 1.1), text="promote", text_offset=(0.06, 0.0))
        if g:  # the FP32 running sum carries on from the previous interval
            arrow(ax, (mid - per * cell - gap + per * cell / 2 - 0.05, 0.85),
                  (mid - per * cell / 2 + 0.05, 0.85))
        x += per * cell + gap
    label(ax, x + 1.65, 2.0, "…", fontsize=14, va="center")
    label(ax, x + 1.65, 0.85, "…", fontsize=14, va="center")
    label(ax, 5.2, 0.2, f"W = one WGMMA over K = {wgmma_k}; the partial sum never holds more "
          f"than {n_c} products (V3 Figure 7b)", ha="center", fontsize=10)
    return fig
