"""EMO's tile-level variant (Wang et al., Cancer Research 2021): ridge heads trained on tiles that carry their slide's
targets, predictions averaged per slide; `fit genes --level tile` runs it inside the CV of hefeat.learn.emo."""

from __future__ import annotations

import numpy as np

from hefeat.learn.data import SlideLevelData
from hefeat.store.catalog import Store


def tile_level_predict(store: Store, eid: str, data: SlideLevelData, train: np.ndarray, test: np.ndarray,
                       keep: np.ndarray, alpha_slide: np.ndarray, Y: np.ndarray, cache: dict) -> np.ndarray:
    """EMO tile-level variant: heads trained on tiles with their slide's targets, predictions averaged per slide."""
    from hefeat.learn.data import slide_tiles
    from hefeat.learn.ridge import fit_ridge_heads

    need = sorted({sid for r in np.concatenate([train, test]) for sid in data.slides[r]} - set(cache))
    for st in slide_tiles(store, eid, need):  # every fold (and permutation) reuses a slide's tiles
        cache[st.slide_id] = st.X

    def tiles_of(rows):
        Xs, Ys, owner = [], [], []
        for r in rows:
            for sid in data.slides[r]:
                f = cache[sid]
                Xs.append(f)
                Ys.append(np.repeat(Y[r:r + 1, keep], len(f), 0))
                owner.append(np.full(len(f), r))
        return np.concatenate(Xs), np.concatenate(Ys), np.concatenate(owner)

    Xt, Yt, _ = tiles_of(train)
    per_slide = len(Xt) / max(len(train), 1)
    # Tile rows repeat each slide's target, so the slide-level LOO penalties scale by tiles per slide.
    fits = {}
    for a in np.unique(alpha_slide):
        cols = np.flatnonzero(alpha_slide == a)
        fits[a] = (cols, fit_ridge_heads(Xt, Yt[:, cols], alphas=[a * per_slide]))
    Xe, _, owner = tiles_of(test)
    out = np.zeros((len(test), keep.sum()))
    tile_pred = np.zeros((len(Xe), keep.sum()))
    for cols, f in fits.values():
        tile_pred[:, cols] = f.predict(Xe)
    for i, r in enumerate(test):
        out[i] = tile_pred[owner == r].mean(0)
    return out
