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

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

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

    out/slides/<file id>/<barcode>.<uuid>.tiff + out/gdc_manifest.txt; out/gdc_rna/<file id>/<uuid>.rna_seq.
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
    writers: dict = {}
    if layout not in writers:
        raise ValueError(f"unknown layout {layout!r}")
    t = writers[layout](cohort, out, seed=seed)
    return {"out": str(out), "samples": len(t["samples"]),
            "text": f"{layout} layout in {out}: {len(t['samples'])} samples ({', '.join(list(t['samples'])[:4])}); "
                    f"truth_{layout}.json lists them."}
