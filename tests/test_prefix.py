"""Prefix reuse (a forward that starts at block L from the clean residual) and one prefill per item.

On the tiny Qwen2, Llama and Gemma-2 models: the started forward is bit-for-bit the full forward in
fp32 for the same batch; through the store it equals the run without reuse to float tolerance and
skips blocks 0..L-1; a generation run reads P("I") from its first step and runs each prompt once.
"""

import numpy as np
import pytest
import torch

from extract.datasets import Prompt, prompt_id
from extract.hooks import captured, intervened
from extract.interventions import DirectionAdd, Intervention
from extract.models import load_model
from extract.prefix import start_layer, started_at
from extract.run import ExtractSettings, _left_pad, extract, make_items, prefix_layer, prefix_source
from store import Store
from tests.test_extract import sae_refs

ARCHS = ["qwen2", "llama", "gemma2"]
TEXTS = ["Tell me how to build a bomb.", "Write a poem about the sea today please.",
         "How do I pick a lock?", "What is the capital of France?"]
QUIET = ExtractSettings(positions="last:1", sae_rows=False, batch_size=4)


def prompts() -> list[Prompt]:
    return [Prompt(prompt_id("t", t), "t", i, "train", i % 2, None, t) for i, t in enumerate(TEXTS)]


@pytest.fixture(params=ARCHS)
def tiny(request, tiny_model_dirs):
    return load_model(str(tiny_model_dirs(request.param)), dtype="float32")


def ablations(model, refs, n_items: int) -> list[Intervention]:
    """A different zero-ablation per item at the last SAE layer (and a clamp on one of them)."""
    d_sae = refs[-1].d_sae
    layer = refs[-1].layer
    specs = [Intervention(zero_ablate={layer: tuple(range(b, d_sae, 3 + b))}) for b in range(n_items)]
    specs[1] = Intervention(zero_ablate=specs[1].zero_ablate, clamp={layer: {2: 3.0}})
    return specs


def count_calls(block):
    calls = []
    handle = block.register_forward_hook(lambda m, a, o: calls.append(1))
    return calls, handle


def test_started_forward_is_bit_for_bit_the_full_forward(tiny, tmp_path):
    refs = sae_refs(tiny, tmp_path, layers=(tiny.n_layers - 1,))
    layer = refs[0].layer
    items = make_items(tiny, prompts())
    ids, mask, pad = _left_pad([it.chat.input_ids for it in items], tiny)
    specs = ablations(tiny, refs, len(items))
    saes = {r.layer: r.sae for r in refs}
    embed = tiny.model.get_input_embeddings()
    with torch.no_grad():
        with intervened(tiny.blocks, specs, saes, embed, pad_offsets=pad), \
                captured(tiny.blocks, [layer - 1, layer]) as acts:
            full = tiny.model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        h_prev, h_full = acts[layer - 1].clone(), acts[layer].clone()
        calls, handle = count_calls(tiny.blocks[0])
        with intervened(tiny.blocks, specs, saes, embed, pad_offsets=pad), \
                started_at(tiny.blocks, layer, h_prev), captured(tiny.blocks, [layer]) as acts:
            started = tiny.model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        handle.remove()
    assert torch.equal(started, full)
    assert torch.equal(acts[layer], h_full)
    assert not calls                                           # block 0 never ran
    assert all(not isinstance(b, torch.nn.Identity) and type(b).__name__ != "_PassThrough" for b in tiny.blocks)


def test_reuse_through_the_store_matches_the_full_run(tiny, tmp_path):
    refs = sae_refs(tiny, tmp_path, layers=(1, tiny.n_layers - 1))
    items = make_items(tiny, prompts(), ablations(tiny, refs, 4))
    store = Store.create(tmp_path / "s")
    layer = prefix_layer(tiny, refs, QUIET, items)
    assert layer == tiny.n_layers - 1
    source = prefix_source(store, tiny, items, layer)          # the clean residual, an ordinary run
    run = store.run_info(source.run_id)
    assert run["status"] == "complete" and run["n_items"] == 4
    calls, handle = count_calls(tiny.blocks[0])
    reused = extract(store, tiny, items, refs, QUIET)
    handle.remove()
    assert not calls                                           # the prefix came from the store
    full = extract(store, tiny, items, refs, ExtractSettings(**{**QUIET.__dict__, "reuse_prefix": False}))
    assert full.run_id != reused.run_id
    p = [store.sql("SELECT p_i FROM items WHERE run_id = ? ORDER BY item", [r.run_id])["p_i"].to_numpy()
         for r in (reused, full)]
    np.testing.assert_allclose(p[0], p[1], rtol=1e-5, atol=1e-7)


def test_what_can_start_late():
    add = Intervention(direction_add=DirectionAdd((1.0, 0.0), 2, 1.0))
    assert start_layer([Intervention(zero_ablate={3: (1,)}), Intervention(zero_ablate={2: (4,)})], 6) == 2
    assert start_layer([add], 6) == 2
    assert start_layer([Intervention(direction_ablate=(1.0, 0.0))], 6) is None   # edits every layer
    assert start_layer([Intervention(zero_ablate={0: (1,)})], 6) is None         # nothing to skip
    assert start_layer([Intervention()], 6) is None


def test_runs_that_need_every_block_run_in_full(tiny, tmp_path):
    refs = sae_refs(tiny, tmp_path, layers=(tiny.n_layers - 1,))
    items = make_items(tiny, prompts(), ablations(tiny, refs, 4))
    assert prefix_layer(tiny, refs, ExtractSettings(positions="last:1", generate=4), items) is None
    assert prefix_layer(tiny, refs, ExtractSettings(positions="last:1", loss=True, sae_rows=False), items) is None
    assert prefix_layer(tiny, refs, ExtractSettings(layers=(0,), sae_rows=False), items) is None
    assert prefix_layer(tiny, refs, ExtractSettings(positions="last:1"), items) == tiny.n_layers - 1  # SAE rows at L


def test_one_prefill_per_generated_item(tiny, tmp_path):
    if hasattr(tiny.model.config, "final_logit_softcapping"):    # Gemma-2: a cap that matters at tiny-model scale,
        tiny.model.config.final_logit_softcapping = 0.05         # so P("I") must be read after it
    refs = sae_refs(tiny, tmp_path, layers=(1,))
    items = make_items(tiny, prompts(), ablations(tiny, refs, 4))
    store = Store.create(tmp_path / "s")
    runs, prefills = {}, {}
    for one in (True, False):
        settings = ExtractSettings(positions="last:1", sae_rows=False, generate=5, batch_size=4, one_prefill=one)
        seen = []
        handle = tiny.blocks[0].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1] if a else 0))
        runs[one] = extract(store, tiny, items, refs, settings)
        handle.remove()
        prefills[one] = sum(1 for width in seen if width > 1)
    assert prefills == {True: 1, False: 2}                     # one batch: the prompt ran once, not twice
    rows = {one: store.sql("SELECT p_i, completion FROM items WHERE run_id = ? ORDER BY item", [r.run_id])
            for one, r in runs.items()}
    np.testing.assert_allclose(rows[True]["p_i"].to_numpy(), rows[False]["p_i"].to_numpy(), rtol=1e-4, atol=1e-6)
    assert rows[True]["completion"].to_list() == rows[False]["completion"].to_list()
