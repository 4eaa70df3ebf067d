"""Per-slide feature files (HDF5), their slide-level aggregates, and reading embeddings at disk speed.

A slide's file holds `features` [N, D] (float16 or float32, contiguous), `coords` [N, 2] and, written
in the same atomic rename, its aggregates (`aggregates/sum`, `aggregates/sumsq` in float64 over the
stored values, attribute `n`), so slide-level fits read N x D numbers, not N x T x D.

Each extraction folder also holds a consolidated table (`Store.aggregates_path`): per finished slide its
file identity (inode, size, mtime), row count, byte offsets of the two datasets and its aggregates.
Every read checks the identity against the file itself, so the table is never trusted stale: a slide
added or redone since is read from its own file (and the table rewritten when refreshed).
Reads of contiguous datasets go straight to their byte offsets (pread), which is what lets
`load_features` run at disk speed instead of paying an HDF5 open per slide.

Over 600 lines: the writer, the aggregates table and the pread reader share one file format (offsets,
identity checks); splitting them would put the format's two halves in different files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.store import layout
from hefeat.store.atomic import atomic_path, tmp_path_for
from hefeat.store.ids import check_id

if TYPE_CHECKING:  # pragma: no cover  (the catalog imports this module to refresh aggregates)
    from hefeat.store.catalog import Store

AGGREGATES = "aggregates"  # group in each slide file
TABLE_VERSION = 1
_BLOCK_BYTES = 16 << 20  # reads and conversions go through buffers of at most this size
_F16, _F32 = np.dtype("<f2"), np.dtype("<f4")


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
class FeatureFileWriter:
    """Writes one slide's `features` [N, D], `coords` [N, 2] and aggregates to a temporary HDF5, then renames it."""

    def __init__(self, path: Path, n: int, dim: int, *, dtype: str, coords: np.ndarray, attrs: dict):
        import h5py

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_path_for(self.path)
        self.n = n
        self.written = 0
        self.f = h5py.File(self.tmp, "w")
        self.feats = self.f.create_dataset("features", shape=(n, dim), dtype=dtype)  # contiguous
        c = self.f.create_dataset("coords", data=np.asarray(coords, np.int64))
        for k, v in attrs.items():
            self.f.attrs[k] = v
            c.attrs[k] = v
        self._sum = np.zeros(dim, np.float64)
        self._sumsq = np.zeros(dim, np.float64)

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write rows [start, start + len(rows)) and add them to the slide's aggregates; non-finite rows are refused.

        Checked on the values as stored: a row finite in float32 but beyond float16's range would be
        stored as inf, so it fails the slide (NonFiniteError) like a NaN does.
        """
        with np.errstate(over="ignore"):
            stored = np.asarray(rows).astype(self.feats.dtype, copy=False)
        check_storable(np.asarray(rows), stored, start)
        self.feats[start:start + len(stored)] = stored
        x = stored.astype(np.float64)
        self._sum += x.sum(0)
        self._sumsq += np.einsum("ij,ij->j", x, x)
        self.written += len(stored)

    def commit(self) -> None:
        """Write the aggregates, close, fsync and rename into place."""
        if self.written != self.n:
            raise HefeatError(f"feature file {self.path.name}: wrote {self.written} of {self.n} rows")
        g = self.f.create_group(AGGREGATES)
        g.attrs["n"] = self.n
        g.create_dataset("sum", data=self._sum)
        g.create_dataset("sumsq", data=self._sumsq)
        self.f.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the temporary file."""
        try:
            self.f.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def check_storable(rows: np.ndarray, stored: np.ndarray, start: int) -> None:
    """Raise NonFiniteError naming the first bad tile if `stored` (rows cast to the file's dtype) is not all finite."""
    from hefeat.errors import NonFiniteError

    fin = np.isfinite(stored)
    if fin.all():
        return
    bad = ~fin.all(axis=1)
    n, first = int(bad.sum()), start + int(np.argmax(bad))
    if stored.dtype.itemsize < rows.dtype.itemsize and np.isfinite(rows[bad]).all():
        top = float(np.abs(rows[bad]).max())
        raise NonFiniteError(
            f"{n} tile(s) (first: tile {first}) have values beyond {stored.dtype.name}'s range (largest |x| {top:.3g} > "
            f"{float(np.finfo(stored.dtype).max):g}): stored they would be inf. Re-extract with --dtype float32 "
            "(in a recipe: --set encoder.dtype=float32); nothing was written for this slide")
    raise NonFiniteError(f"non-finite embeddings for {n} tile(s) (first: tile {first}); "
                         "nothing was written for this slide")


