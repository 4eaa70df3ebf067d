"""The focal label's hotspot geometry (make_cohort(focal="hotspot")): target objects on every slide at its own
bulk density, three times the densest bulk in a positive's disc, per-tile truth, mean colour kept."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hefeat.slides.synth import CLASS_MPP, SlideSpec, make_cohort, render_slide, slide_layout
from hefeat.slides.synth_focal import (
    FOCAL_SHARE,
    HOTSPOT_BULK_MAX_PER_MM2,
    HOTSPOT_FOCAL_PER_MM2,
    focal_region,
    focal_tiles,
    hotspot_bulk,
    hotspot_objects,
    paint_hotspot,
)

MPP, TILE = 0.5, 224  # the default tiling: 112 µm tiles


def _slides(n_pos: int = 3, n_neg: int = 3):
    """(seed, class map, region or None) of default-size slides, positives and negatives."""
    pos, neg = [], []
    for seed in range(200, 260):
        spec = SlideSpec("S", "P", "s", seed, MPP, 1600.0, 1200.0, False)
        cls, _, _ = slide_layout(spec)
        reg = focal_region(seed, cls, CLASS_MPP)
        (pos if reg is not None else neg).append((seed, cls, reg))
        if len(pos) >= n_pos and len(neg) >= n_neg:
            return pos[:n_pos], neg[:n_neg]
    raise AssertionError("too few slides of one class")


def _tile_counts(seed, cls, reg):
    """Per tissue tile (>= 90 % tissue) of a 112-µm grid: object count and focal truth (focal_tiles)."""
    tissue = cls != 255
    pts = hotspot_objects(seed, reg, tissue, CLASS_MPP, 1600.0, 1200.0)
    side = TILE * MPP
    gx, gy = np.meshgrid(np.arange(0, 1600.0 - side + 1e-9, side), np.arange(0, 1200.0 - side + 1e-9, side))
    gx, gy = gx.ravel(), gy.ravel()
    k = int(side / CLASS_MPP)
    frac = np.array([tissue[int(y / CLASS_MPP):int(y / CLASS_MPP) + k, int(x / CLASS_MPP):int(x / CLASS_MPP) + k].mean()
                     for x, y in zip(gx, gy, strict=True)])
    keep = frac >= 0.9
    gx, gy = gx[keep], gy[keep]
    n = np.array([((pts[:, 0] >= x) & (pts[:, 0] < x + side) & (pts[:, 1] >= y) & (pts[:, 1] < y + side)).sum()
                  for x, y in zip(gx, gy, strict=True)])
    truth = focal_tiles(reg, gx / MPP, gy / MPP, TILE, MPP)
    return n, truth


def test_every_slide_carries_objects_and_a_positive_disc_is_three_times_the_densest_bulk():
    pos, neg = _slides()
    per_tile = (TILE * MPP) ** 2 / 1e6  # mm² of a tile
    for seed, cls, reg in pos + neg:
        n, truth = _tile_counts(seed, cls, reg)
        bulk = hotspot_bulk(seed)
        assert 0 <= bulk <= HOTSPOT_BULK_MAX_PER_MM2
        other = n[~truth]
        # the jittered grid: a tile's count is its density x area within a few objects (no Poisson spread)
        assert abs(np.median(other) - bulk * per_tile) <= 3
        if reg is None:
            assert not truth.any()
            continue
        # truth tiles: the share the 70 % top-decile bar needs, and the focal density inside them
        assert truth.mean() >= 0.07 and reg["share"] >= FOCAL_SHARE * 0.99
        assert np.median(n[truth]) >= 0.8 * HOTSPOT_FOCAL_PER_MM2 * per_tile
        assert np.median(n[truth]) >= 2.5 * HOTSPOT_BULK_MAX_PER_MM2 * per_tile
    # the bulk density is drawn for both classes alike (its own stream): negatives are not object-free
    assert max(hotspot_bulk(s) for s, _, _ in neg) > 0.2 * HOTSPOT_BULK_MAX_PER_MM2


def test_paint_hotspot_keeps_the_mean_colour():
    (seed, cls, reg), = _slides(1, 0)[0]
    spec = SlideSpec("S", "P", "s", seed, MPP, 1600.0, 1200.0, False)
    _, fields, info = slide_layout(spec)
    rgb = render_slide(spec, fields, info["gland_field"])
    before = rgb.astype(np.float64)
    paint_hotspot(rgb, seed, reg, MPP, cls != 255, CLASS_MPP)
    H, W = rgb.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W]
    disc = ((xx + 0.5) * MPP - reg["cx_um"]) ** 2 + ((yy + 0.5) * MPP - reg["cy_um"]) ** 2 <= reg["r_um"] ** 2
    assert np.abs(rgb - before).max() > 50  # objects were stamped
    # each object integrates to zero; only clipping at 255 in pale tissue moves the mean (a few grey levels)
    assert np.all(np.abs(rgb[disc].mean(0) - before[disc].mean(0)) < 4)
    assert np.all(np.abs(rgb.reshape(-1, 3).mean(0) - before.reshape(-1, 3).mean(0)) < 1)


def test_make_cohort_hotspot_records_its_truth(tmp_path):
    make_cohort(tmp_path / "c", n_slides=3, n_genes=20, seed=3, width_um=400.0, height_um=400.0, workers=1,
                focal="hotspot")
    truth = json.loads((tmp_path / "c" / "truth.json").read_text())
    assert truth["focal_kind"] == "hotspot"
    for info in truth["slides"].values():
        assert info["focal_bulk_per_mm2"] == pytest.approx(hotspot_bulk(info["seed"]), abs=1e-3)
    with pytest.raises(ValueError, match="focal must be one of"):
        make_cohort(tmp_path / "d", n_slides=1, n_genes=20, focal="disc")
