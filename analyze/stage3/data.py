"""Stage 3's data set: one sparse row of SAE activations per prompt, read from `sae_acts` by SQL.

A column is one SAE latent, a (layer, feature) pair. A prompt's value for it is the SUM of the
latent over the prompt's last `n_last` token positions (paper: last 4 tokens, layers 2..l*).
Summing instead of keying by position keeps one FM embedding per latent, which is exactly the unit
that stage 3 zero-ablates (at every position), so a ranked column is an ablation, and a stage-2
feature has one embedding to compare with, not four.

Columns are the latents active on at least `min_train_prompts` training prompts: a latent never
seen in training keeps its random initial FM embedding, so its cosine to anything is noise.

Never densified ([n_prompts, n_layers * d_sae] does not fit for Gemma Scope 65k x 15 layers):
the rows are CSR arrays (indptr, indices, values) with int64 offsets, turned into a torch or
scipy sparse matrix on demand.

A prompt's activations come from an unablated run of the model with the wanted SAE at that layer
whose rows cover the last `n_last` positions (positions "all" or "last:N", N >= n_last); when
several runs qualify, the most recently completed one. Runs that stored latents only above a
threshold higher than `threshold` (default 0: every positive latent) do not qualify. `missing` says
which (layer, prompt) pairs have none, so the caller extracts only those.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse
import torch

from extract.interventions import Intervention
from store import Store, UsageError

SPLITS = ("train", "val", "test")

# One (run, item) per (prompt, layer): unablated, complete, right model and SAE, enough positions, and
# a storage threshold no higher than asked (runs that keep SAEs only to ablate store no rows at all).
_SOURCES = """
SELECT w.i, w.prompt_id, l.layer, i.run_id, i.item, i.n_tokens
FROM wanted_prompts w
JOIN items i ON i.prompt_id = w.prompt_id
JOIN runs r ON r.run_id = i.run_id
JOIN layers l ON l.run_id = i.run_id
JOIN wanted_layers s ON s.layer = l.layer AND s.sae_id = l.sae_id
WHERE r.status = 'complete' AND r.model = $model AND i.spec_hash = $empty_spec
  AND i.n_rows >= least($n_last, i.n_tokens)
  AND coalesce(CAST(r.settings->>'threshold' AS DOUBLE), 0) <= $threshold
QUALIFY row_number() OVER (PARTITION BY w.prompt_id, l.layer
                           ORDER BY r.completed_at DESC, i.run_id, i.item) = 1
