"""The sandbox for ad-hoc SQL: read the catalog and the store's files, write and attach nothing.

Three layers, each enough to stop what the others might miss:

1. Only read statements run: DuckDB itself splits and classifies the text
   (`duckdb.extract_statements`), and anything but SELECT (which includes DESCRIBE, SHOW,
   SUMMARIZE, FROM-first queries) or EXPLAIN is refused: COPY, EXPORT, ATTACH/DETACH,
   INSTALL/LOAD, SET/RESET, CREATE/INSERT/UPDATE/DELETE/DROP, CALL, PRAGMA, transactions.
2. The query connection is an in-memory database: the catalog is attached READ_ONLY, and file
   access is limited to the store's own directory (`enable_external_access=false` +
   `allowed_directories`), with the configuration locked so a query cannot lift it.
3. Each query runs on its own cursor, so nothing a query defines outlives it.
"""

from __future__ import annotations

from hefeat.errors import HefeatError

_ALLOWED = {"SELECT", "EXPLAIN"}


def check_read_only(query: str) -> list:
    """The statements of `query`, or a one-line HefeatError naming the first one that is not a read."""
    import duckdb

    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise HefeatError(f"SQL failed: {str(e).splitlines()[0]}") from None
    if not statements:
        raise HefeatError("SQL failed: the query is empty")
    for st in statements:
        kind = str(st.type).rsplit(".", 1)[-1]
        if kind not in _ALLOWED:
            text = " ".join(st.query.split())[:60]
            raise HefeatError(
                f"SQL refused: {kind} statements cannot run here ({text!r}); hefeat sql reads the store and "
                "writes nothing. Save results with --out, and change the store with hefeat commands."
            )
    return statements


def lock_down(con, readable_dirs: list[str]) -> None:
    """Limit a connection's file access to `readable_dirs` and lock its configuration."""
    dirs = ", ".join("'" + d.rstrip("/").replace("'", "''") + "/'" for d in readable_dirs)
    con.execute(f"SET allowed_directories = [{dirs}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")
