"""Identity and integrity: one spec gives one extraction on every worker; nothing non-finite is stored or read."""

from __future__ import annotations

import glob
import json

import h5py
import numpy as np
import pytest

from hefeat.errors import HefeatError
from hefeat.extract.pipeline import ExtractOptions, run_extraction
from hefeat.slides.run import ingest_slides, run_tiling
from hefeat.slides.tiling import TilingParams
from hefeat.store import layout
from hefeat.store.atomic import write_json_once
from hefeat.store.catalog import Store
from hefeat.store.features import load_features, read_features, slide_means

ENC = dict(encoder="resnet18", weights="none", layer="layer1")
OPT = ExtractOptions(batch_size=16, workers=0)


def _store(root, cohort, n=4, params: TilingParams | None = None):
    st = Store.init(root)
    ingest_slides(st, sorted(glob.glob(str(cohort / "slides" / "*.tiff")))[:n])
    return st, run_tiling(st, params or TilingParams()).extra["tiling_id"]


def test_write_json_once_keeps_the_first_writer(tmp_path):
    p = tmp_path / "d" / "x.json"
    assert write_json_once(p, {"a": 1}) == ({"a": 1}, True)
    assert write_json_once(p, {"a": 2}) == ({"a": 1}, False)
    assert json.loads(p.read_text()) == {"a": 1} and list(p.parent.iterdir()) == [p]  # no temporary left


def test_auto_precision_is_decided_once_per_extraction(tmp_path, cohort, monkeypatch):
    """Workers with their own caches and first slides, whose measurements disagree, make one extraction.

    On the old code each worker measured on its own first tiles and put what it measured in the id:
    bf16 near its tolerance came out sound for one worker and unsound for the next (two extractions).
    """
    import hefeat.extract.precision as P

    # small tiles fed as they are: the decision is under test, and the bf16 it makes runs ~50x slower than fp32 on
    # a CPU without bf16 kernels (40 s of this test at 224 px on an AVX2 VM)
    st, tid = _store(tmp_path / "st", cohort, n=3, params=TilingParams(size=64, mpp=1.0))
    enc = {**ENC, "fit": "native"}
    calls = []

    def noisy_measure(model, sample, cands, *, device, step=None, **_):
        calls.append(len(sample))
        err = 0.049 if len(calls) % 2 else 0.051  # bf16's error lands either side of its 5 % tolerance
        return [P.Trial(c, 200.0 if c.precision == "bf16" else 100.0, err if c.precision == "bf16" else 0.0)
                for c in cands]

    monkeypatch.setattr(P, "measure", noisy_measure)
    monkeypatch.setattr(P, "device_capabilities",
                        lambda device: {"kind": "cpu", "name": "test cpu", "bf16": "native", "fp16": "slow"})
    runs = []
    for i, kw in enumerate([dict(slides=["S03"]), dict(slides=["S01"]), dict(shard="1/2"), dict(shard="2/2")]):
        monkeypatch.setenv("HEFEAT_CACHE_DIR", str(tmp_path / f"cache{i}"))  # separate nodes, separate caches
        runs.append(run_extraction(st, tiling_id=tid, options=OPT, **enc, **kw))
    assert len({r.extra["extraction_id"] for r in runs}) == 1
    assert len(calls) == 1 and {r.extra["precision"] for r in runs} == {"bf16"}
    assert [r.extra["precision_choice"]["source"] for r in runs[1:]] == ["recorded"] * 3
    eid = runs[0].extra["extraction_id"]
    rec = json.loads(layout.precision_decision_path(st.root, eid).read_text())
    meta = json.loads(layout.extraction_meta_path(st.root, eid).read_text())
    assert rec["precision"] == meta["precision"] == "bf16" and meta["precision_spec"] == "auto"
    monkeypatch.setenv("HEFEAT_CACHE_DIR", str(tmp_path / "cache-new"))
    again = run_extraction(st, tiling_id=tid, options=OPT, **enc)
    assert again.extra["extraction_id"] == eid and again.ok == [] and len(again.done) == 3 and len(calls) == 1


def test_calibration_sample_does_not_depend_on_the_worker(tiled):
    """The calibration tiles are a seeded sample of the cohort, the same whichever slides a worker runs."""
    from hefeat.extract.pipeline import calibration_tiles

    st, tid, _ = tiled
    cohort = st.finished("tiling", tid)["slide_id"].tolist()
    a = calibration_tiles(st, tid, cohort, 8)
    b = calibration_tiles(st, tid, list(reversed(cohort)), 8)
    assert a.shape[0] == 8 and np.array_equal(a, b)


