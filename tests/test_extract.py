"""Extraction: equality with a direct timm forward pass, resume, shards, interop, bad input."""

from __future__ import annotations

import glob
import shutil
import subprocess
import sys
import textwrap
import warnings

import h5py
import numpy as np
import pytest
import torch

from hefeat.errors import HefeatError
from hefeat.extract.pipeline import ExtractOptions, dihedral, run_extraction
from hefeat.slides.reader import Slide
from hefeat.slides.run import ingest_slides, run_tiling
from hefeat.slides.tiling import TilingParams
from hefeat.store.catalog import Store
from hefeat.store.features import load_features, read_features, slide_means

ENC = dict(encoder="resnet18", weights="none", layer="layer2", fit="native")
# 64 px tiles at 2 µm/px (128 µm, about the 112 µm of the default tiling): the run's mechanisms are under test, not
# the encoder, and a tile costs 1/12 of a 224 px one
TILES = TilingParams(size=64, mpp=2.0)


def _store(root, cohort, n=None, copy=False):
    paths = sorted(glob.glob(str(cohort / "slides" / "*.tiff")))[:n]
    if copy:
        (root / "slides").mkdir(parents=True)
        paths = [shutil.copy(p, root / "slides") for p in paths]
    st = Store.init(root / "st")
    ingest_slides(st, paths)
    tid = run_tiling(st, TILES).extra["tiling_id"]
    return st, tid


def _all_features(st, eid):
    ids = st.sql("SELECT slide_id FROM features_index WHERE extraction_id = ? ORDER BY 1", [eid])["slide_id"]
    return {s: read_features(st.features_path(eid, s)) for s in ids}


@pytest.fixture(scope="module")
def own_tiled(tiled, tmp_path_factory):
    """A copy of the session store for this file: its tests write extractions, which the tests of other files
    that copy `tiled` (and expect only its tilings) must not find, whichever runs first."""
    st0, tid, stid = tiled
    root = tmp_path_factory.mktemp("extract") / "store"
    shutil.copytree(st0.root, root)
    st = Store(root)
    return st, run_tiling(st, TILES).extra["tiling_id"], stid


@pytest.fixture(scope="module")
def extracted(own_tiled):
    st, tid, _ = own_tiled
    s = run_extraction(st, tiling_id=tid, precision="fp32", dtype="float32", options=ExtractOptions(batch_size=16), **ENC)
    return st, tid, s


def test_embeddings_equal_direct_timm_forward(extracted):
    """Stored features equal a hand-written timm forward pass on the same tiles (fp32)."""
    import timm

    st, tid, s = extracted
    eid = s.extra["extraction_id"]
    assert s.failed == {} and len(s.ok) == 8
    meta, X = load_features(st, eid, slides=["S02"])
    row = st.slides(["S02"]).iloc[0]
    torch.manual_seed(0)
    full = timm.create_model("resnet18", pretrained=False, num_classes=0)
    net = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(2,))
    net.load_state_dict({k: v for k, v in full.state_dict().items() if k in net.state_dict()})
    net.eval()
    with Slide(row["path"]) as sl:
        imgs = np.stack([sl.read(x, y, 64, 2.0) for x, y in meta[["x", "y"]].to_numpy()[:6]])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = net(x)[-1].mean((2, 3)).numpy()
    np.testing.assert_allclose(X[:6], want, rtol=1e-4, atol=1e-4)
    assert X.shape[1] == 128


