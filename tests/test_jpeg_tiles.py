"""Device JPEG decode path: raw TIFF/SVS JPEG tiles decoded in batches give OpenSlide's pixels."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

import hefeat.slides.jpeg_tiles as J
from hefeat.errors import HefeatError
from hefeat.slides.reader import Slide

REGIONS = [(1000, 1000, 224), (1100, 1050, 224), (2100, 2800, 224)]  # two share tiles; one runs off the edge


@pytest.mark.parametrize("which", ["cmu", "synthetic"])
def test_raw_jpeg_tiles_match_openslide(which, cmu_svs, cohort, monkeypatch):
    """Aperio RGB JPEG with JPEGTables (CMU-1) and YCbCr JPEG (synthetic): identical pixels at level 0."""
    path = cmu_svs if which == "cmu" else cohort / "slides" / "S01.tiff"
    calls = []
    real = J.decode
    monkeypatch.setattr(J, "decode", lambda streams, device, rgb=False: calls.append(len(streams)) or real(streams, device, rgb))
    with J.JpegTiles(path) as src, Slide(path) as s:
        lv = src.levels[0]
        assert J.check_device_decode(src, "cpu")
        calls.clear()
        got = J.read_regions(src, lv, REGIONS, 224, "cpu").numpy()
        want = [s.read(x, y, 224, s.mpp.x) for x, y, _ in REGIONS]
        need = {i for x, y, n in REGIONS for i in src.covering(lv, x, y, n, n)}
    assert calls == [len(need)]  # each JPEG tile decoded once for the batch
    for g, w in zip(got, want, strict=True):
        assert np.abs(g.astype(int) - w.astype(int)).mean() <= 0.5  # JPEG decoder tolerance (same libjpeg: 0)


def test_resized_regions_match_openslide_within_tolerance(cmu_svs):
    with J.JpegTiles(cmu_svs) as src, Slide(cmu_svs) as s:
        got = J.read_regions(src, src.levels[0], [(600, 900, 448)], 224, "cpu")[0].numpy()
        want = s.read(600, 900, 224, s.mpp.x * 2)
    # The decode is exact (test above); what differs is the filter: antialiased bilinear vs PIL Lanczos.
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 4.0
    assert np.corrcoef(got.mean(2).ravel(), want.mean(2).ravel())[0, 1] > 0.97


def test_regions_cut_by_block_gather_equal_the_tiles_pasted_one_by_one(cmu_svs, monkeypatch):
    """The GPU's cut (one gather of whole tiles per region block) gives the CPU's pasted pixels exactly: regions off
    the top-left, inside, off the right and bottom edges, two sizes in one call, one resized."""
    regions = [(-50, -30, 224), (1000, 1000, 224), (2100, 1400, 300), (5, 7, 100), (2000, 2900, 224)]
    with J.JpegTiles(cmu_svs) as src:
        lv = src.levels[0]
        pasted = J.read_regions(src, lv, regions, 224, "cpu").numpy()
        used = []
        monkeypatch.setattr(J, "_cut_paste", lambda *a: used.append(len(a[3])) or J._cut_blocks(*a))
        blocks = J.read_regions(src, lv, regions, 224, "cpu").numpy()
    assert sorted(used) == [1, 1, 3]  # every region went through the block cut (grouped by size)
    assert pasted.shape == (5, 224, 224, 3) and np.array_equal(blocks, pasted)
    assert (pasted[0, :30] == 255).all() and (pasted[4, :, 220:] == 255).all()  # outside the image: white
    assert (pasted[4, :60] != 255).any()  # and inside it, tissue


def test_a_tile_decoded_at_another_size_is_refused_not_pasted(cmu_svs, monkeypatch):
    """TIFF tiles are stored full-size; one that decodes smaller is damage, refused by the block cut with its size."""
    real = J.decode
    monkeypatch.setattr(J, "decode", lambda s, d, rgb=False: [t[:, :200, :] if k == 1 else t
                                                              for k, t in enumerate(real(s, d, rgb))])
    monkeypatch.setattr(J, "_cut_paste", J._cut_blocks)
    with J.JpegTiles(cmu_svs) as src, pytest.raises(ValueError, match=r"decoded to 200 x 240 px .* 240 x 240"):
        J.read_regions(src, src.levels[0], REGIONS[:1], 224, "cpu")


def test_rgb_jpeg_tiles_are_decoded_without_colour_conversion(cmu_svs, cohort, monkeypatch):
    """Aperio's RGB JPEG tiles are asked for as stored (UNCHANGED: nvJPEG's hardware decoder ignored the Adobe
    marker and converted them as YCbCr on an H200); YCbCr tiles (the synthetic slides) are asked for as RGB."""
    import torchvision.io as tio

    modes, real = [], tio.decode_jpeg
    monkeypatch.setattr(tio, "decode_jpeg", lambda data, mode, device: modes.append(mode) or real(data, mode=mode,
                                                                                                  device=device))
    for path in (cmu_svs, cohort / "slides" / "S01.tiff"):
        with J.JpegTiles(path) as src:
            assert J.check_device_decode(src, "cpu")
            J.read_regions(src, src.levels[0], REGIONS[:1], 224, "cpu")
    assert modes == [tio.ImageReadMode.UNCHANGED] * 2 + [tio.ImageReadMode.RGB] * 2


def test_non_jpeg_tiff_is_refused_clearly(tmp_path):
    p = tmp_path / "lzw.tiff"
    tifffile.imwrite(p, np.zeros((256, 256, 3), np.uint8), tile=(128, 128), compression="zlib")
    with pytest.raises(HefeatError, match="no JPEG-tiled level"):
        J.JpegTiles(p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_cuda_decode_matches_cpu(cmu_svs):
    with J.JpegTiles(cmu_svs) as src:
        assert J.check_device_decode(src, "cuda")
        a = J.read_regions(src, src.levels[0], REGIONS, 224, "cuda").cpu().numpy().astype(int)
        b = J.read_regions(src, src.levels[0], REGIONS, 224, "cpu").numpy().astype(int)
    assert np.abs(a - b).mean() < 1.5