def test_nothing_non_finite_is_stored_or_read(tmp_path, cohort, monkeypatch):
    """Features finite in float32 but beyond float16's range fail their slide (the old code stored inf and said
    ok), naming --dtype float32; a stored NaN/inf (a file from before the check, or edited since) is refused by
    every reader instead of used."""
    import hefeat.extract.pipeline as p

    st, tid = _store(tmp_path / "st", cohort, n=2)
    real, huge = p.embed_batch, [False]

    def maybe_huge(enc, transform, imgs, **k):
        out = real(enc, transform, imgs, **k)
        return out * 1e6 if huge[0] else out  # random-init inception_v3 reaches this range

    monkeypatch.setattr(p, "embed_batch", maybe_huge)
    s1 = run_extraction(st, tiling_id=tid, precision="fp32", slides=["S01"], options=OPT, **ENC)
    huge[0] = True
    s = run_extraction(st, tiling_id=tid, precision="fp32", slides=["S02"], options=OPT, **ENC)
    assert s.ok == [] and list(s.failed) == ["S02"]
    assert "--dtype float32" in s.failed["S02"] and "float16" in s.failed["S02"]
    eid = s.extra["extraction_id"]
    assert eid == s1.extra["extraction_id"] and not st.features_path(eid, "S02").exists()
    row = st.sql("SELECT reason_code FROM status WHERE stage = 'extraction' AND slide_id = 'S02'").iloc[0]
    assert row.reason_code == "non_finite"
    f32 = run_extraction(st, tiling_id=tid, precision="fp32", dtype="float32", slides=["S02"], options=OPT, **ENC)
    assert f32.ok == ["S02"] and np.isfinite(read_features(st.features_path(f32.extra["extraction_id"], "S02"))).all()

    path = st.features_path(eid, "S01")
    assert np.isfinite(read_features(path)).all()
    with h5py.File(path, "r+") as f:
        f["features"][3, 5] = np.inf
        f["aggregates"]["sum"][5] = np.inf
    with pytest.raises(HefeatError, match="NaN or inf"):
        read_features(path)
    with pytest.raises(HefeatError, match="S01.*NaN or inf"):
        load_features(st, eid)
    with pytest.raises(HefeatError, match="NaN or inf.*S01"):
        slide_means(st, eid)


def test_ids_do_not_depend_on_where_files_or_the_store_sit(learned, tmp_path):
    """The spot model's region labels enter its id by content (the old id held the absolute path), and a
    copied store refits to the same id, found cached; the record names the file, not the old folder."""
    import shutil

    from hefeat.learn.registry import fit_model

    st, _, seid, _ = learned
    spots = st.sql("SELECT slide_id, spot_id FROM spots ORDER BY 1, 2")
    lab = spots.assign(label=np.where(np.arange(len(spots)) % 3, "tumour", "stroma"))
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        lab.to_csv(tmp_path / d / "regions.csv", index=False)
    kw = dict(extraction_id=seid, genes="top:4", map_genes=1)
    a = fit_model(st, "spots", {**kw, "region_labels": str(tmp_path / "one" / "regions.csv")})
    moved = Store(shutil.copytree(st.root, tmp_path / "moved"))
    b = fit_model(moved, "spots", {**kw, "region_labels": str(tmp_path / "two" / "regions.csv")})
    assert b["model_id"] == a["model_id"] and b["cached"] and not a["cached"]
    params = json.loads((moved.model_dir(a["model_id"]) / "model.json").read_text())["params"]
    assert params["region_labels"]["file"] == "regions.csv" and str(tmp_path) not in json.dumps(params)

    from hefeat.learn.spots import SpotsParams

    for d in ("one", "two"):  # a gene list given as a file: by content too
        (tmp_path / d / "genes.txt").write_text("G001\nG002\n")
    ids = [SpotsParams(extraction_id=seid, genes=str(tmp_path / d / "genes.txt")).portable(for_id=True)
           for d in ("one", "two")]
    assert ids[0] == ids[1] and ids[0]["genes"] == {"file_digest": ids[0]["genes"]["file_digest"]}
    assert SpotsParams(extraction_id=seid).portable(for_id=True)["genes"] == "top:250"
    from hefeat.learn.emo import GenesParams

    for d in ("one", "two"):  # a held-out patient list: by content, whichever folder holds it
        (tmp_path / d / "test.txt").write_text("P01\nP02\n")
    split = [GenesParams(extraction_id=seid, split=f"holdout:{tmp_path / d / 'test.txt'}").portable(for_id=True)["split"]
             for d in ("one", "two")]
    assert split[0] == split[1] and split[0]["kind"] == "holdout"


