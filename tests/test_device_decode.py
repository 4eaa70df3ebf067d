"""The device-decode reader (here on the CPU): one decode check per JPEG encoding, decided slide by slide."""

from __future__ import annotations

import glob
import io
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

import hefeat.extract.device_decode as D
import hefeat.slides.jpeg_tiles as J
from hefeat.errors import HefeatError
from hefeat.extract.pipeline import ExtractOptions, run_extraction
from hefeat.slides.run import ingest_slides, run_tiling
from hefeat.slides.tiling import TilingParams
from hefeat.store.catalog import Store
from hefeat.store.features import read_features

ENC = dict(encoder="resnet18", weights="none", layer="layer2", precision="fp32", fit="native")


def _zlib_copy(src, dest) -> str:
    """The slide's level 0 as a tiled deflate TIFF at the same MPP: OpenSlide reads it, the device decode cannot."""
    with tifffile.TiffFile(src) as tf:
        page = tf.pages[0]
        img, res = page.asarray(), page.tags["XResolution"].value
    tifffile.imwrite(dest, img, tile=(256, 256), compression="zlib", photometric="rgb",
                     resolution=(res[0] / res[1], res[0] / res[1]), resolutionunit="CENTIMETER", metadata=None)
    return str(dest)


def _store(root, paths):
    st = Store.init(root)
    ingest_slides(st, paths)
    run_tiling(st, TilingParams(size=64, mpp=1.0))  # small tiles: the reader is under test, not the encoder
    return st


class _Lenient(D.DecodeGate):
    """The gate of decode='auto' (lenient) on a device that is the CPU."""

    def __init__(self, device):
        super().__init__(device, strict=False)


def _jpeg(rgb: np.ndarray, subsampling: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90, subsampling=subsampling)
    return buf.getvalue()


def test_frame_header_keeps_the_subsampling_not_the_size():
    rng = np.random.default_rng(0)
    small, large = rng.integers(0, 255, (16, 24, 3), np.uint8), rng.integers(0, 255, (40, 32, 3), np.uint8)
    h420, h444 = J.frame_header(_jpeg(small, 2)), J.frame_header(_jpeg(small, 0))
    assert h420 and h420 == J.frame_header(_jpeg(large, 2))  # same encoding, other image size
    assert h420 != h444 and h420[0] == 0xC0 and len(h420) == 3 + 3 * 3  # marker, precision, count, 3 x (id, hv, tq)
    assert J.frame_header(b"\xff\xd8\xff\xda\x00\x02") == b""  # a scan before any frame header


def test_one_decode_check_per_encoding_not_per_slide(tmp_path, cohort, cmu_svs, monkeypatch):
    """Three synthetic slides share an encoding, CMU-1 (Aperio RGB JPEG) has its own: two checks for four slides,
    made while the slides are read (the run's old pre-flight decoded the first tile of every slide twice)."""
    paths = sorted(glob.glob(str(cohort / "slides" / "*.tiff")))[:3] + [str(cmu_svs)]
    st = _store(tmp_path / "st", paths)
    real, seen = J.check_device_decode, []
    monkeypatch.setattr(J, "check_device_decode", lambda src, *a, **k: seen.append(src.path) or real(src, *a, **k))
    s = run_extraction(st, options=ExtractOptions(batch_size=16, decode="device", workers=0), **ENC)
    assert len(s.ok) == 4 and not s.failed and s.extra["decode"].startswith("device")
    assert sorted(seen) == sorted([paths[0], str(cmu_svs)])
    with J.JpegTiles(paths[1]) as a, J.JpegTiles(cmu_svs) as b:
        assert J.encoding_key(a, a.levels[0]) != J.encoding_key(b, b.levels[0])


