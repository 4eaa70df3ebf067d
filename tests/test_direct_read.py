"""Level-0 regions decoded from the JPEG tiles on the CPU: OpenSlide's bytes, or OpenSlide itself."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import simplejpeg
import tifffile

from hefeat.slides import direct_read
from hefeat.slides.reader import Slide


def _regions(slide: Slide, k: int, seed: int) -> list[tuple[int, int, int, float]]:
    """(x, y, size_px, mpp): inside, across tile seams, off every edge, wholly outside, resized (n = 2 size_px), and
    at 2x and 4x the mpp: on a pyramid, from levels 1 and 2 (at even and odd level-0 origins: whole and half pixels
    there) and resized from level 1 (3x)."""
    w, h = slide.dimensions
    rng = np.random.default_rng(seed)
    xs, ys = rng.integers(-150, w, k), rng.integers(-150, h, k)
    out = [(int(x), int(y), 224, slide.mpp.x) for x, y in zip(xs, ys, strict=True)]
    out += [(w - 100, h - 100, 224, slide.mpp.x), (-50, -70, 224, slide.mpp.x), (w + 10, 5, 64, slide.mpp.x)]
    xs, ys = rng.integers(0, w, 4), rng.integers(0, h, 4)
    out += [(int(x), int(y), 112, slide.mpp.x * 2) for x, y in zip(xs, ys, strict=True)]
    xs, ys = rng.integers(-100, w, 6), rng.integers(-100, h, 6)
    out += [(int(x) * 4, int(y) * 4, 96, slide.mpp.x * 4) for x, y in zip(xs // 4, ys // 4, strict=True)]
    out += [(int(x) + 1, int(y), 64, slide.mpp.x * 2) for x, y in zip(xs, ys, strict=True)]
    out += [(int(x) * 2, int(y) * 2, 100, slide.mpp.x * 3) for x, y in zip(xs // 2, ys // 2, strict=True)]
    return out


def _openslide_reads(path, regions, monkeypatch) -> list[np.ndarray]:
    monkeypatch.setenv("HEFEAT_DIRECT_JPEG", "0")
    with Slide(path) as s:
        assert s._direct is None
        out = [s.read(x, y, n, m) for x, y, n, m in regions]
    monkeypatch.delenv("HEFEAT_DIRECT_JPEG")
    return out


def _read_in_threads(slide: Slide, regions, n_threads: int) -> dict[int, np.ndarray]:
    """Every region read from one Slide by `n_threads` threads at once, by index."""
    got: dict[int, np.ndarray] = {}

    def work(part):
        for i in part:
            x, y, n, m = regions[i]
            got[i] = slide.read(x, y, n, m)

    threads = [threading.Thread(target=work, args=(range(j, len(regions), n_threads),)) for j in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def _reference(path, k: int, seed: int, monkeypatch) -> tuple[list, list[np.ndarray]]:
    """`_regions` of the slide and what OpenSlide reads there."""
    with Slide(path) as s:
        regions = _regions(s, k, seed)
    return regions, _openslide_reads(path, regions, monkeypatch)


@pytest.mark.parametrize("which", ["cmu", "synthetic"])
def test_direct_reads_are_openslides_bytes(which, cmu_svs, cohort, monkeypatch):
    """Aperio RGB JPEG with JPEGTables (CMU-1) and YCbCr JPEG (synthetic): every byte equal, edges and resizes too."""
    path = cmu_svs if which == "cmu" else cohort / "slides" / "S01.tiff"
    regions, want = _reference(path, 40, 3, monkeypatch)
    with Slide(path) as s:
        got = [s.read(x, y, n, m) for x, y, n, m in regions]
        assert isinstance(s._direct, direct_read.DirectRegions)  # the fast path ran, not a silent fallback
        assert s._direct.decoded > 0
        levels = s.level_count
    assert s._direct_same == {i: True for i in range(min(levels, 3))}  # every level read, each checked equal
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.uint8 and g.shape == w.shape and g.flags.writeable
        np.testing.assert_array_equal(g, w)


def test_each_jpeg_tile_is_decoded_once_while_cached(cohort):
    with Slide(cohort / "slides" / "S01.tiff") as s:
        regions = [(300 + 50 * i, 400, 224) for i in range(6)]  # overlapping: they share JPEG tiles
        s.read(0, 0, 8, s.mpp.x)  # opens and checks the direct reader
        d = s._direct
        before = d.decoded
        for x, y, n in regions:
            s.read(x, y, n, s.mpp.x)
        need = {i for x, y, n in regions for i in d.src.covering(d.levels[0], x, y, n, n)} - {0}
        assert d.decoded - before == len(need)


def test_the_tile_cache_is_bounded(cohort, monkeypatch):
    monkeypatch.setattr(direct_read, "CACHE_BYTES", 3 * 256 * 256 * 3)
    path = cohort / "slides" / "S01.tiff"
    regions, want = _reference(path, 30, 5, monkeypatch)
    with Slide(path) as s:
        got = [s.read(x, y, n, m) for x, y, n, m in regions]
        d = s._direct
        assert len(d._tiles) <= 3 and d._held <= d.cache_bytes
        assert d.decoded > len(d._tiles)  # tiles were evicted and decoded again
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_a_decoder_that_disagrees_is_never_used(cmu_svs, monkeypatch):
    """One differing byte on the first region: that slide reads through OpenSlide from then on."""
    regions, want = _reference(cmu_svs, 10, 7, monkeypatch)
    real, calls = simplejpeg.decode_jpeg, []

    def off_by_one(data, *a, **k):
        calls.append(1)
        t = real(data, *a, **k).copy()
        t[0, 0, 0] ^= 1
        return t

    monkeypatch.setattr(simplejpeg, "decode_jpeg", off_by_one)
    with Slide(cmu_svs) as s:
        x, y = 0, 0  # covers tile 0's first pixel
        first = s.read(x, y, 224, s.mpp.x)
        assert s._direct_same == {0: False} and calls
        n_calls = len(calls)
        got = [s.read(x, y, n, m) for x, y, n, m in regions]
    assert len(calls) == n_calls
    np.testing.assert_array_equal(first, _openslide_reads(cmu_svs, [(0, 0, 224, s.mpp.x)], monkeypatch)[0])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_a_tile_that_fails_to_decode_is_read_by_openslide(cmu_svs, monkeypatch):
    regions, want = _reference(cmu_svs, 10, 9, monkeypatch)
    with Slide(cmu_svs) as s:
        s.read(0, 0, 8, s.mpp.x)
        assert isinstance(s._direct, direct_read.DirectRegions)
        s._direct._tiles.clear()

        def broken(data, *a, **k):
            raise ValueError("corrupt JPEG data")

        monkeypatch.setattr(simplejpeg, "decode_jpeg", broken)
        got = [s.read(x, y, n, m) for x, y, n, m in regions]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("damage", ["zeroed tail", "no end marker"])
def test_a_damaged_tile_fails_as_it_does_in_openslide(damage, cohort, tmp_path, monkeypatch):
    """libjpeg only warns about corrupt entropy data (a decoder may fill the rest grey); OpenSlide makes that an
    error, and so does the direct path: the slide fails instead of embedding grey."""
    import shutil

    from hefeat.slides.jpeg_tiles import JpegTiles

    path = tmp_path / "damaged.tiff"
    shutil.copy(cohort / "slides" / "S01.tiff", path)
    with JpegTiles(path) as src:
        lv = src.levels[0]
        r, c = (lv.height // lv.tile_h) // 2, lv.cols // 2
        off, cnt = lv.offsets[r * lv.cols + c], lv.counts[r * lv.cols + c]
    with open(path, "r+b") as f:
        f.seek(off)
        data = bytearray(f.read(cnt))
        if damage == "zeroed tail":
            data[cnt // 2:cnt - 2] = bytes(cnt - 2 - cnt // 2)
        else:
            data[cnt - 2:] = b"\0\0"
        f.seek(off)
        f.write(bytes(data))
    x, y = c * lv.tile_w + 8, r * lv.tile_h + 8
    for direct in ("0", "1"):
        monkeypatch.setenv("HEFEAT_DIRECT_JPEG", direct)
        with Slide(path) as s:
            s.read(0, 0, 64, s.mpp.x)  # an undamaged tile first: the direct reader is open and checked
            assert isinstance(s._direct, direct_read.DirectRegions) == (direct == "1")
            with pytest.raises(Exception, match="(?i)jpeg"):
                s.read(x, y, 224, s.mpp.x)


def test_layouts_openslide_composes_stay_with_openslide(tmp_path, cmu_svs):
    """Other vendors' grids (overlaps, sparse tiles) and non-JPEG tiles never take the direct path."""
    with Slide(cmu_svs) as s:
        for vendor in ("philips", "ventana", "hamamatsu", "leica", "mirax"):
            assert direct_read.DirectRegions.open(str(cmu_svs), vendor, s.level_dimensions) is None
        assert direct_read.DirectRegions.open(str(cmu_svs), "aperio", [(s.dimensions[0] + 1, s.dimensions[1])]) is None
    p = tmp_path / "zlib.tiff"
    img = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(p, img, tile=(256, 256), compression="zlib", resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with Slide(p) as s:
        np.testing.assert_array_equal(s.read(100, 100, 224, s.mpp.x), img[100:324, 100:324])
        assert s._direct is None


def test_each_level_is_checked_on_its_own(cohort, monkeypatch):
    """A decoder that differs on level 1 only: level 1 reads through OpenSlide from then on, level 0 stays direct;
    a level whose size OpenSlide sees differently, and a half-pixel origin, are never read directly."""
    path = cohort / "slides" / "S01.tiff"
    regions = [(400, 600, 224, 1), (2000, 300, 128, 1), (900, 900, 100, 2), (1000, 1200, 100, 2), (1001, 1200, 100, 2)]
    with Slide(path) as s:
        mpp = s.mpp.x
    regions = [(x, y, n, mpp * m) for x, y, n, m in regions]
    want = _openslide_reads(path, regions, monkeypatch)
    real = simplejpeg.decode_jpeg
    with Slide(path) as s:
        assert s.level_count >= 2
        s.read(0, 0, 8, mpp)  # level 0 checked with the real decoder
        monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda data, *a, **k: real(data, *a, **k) ^ np.uint8(1))
        s._direct._tiles.clear()
        with pytest.raises(AssertionError):  # level 0 was kept: now it reads the broken decoder's bytes
            np.testing.assert_array_equal(s.read(*regions[0][:2], 224, mpp), want[0])
        monkeypatch.setattr(simplejpeg, "decode_jpeg", real)
        s._direct._tiles.clear()
        got0 = [s.read(x, y, n, m) for x, y, n, m in regions[:2]]
        monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda data, *a, **k: real(data, *a, **k) ^ np.uint8(1))
        got1 = [s.read(x, y, n, m) for x, y, n, m in regions[2:]]  # level 1 checked with the broken decoder
        assert s._direct_same == {0: True, 1: False}
    for g, w in zip(got0 + got1, want, strict=True):
        np.testing.assert_array_equal(g, w)
    with Slide(path) as s:
        s.read(0, 0, 8, mpp)
        d = s._direct
        before = d.decoded
        np.testing.assert_array_equal(s.read(1001, 1200, 100, mpp * 2), want[4])  # x / 2 = 500.5: OpenSlide's
        assert d.decoded == before and 1 not in s._direct_same
        dims = list(s.level_dimensions)
    dims[1] = (dims[1][0] + 1, dims[1][1])
    d = direct_read.DirectRegions.open(str(path), "generic-tiff", dims)
    assert set(d.levels) == set(range(len(dims))) - {1}
    d.close()


