"""`hefeat status`: the store at a glance."""

from __future__ import annotations

from hefeat.store.catalog import Store


def store_status(store: Store) -> dict:
    """Counts of slides, tilings, extractions, models and per-stage failures (plus a text rendering)."""
    q = store.sql
    slides = q("SELECT count(*) n, count(DISTINCT patient_id) p, count(DISTINCT site) s FROM slides").iloc[0]
    stages = q("SELECT stage, id, state, count(*) n, sum(n_tiles) tiles FROM status GROUP BY ALL ORDER BY ALL")
    tilings = q("SELECT tiling_id, mpp, size, background, spots FROM tilings ORDER BY created")
    exts = q("SELECT * FROM extractions")
    models = q("SELECT * FROM models")
    expr = q("SELECT dataset, count(DISTINCT sample_id) samples, count(DISTINCT gene) genes FROM expression GROUP BY 1")
    spots = q("SELECT count(*) n, count(DISTINCT slide_id) slides FROM spots").iloc[0]
    failed = q("SELECT stage, id, slide_id, reason FROM status WHERE state = 'failed' ORDER BY ALL")
    per_id = {}
    for r in stages.itertuples():
        d = per_id.setdefault(f"{r.stage}:{r.id}", {"ok": 0, "skipped": 0, "failed": 0, "tiles": 0})
        d[r.state] = int(r.n)
        d["tiles"] += int(r.tiles or 0)
    out = {
        "store": str(store.root),
        "slides": int(slides.n), "patients": int(slides.p), "sites": int(slides.s),
        "tilings": tilings.to_dict("records"),
        "extractions": [{k: v for k, v in r.items() if k in ("extraction_id", "tiling_id", "encoder", "dim", "layer", "precision")}
                        for r in exts.to_dict("records")],
        "models": [{k: v for k, v in r.items() if k in ("model_id", "kind", "extraction_id")} for r in models.to_dict("records")],
        "expression": expr.to_dict("records"), "spots": int(spots.n), "spot_slides": int(spots.slides),
        "stages": per_id, "failed": failed.to_dict("records"),
    }
    lines = [f"Store {store.root}: {out['slides']} slides from {out['patients']} patients at {out['sites']} sites; "
             f"{out['spots']} spots on {out['spot_slides']} slides."]
    for e in out["expression"]:
        lines.append(f"  expression '{e['dataset']}': {e['samples']} samples x {e['genes']} genes")
    for t in out["tilings"]:
        d = per_id.get(f"tiling:{t['tiling_id']}", {})
        lines.append(f"  tiling {t['tiling_id']} ({t['size']} px at {t['mpp']} µm/px, {t['background']}{', spots' if t['spots'] else ''}): "
                     f"{d.get('ok', 0)} ok, {d.get('skipped', 0)} skipped, {d.get('failed', 0)} failed, {d.get('tiles', 0)} tiles")
    for e in out["extractions"]:
        d = per_id.get(f"extraction:{e['extraction_id']}", {})
        lines.append(f"  extraction {e['extraction_id']} ({e.get('encoder')}, {e.get('dim')}-d, tiling {e.get('tiling_id')}): "
                     f"{d.get('ok', 0)} ok, {d.get('failed', 0)} failed, {d.get('tiles', 0)} tiles")
    for m in out["models"]:
        lines.append(f"  model {m['model_id']} ({m.get('kind')})")
    for f in out["failed"][:10]:
        lines.append(f"  FAILED {f['stage']} {f['id']} {f['slide_id']}: {f['reason']}")
    out["text"] = "\n".join(lines)
    return out
