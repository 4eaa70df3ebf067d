"""TCGA barcodes: patient, sample type and vial, portion, slide type and tissue source site.

Layout as the GDC documents it ("TCGA Barcode", docs.gdc.cancer.gov/Encyclopedia/pages/TCGA_Barcode/,
and the GDC code tables for sample types and tissue source sites):

    TCGA-A1-A0SB-01Z-00-DX1      a slide: project-TSS-participant-{sample type}{vial}-{portion}-{slide}
    TCGA-A1-A0SB-01A-11R-A144-07 an aliquot: ...-{portion}{analyte}-{plate}-{centre}

Patient = the first 12 characters; sample = the first 15 (with the vial: 16). Slide types: DX =
diagnostic (formalin-fixed, paraffin-embedded); TS / BS / MS = top / bottom / middle section of the
frozen tissue block. Sample types 01-09 are tumour, 10-19 normal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

SAMPLE_TYPES = {
    "01": "Primary Solid Tumor", "02": "Recurrent Solid Tumor", "03": "Primary Blood Derived Cancer - Peripheral Blood",
    "04": "Recurrent Blood Derived Cancer - Bone Marrow", "05": "Additional - New Primary", "06": "Metastatic",
    "07": "Additional Metastatic", "08": "Human Tumor Original Cells", "09": "Primary Blood Derived Cancer - Bone Marrow",
    "10": "Blood Derived Normal", "11": "Solid Tissue Normal", "12": "Buccal Cell Normal",
    "13": "EBV Immortalized Normal", "14": "Bone Marrow Normal", "20": "Control Analyte",
    "40": "Recurrent Blood Derived Cancer - Peripheral Blood", "50": "Cell Lines", "60": "Primary Xenograft Tissue",
    "61": "Cell Line Derived Xenograft Tissue",
}
SLIDE_TYPES = {"DX": "FFPE", "TS": "frozen", "BS": "frozen", "MS": "frozen"}
DEFAULT_SAMPLE_TYPES = ("01",)   # primary tumour (the papers' material)
DEFAULT_SLIDE_TYPES = ("DX",)    # diagnostic FFPE slides

_BARCODE = re.compile(
    r"^TCGA-(?P<tss>[A-Z0-9]{2})-(?P<participant>[A-Z0-9]{4})"
    r"(?:-(?P<sample_type>\d{2})(?P<vial>[A-Z])?"
    r"(?:-(?P<portion>\d{2})(?P<analyte>[A-Z])?"
    r"(?:-(?:(?P<slide_type>DX|TS|BS|MS)(?P<slide_index>[0-9A-Z]+)|(?P<plate>[A-Z0-9]{4})(?:-(?P<centre>\d{2}))?))?)?)?"
    r"(?=$|[.\-_ ])",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Barcode:
    """One parsed TCGA barcode (fields beyond the level the barcode reaches are None)."""

    barcode: str
    patient: str
    tss: str
    sample: str | None = None        # TCGA-A1-A0SB-01 (15 characters)
    sample_type: str | None = None   # "01"
    vial: str | None = None
    portion: str | None = None
    analyte: str | None = None
    slide_type: str | None = None    # DX / TS / BS / MS
    slide_index: str | None = None

    @property
    def is_normal(self) -> bool:
        """Whether the sample type is a normal one (10-19)."""
        return self.sample_type is not None and "10" <= self.sample_type <= "19"

    @property
    def preservation(self) -> str | None:
        """FFPE (DX slides) or frozen (TS/BS/MS); None for non-slide barcodes."""
        return SLIDE_TYPES.get(self.slide_type or "")

    @property
    def slide_barcode(self) -> str | None:
        """TCGA-A1-A0SB-01Z-00-DX1 for a slide barcode, else None."""
        if not self.slide_type:
            return None
        return f"{self.sample}{self.vial or ''}-{self.portion}-{self.slide_type}{self.slide_index}"

    def to_dict(self) -> dict:
        """Fields plus the derived ones, for tables."""
        return {**asdict(self), "is_normal": self.is_normal, "preservation": self.preservation,
                "sample_type_name": SAMPLE_TYPES.get(self.sample_type or "")}


def parse(text: str) -> Barcode | None:
    """The TCGA barcode at the start of `text` (a barcode, a file name, an aliquot id), or None."""
    m = _BARCODE.match(str(text).strip())
    if not m:
        return None
    g = {k: (v.upper() if isinstance(v, str) else v) for k, v in m.groupdict().items()}
    patient = f"TCGA-{g['tss']}-{g['participant']}"
    sample = f"{patient}-{g['sample_type']}" if g["sample_type"] else None
    return Barcode(barcode=m.group(0).upper(), patient=patient, tss=g["tss"], sample=sample,
                   sample_type=g["sample_type"], vial=g["vial"], portion=g["portion"], analyte=g["analyte"],
                   slide_type=g["slide_type"], slide_index=g["slide_index"])


def parse_slide_name(path: str | Path) -> Barcode | None:
    """The slide barcode of a file name like TCGA-A1-A0SB-01Z-00-DX1.<uuid>.svs, or None."""
    b = parse(Path(path).name)
    return b if b is not None and b.slide_type else None


def slide_meta(path: str | Path) -> dict:
    """Manifest fields of a barcoded slide file: slide_id, patient_id, site (the TSS code); {} if no barcode."""
    b = parse_slide_name(path)
    if b is None:
        return {}
    return {"slide_id": b.slide_barcode, "patient_id": b.patient, "site": b.tss}


def slide_table(slides: pd.DataFrame) -> pd.DataFrame:
    """Barcode fields of catalogued slides (by file name, then slide_id); rows without a barcode are left out.

    Columns: slide_id, patient, tss, sample, sample_type, vial, portion, slide_type, preservation, is_normal.
    """
    rows = []
    for sid, path in zip(slides["slide_id"], slides.get("path", slides["slide_id"]), strict=True):
        b = parse_slide_name(str(path)) or parse_slide_name(str(sid))
        if b is not None:
            rows.append({"slide_id": sid, **b.to_dict()})
    cols = ["slide_id", *Barcode.__dataclass_fields__, "is_normal", "preservation", "sample_type_name"]
    return pd.DataFrame(rows, columns=cols)


def summarize(table: pd.DataFrame, matched: Iterable[str] | None = None) -> dict:
    """Counts of a slide_table: patients, slides per patient, FFPE vs frozen, sample types, sites, and the
    slides the default matching leaves out (frozen, normal, other sample types; `matched`: slide ids that
    have expression or clinical rows, to count those of them matched anyway)."""
    if table.empty:
        return {}
    per = table.groupby("patient").size()
    out = {
        "patients": int(per.size), "slides": len(table),
        "slides_per_patient": {int(k): int(v) for k, v in per.value_counts().sort_index().items()},
        "preservation": {str(k): int(v) for k, v in table["preservation"].value_counts().sort_index().items()},
        "sample_types": {str(k): int(v) for k, v in table["sample_type"].value_counts().sort_index().items()},
        "sites": sorted(table["tss"].unique().tolist()),
    }
    off = table[~(table["slide_type"].isin(DEFAULT_SLIDE_TYPES) & table["sample_type"].isin(DEFAULT_SAMPLE_TYPES))]
    if len(off):
        off = off.sort_values("slide_id")
        normal = off["is_normal"].astype(bool)
        kind = off["preservation"].fillna("unknown") + " " + off["sample_type"].where(
            ~normal, "normal").where(normal | ~off["sample_type"].isin(DEFAULT_SAMPLE_TYPES), "tumour").map(
            lambda t: t if t in ("normal", "tumour") else f"type {t}")
        out["outside_default_matching"] = {
            "slides": len(off), "frozen": int((off["preservation"] == "frozen").sum()), "normal": int(normal.sum()),
            "other_sample_types": int((~normal & ~off["sample_type"].isin(DEFAULT_SAMPLE_TYPES)).sum()),
            "kinds": {str(k): int(v) for k, v in kind.value_counts().sort_index().items()},
            "examples": off["slide_id"].head(5).tolist(),
            **({"matched": int(off["slide_id"].isin(set(matched)).sum())} if matched is not None else {})}
    return out


def summary_text(s: dict) -> str:
    """One line from `summarize`."""
    if not s:
        return ""
    per = ", ".join(f"{v} with {k}" for k, v in s["slides_per_patient"].items())
    pres = ", ".join(f"{v} {k}" for k, v in s["preservation"].items())
    types = ", ".join(f"{v} of type {k} ({SAMPLE_TYPES.get(k, '?')})" for k, v in s["sample_types"].items())
    return (f"TCGA slides: {s['slides']} from {s['patients']} patients (slides per patient: {per}); {pres}; "
            f"{types}; {len(s['sites'])} tissue source sites ({', '.join(s['sites'][:12])}"
            f"{' …' if len(s['sites']) > 12 else ''})")


def excluded_text(s: dict) -> str | None:
    """One line from `summarize` on the slides the default matching leaves out (None if none)."""
    off = s.get("outside_default_matching")
    if off:
        kinds = ", ".join(f"{v} {k}" for k, v in off["kinds"].items())
        ex = ", ".join(off["examples"]) + (" …" if off["slides"] > len(off["examples"]) else "")
        if "matched" not in off:
            fate = ("ingest expression / clinical match them to no sample or clinical row (--sample-types / "
                    "--slide-types to include them), so fits leave them out; ingest slides --diagnostic-only "
                    "keeps frozen ones out of the store")
        elif off["matched"]:
            fate = f"{off['matched']} of them have expression or clinical rows (matched with wider --sample-types / --slide-types)"
        else:
            fate = "none has an expression sample or clinical row, so fits leave them out"
        return (f"Excluded by default: {off['slides']} slides ({kinds}) are not primary-tumour (01) diagnostic (DX) "
                f"slides: {ex}; {fate}")
    return None


def looks_like_barcodes(ids: Iterable[str]) -> bool:
    """Whether every id is a TCGA barcode (patient level or finer)."""
    ids = list(ids)
    return bool(ids) and all(parse(i) is not None for i in ids)


@dataclass
class SampleMatch:
    """Samples matched to slides by barcode, and everything left out, with the reason."""

    mapping: pd.DataFrame                 # sample_id, slide_id, patient_id
    unmatched_samples: list[str]          # of an allowed sample type, but no slide of that sample
    other_type_samples: dict[str, list[str]]   # sample type -> samples kept apart (e.g. "11": normals)
    slides_without_sample: list[str]      # allowed slides no sample points at
    slides_left_out: dict[str, list[str]]      # reason -> slides not eligible (frozen, normal, ...)

    def notes(self) -> list[str]:
        """Report lines: what was kept apart and why."""
        out = []
        for t, ids in sorted(self.other_type_samples.items()):
            name = SAMPLE_TYPES.get(t, "patient-level" if t == "--" else "?")
            out.append(f"{len(ids)} samples of type {t} ({name}) kept apart: {', '.join(ids[:5])}"
                       f"{' …' if len(ids) > 5 else ''} (--sample-types to include them)")
        for why, ids in sorted(self.slides_left_out.items()):
            out.append(f"{len(ids)} {why} slides not matched: {', '.join(ids[:5])}{' …' if len(ids) > 5 else ''}")
        if self.slides_without_sample:
            ids = self.slides_without_sample
            out.append(f"{len(ids)} eligible slides have no sample: {', '.join(ids[:5])}{' …' if len(ids) > 5 else ''}")
        return out


def match_samples(samples: list[str], slides: pd.DataFrame, *, sample_types: Iterable[str] = DEFAULT_SAMPLE_TYPES,
                  slide_types: Iterable[str] = DEFAULT_SLIDE_TYPES) -> SampleMatch:
    """Match sample barcodes (aliquot, sample or patient level) to catalogued slides of the same sample.

    A sample-level barcode (TCGA-A1-A0SB-01A...) matches the slides of that sample (same patient and
    sample type, any vial) whose slide type is in `slide_types`; its sample type must be in
    `sample_types` (default primary tumour 01: normals 11 are kept apart, never matched to tumour
    slides). A patient-level barcode (12 characters) matches the patient's eligible slides.
    """
    sample_types, slide_types = {str(t).zfill(2) for t in sample_types}, {t.upper() for t in slide_types}
    tab = slide_table(slides)
    ok = tab["slide_type"].isin(slide_types) & tab["sample_type"].isin(sample_types)
    left_out: dict[str, list[str]] = {}
    for _, r in tab[~ok].iterrows():
        why = []
        if r["sample_type"] not in sample_types:
            why.append(f"sample type {r['sample_type']}")
        if r["slide_type"] not in slide_types:
            why.append(f"{r['preservation']} ({r['slide_type']})")
        left_out.setdefault(" / ".join(why), []).append(r["slide_id"])
    elig = tab[ok]
    by_sample = elig.groupby("sample")["slide_id"].apply(list).to_dict()
    by_patient = elig.groupby("patient")["slide_id"].apply(list).to_dict()
    rows, unmatched, other = [], [], {}
    for s in samples:
        b = parse(s)
        if b is None:
            unmatched.append(s)
            continue
        if b.sample_type is not None and b.sample_type not in sample_types:
            other.setdefault(b.sample_type, []).append(s)
            continue
        hits = by_sample.get(b.sample, []) if b.sample else by_patient.get(b.patient, [])
        if not hits:
            unmatched.append(s)
        rows += [{"sample_id": s, "slide_id": h, "patient_id": b.patient} for h in hits]
    mapping = pd.DataFrame(rows, columns=["sample_id", "slide_id", "patient_id"])
    without = sorted(set(elig["slide_id"]) - set(mapping["slide_id"]))
    return SampleMatch(mapping, sorted(unmatched), other, without, left_out)
