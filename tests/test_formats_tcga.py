"""TCGA cohorts read as published: barcodes in file names, GDC STAR-Counts + sample sheet, cBioPortal and
GDC clinical files, sample matching by barcode; malformed files are one-line errors naming file and field,
with nothing written to the store."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from hefeat.cli import main
from hefeat.errors import HefeatError
from hefeat.formats import cbioportal, gdc, tcga, xena
from hefeat.formats.synth_layouts import tcga_layout
from hefeat.store.catalog import Store
from hefeat.store.expression import read_matrix


def run(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def js(*args):
    return json.loads(run(*args, "--json").output.strip().splitlines()[-1])


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600
    return msg


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """16 small slides of 15 patients at 4 sites as a TCGA download (+ 2 frozen sections and a frozen normal):
    patients enough for the receptor (site split), trait (>= 10 slides) and survival fits to run on it."""
    from hefeat.slides.synth import make_cohort

    src = tmp_path_factory.mktemp("tcga_cohort")
    make_cohort(src, n_slides=16, n_genes=40, seed=3, width_um=600, height_um=450)
    out = tmp_path_factory.mktemp("tcga")
    return out, tcga_layout(src, out)


def test_barcodes_parse_as_the_gdc_documents_them():
    b = tcga.parse_slide_name("TCGA-A1-A0SB-01Z-00-DX1.5D1C4F2A-7E0B-4C47-9B9A-2F2B1B6B8C1D.svs")
    assert (b.patient, b.tss, b.sample, b.sample_type, b.vial, b.portion, b.slide_type, b.slide_index) == \
        ("TCGA-A1-A0SB", "A1", "TCGA-A1-A0SB-01", "01", "Z", "00", "DX", "1")
    assert b.preservation == "FFPE" and not b.is_normal and b.slide_barcode == "TCGA-A1-A0SB-01Z-00-DX1"
    f = tcga.parse_slide_name("TCGA-BH-A0BV-11A-01-TS1.svs")
    assert f.preservation == "frozen" and f.is_normal and f.tss == "BH"
    a = tcga.parse("TCGA-A1-A0SB-01A-11R-A144-07")
    assert (a.sample, a.vial, a.portion, a.analyte, a.slide_type) == ("TCGA-A1-A0SB-01", "A", "11", "R", None)
    assert tcga.parse("TCGA-A1-A0SB").sample is None
    assert tcga.parse_slide_name("TCGA-A1-A0SB-01A-11R-A144-07.tsv") is None  # an aliquot is not a slide
    assert tcga.parse("S01") is None and tcga.parse("TCGA-A1") is None and tcga.slide_meta("S01.tiff") == {}


def test_samples_match_tumour_diagnostic_slides_and_keep_normals_apart():
    slides = pd.DataFrame({"slide_id": ["a", "b", "c", "d"], "path": [
        "/x/TCGA-A1-A001-01Z-00-DX1.u.svs", "/x/TCGA-A1-A001-01A-01-TS1.u.svs",
        "/x/TCGA-A1-A001-11A-01-TS1.u.svs", "/x/TCGA-A2-A002-01Z-00-DX1.u.svs"]})
    m = tcga.match_samples(["TCGA-A1-A001-01A-11R-A144-07", "TCGA-A1-A001-11A", "TCGA-B6-A009-01A"], slides)
    assert m.mapping[["sample_id", "slide_id"]].values.tolist() == [["TCGA-A1-A001-01A-11R-A144-07", "a"]]
    assert m.other_type_samples == {"11": ["TCGA-A1-A001-11A"]}
    assert m.unmatched_samples == ["TCGA-B6-A009-01A"] and m.slides_without_sample == ["d"]
    assert sorted(sum(m.slides_left_out.values(), [])) == ["b", "c"]
    normals = tcga.match_samples(["TCGA-A1-A001-11A"], slides, sample_types=["11"], slide_types=["TS"])
    assert normals.mapping["slide_id"].tolist() == ["c"]


def test_star_counts_folder_reads_as_gdc_writes_it(layout):
    out, truth = layout
    wide, notes = gdc.star_counts_matrix(out / "gdc_rna", out / "gdc_sample_sheet.tsv")
    assert sorted(wide.index) == sorted(truth["rna_samples"]) and list(wide.columns) == truth["genes"]
    assert any(truth["duplicate_symbol"] in n and "highest mean" in n for n in notes)
    src = pd.read_parquet(truth_source(truth) / "expression.parquet").set_index("sample_id")
    for s, slides in truth["rna_samples"].items():
        scale = 0.5 if s[13:15] == "11" else 1.0
        np.testing.assert_allclose(wide.loc[s].to_numpy(), scale * src.loc[slides].to_numpy().mean(0), atol=6e-5)
    counts, _ = gdc.star_counts_matrix(out / "gdc_rna", out / "gdc_sample_sheet.tsv", value="unstranded", gene_ids="ensembl")
    assert counts.columns[0] == "ENSG00000900000" and (counts.to_numpy() == np.round(counts.to_numpy())).all()
    assert counts.shape[1] == wide.shape[1] + 1 and counts.columns[-1].endswith("_PAR_Y")  # ids stay distinct
    assert not np.allclose(counts.to_numpy()[:, :-1], wide.to_numpy())


def truth_source(truth):
    from pathlib import Path

    return Path(truth["source"])


def _copy_rna(out, tmp_path):
    d = tmp_path / "rna"
    shutil.copytree(out / "gdc_rna", d)
    shutil.copy(out / "gdc_sample_sheet.tsv", tmp_path / "gdc_sample_sheet.tsv")
    return d, tmp_path / "gdc_sample_sheet.tsv"


def test_malformed_gdc_files_are_refused_naming_file_and_field(layout, tmp_path):
    out, _ = layout
    st = Store.init(tmp_path / "st")
    from hefeat.slides.run import ingest_slides
    from hefeat.store.ingest import ingest_expression_source

    ingest_slides(st, [out / "slides"])
    rna, sheet = _copy_rna(out, tmp_path)
    f = sorted(rna.rglob("*.tsv"))[0]
    f.write_text("<!DOCTYPE html>\n<html><body>502 Bad Gateway</body></html>\n")
    with pytest.raises(HefeatError, match=rf"{f.name} is an HTML/XML page") as e:
        ingest_expression_source(st, rna, sample_sheet=sheet)
    _one_line(e)
    f.write_text("# gene-model: GENCODE v36\ngene_id\tgene_name\tunstranded\nENSG1.1\tA\t3\n")
    with pytest.raises(HefeatError, match=rf"{f.name}: missing fields 'gene_type'.*'tpm_unstranded'") as e:
        ingest_expression_source(st, rna, sample_sheet=sheet)
    _one_line(e)
    f.unlink()
    with pytest.raises(HefeatError, match=rf"gdc_sample_sheet.tsv: field 'File Name' names {f.name}") as e:
        ingest_expression_source(st, rna, sample_sheet=sheet)
    _one_line(e)
    s = pd.read_csv(sheet, sep="\t", dtype=str)
    s.loc[1, "Case ID"] = s.loc[0, "Case ID"]
    s.loc[1, "Project ID"] = "TCGA-LUAD"
    s.to_csv(sheet, sep="\t", index=False)
    with pytest.raises(HefeatError, match=r"field 'Project ID' gives case TCGA-\S+ two projects") as e:
        ingest_expression_source(st, rna, sample_sheet=sheet)
    _one_line(e)
    with pytest.raises(HefeatError, match="--value 'counts' is not a STAR-Counts column"):
        ingest_expression_source(st, out / "gdc_rna", value="counts")
    s.drop(columns="Case ID").to_csv(sheet, sep="\t", index=False)
    with pytest.raises(HefeatError, match=r"GDC sample sheet gdc_sample_sheet.tsv: missing field 'Case ID'"):
        ingest_expression_source(st, rna, sample_sheet=sheet)
    man = pd.read_csv(out / "gdc_manifest.txt", sep="\t", dtype=str)
    bad = tmp_path / "gdc_manifest.txt"
    man.drop(columns="md5").to_csv(bad, sep="\t", index=False)
    with pytest.raises(HefeatError, match=r"GDC manifest gdc_manifest.txt: missing field 'md5'") as e:
        gdc.read_manifest(bad)
    _one_line(e)
    man.assign(filename=[""] + man["filename"].tolist()[1:]).to_csv(bad, sep="\t", index=False)
    with pytest.raises(HefeatError, match=r"field 'filename' is empty on data row 1"):
        gdc.read_manifest(bad)
    bad.write_text("<html><body>Service Unavailable</body></html>")
    with pytest.raises(HefeatError, match=r"GDC manifest gdc_manifest.txt is an HTML/XML page"):
        gdc.read_manifest(bad)
    assert st.sql("SELECT count(*) n FROM expression_datasets").iloc[0, 0] == 0  # nothing half-written


def test_truncated_downloads_are_refused_before_the_store_changes(layout, tmp_path):
    """A download cut mid-row (any of the tab-separated formats) or, for STAR-Counts, at a row boundary (fewer genes
    than the other files) is a one-line error saying so. The previous readers took a cut RSEM or Xena matrix (the
    cut gene's values empty) and blamed a cut STAR-Counts file's gene model."""
    from hefeat.slides.run import ingest_slides
    from hefeat.store.ingest import ingest_expression_source

    out, _ = layout
    st = Store.init(tmp_path / "st")
    ingest_slides(st, [out / "slides"])
    rna, sheet = _copy_rna(out, tmp_path)
    f = sorted(rna.rglob("*.tsv"))[1]
    lines = f.read_text().splitlines(True)  # comment, header, 4 N_ rows, then one row per gene id
    f.write_text("".join(lines[:20]) + lines[20][:9])
    with pytest.raises(HefeatError, match=rf"{f.name} ends mid-row: its last line has 1 of the 9 fields "
                                          r"\(truncated download\?\)") as e:
        ingest_expression_source(st, rna, sample_sheet=sheet)
    _one_line(e)
    f.write_text("".join(lines[:20]))
    with pytest.raises(HefeatError, match=rf"{f.name}: field 'gene_id' stops after 14 of the {len(lines) - 6} genes "
                                          r"the other files list \(truncated download\?\)"):
        ingest_expression_source(st, rna, sample_sheet=sheet)
    assert st.sql("SELECT count(*) n FROM expression_datasets").iloc[0, 0] == 0
    for src, read in ((out / "xena" / "TCGA-BRCA.star_tpm.tsv", xena.xena_matrix),
                      (out / "cbioportal" / "data_mrna_seq_v2_rsem.txt", cbioportal.rsem_matrix)):
        rows = src.read_text().splitlines(True)
        cut = tmp_path / src.name
        cut.write_text("".join(rows[:10]) + rows[10][:14])
        with pytest.raises(HefeatError, match=rf"{src.name} ends mid-row: its last line has \d+ of the "
                                              rf"{rows[0].count(chr(9)) + 1} fields"):
            read(cut)


def test_clinical_files_give_months_events_and_counted_receptor_labels(layout, tmp_path):
    out, truth = layout
    pat, smp, notes = cbioportal.clinical_table(out / "cbioportal" / "data_clinical_patient.txt",
                                                out / "cbioportal" / "data_clinical_sample.txt")
    src = pd.read_csv(truth_source(truth) / "clinical.csv")
    first = {v["patient"]: v["source_slide"] for k, v in truth["slides"].items() if k.endswith("-DX1")}
    ref = src.set_index("slide_id").loc[[first[p] for p in pat["patient_id"]]]
    np.testing.assert_allclose(pat["survival_months"], ref["survival_months"], atol=0.006)
    assert pat["event"].tolist() == ref["event"].tolist()
    assert pat.set_index("patient_id")["er_status"].to_dict() == pytest.approx(
        {p: (np.nan if v is None else v) for p, v in truth["er_status"].items()}, nan_ok=True)
    assert any("2 missing ([Not Available] 1, Indeterminate 1)" in n for n in notes)
    assert smp["sample_id"].str.len().eq(15).all()
    g, _ = gdc.clinical_table(out / "gdc_clinical" / "clinical.tsv")
    g = g.set_index("patient_id").loc[pat["patient_id"]]
    np.testing.assert_allclose(g["survival_months"], ref["survival_months"], atol=0.02)
    assert g["event"].tolist() == ref["event"].tolist()
    bad = tmp_path / "data_clinical_patient.txt"
    bad.write_text("#a\n#b\n#STRING\n#1\nPATIENT\tOS_MONTHS\tOS_STATUS\nX\t1\t1:DECEASED\n")
    with pytest.raises(HefeatError, match=r"data_clinical_patient.txt: missing field 'PATIENT_ID'") as e:
        cbioportal.clinical_table(bad)
    _one_line(e)
    bad.write_text("PATIENT_ID\tOS_MONTHS\tOS_STATUS\nX\tlong\t1:DECEASED\n")
    with pytest.raises(HefeatError, match=r"field 'OS_MONTHS' has 1 values that are not numbers, e.g. 'long'"):
        cbioportal.clinical_table(bad)


def test_cbioportal_dfs_pfs_and_every_tcga_receptor_value(tmp_path):
    """DFS/PFS pairs with their status words, and the six receptor values TCGA writes: Positive/Negative labelled,
    Equivocal, Indeterminate, [Not Evaluated], [Not Available] missing and counted."""
    f = tmp_path / "data_clinical_patient.txt"
    cols = ["PATIENT_ID", "OS_MONTHS", "OS_STATUS", "DFS_MONTHS", "DFS_STATUS", "PFS_MONTHS", "PFS_STATUS",
            "ER_STATUS_BY_IHC", "PR_STATUS_BY_IHC", "HER2_STATUS_BY_IHC"]
    rows = [["TCGA-A1-A001", "10.5", "1:DECEASED", "8.25", "1:Recurred/Progressed", "7", "1:PROGRESSION",
             "Positive", "Negative", "Equivocal"],
            ["TCGA-A1-A002", "30", "0:LIVING", "30", "0:DiseaseFree", "[Not Available]", "[Not Available]",
             "Negative", "[Not Evaluated]", "Positive"],
            ["TCGA-A1-A003", "[Not Available]", "[Not Available]", "12", "0:DiseaseFree", "12", "0:CENSORED",
             "Indeterminate", "Positive", "[Not Available]"]]
    f.write_text("".join("#" + "\t".join(cols) + "\n" for _ in range(4)) + "\t".join(cols) + "\n"
                 + "".join("\t".join(r) + "\n" for r in rows))
    pat, _, notes = cbioportal.clinical_table(f)
    pat = pat.set_index("patient_id")
    exp = {"survival_months": [10.5, 30, np.nan], "event": [1, 0, np.nan], "dfs_months": [8.25, 30, 12],
           "dfs_event": [1, 0, 0], "pfs_months": [7, np.nan, 12], "pfs_event": [1, np.nan, 0],
           "er_status": [1, 0, np.nan], "pr_status": [0, np.nan, 1], "her2_status": [np.nan, 1, np.nan]}
    for c, v in exp.items():
        np.testing.assert_array_equal(pat[c].to_numpy(float), np.asarray(v, float), err_msg=c)
    assert any(n.startswith("er_status from er_status_by_ihc: 2 labelled (1 positive), 1 missing (Indeterminate 1)")
               for n in notes)
    assert any("her2_status" in n and "2 missing" in n and "Equivocal 1" in n and "[Not Available] 1" in n for n in notes)
    assert any("pr_status" in n and "[Not Evaluated] 1" in n for n in notes)


def test_a_plain_patient_table_labels_only_the_eligible_tcga_slides(layout, tmp_path):
    """A hand-made clinical table keyed by TCGA patient barcodes goes to the tumour DX slides like the cBioPortal and
    GDC files do: a frozen or normal section never inherits its patient's label. (Previously the table was stored
    patient-keyed and every slide of the patient, frozen and normal ones included, carried the label.)"""
    from hefeat.learn.data import clinical_by_slide
    from hefeat.slides.run import ingest_slides
    from hefeat.store.ingest import ingest_clinical_source

    out, truth = layout
    st = Store.init(tmp_path / "st")
    ingest_slides(st, [out / "slides"])
    pd.DataFrame({"patient_id": truth["patients"], "label": range(len(truth["patients"]))}).to_csv(
        tmp_path / "labels.csv", index=False)
    rep = ingest_clinical_source(st, tmp_path / "labels.csv")
    n_off = sum(t["slide_type"] != "DX" or t["sample_type"] != "01" for t in truth["slides"].values())
    assert any(n.startswith(f"{n_off} slides (frozen, normal or other sample types) get no clinical row") for n in rep.notes)
    lab = clinical_by_slide(st).set_index("slide_id")["label"]
    for bc, t in truth["slides"].items():
        eligible = t["slide_type"] == "DX" and t["sample_type"] == "01"
        assert (lab[bc] == truth["patients"].index(t["patient"])) if eligible else np.isnan(lab[bc]), bc


def test_a_user_manifest_overrides_what_the_barcode_says(layout, tmp_path):
    """Patient, site and slide id from a --manifest row win over the ones parsed from the TCGA file name."""
    from hefeat.slides.run import ingest_slides

    out, truth = layout
    bc, t = next(iter(truth["slides"].items()))
    f = out / t["file"]
    (tmp_path / "m.csv").write_text(f"path,slide_id,patient_id,site\n{f.name},MY-SLIDE,MY-PATIENT,my-site\n")
    st = Store.init(tmp_path / "st")
    ingest_slides(st, [f, *[out / v["file"] for v in list(truth["slides"].values())[1:3]]], manifest=tmp_path / "m.csv")
    row = st.slides().set_index("slide_id")
    assert (row.loc["MY-SLIDE", "patient_id"], row.loc["MY-SLIDE", "site"]) == ("MY-PATIENT", "my-site")
    assert bc not in row.index and len(row) == 3


def test_tcga_layout_runs_end_to_end_with_generic_commands(layout, tmp_path):
    """synth --layout tcga output -> ingest (no manifest) -> status -> tile -> extract -> fit genes, receptors,
    traits -> HTI -> survival: each fit sees exactly the tumour DX slides, the labels and the survival the truth lists
    (frozen and normal slides are tiled and extracted, reported, and left out of every fit)."""
    out, truth = layout
    st = tmp_path / "st"
    run("init", "--store", st)
    man = pd.read_csv(out / "gdc_manifest.txt", sep="\t", dtype=str)
    man.loc[0, "md5"] = "0" * 32
    man.to_csv(tmp_path / "bad_md5.txt", sep="\t", index=False)
    r = js("ingest", "slides", out / "slides", "--gdc-manifest", tmp_path / "bad_md5.txt", "--verify-md5", "--store", st)
    assert list(r["failed"]) == [str(next((out / "slides").rglob(man.loc[0, "filename"])))]
    assert "md5" in next(iter(r["failed"].values())) and r["added"] == len(truth["slides"]) - 1
    pd.concat([man, man.tail(1).assign(filename="TCGA-XX-0000-01Z-00-DX1.svs")]).to_csv(tmp_path / "more.txt", sep="\t", index=False)
    r = run("ingest", "slides", out / "slides", "--gdc-manifest", tmp_path / "more.txt", "--store", st, ok=False)
    assert r.exit_code != 0 and "field 'filename' lists TCGA-XX-0000-01Z-00-DX1.svs" in r.output
    (tmp_path / "S99.tiff").write_bytes((out / truth["slides"][next(iter(truth["slides"]))]["file"]).read_bytes())
    with pytest.warns(UserWarning, match="S99.tiff has no TCGA barcode in its name: ingested as its own patient"):
        r = js("ingest", "slides", out / "slides", tmp_path / "S99.tiff", "--gdc-manifest", out / "gdc_manifest.txt",
               "--verify-md5", "--store", st)
    assert r["added"] == 2 and any("1 files are not in the GDC manifest" in n for n in r["notes"])
    n_off = sum(t["slide_type"] != "DX" or t["sample_type"] != "01" for t in truth["slides"].values())
    assert any(n.startswith(f"Excluded by default: {n_off} slides (1 frozen normal, {n_off - 1} frozen tumour)")
               and "so fits leave them out" in n for n in r["notes"])
    slides = Store(st).slides().set_index("slide_id")
    assert slides.loc["S99", "patient_id"] == "S99"
    for bc, t in truth["slides"].items():
        assert slides.loc[bc, "patient_id"] == t["patient"] and slides.loc[bc, "site"] == t["site"]
    status = js("status", "--store", st)["tcga"]
    kinds = pd.Series([t["sample_type"] for t in truth["slides"].values()]).value_counts().to_dict()
    assert status["patients"] == len(truth["patients"]) and status["sites"] == truth["sites"]
    assert status["sample_types"] == kinds
    assert status["preservation"] == pd.Series([t["preservation"] for t in truth["slides"].values()]).value_counts().to_dict()
    e = js("ingest", "expression", out / "gdc_rna", "--store", st)
    tumour = sorted(s for s in truth["rna_samples"] if s[13:15] == "01")
    assert e["added"] == 1 and any("type 11 (Solid Tissue Normal) kept apart" in n for n in e["notes"])
    ids, genes, _ = read_matrix(Store(st))
    assert ids == tumour and genes == truth["genes"]
    mapped = Store(st).sql("SELECT slide_id FROM samples")["slide_id"]
    assert set(mapped) == {bc for bc, t in truth["slides"].items() if t["slide_type"] == "DX" and t["sample_type"] == "01"}
    c = js("ingest", "clinical", out / "cbioportal" / "data_clinical_patient.txt", "--samples",
           out / "cbioportal" / "data_clinical_sample.txt", "--store", st)
    assert c["rows"] == len(mapped)
    clin = Store(st).sql("SELECT * FROM clinical")
    assert set(clin["slide_id"]) == set(mapped) and {"survival_months", "event", "er_status", "subtype"} <= set(clin.columns)
    t = js("tile", "--mpp", "1.0", "--size", "64", "--max-tiles", "12", "--store", st)
    x = js("extract", "--encoder", "resnet18", "--layer", "layer1", "--weights", "none", "--precision", "fp32",
           "--fit", "native", "--tiling", t["tiling_id"], "--store", st)
    f = js("fit", "genes", "--extraction", x["extraction_id"], "--split", "patient-kfold:3", "--store", st)
    assert f["n_samples"] == len(tumour) and 0 < f["n_genes"] <= len(truth["genes"])  # low-variance genes filtered
    _fits_see_the_truth(st, x["extraction_id"], truth, set(mapped), tmp_path)
    # the other published matrices land as datasets of the same samples (tumour only, same slides)
    xe = js("ingest", "expression", out / "xena" / "TCGA-BRCA.star_tpm.tsv", "--format", "xena", "--dataset", "xena",
            "--gene-ids", "ensembl", "--store", st)
    cb = js("ingest", "expression", out / "cbioportal" / "data_mrna_seq_v2_rsem.txt", "--dataset", "rsem", "--store", st)
    assert any("log2" in n for n in xe["notes"]) and cb["rows"] == len(tumour) * len(truth["genes"])
    sm = Store(st).sql("SELECT dataset, count(DISTINCT slide_id) n FROM samples GROUP BY 1").set_index("dataset")["n"]
    assert sm.to_dict() == {"expression": len(set(mapped)), "xena": len(set(mapped)), "rsem": len(set(mapped))}
    g = js("ingest", "clinical", out / "gdc_clinical" / "clinical.tsv", "--store", st)
    assert g["rows"] == len(set(mapped))


def _fits_see_the_truth(st, eid, truth, tumour_dx: set, tmp_path) -> None:
    """Receptors, traits, HTI and survival on the TCGA store, checked against the layout's truth."""
    from lifelines.statistics import logrank_test

    from hefeat.store.models import load_table

    excluded = set(truth["slides"]) - tumour_dx
    off = js("status", "--store", st)["tcga"]["outside_default_matching"]
    assert off["slides"] == len(excluded) > 0 and off["matched"] == 0
    assert off["frozen"] == sum(truth["slides"][s]["preservation"] == "frozen" for s in excluded)
    assert off["normal"] == sum(truth["slides"][s]["sample_type"] == "11" for s in excluded) == 1
    assert "none has an expression sample or clinical row, so fits leave them out" in run("status", "--store", st).output
    # receptors: ER as the truth lists it ([Not Available], Indeterminate missing), split by the barcodes' sites
    clin = Store(st).sql("SELECT slide_id, patient_id, er_status FROM clinical")
    assert set(clin["slide_id"]) == tumour_dx
    er = {p: v for p, v in truth["er_status"].items() if v is not None}
    assert clin.dropna().groupby("patient_id")["er_status"].first().to_dict() == er
    for seed in range(4):  # a site split whose test sites hold both classes (the split is random)
        r = run("fit", "receptors", "--extraction", eid, "--tiles", "top:8", "--n-boot", "50", "--seed", seed,
                "--store", st, "--json", ok=False)
        if r.exit_code == 0:
            break
    assert r.exit_code == 0, r.output
    rc = json.loads(r.output.strip().splitlines()[-1])
    sc = load_table(Store(st), rc["model_id"], "patient_scores")
    assert set(sc["patient_id"]) <= set(er) and sc["y"].tolist() == [er[p] for p in sc["patient_id"]]
    test = sc[sc["part"] == "test"]
    assert {p[5:7] for p in test["patient_id"]} == set(rc["test_sites"].split(",")) and len(test) == rc["n_test_patients"]
    assert not {p[5:7] for p in test["patient_id"]} & {p[5:7] for p in sc.loc[sc["part"] == "validation", "patient_id"]}
    assert 0 <= rc["patient_auc_ci_low"] <= rc["patient_auc"] <= rc["patient_auc_ci_high"] <= 1
    # traits (PathoMCH) -> HTI -> survival: tumour DX slides only, each with its patient's cBioPortal survival
    tr = js("fit", "traits", "--extraction", eid, "--trait", "MKI67", "--trait", "miR-17", "--exclude-mid", "30,70",
            "--test-share", "0.3", "--splits", "2", "--ensemble", "1", "--crossfit", "2", "--store", st)
    patients = {truth["slides"][s]["patient"] for s in tumour_dx}
    assert tr["n_slides"] == len(tumour_dx) and tr["n_patients"] == len(patients)
    js("hti", tr["model_id"], "--out", tmp_path / "hti.parquet", "--store", st)
    h = pd.read_parquet(tmp_path / "hti.parquet")
    assert set(h["slide_id"]) == tumour_dx  # frozen and normal slides have features, but no fit used them
    src = pd.read_csv(truth_source(truth) / "clinical.csv").set_index("slide_id")
    first = {t["patient"]: t["source_slide"] for b, t in truth["slides"].items() if b.endswith("-01Z-00-DX1")}
    ref = src.loc[[first[p] for p in h["patient_id"]]]
    np.testing.assert_allclose(h["survival_months"], ref["survival_months"], atol=0.006)
    assert h["event"].astype(int).tolist() == ref["event"].tolist()
    pat = h.groupby("patient_id").agg(hti=("hti", "mean"), ok=("map_heldout", "all"))
    pat = pat[pat["ok"] & (pat["hti"] > 0)]
    thr = float(np.median(pat["hti"]))  # both groups non-empty whatever the random-weight features give
    sv = js("survival", "--model", tr["model_id"], "--by", "hti", "--threshold", thr, "--store", st)
    t = src.loc[[first[p] for p in pat.index], "survival_months"].to_numpy()
    e = src.loc[[first[p] for p in pat.index], "event"].to_numpy() * (t <= sv["max_follow_up"])
    t = np.minimum(t, sv["max_follow_up"])
    hi = (pat["hti"] > thr).to_numpy()
    lr = logrank_test(t[hi], t[~hi], e[hi], e[~hi])  # the truth's survival of the patients the rule admits
    assert (sv["n_patients"], sv["n_missing_survival"], sv["rule"]) == (len(patients), 0, "crossfit")
    assert (sv["n_high"], sv["n_low"]) == (int(hi.sum()), int((~hi).sum()))
    assert sv["logrank_p"] == pytest.approx(lr.p_value, rel=1e-6)