def test_ineffective_tiling_options_do_not_enter_the_id():
    """With --no-mask the tissue-mask settings do nothing, so they do not make another tiling."""
    from hefeat.slides.run import tiling_id

    plain = tiling_id(TilingParams(mask=False))
    assert tiling_id(TilingParams(mask=False, min_object_um2=5.0, mask_mpp=2.0, max_hole_um2=1.0)) == plain
    assert tiling_id(TilingParams(min_object_um2=5.0)) != tiling_id(TilingParams())  # they count with a mask


def test_resolution_is_never_changed_silently(tmp_path, cohort, cmu_svs):
    """--mpp against a slide's stated µm/px needs --override-mpp (recorded); tiles > 10 % finer than level 0
    need upsample; implausible µm/px is refused from any source (the old code accepted all three silently)."""
    st = Store.init(tmp_path / "st")
    with pytest.raises(HefeatError, match=r"states 0.499 µm/px.*--override-mpp"):
        ingest_slides(st, [cmu_svs], mpp=0.25)
    assert st.slides().empty
    ingest_slides(st, [cmu_svs], mpp=0.499)  # the stated value: nothing is overridden
    assert st.slides().iloc[0]["mpp_source"] == "openslide.mpp-x"
    ingest_slides(st, [cmu_svs], mpp=0.25, override_mpp=True)
    row = st.slides().iloc[0]
    assert row["mpp_x"] == 0.25 and "override of stated 0.499" in row["mpp_source"]
    for bad in (50.0, 0.01):
        with pytest.raises(HefeatError, match="plausible"):
            ingest_slides(st, [cmu_svs], mpp=bad, override_mpp=True)

    s2 = Store.init(tmp_path / "s2")
    ingest_slides(s2, [cohort / "slides" / "S01.tiff"])  # 0.5 µm/px
    with pytest.raises(HefeatError, match=r"0.5 µm/px; tiles at 0.4 µm/px would upsample it 1.25x.*--allow-upsample"):
        run_tiling(s2, TilingParams(mpp=0.4, size=64, max_tiles=2))
    assert not list((s2.root / "tiles").glob("tiling=*"))  # refused before anything was written
    ok = run_tiling(s2, TilingParams(mpp=0.46, size=64, max_tiles=2))  # 8 % finer: within tolerance
    assert ok.ok == ["S01"] and "upsampled" not in ok.extra
    asked = run_tiling(s2, TilingParams(mpp=0.4, size=64, max_tiles=2, upsample=True))
    assert asked.ok == ["S01"] and asked.extra["upsampled"] == {"S01": 1.25}
    assert asked.extra["tiling_id"] != ok.extra["tiling_id"]
    assert asked.extra["tiling_id"] == run_tiling(s2, TilingParams(mpp=0.4, size=64, max_tiles=2, upsample=True)
                                                  ).extra["tiling_id"]


