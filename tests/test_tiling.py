"""Tiling: grid geometry, the papers' background rules, sampling, spots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hefeat.errors import HefeatError, NoTissueError
from hefeat.slides.reader import Slide
from hefeat.slides.synth import blank_slide
from hefeat.slides.tiling import TilingParams, grid, spot_tiles, tile_slide


@pytest.fixture
def s01(cohort):
    with Slide(cohort / "slides" / "S01.tiff") as s:
        yield s


def test_grid_covers_slide_without_overlap(s01):
    p = TilingParams(mpp=0.5, size=224)
    g = grid(s01, p)
    size0 = 224 * 0.5 / s01.mpp.x
    assert (g["x"] + size0 <= s01.dimensions[0] + 1).all()
    assert np.diff(np.unique(g["x"])).min() == pytest.approx(size0, abs=1)
    g2 = grid(s01, TilingParams(mpp=0.5, size=224, stride=112))
    assert len(g2) > 3 * len(g)


def test_tile_ids_are_scan_order_and_qc_present(s01):
    df, _ = tile_slide(s01, TilingParams())
    assert df["tile_id"].tolist() == list(range(len(df)))
    assert (df.sort_values(["row", "col"])["tile_id"].to_numpy() == np.arange(len(df))).all()
    for c in ("tissue_frac", "sharpness", "mean_r", "mean_g", "mean_b", "background_frac", "density"):
        assert df[c].notna().all(), c
    assert (df["tissue_frac"] >= 0.5).all()


def test_background_rules(s01):
    otsu, _ = tile_slide(s01, TilingParams())
    rgb, _ = tile_slide(s01, TilingParams(background="mean-rgb", max_background=0.1))
    assert (rgb["background_frac"] <= 0.1).all()
    dens, _ = tile_slide(s01, TilingParams(background="density", top_n=7))
    assert len(dens) == 7
    # The top-7 by density are the densest tiles among all candidates.
    loose, _ = tile_slide(s01, TilingParams(background="mean-rgb", max_background=1.0))
    assert sorted(dens["density"])[0] >= sorted(loose["density"])[-7] - 1e-6
    assert 0 < len(rgb) <= len(loose)
    assert len(otsu) > 0


def test_max_tiles_sample_is_seeded(s01):
    a, _ = tile_slide(s01, TilingParams(max_tiles=10, seed=3))
    b, _ = tile_slide(s01, TilingParams(max_tiles=10, seed=3))
    c, _ = tile_slide(s01, TilingParams(max_tiles=10, seed=4))
    assert len(a) == 10
    pd.testing.assert_frame_equal(a, b)
    assert not a[["x", "y"]].equals(c[["x", "y"]])


def test_blank_slide_raises_no_tissue(tmp_path):
    with Slide(blank_slide(tmp_path / "blank.tiff")) as s, pytest.raises(NoTissueError):
        tile_slide(s, TilingParams())


def test_spot_tiles_are_centred(s01):
    spots = pd.DataFrame({"spot_id": ["a", "b"], "x": [1000.0, 1200.0], "y": [800.0, 800.0]})
    df = spot_tiles(s01, spots, TilingParams(spots=True))
    size0 = 224 * 0.5 / s01.mpp.x
    assert df["x"].tolist() == [round(1000 - size0 / 2), round(1200 - size0 / 2)]
    assert df["col"].tolist() == [0, 1] and df["spot_id"].tolist() == ["a", "b"]
    with pytest.raises(HefeatError, match="no spots"):
        spot_tiles(s01, spots.iloc[:0], TilingParams(spots=True))


def test_bad_params_are_rejected():
    with pytest.raises(HefeatError, match="background rule"):
        TilingParams(background="magic")
    with pytest.raises(HefeatError):
        TilingParams(mpp=0)


def test_qc_thumbnails(tmp_path, cohort):
    """--qc-thumbnails writes one picture per tiled slide; it is not a tiling parameter (same id)."""
    import glob

    from PIL import Image

    from hefeat.slides.run import ingest_slides, run_tiling, tiling_id
    from hefeat.store.catalog import Store

    st = Store.init(tmp_path / "st")
    ingest_slides(st, sorted(glob.glob(str(cohort / "slides" / "*.tiff")))[:2])
    s = run_tiling(st, TilingParams(), qc_thumbnails=True)
    assert s.extra["tiling_id"] == tiling_id(TilingParams())
    for sid in ("S01", "S02"):
        p = st.qc_thumbnail_path(s.extra["tiling_id"], sid)
        im = np.asarray(Image.open(p).convert("RGB"))
        assert im.shape[0] > 100 and (np.abs(im.astype(int) - [67, 160, 71]).sum(2) < 60).any()  # tile edges drawn


def test_small_all_tissue_image_tiles(tmp_path, cmu_svs):
    """A real 125 x 75 µm all-tissue crop: not dropped by the minimum object size, not split by Otsu."""
    import openslide

    with openslide.OpenSlide(str(cmu_svs)) as osr:
        crop = osr.read_region((880, 2250), 0, (250, 150)).convert("RGB")
    crop.save(tmp_path / "roi.png")
    params = TilingParams(mpp=0.5, size=32)
    with Slide(tmp_path / "roi.png", mpp=0.499) as s:
        df, tissue = tile_slide(s, params)
        n_grid = len(grid(s, params))
    assert tissue.unimodal and tissue.fraction > 0.85
    assert len(df) >= 0.9 * n_grid and n_grid == 7 * 4
    with Slide(tmp_path / "roi.png", mpp=0.499) as s:
        nomask, t2 = tile_slide(s, TilingParams(mpp=0.5, size=32, mask=False))
    assert len(nomask) == n_grid and t2.fraction == 1.0
    for mask in (True, False):  # an image smaller than one tile is said as such, mask or not
        with Slide(tmp_path / "roi.png", mpp=0.499) as s, \
                pytest.raises(NoTissueError, match=r"image \(125 x 75 µm\) is smaller than one tile \(112 µm\)"):
            tile_slide(s, TilingParams(mpp=0.5, size=224, mask=mask))


def test_tissue_parameters_change_the_tiling_id():
    from hefeat.slides.run import tiling_id

    base = tiling_id(TilingParams())
    assert tiling_id(TilingParams(min_object_um2=5000)) != base
    assert tiling_id(TilingParams(mask=False)) != base
    assert tiling_id(TilingParams(mask_mpp=4.0)) != base
    with pytest.raises(HefeatError, match="mask_mpp"):
        TilingParams(mask_mpp=0)


def test_per_slide_overrides_and_qc_of_an_existing_tiling(tmp_path, cohort):
    """A manifest turns the mask off for one slide only; `hefeat qc` draws pictures for a tiling made earlier."""
    import glob
    import json

    from click.testing import CliRunner

    from hefeat.cli import main
    from hefeat.slides.qc_thumbnail import write_tiling_qc
    from hefeat.slides.run import ingest_slides, run_tiling
    from hefeat.slides.tiling import read_overrides
    from hefeat.store.catalog import Store

    st = Store.init(tmp_path / "st")
    ingest_slides(st, sorted(glob.glob(str(cohort / "slides" / "*.tiff")))[:2])
    (tmp_path / "m.csv").write_text("slide_id,mask,min_object_um2\nS02,no,\n")
    ov = read_overrides(tmp_path / "m.csv")
    assert ov == (("S02", (("mask", False),)),)
    base = run_tiling(st, TilingParams())
    over = run_tiling(st, TilingParams(overrides=ov))
    assert over.extra["tiling_id"] != base.extra["tiling_id"]
    n = {k: {s: len(st.tiles(t, s)) for s in ("S01", "S02")} for k, t in
         (("base", base.extra["tiling_id"]), ("over", over.extra["tiling_id"]))}
    assert n["over"]["S01"] == n["base"]["S01"] and n["over"]["S02"] > n["base"]["S02"]
    assert TilingParams.from_dict(st.tiling(over.extra["tiling_id"])["params"]).overrides == ov
    (tmp_path / "typo.csv").write_text("slide_id,mask\nS99,no\n")  # not a slide of this store
    with pytest.raises(HefeatError, match="not in the store: S99"):
        run_tiling(st, TilingParams(overrides=read_overrides(tmp_path / "typo.csv")))
    with pytest.raises(HefeatError, match="that is a tiling id"):
        st.extraction(base.extra["tiling_id"])
    (tmp_path / "bad.csv").write_text("slide_id,mask_mpp\nS01,abc\n")
    with pytest.raises(HefeatError, match="not a number"):
        read_overrides(tmp_path / "bad.csv")
    r = CliRunner().invoke(main, ["qc", "--tiling", base.extra["tiling_id"], "--store", str(st.root), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert len(out["written"]) == 2 and out["failed"] == {}
    im = plt_image(st.qc_thumbnail_path(base.extra["tiling_id"], "S01"))
    assert im.shape[0] > 100 and (np.abs(im.astype(int) - [67, 160, 71]).sum(2) < 60).any()
    with pytest.raises(HefeatError, match="not tiled"):
        write_tiling_qc(st, base.extra["tiling_id"], ["S09"])


def plt_image(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))
