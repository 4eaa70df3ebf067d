"""Per-tile values to colour by or overlay, resolved on ONE tiling: QC columns, slide and clinical
columns, any model's predictions, UMAP clusters, or a SQL query.

A value is named by a spec string:
  `sharpness`, `tiles.sharpness`          a column of the tiling's tiles (QC, row, col)
  `site`, `slides.site`                   a column of the slides table
  `clinical.grade` (or a bare name)       a clinical column (slide- or patient-keyed)
  `model:<model_id>:<column>`             a model's per-tile prediction (its extraction's tiling)
  `umap:<umap_id>:cluster`                the k-means cluster stored with a UMAP
  `SELECT ...`                            SQL returning tile_id, one value column and slide_id
                                          (and tiling_id when the store has several tilings)
Tile identity is (tiling_id, slide_id, tile_id): values are only ever joined on the tiling asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store import layout
from hefeat.store.catalog import Store

ID_COLS = ("model_id", "tiling_id", "slide_id", "tile_id", "spot_id", "x", "y", "size0", "umap_id", "extraction_id")
QC_UNITS = {
    "tissue_frac": "share of the tile inside the tissue mask, 0–1",
    "sharpness": "variance of the Laplacian, grey levels²",
    "mean_r": "mean red, 0–255",
    "mean_g": "mean green, 0–255",
    "mean_b": "mean blue, 0–255",
    "background_frac": "share of background pixels, 0–1",
    "density": "share of dark (tissue) pixels, 0–1",
    "row": "grid row",
    "col": "grid column",
}
SLIDE_COLUMNS = {"patient_id": "", "site": "", "vendor": "", "mpp_x": "µm/px", "objective_power": "×"}
_SPEC = re.compile(r"^(?:(tiles|slides|clinical)\.)?([A-Za-z_][A-Za-z0-9_\-]*)$")
_MODEL = re.compile(r"^model:([A-Za-z0-9][A-Za-z0-9._-]*):(.+)$")
_UMAP = re.compile(r"^umap:([A-Za-z0-9][A-Za-z0-9._-]*):cluster$")


@dataclass(frozen=True)
class Value:
    """A resolved value: where it comes from, what to call it and its units."""

    spec: str
    source: str  # tiles | slides | clinical | model | umap | sql
    column: str
    label: str
    units: str = ""
    model_id: str | None = None
    umap_id: str | None = None

    @property
    def title(self) -> str:
        """Label with units, for colour bars and legends."""
        return f"{self.label} ({self.units})" if self.units else self.label


def is_sql(spec: str) -> bool:
    """Whether a spec is a SQL query rather than a column name."""
    return bool(re.match(r"^\s*(select|with|from)\b", spec or "", re.I))


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _columns(store: Store, view: str) -> list[str]:
    return [c for c in store.sql(f"SELECT * FROM {view} LIMIT 0").columns]


def _tables(store: Store) -> set[str]:
    return set(store.sql("SELECT table_name FROM information_schema.tables")["table_name"])


def clinical_columns(store: Store) -> list[str]:
    """Columns of the clinical table other than its key."""
    if "clinical" not in _tables(store):
        return []
    return [c for c in _columns(store, "clinical") if c not in ("slide_id", "patient_id")]


def models_on_tiling(store: Store, tiling_id: str) -> pd.DataFrame:
    """model_id, kind, extraction_id of models whose per-tile predictions live on `tiling_id`."""
    m = store.sql("SELECT m.model_id, m.kind, m.extraction_id FROM models m JOIN extractions e "
                  "ON m.extraction_id = e.extraction_id WHERE e.tiling_id = ? ORDER BY m.created", [tiling_id])
    keep = pd.Series([layout.predictions_dir(store.root, mid).exists() for mid in m["model_id"]], index=m.index,
                     dtype=bool)  # a Series, so that no model at all still gives the (empty) columns
    return m[keep].reset_index(drop=True)


def _prediction_columns(store: Store, mid: str) -> list[str]:
    import pyarrow.parquet as pq

    sids = layout.predicted_slides(store.root, mid)
    if not sids:
        return []
    names = pq.read_schema(store.predictions_path(mid, sids[0])).names
    return [c for c in names if c not in ID_COLS and c not in ("row", "col")]


def model_units(meta: dict, column: str) -> str:
    """Units of a model's per-tile output column, as its method registered them (hefeat.learn.registry)."""
    from hefeat.learn.registry import output_units

    return output_units(meta, column)