def test_feature_file_layout_and_sql_join(extracted):
    st, tid, s = extracted
    eid = s.extra["extraction_id"]
    with h5py.File(st.features_path(eid, "S01"), "r") as f:
        assert f["features"].dtype == np.float32 and f["features"].chunks is None  # contiguous
        n = f["features"].shape[0]
        assert f["coords"].shape == (n, 2)
        assert f.attrs["encoder"] == "resnet18" and f.attrs["dim"] == 128 and f.attrs["tiling_id"] == tid
        assert f.attrs["patch_size"] == 64 and f.attrs["mpp"] == 2.0
        coords = f["coords"][:]
    tiles = st.tiles(tid, "S01")
    np.testing.assert_array_equal(coords, tiles[["x", "y"]].to_numpy())
    j = st.sql("SELECT t.slide_id, count(*) n, any_value(f.dim) dim FROM tiles t JOIN features_index f "
               "ON t.slide_id = f.slide_id AND t.tiling_id = ? AND f.extraction_id = ? GROUP BY 1", [tid, eid])
    assert len(j) == 8 and (j["dim"] == 128).all()
    meta, X = load_features(st, eid, f"SELECT slide_id, tile_id FROM tiles WHERE tiling_id = '{tid}' AND tile_id % 3 = 0 ORDER BY slide_id DESC, tile_id")
    full = {sid: read_features(st.features_path(eid, sid)) for sid in meta["slide_id"].unique()}
    for i, r in enumerate(meta.itertuples()):
        np.testing.assert_array_equal(X[i], full[r.slide_id][r.tile_id])
    ids, M = slide_means(st, eid)
    np.testing.assert_allclose(M[ids.index("S01")], full["S01"].mean(0) if "S01" in full else read_features(st.features_path(eid, "S01")).mean(0), rtol=1e-5)
    ext = st.sql("SELECT * FROM extractions").iloc[0]
    assert ext["batch_size"] == 16 and ext["precision"] == "fp32"


def test_rerun_does_nothing_and_precision_changes_id(extracted):
    st, tid, s = extracted
    again = run_extraction(st, tiling_id=tid, precision="fp32", dtype="float32", **ENC)
    assert again.ok == [] and len(again.done) == 8 and again.extra["extraction_id"] == s.extra["extraction_id"]
    from conftest import cpu_runs_bf16

    from hefeat.extract.plan import plan_extraction

    ids = {p: plan_extraction(st, tiling_id=tid, precision=p, dtype="float32", **ENC).extraction_id for p in ("fp32", "fp16")}
    assert ids["fp32"] == s.extra["extraction_id"] != ids["fp16"]  # fp16 only planned: it runs slowly on CPUs
    if not cpu_runs_bf16():
        pytest.skip("this CPU cannot run bf16 (no oneDNN bf16): the bf16 extraction below needs it")
    other = run_extraction(st, tiling_id=tid, precision="bf16", slides=["S01"], **ENC)
    assert other.extra["extraction_id"] not in (s.extra["extraction_id"], ids["fp16"])
    bf = read_features(st.features_path(other.extra["extraction_id"], "S01"))
    fp = read_features(st.features_path(s.extra["extraction_id"], "S01"))
    assert np.corrcoef(bf.ravel(), fp.ravel())[0, 1] > 0.99


KILLED_EXTRACT = textwrap.dedent("""
    import glob, os, signal, sys
    import hefeat.extract.pipeline as p
    from hefeat.store.catalog import Store
    real = p.embed_batch
    def embed_then_die(*a, **k):
        # SIGKILL at the first forward pass after two slides' files are renamed in: mid-run, inside a slide
        if len(glob.glob(os.path.join(sys.argv[1], "features", "*", "*.h5"))) >= 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    p.embed_batch = embed_then_die
    p.run_extraction(Store(sys.argv[1]), encoder="resnet18", weights="none", layer="layer2", fit="native", precision="fp32",
                     dtype="float32", options=p.ExtractOptions(batch_size=16, workers=int(sys.argv[2]) or None))
""")


