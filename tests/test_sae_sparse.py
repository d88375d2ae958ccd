"""The gathered TopK training step computes sae-lens's dense step: the same loss, gradients and trained SAE."""
import dataclasses
import hashlib
import json

import pytest
import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

from extract import sae_train as st
from extract.sae_sparse import SparseTopKTrainingSAE
from tests.test_sae_train import _rows


def _pair(width: int = 512, d: int = 64, k: int = 8):
    cfg = lambda: TopKTrainingSAEConfig(k=k, d_in=d, d_sae=width, dtype="float64", device="cpu",
                                        normalize_activations="none")
    torch.manual_seed(0)
    dense, sparse = TopKTrainingSAE(cfg()), SparseTopKTrainingSAE(cfg())
    with torch.no_grad():                     # decoder rows of unequal norms, so the rescaling is exercised
        for name, p in dense.named_parameters():
            p.copy_(torch.randn_like(p) * (1.0 if name == "b_dec" else 0.3))
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


def _step(sae, x: torch.Tensor, dead: torch.Tensor | None):
    sae.zero_grad()
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, dead_neuron_mask=dead, coefficients={},
                                                   n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("n_dead", [0, 20, 400])     # no aux loss; every dead latent in it (20 < d/2); its top k_aux
def test_the_gathered_step_has_sae_lens_dense_loss_and_gradients(n_dead):
    dense, sparse = _pair()
    x = torch.randn(32, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dead = None
    if n_dead:
        dead = torch.zeros(512, dtype=torch.bool)
        dead[torch.randperm(512, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    (a, grads_a), (b, grads_b) = _step(dense, x, dead), _step(sparse, x, dead)
    assert set(a.losses) <= set(b.losses)
    for name in a.losses:
        assert float(b.losses[name].detach()) == pytest.approx(float(a.losses[name].detach()), rel=1e-12), name
    if n_dead:
        assert float(a.losses["auxiliary_reconstruction_loss"].detach()) > 0
    assert torch.equal(a.feature_acts != 0, b.feature_acts != 0)
    torch.testing.assert_close(b.feature_acts, a.feature_acts, rtol=1e-12, atol=1e-12)
    for name, grad in grads_a.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-10, atol=1e-12 * float(grad.abs().max()))


def test_training_with_the_gathered_step_gives_the_dense_steps_sae():
    x = _rows(2048, 32, seed=0)
    settings = st.TrainSettings(layers=(0,), width=64, k=6, tokens=2048, epochs=1, batch_size=128, lr=3e-3,
                                dead_window=128)          # one step's rows: the aux loss runs from the second step
    sparse, stats = st.train_layer(x, settings, layer=0)
    dense, dense_stats = st.train_layer(x, dataclasses.replace(settings, sparse=False),
                                        layer=0)
    assert isinstance(sparse, SparseTopKTrainingSAE) and not isinstance(dense, SparseTopKTrainingSAE)
    assert stats["last_loss"] == pytest.approx(dense_stats["last_loss"], rel=1e-3)
    for name, value in dense.state_dict().items():
        torch.testing.assert_close(sparse.state_dict()[name], value, rtol=1e-3, atol=1e-4)


def test_the_step_is_in_the_sae_id_only_where_it_applies():
    base = dict(layers=(3,), width=64, k=6)
    sparse, dense = st.TrainSettings(**base), st.TrainSettings(**base, sparse=False)
    assert sparse.sparse and sparse.settings_hash() != dense.settings_hash()
    jump = st.TrainSettings(**base, architecture="jumprelu")
    assert jump.settings_hash() == st.TrainSettings(**base, architecture="jumprelu", sparse=False).settings_hash()
    before = {k: v for k, v in dataclasses.asdict(dense).items() if k not in ("layers", "sparse")}   # the ids before the field
    assert dense.settings_hash() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:10]
