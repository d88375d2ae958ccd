"""The activation store: DuckDB catalog + Zarr arrays. Every DuckDB and Zarr call lives here."""

from store.errors import StoreDamaged, StoreError, UsageError
from store.runs import RunPlan, RunWriter, begin_run
from store.store import Store

__all__ = ["RunPlan", "RunWriter", "Store", "StoreDamaged", "StoreError", "UsageError", "begin_run"]