def test_auto_reads_a_slide_the_device_cannot_decode_on_the_cpu(tmp_path, cohort, monkeypatch):
    """Under auto (decode='device' on the CPU, the gate made lenient): a deflate TIFF among JPEG slides is read by
    OpenSlide on the reading thread, gives the CPU reader's features and says so in its status row and the run's."""
    paths = sorted(glob.glob(str(cohort / "slides" / "*.tiff")))[:3]
    (tmp_path / "slides").mkdir()
    paths[1] = _zlib_copy(paths[1], tmp_path / "slides" / "S02.tiff")
    monkeypatch.setattr(D, "DecodeGate", lambda device, strict: _Lenient(device))
    st = _store(tmp_path / "st", paths)
    s = run_extraction(st, options=ExtractOptions(batch_size=16, decode="device", workers=0), **ENC)
    assert sorted(s.ok) == ["S01", "S02", "S03"] and not s.failed
    eid = s.extra["extraction_id"]
    assert s.extra["decode"].startswith("device") and "1 slide read on the CPU instead (first: S02, cpu (" in \
        s.extra["decode"]
    decode = {sid: json.loads(st.read_status("extraction", eid, sid)["info"])["decode"] for sid in s.ok}
    assert decode["S02"].startswith("cpu (") and "no JPEG-tiled level" in decode["S02"]
    assert decode["S01"].startswith("device") and decode["S03"].startswith("device")
    ref = _store(tmp_path / "ref", paths[1:2])  # the CPU reader's features of the same slide
    r = run_extraction(ref, options=ExtractOptions(batch_size=16, decode="cpu", workers=0), **ENC)
    np.testing.assert_allclose(read_features(st.features_path(eid, "S02")),
                               read_features(ref.features_path(r.extra["extraction_id"], "S02")), rtol=1e-5, atol=1e-6)


def test_device_fails_a_later_slide_it_cannot_decode_alone(tmp_path, cohort):
    """decode='device': a first slide that cannot be device-decoded stops the run before any work; a later one
    fails alone with the reason, the others are extracted."""
    paths = sorted(glob.glob(str(cohort / "slides" / "*.tiff")))[:3]
    (tmp_path / "slides").mkdir()
    paths[1] = _zlib_copy(paths[1], tmp_path / "slides" / "S02.tiff")
    st = _store(tmp_path / "st", paths)
    s = run_extraction(st, options=ExtractOptions(batch_size=16, decode="device", workers=0), **ENC)
    assert sorted(s.ok) == ["S01", "S03"] and list(s.failed) == ["S02"]
    reason = st.sql("SELECT reason FROM status WHERE stage = 'extraction' AND slide_id = 'S02'")["reason"].iloc[0]
    assert "decode=device" in reason and "no JPEG-tiled level" in reason
    first = _store(tmp_path / "first", paths[1:2])
    with pytest.raises(HefeatError, match="decode=device: .*no JPEG-tiled level"):
        run_extraction(first, options=ExtractOptions(batch_size=16, decode="device", workers=0), **ENC)
    assert not list((first.root / "features").rglob("*.h5"))


def test_the_run_is_decided_by_the_first_slide_that_can_be_checked(cohort, monkeypatch):
    """Under auto on CUDA (no device is touched: the decision only reads files): an unreadable first slide leaves
    the decision to the next; a first deflate TIFF sends the run to the CPU reader."""
    good = sorted(glob.glob(str(cohort / "slides" / "*.tiff")))[:2]
    monkeypatch.setattr(J, "check_device_decode", lambda src, device, level=None: True)
    info = {}
    assert D.device_decoded_batches([], iter(()), ["/nonexistent.tiff", *good], None, 8, "cuda", "auto", info)
    assert info["decode"].startswith("device (cuda")
    assert D.device_decoded_batches([], iter(()), ["/nonexistent.tiff"], None, 8, "cuda", "auto", info) is None
    assert info["decode"].startswith("cpu (none of the first 1 slides could be checked: nonexistent.tiff")
    monkeypatch.setattr(J, "check_device_decode", lambda src, device, level=None: False)
    assert D.device_decoded_batches([], iter(()), good, None, 8, "cuda", "auto", info) is None
    assert info["decode"] == "cpu (device decode of S01.tiff differs from tifffile's)"
    with pytest.raises(HefeatError, match="decode=device: device decode of S01.tiff differs"):
        D.device_decoded_batches([], iter(()), good, None, 8, "cuda", "device", info)
    with pytest.raises(HefeatError, match="decode must be"):
        D.device_decoded_batches([], iter(()), good, None, 8, "cuda", "gpu", info)
