"""Concept diagram of notebook 00: the layer map of DeepSeek-V3 (V3 report §2, Figures 2 and 3).

draw_layer_map(args=None)   embedding -> n_layers pre-norm blocks (each sub-layer wrapped in a
                            residual connection) -> final norm -> head, plus the MTP module,
                            with the notebook that builds each part

The block is pre-norm with two residual branches (V3 §2, Figure 2):

    u = h + MLA(attn_norm(h)),        h' = u + FFN(ffn_norm(u))

and MTP module 1 combines the main model's representation h_i with the embedding of t_{i+1}
(V3 Eq. 21: h'_i = M_1 [RMSNorm(h_i) ; RMSNorm(Emb(t_{i+1}))]). The report's Figure 3 takes h_i
from the last block, before the main model's output head; the released implementations
(transformers, vLLM, and dsv3_lab.mtp, which follow the checkpoint) feed the final-normed state.
The diagram draws the report's arrow solid and the code's dashed.
"""

from __future__ import annotations

from matplotlib.patches import Circle, FancyBboxPatch

from dsv3_lab.config import ModelArgs
from dsv3_lab.diagrams import FONT, arrow, box, canvas, label

NOTE = "#555555"  # notebook numbers and side notes


def _plus(ax, x: float, y: float, r: float = 0.14) -> None:
    """A residual addition node ⊕ at (x, y)."""
    ax.add_patch(Circle((x, y), r, facecolor="white", edgecolor="#444444", linewidth=1.3,
                        zorder=3))
    ax.text(x, y - 0.01, "+", ha="center", va="center", fontsize=FONT + 1, zorder=4)


def _residual(ax, x_main: float, x_side: float, y0: float, y1: float) -> None:
    """The skip path: from the stream at y0 out to x_side, up, and back into ⊕ at y1."""
    ax.plot([x_main, x_side, x_side], [y0, y0, y1], color="#444444", lw=1.2)
    arrow(ax, (x_side, y1), (x_main - 0.14, y1))