def test_off_switch(cohort, monkeypatch):
    monkeypatch.setenv("HEFEAT_DIRECT_JPEG", "0")
    with Slide(cohort / "slides" / "S01.tiff") as s:
        s.read(100, 100, 224, s.mpp.x)
        assert s._direct is None


def test_threads_reading_one_slide_get_openslides_bytes(cmu_svs, monkeypatch):
    regions, want = _reference(cmu_svs, 60, 11, monkeypatch)
    with Slide(cmu_svs) as s:
        got = _read_in_threads(s, regions, 4)
        assert isinstance(s._direct, direct_read.DirectRegions)
    for i, w in enumerate(want):
        np.testing.assert_array_equal(got[i], w)


def test_reads_without_pread_give_the_same_bytes(cmu_svs, monkeypatch):
    """Where the OS has no pread (Windows), tile bytes are read under a lock: same pixels, threads included."""
    from hefeat.slides import jpeg_tiles

    regions, want = _reference(cmu_svs, 30, 13, monkeypatch)
    monkeypatch.setattr(jpeg_tiles, "_PREAD", False)
    with Slide(cmu_svs) as s:
        got = _read_in_threads(s, regions, 3)
        assert isinstance(s._direct, direct_read.DirectRegions)
    for i, w in enumerate(want):
        np.testing.assert_array_equal(got[i], w)
