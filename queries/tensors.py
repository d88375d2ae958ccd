"""SQL plus tensors: turn the rows a query selects into tensors gathered from the store."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from store import Store, UsageError


def residuals(store: Store, rows: pl.DataFrame, layer: int) -> torch.Tensor:
    """Residuals at `layer` for the (run_id, row) pairs of `rows`, in their order: [n, d_model]."""
    _need_columns(rows, ("run_id", "row"))
    out: torch.Tensor | None = None
    for (run_id,), group in rows.with_row_index("_i").group_by(["run_id"], maintain_order=True):
        array = _resid_array(store, run_id, layer)
        block = torch.from_numpy(store.read_rows(run_id, array, group["row"].to_numpy()))
        if out is None:
            out = torch.empty(rows.height, block.shape[1], dtype=block.dtype)   # [n, d_model]
        out[torch.from_numpy(group["_i"].to_numpy().astype(np.int64))] = block
    return out if out is not None else torch.zeros(0, 0)


def sae_codes(store: Store, rows: pl.DataFrame, layer: int, d_sae: int) -> torch.Tensor:
    """Dense SAE codes at `layer` for the (run_id, row) pairs of `rows`, from `sae_acts`: [n, d_sae]."""
    _need_columns(rows, ("run_id", "row"))
    keyed = rows.select("run_id", "row").with_row_index("i")
    cols = store.fetch_numpy(
        "SELECT w.i, a.feature, a.value FROM wanted w "
        "JOIN sae_acts a ON a.run_id = w.run_id AND a.row = w.row AND a.layer = ?",
        [layer], frames={"wanted": keyed},
    )
    dense = torch.zeros(rows.height, d_sae)                                   # [n, d_sae]
    dense[torch.from_numpy(cols["i"].astype(np.int64)), torch.from_numpy(cols["feature"].astype(np.int64))] = \
        torch.from_numpy(cols["value"].astype(np.float32))
    return dense


def reconstructions(store: Store, rows: pl.DataFrame, layer: int, sae) -> torch.Tensor:
    """The SAE's reconstruction (decode of the stored codes) for `rows`: [n, d_model]."""
    codes = sae_codes(store, rows, layer, int(sae.cfg.d_sae))
    with torch.no_grad():
        return sae.decode(codes.to(sae.W_dec.dtype)).float()


def _resid_array(store: Store, run_id: str, layer: int) -> str:
    found = store.sql("SELECT resid_array FROM layers WHERE run_id = ? AND layer = ?", [run_id, layer])
    if found.is_empty() or found["resid_array"][0] is None:
        raise UsageError(f"no residuals for run {run_id} layer {layer}; run "
                         f"`python cli.py extract --layers {layer}` first")
    return found["resid_array"][0]


def _need_columns(rows: pl.DataFrame, names: tuple[str, ...]) -> None:
    missing = [n for n in names if n not in rows.columns]
    if missing:
        raise UsageError(f"the query result needs columns {list(names)}; missing {missing}")