"""

_VALUES = f"""
WITH src AS ({_SOURCES})
SELECT src.i, a.layer, a.feature, sum(a.value) AS value
FROM src
JOIN tokens t ON t.run_id = src.run_id AND t.item = src.item AND t.pos >= src.n_tokens - $n_last
JOIN sae_acts a ON a.run_id = t.run_id AND a.row = t.row AND a.layer = src.layer
GROUP BY ALL
"""


@dataclass(frozen=True, eq=False)
class FmData:
    """Sparse SAE activations, one row per prompt; CSR with column ids ascending within a row."""

    prompt_ids: tuple[str, ...]        # row order
    split: np.ndarray                  # [n_rows] str: train | val | test
    label: np.ndarray                  # [n_rows] int8: 1 harmful, 0 benign
    indptr: np.ndarray                 # [n_rows + 1] int64
    indices: np.ndarray                # [nnz] int64 column ids
    values: np.ndarray                 # [nnz] float32
    layer: np.ndarray                  # [n_features] int64: column -> SAE layer
    feature: np.ndarray                # [n_features] int64: column -> SAE latent

    def __post_init__(self) -> None:
        assert self.indptr.shape == (len(self.prompt_ids) + 1,) and self.indptr[-1] == len(self.indices)
        assert self.values.shape == self.indices.shape and self.layer.shape == self.feature.shape
        assert len(self.split) == len(self.label) == len(self.prompt_ids)

    @property
    def n_rows(self) -> int:
        return len(self.prompt_ids)

    @property
    def n_features(self) -> int:
        return len(self.layer)

    @property
    def nnz(self) -> int:
        return len(self.indices)

    def rows(self, mask: np.ndarray) -> "FmData":
        """The rows where `mask` is true (same columns)."""
        keep = np.flatnonzero(mask)
        lengths = np.diff(self.indptr)[keep]
        take = _ranges(self.indptr[keep], lengths)
        return FmData(tuple(self.prompt_ids[r] for r in keep), self.split[keep], self.label[keep],
                      np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                      self.indices[take], self.values[take], self.layer, self.feature)

    def column_scale(self) -> np.ndarray:
        """Max |value| of each column over the training rows (1 where a column is all zero): [n_features]."""
        train = np.repeat(self.split == "train", np.diff(self.indptr))
        scale = np.zeros(self.n_features, dtype=np.float32)
        np.maximum.at(scale, self.indices[train], np.abs(self.values[train]))
        return np.where(scale > 0, scale, 1.0).astype(np.float32)

    def scaled(self, scale: np.ndarray) -> "FmData":
        """Every value divided by its column's scale (max-abs scaling keeps the zeros zero)."""
        return FmData(self.prompt_ids, self.split, self.label, self.indptr, self.indices,
                      (self.values / scale[self.indices]).astype(np.float32), self.layer, self.feature)

    def columns(self, layers: Sequence[int], features: Sequence[int]) -> np.ndarray:
        """Column id of each (layer, feature) pair, -1 for a pair that is not a column: [n_pairs]."""
        keys = _key(self.layer, self.feature)                       # ascending: columns are sorted
        want = _key(np.asarray(layers, dtype=np.int64), np.asarray(features, dtype=np.int64))
        if not len(keys):
            return np.full(len(want), -1, dtype=np.int64)
        at = np.searchsorted(keys, want).clip(max=len(keys) - 1)
        return np.where(keys[at] == want, at, -1).astype(np.int64)

    def to_scipy(self) -> scipy.sparse.csr_matrix:
        """[n_rows, n_features] CSR."""
        return scipy.sparse.csr_matrix((self.values, self.indices, self.indptr), shape=(self.n_rows, self.n_features))

    def to_torch(self) -> torch.Tensor:
        """[n_rows, n_features] torch sparse CSR."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(torch.from_numpy(self.indptr), torch.from_numpy(self.indices),
                                           torch.from_numpy(self.values), (self.n_rows, self.n_features),
                                           check_invariants=True)

    def fingerprint(self) -> str:
        """sha256 over rows, labels, splits, columns and values [:16]: the data's identity in model ids."""
        h = hashlib.sha256()
        h.update("\x00".join(self.prompt_ids).encode())
        h.update("\x00".join(self.split.tolist()).encode())
        for arr in (self.label.astype(np.int8), self.indptr, self.indices, self.values, self.layer, self.feature):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]


def missing(store: Store, model: str, prompt_ids: Sequence[str], sae_ids: Mapping[int, str],
            n_last: int = 4, threshold: float = 0.0) -> dict[int, tuple[str, ...]]:
    """layer -> the prompts without usable activations at that layer; {} when nothing is missing."""
    params, frames = _inputs(model, prompt_ids, sae_ids, n_last, threshold)
    found = store.fetch_numpy(_SOURCES, params, frames)
    have = set(zip(found["layer"].tolist(), found["prompt_id"].tolist()))
    out = {}
    for layer in sorted(sae_ids):
        absent = tuple(p for p in dict.fromkeys(prompt_ids) if (layer, p) not in have)
        if absent:
            out[layer] = absent
    return out


