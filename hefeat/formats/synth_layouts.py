"""A synthetic cohort (hefeat.slides.synth.make_cohort's output folder) rewritten as real downloads arrive.

`tcga_layout` writes barcoded slide files in GDC's download layout, a GDC STAR-Counts folder with
its sample sheet, cBioPortal clinical and RSEM files, a UCSC Xena matrix and a GDC clinical TSV;
`visium_layout` writes Space Ranger ``outs/`` folders, `hest_layout` HEST-1k samples and
`st_layout` the original ST format, for the slides with spots. Each follows the format versions
named in its reader's docstring (hefeat.formats.*), so tests run the real readers end to end. A
truth file lists what each written file is (patient, site, sample type, slide type, source slide).
Slide images are hard-linked (copied where links are impossible), never re-rendered.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.formats.spot_model import draw_spots

TSS_CODES = ("A1", "A2", "AN", "B6", "BH", "E2", "D8", "GM")  # real BRCA tissue source site codes
PROJECT = "TCGA-BRCA"


def _uuid(*parts) -> str:
    """A deterministic UUID (version 4 layout) from `parts`."""
    b = bytearray(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(b)))


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def _cohort(src: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    truth = json.loads((src / "truth.json").read_text())
    expr = pd.read_parquet(src / "expression.parquet").set_index("sample_id")
    clin = pd.read_csv(src / "clinical.csv").set_index("slide_id")
    return truth, expr, clin


def tcga_roles(truth: dict, *, n_frozen: int | None = None, n_normal: int = 1) -> list[dict]:
    """Which TCGA material each synthetic slide becomes: every slide a diagnostic DX slide of its patient,
    plus frozen TS sections (of the first patients) and a normal 11A section (of the next one), which
    show the same tissue as the patient's first slide. One dict per written slide: slide (source),
    patient, tss, sample_type, vial, portion, slide_type, index, barcode."""
    slides = list(truth["slides"])
    n_frozen = max(1, len(slides) // 8) if n_frozen is None else n_frozen
    per_patient: dict[str, list[str]] = {}
    for s in slides:
        per_patient.setdefault(truth["slides"][s]["patient_id"], []).append(s)
    patients = list(per_patient)
    if len(patients) < n_frozen + n_normal:
        raise ValueError("the cohort is too small for a TCGA layout")
    sites = sorted({truth["slides"][s]["site"] for s in slides})
    roles = []
    for i, p in enumerate(patients):
        tss = TSS_CODES[sites.index(truth["slides"][per_patient[p][0]]["site"]) % len(TSS_CODES)]
        who = {"patient": f"TCGA-{tss}-A{i + 1:03d}", "tss": tss}
        for k, s in enumerate(per_patient[p]):
            roles.append({"slide": s, **who, "sample_type": "01", "vial": "Z", "portion": "00", "slide_type": "DX",
                          "index": str(k + 1)})
        if i < n_frozen + n_normal:
            roles.append({"slide": per_patient[p][0], **who, "sample_type": "01" if i < n_frozen else "11",
                          "vial": "A", "portion": "01", "slide_type": "TS", "index": "1"})
    for r in roles:
        r["barcode"] = f"{r['patient']}-{r['sample_type']}{r['vial']}-{r['portion']}-{r['slide_type']}{r['index']}"
    return roles


def _clinical_header(cols: list[tuple[str, str, str]]) -> str:
    """cBioPortal's four '#' rows (display name, description, datatype, priority) and the attribute ids."""
    return ("#" + "\t".join(c[1] for c in cols) + "\n#" + "\t".join(c[1] + "." for c in cols) + "\n#"
            + "\t".join(c[2] for c in cols) + "\n#" + "\t".join("1" for _ in cols) + "\n"
            + "\t".join(c[0] for c in cols) + "\n")


