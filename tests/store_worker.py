"""A run writer driven from a subprocess, so tests can kill it with SIGKILL mid-write.

usage: python tests/store_worker.py STORE RUN_ID N_CHUNKS ROWS_PER_CHUNK SLEEP_S
Writes chunk k with resid rows filled with k and one sae_acts row per token row, printing
"chunk k" after each; sleeps between chunks; commits at the end.
"""

import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from store import RunPlan, Store, begin_run  # noqa: E402

D_MODEL = 8


def plan(run_id: str, n_chunks: int, rows_per_chunk: int) -> RunPlan:
    prompts = pl.DataFrame({"prompt_id": ["p0"], "dataset": ["synthetic"], "idx": [0], "split": ["train"],
                            "label": [1], "category": [None], "text": ["hello"]},
                           schema_overrides={"category": pl.String})
    chats = pl.DataFrame({"model": ["m"], "prompt_id": ["p0"], "chat_text": ["hello"], "n_tokens": [1]})
    return RunPlan(run_id, "m", {}, {}, {}, n_chunks, n_chunks * rows_per_chunk, prompts, chats)


def chunk_payload(run_id: str, k: int, rows_per_chunk: int):
    start = k * rows_per_chunk
    data = np.full((rows_per_chunk, D_MODEL), k, dtype=np.float32)
    rows = np.arange(start, start + rows_per_chunk, dtype=np.int32)
    acts = pl.DataFrame({"run_id": [run_id] * rows_per_chunk, "row": rows,
                         "layer": np.full(rows_per_chunk, 3, np.int16),
                         "feature": np.full(rows_per_chunk, k, np.int32),
                         "value": np.full(rows_per_chunk, 1.0, np.float32)})
    return [("resid/3", start, data)], {"sae_acts": acts}


def main() -> None:
    path, run_id, n_chunks, rows_per_chunk, sleep_s = sys.argv[1:6]
    n_chunks, rows_per_chunk, sleep_s = int(n_chunks), int(rows_per_chunk), float(sleep_s)
    store = Store.create(path)
    writer = begin_run(store, plan(run_id, n_chunks, rows_per_chunk))
    if writer is None:
        print("cached", flush=True)
        return
    writer.array("resid/3", (n_chunks * rows_per_chunk, D_MODEL))
    done = writer.done_chunks()
    for k in range(n_chunks):
        if k in done:
            continue
        arrays, tables = chunk_payload(run_id, k, rows_per_chunk)
        writer.submit(k, arrays, tables)
        writer.flush()
        print(f"chunk {k}", flush=True)
        time.sleep(sleep_s)
    writer.commit()
    print("committed", flush=True)


if __name__ == "__main__":
    main()
