"""Ad-hoc SQL reads the catalog and the store's files, and can write or attach nothing."""

from __future__ import annotations

import hashlib

import pytest
from click.testing import CliRunner

from hefeat.cli import main
from hefeat.errors import HefeatError
from hefeat.store.catalog import Store


def _digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def two_stores(tmp_path, tiled):
    """A copy of the session store (so nothing shared is at risk) and a second, empty store."""
    import shutil

    st0, tid, _ = tiled
    shutil.copytree(st0.root, tmp_path / "a")
    return Store(tmp_path / "a"), Store.init(tmp_path / "b"), tid


BAD = [
    ("COPY (SELECT 1 AS x) TO '{a}/catalog.duckdb' (FORMAT csv)", "COPY"),
    ("COPY (SELECT * FROM tiles LIMIT 5) TO '{a}/tiles/tiling={tid}/slide=ZZ.parquet' (FORMAT parquet)", "COPY"),
    ("ATTACH '{b}/catalog.duckdb' AS other (READ_WRITE)", "ATTACH"),
    ("SELECT 1; ATTACH '{b}/catalog.duckdb' AS other; DROP TABLE other.slides", "ATTACH"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("SET enable_external_access = true", "SET"),
    ("CREATE TABLE x AS SELECT 1", "CREATE"),
    ("DELETE FROM slides", "DELETE"),
    ("EXPORT DATABASE '{a}/exported'", "EXPORT"),
    ("DETACH hefeat_catalog", "DETACH"),
    ("CALL duckdb_settings()", "CALL"),
    ("PRAGMA database_list", "PRAGMA"),
]


@pytest.mark.parametrize("query, kind", BAD)
def test_writes_attaches_and_settings_are_refused(two_stores, query, kind):
    a, b, tid = two_stores
    before_a, before_b = _digest(a.root), _digest(b.root)
    q = query.format(a=a.root, b=b.root, tid=tid)
    with pytest.raises(HefeatError, match=f"SQL refused: {kind}") as e:
        a.sql(q)
    assert "\n" not in str(e.value)
    assert _digest(a.root) == before_a and _digest(b.root) == before_b
    assert len(a.sql("SELECT * FROM slides")) == 8  # the store still works


def test_cli_sql_refuses_copy_with_exit_code(two_stores):
    a, _, _ = two_stores
    r = CliRunner().invoke(main, ["sql", f"COPY (SELECT 1 AS x) TO '{a.root}/catalog.duckdb' (FORMAT csv)",
                                  "--store", str(a.root)])
    assert r.exit_code != 0 and "SQL refused: COPY" in r.output and "Traceback" not in r.output
    ok = CliRunner().invoke(main, ["sql", "SELECT count(*) AS n FROM slides", "--store", str(a.root), "--json"])
    assert ok.exit_code == 0 and '"n":8' in ok.output


def test_reads_store_files_but_not_outside(two_stores, tmp_path):
    a, b, tid = two_stores
    n = a.sql(f"SELECT count(*) n FROM read_parquet('{a.root}/tiles/tiling={tid}/*.parquet')").iloc[0, 0]
    assert n == a.sql("SELECT count(*) FROM tiles", tiling=tid).iloc[0, 0]
    secret = tmp_path / "secret.csv"
    secret.write_text("x\n1\n")
    with pytest.raises(HefeatError, match="SQL failed: .*(Permission|disabled)"):
        a.sql(f"SELECT * FROM read_csv('{secret}')")
    with pytest.raises(HefeatError, match="SQL failed"):
        a.sql(f"SELECT * FROM read_parquet('{b.root}/../b/catalog.duckdb')")


def test_describe_summarize_explain_and_ctes_are_reads(two_stores):
    a, _, tid = two_stores
    assert "slide_id" in a.sql("DESCRIBE tiles")["column_name"].tolist()
    assert len(a.sql("SUMMARIZE slides")) > 3
    assert len(a.sql("EXPLAIN SELECT * FROM slides")) >= 1
    got = a.sql("WITH s AS (SELECT slide_id FROM slides) SELECT count(*) n FROM s").iloc[0, 0]
    assert got == 8
    assert a.sql("FROM slides SELECT count(*) AS n").iloc[0, 0] == 8


def test_tiling_scoped_queries_cannot_mix_tilings(tiled):
    """With a tiling, `tiles` holds that tiling only; tile_query refuses another tiling or repeated tiles."""
    st, tid, spot_tid = tiled
    all_rows = st.sql("SELECT count(*) FROM tiles").iloc[0, 0]
    one = st.sql("SELECT count(*) FROM tiles", tiling=tid).iloc[0, 0]
    other = st.sql("SELECT count(*) FROM tiles", tiling=spot_tid).iloc[0, 0]
    assert one + other == all_rows and one > 0 and other > 0
    rows = st.tile_query("SELECT slide_id, tile_id, sharpness FROM tiles WHERE slide_id = 'S01'", tid)
    assert len(rows) == len(st.tiles(tid, "S01"))
    with pytest.raises(HefeatError, match="tiling"):
        st.tile_query(f"SELECT tiling_id, slide_id, tile_id FROM tiles WHERE tiling_id = '{tid}'", spot_tid)
    with pytest.raises(HefeatError, match="more than once"):
        st.tile_query("SELECT slide_id, tile_id FROM tiles UNION ALL SELECT slide_id, tile_id FROM tiles", tid)
    with pytest.raises(HefeatError, match="does not exist"):
        st.sql("SELECT 1", tiling="tnope")