def tcga_layout(src: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0) -> dict:
    """Write `src` (a make_cohort folder) as a TCGA download under `out`; returns the truth it wrote.

    out/slides/<file id>/<barcode>.<uuid>.tiff + out/gdc_manifest.txt + out/slides/gdc_sample_sheet.tsv; out/gdc_rna/<file id>/<uuid>.rna_seq.
    augmented_star_gene_counts.tsv + out/gdc_sample_sheet.tsv; out/cbioportal/data_clinical_patient.txt,
    data_clinical_sample.txt, data_mrna_seq_v2_rsem.txt; out/xena/TCGA-BRCA.star_tpm.tsv;
    out/gdc_clinical/clinical.tsv; out/truth_tcga.json.
    """
    src, out = Path(src), Path(out)
    truth, expr, clin = _cohort(src)
    roles = tcga_roles(truth)
    rng = np.random.default_rng(seed + 17)

    # Slides, in the gdc-client layout, with their manifest.
    man = []
    for r in roles:
        fid = _uuid(seed, "slide-file", r["barcode"])
        name = f"{r['barcode']}.{_uuid(seed, 'slide', r['barcode']).upper()}.tiff"
        dst = out / "slides" / fid / name
        _link(src / "slides" / f"{r['slide']}.tiff", dst)
        r["file"] = str(dst.relative_to(out))
        man.append({"id": fid, "filename": name, "md5": _md5(dst), "size": dst.stat().st_size, "state": "released"})
    pd.DataFrame(man).to_csv(out / "gdc_manifest.txt", sep="\t", index=False)
    pd.DataFrame([{"File ID": m["id"], "File Name": m["filename"], "Data Category": "Biospecimen",
                   "Data Type": "Slide Image", "Project ID": PROJECT, "Case ID": r["patient"],
                   "Sample ID": f"{r['patient']}-{r['sample_type']}{r['vial']}",
                   "Sample Type": "Primary Tumor" if r["sample_type"] == "01" else "Solid Tissue Normal"}
                  for m, r in zip(man, roles, strict=True)]).to_csv(out / "slides" / "gdc_sample_sheet.tsv", sep="\t",
                                                                    index=False)

    # RNA samples: one per (patient, sample type); values = mean of its slides' synthetic expression.
    samples: dict[str, list[str]] = {}
    for r in roles:
        if r["slide_type"] == "DX" or r["sample_type"] != "01":
            samples.setdefault(f"{r['patient']}-{r['sample_type']}A", []).append(r["slide"])
    genes = list(expr.columns)
    # a normal sample: the section's tissue with its tumour-driven part halved (any stated difference would do)
    values = {s: expr.loc[sl].to_numpy(float).mean(0) * (0.5 if s[13:15] == "11" else 1.0) for s, sl in samples.items()}
    ens = [f"ENSG{900000 + i:011d}.{1 + i % 9}" for i in range(len(genes))]
    dup = len(genes) - 1  # the last gene also sits on a PAR_Y copy with zero counts, as in GENCODE v36
    sheet = []
    for s, v in values.items():
        fid, aliquot = _uuid(seed, "rna-file", s), _uuid(seed, "rna-aliquot", s)
        path = out / "gdc_rna" / fid / f"{aliquot}.rna_seq.augmented_star_gene_counts.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        counts = np.round(v * 20 + rng.poisson(2, len(v)))
        lines = ["# gene-model: GENCODE v36", "\t".join(["gene_id", "gene_name", "gene_type", "unstranded",
                                                         "stranded_first", "stranded_second", "tpm_unstranded",
                                                         "fpkm_unstranded", "fpkm_uq_unstranded"])]
        for row in ("N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous"):
            k = int(rng.integers(10_000, 2_000_000))
            lines.append(f"{row}\t\t\t{k}\t{k // 2}\t{k // 2}\t\t\t")
        for i, (g, e) in enumerate(zip(genes, ens, strict=True)):
            c = int(counts[i])
            lines.append(f"{e}\t{g}\tprotein_coding\t{c}\t{c // 2}\t{c - c // 2}\t{v[i]:.4f}\t{v[i] * 0.31:.4f}\t{v[i] * 0.87:.4f}")
            if i == dup:
                lines.append(f"{e.split('.')[0]}.{1 + i % 9}_PAR_Y\t{g}\tprotein_coding\t0\t0\t0\t0.0000\t0.0000\t0.0000")
        path.write_text("\n".join(lines) + "\n")
        patient = s[:12]
        sheet.append({"File ID": fid, "File Name": path.name, "Data Category": "Transcriptome Profiling",
                      "Data Type": "Gene Expression Quantification", "Project ID": PROJECT, "Case ID": patient,
                      "Sample ID": s, "Sample Type": "Primary Tumor" if s[13:15] == "01" else "Solid Tissue Normal"})
    pd.DataFrame(sheet).to_csv(out / "gdc_sample_sheet.tsv", sep="\t", index=False)

    # cBioPortal clinical (patients: survival + ER; samples: subtype) and RSEM matrix (tumour samples).
    dx = [r for r in roles if r["slide_type"] == "DX" and r["index"] == "1"]
    pats = []
    receptor_truth = {}
    for j, r in enumerate(dx):
        c = clin.loc[r["slide"]]
        er = "Positive" if int(c["er_status"]) else "Negative"
        if j == 1:
            er = "[Not Available]"
        elif j == 2:
            er = "Indeterminate"
        receptor_truth[r["patient"]] = {"Positive": 1, "Negative": 0}.get(er)
        pats.append({"PATIENT_ID": r["patient"], "OS_STATUS": "1:DECEASED" if int(c["event"]) else "0:LIVING",
                     "OS_MONTHS": f"{float(c['survival_months']):.2f}", "ER_STATUS_BY_IHC": er})
    cb = out / "cbioportal"
    cb.mkdir(parents=True, exist_ok=True)
    pcols = [("PATIENT_ID", "Patient Identifier", "STRING"), ("OS_STATUS", "Overall Survival Status", "STRING"),
             ("OS_MONTHS", "Overall Survival (Months)", "NUMBER"), ("ER_STATUS_BY_IHC", "ER Status By IHC", "STRING")]
    (cb / "data_clinical_patient.txt").write_text(
        _clinical_header(pcols) + "".join("\t".join(p[c[0]] for c in pcols) + "\n" for p in pats))
    scols = [("PATIENT_ID", "Patient Identifier", "STRING"), ("SAMPLE_ID", "Sample Identifier", "STRING"),
             ("SUBTYPE", "Subtype", "STRING")]
    srows = [{"PATIENT_ID": r["patient"], "SAMPLE_ID": f"{r['patient']}-01",
              "SUBTYPE": f"BRCA_{clin.loc[r['slide'], 'pam50']}"} for r in dx]
    (cb / "data_clinical_sample.txt").write_text(
        _clinical_header(scols) + "".join("\t".join(s[c[0]] for c in scols) + "\n" for s in srows))
    tumour = [s for s in values if s[13:15] == "01"]
    rsem = pd.DataFrame({s[:15]: values[s] for s in tumour})
    rsem.insert(0, "Entrez_Gene_Id", [str(100000 + i) for i in range(len(genes))])
    rsem.insert(0, "Hugo_Symbol", genes)
    rsem.to_csv(cb / "data_mrna_seq_v2_rsem.txt", sep="\t", index=False, float_format="%.4f")

    # UCSC Xena (GDC hub style): Ensembl ids x samples, log2(tpm + 1).
    (out / "xena").mkdir(parents=True, exist_ok=True)
    xena = pd.DataFrame({s: np.log2(values[s] + 1) for s in values})
    xena.insert(0, "Ensembl_ID", ens)
    xena.to_csv(out / "xena" / "TCGA-BRCA.star_tpm.tsv", sep="\t", index=False, float_format="%.6f")

    # GDC clinical TSV (one row per case; '-- for missing).
    gc = []
    for r in dx:
        c = clin.loc[r["slide"]]
        dead = int(c["event"]) == 1
        days = f"{float(c['survival_months']) * 365.25 / 12:.0f}"
        gc.append({"project_id": PROJECT, "case_id": _uuid(seed, "case", r["patient"]), "case_submitter_id": r["patient"],
                   "vital_status": "Dead" if dead else "Alive", "days_to_death": days if dead else "'--",
                   "days_to_last_follow_up": "'--" if dead else days})
    (out / "gdc_clinical").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(gc).to_csv(out / "gdc_clinical" / "clinical.tsv", sep="\t", index=False)

    t = {
        "layout": "tcga", "project": PROJECT, "source": str(src),
        "slides": {r["barcode"]: {"file": r["file"], "source_slide": r["slide"], "patient": r["patient"], "site": r["tss"],
                                  "sample_type": r["sample_type"], "slide_type": r["slide_type"],
                                  "preservation": "FFPE" if r["slide_type"] == "DX" else "frozen"} for r in roles},
        "patients": sorted({r["patient"] for r in roles}),
        "sites": sorted({r["tss"] for r in roles}),
        "rna_samples": {s: sl for s, sl in samples.items()},
        "er_status": receptor_truth,
        "duplicate_symbol": genes[dup],
        "genes": genes,
    }
    (out / "truth_tcga.json").write_text(json.dumps(t, indent=1))
    return t


