import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2Config

from extract.hooks import captured, intervened, run_until, stop_after
from extract.interventions import DirectionAdd, Intervention
from extract.saes import check_sae, decoder_rows, encode, load_sae
from store.errors import UsageError
from tests.tiny_saes import build_tiny_sae

D_MODEL, D_SAE, N_LAYERS, VOCAB, SEQ = 32, 64, 3, 128, 8
LAYER = 1                                                 # SAE layer: residual after block 1
RESID_STD = 0.02                                          # tiny-model residual scale (initializer_range)


def tiny_model(arch: str):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=N_LAYERS,
                  num_attention_heads=4, num_key_value_heads=2)
    config = {"qwen2": lambda: Qwen2Config(**common), "llama": lambda: LlamaConfig(**common),
              "gemma2": lambda: Gemma2Config(**common, head_dim=8)}[arch]()
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module", params=["jumprelu", "topk"])
def sae(request, tmp_path_factory):
    path = build_tiny_sae(request.param, D_MODEL, D_SAE, tmp_path_factory.mktemp(request.param), seed=1,
                          scale=RESID_STD)
    return load_sae(str(path))


def blocks(model):
    return model.model.layers


def ids(n_rows=2, seed=0):
    return torch.randint(0, VOCAB, (n_rows, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def forward(model, input_ids, **kwargs):
    return model(input_ids=input_ids, output_hidden_states=True, use_cache=False, **kwargs)


def active_features(sae, h, n=5):
    """The n features that fire most often on h (so ablating them changes something)."""
    z = encode(sae, h)
    return tuple(sorted((z > 0).flatten(0, -2).sum(0).argsort(descending=True)[:n].tolist()))


def hook_counts(model):
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


# --- SAEs -------------------------------------------------------------------------------------

def test_load_sae_round_trip_and_errors(sae, tmp_path):
    assert sae.cfg.d_in == D_MODEL and sae.cfg.d_sae == D_SAE and not sae.W_dec.requires_grad
    build_tiny_sae("topk", D_MODEL, D_SAE, tmp_path / "layer_2", seed=3)
    assert load_sae(str(tmp_path / "layer_{layer}"), layer=2).cfg.k == round(0.2 * D_SAE)
    cases = [
        (lambda: load_sae(str(tmp_path / "nowhere")), "no SAE at"),
        (lambda: load_sae(str(tmp_path)), "is not a sae-lens SAE directory: cfg.json, sae_weights.safetensors missing"),
        (lambda: load_sae("layer_{layer}"), "has a {layer} placeholder; give the layer too"),
        (lambda: load_sae("no-such-release:layer_3"), "cannot load SAE no-such-release:layer_3"),
        (lambda: load_sae("gemma-scope-2b-pt-res-canonical:layer_3/width_1k/none"), "cannot load SAE gemma-scope"),
    ]
    for make, message in cases:
        with pytest.raises(UsageError) as err:
            make()
        assert message in str(err.value) and "\n" not in str(err.value)


def test_check_sae(sae):
    check_sae(sae, D_MODEL, LAYER, N_LAYERS)
    with pytest.raises(UsageError, match=r"^SAE width d_in=32 does not match the model's d_model=896$"):
        check_sae(sae, 896, LAYER, N_LAYERS)
    with pytest.raises(UsageError, match="SAE layer 3 is out of range: the model has layers 0..2"):
        check_sae(sae, D_MODEL, 3, N_LAYERS)


def test_encode_handles_shapes_and_dtypes(sae):
    h = RESID_STD * torch.randn(2, SEQ, D_MODEL, generator=torch.Generator().manual_seed(5))
    z = encode(sae, h)
    assert z.shape == (2, SEQ, D_SAE) and z.dtype == torch.float32
    assert torch.equal(encode(sae, h[1]), z[1])
    z16 = encode(sae, h.bfloat16())
    assert z16.dtype == torch.float32 and ((z16 > 0) == (z > 0)).float().mean() > 0.9
    assert 0.05 < (z > 0).float().mean() < 0.4


# --- interventions ------------------------------------------------------------------------------

def test_empty_intervention_is_bit_identical(model, sae):
    x = ids()
    base = forward(model, x).logits
    before = hook_counts(model)
    for spec in (Intervention(), Intervention(zero_ablate={LAYER: ()}), [Intervention(), Intervention()]):
        with intervened(blocks(model), spec, {LAYER: sae}):
            assert hook_counts(model) == before           # nothing to do: no hook at all
            assert torch.equal(forward(model, x).logits, base)


def test_zero_ablation_keeps_the_error_term(model, sae):
    x = ids()
    base = forward(model, x).hidden_states
    h = base[LAYER + 1]                                                   # [batch, seq, d_model]
    S = active_features(sae, h)
    z = sae.encode(h)
    expected = h - z[..., list(S)] @ sae.W_dec[list(S)]
    z_without = z.clone()
    z_without[..., list(S)] = 0
    assert torch.allclose(expected, h - (sae.decode(z) - sae.decode(z_without)), atol=1e-6)   # decode oracle
    with intervened(blocks(model), Intervention(zero_ablate={LAYER: S}), {LAYER: sae}):
        out = forward(model, x).hidden_states
    assert torch.equal(out[LAYER], base[LAYER])                         # earlier layers untouched
    assert torch.allclose(out[LAYER + 1], expected, atol=1e-5)
    assert not torch.allclose(out[LAYER + 1], h, atol=1e-4)


def test_zero_ablation_can_leave_position_0_alone_with_left_padding(model, sae):
    x = ids(2, seed=5)
    mask = torch.ones_like(x)
    mask[1, :3] = 0                                                      # row 1: position 0 is column 3
    base = forward(model, x, attention_mask=mask).hidden_states[LAYER + 1]
    S = active_features(sae, base)
    skip = Intervention(zero_ablate={LAYER: S}, zero_ablate_first=False)
    with (intervened(blocks(model), [skip, Intervention(zero_ablate={LAYER: S})], {LAYER: sae},
                     pad_offsets=torch.tensor([0, 3])), captured(blocks(model), [LAYER]) as acts):
        forward(model, x, attention_mask=mask)
    assert torch.equal(acts[LAYER][0, 0], base[0, 0])                   # row 0 skips position 0: its bits kept
    z = sae.encode(base[0, 1:])
    assert torch.allclose(acts[LAYER][0, 1:], base[0, 1:] - z[:, list(S)] @ sae.W_dec[list(S)], atol=1e-5)
    assert not torch.allclose(acts[LAYER][1, 3], base[1, 3], atol=1e-6)  # row 1 ablates its position 0
    with (intervened(blocks(model), [Intervention(), skip], {LAYER: sae}, pad_offsets=torch.tensor([0, 3])),
          captured(blocks(model), [LAYER]) as again):
        forward(model, x, attention_mask=mask)
    assert torch.equal(again[LAYER][1, 3], base[1, 3])                   # position 0 of a padded row
    assert not torch.allclose(again[LAYER][1, 4:], base[1, 4:], atol=1e-6)


def test_per_row_interventions_in_one_batch(model, sae):
    x = ids(3)
    base = forward(model, x)
    S = active_features(sae, base.hidden_states[LAYER + 1])
    specs = [Intervention(zero_ablate={LAYER: S}), Intervention(), Intervention(zero_ablate={LAYER: S[:2]})]
    with intervened(blocks(model), specs, {LAYER: sae}):
        out = forward(model, x)
    assert torch.equal(out.logits[1], base.logits[1])                   # the empty row is bit-identical
    assert not torch.allclose(out.logits[0], base.logits[0], atol=1e-6)
    for row, spec in ((0, specs[0]), (2, specs[2])):                    # each row as if alone with its spec
        with intervened(blocks(model), spec, {LAYER: sae}):
            alone = forward(model, x)
        assert torch.allclose(out.logits[row], alone.logits[row], atol=1e-5)
    with pytest.raises(UsageError, match="3 interventions for a batch of 2 rows"):
        with intervened(blocks(model), specs, {LAYER: sae}):
            forward(model, x[:2])


def test_clamp_sets_the_latent_at_the_clamped_positions(model, sae):
    x = ids(1, seed=3)
    h = forward(model, x).hidden_states[LAYER + 1]
    z = sae.encode(h)[0]                                                 # [seq, d_sae]
    pos = int((z > 0).sum(-1).argmax())                                  # a position with latents to clamp
    f_on = int(z[pos].argmax())                                          # active there
    f_off = int((z[pos] == 0).nonzero()[0])                              # inactive there
    v = 5 * RESID_STD
    spec = Intervention(clamp={LAYER: {f_on: v, f_off: v}}, clamp_positions=(pos,))
    with intervened(blocks(model), spec, {LAYER: sae}), captured(blocks(model), [LAYER]) as acts:
        forward(model, x)
    after = acts[LAYER]
    others = [p for p in range(SEQ) if p != pos]
    assert torch.equal(after[0, others], h[0, others])                   # unclamped positions keep their bits
    W = sae.W_dec[[f_on, f_off]]
    assert torch.allclose(after[0, pos], h[0, pos] + (v - z[pos, [f_on, f_off]]) @ W, atol=1e-6)
    # re-encoding reads v back for one clamped latent that was active (unit W_dec row, tied encoder);
    # an inactive one reads pre-activation + v, and non-orthogonal clamped rows leak into each other
    with intervened(blocks(model), Intervention(clamp={LAYER: {f_on: v}}, clamp_positions=(pos,)), {LAYER: sae}):
        alone = forward(model, x).hidden_states[LAYER + 1]
    assert sae.encode(alone)[0, pos, f_on] == pytest.approx(v, abs=1e-5)


def test_clamp_positions_with_left_padding(model, sae):
    x = ids(2, seed=4)
    mask = torch.ones_like(x)
    mask[1, :2] = 0                                                      # row 1 has 2 pad columns
    h = forward(model, x, attention_mask=mask).hidden_states[LAYER + 1]
    f = active_features(sae, h, n=1)[0]
    spec = Intervention(clamp={LAYER: {f: 3 * RESID_STD}}, clamp_positions=(-1, 0))
    with (intervened(blocks(model), spec, {LAYER: sae}, pad_offsets=torch.tensor([0, 2])),
          captured(blocks(model), [LAYER]) as acts):
        forward(model, x, attention_mask=mask)
    changed = (acts[LAYER] != h).any(-1)                                 # [batch, seq]
    expected = torch.zeros_like(changed)
    expected[0, [0, SEQ - 1]] = True
    expected[1, [2, SEQ - 1]] = True                                     # position 0 of row 1 is column 2
    assert torch.equal(changed, expected)
    by_callback = dict(positions_index=lambda rows, pos, seq_len: torch.where(pos >= 0, 2 * rows + pos, seq_len + pos))
    with intervened(blocks(model), spec, {LAYER: sae}, **by_callback), captured(blocks(model), [LAYER]) as again:
        forward(model, x, attention_mask=mask)
    assert torch.equal(again[LAYER], acts[LAYER])
    with pytest.raises(UsageError, match="clamp position 8 is outside row 0, which has 8 tokens"):
        with intervened(blocks(model), Intervention(clamp={LAYER: {f: 1.0}}, clamp_positions=(SEQ,)), {LAYER: sae}):
            forward(model, x)


def test_clamp_during_generation_matches_a_full_forward(model, sae):
    x = ids(1, seed=6)
    f = active_features(sae, forward(model, x).hidden_states[LAYER + 1], n=1)[0]
    spec = Intervention(clamp={LAYER: {f: 5 * RESID_STD}}, clamp_positions=(0,))
    with intervened(blocks(model), spec, {LAYER: sae}), torch.no_grad():
        gen = model.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        full = forward(model, gen.sequences[:, :-1]).logits[0, -1]       # no cache: only column 0 is clamped
    assert torch.allclose(gen.logits[-1][0], full, atol=1e-5)
    unclamped = forward(model, gen.sequences[:, :-1]).logits[0, -1]
    assert not torch.allclose(full, unclamped, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2"])
def test_direction_ablation_leaves_no_component_anywhere(arch):
    model = tiny_model(arch)
    with torch.no_grad():                              # non-uniform norm gains: a norm of an r-free input is not r-free
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    x = ids()
    r = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(7))
    unit = r / r.norm()
    mids = []                                          # the residual between a block's attention and its MLP
    mlp_norm = "pre_feedforward_layernorm" if arch == "gemma2" else "post_attention_layernorm"   # reads it
    handles = [getattr(b, mlp_norm).register_forward_pre_hook(lambda m, a: mids.append(a[0])) for b in blocks(model)]
    spec = Intervention(direction_ablate=tuple(r.tolist()))
    try:
        base = forward(model, x).logits
        mids.clear()
        with (intervened(blocks(model), spec, {}, embed_module=model.model.embed_tokens),
              captured(blocks(model), range(N_LAYERS)) as acts):
            out = forward(model, x)
    finally:
        for handle in handles:
            handle.remove()
    residuals = [*out.hidden_states[:-1], *acts.values(), *mids]      # hidden_states[-1] is after the final norm
    assert len(residuals) == N_LAYERS + N_LAYERS + N_LAYERS
    for h in residuals:
        assert ((h @ unit).abs() / h.norm(dim=-1)).max() < 1e-4
    assert not torch.allclose(out.logits, base, atol=1e-5)


def test_direction_add(model):
    x = ids()
    base = forward(model, x).hidden_states
    r = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(8))
    spec = Intervention(direction_add=DirectionAdd(vector=tuple(r.tolist()), layer=LAYER, scale=3.0))
    with intervened(blocks(model), spec, {}):
        out = forward(model, x).hidden_states
    assert torch.equal(out[LAYER], base[LAYER])
    assert torch.allclose(out[LAYER + 1], base[LAYER + 1] + 3.0 * r / r.norm(), atol=1e-6)


def test_decoder_rows_follow_rescaled_topk(tmp_path):
    path = build_tiny_sae("topk", D_MODEL, D_SAE, tmp_path, seed=2)
    sae = load_sae(str(path))
    sae.cfg.rescale_acts_by_decoder_norm = True
    sae.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None])
    z = torch.zeros(3, D_SAE)
    z[0, 4], z[1, 9], z[2, 63] = 1.0, 1.0, 1.0
    assert torch.allclose(decoder_rows(sae, [4, 9, 63]), sae.decode(z) - sae.decode(torch.zeros(1, D_SAE)), atol=1e-6)


