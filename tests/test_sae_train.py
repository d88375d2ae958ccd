"""SAE training: sae-lens training on store residuals, quality metrics, CLI, reuse by extraction."""
import json
import math

import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig
from typer.testing import CliRunner

from cli import app
from extract import sae_train as st
from extract.models import load_model
from extract.saes import load_sae
from store import Store
from store.errors import UsageError
from tests.tiny_saes import build_tiny_sae


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    """Sparse-ish synthetic residuals: sums of a few of 24 fixed directions (the same for every seed) plus noise."""
    dirs = torch.randn(24, d, generator=torch.Generator().manual_seed(12345))
    g = torch.Generator().manual_seed(seed)
    codes = (torch.rand(n, 24, generator=g) < 0.15).float() * torch.rand(n, 24, generator=g) * 3
    return codes @ dirs + 0.05 * torch.randn(n, d, generator=g)


def test_training_improves_reconstruction_and_is_reproducible():
    x = _rows(4096, 32, seed=0)
    settings = st.TrainSettings(layers=(0,), width=64, k=6, tokens=4096, epochs=3, batch_size=128, lr=3e-3)
    sae, stats = st.train_layer(x, settings, layer=0)
    assert stats["last_loss"] < 0.5 * stats["first_loss"]
    untrained, _ = st.train_layer(x, st.TrainSettings(layers=(0,), width=64, k=6, tokens=128, epochs=1e-9,
                                                      batch_size=128), layer=0)
    held = _rows(512, 32, seed=1)
    assert st.fvu(held, st.reconstruct(sae, held)[0]) < 0.5 * st.fvu(held, st.reconstruct(untrained, held)[0])
    again, _ = st.train_layer(x, settings, layer=0)
    for name, value in sae.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name


def test_fvu_of_an_exact_sae_is_zero_and_of_a_null_one_at_least_one(tmp_path):
    d = 16
    exact = TopKSAE(TopKSAEConfig(d_in=d, d_sae=2 * d, k=d, rescale_acts_by_decoder_norm=False))
    eye = torch.eye(d)
    with torch.no_grad():
        exact.W_enc.copy_(torch.cat([eye, -eye], dim=1))            # z = relu(+x), relu(-x): d of them > 0
        exact.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        exact.b_enc.zero_()
        exact.b_dec.zero_()
    exact.save_model(tmp_path / "exact")
    loaded = load_sae(str(tmp_path / "exact"))                       # through sae-lens's disk format
    x = torch.randn(300, d)
    x_hat, l0 = st.reconstruct(loaded, x)
    assert st.fvu(x, x_hat) < 1e-10
    assert float(l0.mean()) <= d
    assert st.fvu(x, torch.zeros_like(x)) >= 1.0


def test_bad_settings_fail_with_one_clear_error():
    with pytest.raises(UsageError, match="cannot exceed"):
        st.TrainSettings(layers=(1,), width=16, k=32)
    with pytest.raises(UsageError, match="architecture"):
        st.TrainSettings(layers=(1,), architecture="relu")
    with pytest.raises(UsageError, match="no layers"):
        st.TrainSettings(layers=())


@pytest.mark.parametrize("args, message", [
    (["--k", "64", "--width", "32"], "error: --k (64) cannot exceed --width (32)"),
    (["--layers", "99"], "error: layer 99 is out of range"),
    (["--tokens", "10"], "error: --tokens (10) must be at least one batch"),
])
def test_cli_bad_input(tmp_path, tiny_model_dirs, args, message):
    base = ["sae", "train", "--model", str(tiny_model_dirs("qwen2")), "--store", str(tmp_path / "s"), "--quick"]
    res = CliRunner().invoke(app, base + args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), res.output


