"""The store: a directory of Parquet/HDF5/JSON files indexed by a DuckDB catalog."""

from hefeat.store.catalog import Store, open_store

__all__ = ["Store", "open_store"]
