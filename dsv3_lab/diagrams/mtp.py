"""Concept diagrams of notebook 06: the MTP modules (V3 §2.2, Figure 3) and speculative decoding.

draw_mtp_modules(depth=2)   main model and D sequential MTP modules; every depth reads the shared
                            embedding of the token k ahead and writes through the shared head
draw_speculative_step()     one decoding step: draft (MTP module) -> verify (one main forward)
                            -> accept the matching prefix plus the main model's own token
"""

from __future__ import annotations

from dsv3_lab.diagrams import arrow, box, canvas, label

SHARED = "#9467bd"  # colour of the shared embedding / head links


def draw_mtp_modules(depth: int = 2):
    """Main model (column 0) and MTP modules 1..depth (columns 1..D) at one position i.

    Column k embeds t_{i+k} with the shared embedding, combines it with h^{k-1} (Eq. 21), runs
    its Block (Eq. 22) and predicts t_{i+k+1} through the shared head (Eq. 23).
    """
    if not isinstance(depth, int) or not 1 <= depth <= 3:
        raise ValueError(f"draw_mtp_modules: depth must be an int in 1..3, got {depth!r}")
    col = 3.0  # column width (inches)
    width = 0.9 + col * (depth + 1)
    fig, ax = canvas(width, 5.6)
    y_tok, y_emb, y_mix, y_blk, y_norm, y_head, y_out = 0.35, 1.1, 1.95, 2.85, 3.65, 4.35, 5.1
    xs = [1.9 + col * k for k in range(depth + 1)]
    for k, x in enumerate(xs):
        tok = "$t_i$" if k == 0 else f"$t_{{i+{k}}}$"
        label(ax, x, y_tok, f"input {tok}", ha="center", va="center")
        box(ax, x, y_emb, 1.9, 0.5, "Embedding (shared)", kind="weight")
        arrow(ax, (x, y_tok + 0.15), (x, y_emb - 0.25))
        if k == 0:
            box(ax, x, (y_mix + y_blk) / 2, 2.1, 1.25,
                "main model\n61 Blocks in V3\n(3 in the toy)", kind="op")
            arrow(ax, (x, y_emb + 0.25), (x, (y_mix + y_blk) / 2 - 0.62))
            box(ax, x, y_norm, 1.9, 0.45, "final norm → $h^0$", kind="tensor")
            arrow(ax, (x, (y_mix + y_blk) / 2 + 0.62), (x, y_norm - 0.22))
            target = "$t_{i+1}$"
        else:
            box(ax, x, y_mix, 2.3, 0.55, f"$M_{k}$ [enorm(e) ; hnorm(h)]", kind="weight")
            arrow(ax, (x, y_emb + 0.25), (x, y_mix - 0.27))
            box(ax, x, y_blk, 1.9, 0.5, f"Block (layer {60 + k} in V3)", kind="op")
            arrow(ax, (x, y_mix + 0.27), (x, y_blk - 0.25))
            box(ax, x, y_norm, 1.9, 0.45, f"norm → $h^{k}$", kind="tensor")
            arrow(ax, (x, y_blk + 0.25), (x, y_norm - 0.22))
            # h^{k-1} from the previous column enters the combination
            prev = xs[k - 1]
            arrow(ax, (prev + 0.95, y_norm), (x - 1.15, y_mix + 0.1),
                  text=f"$h^{k - 1}$", text_offset=(0.12, 0.1), color="#1f77b4")
            target = f"$t_{{i+{k + 1}}}$"
        box(ax, x, y_head, 1.9, 0.45, "Output head (shared)", kind="weight")
        arrow(ax, (x, y_norm + 0.22), (x, y_head - 0.22))
        box(ax, x, y_out, 1.9, 0.45, f"predicts {target}", kind="out")
        arrow(ax, (x, y_head + 0.22), (x, y_out - 0.22))
    # the shared modules: one dashed link along each row
    for a, b in zip(xs[:-1], xs[1:], strict=True):
        for y in (y_emb, y_head):
            ax.plot([a + 0.95, b - 0.95], [y, y], ls="--", color=SHARED, lw=1.2)
            label(ax, (a + b) / 2, y + 0.08, "same\nmodule", ha="center", va="bottom",
                  color=SHARED, fontsize=9.5)
    loss = r"$\mathcal{L} = \mathcal{L}_{Main} + \frac{\lambda}{D}\sum_k \mathcal{L}^k_{MTP}$"
    label(ax, 0.1, 5.5, f"one position $i$;  {loss}  (Eq. 25)",
          va="center", fontsize=10.5)
    return fig


def draw_speculative_step():
    """Draft, verify, accept for D = 1 at main position n (the main model already chose t_(n+1))."""
    fig, ax = canvas(10.2, 4.3)
    rows = [(3.75, "1 · draft", r"MTP module 1 reads [$h_n$ ; emb($t_{n+1}$)]"),
            (2.35, "2 · verify", "ONE main-model forward over the chunk\nat positions n+1 and n+2"),
            (0.75, "3 · accept", "commit the drafts equal to the main\nmodel's greedy tokens, "
                                 "then its own next token")]
    for y, name, text in rows:
        label(ax, 0.15, y + 0.3, name, fontsize=11, fontweight="bold", va="center")
        label(ax, 0.15, y - 0.2, text, fontsize=10, va="center", color="#444444")
    x0, dx, w = 5.3, 1.6, 1.25
    t1, draft = r"$t_{n+1}$", r"$\hat t_{n+2}$"
    # 1: draft
    box(ax, x0, 3.75, w, 0.5, t1, kind="tensor")
    box(ax, x0 + dx, 3.75, w, 0.5, draft, kind="cache")
    arrow(ax, (x0 + w / 2, 3.75), (x0 + dx - w / 2, 3.75))
    label(ax, x0 + dx / 2, 4.04, "MTP", ha="center", va="bottom", fontsize=10)
    # 2: verify: the chunk goes in, the main model's greedy tokens come out
    box(ax, x0, 1.95, w, 0.5, t1, kind="tensor")
    box(ax, x0 + dx, 1.95, w, 0.5, draft, kind="cache")
    for i, tok in enumerate([r"$g_{n+2}$", r"$g_{n+3}$"]):
        box(ax, x0 + dx * i, 2.85, w, 0.45, tok, kind="out")
        arrow(ax, (x0 + dx * i, 2.2), (x0 + dx * i, 2.62))
    label(ax, x0 + 2 * dx - 0.5, 2.85, "main model's\ngreedy tokens", fontsize=10,
          va="center")
    label(ax, x0 + 2 * dx - 0.5, 1.95, "one forward,\ntwo positions", fontsize=10,
          va="center")
    # 3: accept
    box(ax, x0, 0.75, w, 0.5, t1, kind="tensor")
    box(ax, x0 + dx, 0.75, w, 0.5, draft + " ✓", kind="cache")
    box(ax, x0 + 2 * dx, 0.75, w, 0.5, r"$g_{n+3}$", kind="out")
    label(ax, x0 + dx, 0.15, r"if $\hat t_{n+2} = g_{n+2}$: 2 new tokens (as drawn); "
          r"else only $g_{n+2}$ (1 token)", ha="center", fontsize=10, va="center")
    ax.set_ylim(-0.1, 4.3)
    return fig