def write_layout(layout: str, cohort: str | os.PathLike, *, seed: int = 0) -> dict:
    """Write `cohort` (a make_cohort folder) in `layout` under cohort/<layout>/; a summary with a text line."""
    cohort = Path(cohort)
    out = cohort / layout
    if layout == "tcga":
        t = tcga_layout(cohort, out, seed=seed)
        kinds = pd.Series([v["slide_type"] + ":" + v["sample_type"] for v in t["slides"].values()]).value_counts()
        return {"out": str(out), "slides": len(t["slides"]), "patients": len(t["patients"]),
                "text": f"TCGA layout in {out}: {len(t['slides'])} barcoded slides of {len(t['patients'])} patients "
                        f"({', '.join(f'{n} {k}' for k, n in kinds.items())}), GDC STAR-Counts + sample sheet, "
                        "cBioPortal, Xena and GDC clinical files; truth_tcga.json lists them."}
    writers = {"visium": visium_layout, "hest": hest_layout, "st": st_layout}
    if layout not in writers:
        raise ValueError(f"unknown layout {layout!r}")
    t = writers[layout](cohort, out, seed=seed)
    return {"out": str(out), "samples": len(t["samples"]),
            "text": f"{layout} layout in {out}: {len(t['samples'])} samples ({', '.join(list(t['samples'])[:4])}); "
                    f"truth_{layout}.json lists them."}