@pytest.mark.parametrize("workers", [1, 0], ids=["dataloader-worker", "in-process-reader"])
def test_kill_mid_run_then_resume_is_byte_identical(workers, extracted, tmp_path, cohort):
    """SIGKILL inside a slide's forward passes, then a re-run: the uninterrupted extraction, byte for byte (killed
    while a DataLoader worker reads, and while the main process's threads read)."""
    st, tid = _store(tmp_path, cohort)
    killed = subprocess.run([sys.executable, "-c", KILLED_EXTRACT, str(st.root), str(workers)], timeout=300)
    assert killed.returncode == -9
    n_files = len(glob.glob(str(st.root / "features" / "*" / "*.h5")))
    eid = next(p.name.split("=", 1)[1] for p in (st.root / "features").iterdir())
    n_before = len(st.finished("extraction", eid))  # committed; a file renamed just before the kill is not
    assert 2 <= n_files < 8 and n_files - 1 <= n_before <= n_files
    s = run_extraction(st, precision="fp32", dtype="float32", options=ExtractOptions(batch_size=16), **ENC)
    assert len(s.done) == n_before and len(s.ok) == 8 - n_before and s.failed == {}
    ref_st, _, ref = extracted  # the same slides, tiling and options in another store, never interrupted
    assert ref.extra["extraction_id"] == s.extra["extraction_id"] == eid
    a, b = _all_features(st, eid), _all_features(ref_st, eid)
    assert a.keys() == b.keys() and len(a) == 8
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    assert not list((st.root / "features").glob("*/.*tmp-*"))


def test_short_batch_is_padded_where_a_new_shape_costs_an_autotune(extracted, tmp_path, cohort, monkeypatch):
    """On CUDA every forward gets the full batch shape (cuDNN autotunes each new one): the run's short last batch is
    padded and the padding dropped. Forced on here: no forward saw a short batch, and the features are the
    unpadded run's, byte for byte."""
    import hefeat.extract.pipeline as P

    assert P.padded_batch("cuda:0", 256) == 256 and P.padded_batch("cpu", 256) is None
    st, tid = _store(tmp_path, cohort, n=1)  # 33 tiles: two batches of 16 and one of 1
    real, seen = P.embed_batch, []
    monkeypatch.setattr(P, "padded_batch", lambda device, batch_size: batch_size)
    monkeypatch.setattr(P, "embed_batch", lambda enc, tr, x, **k: seen.append(len(x)) or real(enc, tr, x, **k))
    s = run_extraction(st, precision="fp32", dtype="float32", options=ExtractOptions(batch_size=16), **ENC)
    assert set(seen) == {16} and 0 < 16 * len(seen) - s.tiles < 16  # the last batch was short, and padded
    ref_st, _, ref = extracted
    a, b = _all_features(st, s.extra["extraction_id"]), _all_features(ref_st, ref.extra["extraction_id"])
    assert sorted(a) == ["S01"] and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_shards_together_equal_unsharded(extracted, tmp_path, cohort):
    st, tid = _store(tmp_path, cohort)
    parts = [run_extraction(st, shard=f"{i}/3", precision="fp32", dtype="float32", **ENC) for i in (1, 2, 3)]
    got = sorted(sum((p.ok for p in parts), []))
    assert got == [f"S0{i}" for i in range(1, 9)]
    assert len({p.extra["extraction_id"] for p in parts}) == 1
    ref_st, _, ref = extracted
    a, b = _all_features(st, parts[0].extra["extraction_id"]), _all_features(ref_st, ref.extra["extraction_id"])
    for k in b:
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(HefeatError, match="I/N"):
        run_extraction(st, shard="4/3", **ENC)


def test_export_import_round_trip(extracted, tmp_path, cohort):
    from hefeat.extract.interop import export_h5, import_h5

    st, tid, s = extracted
    eid = s.extra["extraction_id"]
    out = export_h5(st, eid, tmp_path / "h5")
    assert out["slides"] == 8
    with h5py.File(tmp_path / "h5" / "S03.h5", "r") as f:
        assert set(f) == {"features", "coords"} and f["coords"].attrs["patch_size"] == 64
        assert f["coords"].attrs["patch_level"] == 0
    own = import_h5(st, tmp_path / "h5", encoder="resnet18-layer2")  # a new tiling + extraction before #23
    assert (own["extraction_id"], own["tiling_id"], own["new"]) == (eid, tid, 0) and own["recognised"]
    other = Store.init(tmp_path / "other")
    ingest_slides(other, sorted(glob.glob(str(cohort / "slides" / "*.tiff"))))
    imp = import_h5(other, tmp_path / "h5", encoder="resnet18-layer2")
    assert imp["slides"] == 8 and imp["new"] == 8 and imp["dim"] == 128
    assert import_h5(other, tmp_path / "h5", encoder="resnet18-layer2")["new"] == 0
    m1, X1 = load_features(st, eid)
    m2, X2 = load_features(other, imp["extraction_id"])
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(m1[["x", "y"]].to_numpy(), m2[["x", "y"]].to_numpy())
    with pytest.raises(HefeatError, match="No .h5"):
        import_h5(other, tmp_path, encoder="x")


