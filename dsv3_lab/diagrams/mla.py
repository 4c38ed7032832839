"""Concept diagrams of notebook 02: Multi-head Latent Attention (V3 report, Eq. 1-11).

    draw_mla_dataflow(args)      h_t -> c_q / c_kv (+ q_norm / kv_norm) -> heads, the rotary
                                 path split off (k_pe: one key shared by all heads), what is cached
    draw_naive_vs_absorbed(args) decoding one token against L cached tokens: the naive path
                                 expands every cached latent into keys and values (wkv_b); the
                                 absorbed path moves W_UK into the query and W_UV after the mix

Shapes are read from `args` (default: the 671B configuration), so the pictures show real sizes.
"""

from __future__ import annotations

from matplotlib.patches import Rectangle

from dsv3_lab.config import ModelArgs
from dsv3_lab.diagrams import arrow, box, canvas, label

CACHE_EDGE = "#2ca02c"


def _args(args: ModelArgs | None) -> ModelArgs:
    args = ModelArgs.v3_671b() if args is None else args
    if not isinstance(args, ModelArgs):
        raise TypeError(f"expected a ModelArgs, got {type(args).__name__}")
    return args


def draw_mla_dataflow(args: ModelArgs | None = None):
    """MLA's data flow for one token with shapes; returns the Figure (figures/02_mla_dataflow)."""
    a = _args(args)
    H, dn, dr, dv = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
    fig, ax = canvas(8.6, 4.9)
    # input
    box(ax, 0.75, 2.45, 1.1, 0.75, f"h_t\n[{a.dim}]", kind="tensor")
    # query path (top): wq_a -> c_q -> q_norm -> wq_b -> [q_nope ; q_pe] per head
    yq = 3.85
    box(ax, 2.55, yq, 1.2, 0.7, f"c_q  ($c^Q_t$)\n[{a.q_lora_rank}]", kind="tensor")
    arrow(ax, (1.3, 2.75), (1.95, yq - 0.1), text="wq_a\n$W^{DQ}$", text_offset=(-0.55, 0.22))
    box(ax, 3.85, yq, 0.95, 0.5, "q_norm", kind="op")
    arrow(ax, (3.15, yq), (3.37, yq))
    box(ax, 5.75, 4.4, 1.35, 0.62, f"q_nope  ($q^C$)\n[{H} × {dn}]", kind="tensor")
    box(ax, 5.75, 3.4, 1.35, 0.62, f"q_pe  ($q^R$)\n[{H} × {dr}]", kind="tensor")
    arrow(ax, (4.33, yq + 0.05), (5.07, 4.35), text="wq_b", text_offset=(-0.35, 0.2))
    arrow(ax, (4.33, yq - 0.05), (5.07, 3.45))
    box(ax, 7.2, 3.4, 0.75, 0.5, "RoPE", kind="op")
    arrow(ax, (6.43, 3.4), (6.82, 3.4))
    label(ax, 7.2, 4.4, "per head:\n$q_{t,i} = [q^C ; q^R]$", ha="center", va="center")
    # key/value path (bottom): wkv_a -> [c_kv | k_pe]; kv_norm; RoPE on the shared key
    box(ax, 2.55, 1.75, 1.2, 0.7, f"c_kv  ($c^{{KV}}_t$)\n[{a.kv_lora_rank}]", kind="tensor")
    box(ax, 2.55, 0.6, 1.2, 0.7, f"k_pe  ($k^R_t$)\n[{dr}], 1 head", kind="tensor")
    arrow(ax, (1.3, 2.15), (1.95, 1.8))
    arrow(ax, (1.3, 2.1), (1.95, 0.7))
    label(ax, 0.85, 1.45, "wkv_a\n$W^{DKV}$, $W^{KR}$", ha="center", va="center",
          fontsize=10, color="#444444")
    box(ax, 3.85, 1.75, 0.95, 0.5, "kv_norm", kind="op")
    box(ax, 3.85, 0.6, 0.95, 0.5, "RoPE", kind="op")
    arrow(ax, (3.15, 1.75), (3.37, 1.75))
    arrow(ax, (3.15, 0.6), (3.37, 0.6))
    # the cache: normalised latent + rotated shared key
    ax.add_patch(Rectangle((4.55, 0.12), 1.8, 2.2, fill=False, ls="--", lw=1.4, ec=CACHE_EDGE))
    box(ax, 5.45, 1.75, 1.3, 0.55, f"c_kv [{a.kv_lora_rank}]", kind="cache")
    box(ax, 5.45, 0.6, 1.3, 0.55, f"k_pe [{dr}]", kind="cache")
    arrow(ax, (4.33, 1.75), (4.78, 1.75))
    arrow(ax, (4.33, 0.6), (4.78, 0.6))
    label(ax, 5.47, 2.55, f"cached: {a.kv_lora_rank + dr} values\nper token per layer",
          ha="center", va="center", color=CACHE_EDGE)
    # up-projection out of the latent (naive form only)
    box(ax, 7.75, 1.75, 1.55, 0.75, f"k_nope, v\n[{H} × ({dn} + {dv})]", kind="muted")
    arrow(ax, (6.1, 1.75), (6.97, 1.75))
    label(ax, 6.4, 1.95, "wkv_b", fontsize=10, color="#444444", va="center")
    label(ax, 7.7, 0.95, "$W^{UK}$, $W^{UV}$: naive form;\nabsorbed: never formed",
          ha="center", va="center", fontsize=10)
    label(ax, 7.7, 0.3, "per head: $k_{t,i} = [k^C ; k^R]$", ha="center", va="center",
          fontsize=10)
    ax.set_ylim(0.0, 4.9)
    return fig


