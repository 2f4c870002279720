"""Draw the V-HMN architecture diagram used by README.md (docs/architecture.png).

    .venv/bin/python scripts/make_architecture_figure.py [--out docs/architecture.png]

Blue boxes are what the paper's public summaries state; orange boxes are this repository's decisions
(defaults of vhmn.model.VHMNConfig; each alternative is an ablation, see book/decisions.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

STATED = "#d6e6f5"  # stated by the sources
STATED_EDGE = "#2f6da3"
OURS = "#fbe3c8"  # our decision
OURS_EDGE = "#c0661a"
NEUTRAL = "#eeeeee"
NEUTRAL_EDGE = "#666666"


def box(ax, x, y, w, h, text, kind="neutral", fontsize=9, weight="normal", style="round,pad=0.02,rounding_size=0.08"):
    face, edge = {"stated": (STATED, STATED_EDGE), "ours": (OURS, OURS_EDGE), "neutral": (NEUTRAL, NEUTRAL_EDGE)}[kind]
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, facecolor=face, edgecolor=edge, linewidth=1.2))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, weight=weight, wrap=True)


def arrow(ax, xy0, xy1, color="#333333", style="-|>", rad=0.0, lw=1.2, ls="-"):
    ax.add_patch(
        FancyArrowPatch(
            xy0, xy1, arrowstyle=style, mutation_scale=11, color=color, lw=lw, linestyle=ls,
            connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0,
        )
    )


def draw(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(12, 6.6), dpi=150)
    ax.set_xlim(0, 12)
    ax.set_ylim(-0.4, 6.2)
    ax.axis("off")

    # --- left: the backbone -------------------------------------------------------------------------
    ax.text(1.55, 5.95, "V-HMN backbone", ha="center", fontsize=11, weight="bold")
    x, w, h = 0.35, 2.4, 0.55
    steps = [
        (5.2, "image  3×32×32", "neutral"),
        (4.35, "patch embedding\n(patch 4 → 8×8 tokens, d=192)", "neutral"),
        (3.2, "HMN block × depth\n(memory replaces attention)", "stated"),
        (2.05, "mean pool → LayerNorm\n→ Linear", "ours"),
        (1.2, "class logits", "neutral"),
    ]
    for i, (y, text, kind) in enumerate(steps):
        hh = 0.8 if "block" in text else h
        box(ax, x, y, w, hh, text, kind, fontsize=9, weight="bold" if "block" in text else "normal")
        if i:
            prev_y = steps[i - 1][0]
            arrow(ax, (x + w / 2, prev_y), (x + w / 2, y + hh))
    ax.text(x + w / 2, 0.75, "isotropic (default) or staged\nwith patch merging (ablation)", ha="center", va="top",
            fontsize=8, color=OURS_EDGE)
    # zoom lines to the block detail
    ax.plot([x + w, 3.35], [4.0, 5.75], color="#999999", lw=0.8, ls="--")
    ax.plot([x + w, 3.35], [3.2, 0.25], color="#999999", lw=0.8, ls="--")

    # --- right: one HMN block -----------------------------------------------------------------------
    ax.add_patch(FancyBboxPatch((3.35, 0.25), 8.45, 5.5, boxstyle="round,pad=0.02,rounding_size=0.1",
                                facecolor="white", edgecolor="#999999", lw=1.0))
    ax.text(7.6, 5.93, "one HMN block (pre-norm residual):   z ← z + Mixer(LN(z));   z ← z + MLP(LN(z))",
            ha="center", fontsize=10.5, weight="bold")

    # tokens in
    box(ax, 3.55, 4.5, 1.35, 0.6, "tokens z\n(B, L, d)", "neutral")
    box(ax, 3.55, 3.45, 1.35, 0.5, "LayerNorm", "ours")
    arrow(ax, (4.22, 4.5), (4.22, 3.95))

    # the two memory paths
    box(ax, 5.3, 4.3, 2.75, 1.05,
        "Local Hopfield\nquery from each token's k×k\nneighbourhood (k=3) → patch\nprototypes", "stated", fontsize=8.5)
    box(ax, 5.3, 2.6, 2.75, 1.05,
        "Global Hopfield\nscene query = mean of tokens\n→ episodic memory → prior\nthat modulates all tokens (add)", "stated", fontsize=8.5)
    arrow(ax, (4.9, 3.7), (5.3, 4.7))
    arrow(ax, (4.9, 3.7), (5.3, 3.2))

    # memory banks
    box(ax, 8.55, 4.75, 1.5, 0.75, "ring buffer\n512 patch slots\n+ provenance", "ours", fontsize=8)
    box(ax, 8.55, 2.45, 1.5, 0.75, "ring buffer\n256 scene slots\n+ provenance", "ours", fontsize=8)
    arrow(ax, (8.55, 5.1), (8.05, 5.1), color=OURS_EDGE)
    arrow(ax, (8.55, 2.85), (8.05, 2.85), color=OURS_EDGE)
    ax.text(11.05, 5.12, "episodic banks:\nwritten from training\nbatches (detached),\nfrozen at eval", ha="center",
            va="center", fontsize=8, color=OURS_EDGE)

    # fusion → prediction m
    box(ax, 10.25, 3.65, 1.4, 0.7, "fuse (sum)\n→ prediction m", "ours", fontsize=9)
    arrow(ax, (8.05, 4.45), (10.25, 4.1))
    arrow(ax, (8.05, 3.5), (10.25, 3.9))

    # refinement loop
    box(ax, 9.0, 1.5, 2.65, 0.75,
        "predictive-coding refinement\n" + r"$z \leftarrow z + \beta\,(m - z)$,  T = 2 steps", "stated", fontsize=9)
    arrow(ax, (10.95, 3.65), (10.95, 2.25))
    arrow(ax, (9.0, 1.75), (6.7, 2.6), rad=-0.25, color=STATED_EDGE, ls="--")
    ax.text(6.0, 1.75, "recompute both retrievals\nfrom the refined state, T times", fontsize=8, color=STATED_EDGE,
            ha="center", va="center")

    # residual + MLP
    box(ax, 9.0, 0.45, 2.65, 0.7, "+ residual, then\nLayerNorm → MLP → + residual", "ours", fontsize=9)
    arrow(ax, (10.32, 1.5), (10.32, 1.15))

    # association formula
    ax.text(3.6, 0.95, r"association $p=\mathrm{softmax}(\beta_H\,X^\top\xi)$" "\n" r"retrieval $m = X p$"
            "\n" r"($X$: stored patterns, $\xi$: query)", fontsize=9, va="center")

    # legend
    lx, ly = 3.6, -0.2
    ax.add_patch(FancyBboxPatch((lx, ly), 0.3, 0.22, boxstyle="round,pad=0.01", facecolor=STATED, edgecolor=STATED_EDGE))
    ax.text(lx + 0.42, ly + 0.11, "stated by the paper's summaries", va="center", fontsize=8.5)
    ax.add_patch(FancyBboxPatch((lx + 3.6, ly), 0.3, 0.22, boxstyle="round,pad=0.01", facecolor=OURS, edgecolor=OURS_EDGE))
    ax.text(lx + 4.02, ly + 0.11, "our decision (alternatives are ablations; see book/decisions.md)", va="center", fontsize=8.5)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, bbox_inches="tight", facecolor="white", metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "architecture.png"))
    args = ap.parse_args(argv)
    draw(Path(args.out))
    print(f"wrote {Path(args.out).name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
