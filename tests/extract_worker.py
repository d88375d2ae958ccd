"""An extraction driven from a subprocess, so tests can kill it with SIGKILL between batches.

usage: python tests/extract_worker.py MODEL_DIR STORE N_PROMPTS BATCH_SIZE SLEEP_S
Prints "batch" after each batch (then sleeps SLEEP_S), and at the end "forwards N": the model's
forward passes in this process, i.e. the batches it computed rather than found on disk.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from extract.datasets import Prompt, prompt_id  # noqa: E402
from extract.models import load_model  # noqa: E402
from extract.run import ExtractSettings, extract, make_items  # noqa: E402
from store import Store  # noqa: E402


def worker_prompts(n: int) -> list[Prompt]:
    texts = [f"Question number {i}: tell me about topic {i * 7}." for i in range(n)]
    return [Prompt(prompt_id("w", t), "w", i, "train", i % 2, None, t) for i, t in enumerate(texts)]


def main() -> None:
    model_dir, store_path, n_prompts, batch_size, sleep_s = sys.argv[1:6]
    model = load_model(model_dir)
    forwards = []
    model.model.register_forward_hook(lambda *_: forwards.append(1))

    def progress(n_items: int, n_tok: int) -> None:
        print("batch", flush=True)
        time.sleep(float(sleep_s))

    settings = ExtractSettings(layers=(0, 1), batch_size=int(batch_size))
    items = make_items(model, worker_prompts(int(n_prompts)))
    extract(Store.create(store_path), model, items, settings=settings, progress=progress)
    print(f"forwards {len(forwards)}", flush=True)


if __name__ == "__main__":
    main()