def test_xena_and_cbioportal_matrices_and_gdc_clinical_read_as_published(layout, tmp_path):
    out, truth = layout
    gdc_wide, _ = gdc.star_counts_matrix(out / "gdc_rna", out / "gdc_sample_sheet.tsv", gene_ids="ensembl")
    x, notes = xena.xena_matrix(out / "xena" / "TCGA-BRCA.star_tpm.tsv")
    assert "log2(x + 1)" in notes[0] and "fits log them once" in notes[0]
    np.testing.assert_allclose(x.to_numpy(), gdc_wide.loc[x.index, x.columns].to_numpy(), rtol=1e-4, atol=1e-4)
    r, _ = cbioportal.rsem_matrix(out / "cbioportal" / "data_mrna_seq_v2_rsem.txt")
    assert list(r.columns) == truth["genes"] and all(len(s) == 15 for s in r.index)
    np.testing.assert_allclose(r.to_numpy(), gdc_wide.loc[[s + "A" for s in r.index]].to_numpy()[:, :len(truth["genes"])],
                               atol=6e-5)
    bad = tmp_path / "x.tsv"
    pd.read_csv(out / "xena" / "TCGA-BRCA.star_tpm.tsv", sep="\t").assign(**{x.index[0]: 1000.0}).to_csv(bad, sep="\t", index=False)
    with pytest.raises(HefeatError, match=r"x.tsv: values up to 1000 are not log2 values") as e:
        xena.xena_matrix(bad)
    _one_line(e)
    pd.read_csv(out / "cbioportal" / "data_mrna_seq_v2_rsem.txt", sep="\t").drop(columns="Entrez_Gene_Id").to_csv(
        bad, sep="\t", index=False)
    with pytest.raises(HefeatError, match=r"x.tsv: missing field 'Entrez_Gene_Id'"):
        cbioportal.rsem_matrix(bad)
    pd.read_csv(out / "gdc_clinical" / "clinical.tsv", sep="\t").drop(columns="vital_status").to_csv(bad, sep="\t", index=False)
    with pytest.raises(HefeatError, match=r"x.tsv: missing field 'vital_status'") as e:
        gdc.clinical_table(bad)
    _one_line(e)
    dotted = pd.read_csv(out / "gdc_clinical" / "clinical.tsv", sep="\t", dtype=str).rename(columns={
        "case_submitter_id": "cases.submitter_id", "vital_status": "demographic.vital_status",
        "days_to_death": "demographic.days_to_death", "days_to_last_follow_up": "diagnoses.days_to_last_follow_up",
        "project_id": "project.project_id", "case_id": "cases.case_id"})
    dotted.to_csv(bad, sep="\t", index=False)
    new, _ = gdc.clinical_table(bad)  # the 2024 portal's dotted field names read the same
    old, _ = gdc.clinical_table(out / "gdc_clinical" / "clinical.tsv")
    pd.testing.assert_frame_equal(new[["patient_id", "survival_months", "event"]], old[["patient_id", "survival_months", "event"]])