def build(store: Store, model: str, prompt_ids: Sequence[str], sae_ids: Mapping[int, str],
          n_last: int = 4, min_train_prompts: int = 1, threshold: float = 0.0) -> FmData:
    """The data set over `prompt_ids` (in that order) at the layers of `sae_ids` ({layer: sae_id})."""
    if len(set(prompt_ids)) != len(prompt_ids):
        raise UsageError("the FM data set's prompts must be distinct")
    if not sae_ids:
        raise UsageError("the FM data set needs at least one layer")
    absent = missing(store, model, prompt_ids, sae_ids, n_last, threshold)
    if absent:
        n = len({p for ps in absent.values() for p in ps})
        raise UsageError(f"{n} prompts have no unablated SAE activations (last {n_last} positions) at layers "
                         f"{sorted(absent)} for {model}; extract them first (analyze stage3 does so itself)")
    meta = _prompt_meta(store, prompt_ids)
    params, frames = _inputs(model, prompt_ids, sae_ids, n_last, threshold)
    acts = store.fetch_numpy(_VALUES, params, frames)
    return _to_csr(prompt_ids, meta, acts, min_train_prompts)


def _inputs(model: str, prompt_ids: Sequence[str], sae_ids: Mapping[int, str], n_last: int,
            threshold: float) -> tuple[dict, dict[str, pl.DataFrame]]:
    if n_last < 1:
        raise UsageError(f"n_last must be >= 1, got {n_last}")
    frames = {
        "wanted_prompts": pl.DataFrame({"i": np.arange(len(prompt_ids), dtype=np.int64),
                                        "prompt_id": list(prompt_ids)}, schema={"i": pl.Int64, "prompt_id": pl.String}),
        "wanted_layers": pl.DataFrame({"layer": list(sae_ids), "sae_id": list(sae_ids.values())},
                                      schema={"layer": pl.Int16, "sae_id": pl.String}),
    }
    params = {"model": model, "empty_spec": Intervention().spec_hash(), "n_last": n_last, "threshold": threshold}
    return params, frames


def _prompt_meta(store: Store, prompt_ids: Sequence[str]) -> pl.DataFrame:
    wanted = pl.DataFrame({"i": np.arange(len(prompt_ids), dtype=np.int64), "prompt_id": list(prompt_ids)})
    meta = store.sql("SELECT w.i, p.split, p.label FROM wanted w JOIN prompts p USING (prompt_id) ORDER BY w.i",
                     frames={"wanted": wanted})
    if meta.height != len(prompt_ids):
        raise UsageError(f"{len(prompt_ids) - meta.height} prompts are not in the store's prompts table")
    return meta


def _to_csr(prompt_ids: Sequence[str], meta: pl.DataFrame, acts: dict[str, np.ndarray],
            min_train_prompts: int) -> FmData:
    split = meta["split"].to_numpy().astype(str)
    row = acts["i"].astype(np.int64)
    keys = _key(acts["layer"].astype(np.int64), acts["feature"].astype(np.int64))
    uniq, col = np.unique(keys, return_inverse=True)
    n_train = np.bincount(col, weights=(split[row] == "train"), minlength=len(uniq))   # one entry per (prompt, latent)
    keep_col = n_train >= min_train_prompts
    new_id = np.cumsum(keep_col) - 1                                   # ascending (layer, feature) stays ascending
    keep = keep_col[col]
    row, col, value = row[keep], new_id[col[keep]], acts["value"][keep].astype(np.float32)
    order = np.lexsort((col, row))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=len(prompt_ids)))]).astype(np.int64)
    kept = uniq[keep_col]
    return FmData(tuple(prompt_ids), split, meta["label"].to_numpy().astype(np.int8), indptr,
                  col[order].astype(np.int64), value[order], kept >> 32, kept & 0xFFFFFFFF)


def _key(layer: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """(layer, feature) as one sortable int64: layer in the high 32 bits."""
    return (layer.astype(np.int64) << 32) | feature.astype(np.int64)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated [start, start + length) index ranges."""
    total = int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, dtype=np.int64)
    return np.arange(total, dtype=np.int64) - np.repeat(offsets - starts, lengths)
