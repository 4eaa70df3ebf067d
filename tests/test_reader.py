"""Slide reading: MPP sources, physical resolution, bad files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from hefeat.errors import HefeatError
from hefeat.slides.reader import Slide
from hefeat.slides.synth import SlideSpec, render_slide, write_pyramid_tiff
from hefeat.slides.tiling import TilingParams, tile_slide


def test_cmu_aperio_slide_opens_with_its_mpp(cmu_svs):
    """CMU-1-Small-Region.svs states 0.499 µm/px (aperio.MPP / openslide.mpp-x)."""
    with Slide(cmu_svs) as s:
        assert s.mpp.x == pytest.approx(0.499, abs=1e-3)
        assert s.mpp.source == "openslide.mpp-x"
        assert s.vendor == "aperio"
        assert s.dimensions == (2220, 2967)
        tile = s.read(1000, 1000, 224, 0.5)
        assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8


def test_cmu_tiles_and_mask_are_plausible(cmu_svs):
    """Tissue share of the real slide is believable and tiles at 0.5 µm/px are tissue."""
    with Slide(cmu_svs) as s:
        df, mask = tile_slide(s, TilingParams(mpp=0.5, size=224))
    assert 0.15 < mask.fraction < 0.9
    assert 15 <= len(df) <= 120
    assert (df["tissue_frac"] >= 0.5).all()
    # H&E tissue is darker than glass and not grey.
    assert df["mean_g"].mean() < 220
    assert df["size0"].iloc[0] == pytest.approx(224 * 0.5 / 0.499)


def test_same_tissue_at_025_and_05_gives_same_tiles(tmp_path):
    """A slide rendered at 0.25 and at 0.5 µm/px: same physical grid, visually equal tiles."""
    spec = dict(slide_id="R", patient_id="P", site="s", seed=42, width_um=800, height_um=600, has_spots=False)
    paths = {}
    for mpp in (0.25, 0.5):
        paths[mpp] = tmp_path / f"r{mpp}.tiff"
        write_pyramid_tiff(paths[mpp], render_slide(SlideSpec(mpp=mpp, **spec)), mpp)
    with Slide(paths[0.25]) as fine, Slide(paths[0.5]) as coarse:
        assert fine.mpp.x == 0.25 and coarse.mpp.x == 0.5
        assert fine.level0_size(224, 0.5) * fine.mpp.x == pytest.approx(coarse.level0_size(224, 0.5) * coarse.mpp.x)
        errs = []
        for x_um, y_um in [(200, 150), (400, 300), (100, 350)]:
            a = fine.read(x_um / 0.25, y_um / 0.25, 224, 0.5).astype(float)
            b = coarse.read(x_um / 0.5, y_um / 0.5, 224, 0.5).astype(float)
            errs.append(np.abs(a - b).mean())
            assert np.corrcoef(a.mean(2).ravel(), b.mean(2).ravel())[0, 1] > 0.8
        assert np.mean(errs) < 12, errs


def test_slide_without_mpp_needs_override(tmp_path):
    """No resolution tag and no override: a clear error naming --mpp; with --mpp it opens."""
    p = tmp_path / "nompp.tiff"
    tifffile.imwrite(p, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    with pytest.raises(HefeatError, match="--mpp"):
        Slide(p)
    with Slide(p, mpp=0.5) as s:
        assert s.mpp.source == "override"


def test_missing_and_corrupt_files_fail_clearly(tmp_path, cohort):
    with pytest.raises(HefeatError, match="not found"):
        Slide(tmp_path / "nope.svs")
    good = (cohort / "slides" / "S01.tiff").read_bytes()
    bad = tmp_path / "truncated.tiff"
    bad.write_bytes(good[:2000])
    with pytest.raises(HefeatError, match="OpenSlide cannot open"):
        Slide(bad)


def test_best_level_never_upsamples(cohort):
    """A 0.25 µm/px slide read at 0.5 µm/px uses its 2x level, at 0.3 µm/px level 0."""
    import glob

    for p in glob.glob(str(cohort / "slides" / "*.tiff")):
        with Slide(p) as s:
            if s.mpp.x == 0.25:
                assert s.best_level(0.5) == 1
                assert s.best_level(0.3) == 0
                return
    pytest.fail("cohort has no 0.25 µm/px slide")


@pytest.fixture
def cmu_crop(cmu_svs):
    """A real all-tissue H&E crop: 250 x 150 px of CMU-1 dermis at 0.499 µm/px (~125 x 75 µm)."""
    import openslide

    with openslide.OpenSlide(str(cmu_svs)) as s:
        return np.asarray(s.read_region((880, 2250), 0, (250, 150)).convert("RGB"))


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_png_and_jpeg_ingest_with_mpp(tmp_path, cmu_crop, fmt):
    """Plain images open through the same Slide API: pixels, --mpp required, ingested into a store."""
    from PIL import Image

    from hefeat.slides.run import ingest_slides
    from hefeat.store.catalog import Store

    p = tmp_path / f"roi.{fmt}"
    Image.fromarray(cmu_crop).save(p, quality=95) if fmt == "jpg" else Image.fromarray(cmu_crop).save(p)
    with pytest.raises(HefeatError, match="--mpp"):
        Slide(p)
    with Slide(p, mpp=0.499) as s:
        assert s.plain and s.dimensions == (250, 150) and s.level_count == 1
        tile = s.read(20, 30, 64, 0.499)
        np.testing.assert_array_equal(tile, np.asarray(Image.open(p).convert("RGB"))[30:94, 20:84])
        if fmt == "png":
            np.testing.assert_array_equal(tile, cmu_crop[30:94, 20:84])
        assert s.read(230, 0, 40, 0.499)[:, 30:].min() == 255  # outside the image is white
        assert s.thumbnail(0.998).shape == (75, 125, 3)
    st = Store.init(tmp_path / "st")
    rep = ingest_slides(st, [p], mpp=0.499)
    assert rep.added == ["roi"]
    row = st.slides(["roi"]).iloc[0]
    assert row["mpp_x"] == 0.499 and row["mpp_source"] == "override" and row["width"] == 250


def test_flat_tiff_with_microscope_resolution_needs_no_mpp(tmp_path, cmu_crop):
    """A flat (striped) TIFF OpenSlide cannot read: its cm resolution tag gives the MPP; 72 dpi is ignored."""
    p = tmp_path / "flat.tif"
    tifffile.imwrite(p, cmu_crop, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with Slide(p) as s:
        assert s.plain and s.mpp.x == pytest.approx(0.5) and s.mpp.source == "tiff.XResolution"
    q = tmp_path / "screen.tif"
    tifffile.imwrite(q, cmu_crop, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(HefeatError, match="--mpp"):
        Slide(q)
