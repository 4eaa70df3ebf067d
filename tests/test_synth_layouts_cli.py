"""`hefeat synth --layout <layout>` for every layout the CLI offers: the files it writes parse with the real
readers (hefeat.formats.*) and say what its truth file says (not merely: the files exist)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from hefeat.cli import main
from hefeat.formats import cbioportal, gdc, hest, st, tcga, visium, xena

LAYOUTS = ("tcga", "visium", "hest", "st")


def test_every_layout_the_cli_offers_is_checked_here():
    from hefeat.cli.slides_cmds import synth

    offered = next(p for p in synth.params if p.name == "layout").type.choices
    assert set(offered) == {"hefeat", *LAYOUTS}


def _check_tcga(root: Path, truth: dict, summary: dict) -> None:
    assert (summary["slides"], summary["patients"]) == (len(truth["slides"]), len(truth["patients"]))
    files = sorted((root / "slides").rglob("*.tiff"))
    parsed = {tcga.parse_slide_name(f).slide_barcode: tcga.parse_slide_name(f) for f in files}
    assert sorted(parsed) == sorted(truth["slides"])
    for bc, t in truth["slides"].items():
        b = parsed[bc]
        assert (b.patient, b.tss, b.sample_type, b.slide_type, b.preservation) == \
            (t["patient"], t["site"], t["sample_type"], t["slide_type"], t["preservation"])
    assert {"DX", "TS"} <= {t["slide_type"] for t in truth["slides"].values()}  # frozen sections ...
    assert "11" in {t["sample_type"] for t in truth["slides"].values()}          # ... and a normal vial
    man = pd.read_csv(root / "gdc_manifest.txt", sep="\t", dtype=str)
    assert list(man.columns) == ["id", "filename", "md5", "size", "state"]
    by_name = {f.name: f for f in files}
    for r in man.itertuples():
        f = by_name[r.filename]
        assert f.parent.name == r.id and int(r.size) == f.stat().st_size
        assert hashlib.md5(f.read_bytes()).hexdigest() == r.md5
    wide, _ = gdc.star_counts_matrix(root / "gdc_rna", root / "gdc_sample_sheet.tsv")
    assert sorted(wide.index) == sorted(truth["rna_samples"]) and list(wide.columns) == truth["genes"]
    x, _ = xena.xena_matrix(root / "xena" / "TCGA-BRCA.star_tpm.tsv")
    assert sorted(x.index) == sorted(truth["rna_samples"])
    r, _ = cbioportal.rsem_matrix(root / "cbioportal" / "data_mrna_seq_v2_rsem.txt")
    assert sorted(s + "A" for s in r.index) == sorted(s for s in truth["rna_samples"] if s[13:15] == "01")
    np.testing.assert_allclose(r.to_numpy(), wide.loc[[s + "A" for s in r.index]].to_numpy(), atol=6e-5)
    pat, smp, _ = cbioportal.clinical_table(root / "cbioportal" / "data_clinical_patient.txt",
                                            root / "cbioportal" / "data_clinical_sample.txt")
    assert pat.set_index("patient_id")["er_status"].to_dict() == pytest.approx(
        {p: (np.nan if v is None else v) for p, v in truth["er_status"].items()}, nan_ok=True)
    assert sorted(smp["sample_id"].str[:12]) == sorted(truth["er_status"])
    g, _ = gdc.clinical_table(root / "gdc_clinical" / "clinical.tsv")
    g = g.set_index("patient_id").loc[pat["patient_id"]]
    np.testing.assert_allclose(g["survival_months"], pat["survival_months"], atol=0.02)
    assert g["event"].tolist() == pat["event"].tolist()


def _check_visium(root: Path, truth: dict, summary: dict) -> None:
    ref = pd.read_parquet(root / "truth_visium_spots.parquet")
    assert summary["samples"] == len(truth["samples"]) == ref["slide_id"].nunique() > 0
    for sid, t in truth["samples"].items():
        ss = visium.read_visium(t["outs"])
        r = ref[ref["slide_id"] == sid]
        assert ss.spots["spot_id"].tolist() == r["barcode"].tolist() and len(r) == t["spots"]
        np.testing.assert_array_equal(ss.counts.toarray(), r[ss.genes].to_numpy())
        assert ss.mpp == pytest.approx(t["mpp"]) and ss.spot_diameter_um == 55.0 and ss.image == Path(t["image"])
        assert set((ss.spots["array_row"] + ss.spots["array_col"]) % 2) == {0}  # Visium's hexagonal numbering


def _check_hest(root: Path, truth: dict, summary: dict) -> None:
    ref = pd.read_parquet(root / "truth_hest_spots.parquet")
    assert hest.sample_ids(root) == sorted(truth["samples"]) and summary["samples"] == len(truth["samples"]) > 0
    for hid, t in truth["samples"].items():
        ss = hest.read_hest(root, hid)
        r = ref[ref["sample"] == hid]
        np.testing.assert_allclose(ss.spots[["x", "y"]].to_numpy(), r[["x", "y"]].to_numpy())
        np.testing.assert_array_equal(ss.counts.toarray(), r[ss.genes].to_numpy())
        assert ss.mpp == pytest.approx(t["mpp"]) and ss.spot_diameter_um == 55.0 and ss.technology == "Visium"


def _check_st(root: Path, truth: dict, summary: dict) -> None:
    assert summary["samples"] == len(truth["samples"]) > 0
    for t in truth["samples"].values():
        ss = st.read_st(t["counts"], t["spots_table"], t["image"])
        assert len(ss.spots) == t["spots"] and sorted(ss.spots["spot_id"]) == sorted(t["ids"])
        assert ss.mpp == pytest.approx(t["mpp"], rel=0.01) and ss.spot_diameter_um == 100.0


CHECKS = {"tcga": _check_tcga, "visium": _check_visium, "hest": _check_hest, "st": _check_st}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_synth_layout_files_parse_with_the_readers(layout, tmp_path):
    out = tmp_path / "cohort"
    res = CliRunner().invoke(main, ["synth", str(out), "--slides", "4", "--genes", "20", "--width-um", "500",
                                    "--height-um", "400", "--seed", "2", "--layout", layout, "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])["layout"]
    root = Path(summary["out"])
    assert root == out / layout and f"{layout} layout in" in summary["text"].lower()
    CHECKS[layout](root, json.loads((root / f"truth_{layout}.json").read_text()), summary)
