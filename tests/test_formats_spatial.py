"""Spatial data read as published: Visium Space Ranger outs/, HEST-1k samples, the original ST format.
Spots land in the H&E's level-0 pixels with the data's µm/px, spot patches default to the spot
diameter (55 µm for Visium), and malformed inputs are one-line errors with nothing written."""

from __future__ import annotations

import json
import pathlib
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from hefeat.cli import main
from hefeat.errors import HefeatError
from hefeat.formats import hest, st, visium
from hefeat.formats.synth_layouts import hest_layout, st_layout, visium_layout
from hefeat.slides.spatial import ingest_hest, ingest_visium
from hefeat.store.catalog import Store


def js(*args):
    res = CliRunner().invoke(main, [str(a) for a in args] + ["--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.output.strip().splitlines()[-1])


def fails(*args) -> str:
    """The one-line error of a CLI call that must fail."""
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code != 0, res.output
    return res.output


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600
    return msg


@pytest.fixture(scope="module")
def vis(tmp_path_factory):
    """Six small slides (three with 55 µm Visium-like spots, one at 0.25 µm/px) as Space Ranger and HEST output."""
    from hefeat.slides.synth import make_cohort

    src = tmp_path_factory.mktemp("vis")
    make_cohort(src, n_slides=6, n_genes=30, seed=5, width_um=800, height_um=600, spot_diameter_um=55.0, workers=1)
    return src, visium_layout(src, src / "visium"), hest_layout(src, src / "hest")


def _source_spots(src, slide):
    sp = pd.read_parquet(src / "spots.parquet")
    return sp[sp["slide_id"] == slide].reset_index(drop=True)


def _layout_spots(src, layout, slide):
    sp = pd.read_parquet(src / layout / f"truth_{layout}_spots.parquet")
    return sp[sp["slide_id"] == slide].reset_index(drop=True)


def test_visium_outs_read_as_space_ranger_writes_them(vis):
    """Spots, counts and scale as written, on Visium's geometry: 55 µm spots on a hexagonal grid of 100 µm pitch
    (rows 86.6 µm apart, odd rows shifted by 50 µm, array_col even on even rows and odd on odd rows)."""
    src, tv, _ = vis
    assert len(tv["samples"]) >= 3
    for n, (sid, t) in enumerate(tv["samples"].items()):
        ss = visium.read_visium(t["outs"])
        assert ss.notes[0].endswith("tissue_positions.csv" if n == 0 else "tissue_positions_list.csv")
        ref = _layout_spots(src, "visium", sid)
        assert ss.spots["spot_id"].tolist() == ref["barcode"].tolist()  # off-tissue positions left out
        np.testing.assert_allclose(ss.spots[["x", "y"]].to_numpy(), ref[["x", "y"]].to_numpy(), atol=0.5)
        np.testing.assert_array_equal(ss.spots[["array_row", "array_col"]].to_numpy(), ref[["array_row", "array_col"]])
        np.testing.assert_array_equal(ss.counts.toarray(), ref[ss.genes].to_numpy())
        assert ss.mpp == pytest.approx(t["mpp"]) and ss.spot_diameter_um == 55.0 and ss.image.name == f"{sid}.tif"
        pos = visium.read_positions(pathlib.Path(t["outs"]) / "spatial")  # every grid position, in tissue or not
        assert len(pos) == t["grid_positions"] > len(ss.spots) > 0
        assert ((pos["array_row"] + pos["array_col"]) % 2 == 0).all()
        um = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float) * t["mpp"]
        d = np.linalg.norm(um[:, None] - um[None], axis=2)
        np.fill_diagonal(d, np.inf)
        tol = t["mpp"]  # centres are written as whole pixels
        np.testing.assert_allclose(d.min(1), 100.0, atol=tol)
        six = (np.abs(d - 100.0) <= tol).sum(1)
        inner = (pos["array_row"].between(1, pos["array_row"].max() - 1)
                 & pos["array_col"].between(2, pos["array_col"].max() - 2)).to_numpy()
        assert inner.any() and (six[inner] == 6).all() and six.max() == 6  # hexagonal, not square (4)
        by_row = pd.DataFrame({"r": pos["array_row"], "x": um[:, 0], "y": um[:, 1]}).groupby("r")
        np.testing.assert_allclose(np.diff(by_row["y"].mean()), 100 * np.sqrt(3) / 2, atol=tol)
        np.testing.assert_allclose(np.diff(by_row["x"].min())[::2], 50.0, atol=tol)  # odd rows half a pitch over


def test_layout_spots_follow_the_cohorts_spot_model(vis):
    """The Visium/HEST layouts draw their hexagonal spots from make_cohort's spot model (synth_layouts.spot_counts):
    given make_cohort's own square grid it reproduces spots.parquet exactly, so a change to the model in
    hefeat.slides.synth that the layouts do not follow fails here."""
    import hefeat.formats.synth_layouts as sl

    src, _, _ = vis
    truth = json.loads((src / "truth.json").read_text())
    for sid, ref in pd.read_parquet(src / "spots.parquet").groupby("slide_id"):
        mpp = truth["slides"][sid]["mpp"]
        kept, _, counts = sl.spot_counts(src, truth, sid, ref[["x", "y"]].to_numpy() * mpp, truth["spots"]["diameter_um"])
        assert kept.tolist() == list(range(len(ref)))
        np.testing.assert_array_equal(counts, ref[truth["genes"]].to_numpy())


def test_bad_visium_inputs_are_refused_before_the_store_changes(vis, tmp_path):
    _, tv, _ = vis
    sid, t = next(iter(tv["samples"].items()))
    d = tmp_path / sid
    shutil.copytree(t["outs"], d / "outs")
    shutil.copy(t["image"], d / f"{sid}.tif")
    store = Store.init(tmp_path / "st")
    pos = d / "outs" / "spatial" / "tissue_positions.csv"
    good = pos.read_text()
    lines = good.splitlines()
    gone = next(i for i, ln in enumerate(lines) if ln.split(",")[1] == "1")
    pos.write_text("\n".join(lines[:gone] + lines[gone + 1:]) + "\n")  # an in-tissue barcode's row is gone
    with pytest.raises(HefeatError, match=r"filtered_feature_bc_matrix.h5: field 'matrix/barcodes' has 1 barcodes absent "
                                          r"from tissue_positions.csv") as e:
        ingest_visium(store, d / "outs")
    _one_line(e)
    pos.write_text("<html><head><title>404</title></head></html>\n")
    with pytest.raises(HefeatError, match="tissue_positions.csv is an HTML/XML page"):
        ingest_visium(store, d / "outs")
    pos.write_text(good)
    sf = d / "outs" / "spatial" / "scalefactors_json.json"
    js_ = json.loads(sf.read_text())
    sf.write_text(json.dumps({k: v for k, v in js_.items() if k != "spot_diameter_fullres"}))
    with pytest.raises(HefeatError, match=r"scalefactors_json.json: missing field 'spot_diameter_fullres'") as e:
        ingest_visium(store, d / "outs")
    _one_line(e)
    sf.write_text(json.dumps(js_))
    with h5py.File(d / "outs" / "filtered_feature_bc_matrix.h5", "a") as f:
        del f["matrix/indptr"]
    with pytest.raises(HefeatError, match=r"filtered_feature_bc_matrix.h5: missing field 'matrix/indptr'"):
        ingest_visium(store, d / "outs")
    (d / "outs" / "filtered_feature_bc_matrix.h5").write_bytes(b"<!DOCTYPE html>")
    with pytest.raises(HefeatError, match="is not an HDF5 file"):
        ingest_visium(store, d / "outs")
    assert store.slides().empty and store.sql("SELECT count(*) FROM spots").iloc[0, 0] == 0


def test_hest_samples_read_with_their_metadata(vis, tmp_path):
    src, _, th = vis
    for hid, t in th["samples"].items():
        ss = hest.read_hest(src / "hest", hid)
        ref = _layout_spots(src, "hest", t["source_slide"])
        assert ss.spots["spot_id"].tolist() == ref["barcode"].tolist()
        np.testing.assert_allclose(ss.spots[["x", "y"]].to_numpy(), ref[["x", "y"]].to_numpy())
        np.testing.assert_array_equal(ss.counts.toarray(), ref[ss.genes].to_numpy())
        assert ss.mpp == pytest.approx(t["mpp"]) and ss.spot_diameter_um == 55.0 and ss.technology == "Visium"
        assert ss.patient == t["patient"]  # sections of one patient share it: patient-grouped splits keep them together
    assert hest.patient_of({"patient": "Patient 1", "dataset_title": "Study A"}) == "Study A / Patient 1"
    assert hest.patient_of({"patient": float("nan"), "dataset_title": "Study A"}) is None
    root = tmp_path / "h"
    shutil.copytree(src / "hest", root)
    hid = next(iter(th["samples"]))
    m = json.loads((root / "metadata" / f"{hid}.json").read_text())
    (root / "metadata" / f"{hid}.json").write_text(json.dumps({k: v for k, v in m.items() if not k.startswith("pixel_size")}))
    store = Store.init(tmp_path / "st")
    with pytest.raises(HefeatError, match=rf"{hid}.json: missing field 'pixel_size_um_estimated'") as e:
        ingest_hest(store, root)
    _one_line(e)
    (root / "metadata" / f"{hid}.json").write_text(json.dumps({**m, "spot_diameter": None}))
    with pytest.raises(HefeatError, match=rf"{hid}.json: missing field 'spot_diameter'"):
        ingest_hest(store, root)
    assert store.slides().empty  # no sample written when one of them is bad


def test_st_sections_read_with_mpp_from_the_200um_pitch(cohort, tmp_path):
    t = st_layout(cohort, tmp_path / "st")
    for sid, s in t["samples"].items():
        ss = st.read_st(s["counts"], s["spots_table"], s["image"])
        assert ss.mpp == pytest.approx(s["mpp"], rel=0.01) and ss.spot_diameter_um == 100.0
        ref = _source_spots(cohort, sid).set_index("spot_id").loc[[s["ids"][i] for i in ss.spots["spot_id"]]]
        np.testing.assert_allclose(ss.spots[["x", "y"]].to_numpy(), ref[["x", "y"]].to_numpy(), atol=0.01)
        np.testing.assert_array_equal(ss.counts.toarray(), ref[ss.genes].to_numpy())
    tab = pd.read_csv(s["spots_table"], sep="\t")
    tab.drop(columns="pixel_y").to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    with pytest.raises(HefeatError, match=r"bad.tsv: missing field 'pixel_y'"):
        st.read_st(s["counts"], tmp_path / "bad.tsv", s["image"])
    tab.iloc[1:].to_csv(tmp_path / "short.tsv", sep="\t", index=False)
    with pytest.raises(HefeatError, match=r"1 spots \(e.g. \S+\) have no row in short.tsv"):
        st.read_st(s["counts"], tmp_path / "short.tsv", s["image"])


def test_visium_and_hest_run_fit_spots_with_55um_patches(vis, tmp_path):
    src, tv, th = vis
    store = tmp_path / "st"
    js("init", "--store", store)
    for t in tv["samples"].values():
        r = js("ingest", "visium", t["outs"], "--store", store)
        assert r["rows"] == t["spots"]
    hid = next(iter(th["samples"]))
    h = js("ingest", "hest", src / "hest", "--sample", hid, "--store", store)
    assert h["ids"] == [hid] and h["rows"] == th["samples"][hid]["spots"]
    assert Store(store).slides().set_index("slide_id").loc[hid, "patient_id"] == th["samples"][hid]["patient"]
    tile = js("tile", "--spots", "--store", store)
    tiles = Store(store).sql(f"SELECT t.slide_id, t.size0 * s.mpp_x AS um FROM tiles t JOIN slides s USING (slide_id) "
                             f"WHERE tiling_id = '{tile['tiling_id']}'")
    np.testing.assert_allclose(tiles["um"], 55.0)
    assert set(tiles["slide_id"]) == {*tv["samples"], hid}
    x = js("extract", "--encoder", "resnet18", "--layer", "layer1", "--weights", "none", "--precision", "fp32",
           "--fit", "native", "--tiling", tile["tiling_id"], "--store", store)
    f = js("fit", "spots", "--extraction", x["extraction_id"], "--genes", "top:10", "--store", store)
    n_spots = sum(t["spots"] for t in tv["samples"].values()) + th["samples"][hid]["spots"]
    patients = {Store(store).slides().set_index("slide_id").loc[s, "patient_id"] for s in {*tv["samples"], hid}}
    assert (f["n_spots"], f["n_patients"], f["n_genes"]) == (n_spots, len(patients), 10)  # every hexagonal spot
    import anndata

    e = js("export", "anndata", tmp_path / "tiles.h5ad", "--extraction", x["extraction_id"], "--store", store)
    ad = anndata.read_h5ad(tmp_path / "tiles.h5ad")
    assert ad.shape == (e["tiles"], x["dim"]) and e["tiles"] == len(tiles)
    sp = Store(store).sql("SELECT s.slide_id, s.spot_id, s.x, s.y, sl.mpp_x, sl.patient_id FROM spots s "
                          "JOIN slides sl USING (slide_id)").set_index(["slide_id", "spot_id"])
    ref = sp.loc[list(zip(ad.obs["slide_id"].astype(str), ad.obs["spot_id"].astype(str), strict=True))]
    np.testing.assert_allclose(ad.obsm["spatial"], ref[["x", "y"]].to_numpy(), atol=0.51)  # tile centre = spot centre
    np.testing.assert_allclose(ad.obsm["spatial_um"], ad.obsm["spatial"] * ref[["mpp_x"]].to_numpy())
    assert (ad.obs["patient_id"].astype(str).to_numpy() == ref["patient_id"].to_numpy()).all()
    per = js("export", "anndata", tmp_path / "per", "--extraction", x["extraction_id"], "--per-slide", "--store", store)
    assert sorted(p.rsplit("/", 1)[1] for p in per["files"]) == sorted(f"{s}.h5ad" for s in {*tv["samples"], hid})


def test_spatial_ingest_keeps_the_images_stated_mpp_unless_overridden(vis, tmp_path):
    """ingest slides' rule for spatial samples: --mpp, or the data's own scale (Visium spot geometry, HEST metadata),
    contradicting the µm/px the image states is refused without --override-mpp, and the override is recorded.
    (The old code took either silently, with a note: the first two ingests below succeeded with the wrong µm/px.)"""
    src, tv, th = vis
    sid, t = next(iter(tv["samples"].items()))
    d = tmp_path / sid
    shutil.copytree(t["outs"], d / "outs")
    shutil.copy(t["image"], d / f"{sid}.tif")
    store = tmp_path / "st"
    js("init", "--store", store)
    stated = t["mpp"]
    out = fails("ingest", "visium", d / "outs", "--mpp", stated * 0.6, "--store", store)
    assert f"states {stated:.4g} µm/px (openslide.mpp-x) but --mpp says {stated * 0.6:.4g}" in out
    assert "--override-mpp" in out and Store(store).slides().empty
    sf = d / "outs" / "spatial" / "scalefactors_json.json"
    scale = json.loads(sf.read_text())
    sf.write_text(json.dumps({**scale, "spot_diameter_fullres": scale["spot_diameter_fullres"] * 2}))
    out = fails("ingest", "visium", d / "outs", "--store", store)
    assert f"55 µm / spot_diameter_fullres (Visium) says {stated / 2:.4g}; pass --override-mpp" in out
    assert Store(store).slides().empty
    sf.write_text(json.dumps({**scale, "spot_diameter_fullres": scale["spot_diameter_fullres"] * 1.03}))
    r = js("ingest", "visium", d / "outs", "--store", store)  # 3 % off: a measurement of the stated value
    row = Store(store).slides().set_index("slide_id").loc[sid]
    assert row["mpp_x"] == pytest.approx(stated) and row["mpp_source"] == "openslide.mpp-x"
    assert any("-2.9% from the" in n and "the image's value kept" in n for n in r["notes"])
    sf.write_text(json.dumps({**scale, "spot_diameter_fullres": scale["spot_diameter_fullres"] * 2}))
    js("ingest", "visium", d / "outs", "--override-mpp", "--store", store)
    row = Store(store).slides().set_index("slide_id").loc[sid]
    assert row["mpp_x"] == pytest.approx(stated / 2)
    assert row["mpp_source"] == f"override of stated {stated:.4g} (openslide.mpp-x) by 55 µm / spot_diameter_fullres (Visium)"
    js("ingest", "visium", d / "outs", "--mpp", stated * 0.6, "--override-mpp", "--store", store)
    assert Store(store).slides().set_index("slide_id").loc[sid, "mpp_x"] == pytest.approx(stated * 0.6)
    root = tmp_path / "h"
    shutil.copytree(src / "hest", root)
    hid = next(iter(th["samples"]))
    m = json.loads((root / "metadata" / f"{hid}.json").read_text())
    (root / "metadata" / f"{hid}.json").write_text(json.dumps({**m, "pixel_size_um_estimated": m["pixel_size_um_estimated"] * 2}))
    before = len(Store(store).slides())
    out = fails("ingest", "hest", root, "--store", store)
    assert f"HEST metadata pixel_size_um_estimated (Visium) says {th['samples'][hid]['mpp'] * 2:.4g}" in out
    assert len(Store(store).slides()) == before  # no sample written when one of them is refused
    js("ingest", "hest", root, "--sample", hid, "--override-mpp", "--store", store)
    assert Store(store).slides().set_index("slide_id").loc[hid, "mpp_x"] == pytest.approx(th["samples"][hid]["mpp"] * 2)
