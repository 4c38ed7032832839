"""Concept diagram of notebook 09: expert-parallel dispatch and combine over virtual nodes."""

from __future__ import annotations

from matplotlib.patches import Rectangle

from dsv3_lab.diagrams import arrow, box, canvas, label

RANK_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"]


def draw_dispatch_diagram(world_size: int = 4, ranks_per_node: int = 2, experts_per_rank: int = 4):
    """Four ranks in two nodes: gate, all-to-all dispatch, local experts, all-to-all combine.

    Returns the Figure (the notebook shows it and saves it as figures/09_dispatch_combine.png).
    """
    if world_size % ranks_per_node or world_size > len(RANK_COLORS):
        raise ValueError(f"draw_dispatch_diagram: world_size={world_size} must be <= "
                         f"{len(RANK_COLORS)} and a multiple of ranks_per_node={ranks_per_node}")
    fig, ax = canvas(10.5, 5.2)
    ys = [4.1 - 1.05 * r for r in range(world_size)]  # one row per rank
    x_tok, x_exp, x_out = 1.35, 5.25, 9.15
    label(ax, x_tok, 4.95, "tokens of rank r\n(gate: top-K experts)", ha="center", va="center")
    label(ax, x_exp, 4.95, f"experts on rank d ({experts_per_rank} each)", ha="center",
          va="center")
    label(ax, x_out, 4.95, "output per token\nΣ g·FFN + shared", ha="center", va="center")
    for node in range(world_size // ranks_per_node):  # dashed frame per node
        top = ys[node * ranks_per_node] + 0.45
        bottom = ys[(node + 1) * ranks_per_node - 1] - 0.45
        ax.add_patch(Rectangle((0.1, bottom), 10.3, top - bottom, fill=False, ls="--", lw=1.0,
                               ec="#7f7f7f"))
        label(ax, 3.3, bottom + 0.06, f"node {node}", color="#7f7f7f", fontsize=10,
              ha="center", va="bottom")
    for r, y in enumerate(ys):
        box(ax, x_tok, y, 1.7, 0.6, f"rank {r}: x_r [n, dim]", kind="tensor")
        first = r * experts_per_rank
        box(ax, x_exp, y, 1.9, 0.6, f"experts {first}..{first + experts_per_rank - 1}",
            kind="weight")
        box(ax, x_out, y, 1.7, 0.6, "y_r [n, dim]", kind="out")
    # dispatch: every rank sends to every rank (a few arrows, colour of the source)
    for r, y in enumerate(ys):
        for d, yd in enumerate(ys):
            if abs(r - d) <= 1 or (r, d) in ((0, 3), (3, 0)):
                arrow(ax, (x_tok + 0.87, y + 0.1 * (d - 1.5) / 1.5),
                      (x_exp - 0.97, yd + 0.1 * (r - 1.5) / 1.5), color=RANK_COLORS[r])
                arrow(ax, (x_exp + 0.97, yd - 0.1 * (r - 1.5) / 1.5),
                      (x_out - 0.87, y - 0.1 * (d - 1.5) / 1.5), color=RANK_COLORS[r],
                      style="-|>", linestyle=":")
    label(ax, 5.25, -0.55, "arrow colour: the rank a token lives on; arrows between nodes "
          "cross the slow network (IB)", ha="center", va="bottom", fontsize=10, color="#444444")
    label(ax, 3.3, -0.05, "dispatch: all_to_all_single\n(counts, then tokens FP8 + ids + g)",
          ha="center", va="bottom", fontsize=10)
    label(ax, 7.2, -0.05, "combine: all_to_all_single back\n(outputs in BF16), then Σ_k",
          ha="center", va="bottom", fontsize=10)
    ax.set_ylim(-0.65, 5.3)
    return fig
