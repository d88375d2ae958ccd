"""Gradient passes: the linear prediction of zero-ablating each active SAE latent, from one forward and backward.

Zero-ablating latent i at layer L (extract/hooks.py, error term kept) sets h'_L = h_L - z_i(h_L) W_dec[i]
at every position. Its first-order effect on a metric m of the last-position logits is

    attribution_i = sum_pos (-z_i[pos]) * (W_dec[i] . dm/dh_L[pos])        (attribution patching)

i.e. (z_i^ablated - z_i^clean) * dm/dz_i with the SAE error frozen: the gradient reaches z_i only
through the decoder, never through the encoder. With `steps` S > 1 the gradient is the mean over
integrated-gradient points alpha = 0, 1/S, ..., (S-1)/S (a left Riemann sum, so S = 1 is plain
attribution patching) on the path h_L - alpha * sum_j z_j W_dec[j]: every active latent of layer L
scaled down together (Marks et al.'s feature-circuit IG, one layer at a time, other layers clean).
Then one pass per step and layer; S = 1 takes one pass for every layer at once.

Metrics (m at the last prompt position, `i_token_ids` = "I" and " I"):
- log_p: log P("I"), P("I") summed over the "I" tokens, as every stage measures it;
- logit_diff: logsumexp of the "I" logits minus the logit of the most likely other token of the clean
  forward (the model's compliant first token), fixed per prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from extract.datasets import Prompt
from extract.models import LoadedModel
from extract.run import _left_pad, make_items
from extract.saes import SaeRef, decoder_rows, encode
from store import UsageError
from store.settings import Settings

METRICS = ("log_p", "logit_diff")
Progress = Callable[[int], None]                       # prompts done so far


@dataclass(frozen=True)
class GradientSettings(Settings):
    metric: str = "log_p"                # log_p | logit_diff (module docstring)
    steps: int = 1                       # integrated-gradient points; 1 = attribution patching
    batch_size: int = 8                  # prompts per forward and backward

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise UsageError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.steps < 1:
            raise UsageError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class Attributions:
    scores: pl.DataFrame                 # prompt_id, layer, feature, score (predicted delta m), z_sum
    prompts: pl.DataFrame                # prompt_id, metric_clean, p_i_clean, compliant_token (logit_diff)


def attributions(model: LoadedModel, prompts: Sequence[Prompt], saes: Sequence[SaeRef],
                 settings: GradientSettings, progress: Progress | None = None) -> Attributions:
    """Per prompt, the predicted change of the metric when each latent active on it is zero-ablated."""
    if not saes:
        raise UsageError("attribution needs at least one SAE layer")
    items = make_items(model, prompts)
    order = sorted(range(len(items)), key=lambda i: (len(items[i].chat.input_ids), i))
    score_parts, prompt_rows = [], []
    for start in range(0, len(order), settings.batch_size):
        batch = order[start:start + settings.batch_size]
        ids, mask, pad = _left_pad([items[i].chat.input_ids for i in batch], model)
        parts, clean = _batch(model, ids, mask, pad, saes, settings)
        for b, i in enumerate(batch):
            pid = prompts[i].prompt_id
            prompt_rows.append({"prompt_id": pid, **{k: v[b] for k, v in clean.items()}})
            for layer, (feature, score, z_sum) in parts[b].items():
                score_parts.append(pl.DataFrame({"prompt_id": pid, "layer": layer, "feature": feature, "score": score,
                                                 "z_sum": z_sum}, schema=_SCORE_SCHEMA))
        if progress:
            progress(min(start + settings.batch_size, len(order)))
    scores = pl.concat(score_parts) if score_parts else pl.DataFrame(schema=_SCORE_SCHEMA)
    frame = pl.DataFrame(prompt_rows, schema={"prompt_id": pl.String, "metric_clean": pl.Float64,
                                              "p_i_clean": pl.Float64, "compliant_token": pl.Int32})
    return Attributions(scores.sort("prompt_id", "layer", "feature"), frame)


_SCORE_SCHEMA = {"prompt_id": pl.String, "layer": pl.Int16, "feature": pl.Int32, "score": pl.Float64,
                 "z_sum": pl.Float64}


def _batch(model: LoadedModel, ids, mask, pad, saes: Sequence[SaeRef], settings: GradientSettings):
    """Scores of one batch: per row {layer: (features, scores, z sums)}, and the clean metric values."""
    layers = [s.layer for s in saes]
    real = (torch.arange(ids.shape[1])[None, :] >= pad[:, None]).to(model.device)   # [batch, seq] not padding
    grads = {layer: None for layer in layers}
    resid: dict[int, torch.Tensor] = {}
    compliant, clean = None, {}
    passes = [(layers, 0.0)] if settings.steps == 1 else \
        [([layer], k / settings.steps) for layer in layers for k in range(settings.steps)]
    for at, alpha in passes:
        g, h, logits_metric = _pass(model, ids, mask, {s.layer: s for s in saes if s.layer in at}, alpha,
                                    settings.metric, compliant)
        if compliant is None:                  # the first pass is clean (alpha = 0): fix the compliant token
            compliant = logits_metric["compliant"]
            clean = {"metric_clean": logits_metric["metric"].tolist(), "p_i_clean": logits_metric["p_i"].tolist(),
                     "compliant_token": compliant.tolist() if settings.metric == "logit_diff" else [None] * len(ids)}
        for layer in at:
            grads[layer] = g[layer] / settings.steps + (0 if grads[layer] is None else grads[layer])
            resid.setdefault(layer, h[layer])
    out: list[dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]] = [{} for _ in range(len(ids))]
    for ref in saes:
        z = encode(ref.sae, resid[ref.layer]) * real[..., None]                      # [batch, seq, d_sae]
        W = decoder_rows(ref.sae, torch.arange(ref.d_sae))                           # [d_sae, d_model]
        proj = grads[ref.layer].float().to(W.device) @ W.T                           # [batch, seq, d_sae]
        score = -(z * proj).sum(1).double()                                          # [batch, d_sae]
        z_sum = z.sum(1).double()
        for b in range(len(ids)):
            active = torch.nonzero(z_sum[b] > 0).flatten()
            out[b][ref.layer] = (active.numpy().astype(np.int32), score[b, active].numpy(), z_sum[b, active].numpy())
    return out, clean


def _pass(model: LoadedModel, ids, mask, saes: dict[int, SaeRef], alpha: float, metric: str,
          compliant: torch.Tensor | None):
    """One forward and backward: dm/dh at each layer of `saes` (at alpha along the IG path), the clean residuals."""
    leaves: dict[int, torch.Tensor] = {}
    resid: dict[int, torch.Tensor] = {}

    def hook_for(layer: int, ref: SaeRef):
        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            resid[layer] = h.detach()
            edited = h
            if alpha:
                z = encode(ref.sae, h.detach())                                      # [batch, seq, d_sae]
                W = decoder_rows(ref.sae, torch.arange(ref.d_sae))                   # [d_sae, d_model]
                edited = h - (alpha * (z @ W)).to(h.dtype)
            leaves[layer] = torch.zeros_like(h, requires_grad=True)
            edited = edited + leaves[layer]
            return (edited, *out[1:]) if isinstance(out, tuple) else edited
        return hook

    handles = [model.blocks[layer].register_forward_hook(hook_for(layer, ref), prepend=True)
               for layer, ref in saes.items()]
    try:
        with torch.enable_grad():
            logits = model.model(input_ids=ids, attention_mask=mask, use_cache=False,
                                 logits_to_keep=1).logits[:, -1].float()              # [batch, vocab]
            m, info = _metric(logits, model.i_token_ids, metric, compliant)
            layers = sorted(leaves)
            found = torch.autograd.grad(m.sum(), [leaves[l] for l in layers])
    finally:
        for handle in handles:
            handle.remove()
    return dict(zip(layers, (g.detach() for g in found))), resid, {**info, "metric": m.detach().double()}


def _metric(logits: torch.Tensor, i_ids: Sequence[int], metric: str, compliant: torch.Tensor | None):
    """m per row, plus P("I") and the compliant token (argmax of the non-"I" logits) of these logits."""
    i_idx = torch.tensor(list(i_ids), device=logits.device)
    lse_i = torch.logsumexp(logits[:, i_idx], dim=-1)                                # [batch]
    log_p = lse_i - torch.logsumexp(logits, dim=-1)
    others = logits.detach().clone()
    others[:, i_idx] = -torch.inf
    top_other = others.argmax(-1)
    info = {"p_i": log_p.detach().exp().double(), "compliant": top_other}
    if metric == "log_p":
        return log_p, info
    chosen = top_other if compliant is None else compliant
    return lse_i - logits.gather(1, chosen[:, None])[:, 0], info
