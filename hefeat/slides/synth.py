"""A synthetic H&E cohort with known ground truth: slides, expression, spots and clinical data.

Tissue is rendered in physical units (µm), so the same slide seed written at 0.25 and 0.5 µm/px
shows the same tissue. Expression is a stated function of tissue composition (truth.json).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from hefeat.formats.spot_model import draw_spots
from hefeat.slides.synth_morphology import (
    MORPHOLOGY,
    MORPHOLOGY_GENES,
    MORPHOLOGY_MU,
    gland_field,
    gland_nuclei,
    morphology_of,
)

CLASSES = ("tumour", "stroma", "lymphocytes", "necrosis")
CLASS_MPP = 4.0  # µm per pixel of the class map
PAM50_PROLIFERATION = (
    "BIRC5", "CCNB1", "CDC20", "NUF2", "CEP55", "NDC80", "MKI67", "PTTG1", "RRM2", "TYMS", "UBE2C",
)
# Class colours (cytoplasm / matrix) and nucleus colours, RGB.
_BASE = np.array([[196, 138, 196], [238, 166, 196], [222, 170, 214], [244, 218, 228]], np.float32)
_NUC = np.array([[72, 38, 112], [96, 52, 128], [48, 28, 98], [120, 80, 140]], np.float32)
_BACKGROUND = np.array([243, 243, 246], np.float32)
# Nuclei per class: (per 10,000 µm², radius µm (y, x), pleomorphism)
_NUCLEI = {
    0: (48.0, (4.2, 4.2), 0.45),
    1: (5.0, (1.6, 5.0), 0.15),
    2: (140.0, (2.4, 2.4), 0.08),
    3: (4.0, (1.5, 1.5), 0.5),
}


@dataclass(frozen=True)
class SlideSpec:
    """What one synthetic slide is: its id, patient, site, seed, resolution and physical size."""

    slide_id: str
    patient_id: str
    site: str
    seed: int
    mpp: float
    width_um: float
    height_um: float
    has_spots: bool


# ----------------------------------------------------------------------------------------------
# Layout: tissue islands and class regions, in physical space
# ----------------------------------------------------------------------------------------------
def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-8)


def slide_layout(spec: SlideSpec) -> tuple[np.ndarray, np.ndarray, dict]:
    """Class map (h, w) uint8 at CLASS_MPP (255 = background), its smooth fields, and slide truth."""
    rng = np.random.default_rng(spec.seed)
    h, w = int(spec.height_um / CLASS_MPP), int(spec.width_um / CLASS_MPP)
    coverage = rng.uniform(0.35, 0.6)
    island = _smooth_field(rng, (h, w), rng.uniform(20, 35))
    yy, xx = np.mgrid[0:h, 0:w]
    centre = -(((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2)
    tissue_field = island + 1.5 * centre
    thr = np.quantile(tissue_field, 1 - coverage)
    weights = rng.dirichlet([1.6, 1.6, 1.0, 0.6])
    patch = rng.uniform(8, 30)  # class patch scale (px): small = fine-grained, heterogeneous
    fields = np.stack([_smooth_field(rng, (h, w), patch) for _ in CLASSES])
    fields += 2.5 * np.log(weights + 1e-3)[:, None, None]
    fields = np.concatenate([fields, (tissue_field - thr)[None] * 3.0])
    cls = _classes_from_fields(fields)
    tissue = cls != 255
    comp = np.array([(cls[tissue] == k).mean() if tissue.any() else 0.0 for k in range(len(CLASSES))])
    gfield, _ = gland_field(spec.seed, (h, w))
    gland = gfield > 0
    return cls, fields, {"composition": comp, "gland_field": gfield, "gland": gland,
                         "morphology": morphology_of(cls, gland)}


def _classes_from_fields(fields: np.ndarray) -> np.ndarray:
    cls = fields[:-1].argmax(0).astype(np.uint8)
    cls[fields[-1] <= 0] = 255
    return cls


def _classes_resized(fields: np.ndarray, H: int, W: int) -> np.ndarray:
    """_classes_from_fields of the fields resized to (H, W), one field at a time (no (k, H, W) stack to argmax:
    a later field takes a pixel only where strictly greater, so ties go to the first, as argmax does)."""
    best = _resize_f(fields[0], H, W).copy()
    cls = np.zeros((H, W), np.uint8)
    for k in range(1, len(fields) - 1):
        f = _resize_f(fields[k], H, W)
        np.copyto(cls, np.uint8(k), where=f > best)
        np.maximum(best, f, out=best)
    cls[_resize_f(fields[-1], H, W) <= 0] = 255
    return cls


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
def _resize_f(a: np.ndarray, H: int, W: int) -> np.ndarray:
    """Bilinear resize of a float32 field to (H, W) (PIL, fast)."""
    from PIL import Image

    return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((W, H), Image.Resampling.BILINEAR))


def _sprite(ry: float, rx: float) -> np.ndarray:
    """A soft-edged ellipse (alpha in [0, 1]) with radii ry, rx pixels."""
    hy, hx = int(np.ceil(ry + 1.5)), int(np.ceil(rx + 1.5))
    yy, xx = np.mgrid[-hy:hy + 1, -hx:hx + 1].astype(np.float32)
    d = np.sqrt((yy / max(ry, 0.5)) ** 2 + (xx / max(rx, 0.5)) ** 2)
    return np.clip((1.0 - d) * max(ry, rx) + 0.5, 0, 1)


def render_slide(spec: SlideSpec, fields: np.ndarray | None = None, gland: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 image (H, W, 3) of the slide at spec.mpp µm/px (fields, gland: slide_layout's, if already made).

    `gland` is the gland field on the class map (> 0 = glandular where tumour; synth_morphology.py).
    """
    if fields is None or gland is None:
        _, fields, info = slide_layout(spec)
        gland = info["gland_field"]
    H, W = int(round(spec.height_um / spec.mpp)), int(round(spec.width_um / spec.mpp))
    cls = _classes_resized(fields, H, W)
    glandular = (cls == 0) & (_resize_f(gland, H, W) > 0)
    tissue = cls != 255
    cls_t = np.where(tissue, cls, 0)
    tex_rng = np.random.default_rng(spec.seed + 1)
    horizontal = tex_rng.random() < 0.5

    # Matrix colour with fibre texture (anisotropic noise made at 1 µm/px, stronger in stroma).
    fh, fw = int(spec.height_um), int(spec.width_um)
    fib = ndi.gaussian_filter(tex_rng.standard_normal((fh, fw)).astype(np.float32), (0.7, 6.0) if horizontal else (6.0, 0.7))
    fib = _resize_f(fib / (fib.std() + 1e-8), H, W)
    amp = np.array([0.04, 0.08, 0.03, 0.03], np.float32)[cls_t]
    img = _BASE[cls_t] * (1.0 + amp * fib)[..., None]

    # Necrosis/fat: pale vacuoles from a smooth field at 2 µm/px.
    vac = ndi.gaussian_filter(tex_rng.standard_normal((fh // 2, fw // 2)).astype(np.float32), 3.0)
    vac = _resize_f(vac / (vac.std() + 1e-8), H, W)
    fat = (cls == 3) & (vac > 1.0)
    img[fat] = 0.55 * img[fat] + 0.45 * 250

    # Nuclei: soft ellipses stamped at physical positions (same positions at any mpp).
    alpha = np.zeros((H, W), np.float32)
    colour = np.zeros((H, W, 3), np.float32)
    area_um2 = spec.width_um * spec.height_um
    pos_rng = np.random.default_rng(spec.seed + 2)

    def stamp(k: int, px: np.ndarray, py: np.ndarray, scale: np.ndarray, shade: np.ndarray, where: np.ndarray) -> None:
        ry, rx = _NUCLEI[k][1]
        ix = np.clip((px / spec.mpp).astype(int), 0, W - 1)
        iy = np.clip((py / spec.mpp).astype(int), 0, H - 1)
        keep = np.flatnonzero(where[iy, ix])
        cache: dict[int, np.ndarray] = {}
        for j in keep:
            q = int(round(scale[j] * 8))
            spr = cache.get(q)
            if spr is None:
                a, b = ry * q / 8 / spec.mpp, rx * q / 8 / spec.mpp
                spr = cache[q] = _sprite(a, b) if horizontal else _sprite(b, a)
            sh, sw = spr.shape
            y0, x0 = iy[j] - sh // 2, ix[j] - sw // 2
            ya, xa = max(y0, 0), max(x0, 0)
            yb, xb = min(y0 + sh, H), min(x0 + sw, W)
            if ya >= yb or xa >= xb:
                continue
            s_ = spr[ya - y0:yb - y0, xa - x0:xb - x0]
            region = alpha[ya:yb, xa:xb]
            upd = s_ > region
            region[upd] = s_[upd]
            colour[ya:yb, xa:xb][upd] = _NUC[k] * shade[j]

    for k, (density, _radii, pleo) in _NUCLEI.items():
        n = pos_rng.poisson(density * area_um2 / 1e4)
        px = pos_rng.uniform(0, spec.width_um, n)
        py = pos_rng.uniform(0, spec.height_um, n)
        scale = pos_rng.uniform(1 - pleo, 1 + pleo, n)
        shade = pos_rng.uniform(0.8, 1.15, n)
        # Solid tumour keeps the random nuclei; glandular tumour gets the same nuclei on rings instead.
        stamp(k, px, py, scale, shade, (cls == k) & ~glandular if k == 0 else cls == k)
    stamp(0, *gland_nuclei(spec.seed, spec.width_um, spec.height_um), glandular)
    alpha *= tissue
    a = alpha[..., None]
    img *= 1 - a  # img * (1 - a) + colour * a, in place
    colour *= a
    img += colour
    np.copyto(img, _BACKGROUND, where=~tissue[..., None])
    img += tex_rng.normal(0, 3.0, (H, W, 1)).astype(np.float32)
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


def _half(level: np.ndarray) -> np.ndarray:
    """The next pyramid level of a uint8 RGB level: the floored mean of each 2x2 block (odd edges dropped), the
    same as .mean((1, 3)).astype(np.uint8) of the blocks, in integers (no float64 copy of the level)."""
    h2, w2 = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
    q = level[:h2, :w2].reshape(h2 // 2, 2, w2 // 2, 2, 3)
    return ((q[:, 0, :, 0].astype(np.uint16) + q[:, 0, :, 1] + q[:, 1, :, 0] + q[:, 1, :, 1]) >> 2).astype(np.uint8)


def write_pyramid_tiff(path: str | os.PathLike, rgb: np.ndarray, mpp: float, *, min_size: int = 512, quality: int = 90) -> int:
    """Write a tiled pyramidal JPEG TIFF that OpenSlide reads with the given MPP; returns level count."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    levels = 0
    with tifffile.TiffWriter(tmp) as tw:
        level, ds = rgb, 1
        while True:
            res = 1e4 / (mpp * ds)
            tw.write(
                level,
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                subfiletype=1 if levels else 0,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
            levels += 1
            if min(level.shape[:2]) // 2 < min_size:
                break
            level = _half(level)
            ds *= 2
    os.replace(tmp, path)
    return levels


# ----------------------------------------------------------------------------------------------
# Cohort and ground truth
# ----------------------------------------------------------------------------------------------
NAMED_GENES = (*PAM50_PROLIFERATION, "miR-17", "CD3E", "COL1A1", "ESR1", *MORPHOLOGY_GENES)
MIN_GENES = len(NAMED_GENES)


def _gene_names(n_genes: int) -> list[str]:
    if n_genes < MIN_GENES:
        from hefeat.errors import HefeatError

        raise HefeatError(f"A synthetic cohort needs at least {MIN_GENES} genes (its named genes: "
                          f"{', '.join(NAMED_GENES)}), got {n_genes}")
    return list(NAMED_GENES) + [f"GENE{i:04d}" for i in range(n_genes - MIN_GENES)]


def make_truth(n_genes: int, signal_share: float, rng: np.random.Generator) -> dict:
    """Gene model: log2 expression = mu + W · composition + M · morphology + N(0, sigma); W = M = 0 for null genes.

    The morphology genes (synth_morphology.MORPHOLOGY_GENES) follow gland_index only, at a high baseline so
    that every spot panel of the top expressed genes includes them.
    """
    genes = _gene_names(n_genes)
    # signal_share counts the composition genes; the morphology genes come on top, so that the composition
    # genes (and every draw after them: expression noise, clinical) are those of a cohort without morphology.
    n_composition = max(MIN_GENES - len(MORPHOLOGY_GENES), int(round(signal_share * n_genes)))
    n_signal = min(n_genes, n_composition + len(MORPHOLOGY_GENES))
    K = len(CLASSES)
    W = np.zeros((n_genes, K))
    mu = rng.uniform(3, 8, n_genes)
    sigma = rng.uniform(0.25, 0.45, n_genes)
    for g in range(n_signal):
        name = genes[g]
        if name in PAM50_PROLIFERATION:
            W[g, 0] = rng.uniform(2.5, 3.5)  # proliferation follows tumour content
        elif name == "miR-17" or name == "CD3E":
            W[g, 2] = rng.uniform(3.0, 4.0)  # immune
        elif name == "COL1A1":
            W[g, 1] = 3.5
        elif name == "ESR1":
            W[g, 0], W[g, 3] = 2.0, -1.0
        elif name in MORPHOLOGY_GENES:
            continue  # morphology only (below)
        else:
            ks = rng.choice(K, size=rng.integers(1, 3), replace=False)
            W[g, ks] = rng.choice([-1, 1], size=len(ks)) * rng.uniform(1.5, 3.5, len(ks))
    M = np.zeros((n_genes, len(MORPHOLOGY)))
    for name, w in MORPHOLOGY_GENES.items():
        g = genes.index(name)
        M[g, 0] = w
        mu[g] = MORPHOLOGY_MU[name]
    return {
        "classes": list(CLASSES),
        "morphology": list(MORPHOLOGY),
        "genes": genes,
        "signal_genes": genes[:n_signal],
        "null_genes": genes[n_signal:],
        "mu": mu.round(4).tolist(),
        "weights": W.round(4).tolist(),
        "morph_weights": M.round(4).tolist(),
        "morphology_genes": list(MORPHOLOGY_GENES),
        "sigma": sigma.round(4).tolist(),
        "formula": "log2(value + 1) = mu[g] + sum_k weights[g][k] * composition[k] "
                   "+ sum_m morph_weights[g][m] * morphology[m] + N(0, sigma[g])",
        "spot_formula": "counts ~ Poisson(depth * share): null genes 2**mu (fixed); composition genes a fixed pool "
                        "split by 2**(mu + weights . composition); morphology genes a fixed pool, "
                        "2**mu * (1 + a . morphology), a = 0.9 * sign(morph_weights) balanced to a constant sum",
        "proliferation_genes": list(PAM50_PROLIFERATION),
    }


def cohort_specs(n_slides: int, seed: int, *, width_um: float, height_um: float, share_025: float = 1 / 6,
                 spot_share: float = 1 / 2, n_sites: int = 4) -> list[SlideSpec]:
    """Slides, patients (a few with two slides) and sites of a cohort, deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    specs, p = [], 0
    n_025 = max(1, int(round(share_025 * n_slides))) if n_slides >= 4 else 0
    fine = set(rng.choice(n_slides, n_025, replace=False).tolist()) if n_025 else set()
    n_spots = max(2, int(round(spot_share * n_slides))) if n_slides >= 4 else 0
    spotted = set(rng.choice(n_slides, n_spots, replace=False).tolist()) if n_spots else set()
    i = 0
    while i < n_slides:
        p += 1
        n_for_patient = 2 if (rng.random() < 0.15 and i + 1 < n_slides) else 1
        site = f"site{(p - 1) % n_sites + 1}"
        for _ in range(n_for_patient):
            specs.append(SlideSpec(
                slide_id=f"S{i + 1:02d}", patient_id=f"P{p:02d}", site=site,
                seed=int(rng.integers(0, 2**31 - 1)), mpp=0.25 if i in fine else 0.5,
                width_um=width_um, height_um=height_um, has_spots=i in spotted,
            ))
            i += 1
    return specs


def _heterogeneity(comp: np.ndarray) -> float:
    c = comp[comp > 0]
    return float(-(c * np.log(c)).sum() / np.log(len(CLASSES)))


def _spots_for(spec: SlideSpec, cls: np.ndarray, gland: np.ndarray, truth: dict, rng: np.random.Generator,
               spacing_um: float, diameter_um: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The slide's spots on a square grid (hefeat.formats.spot_model draws them): counts and their truth."""
    xs = np.arange(spacing_um, spec.width_um - spacing_um / 2, spacing_um)
    ys = np.arange(spacing_um, spec.height_um - spacing_um / 2, spacing_um)
    grid = [(j, i, x, y) for j, y in enumerate(ys) for i, x in enumerate(xs)]
    xy = np.array([(x, y) for _, _, x, y in grid], float).reshape(-1, 2)
    kept, comp, morph, counts = draw_spots(cls, gland, CLASS_MPP, truth, rng, xy, diameter_um)
    rows = []
    for n, k in enumerate(kept):
        j, i, x, y = grid[k]
        rows.append({"slide_id": spec.slide_id, "spot_id": f"{spec.slide_id}_{j}x{i}",
                     "x": x / spec.mpp, "y": y / spec.mpp,
                     **{f"frac_{c}": comp[n, ci] for ci, c in enumerate(CLASSES)}, **morph[n]})
    truth_df = pd.DataFrame(rows, columns=None if rows else ["slide_id", "spot_id", "x", "y"])
    cnt = pd.DataFrame(counts.astype(np.int32), columns=truth["genes"])
    spots = pd.concat([truth_df[["slide_id", "spot_id", "x", "y"]], cnt], axis=1)
    return spots, truth_df


def _make_one(args) -> dict:
    """One slide, in a worker: layout once, then the image, the class map and (if any) its spots."""
    spec, out, truth, spacing_um, diameter_um, focal_kind = args
    from hefeat.slides.synth_focal import focal_region, hotspot_bulk, paint_focal, paint_hotspot

    cls, fields, info = slide_layout(spec)
    rgb = render_slide(spec, fields, info["gland_field"])
    focal = focal_region(spec.seed, cls, CLASS_MPP)  # the focal slide label (synth_focal.py)
    bulk = None
    if focal_kind == "hotspot":  # every slide carries target objects; a positive's disc holds them densely
        paint_hotspot(rgb, spec.seed, focal, spec.mpp, cls != 255, CLASS_MPP)
        bulk = round(hotspot_bulk(spec.seed), 3)
    elif focal is not None:
        paint_focal(rgb, focal, spec.mpp, cls != 255, CLASS_MPP)
    levels = write_pyramid_tiff(Path(out) / "slides" / f"{spec.slide_id}.tiff", rgb, spec.mpp)
    np.savez_compressed(Path(out) / "truth" / f"{spec.slide_id}.classes.npz", classes=cls, mpp=CLASS_MPP,
                        class_names=np.array(CLASSES), gland=info["gland"])
    spots = None
    if spec.has_spots:
        spots = _spots_for(spec, cls, info["gland"], truth, np.random.default_rng(spec.seed + 3), spacing_um,
                           diameter_um)
    return {"slide_id": spec.slide_id, "levels": levels, "composition": info["composition"].tolist(),
            "morphology": info["morphology"],
            "shape": list(rgb.shape[:2]), "spots": spots, "focal": focal, "focal_bulk": bulk}


def make_cohort(
    out: str | os.PathLike,
    *,
    n_slides: int = 24,
    n_genes: int = 200,
    signal_share: float = 0.3,
    seed: int = 0,
    width_um: float = 1600.0,
    height_um: float = 1200.0,
    spot_spacing_um: float = 100.0,
    spot_diameter_um: float = 100.0,
    workers: int | None = None,
    progress: bool = False,
    focal: str = "lattice",
) -> dict:
    """Write a synthetic cohort under `out`; returns a summary. Deterministic from `seed`.

    `focal`: how the focal slide label is drawn (hefeat.slides.synth_focal): 'lattice' (a disc of fine dot
    lattice) or 'hotspot' (target objects on every slide, dense in a positive's disc).
    """
    from hefeat.slides.synth_focal import FOCAL_KINDS

    if focal not in FOCAL_KINDS:
        raise ValueError(f"focal must be one of {FOCAL_KINDS}, got {focal!r}")
    from tqdm import tqdm

    out = Path(out)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 104729)
    truth = make_truth(n_genes, signal_share, rng)
    specs = cohort_specs(n_slides, seed, width_um=width_um, height_um=height_um)
    workers = workers or min(len(specs), os.cpu_count() or 1)
    jobs = [(s, str(out), truth, spot_spacing_um, spot_diameter_um, focal) for s in specs]
    if workers > 1:
        import gc

        gc.collect()  # forked workers must not inherit uncollected h5py objects: collecting them there segfaults
        # Largest slides first (a 0.25 µm/px slide is 4x the pixels): the last slide handed out is then a small one,
        # not a big one that leaves the other workers idle; results are put back in the cohort's order.
        order = sorted(range(len(specs)), key=lambda i: -specs[i].width_um * specs[i].height_um / specs[i].mpp ** 2)
        with ProcessPoolExecutor(workers) as ex:
            done = list(tqdm(ex.map(_make_one, [jobs[i] for i in order]), total=len(jobs), disable=not progress,
                             desc="slides"))
        results = [None] * len(jobs)
        for i, r in zip(order, done, strict=True):
            results[i] = r
    else:
        results = [_make_one(j) for j in tqdm(jobs, disable=not progress, desc="slides")]
    comp = {r["slide_id"]: np.asarray(r["composition"]) for r in results}
    focal_kind, bulk = focal, {r["slide_id"]: r["focal_bulk"] for r in results}
    focal = {r["slide_id"]: r["focal"] for r in results}
    morph = {r["slide_id"]: r["morphology"] for r in results}

    W, M, mu, sigma = (np.asarray(truth[k]) for k in ("weights", "morph_weights", "mu", "sigma"))
    genes = truth["genes"]
    log2 = np.stack([mu + W @ comp[s.slide_id] + M @ np.array([morph[s.slide_id][m] for m in MORPHOLOGY])
                     + rng.normal(0, sigma) for s in specs])
    expr = pd.DataFrame(np.round(2.0**log2 - 1, 4), columns=genes)
    expr.insert(0, "sample_id", [s.slide_id for s in specs])
    expr.to_parquet(out / "expression.parquet", index=False)

    # Clinical: survival driven by heterogeneity; MSI by immune share; ER by tumour share.
    rows = []
    for s in specs:
        c = comp[s.slide_id]
        het = _heterogeneity(c)
        hazard = 0.02 * np.exp(8.0 * (het - 0.6))
        t = rng.exponential(1 / hazard)
        censor = rng.uniform(36, 120)
        msi = int(c[2] + rng.normal(0, 0.05) > 0.3)
        er = int(c[0] + rng.normal(0, 0.08) > 0.3)
        pam50 = ["LumA", "LumB", "Her2", "Basal"][int(np.argmax([c[1] + 0.2 * er, c[0] * er, c[0] * (1 - er), c[2] + c[3]]))]
        rows.append({
            "slide_id": s.slide_id, "patient_id": s.patient_id, "site": s.site,
            "survival_months": round(float(min(t, censor)), 2), "event": int(t <= censor),
            "msi_status": msi, "er_status": er, "pam50": pam50, "focal_status": int(focal[s.slide_id] is not None),
        })
    pd.DataFrame(rows).to_csv(out / "clinical.csv", index=False)
    pd.DataFrame([{"slide_id": s.slide_id, "patient_id": s.patient_id, "site": s.site, "mpp": s.mpp}
                  for s in specs]).to_csv(out / "manifest.csv", index=False)

    spot_frames = [r["spots"][0] for r in results if r["spots"] is not None]
    spot_truth = [r["spots"][1] for r in results if r["spots"] is not None]
    if spot_frames:
        pd.concat(spot_frames, ignore_index=True).to_parquet(out / "spots.parquet", index=False)
        pd.concat(spot_truth, ignore_index=True).to_parquet(out / "truth" / "spots.parquet", index=False)

    truth["slides"] = {
        s.slide_id: {"patient_id": s.patient_id, "site": s.site, "mpp": s.mpp, "seed": s.seed,
                     "has_spots": s.has_spots, "composition": comp[s.slide_id].round(5).tolist(),
                     "heterogeneity": round(_heterogeneity(comp[s.slide_id]), 5),
                     "morphology": {k: round(v, 5) for k, v in morph[s.slide_id].items()},
                     "levels": next(r["levels"] for r in results if r["slide_id"] == s.slide_id),
                     "focal": int(focal[s.slide_id] is not None), "focal_region": focal[s.slide_id],
                     **({"focal_bulk_per_mm2": bulk[s.slide_id]} if focal_kind == "hotspot" else {})}
        for s in specs
    }
    truth["focal_kind"] = focal_kind
    truth["seed"] = seed
    truth["spots"] = {"spacing_um": spot_spacing_um, "diameter_um": spot_diameter_um}
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return {"out": str(out), "slides": len(specs), "genes": len(genes), "signal_genes": len(truth["signal_genes"]),
            "spots": int(sum(len(f) for f in spot_frames)), "patients": len({s.patient_id for s in specs})}


def blank_slide(path: str | os.PathLike, *, mpp: float = 0.5, size: int = 1024) -> Path:
    """A slide with no tissue at all (white with scanner noise), for the no-tissue path."""
    rng = np.random.default_rng(0)
    rgb = np.clip(rng.normal(244, 2, (size, size, 3)), 0, 255).astype(np.uint8)
    write_pyramid_tiff(path, rgb, mpp)
    return Path(path)
