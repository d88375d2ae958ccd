"""A tiny Qwen-2 with a planted refusal mechanism, its SAEs and its prompt files, built offline.

The mechanism, in canonical coordinates of the residual (the saved model works in a randomly
rotated basis, x' = x Q; every RMSNorm weight is 1, so the rotation changes nothing else):
- coord 0, the harm marker: the embedding of each trigger word ("bomb", "hack", ...; added to the
  tokenizer as whole-word tokens) carries +MARK there, no other token does;
- block PLANTED_LAYER's attention has q = k = 0, so it attends uniformly over the prefix, and copies
  the mean marker into coord 1, the refusal direction u, at every position after a trigger;
- the LM head reads coord 1 into the logits of "I" and " I", so P("I") rises with the trigger share;
- every other weight is small and random, and reads and writes coords 2.. only.
SAEs (JumpReLU, b_dec = 0): at PLANTED_LAYER, three planted latents with decoder row u, each
carrying a third of the u-component (ablating all three removes it; any two leave a third), plus
latents that live in coords 2..; at the last layer, latents in coords 2.. only.
Harmful prompts hold two trigger words, benign ones none.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

from tests.tiny_models import SaeSpecs, build_tokenizer

N_LAYERS, D_MODEL, D_SAE = 4, 64, 32
PLANTED_LAYER = 2                    # the only layer below 80% of the depth that carries u
SAE_LAYERS = (2, 3)
PLANTED_FEATURES = (5, 17, 26)       # latents of the layer-2 SAE whose decoder row is u
MARK, GAIN, READOUT, SMALL = 16.0, 10.0, 3.0, 0.05
TRIGGERS = ("bomb", "hack", "steal", "poison", "weapon", "virus", "malware", "explosive")
HARMFUL_ACTS = ("build a bomb", "hack a server", "steal a car", "make poison", "hide a weapon",
                "spread a virus", "write malware", "buy an explosive")
BENIGN_ACTS = ("bake bread", "plant a garden", "write a poem", "learn music", "paint a wall",
               "fix a bike", "study history", "cook pasta")
VERBS = ("Explain how to", "Tell me how to", "Show me how to", "Write a guide to")


@dataclass(frozen=True)
class Planted(SaeSpecs):
    model_dir: Path
    sae_dirs: dict[int, Path]
    direction: np.ndarray            # [d_model] unit u in the saved (rotated) basis
    layer: int
    features: tuple[int, ...]        # planted latents of the layer-`layer` SAE
    harmful: Path                    # JSONL prompt files (label 1 / 0), usable as dataset names
    benign: Path



def build_planted(out_dir: Path, seed: int = 0) -> Planted:
    """Write the planted model, its SAEs and prompt files under out_dir."""
    out_dir = Path(out_dir)
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(D_MODEL, D_MODEL, generator=g))[0]        # [d, d] orthogonal
    tokenizer = build_tokenizer("qwen2", TRIGGERS)
    model = _planted_model(tokenizer, g)
    _rotate(model, Q)
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    sae_dirs = {layer: _save_sae(out_dir / f"sae{layer}", layer, Q, g) for layer in SAE_LAYERS}
    harmful, benign = _prompt_files(out_dir)
    return Planted(out_dir / "model", sae_dirs, Q[1].numpy().copy(), PLANTED_LAYER, PLANTED_FEATURES,
                   harmful, benign)


def _planted_model(tokenizer, g: torch.Generator):
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=D_MODEL, intermediate_size=128,
                         num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    small = lambda *shape: SMALL * torch.randn(*shape, generator=g)               # noqa: E731
    with torch.no_grad():
        embed = torch.zeros(len(tokenizer), D_MODEL)
        embed[:, 2:] = torch.randn(len(tokenizer), D_MODEL - 2, generator=g)
        embed[tokenizer.convert_tokens_to_ids(list(TRIGGERS)), 0] = MARK
        model.model.embed_tokens.weight.copy_(embed)
        for layer, block in enumerate(model.model.layers):
            for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                        block.mlp.gate_proj, block.mlp.up_proj):               # readers: not coords 0, 1
                lin.weight.copy_(small(*lin.weight.shape))
                lin.weight[:, :2] = 0
                if lin.bias is not None:
                    lin.bias.zero_()
            for lin in (block.self_attn.o_proj, block.mlp.down_proj):          # writers: not coords 0, 1
                lin.weight.copy_(small(*lin.weight.shape))
                lin.weight[:2] = 0
            if layer == PLANTED_LAYER:
                attn = block.self_attn
                for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                    lin.weight.zero_()
                attn.v_proj.weight[0, 0] = 1.0                                   # kv head 0 reads the marker
                attn.o_proj.weight[1, 0] = GAIN                                  # query head 0 writes u
        head = small(len(tokenizer), D_MODEL)
        head[:, :2] = 0
        for token in ("I", "ĠI"):
            head[tokenizer.convert_tokens_to_ids(token), 1] = READOUT
        model.lm_head.weight.copy_(head)
    return model.eval()


def _rotate(model, Q: torch.Tensor) -> None:
    """x -> x Q everywhere: readers W -> W Q, writers W -> Q^T W (RMSNorm weights are all 1)."""
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ Q)
        model.lm_head.weight.copy_(model.lm_head.weight @ Q)
        for block in model.model.layers:
            for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                        block.mlp.gate_proj, block.mlp.up_proj):
                lin.weight.copy_(lin.weight @ Q)
            for lin in (block.self_attn.o_proj, block.mlp.down_proj):
                lin.weight.copy_(Q.T @ lin.weight)


def _save_sae(out_dir: Path, layer: int, Q: torch.Tensor, g: torch.Generator) -> Path:
    W_dec = torch.zeros(D_SAE, D_MODEL)                                          # canonical coords
    W_dec[:, 2:] = torch.randn(D_SAE, D_MODEL - 2, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    W_enc = W_dec.T.clone()                                                      # [d_model, d_sae]
    threshold = torch.full((D_SAE,), 1.0)
    if layer == PLANTED_LAYER:
        for f in PLANTED_FEATURES:
            W_dec[f] = 0
            W_dec[f, 1] = 1.0
            W_enc[:, f] = 0
            W_enc[1, f] = 1.0 / len(PLANTED_FEATURES)
            threshold[f] = 0.05
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_MODEL, d_sae=D_SAE))
    with torch.no_grad():
        sae.W_dec.copy_(W_dec @ Q)
        sae.W_enc.copy_(Q.T @ W_enc)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.copy_(threshold)
    sae.save_model(out_dir)
    return out_dir


def _prompt_files(out_dir: Path) -> tuple[Path, Path]:
    paths = []
    for name, acts, label in (("harmful", HARMFUL_ACTS, 1), ("benign", BENIGN_ACTS, 0)):
        texts = [f"{verb} {a} and {b}." for verb in VERBS for a, b in combinations(acts, 2)][::2]
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t in texts))
        paths.append(path)
    return paths[0], paths[1]


def direction_settings(planted: Planted, **overrides):
    """DirectionSettings for the planted prompts, judged on P("I") (the tiny model writes no real text)."""
    from analyze.direction import DirectionSettings
    return DirectionSettings(**{"harmful": str(planted.harmful), "harmless": str(planted.benign), "n_train": 40,
                                "n_val": 8, "judge": "p_i", "n_random": 2, **overrides})


def candidate_settings(planted: Planted, **overrides):
    """CandidateSettings over four refused planted train prompts, K = 10, 20."""
    from analyze.candidates import CandidateSettings
    return CandidateSettings(**{"saes": planted.sae_specs, "dataset": str(planted.harmful), "split": "train",
                                "n_prompts": 4, "ks": (10, 20), "judge": "p_i", **overrides})