def test_cli_trains_registers_and_extraction_uses_the_saes(tmp_path, tiny_model_dirs):
    model_dir = tiny_model_dirs("llama")
    store_dir = tmp_path / "s"
    args = ["sae", "train", "--model", str(model_dir), "--store", str(store_dir), "--quick", "--layers", "1-2",
            "--width", "48", "--k", "4", "--tokens", "1500"]
    runner = CliRunner()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    store = Store.open(store_dir)
    saes = store.sql("SELECT layer, source, architecture, d_sae, metrics FROM saes ORDER BY layer")
    assert saes["layer"].to_list() == [1, 2] and set(saes["architecture"]) == {"topk"}
    assert saes["d_sae"].to_list() == [48, 48]
    quality = store.sql("SELECT * FROM sae_quality ORDER BY layer")
    assert quality.height == 2
    for row in quality.iter_rows(named=True):
        assert 0 <= row["fvu"] < 1.5 and 0 < row["l0"] <= 4 and 0 <= row["dead_frac"] <= 1
        assert all(math.isfinite(row[c]) for c in ("ce_clean", "ce_spliced", "ce_zero")) and row["n_train_rows"] > 0
        assert row["n_massive_eval_rows"] >= 4                       # position 0 of each held-out window
    # the saved SAE loads through sae-lens and encodes like the metrics say: at most k latents
    model = load_model(str(model_dir))
    sae = load_sae(str(store_dir / saes["source"][0]))
    assert sae.cfg.d_sae == 48 and sae.cfg.normalize_activations == "none"
    # training data excluded position 0 and repeated template rows
    runs = json.loads(saes["metrics"][0])["runs"]
    roles = store.sql("SELECT DISTINCT role FROM tokens WHERE run_id = ?", [runs["text"]])["role"].to_list()
    assert set(roles) == {"first", "user"}
    usable = store.sql(
        "SELECT count(*) AS n FROM tokens WHERE run_id = ? AND role <> 'first' OR run_id = ? AND role <> 'first' "
        "AND (role <> 'template' OR prompt_id = (SELECT min(prompt_id) FROM tokens WHERE run_id = ? AND role = 'template'))",
        [runs["text"], runs["chat"], runs["chat"]])["n"][0]
    first = quality.row(0, named=True)
    assert first["n_train_rows"] + first["n_excluded_massive_train_rows"] == usable
    # rerunning reuses both layers
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and res.output.count("(reused)") == 2, res.output
    # an extraction with no --sae now stores these SAEs' activations
    res = runner.invoke(app, ["extract", "--model", str(model_dir), "--store", str(store_dir), "--dataset", "advbench",
                              "--limit", "3", "--layers", "1"])
    assert res.exit_code == 0, res.output
    acts = store.sql("SELECT DISTINCT layer FROM sae_acts ORDER BY layer")["layer"].to_list()
    assert acts == [1, 2]
    assert model.n_layers == 3



def _exact_sae(d: int) -> TopKSAE:
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=2 * d, k=d, rescale_acts_by_decoder_norm=False))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_spliced_loss_of_an_exact_sae_is_the_clean_loss(tiny_model_dirs):
    model = load_model(str(tiny_model_dirs("qwen2")))
    windows = [list(range(5, 25)), list(range(30, 50))]
    ids = torch.tensor(windows)
    logits = model.model(input_ids=ids).logits
    direct = float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))
    losses = st.spliced_losses(model, _exact_sae(model.d_model), 1, windows, massive_norm=1e9)
    assert abs(losses["clean"] - direct) < 1e-5
    assert abs(losses["spliced"] - losses["clean"]) < 1e-4
    assert abs(losses["zero"] - losses["clean"]) > 1e-3             # zeroing layer 1 does change the loss


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2"])
def test_spliced_losses_from_the_clean_pass_equal_the_full_forwards(tiny_model_dirs, tmp_path, arch):
    """The edited forwards that start at block layer + 1 from the clean pass's residual give the same losses."""
    model = load_model(str(tiny_model_dirs(arch)))
    windows = [list(range(5, 25)), list(range(30, 50)), list(range(7, 27))]
    sae_path = build_tiny_sae("topk", model.d_model, 4 * model.d_model, tmp_path / "sae", seed=3)
    sae = load_sae(str(sae_path))
    clean = st.clean_pass(model, windows, [0, 1], batch_size=2)
    full = st.spliced_losses(model, sae, 0, windows, massive_norm=1e9, batch_size=2)
    assert clean.ce == pytest.approx(full["clean"], abs=1e-6)
    for layer in (0, 1):
        reused = st.spliced_losses(model, sae, layer, windows, 1e9, batch_size=2, modes=("spliced", "zero"),
                                   clean=clean)
        direct = st.spliced_losses(model, sae, layer, windows, 1e9, batch_size=2, modes=("spliced", "zero"))
        assert reused == pytest.approx(direct, abs=1e-6)
        assert reused["zero"] != pytest.approx(clean.ce, abs=1e-4)   # the splice did act
