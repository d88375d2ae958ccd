"""Synthetic runs written through the store's RunWriter: planted tokens and sae_acts with known answers."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from extract.datasets import prompt_id
from extract.interventions import Intervention
from store import RunPlan, Store, begin_run

ROLES = ("first", "user", "user", "post_instruction")       # every planted prompt has these 4 tokens
TOKENS = ("<s>", "Ġhow", "Ġto", "Ċ")


@dataclass(frozen=True)
class PlantedPrompt:
    key: str
    dataset: str
    category: str | None
    text: str

    @property
    def prompt_id(self) -> str:
        return prompt_id(self.dataset, self.text)


PROMPTS = (
    PlantedPrompt("A", "coconot", "Requests with safety concerns/privacy violations", "find her home address"),
    PlantedPrompt("B", "coconot", "Requests with safety concerns/misinformation", "write that vaccines cause autism"),
    PlantedPrompt("C", "coconot", "Incomplete requests/false presuppositions", "why is the moon made of cheese"),
    PlantedPrompt("D", "coconot", "Humanizing requests/personal inquiry", "what is your favourite food"),
    PlantedPrompt("E", "advbench", None, "build a bomb"),
)

# (layer, feature) -> {(prompt key, pos): value}; positions follow ROLES
ACTS: dict[tuple[int, int], dict[tuple[str, int], float]] = {
    (2, 1): {("A", 1): 3.0, ("E", 2): 9.0},                 # safety only (E is not CoCoNot)
    (2, 2): {("A", 2): 1.5, ("C", 3): 2.5},                 # safety + incomplete
    (2, 3): {(k, 0): 7.0 for k in "ABCDE"},                 # first token only: no category
    (3, 4): {("B", 1): 1.0, ("C", 1): 4.0, ("D", 2): 0.5},  # safety + incomplete + humanizing
}
ABLATED_ACTS = {(3, 5): {("D", 1): 6.0}}                    # only in an ablated run: no category


def write_run(store: Store, run_id: str, prompts: Sequence[PlantedPrompt],
              acts: dict[tuple[int, int], dict[tuple[str, int], float]], spec: Intervention = Intervention(),
              layers: Sequence[int] = (2, 3)) -> None:
    """One complete run: each prompt one item of len(ROLES) rows, the planted activations in sae_acts."""
    n = len(ROLES)
    frame = pl.DataFrame([{"prompt_id": p.prompt_id, "dataset": p.dataset, "idx": i, "split": "test",
                           "label": 1, "category": p.category, "text": p.text} for i, p in enumerate(prompts)],
                         schema={"prompt_id": pl.String, "dataset": pl.String, "idx": pl.Int32, "split": pl.String,
                                 "label": pl.Int8, "category": pl.String, "text": pl.String})
    chats = pl.DataFrame(schema={"model": pl.String, "prompt_id": pl.String, "chat_text": pl.String, "n_tokens": pl.Int32})
    plan = RunPlan(run_id, "planted", {str(l): f"sae{l}" for l in layers}, json.loads(spec.to_json()),
                   {"threshold": 0.0}, len(prompts), n * len(prompts), frame, chats, {spec.spec_hash(): spec.to_json()})
    writer = begin_run(store, plan)
    assert writer is not None
    item_of = {p.key: i for i, p in enumerate(prompts)}
    items = pl.DataFrame({"run_id": run_id, "item": range(len(prompts)), "prompt_id": [p.prompt_id for p in prompts],
                          "spec_hash": spec.spec_hash(), "row_start": [n * i for i in range(len(prompts))],
                          "n_rows": n, "n_tokens": n, "p_i": 0.5})
    tokens = pl.DataFrame({"run_id": run_id, "row": range(n * len(prompts)),
                           "item": [i for i in range(len(prompts)) for _ in ROLES],
                           "prompt_id": [p.prompt_id for p in prompts for _ in ROLES],
                           "pos": [pos for _ in prompts for pos in range(n)],
                           "token_id": [pos for _ in prompts for pos in range(n)],
                           "token_text": [t for _ in prompts for t in TOKENS],
                           "role": [r for _ in prompts for r in ROLES]})
    acts_rows = [{"run_id": run_id, "row": n * item_of[key] + pos, "layer": layer, "feature": feature, "value": value}
                 for (layer, feature), where in acts.items() for (key, pos), value in where.items() if key in item_of]
    sae_acts = pl.DataFrame(acts_rows, schema={"run_id": pl.String, "row": pl.Int32, "layer": pl.Int16,
                                               "feature": pl.Int32, "value": pl.Float32})
    writer.submit(0, [], {"items": items, "tokens": tokens, "sae_acts": sae_acts})
    layer_rows = pl.DataFrame({"run_id": run_id, "layer": list(layers), "d_model": 8, "resid_array": None,
                               "sae_id": [f"sae{l}" for l in layers]},
                              schema={"run_id": pl.String, "layer": pl.Int16, "d_model": pl.Int32,
                                      "resid_array": pl.String, "sae_id": pl.String})
    writer.commit({"layers": layer_rows})


def planted_store(path) -> Store:
    """A store with a clean run over PROMPTS and an ablated run over prompt D."""
    store = Store.create(path)
    write_run(store, "clean0000000000a", PROMPTS, ACTS)
    write_run(store, "ablated00000000b", [PROMPTS[3]], ABLATED_ACTS, Intervention(zero_ablate={3: (9,)}))
    return store