def refuse_non_finite(X: np.ndarray, slide_id: str, path: str, first_row: int = 0) -> None:
    """Raise a clear HefeatError if feature rows read from a slide file hold NaN or inf (never used silently)."""
    if X.size == 0 or np.isfinite(X).all():
        return
    bad = ~np.isfinite(X).reshape(len(X), -1).all(axis=1)
    raise HefeatError(
        f"slide {slide_id}: {int(bad.sum())} stored feature row(s) hold NaN or inf (first: row {first_row + int(np.argmax(bad))}"
        f" of what was read from {Path(path).name}). This file was written before hefeat checked stored values, or was "
        "changed since; re-extract the slide (a float16 overflow needs --dtype float32)")


# ----------------------------------------------------------------------------------------------
# One slide file: identity, layout, raw reads
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlideFile:
    """Where one slide's features are: file identity, shape, stored dtype and byte offsets (-1: read via h5py)."""

    slide_id: str
    path: str
    key: tuple[int, int, int]  # (inode, size, mtime_ns): changes whenever the file is replaced
    n: int
    dim: int
    dtype: str
    offset: int
    coords_offset: int
    tiling_id: str


def _file_key(st: os.stat_result) -> tuple[int, int, int]:
    return (int(st.st_ino), int(st.st_size), int(st.st_mtime_ns))


def _raw_offset(ds) -> int:
    import h5py

    plist = ds.id.get_create_plist()
    if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters() or ds.dtype.str not in ("<f2", "<f4", "<i8"):
        return -1
    off = ds.id.get_offset()
    return -1 if off is None else int(off)


def inspect_file(path: str | os.PathLike, slide_id: str, extraction_id: str | None = None) -> SlideFile:
    """Shape, dtype and byte offsets of one slide file; checks its recorded slide/extraction ids."""
    import h5py

    p = Path(path)
    key = _file_key(p.stat())
    try:
        with h5py.File(p, "r") as f:
            ds = f["features"]
            a = dict(f.attrs)
            for k, want in (("slide_id", slide_id), ("extraction_id", extraction_id)):
                got = a.get(k)
                if want is not None and got not in (None, "") and str(got) != want:
                    raise HefeatError(f"Feature file {p} records {k} {got!r}, not {want!r}: it was moved or copied "
                                      "from elsewhere; re-extract the slide")
            return SlideFile(slide_id, str(p), key, int(ds.shape[0]), int(ds.shape[1]), ds.dtype.str, _raw_offset(ds),
                             _raw_offset(f["coords"]) if "coords" in f else -1, str(a.get("tiling_id", "") or ""))
    except OSError as e:
        raise HefeatError(f"Cannot read feature file {p}: {e}") from None


def _pread_into(fd: int, buf: np.ndarray, offset: int) -> None:
    view = memoryview(buf).cast("B")
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise HefeatError(f"feature file ended early (wanted {len(view)} bytes at {offset})")
        got += n