def test_slide_sample_sheet_and_diagnostic_only(layout, tmp_path):
    from hefeat.slides.run import ingest_slides

    out, truth = layout
    st = Store.init(tmp_path / "st")
    sheet = pd.read_csv(out / "slides" / "gdc_sample_sheet.tsv", sep="\t", dtype=str)
    bad = sheet.copy()
    bad.loc[0, "Case ID"] = "TCGA-ZZ-Z999"
    bad.to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    with pytest.raises(HefeatError, match=rf"bad.tsv: field 'Case ID' says TCGA-ZZ-Z999 for {sheet.loc[0, 'File Name']}") as e:
        ingest_slides(st, [out / "slides"], sample_sheet=tmp_path / "bad.tsv")
    _one_line(e)
    assert st.slides().empty
    rep = ingest_slides(st, [out / "slides"], sample_sheet=out / "slides" / "gdc_sample_sheet.tsv", diagnostic_only=True)
    dx = {bc for bc, t in truth["slides"].items() if t["slide_type"] == "DX"}
    assert set(st.slides()["slide_id"]) == dx and len(rep.added) == len(dx)
    n_frozen = len(truth["slides"]) - len(dx)
    assert any(n.startswith(f"{n_frozen} frozen (TS/BS/MS) slides left out") for n in rep.notes)
