"""A tiny Qwen-2 with a universal and a prompt-specific refusal latent, its SAEs and prompt files, built offline.

Canonical coordinates of the residual (no rotation; every RMSNorm weight is 1):
- C_MARK, C_SPEC: trigger-word embeddings. The "found" triggers (bomb, poison, ...) carry MARK in both
  (and sqrt(2) * MARK in C_PAD, which nothing reads, so that RMSNorm scales both kinds alike); the
  "held-out" triggers (hack, steal, ...) carry 2 * MARK in C_MARK only;
- block LAYER's attention is uniform (q = k = 0): one head averages C_MARK into C_U, another C_SPEC into C_S;
- the LM head reads C_U + C_S into "I" and " I";
- every other weight is small and random and reads and writes coordinates N_RESERVED.. only.
So at the last position a found prompt has c in C_U and c in C_S, a held-out one 2c in C_U and nothing in
C_S, with c (about 0.7 of the logit that P("I") = 0.5 needs) set by the share of trigger tokens: both are refused;
without C_U neither is; without C_S only the found prompts are not.
SAEs (JumpReLU, b_enc = b_dec = 0) at LAYER and LAYER + 1: UNIVERSAL reads and writes C_U (active on every
harmful prompt), SPECIFIC C_S (active on the found prompts only); the other latents live in coords N_RESERVED..
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

from tests.tiny_models import SaeSpecs, build_tokenizer

N_LAYERS, D_MODEL, D_SAE, HEAD_DIM = 4, 64, 32, 16
C_MARK, C_SPEC, C_U, C_S, C_PAD = 0, 1, 2, 3, 4
N_RESERVED = 5
LAYER = 2                            # stage-2 SAE layers exclude 0 and 1 by default
UNIVERSAL, SPECIFIC = 5, 9           # latents of the layer-LAYER SAE
MARK, GAIN, READOUT, SMALL = 16.0, 6.5, 3.0, 0.05
FOUND = ("bomb", "poison", "weapon", "virus")
HELD_OUT = ("hack", "steal", "malware", "explosive")
VERBS = ("Explain how to", "Tell me how to", "Show me how to", "Write a guide to")


@dataclass(frozen=True)
class PlantedTransfer(SaeSpecs):
    model_dir: Path
    sae_dirs: dict[int, Path]
    found: Path                      # JSONL prompts whose stage-2 sets the tests write (label 1)
    held_out: Path                   # JSONL harmful prompts with the other triggers (label 1)



def build_planted_transfer(out_dir: Path, seed: int = 0) -> PlantedTransfer:
    """Write the model, its SAEs and the two prompt files under out_dir."""
    out_dir = Path(out_dir)
    g = torch.Generator().manual_seed(seed)
    tokenizer = build_tokenizer("qwen2", FOUND + HELD_OUT)
    model = _model(tokenizer, g)
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    sae_dirs = {layer: _save_sae(out_dir / f"sae{layer}", layer, g) for layer in (LAYER, LAYER + 1)}
    paths = []
    for name, words in (("found", FOUND), ("held_out", HELD_OUT)):
        texts = [f"{verb} use a {a} and a {b}." for verb in VERBS for a, b in combinations(words, 2)]
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t, "label": 1}) + "\n" for t in texts))
        paths.append(path)
    return PlantedTransfer(out_dir / "model", sae_dirs, paths[0], paths[1])


def _model(tokenizer, g: torch.Generator):
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=D_MODEL, intermediate_size=128,
                         num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    with torch.no_grad():
        embed = torch.zeros(len(tokenizer), D_MODEL)
        embed[:, N_RESERVED:] = torch.randn(len(tokenizer), D_MODEL - N_RESERVED, generator=g)
        embed[tokenizer.convert_tokens_to_ids(list(FOUND)), C_MARK] = MARK
        embed[tokenizer.convert_tokens_to_ids(list(FOUND)), C_SPEC] = MARK
        embed[tokenizer.convert_tokens_to_ids(list(FOUND)), C_PAD] = 2 ** 0.5 * MARK   # the same norm as 2 * MARK
        embed[tokenizer.convert_tokens_to_ids(list(HELD_OUT)), C_MARK] = 2 * MARK
        model.model.embed_tokens.weight.copy_(embed)
        for layer, block in enumerate(model.model.layers):
            attn, mlp = block.self_attn, block.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                lin.weight.copy_(SMALL * torch.randn(*lin.weight.shape, generator=g))
                lin.weight[:, :N_RESERVED] = 0
                if lin.bias is not None:
                    lin.bias.zero_()
            for lin in (attn.o_proj, mlp.down_proj):
                lin.weight.copy_(SMALL * torch.randn(*lin.weight.shape, generator=g))
                lin.weight[:N_RESERVED] = 0
            if layer == LAYER:
                for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                    lin.weight.zero_()
                attn.v_proj.weight[0, C_MARK] = 1.0                  # kv head 0 reads the marker
                attn.v_proj.weight[HEAD_DIM, C_SPEC] = 1.0           # kv head 1 the found-trigger marker
                attn.o_proj.weight[C_U, 0] = GAIN                    # query head 0 (kv head 0) writes C_U
                attn.o_proj.weight[C_S, 2 * HEAD_DIM] = GAIN         # query head 2 (kv head 1) writes C_S
        head = SMALL * torch.randn(len(tokenizer), D_MODEL, generator=g)
        head[:, :N_RESERVED] = 0
        head[tokenizer.convert_tokens_to_ids(["I", "ĠI"]), C_U] = READOUT
        head[tokenizer.convert_tokens_to_ids(["I", "ĠI"]), C_S] = READOUT
        model.lm_head.weight.copy_(head)
    return model.eval()


def _save_sae(out_dir: Path, layer: int, g: torch.Generator) -> Path:
    W_dec = torch.zeros(D_SAE, D_MODEL)
    W_dec[:, N_RESERVED:] = torch.randn(D_SAE, D_MODEL - N_RESERVED, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)                 # [d_sae, d_model]
    threshold = torch.full((D_SAE,), 1.0)
    if layer == LAYER:
        for feature, coord in ((UNIVERSAL, C_U), (SPECIFIC, C_S)):
            W_dec[feature] = torch.eye(D_MODEL)[coord]
            threshold[feature] = 0.05
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_MODEL, d_sae=D_SAE))
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.copy_(threshold)
    sae.save_model(out_dir)
    return out_dir
