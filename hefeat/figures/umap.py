"""Latent-space scatter (UMAP) coloured by any value, with example tiles linked to their points."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hefeat.figures.base import (
    MISSING,
    Out,
    category_colors,
    is_categorical,
    pyplot,
    robust_scale,
    save,
    wrap,
)

MAX_CATEGORIES = 12


def _point_size(n: int) -> float:
    return float(np.clip(12000 / max(n, 1), 0.3, 14))


def umap_scatter(xy: np.ndarray, values=None, *, title: str, color_label: str = "", out: Out = None,
                 subtitle: str = "", thumbnails: list[tuple[int, np.ndarray]] = (), seed: int = 0) -> dict:
    """Scatter of 2-D embedding coordinates; colour by `values` (categorical legend or labelled bar).

    xy: (n, 2); values: (n,) or None (NaN = no value, drawn grey and counted); thumbnails: (point index,
    RGB tile) pairs drawn in a strip above and below the plot, each joined by a line to its numbered
    point so no cluster is hidden. Continuous colours use the 2nd–98th percentile (skew-robust).
    """
    from matplotlib.patches import ConnectionPatch, Patch

    xy = np.asarray(xy, float)
    n = len(xy)
    plt = pyplot()
    has_thumbs = len(thumbnails) > 0
    fig = plt.figure(figsize=(8.4, 8.8 if has_thumbs else 6.6))
    ax = fig.add_axes((0.09, 0.24, 0.64, 0.5) if has_thumbs else (0.09, 0.1, 0.64, 0.76))
    order = np.random.default_rng(seed).permutation(n)  # no category systematically drawn on top
    s = _point_size(n)
    kind = "none"
    info: dict = {}
    if values is None:
        ax.scatter(xy[order, 0], xy[order, 1], s=s, c="#455a64", edgecolors="none", alpha=0.7)
    else:
        v = pd.Series(values).reset_index(drop=True)
        miss = v.isna().to_numpy()
        if miss.any():
            ax.scatter(xy[miss, 0], xy[miss, 1], s=s, c=MISSING, edgecolors="none", alpha=0.5)
        if is_categorical(v):
            kind = "categorical"
            counts = v[~miss].astype(str).value_counts()
            keep = sorted(counts.index[: MAX_CATEGORIES - 1] if len(counts) > MAX_CATEGORIES else counts.index, key=str)
            names = list(keep) + (["other"] if len(counts) > len(keep) else [])
            colors = dict(zip(names, category_colors(len(names)), strict=True))
            lab = v.astype(str).where(v.astype(str).isin(keep), "other")
            o = order[~miss[order]]
            ax.scatter(xy[o, 0], xy[o, 1], s=s, c=[colors[x] for x in lab.iloc[o]], edgecolors="none", alpha=0.8)
            handles = [Patch(color=colors[k], label=f"{k} ({int((lab[~miss] == k).sum())})") for k in names]
            if miss.any():
                handles.append(Patch(color=MISSING, label=f"no value ({int(miss.sum())})"))
            ax.legend(handles=handles, title=color_label, fontsize=7, title_fontsize=8, loc="upper left",
                      bbox_to_anchor=(1.02, 1), frameon=False)
            info["categories"] = names
        else:
            kind = "continuous"
            num = pd.to_numeric(v, errors="coerce").to_numpy(float)
            sc = robust_scale(num)
            o = order[~miss[order]]
            p = ax.scatter(xy[o, 0], xy[o, 1], s=s, c=num[o], cmap="viridis", vmin=sc.vmin, vmax=sc.vmax,
                           edgecolors="none", alpha=0.8)
            cax = fig.add_axes((0.78, ax.get_position().y0, 0.025, ax.get_position().height))
            cb = fig.colorbar(p, cax=cax, extend=sc.extend)
            cb.set_label(wrap(color_label + " — colours span the 2nd–98th percentile" + sc.note, 60), fontsize=8)
            if miss.any():
                ax.legend(handles=[Patch(color=MISSING, label=f"no value ({int(miss.sum())})")], fontsize=7,
                          loc="lower right")
            info.update(vmin=sc.vmin, vmax=sc.vmax)
    ax.set_xlabel("UMAP 1 (no units)")
    ax.set_ylabel("UMAP 2 (no units)")
    ax.tick_params(labelsize=7)
    if has_thumbs:
        _linked_thumbnails(fig, ax, xy, list(thumbnails), ConnectionPatch)
    fig.suptitle(wrap(title, 90), fontsize=10, y=0.99, va="top")
    if subtitle:
        fig.text(0.5, 0.935, wrap(subtitle, 130), fontsize=7, ha="center", va="top", color="#555")
    save(fig, out)
    return {"points": n, "color": kind, **info}


def _linked_thumbnails(fig, ax, xy: np.ndarray, thumbs: list[tuple[int, np.ndarray]], ConnectionPatch) -> None:
    """Tiles in strips above and below the axes, sorted by x, each joined to its (numbered) point."""
    thumbs = sorted(thumbs, key=lambda t: xy[t[0], 0])
    ymid = np.median(xy[:, 1])
    top = [t for t in thumbs if xy[t[0], 1] >= ymid]
    bottom = [t for t in thumbs if xy[t[0], 1] < ymid]
    pos = ax.get_position()
    k = 0
    for strip, y0 in ((top, pos.y1 + 0.03), (bottom, pos.y0 - 0.2)):
        m = max(len(strip), 1)
        w = min(0.13, pos.width / m - 0.01)
        for j, (i, img) in enumerate(strip):
            k += 1
            x0 = pos.x0 + (j + 0.5) * pos.width / m - w / 2
            tax = fig.add_axes((x0, y0, w, 0.12))
            tax.imshow(img)
            tax.set_xticks([])
            tax.set_yticks([])
            tax.text(-0.04, 1, str(k), transform=tax.transAxes, fontsize=8, weight="bold", ha="right", va="top")
            anchor = (0.5, 0.0) if strip is top else (0.5, 1.0)
            fig.add_artist(ConnectionPatch(xyA=anchor, coordsA=tax.transAxes, xyB=tuple(xy[i]), coordsB=ax.transData,
                                           color="k", lw=0.6, alpha=0.7))
            ax.plot(*xy[i], marker="o", ms=7, mfc="none", mec="k", mew=1.0)
            ax.annotate(str(k), xy[i], xytext=(4, 4), textcoords="offset points", fontsize=7, weight="bold")
