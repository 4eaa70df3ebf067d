"""Ingest never loses or hides data: each bad input is a one-line error naming rows or columns, with
the previous data intact; re-ingesting does what was asked."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from hefeat.errors import HefeatError
from hefeat.slides.run import ingest_slides, run_tiling
from hefeat.slides.tiling import TilingParams
from hefeat.store.catalog import Store
from hefeat.store.expression import read_matrix
from hefeat.store.ids import expression_fingerprint
from hefeat.store.ingest import ingest_expression, ingest_spots


@pytest.fixture()
def st(tmp_path, cohort) -> Store:
    s = Store.init(tmp_path / "st")
    ingest_slides(s, sorted((cohort / "slides").glob("*.tiff")))
    return s


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600
    return msg


def test_expression_matrix_round_trip_and_long_view(st, cohort):
    ingest_expression(st, cohort / "expression.parquet")
    ref = pd.read_parquet(cohort / "expression.parquet").set_index("sample_id").sort_index()
    ids, genes, Y = read_matrix(st)
    assert ids == ref.index.tolist() and genes == [str(c) for c in ref.columns]
    np.testing.assert_array_equal(Y, ref.to_numpy(np.float32))
    sub_ids, sub_genes, S = read_matrix(st, genes=[genes[3], genes[0]])
    np.testing.assert_array_equal(S, Y[:, [3, 0]])
    long = st.sql("SELECT sample_id, gene, value FROM expression WHERE gene = ? ORDER BY 1", [genes[5]])
    np.testing.assert_allclose(long["value"].to_numpy(), Y[:, 5], rtol=1e-6)
    with pytest.raises(HefeatError, match="not in expression dataset"):
        read_matrix(st, genes=["NOPE1"])


def test_changed_table_changes_fingerprint_and_reingest_restores(st, cohort, tmp_path):
    """After a bad file replaced a dataset, re-ingesting the original restores it (not 'unchanged')."""
    good = cohort / "expression.parquet"
    ingest_expression(st, good)
    fp0 = expression_fingerprint(st)
    _, _, Y0 = read_matrix(st)
    df = pd.read_parquet(good)
    shuffled = df.copy()
    shuffled.iloc[:, 1:] = df.iloc[:, 1:].sample(frac=1, random_state=0).to_numpy()
    shuffled.to_parquet(tmp_path / "shuffled.parquet")
    rep = ingest_expression(st, tmp_path / "shuffled.parquet")
    assert rep.updated == ["expression"]
    fp1 = expression_fingerprint(st)
    assert fp1 != fp0
    again = ingest_expression(st, good)
    assert again.updated == ["expression"] and not again.unchanged
    assert expression_fingerprint(st) == fp0
    np.testing.assert_array_equal(read_matrix(st)[2], Y0)
    assert ingest_expression(st, good).unchanged == ["expression"]
    # Same values in another file format: same content, so unchanged too.
    df.to_csv(tmp_path / "same.csv", index=False)
    assert ingest_expression(st, tmp_path / "same.csv").unchanged == ["expression"]


@pytest.mark.parametrize("bad, match", [
    ("abc", r"1 cells are not numbers \(columns {g}\).*S02 / {g} = 'abc'"),
    ("inf", r"1 cells are infinite.*S02 / {g}"),
])
def test_bad_expression_cells_are_named_and_nothing_changes(st, cohort, tmp_path, bad, match):
    ingest_expression(st, cohort / "expression.parquet")
    fp = expression_fingerprint(st)
    df = pd.read_parquet(cohort / "expression.parquet")
    g = df.columns[3]
    match = match.format(g=g)
    df = df.astype({g: object})
    df.loc[df["sample_id"] == "S02", g] = bad
    df.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(HefeatError, match=match) as e:
        ingest_expression(st, tmp_path / "bad.csv")
    _one_line(e)
    assert expression_fingerprint(st) == fp


def test_empty_cells_are_missing_values_not_errors(st, cohort, tmp_path):
    df = pd.read_parquet(cohort / "expression.parquet")
    g = df.columns[1]
    df.loc[df["sample_id"] == "S04", g] = np.nan
    df.to_csv(tmp_path / "gap.csv", index=False)
    rep = ingest_expression(st, tmp_path / "gap.csv")
    assert any("1 empty cells" in n for n in rep.notes)
    ids, genes, Y = read_matrix(st)
    missing = np.isnan(Y)
    assert missing.sum() == 1 and missing[ids.index("S04"), genes.index(g)]
    assert st.expression_info()["n_missing"] == 1


def test_genes_by_samples_table_is_read_transposed(st, cohort, tmp_path):
    df = pd.read_parquet(cohort / "expression.parquet")
    t = df.set_index("sample_id").T.rename_axis("gene").reset_index()
    t.to_csv(tmp_path / "t.csv", index=False)
    rep = ingest_expression(st, tmp_path / "t.csv", dataset="t")
    assert any("genes x samples" in n for n in rep.notes)
    ingest_expression(st, cohort / "expression.parquet")
    a, b = read_matrix(st, "t"), read_matrix(st, "expression")
    assert a[0] == b[0] and a[1] == b[1]
    np.testing.assert_allclose(a[2], b[2], rtol=1e-6)


def test_bad_spots_are_named_and_nothing_changes(st, cohort, tmp_path):
    ingest_spots(st, cohort / "spots.parquet")
    n0 = st.sql("SELECT count(*) FROM spots").iloc[0, 0]
    sp = pd.read_parquet(cohort / "spots.parquet")
    nan = sp.copy()
    nan.loc[3, "x"] = np.nan
    nan.to_parquet(tmp_path / "nan.parquet")
    with pytest.raises(HefeatError, match=rf"coordinates: 1 cells are empty.*{sp.loc[3, 'slide_id']}:{sp.loc[3, 'spot_id']} / x") as e:
        ingest_spots(st, tmp_path / "nan.parquet")
    _one_line(e)
    text = sp.copy().astype({sp.columns[-1]: object})
    text.loc[0, sp.columns[-1]] = "lots"
    text.to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(HefeatError, match=rf"counts: 1 cells are not numbers \(columns {sp.columns[-1]}\)") as e:
        ingest_spots(st, tmp_path / "text.csv")
    _one_line(e)
    assert st.sql("SELECT count(*) FROM spots").iloc[0, 0] == n0
    assert st.sql("SELECT count(*) FROM spots WHERE NOT isfinite(x)").iloc[0, 0] == 0


def test_bad_mpp_is_refused_before_anything_is_written(tmp_path, cohort):
    st = Store.init(tmp_path / "st")
    for bad in (float("inf"), float("nan"), -1.0, 1e9):
        with pytest.raises(HefeatError, match="plausible") as e:
            ingest_slides(st, [cohort / "slides" / "S01.tiff"], mpp=bad)
        _one_line(e)
    (tmp_path / "m.csv").write_text("path,mpp\nS01.tiff,fast\n")
    with pytest.raises(HefeatError, match="row 2: MPP 'fast' is not a number"):
        ingest_slides(st, [cohort / "slides" / "S01.tiff"], manifest=tmp_path / "m.csv")
    assert st.slides().empty


def test_corrected_mpp_is_applied_refused_or_replaced(tmp_path, cohort):
    shutil.copy(cohort / "slides" / "S01.tiff", tmp_path / "S01.tiff")
    st = Store.init(tmp_path / "st")
    ingest_slides(st, [tmp_path / "S01.tiff"], mpp=0.5)
    rep = ingest_slides(st, [tmp_path / "S01.tiff"], mpp=0.25, override_mpp=True)  # no tiles yet: applied
    assert rep.updated and st.slides().iloc[0]["mpp_x"] == 0.25
    assert ingest_slides(st, [tmp_path / "S01.tiff"], mpp=0.25, override_mpp=True).unchanged == ["S01"]
    t = run_tiling(st, TilingParams(max_tiles=8))
    tid = t.extra["tiling_id"]
    n_at_025 = int(t.tiles)
    with pytest.raises(HefeatError, match=r"already has results computed at 0.25 µm/px.*--replace") as e:
        ingest_slides(st, [tmp_path / "S01.tiff"], mpp=0.5)
    _one_line(e)
    assert st.slides().iloc[0]["mpp_x"] == 0.25 and len(st.finished("tiling", tid)) == 1  # intact
    rep = ingest_slides(st, [tmp_path / "S01.tiff"], mpp=0.5, replace=True)
    assert rep.updated and st.slides().iloc[0]["mpp_x"] == 0.5
    assert st.finished("tiling", tid).empty  # its old tiles are withdrawn ...
    again = run_tiling(st, TilingParams(max_tiles=8))
    assert again.ok == ["S01"]  # ... and redone at the new MPP
    size0 = st.tiles(tid, "S01")["size0"].iloc[0]
    assert size0 == pytest.approx(224 * 0.5 / 0.5) and n_at_025 > 0


def test_older_catalog_is_upgraded_in_place(tmp_path):
    """A format-1 catalog (long expression rows) asks for `hefeat init`, which migrates it."""
    import duckdb

    root = tmp_path / "old"
    root.mkdir()
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute("CREATE TABLE slides (slide_id VARCHAR PRIMARY KEY, patient_id VARCHAR, site VARCHAR, path VARCHAR, "
                "fingerprint VARCHAR, vendor VARCHAR, width BIGINT, height BIGINT, level_count INTEGER, "
                "level_dimensions VARCHAR, mpp_x DOUBLE, mpp_y DOUBLE, mpp_source VARCHAR, objective_power DOUBLE, "
                "ingested_at TIMESTAMP)")
    con.execute("CREATE TABLE expression (dataset VARCHAR, sample_id VARCHAR, gene VARCHAR, value DOUBLE)")
    con.execute("INSERT INTO expression VALUES ('expression','A','g1',1),('expression','A','g2',2),"
                "('expression','B','g1',3),('expression','B','g2',4)")
    con.close()
    with pytest.raises(HefeatError, match="older hefeat.*hefeat init"):
        Store(root).sql("SELECT 1")
    st = Store.init(root)
    ids, genes, Y = read_matrix(st)
    assert ids == ["A", "B"] and genes == ["g1", "g2"]
    np.testing.assert_array_equal(Y, [[1, 2], [3, 4]])


NAMESPACE = textwrap.dedent("""
    set -e
    mount -t tmpfs -o size={size} tmpfs {mnt}
    {py} -m hefeat.cli init --store {mnt}/st >/dev/null
    {py} -m hefeat.cli ingest slides {slides} --store {mnt}/st >/dev/null
    {py} -m hefeat.cli ingest expression {expr} --store {mnt}/st >/dev/null
    {before}
    set +e
    {py} -m hefeat.cli ingest expression {other} --store {mnt}/st > {out}/err.txt 2>&1
    echo $? > {out}/rc.txt
    {py} -m hefeat.cli sql "SELECT fingerprint FROM expression_datasets" --json --store {mnt}/st > {out}/after.txt 2>&1