# --- captures, early stop, hook hygiene ------------------------------------------------------------

def test_capture_equals_hidden_states(model):
    x = ids()
    with captured(blocks(model), [0, 1, 2]) as acts:
        out = forward(model, x)
    for layer in (0, 1):
        assert torch.equal(acts[layer], out.hidden_states[layer + 1])
    assert torch.equal(model.model.norm(acts[2]), out.hidden_states[3])     # HF's last entry is after the norm
    assert acts[0].dtype == torch.float32 and not acts[0].requires_grad


def test_capture_runs_after_the_intervention_in_either_order(model, sae):
    x = ids()
    h = forward(model, x).hidden_states[LAYER + 1]
    S = active_features(sae, h)
    spec, saes = Intervention(zero_ablate={LAYER: S}), {LAYER: sae}
    with captured(blocks(model), [LAYER]) as first, intervened(blocks(model), spec, saes):
        forward(model, x)
    with intervened(blocks(model), spec, saes), captured(blocks(model), [LAYER]) as second:
        out = forward(model, x)
    assert torch.equal(first[LAYER], second[LAYER])
    assert torch.equal(first[LAYER], out.hidden_states[LAYER + 1])
    assert not torch.allclose(first[LAYER], h, atol=1e-4)


def test_stop_after_skips_later_blocks(model):
    x = ids()
    full = forward(model, x).hidden_states
    fired = []
    handles = [blocks(model)[2].register_forward_hook(lambda *_: fired.append("block 2")),
               model.model.norm.register_forward_hook(lambda *_: fired.append("norm"))]
    try:
        with captured(blocks(model), [0, 1]) as acts:
            run_until(model, {"input_ids": x}, blocks(model), 1)
        assert fired == [] and torch.equal(acts[1], full[2]) and torch.equal(acts[0], full[1])
        with captured(blocks(model), [2]) as acts:
            run_until(model, {"input_ids": x}, blocks(model), 2)
        assert fired == ["block 2"] and torch.equal(model.model.norm(acts[2]), full[3])
    finally:
        for handle in handles:
            handle.remove()
    with pytest.raises(UsageError, match="layer 3 is out of range"):
        run_until(model, {"input_ids": x}, blocks(model), 3)


