"""Upgrade catalogs written by older hefeat versions in place (called by `Store.init`)."""

from __future__ import annotations

import numpy as np


def _tables(con) -> dict[str, str]:
    return {r[0]: r[1] for r in con.execute(
        "SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}


def migrate(con) -> list[str]:
    """Bring a catalog to the current format inside the caller's transaction; returns what was done."""
    from hefeat.store.expression import write_matrix

    done = []
    tables = _tables(con)
    if tables.get("expression") == "BASE TABLE":  # format 1: long expression rows -> wide matrix
        for (ds,) in con.execute("SELECT DISTINCT dataset FROM expression ORDER BY 1").fetchall():
            long = con.execute("SELECT sample_id, gene, value FROM expression WHERE dataset = ?", [ds]).df()
            wide = long.pivot(index="sample_id", columns="gene", values="value").sort_index()
            write_matrix(con, ds, [str(s) for s in wide.index], [str(g) for g in wide.columns],
                         wide.to_numpy(np.float32), source="migrated from format 1", source_fingerprint=None,
                         orientation="long")
            done.append(f"expression {ds}: long rows -> matrix")
        con.execute("DROP TABLE expression")
    return done