class _Reader:
    """Raw row-block reads of one slide file (pread at the dataset's offset, or h5py when not contiguous)."""

    def __init__(self, sf: SlideFile):
        self.sf = sf
        self.fd = self.h5 = None
        if sf.offset >= 0:
            self.fd = os.open(sf.path, os.O_RDONLY)
        else:
            import h5py

            self.h5 = h5py.File(sf.path, "r")
        self.rowbytes = sf.dim * np.dtype(sf.dtype).itemsize

    def block(self, a: int, b: int, out: np.ndarray | None = None) -> np.ndarray:
        """Stored rows [a, b) as an array of the stored dtype (into `out` when given)."""
        if out is None:
            out = np.empty((b - a, self.sf.dim), np.dtype(self.sf.dtype))
        if b > a:
            if self.fd is not None:
                _pread_into(self.fd, out, self.sf.offset + a * self.rowbytes)
            else:
                self.h5["features"].read_direct(out, np.s_[a:b])
        return out

    def coords(self) -> np.ndarray:
        """The slide's coords [N, 2] int64."""
        if self.fd is not None and self.sf.coords_offset >= 0:
            out = np.empty((self.sf.n, 2), np.int64)
            _pread_into(self.fd, out, self.sf.coords_offset)
            return out
        import h5py

        with h5py.File(self.sf.path, "r") as f:
            return f["coords"][:].astype(np.int64) if "coords" in f else np.zeros((self.sf.n, 2), np.int64)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        if self.h5 is not None:
            self.h5.close()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def half_to_float(src: np.ndarray, dst: np.ndarray) -> None:
    """float16 -> float32 by bit arithmetic in cache-sized chunks (exact; ~2.5x numpy's scalar cast here).

    The half's exponent+mantissa bits are placed in a float32 and scaled by 2**112, which handles
    normals and subnormals alike; Inf/NaN get their exponent set; the sign is OR-ed back
    (F. Giesen, "Half to float done quic", 2013).
    """
    if not dst.flags.c_contiguous or dst.dtype != _F32 or dst.size != src.size:
        raise ValueError("dst must be a C-contiguous float32 array of src's size")
    s = np.ascontiguousarray(src).reshape(-1).view(np.uint16)
    d = dst.reshape(-1)
    du = d.view(np.uint32)
    chunk = 1 << 18
    w = np.empty(min(chunk, len(s)), np.uint32)
    sign = np.empty_like(w)
    for i in range(0, len(s), chunk):
        x = s[i:i + chunk]
        m = len(x)
        ww, sg, dd = w[:m], sign[:m], d[i:i + m]
        np.copyto(ww, x)
        np.bitwise_and(ww, 0x8000, out=sg)
        np.left_shift(sg, 16, out=sg)
        np.bitwise_and(ww, 0x7FFF, out=ww)
        np.left_shift(ww, 13, out=ww)
        np.multiply(ww.view(np.float32), np.float32(2.0**112), out=dd)
        special = ww >= (0x7C00 << 13)
        if special.any():
            du[i:i + m][special] |= 0x7F800000
        np.bitwise_or(du[i:i + m], sg, out=du[i:i + m])


def _convert_into(src: np.ndarray, dst: np.ndarray) -> None:
    if src.dtype == _F16 and dst.dtype == _F32 and dst.flags.c_contiguous:
        half_to_float(src, dst)
    else:
        np.copyto(dst, src, casting="unsafe")


def _read_rows(r: _Reader, rows: np.ndarray | None, out: np.ndarray) -> None:
    """Rows of one slide (all, or sorted unique `rows`) into `out` (any float dtype); non-finite values are refused."""
    _read_rows_raw(r, rows, out)
    refuse_non_finite(out[:r.sf.n if rows is None else len(rows)], r.sf.slide_id, r.sf.path)