def value_options(store: Store, tiling_id: str, *, umap_id: str | None = None) -> list[dict]:
    """Every value that can colour tiles of `tiling_id`: spec, source, label with units."""
    from hefeat.learn.models import load_model

    out = []
    tile_cols = [c for c in _columns(store, "tiles") if c not in ID_COLS]
    for c in tile_cols:
        out.append({"spec": c, "source": "tiles", "label": c, "units": QC_UNITS.get(c, "")})
    for c in _columns(store, "slides"):
        if c in SLIDE_COLUMNS:
            out.append({"spec": f"slides.{c}", "source": "slides", "label": c, "units": SLIDE_COLUMNS[c]})
    for c in clinical_columns(store):
        out.append({"spec": f"clinical.{c}", "source": "clinical", "label": c, "units": ""})
    for r in models_on_tiling(store, tiling_id).itertuples():
        meta = load_model(store, r.model_id)
        for c in _prediction_columns(store, r.model_id):
            out.append({"spec": f"model:{r.model_id}:{c}", "source": "model", "label": f"{c} — {r.kind} model {r.model_id}",
                        "units": model_units(meta, c), "model_id": r.model_id})
    if umap_id:
        out.append({"spec": f"umap:{umap_id}:cluster", "source": "umap", "label": "k-means cluster of the embedding",
                    "units": "cluster id"})
    return out


def parse(store: Store, spec: str, tiling_id: str) -> Value:
    """Validate a (non-SQL) spec against what the store has for this tiling; clear error otherwise."""
    from hefeat.learn.models import load_model

    spec = (spec or "").strip()
    if m := _UMAP.match(spec):
        return Value(spec, "umap", "cluster", "k-means cluster of the embedding", "cluster id", umap_id=m.group(1))
    if m := _MODEL.match(spec):
        mid, col = m.groups()
        models = models_on_tiling(store, tiling_id)
        if mid not in set(models["model_id"]):
            raise HefeatError(f"Model {mid} has no per-tile predictions on tiling {tiling_id}"
                              f" (models there: {', '.join(models['model_id']) or 'none'})")
        cols = _prediction_columns(store, mid)
        if col not in cols:
            raise HefeatError(f"Model {mid} has no predicted column {col!r}; it has: {', '.join(cols[:20])}"
                              f"{' …' if len(cols) > 20 else ''} (hefeat predict {mid} --top N stores more genes)")
        meta = load_model(store, mid)
        return Value(spec, "model", col, f"{col} — {meta['kind']} model {mid}", model_units(meta, col), model_id=mid)
    m = _SPEC.match(spec)
    if not m:
        raise HefeatError(f"Unknown value {spec!r}: give a tiles/slides/clinical column (e.g. sharpness, "
                          "slides.site, clinical.grade), model:<model_id>:<column>, or a SELECT query")
    src, col = m.groups()
    tile_cols = [c for c in _columns(store, "tiles") if c not in ID_COLS]
    for s, cols in (("tiles", tile_cols), ("slides", list(SLIDE_COLUMNS)), ("clinical", clinical_columns(store))):
        if (src in (None, s)) and col in cols:
            units = QC_UNITS.get(col, "") if s == "tiles" else SLIDE_COLUMNS.get(col, "") if s == "slides" else ""
            return Value(spec, s, col, col, units)
    raise HefeatError(f"No column {col!r} in {src or 'tiles, slides or clinical'}; tiles have: {', '.join(tile_cols)}; "
                      f"slides: {', '.join(SLIDE_COLUMNS)}; clinical: {', '.join(clinical_columns(store)) or 'none'}")


def named_tilings(store: Store, sql: str) -> list[str]:
    """Tiling ids of the store that appear literally in a query's text (e.g. WHERE tiling_id = 't…')."""
    known = store.sql("SELECT tiling_id FROM tilings")["tiling_id"].tolist()
    return [t for t in known if re.search(rf"\b{re.escape(t)}\b", sql)]


def single_select(sql: str) -> str:
    """The query if it is exactly one SELECT statement (DuckDB's parser decides); a one-line error otherwise."""
    import json

    import duckdb

    con = duckdb.connect()
    try:
        j = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
    finally:
        con.close()
    if j.get("error"):
        msg = (j.get("error_message") or "not a SELECT").splitlines()[0]
        if j.get("error_type") == "parser":
            raise HefeatError(f"SQL failed: {msg}")
        raise HefeatError("Only one SELECT query is allowed here (no COPY, ATTACH, SET, INSTALL or writes)")
    if len(j.get("statements", [])) != 1:
        raise HefeatError("Only one SELECT query is allowed here (no ';'-separated statements)")
    return sql