def test_tta_is_rotation_invariant(tiled):
    """With 8-fold dihedral TTA the embedding of a tile equals that of its 90° rotation."""
    from hefeat.extract.encoders import create_encoder
    from hefeat.extract.pipeline import DeviceTransform, embed_batch

    enc = create_encoder("resnet18", weights="none", layer="layer2")
    tr = DeviceTransform(enc.config, "cpu")
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (1, 224, 224, 3), dtype=np.uint8))
    rot = torch.rot90(img, 1, dims=(1, 2)).contiguous()
    a = embed_batch(enc, tr, img, device="cpu", precision="fp32", tta=True)
    b = embed_batch(enc, tr, rot, device="cpu", precision="fp32", tta=True)
    c = embed_batch(enc, tr, img, device="cpu", precision="fp32", tta=False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, c)
    assert len(dihedral(torch.zeros(1, 3, 4, 4))) == 8


def test_corrupt_slide_among_good_ones(tmp_path, cohort):
    st, tid = _store(tmp_path, cohort, n=3, copy=True)
    bad = tmp_path / "slides" / "S02.tiff"
    data = bad.read_bytes()
    bad.write_bytes(data[:1000] + b"\0" * (len(data) - 1000))  # same size, garbage inside
    s = run_extraction(st, precision="fp32", **ENC)
    assert list(s.failed) == ["S02"] and sorted(s.ok) == ["S01", "S03"]
    row = st.sql("SELECT state, reason FROM status WHERE stage = 'extraction' AND slide_id = 'S02'").iloc[0]
    assert row.state == "failed" and row.reason
    with pytest.raises(HefeatError, match="S02"):
        run_extraction(st, precision="fp32", options=ExtractOptions(fail_fast=True), **ENC)


def test_device_decode_fails_a_slide_with_an_undecodable_tile_alone(tmp_path, cohort, monkeypatch):
    """decode='device' (here on the CPU), faults injected: S03's second batch of regions does not decode, so S03
    fails alone with the decoder's reason and the other slides are extracted; the decode check cannot decode
    S02's first JPEG tile (background), which leaves S02 to be extracted: its tissue decodes, and its encoding (the
    cohort's) was checked on S01 anyway. (On CUDA the pre-flight check raised imagecodecs' error and stopped the
    whole run; a bad tile stopped it too.)"""
    import hefeat.slides.jpeg_tiles as J

    st, tid = _store(tmp_path, cohort, n=3)
    real_read, real_check, calls = J.read_regions, J.check_device_decode, []

    def read(src, *a, **k):
        calls.append(src.path)
        if src.path.endswith("S03.tiff") and calls.count(src.path) == 2:
            raise RuntimeError("Error while decoding JPEG images: injected")
        return real_read(src, *a, **k)

    def check(src, device, level=None):
        if src.path.endswith("S02.tiff"):
            raise ValueError("JPEG datastream contains no image")
        return real_check(src, device, level)

    monkeypatch.setattr(J, "read_regions", read)
    monkeypatch.setattr(J, "check_device_decode", check)
    s = run_extraction(st, precision="fp32", options=ExtractOptions(batch_size=8, decode="device", workers=0), **ENC)
    assert s.extra["decode"].startswith("device")
    assert calls.count(str(st.slides().set_index("slide_id").loc["S03", "path"])) == 2
    assert list(s.failed) == ["S03"] and sorted(s.ok) == ["S01", "S02"]
    reason = st.sql("SELECT reason FROM status WHERE stage = 'extraction' AND slide_id = 'S03'")["reason"].iloc[0]
    assert "RuntimeError: Error while decoding JPEG images: injected" in reason
    eid = s.extra["extraction_id"]
    assert read_features(st.features_path(eid, "S02")).shape[0] == len(st.tiles(tid, "S02"))
    assert not st.features_path(eid, "S03").exists()
    from hefeat.extract.device_decode import device_decoded_batches

    info = {}  # under auto, a first slide the check cannot decode leaves the decision to the next one
    assert device_decoded_batches([], iter(()), [str(st.slides()["path"].iloc[1])], None, 8, "cuda", "auto", info) is None
    assert info["decode"].startswith("cpu (none of the first 1 slides could be checked: S02.tiff (ValueError: JPEG "
                                     "datastream contains no image")