def _read_rows_raw(r: _Reader, rows: np.ndarray | None, out: np.ndarray) -> None:
    """Rows of one slide (all, or sorted unique `rows`) into `out` (any float dtype), block by block."""
    sf = r.sf
    direct = np.dtype(sf.dtype) == out.dtype
    step = max(1, _BLOCK_BYTES // max(r.rowbytes, 1))
    if rows is None:
        if direct:
            r.block(0, sf.n, out)
            return
        buf = np.empty((min(step, sf.n), sf.dim), np.dtype(sf.dtype))
        for a in range(0, sf.n, step):
            b = min(a + step, sf.n)
            _convert_into(r.block(a, b, buf[:b - a]), out[a:b])
        return
    if len(rows) == 0:
        return
    # Blocks of the span covered by the rows: a dense block is read whole, a sparse one run by run.
    pos = 0
    for a in range(int(rows[0]), int(rows[-1]) + 1, step):
        b = min(a + step, int(rows[-1]) + 1)
        end = pos + int(np.searchsorted(rows[pos:], b))
        sel = rows[pos:end]
        if len(sel) == 0:
            continue
        if len(sel) * 8 >= b - a:
            got = r.block(a, b)[sel - a]
        else:
            breaks = np.flatnonzero(np.diff(sel) != 1) + 1
            got = np.concatenate([r.block(int(run[0]), int(run[-1]) + 1) for run in np.split(sel, breaks)])
        _convert_into(got, out[pos:end])
        pos = end


def read_features(path: str | os.PathLike, rows: np.ndarray | None = None, *, dtype: str = "float32") -> np.ndarray:
    """Feature rows of one slide file (all, or the given tile ids in that order) as (n, dim) `dtype`."""
    sf = inspect_file(path, Path(path).stem)
    out_dtype = np.dtype(dtype)
    with _Reader(sf) as r:
        if rows is None:
            out = np.empty((sf.n, sf.dim), out_dtype)
            _read_rows(r, None, out)
            return out
        rows = np.asarray(rows, np.int64)
        _check_rows(sf, rows)
        uniq, inv = np.unique(rows, return_inverse=True)
        got = np.empty((len(uniq), sf.dim), out_dtype)
        _read_rows(r, uniq, got)
        return got[inv]


def read_slide_rows(sf: SlideFile, rows: np.ndarray | None = None, *, dtype: str = "float32",
                    out: np.ndarray | None = None) -> np.ndarray:
    """Rows of one slide file found by `slide_table` (all, or sorted unique `rows`) as `dtype` (or into `out`)."""
    n = sf.n if rows is None else len(rows)
    if rows is not None:
        rows = np.asarray(rows, np.int64)
        _check_rows(sf, rows)
    if out is None:
        out = np.empty((n, sf.dim), np.dtype(dtype))
    with _Reader(sf) as r:
        _read_rows(r, rows, out)
    return out


def read_slide_coords(sf: SlideFile) -> np.ndarray:
    """The coords [N, 2] (level-0 x, y) of one slide file found by `slide_table`."""
    with _Reader(sf) as r:
        return r.coords()


def _check_rows(sf: SlideFile, rows: np.ndarray) -> None:
    if len(rows) and (rows.min() < 0 or rows.max() >= sf.n):
        bad = rows[(rows < 0) | (rows >= sf.n)][:5].tolist()
        raise HefeatError(f"Tile ids {bad} do not exist in slide {sf.slide_id} of this extraction "
                          f"(it has tiles 0..{sf.n - 1}); the query selects tiles of another tiling or slide version")


# ----------------------------------------------------------------------------------------------
# The extraction's slide table: finished slides, their files and aggregates (provably current)
# ----------------------------------------------------------------------------------------------
def _finished(store: Store, eid: str, slides: list[str] | None = None) -> dict[str, os.stat_result]:
    """slide_id -> stat of each committed feature file of the extraction (or of `slides` among them)."""
    from hefeat.store.commit import committed_outputs

    return committed_outputs(store, "extraction", eid, None if slides is None else [check_id(s) for s in slides])


def _file_aggregates(sf: SlideFile) -> tuple[np.ndarray, np.ndarray]:
    """(sum, sumsq) float64 of one slide file: written at extraction time, or computed once for older files."""
    import h5py

    with h5py.File(sf.path, "r") as f:
        if AGGREGATES in f and int(f[AGGREGATES].attrs["n"]) == sf.n:
            return f[AGGREGATES]["sum"][:], f[AGGREGATES]["sumsq"][:]
    s, q = np.zeros(sf.dim), np.zeros(sf.dim)
    step = max(1, _BLOCK_BYTES // (sf.dim * 8))
    with _Reader(sf) as r:
        for a in range(0, sf.n, step):
            x = r.block(a, min(a + step, sf.n)).astype(np.float64)
            s += x.sum(0)
            q += np.einsum("ij,ij->j", x, x)
    return s, q


@dataclass
class SlideTable:
    """Finished slides of an extraction (sorted): their files and, when loaded, float64 sums and sums of squares."""

    extraction_id: str
    files: list[SlideFile]
    sums: np.ndarray | None = None  # (n_slides, dim)
    sumsq: np.ndarray | None = None

    @property
    def slide_ids(self) -> list[str]:
        """Slide ids in table order."""
        return [f.slide_id for f in self.files]

    def get(self, slide_id: str) -> SlideFile:
        """The file of one slide, or a clear error if the slide is not finished in this extraction."""
        pos = getattr(self, "_pos", None)
        if pos is None:
            pos = self._pos = {f.slide_id: i for i, f in enumerate(self.files)}
        if slide_id not in pos:
            raise HefeatError(f"Slide {slide_id} has no features in extraction {self.extraction_id}; "
                              "run hefeat extract for it")
        return self.files[pos[slide_id]]


_COLS = ("slide_id", "key", "n", "dim", "dtype", "offset", "coords_offset", "tiling_id")


@dataclass
class _Consolidated:
    """The consolidated table as last written: columns (as Python lists) and the row of each slide."""

    cols: dict[str, list]
    pos: dict[str, int]
    sums: np.ndarray | None
    sumsq: np.ndarray | None

    def file(self, sid: str, path: str) -> SlideFile | None:
        i = self.pos.get(sid)
        if i is None:
            return None
        c = self.cols
        return SlideFile(sid, path, tuple(c["key"][i]), c["n"][i], c["dim"][i], c["dtype"][i], c["offset"][i],
                         c["coords_offset"][i], c["tiling_id"][i])


def _read_table(store: Store, eid: str, *, sums: bool) -> _Consolidated:
    """The consolidated table as written (not yet checked against the files)."""
    import h5py

    empty = _Consolidated({}, {}, None, None)
    try:
        with h5py.File(store.aggregates_path(eid), "r") as f:
            if int(f.attrs.get("version", 0)) != TABLE_VERSION:
                return empty
            c = {k: f[k][:].tolist() for k in _COLS}
            s = f["sum"][:] if sums else None
            q = f["sumsq"][:] if sums else None
    except (OSError, KeyError):
        return empty
    for k in ("slide_id", "dtype", "tiling_id"):
        c[k] = [v.decode() for v in c[k]]
    return _Consolidated(c, {sid: i for i, sid in enumerate(c["slide_id"])}, s, q)


def _write_table(store: Store, t: SlideTable) -> None:
    import h5py

    fs = t.files
    with atomic_path(store.aggregates_path(t.extraction_id)) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["version"] = TABLE_VERSION
        f.attrs["extraction_id"] = t.extraction_id
        f["slide_id"] = np.array([x.slide_id.encode() for x in fs], dtype="S")
        f["key"] = np.array([x.key for x in fs], np.int64).reshape(-1, 3)
        for k in ("n", "dim", "offset", "coords_offset"):
            f[k] = np.array([getattr(x, k) for x in fs], np.int64)
        f["dtype"] = np.array([x.dtype.encode() for x in fs], dtype="S")
        f["tiling_id"] = np.array([x.tiling_id.encode() for x in fs], dtype="S")
        f["sum"] = t.sums
        f["sumsq"] = t.sumsq


def slide_table(store: Store, extraction_id: str, slides: Iterable[str] | None = None, *,
                aggregates: bool = False, write: bool = False) -> SlideTable:
    """The finished slides of an extraction (or `slides`), each checked against its file as it is now.

    With aggregates=True, every finished slide's sums are current; with write=True (the writers:
    `refresh_aggregates` after an extraction, `hefeat compact`) a changed table is rewritten. Readers
    never write: a stale table is completed from the files in memory.
    """
    ext = store.extraction(extraction_id)
    want = None if slides is None else list(dict.fromkeys(slides))
    on_disk = _finished(store, extraction_id, want)
    known = _read_table(store, extraction_id, sums=aggregates)
    want = sorted(on_disk) if want is None else want
    edir = str(store.extraction_dir(extraction_id))
    files, changed = [], set(known.pos) - set(on_disk)
    for sid in want:
        if sid not in on_disk:
            raise HefeatError(f"Slide {sid} has no features in extraction {extraction_id}; run hefeat extract for it")
        path = os.path.join(edir, sid + ".h5")
        sf = known.file(sid, path)
        if sf is None or sf.key != _file_key(on_disk[sid]):
            sf = inspect_file(path, sid, extraction_id)
            changed.add(sid)
        if sf.tiling_id and sf.tiling_id != ext["tiling_id"]:
            raise HefeatError(f"Feature file of slide {sid} is on tiling {sf.tiling_id}, but extraction {extraction_id} "
                              f"is on tiling {ext['tiling_id']}; re-extract it")
        files.append(sf)
    table = SlideTable(extraction_id, files)
    if not aggregates:
        return table
    dim = int(ext["dim"])
    table.sums, table.sumsq = np.zeros((len(files), dim)), np.zeros((len(files), dim))
    fresh = [i for i, sf in enumerate(files) if sf.slide_id not in changed and known.sums is not None]
    if fresh:
        rows = [known.pos[files[i].slide_id] for i in fresh]
        table.sums[fresh], table.sumsq[fresh] = known.sums[rows], known.sumsq[rows]
    for i in sorted(set(range(len(files))) - set(fresh)):
        table.sums[i], table.sumsq[i] = _file_aggregates(files[i])
    if write and slides is None and (changed or known.sums is None):
        with contextlib.suppress(OSError):  # a read-only store still answers, from the files
            _write_table(store, table)
    return table


def refresh_aggregates(store: Store, extraction_id: str) -> dict:
    """Bring the extraction's consolidated slide table up to date with its files (run after extraction)."""
    t = slide_table(store, extraction_id, aggregates=True, write=True)
    return {"extraction_id": extraction_id, "slides": len(t.files), "path": str(store.aggregates_path(extraction_id))}


def compact_store(store: Store) -> dict:
    """`hefeat compact`: records and per-slide Parquet families compacted, every extraction's slide table consolidated."""
    out = store.compact()
    out["extractions"] = []
    for eid in layout.known_ids(store.root, layout.FEATURES, "extraction"):
        with contextlib.suppress(HefeatError):  # an extraction without its record yet
            refresh_aggregates(store, eid)
            out["extractions"].append(eid)
    return out


@dataclass(frozen=True)
class SlideAggregates:
    """Per-slide tile counts and mean/std of the stored embeddings (float64)."""

    slide_ids: list[str]
    n: np.ndarray  # (n_slides,)
    mean: np.ndarray  # (n_slides, dim)
    std: np.ndarray  # (n_slides, dim), population std over the slide's tiles


def slide_aggregates(store: Store, extraction_id: str, slides: list[str] | None = None) -> SlideAggregates:
    """Tile counts, means and standard deviations per finished slide, from the aggregates written at extraction."""
    t = slide_table(store, extraction_id, aggregates=True)
    if not t.files:
        raise HefeatError(f"Extraction {extraction_id} has no finished slides")
    n = np.array([f.n for f in t.files], np.int64)
    sums, sumsq = t.sums, t.sumsq
    ids = t.slide_ids
    if slides is not None:
        pos = {s: i for i, s in enumerate(ids)}
        for s in slides:
            t.get(s)  # a clear error for a slide that is not finished
        idx = [pos[s] for s in slides]
        n, sums, sumsq, ids = n[idx], sums[idx], sumsq[idx], list(slides)
    bad = ~(np.isfinite(sums).all(axis=1) & np.isfinite(sumsq).all(axis=1))
    if bad.any():  # a NaN or inf anywhere in a slide's stored rows makes its sums non-finite
        names = [ids[i] for i in np.flatnonzero(bad)]
        raise HefeatError(f"extraction {extraction_id}: the stored features of {len(names)} slide(s) hold NaN or inf "
                          f"({', '.join(names[:5])}); re-extract them (a float16 overflow needs --dtype float32)")
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / n[:, None]
        var = np.maximum(sumsq / n[:, None] - mean**2, 0)
    return SlideAggregates(ids, n, mean, np.sqrt(var))


def slide_means(store: Store, extraction_id: str, slides: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Mean embedding per finished slide (float64, NaN for a slide without tiles), from the aggregates."""
    a = slide_aggregates(store, extraction_id, slides)
    return a.slide_ids, a.mean


# ----------------------------------------------------------------------------------------------
# Loading embeddings for slides or any SQL filter
# ----------------------------------------------------------------------------------------------
@dataclass
class FeatureChunk:
    """One slide's part of a load: its rows' tile metadata and embeddings (n, dim)."""

    slide_id: str
    tiles: pd.DataFrame
    features: np.ndarray


def scoped_query(query: str, tiling_id: str) -> str:
    """The query with `tiles` seen only through this tiling (a CTE shadowing the view)."""
    q = query.strip().rstrip(";").strip()
    cte = f"tiles AS (SELECT * FROM tiles WHERE tiling_id = '{tiling_id}')"
    head = q[:15].upper()
    if head.startswith("WITH RECURSIVE"):
        return f"WITH {cte} SELECT * FROM ({q}) AS q"
    if head.startswith("WITH"):
        return f"WITH {cte}, {q[4:].lstrip()}"
    return f"WITH {cte} {q}"


def _query_rows(store: Store, extraction_id: str, tiling_id: str, query: str) -> pd.DataFrame:
    """Rows of a tile query, resolved to the extraction's tiling; refused when they are another tiling's."""
    meta = store.sql(scoped_query(query, tiling_id))
    if not {"slide_id", "tile_id"} <= set(meta.columns):
        raise HefeatError(f"The query must return slide_id and tile_id columns (it returned: {', '.join(meta.columns)})")
    if "tiling_id" in meta.columns:
        other = sorted(set(meta["tiling_id"].dropna().astype(str)) - {tiling_id})
        if other or meta["tiling_id"].isna().any():
            raise HefeatError(f"The query returns tiles of tiling {', '.join(other) or 'NULL'}; extraction "
                              f"{extraction_id} is on tiling {tiling_id}. Filter on tiling_id = '{tiling_id}'.")
    if meta.empty:
        n_any = len(store.sql(query))
        if n_any:
            raise HefeatError(f"The query selects {n_any} tiles, none of them of tiling {tiling_id} (extraction "
                              f"{extraction_id}'s tiling): it filters on another tiling. Use an extraction of that "
                              f"tiling, or filter on tiling_id = '{tiling_id}'.")
    if meta["tile_id"].isna().any() or meta["slide_id"].isna().any():
        raise HefeatError("The query returns rows with a NULL slide_id or tile_id")
    meta["tile_id"] = meta["tile_id"].astype(np.int64)
    meta["slide_id"] = meta["slide_id"].astype(str)
    if "tiling_id" not in meta.columns:
        meta.insert(0, "tiling_id", tiling_id)
    return meta.reset_index(drop=True)


def _tile_frame(tiling_id: str, sf: SlideFile, coords: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"tiling_id": tiling_id, "slide_id": sf.slide_id, "tile_id": np.arange(sf.n, dtype=np.int64),
                         "x": coords[:, 0], "y": coords[:, 1]})


def _plan(store: Store, extraction_id: str, query: str | None, slides: list[str] | None):
    """(tiling_id, slide table, query rows or None, {slide: row positions} in first-appearance order)."""
    tid = store.extraction(extraction_id)["tiling_id"]
    if query is None:
        return tid, slide_table(store, extraction_id, slides), None, None
    meta = _query_rows(store, extraction_id, tid, query)
    if slides is not None:
        meta = meta[meta["slide_id"].isin(set(slides))].reset_index(drop=True)
    groups = meta.groupby("slide_id", sort=False).indices
    table = slide_table(store, extraction_id, list(groups))
    return tid, table, meta, groups


def _check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (_F16, _F32):
        raise HefeatError(f"dtype must be float32 or float16, got {dtype!r}")
    return dt


def iter_features(store: Store, extraction_id: str, query: str | None = None, *, slides: list[str] | None = None,
                  dtype: str = "float32") -> Iterator[FeatureChunk]:
    """Stream a load one slide at a time: FeatureChunk(slide_id, tiles, features (n, dim) `dtype`).

    Without a query: every tile of `slides` (default: all finished slides), tile metadata
    (tiling_id, slide_id, tile_id, x, y) from the feature file itself, no catalog scan.
    With a query: SQL returning slide_id and tile_id (more columns are kept); `tiles` in it is seen
    through the extraction's tiling only, and rows of another tiling are refused.
    """
    dt = _check_dtype(dtype)
    tid, table, meta, groups = _plan(store, extraction_id, query, slides)
    for sf in table.files:
        with _Reader(sf) as r:
            if meta is None:
                X = np.empty((sf.n, sf.dim), dt)
                _read_rows(r, None, X)
                yield FeatureChunk(sf.slide_id, _tile_frame(tid, sf, r.coords()), X)
                continue
            part = meta.iloc[groups[sf.slide_id]].reset_index(drop=True)
            rows = part["tile_id"].to_numpy()
            _check_rows(sf, rows)
            uniq, inv = np.unique(rows, return_inverse=True)
            U = np.empty((len(uniq), sf.dim), dt)
            _read_rows(r, uniq, U)
            yield FeatureChunk(sf.slide_id, part, U[inv])


def _each(fn, n: int, nbytes: int) -> None:
    """fn(0..n-1); on two threads for loads big enough to gain (reads and numpy casts release the GIL)."""
    if n < 2 or nbytes < (64 << 20):
        for i in range(n):
            fn(i)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(2, os.cpu_count() or 1)) as ex:
        list(ex.map(fn, range(n)))


def load_features(store: Store, extraction_id: str, query: str | None = None, *, slides: list[str] | None = None,
                  dtype: str = "float32") -> tuple[pd.DataFrame, np.ndarray]:
    """(tile metadata, embeddings (n, dim) `dtype`) for the rows of `query`, or every tile of `slides`.

    See `iter_features` for what the query may be; rows come back in the query's order. Without a
    query only the slides asked for are read (default: all finished slides of the extraction).
    """
    dt = _check_dtype(dtype)
    tid, table, meta, groups = _plan(store, extraction_id, query, slides)
    dim = int(store.extraction(extraction_id)["dim"])
    if meta is None:
        counts = np.array([f.n for f in table.files], np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)])
        X = np.empty((int(starts[-1]), dim), dt)
        xy = np.empty((int(starts[-1]), 2), np.int64)

        def one(i: int) -> None:
            sf, a = table.files[i], int(starts[i])
            with _Reader(sf) as r:
                _read_rows(r, None, X[a:a + sf.n])
                xy[a:a + sf.n] = r.coords()

        _each(one, len(table.files), int(starts[-1]) * dim * dt.itemsize)
        tiles = pd.DataFrame({"tiling_id": tid, "slide_id": np.repeat(np.array(table.slide_ids, object), counts),
                              "tile_id": np.concatenate([np.arange(n, dtype=np.int64) for n in counts] or [[]]).astype(np.int64),
                              "x": xy[:, 0], "y": xy[:, 1]})
        return tiles, X
    X = np.empty((len(meta), dim), dt)
    tile_ids = meta["tile_id"].to_numpy()
    for sf in table.files:
        idx = groups[sf.slide_id]
        rows = tile_ids[idx]
        _check_rows(sf, rows)
        uniq, inv = np.unique(rows, return_inverse=True)
        U = np.empty((len(uniq), sf.dim), dt)
        with _Reader(sf) as r:
            _read_rows(r, uniq, U)
        X[idx] = U[inv]
    return meta, X


def iter_slide_features(store: Store, extraction_id: str, slides: list[str] | None = None, *,
                        dtype: str = "float32") -> Iterator[tuple[str, np.ndarray]]:
    """Yield (slide_id, features (n, dim)) one finished slide at a time, in slide order (or `slides` order)."""
    dt = _check_dtype(dtype)
    for sf in slide_table(store, extraction_id, slides).files:
        X = np.empty((sf.n, sf.dim), dt)
        with _Reader(sf) as r:
            _read_rows(r, None, X)
        yield sf.slide_id, X


# ----------------------------------------------------------------------------------------------
# Global row ids (neighbour indexes, samples): slide order, offsets instead of a per-row table
# ----------------------------------------------------------------------------------------------
def feature_offsets(store: Store, extraction_id: str) -> pd.DataFrame:
    """Finished slides of an extraction in slide order with n_tiles and their first global row id (offset)."""
    t = slide_table(store, extraction_id)
    if not t.files:
        raise HefeatError(f"Extraction {extraction_id} has no finished slides")
    n = np.array([f.n for f in t.files], np.int64)
    return pd.DataFrame({"slide_id": t.slide_ids, "n_tiles": n, "offset": np.concatenate([[0], np.cumsum(n)[:-1]])})


def read_global_rows(store: Store, extraction_id: str, offsets: pd.DataFrame, global_ids: np.ndarray, *,
                     dtype: str = "float32") -> np.ndarray:
    """Feature rows for sorted global row ids, reading only the slides (and blocks) that hold them."""
    global_ids = np.asarray(global_ids, np.int64)
    dt = _check_dtype(dtype)
    dim = int(store.extraction(extraction_id)["dim"])
    out = np.empty((len(global_ids), dim), dt)
    if not len(global_ids):
        return out
    starts = offsets["offset"].to_numpy(np.int64)
    owner = np.searchsorted(starts, global_ids, side="right") - 1
    touched = np.unique(owner)
    table = slide_table(store, extraction_id, offsets["slide_id"].to_numpy()[touched].tolist())
    cut = np.searchsorted(owner, touched, side="left").tolist() + [len(global_ids)]
    for j, (i, sf) in enumerate(zip(touched, table.files, strict=True)):
        a, b = cut[j], cut[j + 1]
        rows = global_ids[a:b] - starts[i]
        _check_rows(sf, rows)
        with _Reader(sf) as r:
            _read_rows(r, rows, out[a:b])
    return out