def test_job_state_comes_from_its_heartbeat(tmp_path):
    """A job killed mid-run (job.json still says running) is listed as stopped, not running forever."""
    import subprocess
    import sys

    from click.testing import CliRunner

    from hefeat.cli import main
    from hefeat.finetune import heartbeat
    from hefeat.store.atomic import write_json

    st = Store.init(tmp_path / "st")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for jid, status in (("j-killed", "running"), ("j-done", "finished")):
        job = {"job_id": jid, "task": "genes", "status": status, "recipe": {"backbone": "resnet18"}, "split": "s",
               "folds": [{"name": "fold1"}], "created": "2026-01-01T00:00:00", "updated": "2026-01-01T00:00:00"}
        write_json(layout.job_dir(st.root, jid) / "job.json", job)
        write_json(layout.job_dir(st.root, jid) / "index.json",
                   {k: job[k] for k in ("job_id", "task", "status", "created", "updated")})
    hb = layout.job_heartbeat_path(st.root, "j-killed")
    import socket
    import time

    write_json(hb, {"host": socket.gethostname(), "pid": dead.pid, "beat": time.time(), "every_s": 30, "ended": None})
    out = CliRunner().invoke(main, ["finetune", "list", "--store", str(st.root), "--json"], catch_exceptions=False)
    states = {j["job_id"]: j["state"] for j in json.loads(out.output.strip().splitlines()[-1])["jobs"]}
    assert states == {"j-killed": "stopped", "j-done": "done"}
    out = CliRunner().invoke(main, ["finetune", "status", "j-killed", "--store", str(st.root)], catch_exceptions=False)
    assert "stopped" in out.output and "running" not in out.output

    job = {"job_id": "j-live", "status": "running"}
    with heartbeat.session():  # a live run: running while it beats, stopped once it raised
        heartbeat.start(st.root, "j-live", every=3600)
        assert heartbeat.job_state(st.root, job)[0] == "running"
        assert heartbeat.job_state(st.root, job, now=time.time() + 4 * 3600)[0] == "stopped"  # silent too long
    assert heartbeat.job_state(st.root, job)[0] == "stopped"
    with pytest.raises(RuntimeError), heartbeat.session():
        heartbeat.start(st.root, "j-live", every=3600)
        raise RuntimeError("out of memory")
    state, why = heartbeat.job_state(st.root, job)
    assert state == "stopped" and "out of memory" in why


def test_cli_json_never_holds_nan_or_infinity(capsys):
    """--json output is strict JSON: a non-finite number is null plus a note (the old output held Infinity)."""
    from hefeat.cli.common import emit

    emit({"logrank_p": float("inf"), "rows": [{"r": np.float32("nan")}, {"r": 0.5}], "n": 3}, True, "")
    line = capsys.readouterr().out.strip()

    def refuse(c):
        raise ValueError(f"not JSON: {c}")

    got = json.loads(line, parse_constant=refuse)
    assert got["logrank_p"] is None and got["rows"] == [{"r": None}, {"r": 0.5}] and got["n"] == 3
    assert got["json_notes"] == ["logrank_p was inf (not a JSON number): written as null",
                                 "rows[0].r was nan (not a JSON number): written as null"]


def test_noise_is_fixed_at_the_source(tmp_path):
    """Warnings that tell the user nothing are gone: Holm-Sidak on p = 1 (log1p(-1) in `run he2rna`), torch's
    "NumPy array is not writable" when a stain reference is fitted to read-only (PIL) images."""
    import warnings

    from PIL import Image

    from hefeat.learn.stats import correct
    from hefeat.slides.stain import fit_reference, stain_vectors

    rng = np.random.default_rng(0)
    img = np.full((64, 64, 3), 235, np.uint8)
    img[8:56, 8:56] = rng.integers(0, 3, (48, 48, 1)) * np.array([[[40, -40, 10]]]) + np.array([150, 90, 160])
    Image.fromarray(img).save(tmp_path / "ref.png")
    read_only = np.asarray(Image.open(tmp_path / "ref.png"))
    assert not read_only.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(correct(np.array([0.001, 0.5, 1.0]), "holm-sidak"), [0.002999, 0.75, 1.0], atol=1e-5)
        fit_reference("macenko", [read_only], source="test")
        stain_vectors(read_only)


def test_ivfpq_training_prints_no_code_word_warnings(capfd):
    """faiss printed one "WARNING clustering N points to 256 centroids" line per PQ sub-quantizer."""
    from hefeat.explore.neighbors import _make

    x = np.random.default_rng(0).random((2000, 64), dtype=np.float32)
    idx = _make("ivfpq", 64, "l2", len(x), nlist=None, pq_m=None, hnsw_m=32, n_train=len(x))
    idx.train(x)
    assert idx.is_trained and "WARNING clustering" not in capfd.readouterr().err


def test_every_float_stored_in_the_test_stores_is_finite(learned_base, tiled):
    """A raw scan (h5py, not the readers that refuse non-finite rows) of every .h5 the shared test stores hold."""
    scanned = 0
    for root in (learned_base[0].root, tiled[0].root):
        for path in sorted(glob.glob(str(root / "**" / "*.h5"), recursive=True)):
            with h5py.File(path, "r") as f:
                def check(name, obj, path=path):
                    nonlocal scanned
                    if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f" and obj.size:
                        for i in range(0, obj.shape[0], 65536):
                            assert np.isfinite(obj[i:i + 65536]).all(), f"{path}:{name}"
                        scanned += obj.size
                f.visititems(check)
    assert scanned > 200_000  # the features of the stores (235,008 values), not an empty walk
