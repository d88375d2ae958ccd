"""Stage 3's fitted models, cached in `fm_models` (and their weights in safetensors): FM, probe, diagnostics."""


from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import torch
from safetensors.torch import load_file, save_file

from analyze.common import Log, analysis_id
from analyze.stage3 import fm as fm_mod
from analyze.stage3 import probe as probe_mod
from analyze.stage3.data import FmData
from analyze.stage3.fm import FmFit, FmSettings
from analyze.stage3.probe import ProbeFit, ProbeSettings
from store import Store
from store.store import code_version

if TYPE_CHECKING:
    from analyze.stage3.stage import Stage3Settings


def fit_fm(store: Store, data: FmData, settings: FmSettings, info: Mapping[str, Any]) -> tuple[FmFit, str]:
    """The FM for (settings, data): loaded from `fm_models` when fitted before, else fitted and saved."""
    stored_settings = {**asdict(settings), "device": str(settings.resolved_device())}
    model_id = analysis_id("fm_model", info["model"], None, settings, {"settings": stored_settings, "data": info})
    found = _load_row(store, model_id)
    if found is not None:
        row, tensors = found
        metrics = json.loads(row["metrics"])
        history = tuple(fm_mod.EpochStats(**h) for h in metrics["history"])
        fit = FmFit(fm_mod.FactorizationMachine.from_tensors(tensors).eval(), settings, row["best_epoch"],
                    history, metrics["accuracy"])
        return fit, model_id
    fit = fm_mod.fit(data, settings)
    metrics = {"accuracy": fit.accuracy, "history": [asdict(h) for h in fit.history]}
    _save_row(store, model_id, "fm", info, stored_settings, metrics, fit.accuracy,
              {**fit.model.tensors(), **_columns(data)}, embedding=settings.embedding,
              best_epoch=fit.best_epoch, mean_cosine=fit.mean_cosine)
    return fit, model_id


def fit_probe(store: Store, data: FmData, settings: ProbeSettings, info: Mapping[str, Any]) -> tuple[ProbeFit, str]:
    """The probe for (settings, data): loaded from `fm_models` when fitted before, else fitted and saved."""
    model_id = analysis_id("probe_model", info["model"], None, settings, {"data": info})
    found = _load_row(store, model_id)
    if found is not None:
        row, tensors = found
        metrics = json.loads(row["metrics"])
        fit = ProbeFit(tensors["coef"].double().numpy(), float(tensors["intercept"][0]), metrics["C"],
                       metrics["accuracy"], {float(c): a for c, a in metrics["val_acc_by_C"]})
        return fit, model_id
    fit = probe_mod.fit(data, settings)
    metrics = {"accuracy": fit.accuracy, "C": fit.C, "val_acc_by_C": sorted(fit.val_acc_by_C.items())}
    tensors = {"coef": torch.from_numpy(fit.coef), "intercept": torch.tensor([fit.intercept], dtype=torch.float64)}
    _save_row(store, model_id, "probe", info, asdict(settings), metrics, fit.accuracy, {**tensors, **_columns(data)})
    return fit, model_id


def _similarity(store: Store, data: FmData, settings: Stage3Settings, info: Mapping[str, Any],
                main: tuple[FmFit, str], log: Log) -> pl.DataFrame:
    rows = []
    for k in sorted(set(settings.diagnostic_embeddings) | {settings.fm.embedding}):
        fit, model_id = main if k == settings.fm.embedding else fit_fm(store, data, replace(settings.fm, embedding=k), info)
        log(f"FM k={k}: test acc {fit.accuracy['test']:.3f}, mean pairwise cosine {fit.mean_cosine:.3f}")
        rows.append({"embedding": k, "model_id": model_id, "best_epoch": fit.best_epoch,
                     "test_acc": fit.accuracy["test"], "mean_cosine": fit.mean_cosine})
    return pl.DataFrame(rows)


def _columns(data: FmData) -> dict[str, torch.Tensor]:
    return {"layer": torch.from_numpy(data.layer), "feature": torch.from_numpy(data.feature)}


def weights_path(store: Store, model_id: str) -> Path:
    """Where a fitted model's safetensors file lives: <store>/models/<model_id>.safetensors."""
    return store.path / "models" / f"{model_id}.safetensors"


def _load_row(store: Store, model_id: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    df = store.sql("SELECT * FROM fm_models WHERE model_id = ?", [model_id])
    if df.is_empty() or not (store.path / df["weights"][0]).exists():
        return None
    row = df.row(0, named=True)
    return row, load_file(str(store.path / row["weights"]))


def _save_row(store: Store, model_id: str, kind: str, info: Mapping[str, Any], settings: Mapping[str, Any],
              metrics: Mapping[str, Any], accuracy: Mapping[str, float], tensors: dict[str, torch.Tensor],
              embedding: int | None = None, best_epoch: int | None = None, mean_cosine: float | None = None) -> None:
    path = weights_path(store, model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)                                   # the row below never points at a partial file
    with store.transaction() as con:
        con.execute("DELETE FROM fm_models WHERE model_id = ?", [model_id])
        con.execute("INSERT INTO fm_models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            model_id, kind, info["model"], embedding, info["n_features"], accuracy["train"], accuracy["val"],
            accuracy["test"], best_epoch, mean_cosine, json.dumps(settings), json.dumps(info), json.dumps(metrics),
            str(path.relative_to(store.path)), datetime.now(timezone.utc).replace(tzinfo=None), code_version()])