def run_user_sql(store: Store, sql: str) -> pd.DataFrame:
    """A user's single SELECT, through the store's read-only sandbox when it has one."""
    single_select(sql)
    runner = getattr(store, "sql_readonly", None) or store.sql
    return runner(sql)


def sql_values(store: Store, sql: str, *, tiling_id: str | None, slide_id: str | None = None) -> tuple[pd.DataFrame, str, str]:
    """(rows slide_id?, tile_id, value), the value column's name and the tiling the rows belong to.

    The tiling is the one asked for (the query then sees `tiles` through that tiling only), else the
    query's tiling_id column, else a tiling id named in its text, else the store's only tiling; rows
    are never joined across tilings.
    """
    from hefeat.store.features import scoped_query

    named = named_tilings(store, sql)
    if tiling_id is None:
        if len(named) > 1:
            raise HefeatError(f"The query names several tilings ({', '.join(named)}); return tiling_id or pass "
                              "--tiling/--extraction")
        tiling_id = named[0] if named else None
    if tiling_id is None:
        v = run_user_sql(store, sql)
        if "tiling_id" in v.columns:
            got = sorted(v["tiling_id"].dropna().unique())
            if len(got) != 1:
                raise HefeatError(f"The query returns tiles of {len(got)} tilings ({', '.join(got)}); filter one "
                                  "(WHERE tiling_id = ...) or pass --tiling/--extraction")
            tiling_id = got[0]
        else:
            all_t = store.sql("SELECT tiling_id FROM tilings")["tiling_id"].tolist()
            if len(all_t) > 1:
                raise HefeatError(f"The query returns no tiling_id and names no tiling, and the store has {len(all_t)} "
                                  f"tilings ({', '.join(all_t)}), whose tile ids overlap. Pass --extraction or --tiling, "
                                  "add tiling_id to the SELECT, or filter WHERE tiling_id = '<tiling_id>'")
            tiling_id = all_t[0] if all_t else None
    else:
        other = [t for t in named if t != tiling_id]
        if other and tiling_id not in named:
            raise HefeatError(f"The query is on tiling {other[0]}, but these tiles are of tiling {tiling_id}")
        v = run_user_sql(store, scoped_query(sql, tiling_id))  # `tiles` = this tiling's tiles only
    if "tile_id" not in v.columns:
        raise HefeatError("The query must return tile_id, slide_id and one value column")
    vcols = [c for c in v.columns if c not in ID_COLS]
    if not vcols:
        raise HefeatError("The query returns no value column besides ids (tiling_id, slide_id, tile_id)")
    col = "color" if "color" in vcols else "value" if "value" in vcols else vcols[0]
    if "tiling_id" in v.columns and tiling_id is not None:
        other = sorted(set(v["tiling_id"].dropna().astype(str)) - {tiling_id})
        if other:
            raise HefeatError(f"The query returns tiles of tiling {', '.join(other)}, not of tiling {tiling_id}")
    if slide_id is not None and "slide_id" in v.columns:
        v = v[v["slide_id"] == slide_id]
    if v.empty:
        raise HefeatError("The query returned no rows" + (f" for slide {slide_id}" if slide_id else "")
                          + (f" on tiling {tiling_id}" if tiling_id else ""))
    if slide_id is None and "slide_id" not in v.columns:
        raise HefeatError("The query must return slide_id (tile ids repeat across slides)")
    key = ["slide_id", "tile_id"] if "slide_id" in v.columns else ["tile_id"]
    if v.duplicated(key).any():
        raise HefeatError(f"The query returns several rows per {' and '.join(key)}; return one value per tile"
                          + (" (select slide_id too, or filter on the slide)" if "slide_id" not in key else ""))
    return v[key + [col]].rename(columns={col: "value"}), col, tiling_id


def values_for(store: Store, spec: str, keys: pd.DataFrame, *, tiling_id: str) -> tuple[pd.Series, Value]:
    """Values aligned with `keys` (slide_id, tile_id rows of `tiling_id`); NaN where a tile has none."""
    keys = keys[["slide_id", "tile_id"]].reset_index(drop=True)
    slides = sorted(keys["slide_id"].unique())
    if is_sql(spec):
        rows, col, _ = sql_values(store, spec, tiling_id=tiling_id, slide_id=slides[0] if len(slides) == 1 else None)
        if "slide_id" not in rows.columns:
            rows = rows.assign(slide_id=slides[0])
        val = Value(spec, "sql", col, col)
    else:
        val = parse(store, spec, tiling_id)
        rows = _rows(store, val, tiling_id, slides)
    if val.source in ("slides", "clinical"):
        out = keys.merge(rows, on="slide_id", how="left")["value"]
    else:
        out = keys.merge(rows.drop_duplicates(["slide_id", "tile_id"]), on=["slide_id", "tile_id"], how="left")["value"]
    if out.isna().all():
        raise HefeatError(f"No tile here has a value for {spec!r} (tiling {tiling_id})")
    return out, val


