"""Tiny random sae-lens SAEs (JumpReLU, TopK) saved with sae-lens's own `save_model`, built offline."""
from __future__ import annotations

from pathlib import Path

import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

FIRING = 0.2                                              # TopK: k = FIRING * d_sae


def build_tiny_sae(kind: str, d_in: int, d_sae: int, out_dir: str | Path, seed: int, *,
                   scale: float = 1.0) -> Path:
    """Save a random `kind` ("jumprelu" | "topk") SAE into out_dir and return out_dir.

    Decoder rows are unit-norm and the encoder is their transpose, so on inputs whose entries are
    about N(0, scale^2) each pre-activation is about N(0, scale^2): JumpReLU thresholds drawn in
    [0.5, 1.3] * scale let 10-30% of the latents fire; TopK keeps 20%.
    """
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)                       # [d_sae, d_in]
    if kind == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
        threshold = scale * (0.5 + 0.8 * torch.rand(d_sae, generator=g))
    elif kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=max(1, round(FIRING * d_sae))))
        threshold = None
    else:
        raise ValueError(f"unknown SAE kind {kind!r}")
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(0.1 * scale * torch.randn(d_in, generator=g))     # so that apply_b_dec_to_input matters
        if threshold is not None:
            sae.threshold.copy_(threshold)
    out_dir = Path(out_dir)
    sae.save_model(out_dir)
    return out_dir