def draw_naive_vs_absorbed(args: ModelArgs | None = None):
    """Decoding one token over L cached tokens, naive and absorbed paths side by side.

    Returns the Figure (figures/02_naive_vs_absorbed). The multiply-adds per head and cached
    token are d_nope + d_rope + d_v (naive) and 2·kv_lora_rank + d_rope (absorbed).
    """
    a = _args(args)
    H, dn, dr, dv, c = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, \
        a.kv_lora_rank
    fig, ax = canvas(8.6, 5.4)
    cols = {"naive": 2.1, "absorbed": 6.5}
    w = 3.95
    for name, x in cols.items():
        label(ax, x, 5.15, f"{name}", ha="center", va="center", fontsize=12, weight="bold")
        box(ax, x, 4.55, w, 0.55, f"cache: c_kv [L × {c}],  k_pe [L × {dr}]", kind="cache")
    # naive: expand every cached latent, then ordinary attention over keys of dim dn + dr
    x = cols["naive"]
    steps = [
        (f"wkv_b on every cached token:\nk_nope [L × {H} × {dn}],  v [L × {H} × {dv}]", "weight"),
        (f"scores = [q_nope ; q_pe] · [k_nope ; k_pe]\n[{H} × L], head dim {dn + dr}", "op"),
        (f"o = Σ_j softmax(scores)_j v_j\n[{H} × {dv}]", "op"),
    ]
    _column(ax, x, w, steps, a.dim)
    label(ax, x, 0.2, f"per head and cached token:\n{dn} + {dr} + {dv} = {dn + dr + dv:,} "
          f"multiply-adds", ha="center", va="center", fontsize=10.5)
    # absorbed: W_UK folded into the query, W_UV applied once after the mix
    x = cols["absorbed"]
    steps = [
        (f"q̃ = W_UKᵀ q_nope  (once per new token)\n[{H} × {c}]: the query in latent space",
         "weight"),
        (f"scores = q̃ · c_kv + q_pe · k_pe\n[{H} × L]", "op"),
        (f"o_lat = Σ_j softmax(scores)_j c_kv_j  [{H} × {c}]\no = W_UV o_lat  [{H} × {dv}]",
         "op"),
    ]
    _column(ax, x, w, steps, a.dim)
    label(ax, x, 0.2, f"per head and cached token:\n2·{c} + {dr} = {2 * c + dr:,} multiply-adds,"
          f" no expanded keys", ha="center", va="center", fontsize=10.5)
    ax.set_ylim(-0.2, 5.4)
    return fig


def _column(ax, x: float, w: float, steps: list[tuple[str, str]], dim: int) -> None:
    """Stack `steps` below the cache box at x, with arrows, ending in `wo -> u_t [dim]`."""
    ys = [3.6, 2.6, 1.6]
    arrow(ax, (x, 4.27), (x, ys[0] + 0.36))
    for (text, kind), y in zip(steps, ys, strict=True):
        box(ax, x, y, w, 0.7, text, kind=kind)
    for y0, y1 in zip(ys[:-1], ys[1:], strict=True):
        arrow(ax, (x, y0 - 0.36), (x, y1 + 0.36))
    box(ax, x, 0.8, 1.9, 0.42, f"wo → u_t [{dim}]", kind="out")
    arrow(ax, (x, ys[-1] - 0.36), (x, 1.02))