def _rows(store: Store, val: Value, tiling_id: str, slides: list[str]) -> pd.DataFrame:
    if val.source == "tiles":
        if len(slides) <= 20:
            parts = [store.tiles(tiling_id, s)[["tile_id", val.column]].assign(slide_id=s) for s in slides
                     if store.tiles_path(tiling_id, s).exists()]
            df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["slide_id", "tile_id", val.column])
        else:
            df = store.sql(f"SELECT slide_id, tile_id, {_ident(val.column)} FROM tiles WHERE tiling_id = ?", [tiling_id])
        return df.rename(columns={val.column: "value"})
    if val.source == "slides":
        return store.sql(f"SELECT slide_id, {_ident(val.column)} AS value FROM slides")
    if val.source == "clinical":
        from hefeat.learn.data import clinical_by_slide

        return clinical_by_slide(store)[["slide_id", val.column]].rename(columns={val.column: "value"})
    if val.source == "model":
        parts = []
        for s in slides:
            p = store.predictions_path(val.model_id, s)
            if p.exists():
                parts.append(pd.read_parquet(p, columns=["tile_id", val.column]).assign(slide_id=s))
        if not parts:
            raise HefeatError(f"Model {val.model_id} has no predictions for these slides")
        df = pd.concat(parts, ignore_index=True).rename(columns={val.column: "value"})
        if val.column == "combination":  # trait bit codes -> names of the traits called high
            from hefeat.learn.models import load_model

            traits = load_model(store, val.model_id)["params"].get("traits", [])
            names = {c: "+".join(t for k, t in enumerate(traits) if c >> k & 1) or "none" for c in range(2 ** len(traits))}
            df["value"] = df["value"].map(names)
        return df
    if val.source == "umap":
        p = store.umap_path(val.umap_id)
        if not p.exists():
            raise HefeatError(f"No UMAP {val.umap_id}")
        u = pd.read_parquet(p, columns=["slide_id", "tile_id", "cluster"])
        return u.rename(columns={"cluster": "value"})
    raise HefeatError(f"Cannot read values of {val.spec}")


def cohort_range(store: Store, val: Value, tiling_id: str, lo: float = 2.0, hi: float = 98.0) -> tuple[float, float] | None:
    """The lo-th..hi-th percentile of a numeric value over the whole tiling (one colour scale for every slide).

    None for SQL values and UMAP clusters (their range is the drawn tiles').
    """
    q = f"quantile_cont(v, {lo / 100}), quantile_cont(v, {hi / 100})"
    if val.source == "tiles":
        r = store.sql(f"SELECT {q} FROM (SELECT {_ident(val.column)}::DOUBLE AS v FROM tiles WHERE tiling_id = ?)", [tiling_id])
    elif val.source == "model":
        r = store.sql(f"SELECT {q} FROM (SELECT TRY_CAST({_ident(val.column)} AS DOUBLE) AS v FROM predictions "
                      "WHERE model_id = ?)", [val.model_id])
    elif val.source in ("slides", "clinical"):
        rows = _rows(store, val, tiling_id, [])
        v = pd.to_numeric(rows["value"], errors="coerce").dropna()
        return (float(np.percentile(v, lo)), float(np.percentile(v, hi))) if len(v) else None
    else:
        return None
    a, b = r.iloc[0, 0], r.iloc[0, 1]
    return (float(a), float(b)) if pd.notna(a) and pd.notna(b) and b > a else None


def numeric_or_categories(values: pd.Series) -> tuple[str, np.ndarray, list[str]]:
    """('continuous', float array with NaN, []) or ('categorical', codes with -1 = missing, names)."""
    from hefeat.figures.base import is_categorical

    if is_categorical(values):
        s = values.astype("object").where(values.notna(), None)
        names = sorted({str(x) for x in s if x is not None}, key=str)
        lookup = {n: i for i, n in enumerate(names)}
        return "categorical", np.array([-1 if x is None else lookup[str(x)] for x in s], np.int32), names
    return "continuous", pd.to_numeric(values, errors="coerce").to_numpy(np.float64), []
