"""`hefeat status`: the store at a glance (one bound catalog, one attach for all its queries)."""

from __future__ import annotations

from hefeat.store import layout
from hefeat.store.catalog import Store
from hefeat.store.locks import lock_state


def _busy(store: Store, lock_names: list[str]) -> list[dict]:
    """Slides claimed by a worker right now (or by one that died: stale)."""
    out = []
    for name in lock_names:
        folder, _, fname = name.partition("/")
        sk = layout.parse_status_dir(folder)
        st = lock_state(store.root / layout.STATUS / folder / fname)
        if sk is None or st is None:
            continue
        out.append({"stage": sk[0], "id": sk[1], "slide_id": fname[: -len(layout.LOCK_SUFFIX)],
                    "host": st["host"], "pid": st["pid"], "age_s": st["age_s"], "stale": st["stale"], "why": st["why"]})
    return out


def store_status(store: Store) -> dict:
    """Counts of slides, tilings, extractions, models; per-stage ok/skipped/failed/busy; problems (plus text)."""
    from hefeat.formats import tcga

    with store.session():
        q = store.sql
        slides = q("SELECT count(*) n, count(DISTINCT patient_id) p, count(DISTINCT site) s FROM slides").iloc[0]
        slide_paths = q("SELECT slide_id, path FROM slides")
        tcga_slides = tcga.slide_table(slide_paths)
        matched: set[str] = set()  # slides with an expression sample or a clinical row (TCGA stores only)
        if not tcga_slides.empty:
            matched = set(q("SELECT DISTINCT slide_id FROM samples")["slide_id"])
            if "clinical" in set(q("SHOW TABLES")["name"]):
                clin = q("SELECT * FROM clinical LIMIT 0").columns
                key = "slide_id" if "slide_id" in clin else "patient_id"
                matched |= set(q(f"SELECT DISTINCT s.slide_id FROM slides s JOIN clinical c USING ({key})")["slide_id"])
        stages = q("SELECT stage, id, state, count(*) n, sum(n_tiles) tiles FROM status GROUP BY ALL ORDER BY ALL")
        tilings = q("SELECT tiling_id, mpp, size, background, spots FROM tilings ORDER BY created")
        exts = q("SELECT * FROM extractions")
        models = q("SELECT * FROM models")
        expr = q("SELECT dataset, n_samples AS samples, n_genes AS genes, n_missing, fingerprint FROM expression_datasets ORDER BY 1")
        spots = q("SELECT count(*) n, count(DISTINCT slide_id) slides FROM spots").iloc[0]
        failed = q("SELECT stage, id, slide_id, reason_code, reason FROM status WHERE state = 'failed' ORDER BY ALL")
        snap = store.status_snapshot()
        broken = list(store.broken)
    busy = _busy(store, snap.locks)
    per_id: dict[str, dict] = {}
    for r in stages.itertuples():
        d = per_id.setdefault(f"{r.stage}:{r.id}", {"ok": 0, "skipped": 0, "failed": 0, "busy": 0, "tiles": 0})
        d[r.state] = int(r.n)
        d["tiles"] += int(r.tiles or 0)
    for b in busy:
        d = per_id.setdefault(f"{b['stage']}:{b['id']}", {"ok": 0, "skipped": 0, "failed": 0, "busy": 0, "tiles": 0})
        d["busy"] += 1
    out = {
        "store": str(store.root),
        "slides": int(slides.n), "patients": int(slides.p), "sites": int(slides.s),
        "tilings": tilings.to_dict("records"),
        "extractions": [{k: v for k, v in r.items() if k in ("extraction_id", "tiling_id", "encoder", "dim", "layer", "precision")}
                        for r in exts.to_dict("records")],
        "models": [{k: v for k, v in r.items() if k in ("model_id", "kind", "extraction_id")} for r in models.to_dict("records")],
        "expression": expr.to_dict("records"), "spots": int(spots.n), "spot_slides": int(spots.slides),
        "stages": per_id, "failed": failed.to_dict("records"), "busy": busy, "malformed": snap.malformed,
        "broken": broken,
    }
    lines = [f"Store {store.root}: {out['slides']} slides from {out['patients']} patients at {out['sites']} sites; "
             f"{out['spots']} spots on {out['spot_slides']} slides."]
    out["tcga"] = tcga.summarize(tcga_slides, matched)
    if out["tcga"]:
        lines += ["  " + t for t in (tcga.summary_text(out["tcga"]), tcga.excluded_text(out["tcga"])) if t]
    for e in out["expression"]:
        lines.append(f"  expression '{e['dataset']}': {e['samples']} samples x {e['genes']} genes"
                     + (f" ({e['n_missing']} missing values)" if e["n_missing"] else ""))

    def counts(d: dict) -> str:
        busy_s = f", {d['busy']} busy" if d.get("busy") else ""
        return f"{d.get('ok', 0)} ok, {d.get('skipped', 0)} skipped, {d.get('failed', 0)} failed{busy_s}, {d.get('tiles', 0)} tiles"

    for t in out["tilings"]:
        d = per_id.get(f"tiling:{t['tiling_id']}", {})
        lines.append(f"  tiling {t['tiling_id']} ({t['size']} px at {t['mpp']} µm/px, {t['background']}"
                     f"{', spots' if t['spots'] else ''}): {counts(d)}")
    for e in out["extractions"]:
        d = per_id.get(f"extraction:{e['extraction_id']}", {})
        lines.append(f"  extraction {e['extraction_id']} ({e.get('encoder')}, {e.get('dim')}-d, tiling {e.get('tiling_id')}): {counts(d)}")
    for m in out["models"]:
        lines.append(f"  model {m['model_id']} ({m.get('kind')})")
    for f in out["failed"][:10]:
        lines.append(f"  FAILED {f['stage']} {f['id']} {f['slide_id']} [{f['reason_code']}]: {f['reason']}")
    if len(out["failed"]) > 10:
        lines.append(f"  ... {len(out['failed'])} failed slides in all (hefeat sql \"SELECT * FROM status WHERE state = 'failed'\")")
    for b in busy[:10]:
        lines.append(f"  BUSY {b['stage']} {b['id']} {b['slide_id']}: {'stale, ' if b['stale'] else ''}{b['why']} "
                     f"(claimed by {b['host']}:{b['pid']}, {b['age_s']:.0f} s ago)")
    for m in snap.malformed[:10]:
        lines.append(f"  MALFORMED {m['file']}: {m['error']} (ignored; that slide counts as not done)")
    for b in broken[:10]:
        lines.append(f"  BROKEN {b}: the file does not match its commit record (left out; the next run redoes it)")
    out["text"] = "\n".join(lines)
    return out
