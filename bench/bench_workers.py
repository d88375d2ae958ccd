"""Ray workers vs the in-process path on the same items: wall time, items/s, and a measured scaling model.

usage: python bench/bench_workers.py [--model qwen-coder-0.5b] [--n-prompts 16] [--batch-size 4]
                                     [--layers 12] [--workers 1,2] [--repeats 2]

Every timing is one extraction into a fresh temporary store, after a warm-up run on other items (models
loaded, first-call costs paid). Prints, for the in-process path and for 1, 2 ... Ray workers, the best
of --repeats: wall time, items/s and the ratio to in-process (1 Ray worker: Ray's overhead).

The scaling model, from two measurements in this process:
  t_shard   compute time of one batch (`_run_batch`, in process)
  t_driver  the driver's own time for the run: planning, writing every batch and the commit, measured by
            replaying precomputed batches through `extract` (a pool that computes nothing)
With N workers the batches run N at a time while the driver writes in the background, so
  wall(N) ~= max(ceil(B / N) * t_shard, t_driver) + ray_overhead,  items/s = n_items / wall(N),
and throughput stops growing at N* = B * t_shard / t_driver workers.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from extract import workers  # noqa: E402
from extract.datasets import load_prompts  # noqa: E402
from extract.layers import parse_layers  # noqa: E402
from extract.models import load_model  # noqa: E402
from extract.run import ExtractSettings, extract, make_items  # noqa: E402
from store import Store  # noqa: E402


class ReplayPool:
    """A pool that hands back batches computed before: what is left of `extract` is the driver's work."""

    name = "replay"

    def __init__(self, computed: dict[int, tuple]) -> None:
        self.computed = computed

    def compute(self, model, job, todo):
        for chunk, _ in todo:
            yield chunk, self.computed[chunk]

    def status(self) -> str:
        return ""


def timed(model, items, settings) -> float:
    root = Path(tempfile.mkdtemp(prefix="bench_workers_"))
    try:
        store = Store.create(root / "s")                 # creating a store (its migrations) is not the run's time
        t0 = time.perf_counter()
        extract(store, model, items, (), settings)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)


def shard_times(model, items, settings) -> tuple[list[float], dict[int, tuple]]:
    """Each batch's compute time in this process, and its result (for the replay)."""
    from extract.run import plan_run, processing_order

    _, row_start = plan_run(model, (), settings, items)
    order = processing_order(items)
    batches = [order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    job = workers.Job("bench", (), settings, items, row_start, np.float32)
    times, computed = [], {}
    for chunk, batch in enumerate(batches):
        t0 = time.perf_counter()
        computed[chunk] = job.compute(model, (), batch)
        times.append(time.perf_counter() - t0)
    return times, computed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen-coder-0.5b")
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--layers", default="12")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import ray

    model = load_model(args.model, device="cpu", dtype="float32")
    settings = ExtractSettings(layers=parse_layers(args.layers, model.n_layers), batch_size=args.batch_size)
    prompts = load_prompts("advbench", limit=2 * args.n_prompts, seed=0)
    warm, items = make_items(model, prompts[args.n_prompts:]), make_items(model, prompts[:args.n_prompts])
    n_tokens = sum(len(it.chat.input_ids) for it in items)
    print(f"device cpu, {torch.get_num_threads()} threads, model {model.name}, {len(items)} prompts "
          f"({n_tokens} tokens), batch {args.batch_size}, layers {list(settings.layers)}")

    timed(model, warm[:args.batch_size], settings)                      # warm-up
    times, computed = shard_times(model, items, settings)
    with workers.using(ReplayPool(computed)):
        t_driver = min(timed(model, items, settings) for _ in range(args.repeats))
    t_shard = sum(times) / len(times)

    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(workers.PROJECT_ROOT)}})
    walls, locals_ = {}, []
    try:
        for n in [int(x) for x in args.workers.split(",")]:
            t0 = time.perf_counter()
            with workers.started(workers.WorkerSettings(n=n), model) as pool:
                started = time.perf_counter() - t0
                timed(model, warm[:args.batch_size * n], settings)    # warm-up on every actor
                pairs = []                                            # in-process and Ray runs alternate, so a
                for _ in range(args.repeats):                         # change in the machine's load hits both
                    with workers.using(workers.LOCAL):
                        here = timed(model, items, settings)
                    pairs.append((here, timed(model, items, settings)))
                assert pool.status() == f"{n}/{n} workers alive"
            local, walls[n] = min(p[0] for p in pairs), min(p[1] for p in pairs)
            locals_.append((n, local))
            ratios = sorted(r / h for h, r in pairs)
            print(f"in-process      wall {local:6.2f} s  {len(items) / local:5.2f} items/s")
            print(f"ray {n} worker{'s' if n > 1 else ' '}   wall {walls[n]:6.2f} s  {len(items) / walls[n]:5.2f} "
                  f"items/s  ratio {walls[n] / local:.2f} vs in-process (best of {args.repeats}; paired ratios "
                  f"{', '.join(f'{r:.2f}' for r in ratios)})  pool start {started:.1f} s")
    finally:
        ray.shutdown()
    by_n = dict(locals_)

    n_batches = len(times)
    overhead = walls[1] - by_n[1] if 1 in walls else 0.0       # 1 Ray worker minus in-process, same block
    print(f"scaling model   t_shard {t_shard:.3f} s/batch ({n_batches} batches), t_driver {t_driver:.3f} s/run "
          f"({t_driver / n_batches * 1e3:.1f} ms/batch write + commit), ray overhead {overhead:.2f} s/run")
    for n in (1, 2, 4, 8, 16):
        wall = max(math.ceil(n_batches / n) * t_shard, t_driver) + max(overhead, 0.0)
        print(f"  N={n:<3d} predicted wall {wall:6.2f} s  {len(items) / wall:6.2f} items/s"
              + (f"  (measured {walls[n]:.2f} s)" if n in walls else ""))
    print(f"  throughput stops growing at N* = {n_batches * t_shard / max(t_driver, 1e-9):.0f} workers "
          f"(the driver's writes), for batches this size; on GPUs t_shard shrinks and N* with it")
    print("  (the model assumes one device per worker; N workers sharing these CPU cores each get 1/N of them,\n"
          "   and on a machine shared with other jobs N processes also get N shares of the CPU: no real speedup)")


if __name__ == "__main__":
    main()