def test_no_hook_left_after_an_exception(model, sae):
    x = ids()
    forward(model, x)                                  # transformers installs its own capture hooks once
    before = hook_counts(model)
    h = forward(model, x).hidden_states[LAYER + 1]
    spec = Intervention(zero_ablate={LAYER: active_features(sae, h, n=2)}, clamp={0: {1: 0.1}}, clamp_positions=(0,),
                        direction_ablate=(1.0,) * D_MODEL,
                        direction_add=DirectionAdd(vector=(1.0,) * D_MODEL, layer=2))
    saes = {LAYER: sae, 0: sae}
    contexts = [lambda: intervened(blocks(model), spec, saes, embed_module=model.model.embed_tokens),
                lambda: captured(blocks(model), [0, 2]),
                lambda: stop_after(blocks(model), 1)]
    for make in contexts:
        with pytest.raises(RuntimeError, match="boom"):
            with make():
                assert hook_counts(model) != before
                raise RuntimeError("boom")
        assert hook_counts(model) == before
    with pytest.raises(UsageError):                    # raised inside a hook, mid-forward
        with intervened(blocks(model), [spec] * 3, saes):
            forward(model, x)
    assert hook_counts(model) == before


def test_bfloat16_model_with_a_float32_sae(sae):
    model = tiny_model("qwen2").to(torch.bfloat16)
    x = ids()
    base = forward(model, x)
    S = active_features(sae, base.hidden_states[LAYER + 1].float())
    spec = Intervention(zero_ablate={LAYER: S}, clamp={0: {1: 0.1}}, clamp_positions=(0,),
                        direction_ablate=(1.0,) * D_MODEL)
    with (intervened(blocks(model), [spec, Intervention()], {LAYER: sae, 0: sae}),
          captured(blocks(model), [LAYER]) as acts):
        out = forward(model, x)
    assert acts[LAYER].dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert torch.equal(out.logits[1], base.logits[1])
    assert not torch.equal(out.logits[0], base.logits[0])