def _spot_slides(src: Path) -> tuple[dict, pd.DataFrame, list[str]]:
    truth = json.loads((src / "truth.json").read_text())
    spots = pd.read_parquet(src / "spots.parquet")
    return truth, spots, list(truth["genes"])


def _barcode(seed: int, slide: str, k: int) -> str:
    """A Visium-like spot barcode: 16 nucleotides and '-1'."""
    h = hashlib.sha256(f"{seed}/{slide}/{k}".encode()).digest()
    return "".join("ACGT"[b % 4] for b in h[:16]) + "-1"


def _grid(spot_ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(row j, col i) of make_cohort's spot ids '<slide>_<j>x<i>'."""
    ji = spot_ids.str.rsplit("_", n=1).str[1].str.split("x", expand=True).astype(int)
    return ji[0].to_numpy(), ji[1].to_numpy()


VISIUM_PITCH_UM = 100.0     # Visium: spot centres 100 µm apart on a hexagonal grid ...
VISIUM_SPOT_UM = 55.0       # ... of 55 µm spots (10x Genomics, Visium Spatial Gene Expression)


def _class_map(src: Path, slide_id: str) -> tuple[np.ndarray, np.ndarray, float, list[str]]:
    """make_cohort's maps of a slide: (classes (h, w), glandular (h, w), µm per map pixel, class names)."""
    z = np.load(src / "truth" / f"{slide_id}.classes.npz")
    gland = z["gland"] if "gland" in z.files else np.zeros(z["classes"].shape, bool)
    return z["classes"], gland, float(z["mpp"]), [str(c) for c in z["class_names"]]


def spot_counts(src: Path, truth: dict, slide_id: str, xy_um: np.ndarray, diameter_um: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_cohort's spot model (hefeat.formats.spot_model) at any spot centres of a slide, drawn in order
    from the slide's seed + 3 as make_cohort draws its own grid.

    Returns (kept: indices into xy_um of shape (n_kept,), class fractions of shape (n_kept, n_classes),
    counts of shape (n_kept, n_genes)). On make_cohort's own square grid this reproduces spots.parquet.
    """
    cls, gland, cmpp, _ = _class_map(src, slide_id)
    rng = np.random.default_rng(int(truth["slides"][slide_id]["seed"]) + 3)
    kept, fracs, _, counts = draw_spots(cls, gland, cmpp, truth, rng, xy_um, diameter_um)
    return kept, fracs, counts


def visium_spots(src: Path, truth: dict, slide_id: str) -> pd.DataFrame:
    """A Visium capture area over the slide: every position of the hexagonal grid (rows 100·√3/2 µm apart,
    odd rows shifted by half the 100 µm pitch; array_col even on even rows, odd on odd rows, as Space
    Ranger numbers them) with in_tissue, level-0 pixel centres, and the class fractions and counts of
    the in-tissue 55 µm spots (spot_counts)."""
    cls, _, cmpp, classes = _class_map(src, slide_id)
    shape = cls.shape
    h_um, w_um = shape[0] * cmpp, shape[1] * cmpp
    mpp = float(truth["slides"][slide_id]["mpp"])
    rows = []
    for r, y in enumerate(np.arange(VISIUM_PITCH_UM, h_um - VISIUM_PITCH_UM / 2, VISIUM_PITCH_UM * np.sqrt(3) / 2)):
        for c in range(r % 2, 10**6, 2):
            x = VISIUM_PITCH_UM + c * VISIUM_PITCH_UM / 2
            if x >= w_um - VISIUM_PITCH_UM / 2:
                break
            rows.append({"array_row": r, "array_col": c, "x_um": x, "y_um": y})
    grid = pd.DataFrame(rows)
    kept, fracs, counts = spot_counts(src, truth, slide_id, grid[["x_um", "y_um"]].to_numpy(), VISIUM_SPOT_UM)
    grid["spot_id"] = [f"{slide_id}_r{r}c{c}" for r, c in zip(grid["array_row"], grid["array_col"], strict=True)]
    grid["x"], grid["y"] = grid["x_um"] / mpp, grid["y_um"] / mpp
    grid["in_tissue"] = 0
    grid.loc[kept, "in_tissue"] = 1
    for j, name in enumerate(classes):
        grid[f"frac_{name}"] = np.nan
        grid.loc[kept, f"frac_{name}"] = fracs[:, j]
    genes = list(truth["genes"])
    block = pd.DataFrame(0, index=grid.index, columns=genes, dtype=np.int64)
    block.loc[kept] = counts
    return pd.concat([grid, block], axis=1)


def write_10x_h5(path: Path, barcodes: list[str], ids: list[str], names: list[str], counts: np.ndarray) -> None:
    """A 10x feature-barcode matrix HDF5, format version 2 (CSC: features x barcodes)."""
    import h5py
    import scipy.sparse as sp

    m = sp.csc_matrix(np.asarray(counts, np.int32).T)  # features x barcodes
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["library_ids"] = np.array([b"synthetic"])
        f.attrs["chemistry_description"] = "Spatial 3' v1"
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        g.create_dataset("data", data=m.data.astype(np.int32))
        g.create_dataset("indices", data=m.indices.astype(np.int64))
        g.create_dataset("indptr", data=m.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array(m.shape, dtype=np.int32))
        ft = g.create_group("features")
        ft.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        ft.create_dataset("id", data=np.array(ids, dtype="S"))
        ft.create_dataset("name", data=np.array(names, dtype="S"))
        ft.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(ids)))
        ft.create_dataset("genome", data=np.array([b"GRCh38"] * len(ids)))


def visium_layout(src: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0) -> dict:
    """Space Ranger outputs for each spot slide: out/<slide>/outs/{filtered_feature_bc_matrix.h5, spatial/...}
    and out/<slide>/<slide>.tif (the full-resolution H&E), on Visium's geometry whatever spots the cohort
    has: 55 µm spots on a hexagonal grid of 100 µm pitch (visium_spots), counts from the cohort's spot
    model at those centres. The first slide gets Space Ranger 2.x tissue_positions.csv, the others 1.x
    tissue_positions_list.csv; each lists every grid position (in_tissue 0 off the tissue), and the
    filtered matrix holds the in-tissue spots. out/truth_visium_spots.parquet lists the spots written
    (slide_id, spot_id, barcode, x, y, array_row, array_col, class fractions, counts)."""
    src, out = Path(src), Path(out)
    truth, spots, genes = _spot_slides(src)
    t = {"layout": "visium", "source": str(src), "samples": {}, "spot_diameter_um": VISIUM_SPOT_UM,
         "pitch_um": VISIUM_PITCH_UM}
    ens = [f"ENSG{900000 + i:011d}" for i in range(len(genes))]
    frames = []
    for n, sid in enumerate(sorted(spots["slide_id"].unique())):
        mpp = truth["slides"][sid]["mpp"]
        diam_px = VISIUM_SPOT_UM / mpp
        g = visium_spots(src, truth, sid)
        g["barcode"] = [_barcode(seed, sid, k) for k in range(len(g))]
        g.insert(0, "slide_id", sid)
        df = g[g["in_tissue"] == 1]
        d = out / sid
        write_10x_h5(d / "outs" / "filtered_feature_bc_matrix.h5", df["barcode"].tolist(), ens, genes, df[genes].to_numpy())
        pos = pd.DataFrame({"barcode": g["barcode"], "in_tissue": g["in_tissue"], "array_row": g["array_row"],
                            "array_col": g["array_col"], "pxl_row_in_fullres": np.round(g["y"]).astype(int),
                            "pxl_col_in_fullres": np.round(g["x"]).astype(int)})
        (d / "outs" / "spatial").mkdir(parents=True, exist_ok=True)
        if n == 0:
            pos.to_csv(d / "outs" / "spatial" / "tissue_positions.csv", index=False)
        else:
            pos.to_csv(d / "outs" / "spatial" / "tissue_positions_list.csv", index=False, header=False)
        (d / "outs" / "spatial" / "scalefactors_json.json").write_text(json.dumps({
            "tissue_hires_scalef": 0.17, "tissue_lowres_scalef": 0.051, "fiducial_diameter_fullres": diam_px * 65 / 55,
            "spot_diameter_fullres": diam_px}))
        _link(src / "slides" / f"{sid}.tiff", d / f"{sid}.tif")
        t["samples"][sid] = {"outs": str(d / "outs"), "image": str(d / f"{sid}.tif"), "mpp": mpp, "spots": len(df),
                             "grid_positions": len(g), "spot_diameter_um": VISIUM_SPOT_UM,
                             "barcodes": dict(zip(df["barcode"], df["spot_id"], strict=True))}
        frames.append(df.drop(columns=["in_tissue", "x_um", "y_um"]))
    out.mkdir(parents=True, exist_ok=True)
    pd.concat(frames, ignore_index=True).to_parquet(out / "truth_visium_spots.parquet", index=False)
    (out / "truth_visium.json").write_text(json.dumps(t, indent=1))
    return t


def hest_layout(src: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0) -> dict:
    """HEST-1k samples for the spot slides: out/st/<id>.h5ad, out/metadata/<id>.json, out/wsis/<id>.tif, as HEST
    holds Visium samples (the hexagonal 55 µm spots of visium_spots; out/truth_hest_spots.parquet lists them)."""
    import anndata
    import scipy.sparse as sp

    src, out = Path(src), Path(out)
    truth, spots, genes = _spot_slides(src)
    t = {"layout": "hest", "source": str(src), "samples": {}}
    for d in ("st", "metadata", "wsis"):
        (out / d).mkdir(parents=True, exist_ok=True)
    frames = []
    for sid in sorted(spots["slide_id"].unique()):
        hid = f"SYN{sid}"
        mpp = truth["slides"][sid]["mpp"]
        g = visium_spots(src, truth, sid)
        g["barcode"] = [_barcode(seed, sid, k) for k in range(len(g))]
        df = g[g["in_tissue"] == 1]
        obs = pd.DataFrame({"in_tissue": 1, "array_row": df["array_row"].to_numpy(), "array_col": df["array_col"].to_numpy(),
                            "pxl_col_in_fullres": df["x"].to_numpy(), "pxl_row_in_fullres": df["y"].to_numpy()},
                           index=pd.Index(df["barcode"].tolist()))
        ad = anndata.AnnData(X=sp.csr_matrix(df[genes].to_numpy(np.float32)), obs=obs,
                             var=pd.DataFrame(index=pd.Index(genes)))
        ad.obsm["spatial"] = df[["x", "y"]].to_numpy(float)
        ad.write_h5ad(out / "st" / f"{hid}.h5ad")
        del ad
        gc.collect()  # no AnnData/h5py garbage left for a forked worker to collect (it segfaults there)
        _link(src / "slides" / f"{sid}.tiff", out / "wsis" / f"{hid}.tif")
        (out / "metadata" / f"{hid}.json").write_text(json.dumps({
            "id": hid, "dataset_title": "hefeat synthetic cohort", "st_technology": "Visium",
            "species": "Homo sapiens", "organ": "Breast",
            "pixel_size_um_embedded": mpp, "pixel_size_um_estimated": mpp, "magnification": "20x",
            "spot_diameter": VISIUM_SPOT_UM, "inter_spot_dist": VISIUM_PITCH_UM,
            "spots_under_tissue": len(df), "nb_genes": len(genes),
            "patient": truth["slides"][sid]["patient_id"]}, indent=1))
        t["samples"][hid] = {"source_slide": sid, "mpp": mpp, "spots": len(df), "spot_diameter_um": VISIUM_SPOT_UM,
                             "patient": f"hefeat synthetic cohort / {truth['slides'][sid]['patient_id']}",
                             "barcodes": dict(zip(df["barcode"], df["spot_id"], strict=True))}
        frames.append(df.drop(columns=["in_tissue", "x_um", "y_um"]).assign(slide_id=sid, sample=hid))
    pd.concat(frames, ignore_index=True).to_parquet(out / "truth_hest_spots.parquet", index=False)
    (out / "truth_hest.json").write_text(json.dumps(t, indent=1))
    return t


def st_layout(src: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0, st_pitch_um: float = 200.0) -> dict:
    """The original ST format for the spot slides: out/<slide>/<slide>_stdata.tsv (XxY ids, 1-based array
    coordinates), out/<slide>/spots_<slide>.tsv (spot detector table) and out/<slide>/HE_<slide>.tif.
    Spots are kept on the ST array's 200 µm pitch (every other synthetic spot at 100 µm spacing)."""
    src, out = Path(src), Path(out)
    truth, spots, genes = _spot_slides(src)
    t = {"layout": "st", "source": str(src), "samples": {}}
    for sid, df in spots.groupby("slide_id", sort=True):
        d = out / sid
        d.mkdir(parents=True, exist_ok=True)
        j, i = _grid(df["spot_id"])
        pitch = max(1, int(round(st_pitch_um / truth["spots"]["spacing_um"])))  # ST spots sit 200 µm apart
        keep = (i % pitch == 0) & (j % pitch == 0)
        df, i, j = df[keep], i[keep] // pitch, j[keep] // pitch
        ids = [f"{a + 1}x{b + 1}" for a, b in zip(i, j, strict=True)]
        c = df[genes].copy()
        c.index = pd.Index(ids)
        c.to_csv(d / f"{sid}_stdata.tsv", sep="\t")
        table = pd.DataFrame({"x": i + 1, "y": j + 1, "new_x": (i + 1).astype(float), "new_y": (j + 1).astype(float),
                              "pixel_x": df["x"].to_numpy().round(2), "pixel_y": df["y"].to_numpy().round(2), "selected": 1})
        table.to_csv(d / f"spots_{sid}.tsv", sep="\t", index=False)
        _link(src / "slides" / f"{sid}.tiff", d / f"HE_{sid}.tif")
        t["samples"][sid] = {"counts": str(d / f"{sid}_stdata.tsv"), "spots_table": str(d / f"spots_{sid}.tsv"),
                             "image": str(d / f"HE_{sid}.tif"), "mpp": truth["slides"][sid]["mpp"], "spots": len(df),
                             "spot_diameter_um": truth["spots"]["diameter_um"], "ids": dict(zip(ids, df["spot_id"], strict=True))}
    (out / "truth_st.json").write_text(json.dumps(t, indent=1))
    return t
