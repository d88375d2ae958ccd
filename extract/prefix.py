"""Prefix reuse: a forward that starts at block L from the clean residual after block L-1.

An intervention that edits only layers >= L leaves blocks 0..L-1 untouched, so their output is the
clean residual at layer L-1, which depends on the prompt alone. `prefix_source` computes it once per
prompt as an ordinary extraction run (residuals at every position, no logits, stopped after block
L-1) and reads it back from Zarr; `started_at` then runs the model's own forward with blocks 0..L-1
swapped for a pass-through and block L fed the stored residual. The model computes its masks,
position ids and rotary embeddings itself (Qwen2, Llama, Gemma-2 alike), so blocks L.. see exactly
what they see in a full forward: in fp32 the logits are bit-for-bit those of the full forward of the
same batch (tests/test_prefix.py). Against the run without reuse they may differ in the last bits,
because the prefix run batched the prompts with other padding.

Eligible runs (`start_layer`): no generation (a KV cache would need every layer's keys), no loss over
all positions, and interventions that act at block outputs only (SAE zero-ablation and clamps,
direction addition); direction ablation edits every layer and the embedding, so it is never eligible.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from extract.interventions import Intervention


@dataclass(frozen=True)
class PrefixSource:
    """The clean residual after block `layer - 1` for each prompt, read from run `run_id`."""

    run_id: str
    layer: int                                         # the first block that runs
    residuals: dict[str, np.ndarray]                   # prompt_id -> [n_tokens, d_model] float32


def start_layer(specs: Sequence[Intervention], n_layers: int) -> int | None:
    """The first block any of `specs` edits, when a forward can start there; None when it cannot (or L = 0)."""
    layers: set[int] = set()
    for spec in {s.spec_hash(): s for s in specs}.values():
        if spec.direction_ablate is not None:
            return None
        layers |= set(spec.layers)
        if spec.direction_add is not None:
            layers.add(spec.direction_add.layer)
    if not layers:
        return None                                   # clean items: nothing to skip that is not already cached
    first = min(layers)
    return first if 0 < first < n_layers else None


class _PassThrough(nn.Module):
    """Stands in for a skipped decoder block: returns its input residual."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextmanager
def started_at(blocks: nn.ModuleList, layer: int, h_prev: torch.Tensor) -> Iterator[None]:
    """Inside the context, a forward skips blocks[:layer] and feeds blocks[layer] the residual h_prev
    [batch, seq, d_model] (the clean output of block layer - 1, laid out like the batch's input ids)."""
    saved = [blocks[i] for i in range(layer)]

    def feed(module, args, kwargs):
        if args:
            return (h_prev.to(args[0].dtype), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h_prev.to(kwargs["hidden_states"].dtype)}

    handle = blocks[layer].register_forward_pre_hook(feed, with_kwargs=True, prepend=True)
    try:
        for i in range(layer):
            blocks[i] = _PassThrough()
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block
        handle.remove()


def left_padded(source: PrefixSource, prompt_ids: Sequence[str], width: int, dtype: torch.dtype,
                device: str | torch.device) -> torch.Tensor:
    """The stored residuals of these prompts, left-padded with zeros to `width`: [batch, width, d_model]."""
    first = source.residuals[prompt_ids[0]]
    out = torch.zeros((len(prompt_ids), width, first.shape[1]), dtype=dtype)
    for b, pid in enumerate(prompt_ids):
        h = source.residuals[pid]
        out[b, width - h.shape[0]:] = torch.from_numpy(h).to(dtype)
    return out.to(device)