def draw_layer_map(args: ModelArgs | None = None):
    """The layer map of `args` (default: the released 671B configuration)."""
    a = args if args is not None else ModelArgs.v3_671b()
    if not isinstance(a, ModelArgs):
        raise TypeError(f"draw_layer_map: expected a ModelArgs or None, got {type(a).__name__}")
    n_moe = a.n_layers - a.n_dense_layers
    fig, ax = canvas(9.4, 10.2)
    x = 3.3  # the residual stream of the main model
    xr = 0.75  # where the skip paths run
    # ------------------------------------------------------------------ input
    label(ax, x, 0.3, "tokens $t_1 \\ldots t_T$", ha="center", va="center")
    box(ax, x, 0.95, 2.6, 0.5, f"embed  [{a.vocab_size} × {a.dim}]", kind="weight")
    arrow(ax, (x, 0.45), (x, 0.7))
    # ------------------------------------------------------------------ the block
    ax.add_patch(FancyBboxPatch((0.35, 1.5), 4.95, 5.25, boxstyle="round,pad=0.03",
                                facecolor="none", edgecolor="grey", linestyle="--", lw=1.2))
    label(ax, 0.5, 6.5, f"× {a.n_layers} blocks: dense FFN in layers 0–{a.n_dense_layers - 1}, "
          f"MoE in {a.n_dense_layers}–{a.n_layers - 1}", color="grey", fontsize=FONT - 0.5)
    label(ax, x + 0.12, 1.62, "$h$", fontsize=FONT)
    y_fork1, y_norm1, y_attn, y_add1 = 1.85, 2.3, 3.1, 3.95
    box(ax, x, y_norm1, 2.2, 0.42, "attn_norm (RMSNorm)", kind="op")
    box(ax, x, y_attn, 3.4, 0.9, "MLA attention (Eq. 1–11)\nlatent $c^{KV}$, decoupled RoPE "
        "+ YaRN", kind="tensor")
    _plus(ax, x, y_add1)
    arrow(ax, (x, 1.2), (x, y_norm1 - 0.21))
    arrow(ax, (x, y_norm1 + 0.21), (x, y_attn - 0.45))
    arrow(ax, (x, y_attn + 0.45), (x, y_add1 - 0.14))
    _residual(ax, x, xr, y_fork1, y_add1)
    label(ax, xr + 0.08, (y_fork1 + y_add1) / 2, "residual", rotation=90, va="center",
          fontsize=FONT - 0.5, color="#444444")
    cache = a.kv_lora_rank + a.qk_rope_head_dim
    label(ax, 5.45, 2.45, f"KV cache: $c^{{KV}}$ + $k^R$\n= {cache} values / token / layer",
          fontsize=FONT - 0.5, color=NOTE, ha="left", va="center")
    label(ax, 5.45, y_attn + 0.1, "01 RoPE, YaRN\n02 MLA, 03 cache", fontsize=FONT - 0.5,
          color=NOTE, ha="left", va="center")
    y_fork2, y_norm2, y_ffn, y_add2 = 4.2, 4.6, 5.55, 6.35
    box(ax, x, y_norm2, 2.2, 0.42, "ffn_norm (RMSNorm)", kind="op")
    box(ax, x, y_ffn, 3.4, 1.15,
        f"DeepSeekMoE (Eq. 12–16): sigmoid gate\n+ bias $b_i$, {a.n_limited_groups} of "
        f"{a.n_expert_groups} groups, top-{a.n_activated_experts}\nof {a.n_routed_experts} routed "
        f"+ {a.n_shared_experts} shared expert", kind="weight")
    _plus(ax, x, y_add2)
    arrow(ax, (x, y_add1 + 0.14), (x, y_norm2 - 0.21))
    arrow(ax, (x, y_norm2 + 0.21), (x, y_ffn - 0.575))
    arrow(ax, (x, y_ffn + 0.575), (x, y_add2 - 0.14))
    _residual(ax, x, xr, y_fork2, y_add2)
    label(ax, 5.45, y_ffn + 0.05, f"04 routing\n05 balancing\n({n_moe} MoE layers)",
          fontsize=FONT - 0.5, color=NOTE, ha="left", va="center")
    # ------------------------------------------------------------------ output
    y_h, y_fnorm, y_head, y_out = 7.0, 7.75, 8.55, 9.35
    ax.plot([x], [y_h], marker="o", color="#1f77b4", markersize=5, zorder=4)
    label(ax, x - 0.15, y_h, f"$h_i = h^{{{a.n_layers}}}_i$ (last block)", fontsize=FONT,
          va="center", ha="right")
    box(ax, x, y_fnorm, 2.2, 0.42, "final norm", kind="op")
    box(ax, x, y_head, 2.6, 0.5, f"head  [{a.dim} × {a.vocab_size}]", kind="weight")
    box(ax, x, y_out, 2.2, 0.45, "predicts $t_{i+1}$", kind="out")
    arrow(ax, (x, y_add2 + 0.14), (x, y_fnorm - 0.21))
    arrow(ax, (x, y_fnorm + 0.21), (x, y_head - 0.25))
    arrow(ax, (x, y_head + 0.25), (x, y_out - 0.225))
    # ------------------------------------------------------------------ MTP (06)
    xm = 7.75
    box(ax, xm, 7.5, 3.0, 1.25, "MTP module 1 (Eq. 21–23)\n$M_1$[RMSNorm($h_i$) ;\n"
        "RMSNorm(Emb($t_{i+1}$))] → block", kind="cache")
    box(ax, xm, y_head, 2.6, 0.5, "norm → head (shared)", kind="weight")
    box(ax, xm, y_out, 2.2, 0.45, "predicts $t_{i+2}$", kind="out")
    arrow(ax, (xm, 7.5 + 0.625), (xm, y_head - 0.25))
    arrow(ax, (xm, y_head + 0.25), (xm, y_out - 0.225))
    arrow(ax, (x + 0.05, y_h), (xm - 1.5, 7.15), color="#1f77b4")  # report: h, before the norm
    label(ax, 4.45, 6.85, "report: $h_i$ (Eq. 21)", fontsize=FONT - 0.5, color="#1f77b4")
    arrow(ax, (x + 1.1, y_fnorm), (xm - 1.5, 7.85), linestyle="--", color="grey")
    label(ax, 4.6, 7.93, "released code:\nnorm($h_i$)", fontsize=FONT - 0.5, color="grey",
          va="bottom")
    label(ax, xm, 6.45, "06 MTP (embedding\nand head shared)", fontsize=FONT - 0.5,
          color=NOTE, ha="center", va="center")
    label(ax, 5.45, 4.3, "07: FP8 GEMMs in the linears\nof MLA and FFN", fontsize=FONT - 0.5,
          color=NOTE, va="center")
    label(ax, 5.45, 1.0, "08: all of it, equal to\ntransformers' DeepseekV3", fontsize=FONT - 0.5,
          color=NOTE, va="center")
    label(ax, 4.7, 10.0, "DeepSeek-V3: the layer map, and the notebook that builds each part",
          fontsize=FONT + 1, ha="center", va="center", weight="bold")
    return fig
