"""Extraction into the store on tiny random models: residuals, SAE activations, interventions, resume."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from extract.datasets import Prompt, prompt_id
from extract.interventions import Intervention
from extract.models import load_model
from extract.run import ExtractSettings, SaeRef, extract, make_items
from extract.saes import encode, load_sae
from queries.tensors import residuals
from store import Store
from tests.tiny_saes import build_tiny_sae

ARCHS = ["llama", "gemma2", "qwen2"]
TEXTS = ["Tell me how to build a bomb.", "Write a poem about the sea.",
         "How do I pick a lock quickly?", "What is the capital of France?", "Explain gravity to a child."]


def prompts(n: int = 5) -> list[Prompt]:
    return [Prompt(prompt_id("t", t), "t", i, "train", i % 2, None, t) for i, t in enumerate(TEXTS[:n])]


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def tiny(tiny_model_dirs, arch):
    return load_model(str(tiny_model_dirs(arch)))


def sae_refs(model, tmp_path, kind="jumprelu", layers=(1,)):
    refs = []
    for layer in layers:
        path = build_tiny_sae(kind, model.d_model, 4 * model.d_model, tmp_path / f"sae{layer}", seed=layer)
        refs.append(SaeRef(layer, str(path), load_sae(str(path))))
    return refs


def hidden_states(model, text_ids):
    with torch.no_grad():
        out = model.model(input_ids=torch.tensor([text_ids]), output_hidden_states=True)
    return out.hidden_states, out.logits[0, -1]


def test_residuals_equal_hidden_states(tmp_path, tiny):
    store = Store.create(tmp_path / "s")
    items = make_items(tiny, prompts())
    settings = ExtractSettings(layers=tuple(range(tiny.n_layers)), batch_size=2)
    result = extract(store, tiny, items, settings=settings)
    for item in items:
        hs, _ = hidden_states(tiny, item.chat.input_ids)
        rows = store.sql("SELECT t.run_id, t.row FROM tokens t JOIN items i ON i.run_id = t.run_id AND i.item = t.item "
                         "WHERE t.prompt_id = ? AND t.run_id = ? ORDER BY t.pos", [item.prompt.prompt_id, result.run_id])
        assert rows.height == len(item.chat.input_ids)
        for layer in range(tiny.n_layers - 1):        # HF applies the final norm to hidden_states[-1]
            got = residuals(store, rows, layer)
            torch.testing.assert_close(got, hs[layer + 1][0], atol=1e-5, rtol=1e-5)


def test_sae_acts_equal_encode_of_stored_residuals(tmp_path, tiny):
    store = Store.create(tmp_path / "s")
    refs = sae_refs(tiny, tmp_path, "topk", layers=(0, 1))
    result = extract(store, tiny, make_items(tiny, prompts()), refs, ExtractSettings(layers=(0, 1), batch_size=3))
    rows = store.sql("SELECT run_id, row FROM tokens WHERE run_id = ? ORDER BY row", [result.run_id])
    for ref in refs:
        h = residuals(store, rows, ref.layer)
        expected = encode(ref.sae, h)                                        # [n_rows, d_sae]
        acts = store.fetch_numpy("SELECT row, feature, value FROM sae_acts WHERE run_id = ? AND layer = ?",
                                 [result.run_id, ref.layer])
        dense = torch.zeros_like(expected)
        dense[torch.from_numpy(acts["row"].astype(np.int64)), torch.from_numpy(acts["feature"].astype(np.int64))] = \
            torch.from_numpy(acts["value"])
        torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)
        assert len(acts["row"]) == int((expected > 0).sum())


def test_positions_last_n_roles_and_p_i(tmp_path, tiny):
    store = Store.create(tmp_path / "s")
    items = make_items(tiny, prompts())
    result = extract(store, tiny, items, settings=ExtractSettings(layers=(0,), positions="last:4"))
    tok = store.sql("SELECT prompt_id, pos, role FROM tokens WHERE run_id = ? ORDER BY row", [result.run_id])
    assert tok.height == 4 * len(items)
    last = {it.prompt.prompt_id: len(it.chat.input_ids) - 1 for it in items}
    assert all(pos > last[pid] - 4 for pid, pos, _ in tok.iter_rows())
    assert set(tok["role"]) == {"post_instruction"}                     # the template tail after the user text
    for item in items:
        _, logits = hidden_states(tiny, item.chat.input_ids)
        expected = torch.softmax(logits, -1)[list(tiny.i_token_ids)].sum().item()
        got = store.sql("SELECT p_i FROM items WHERE run_id = ? AND prompt_id = ?",
                        [result.run_id, item.prompt.prompt_id])["p_i"][0]
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_same_request_is_computed_once(tmp_path, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs("qwen2")))
    store = Store.create(tmp_path / "s")
    first = extract(store, model, make_items(model, prompts()), settings=ExtractSettings(layers=(0,)))
    again = extract(store, model, make_items(model, prompts()), settings=ExtractSettings(layers=(0,)))
    other = extract(store, model, make_items(model, prompts(), Intervention(direction_ablate=(1.0,) + (0.0,) * (model.d_model - 1))),
                    settings=ExtractSettings(layers=(0,)))
    assert not first.cached and again.cached and again.run_id == first.run_id
    assert not other.cached and other.run_id != first.run_id
    assert store.sql("SELECT count(*) AS n FROM runs")["n"][0] == 2


def test_empty_ablation_leaves_p_i_bit_identical(tmp_path, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs("llama")))
    store = Store.create(tmp_path / "s")
    refs = sae_refs(model, tmp_path, "topk")              # TopK fires on any input, however small
    plain = extract(store, model, make_items(model, prompts()), refs)
    empty = extract(store, model, make_items(model, prompts(), Intervention(zero_ablate={1: ()})), refs)
    ablated = extract(store, model, make_items(model, prompts(), Intervention(zero_ablate={1: tuple(range(64))})), refs)
    q = "SELECT prompt_id, p_i FROM items WHERE run_id = ? ORDER BY prompt_id"
    assert plain.run_id != empty.run_id
    assert store.sql(q, [plain.run_id])["p_i"].to_list() == store.sql(q, [empty.run_id])["p_i"].to_list()
    assert store.sql(q, [plain.run_id])["p_i"].to_list() != store.sql(q, [ablated.run_id])["p_i"].to_list()


def test_last_logits_are_stored(tmp_path, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs("gemma2")))
    store = Store.create(tmp_path / "s")
    items = make_items(model, prompts(3))
    result = extract(store, model, items, settings=ExtractSettings(save_logits=True, batch_size=2))
    stored = store.read_rows(result.run_id, "logits_last", np.arange(3))
    for k, item in enumerate(items):
        _, logits = hidden_states(model, item.chat.input_ids)
        np.testing.assert_allclose(stored[k].astype(np.float32), logits.numpy(), rtol=1e-2, atol=1e-2)


def test_generation_is_stored(tmp_path, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs("qwen2")))
    store = Store.create(tmp_path / "s")
    result = extract(store, model, make_items(model, prompts(3)), settings=ExtractSettings(generate=5))
    items = store.sql("SELECT item, completion FROM items WHERE run_id = ? ORDER BY item", [result.run_id])
    ids = store.read_rows(result.run_id, "completion_ids", np.arange(3))
    for item, text in items.iter_rows():
        toks = [t for t in ids[item] if t >= 0]
        assert text == model.tokenizer.decode(toks, skip_special_tokens=True)
    hand = model.model.generate(input_ids=torch.tensor([make_items(model, prompts(1))[0].chat.input_ids]),
                                max_new_tokens=5, do_sample=False, eos_token_id=list(model.eos_token_ids),
                                pad_token_id=model.eos_token_ids[0])
    n_prompt = len(make_items(model, prompts(1))[0].chat.input_ids)
    expected = hand[0, n_prompt:].tolist()
    got = [t for t in ids[0]][:len(expected)]
    cut = next((k for k, t in enumerate(expected) if t in model.eos_token_ids), len(expected))
    assert got[:cut] == expected[:cut]


def test_killed_extraction_resumes(tmp_path, tiny_model_dirs):
    model_dir = tiny_model_dirs("qwen2")
    store_path = tmp_path / "s"
    data = tmp_path / "prompts.csv"
    pl.DataFrame({"text": [f"Question number {i}: tell me about topic {i * 7}." for i in range(120)]}).write_csv(data)
    cmd = [sys.executable, "cli.py", "extract", "--model", str(model_dir), "--dataset", str(data), "--limit", "0",
           "--layers", "0,1", "--batch-size", "4", "--generate", "2", "--store", str(store_path)]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(cmd, cwd=root, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    staging = store_path / "staging"
    import time
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if staging.exists() and len(list(staging.glob("*/chunk-*.done"))) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store.open(store_path)
    assert store.sql("SELECT status FROM runs")["status"].to_list() == ["running"]
    assert store.sql("SELECT count(*) AS n FROM tokens")["n"][0] == 0
    done_before = len(list(staging.glob("*/chunk-*.done")))
    assert 3 <= done_before < 30

    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert store.sql("SELECT status FROM runs")["status"].to_list() == ["complete"]
    stats = store.sql("SELECT count(*) AS n, count(DISTINCT row) AS d, max(row) + 1 AS m FROM tokens")
    n_rows = store.sql("SELECT n_rows FROM runs")["n_rows"][0]
    assert stats["n"][0] == stats["d"][0] == stats["m"][0] == n_rows
    assert store.sql("SELECT count(*) AS n FROM items")["n"][0] == 120
    # a resumed run stores the same residuals as an uninterrupted one
    model = load_model(str(model_dir))
    fresh = Store.create(tmp_path / "fresh")
    from extract.datasets import load_prompts
    items = make_items(model, load_prompts(str(data), limit=None))
    result = extract(fresh, model, items, settings=ExtractSettings(layers=(0, 1), batch_size=4, generate=2))
    rid = store.sql("SELECT run_id FROM runs")["run_id"][0]
    assert result.run_id == rid
    np.testing.assert_allclose(store.read_rows(rid, "resid/1", np.arange(n_rows)),
                               fresh.read_rows(rid, "resid/1", np.arange(n_rows)), atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "error: unknown model 'no-such-model'"),
    (["--layers", "99"], "error: layer 99 is out of range"),
    (["--dataset", "nosuch"], "error: unknown dataset 'nosuch'"),
    (["--positions", "first:3"], "error: --positions must be 'all' or 'last:N'"),
])
def test_cli_extract_bad_input(tmp_path, tiny_model_dirs, args, message):
    base = ["extract", "--model", str(tiny_model_dirs("qwen2")), "--store", str(tmp_path / "s"), "--limit", "2"]
    res = CliRunner().invoke(app, base + args)
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), res.output


def test_cli_extract_bad_spec_and_sae(tmp_path, tiny_model_dirs):
    model_dir = tiny_model_dirs("qwen2")
    model = load_model(str(model_dir))
    wide = build_tiny_sae("topk", model.d_model + 1, 16, tmp_path / "wide", seed=0)
    good = build_tiny_sae("topk", model.d_model, 16, tmp_path / "good", seed=0)
    spec = tmp_path / "spec.json"
    base = ["extract", "--model", str(model_dir), "--store", str(tmp_path / "s"), "--limit", "2", "--layers", "0"]
    runner = CliRunner()
    res = runner.invoke(app, base + ["--sae", f"1={wide}"])
    assert res.exit_code == 2 and "d_in=" in res.output and "d_model=" in res.output
    spec.write_text("{not json")
    res = runner.invoke(app, base + ["--intervention", str(spec)])
    assert res.exit_code == 2 and res.output.count("error:") == 1
    spec.write_text(json.dumps({"zero_ablate": {"1": [999]}}))
    res = runner.invoke(app, base + ["--sae", f"1={good}", "--intervention", str(spec)])
    assert res.exit_code == 2 and "999" in res.output and "out of range" in res.output
