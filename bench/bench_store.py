"""Store benchmarks: residual write throughput vs raw disk, GROUP BY over 10M sae_acts, bytes per latent.

usage: python bench/bench_store.py [--rows-resid 200000] [--n-acts 10000000] [--dir /tmp/bench_store]
Prints one line per number, with the baseline measured in the same process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from store import RunPlan, Store, begin_run  # noqa: E402

D_MODEL = 896                      # the default model's width
ROWS_PER_BATCH = 640               # 16 prompts x 40 tokens, one extraction batch


def residual_like(n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Residual-stream-like rows: heavy-tailed, a few outlier dimensions."""
    x = rng.standard_t(df=5, size=(n_rows, D_MODEL)).astype(np.float32) * 2.0
    x[:, :4] *= 30.0
    return x


def empty_plan(run_id: str, n_rows: int) -> RunPlan:
    empty_prompts = pl.DataFrame(schema={"prompt_id": pl.String, "dataset": pl.String, "idx": pl.Int32,
                                         "split": pl.String, "label": pl.Int8, "category": pl.String,
                                         "text": pl.String})
    empty_chats = pl.DataFrame(schema={"model": pl.String, "prompt_id": pl.String, "chat_text": pl.String,
                                       "n_tokens": pl.Int32})
    return RunPlan(run_id, "bench", {}, {}, {}, 0, n_rows, empty_prompts, empty_chats)


def bench_resid_write(root: Path, n_rows: int) -> None:
    rng = np.random.default_rng(0)
    batches = [residual_like(ROWS_PER_BATCH, rng) for _ in range(8)]
    n_batches = n_rows // ROWS_PER_BATCH
    n_bytes = n_batches * ROWS_PER_BATCH * D_MODEL * 4

    raw = root / "raw.bin"
    t0 = time.perf_counter()
    with open(raw, "wb") as f:
        for k in range(n_batches):
            f.write(batches[k % 8].tobytes())
        f.flush()
        os.fsync(f.fileno())
    t_raw = time.perf_counter() - t0
    raw.unlink()

    store = Store.create(root / "store")
    writer = begin_run(store, empty_plan("resid", n_batches * ROWS_PER_BATCH))
    writer.array("resid/12", (n_batches * ROWS_PER_BATCH, D_MODEL))
    t0 = time.perf_counter()
    for k in range(n_batches):
        writer.submit(k, [("resid/12", k * ROWS_PER_BATCH, batches[k % 8])], {})
    writer.flush()
    _fsync_tree(store.array_path("resid", "resid/12"))
    t_zarr = time.perf_counter() - t0
    writer.commit()
    on_disk = _du(store.array_path("resid", "resid/12"))
    print(f"resid write  raw sequential {n_bytes / t_raw / 1e6:7.1f} MB/s -> zarr via RunWriter "
          f"{n_bytes / t_zarr / 1e6:7.1f} MB/s  ratio {t_raw / t_zarr:.2f}  (target >= 0.5; "
          f"{n_batches * ROWS_PER_BATCH} rows x {D_MODEL}, float32, compressed to {on_disk / n_bytes:.2f} of raw)")


def synthetic_acts(n_acts: int, rng: np.random.Generator, d_sae: int = 4096, l0: int = 32,
                   n_layers: int = 10) -> pl.DataFrame:
    """Sorted (row, layer) with `l0` latents each; features Zipf-like; values exponential."""
    n_cells = n_acts // l0
    rows = np.repeat(np.arange(n_cells // n_layers, dtype=np.int32), n_layers * l0)[:n_acts]
    layers = np.tile(np.repeat(np.arange(n_layers, dtype=np.int16), l0), n_cells // n_layers + 1)[:n_acts]
    weights = 1.0 / np.arange(1, d_sae + 1) ** 0.8
    features = rng.choice(d_sae, size=n_acts, p=weights / weights.sum()).astype(np.int32)
    values = rng.exponential(2.0, size=n_acts).astype(np.float32)
    return pl.DataFrame({"run_id": ["acts"] * n_acts, "row": rows, "layer": layers,
                         "feature": features, "value": values})


def bench_sae_acts(root: Path, n_acts: int) -> None:
    rng = np.random.default_rng(0)
    acts = synthetic_acts(n_acts, rng)
    store = Store.create(root / "acts_store")
    size_before = _du(root / "acts_store" / "catalog.duckdb")
    writer = begin_run(store, empty_plan("acts", int(acts["row"].max()) + 1))
    per = 1_000_000
    for k in range(0, n_acts, per):
        writer.submit(k // per, [], {"sae_acts": acts.slice(k, per)})
    t0 = time.perf_counter()
    writer.commit()
    t_commit = time.perf_counter() - t0
    with store.transaction() as con:
        con.execute("CHECKPOINT")
    size = _du(root / "acts_store" / "catalog.duckdb") - size_before

    query = "SELECT layer, feature, count(*) AS n, avg(value) AS mean FROM sae_acts GROUP BY layer, feature"
    store.sql(query)                                       # warm-up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        out = store.sql(query)
        times.append(time.perf_counter() - t0)
    t_np = _numpy_group_by(acts)
    print(f"sae_acts     GROUP BY layer, feature over {n_acts / 1e6:.0f}M rows: {min(times):.3f} s "
          f"(median {np.median(times):.3f} s; target < 1 s; {out.height} groups); numpy bincount baseline "
          f"{t_np:.3f} s  ratio {min(times) / t_np:.2f}")
    print(f"sae_acts     {size / n_acts:.2f} bytes on disk per stored latent (target <= 4; catalog grew "
          f"{size / 1e6:.1f} MB); commit of {n_acts / 1e6:.0f}M staged rows {t_commit:.2f} s")


def _numpy_group_by(acts: pl.DataFrame) -> float:
    layer = acts["layer"].to_numpy().astype(np.int64)
    feature = acts["feature"].to_numpy().astype(np.int64)
    value = acts["value"].to_numpy()
    t0 = time.perf_counter()
    key = layer * 4096 + feature
    n = np.bincount(key)
    s = np.bincount(key, weights=value)
    _ = s[n > 0] / n[n > 0]
    return time.perf_counter() - t0


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows-resid", type=int, default=64_000)
    ap.add_argument("--n-acts", type=int, default=10_000_000)
    ap.add_argument("--dir", default="/tmp/bench_store")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print(f"store bench on {os.cpu_count()} cores, dir {root}")
    bench_resid_write(root, args.rows_resid)
    bench_sae_acts(root, args.n_acts)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