""")


def _in_namespace(tmp_path, cohort, before: str, size: str = "64m") -> tuple[int, str, str]:
    if shutil.which("unshare") is None:
        pytest.skip("unshare not available")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("user/mount namespaces not available here")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    other = tmp_path / "other.parquet"
    df = pd.read_parquet(cohort / "expression.parquet")
    df.iloc[:, 1:] = df.iloc[:, 1:] * 2
    df.to_parquet(other)
    script = NAMESPACE.format(size=size, mnt=mnt, py=sys.executable, out=tmp_path, other=other,
                              slides=" ".join(str(p) for p in sorted((cohort / "slides").glob("*.tiff"))),
                              expr=cohort / "expression.parquet", before=before.format(mnt=mnt))
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return int((tmp_path / "rc.txt").read_text()), (tmp_path / "err.txt").read_text(), (tmp_path / "after.txt").read_text()


def test_read_only_store_is_a_one_line_error_with_data_intact(tmp_path, cohort):
    rc, err, after = _in_namespace(tmp_path, cohort, "mount -o remount,ro {mnt}")
    assert rc == 1 and "not writable" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert '"fingerprint"' in after


def test_full_disk_is_a_one_line_error_with_data_intact(tmp_path, cohort):
    fill = "dd if=/dev/zero of={mnt}/filler bs=64k 2>/dev/null || true"
    rc, err, after = _in_namespace(tmp_path, cohort, fill)
    assert rc == 1 and "disk is full" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert '"fingerprint"' in after
