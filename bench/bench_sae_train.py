"""SAE training: sae-lens's dense TopK step against the gathered step (extract/sae_sparse.py), in one process.

Both train the same SAE (settings, seed, rows) for the same steps through `train_layer`; it prints seconds
per step, the speedup, the last training loss and the held-out FVU of each. Rows are a layer's real
residuals from a store whose SAEs were trained (`--store`, `--layer`: the training runs recorded in the
SAE's metrics), or synthetic rows of the default model's width without one.

    python bench/bench_sae_train.py --store stores/paper --layer 12 --steps 60
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from extract import sae_train as st  # noqa: E402
from store import Store  # noqa: E402


def rows(store_path: str | None, layer: int, d: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(training rows, held-out rows, where they come from)."""
    if store_path is None:
        g = torch.Generator().manual_seed(0)
        dirs = torch.randn(2048, d, generator=g)
        codes = (torch.rand(40_000, 2048, generator=g) < 0.01).float() * torch.rand(40_000, 2048, generator=g)
        x = codes @ dirs + 0.1 * torch.randn(40_000, d, generator=g)
        return x[:32_000], x[32_000:], f"synthetic rows (d {d})"
    store = Store.open(store_path)
    found = store.sql("SELECT metrics FROM saes WHERE layer = ? AND metrics IS NOT NULL LIMIT 1", [layer])
    if not found.height:
        sys.exit(f"error: no trained SAE at layer {layer} in {store_path}")
    data = st.layer_data(store, json.loads(found["metrics"][0])["runs"], layer, st.TrainSettings.massive_ratio)
    return data.train, data.eval, f"layer {layer} residuals of {store_path} ({len(data.train)} rows)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None)
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--width", type=int, default=st.TrainSettings.width)
    ap.add_argument("--k", type=int, default=st.TrainSettings.k)
    args = ap.parse_args()

    train, held, source = rows(args.store, args.layer, 896)
    batch = st.TrainSettings.batch_size
    train = train[:args.steps * batch]
    base = st.TrainSettings(layers=(args.layer,), width=args.width, k=args.k, tokens=len(train), epochs=1.0,
                            sparse=False)
    print(f"{source}; width {args.width}, k {args.k}, batch {batch}, {len(train) // batch} steps each")
    seconds = {}
    for sparse in (False, True):
        settings = dataclasses.replace(base, sparse=sparse)
        t0 = time.perf_counter()
        sae, stats = st.train_layer(train, settings, args.layer, desc="gathered" if sparse else "dense")
        seconds[sparse] = (time.perf_counter() - t0) / stats["steps"]
        fvu = st.fvu(held, st.reconstruct(sae, held)[0])
        print(f"{'gathered' if sparse else 'dense   '}: {seconds[sparse] * 1000:6.1f} ms/step, "
              f"last loss {stats['last_loss']:.4g}, held-out FVU {fvu:.4f}", flush=True)
    print(f"speedup of the gathered step: {seconds[False] / seconds[True]:.2f}x")


if __name__ == "__main__":
    main()