def test_bad_requests_write_nothing(tmp_path, cohort):
    st, tid = _store(tmp_path, cohort, n=1)
    with pytest.raises(HefeatError, match="does not exist"):
        run_extraction(st, tiling_id="tnope", **ENC)
    with pytest.raises(HefeatError, match="Unknown encoder"):
        run_extraction(st, encoder="resnet5O", weights="none")
    with pytest.raises(HefeatError, match="not found"):
        run_extraction(st, encoder="resnet18", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(HefeatError, match="not tiled"):
        run_extraction(st, slides=["S09"], **ENC)
    assert not list((st.root / "features").iterdir())


def test_ray_engine_matches_local(extracted, tmp_path, cohort, monkeypatch):
    ray = pytest.importorskip("ray")
    import tempfile

    from hefeat.extract.ray_engine import run_extraction_ray

    st, tid = _store(tmp_path, cohort, n=4)  # 4 of the 8 slides: two shards of two
    # Ray's session folder (sockets, logs) in a short folder of its own, removed after: not in /tmp/ray for good
    # (and not under tmp_path, whose length would pass the 107-byte limit of a Unix socket path).
    ray_tmp = tempfile.mkdtemp(prefix="hefeat-ray-")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            s = run_extraction_ray(st, shards=2, precision="fp32", dtype="float32",
                                   options=ExtractOptions(workers=0, batch_size=16), **ENC)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not [w for w in seen if issubclass(w.category, DeprecationWarning) and "/ray/" in w.filename]  # issue 23
    assert sorted(s.ok) == [f"S0{i}" for i in range(1, 5)] and s.extra["n_shards"] == 2
    ref_st, _, ref = extracted
    a, b = _all_features(st, s.extra["extraction_id"]), _all_features(ref_st, ref.extra["extraction_id"])
    assert sorted(a) == sorted(s.ok)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_non_finite_batch_fails_its_slide(tmp_path, cohort, monkeypatch):
    """A batch whose embeddings come out NaN fails its slide (reason recorded, no file); the others finish."""
    import hefeat.extract.pipeline as p

    st, tid = _store(tmp_path, cohort, n=3)
    real, calls = p.embed_batch, []

    def nan_on_third(*a, **k):
        out = real(*a, **k).clone()
        calls.append(len(out))
        if len(calls) == 3:
            out[1] = float("nan")
        return out

    monkeypatch.setattr(p, "embed_batch", nan_on_third)
    s = run_extraction(st, precision="fp32", options=ExtractOptions(batch_size=8, workers=0), **ENC)
    assert len(s.failed) == 1 and len(s.ok) == 2
    (bad, reason), = s.failed.items()
    assert "non-finite" in reason and "tile" in reason
    eid = s.extra["extraction_id"]
    assert not st.features_path(eid, bad).exists()
    row = st.sql("SELECT state, reason FROM status WHERE stage = 'extraction' AND slide_id = ?", [bad]).iloc[0]
    assert row.state == "failed" and "non-finite" in row.reason
    for sid in s.ok:
        assert np.isfinite(read_features(st.features_path(eid, sid))).all()
    monkeypatch.setattr(p, "embed_batch", real)
    again = run_extraction(st, precision="fp32", options=ExtractOptions(batch_size=8, workers=0), **ENC)
    assert again.ok == [bad]  # a failed slide is retried, and succeeds when the numbers are finite


def test_auto_precision_is_measured_and_recorded(own_tiled):
    """--precision auto: the choice, its source and reason are in the summary and the extraction record."""
    import json

    st, tid, _ = own_tiled
    # layer1: an extraction no other test makes, so its record is this run's
    s = run_extraction(st, tiling_id=tid, slides=["S01"], encoder="resnet18", weights="none", layer="layer1",
                       fit="native", options=ExtractOptions(batch_size=8))
    pc = s.extra["precision_choice"]
    # which precision wins is this machine's measurement (fp16 can, on a CPU with AVX512-FP16)
    assert s.extra["precision"] in ("fp32", "bf16", "fp16") and pc["source"] in ("measured", "cache", "recorded")
    assert pc["reason"]
    meta = json.loads((st.extraction_dir(s.extra["extraction_id"]) / "_extraction.json").read_text())
    assert meta["precision_choice"]["precision"] == s.extra["precision"]
    assert {t["candidate"] for t in meta["precision_choice"]["trials"]} >= {"fp32/cl", "fp32/nchw"}
    assert meta["encoder_mpp"] == 2.0 and meta["transform"]["plan"]["fit"] == "native"


def test_stain_normalisation_is_part_of_the_extraction(own_tiled, tmp_path):
    """--stain-norm changes the features and the id; the fitted reference is recorded; shards agree on it."""
    import json

    from PIL import Image

    st, tid, _ = own_tiled
    kw = dict(tiling_id=tid, precision="fp32", options=ExtractOptions(batch_size=8, workers=0), **ENC)
    plain = run_extraction(st, slides=["S03"], **kw)
    mac = run_extraction(st, slides=["S03"], stain="macenko", **kw)
    mac2 = run_extraction(st, shard="2/3", stain="macenko", **kw)
    assert mac.extra["extraction_id"] != plain.extra["extraction_id"] == plain.extra["extraction_id"]
    assert mac2.extra["extraction_id"] == mac.extra["extraction_id"]  # reference from all slides, not the shard
    meta = json.loads((st.extraction_dir(mac.extra["extraction_id"]) / "_extraction.json").read_text())
    assert meta["stain"]["method"] == "macenko" and meta["stain"]["source"].startswith("cohort:")
    a = read_features(st.features_path(plain.extra["extraction_id"], "S03"))
    b = read_features(st.features_path(mac.extra["extraction_id"], "S03"))
    assert a.shape == b.shape and not np.allclose(a, b)
    with Slide(st.slides(["S01"]).iloc[0]["path"]) as s:
        Image.fromarray(s.read(600, 600, 256, 0.5)).save(tmp_path / "ref.png")
    rein = run_extraction(st, slides=["S03"], stain="reinhard", stain_reference=str(tmp_path / "ref.png"), **kw)
    meta = json.loads((st.extraction_dir(rein.extra["extraction_id"]) / "_extraction.json").read_text())
    assert meta["stain"]["source"] == "image:ref.png" and len(meta["stain"]["values"]["mean"]) == 3
    with pytest.raises(HefeatError, match="not found"):
        run_extraction(st, slides=["S03"], stain="reinhard", stain_reference=str(tmp_path / "nope.png"), **kw)


def test_device_jpeg_decode_path_gives_the_same_features(own_tiled, monkeypatch):
    """decode='device' (raw JPEG tiles decoded by torchvision, here on the CPU) = the OpenSlide path."""
    import hefeat.extract.pipeline as p

    st, tid, _ = own_tiled
    kw = dict(tiling_id=tid, precision="fp32", dtype="float32", slides=["S01", "S02"], **ENC)
    ref = run_extraction(st, options=ExtractOptions(batch_size=16, decode="cpu"), **kw)
    eid = ref.extra["extraction_id"]
    want = {s: read_features(st.features_path(eid, s)) for s in ("S01", "S02")}
    for s in ("S01", "S02"):
        st.features_path(eid, s).unlink()
    n = {s: len(want[s]) for s in want}
    real, calls = p.embed_batch, []
    monkeypatch.setattr(p, "embed_batch", lambda enc, tr, x, **k: calls.append(len(x)) or real(enc, tr, x, **k))
    dev = run_extraction(st, options=ExtractOptions(batch_size=16, decode="device", workers=0), **kw)
    assert dev.extra["decode"].startswith("device") and sorted(dev.ok) == ["S01", "S02"]
    total = n["S01"] + n["S02"]  # batches run on across the two slides, as on the CPU path
    assert calls == [16] * (total // 16) + ([total % 16] if total % 16 else [])
    for s in ("S01", "S02"):
        np.testing.assert_allclose(read_features(st.features_path(eid, s)), want[s], rtol=1e-4, atol=1e-4)


def test_batches_span_slides_and_features_equal_per_slide_runs(tmp_path, cohort, monkeypatch):
    """8 slides of 5 tiles at batch 16 take ceil(40/16) = 3 forward calls, not one short batch per slide;
    each slide's features are byte-identical to extracting that slide on its own."""
    import hefeat.extract.pipeline as p

    def tiled_store(root):
        st = Store.init(root)
        ingest_slides(st, sorted(glob.glob(str(cohort / "slides" / "*.tiff"))))
        return st, run_tiling(st, TilingParams(size=64, mpp=2.0, max_tiles=5)).extra["tiling_id"]

    real, calls = p.embed_batch, []

    def counting(enc, tr, x, **k):
        calls.append(len(x))
        return real(enc, tr, x, **k)

    monkeypatch.setattr(p, "embed_batch", counting)
    kw = dict(precision="fp32", dtype="float32", options=ExtractOptions(batch_size=16, workers=0), **ENC)
    st, tid = tiled_store(tmp_path / "all")
    s = run_extraction(st, tiling_id=tid, **kw)
    assert sorted(s.ok) == [f"S0{i}" for i in range(1, 9)] and s.tiles == 40
    assert calls == [16, 16, 8]
    tm = s.extra["timings"]
    assert tm["loop_cpu_s"] > 0 and tm["loop_s"] > 0  # the loop's CPU seconds (process + workers) are reported
    one, _ = tiled_store(tmp_path / "one")
    for sid in sorted(s.ok):
        r = run_extraction(one, tiling_id=tid, slides=[sid], **kw)
        assert r.ok == [sid] and r.extra["extraction_id"] == s.extra["extraction_id"]
    assert len(calls) == 3 + 8  # one call per single-slide run
    a, b = _all_features(st, s.extra["extraction_id"]), _all_features(one, s.extra["extraction_id"])
    assert a.keys() == b.keys() and len(a) == 8
    for k in a:
        assert a[k].shape == (5, 128) and a[k].tobytes() == b[k].tobytes(), k


def test_the_loop_freezes_the_gc_for_its_workers_and_always_unfreezes(tmp_path, cohort, monkeypatch):
    """Objects alive when the DataLoader workers fork are frozen during the loop (hefeat.fork_gc), and thawed after
    it, whether it ends or fails."""
    import gc

    import hefeat.extract.pipeline as p

    st, tid = _store(tmp_path, cohort, n=2)
    real, seen = p.embed_batch, []

    def record(*a, **k):
        seen.append(gc.get_freeze_count())
        return real(*a, **k)

    monkeypatch.setattr(p, "embed_batch", record)
    s = run_extraction(st, precision="fp32", options=ExtractOptions(batch_size=8, workers=1), **ENC)
    assert len(s.ok) == 2 and seen and min(seen) > 10_000  # torch & co. frozen while the worker runs
    assert gc.get_freeze_count() == 0

    def fail(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(p, "embed_batch", fail)
    with pytest.raises(KeyboardInterrupt):
        run_extraction(st, precision="fp32", options=ExtractOptions(batch_size=8, workers=1), encoder="resnet18",
                       weights="none", layer="layer1", fit="native")
    assert gc.get_freeze_count() == 0
