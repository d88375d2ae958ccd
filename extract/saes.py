"""SAEs through sae-lens, one code path for all of them: load, check against a model, encode.

Gemma Scope (JumpReLU), Llama Scope and the project's own SAEs all come back as a `sae_lens.SAE`
and are used only through `sae.encode`, `sae.decode` and `sae.W_dec`:
- Gemma Scope: `JumpReLUSAE`, one threshold per latent.
- Llama Scope was trained as TopK on the Llama-3.1-8B *base* model, but sae-lens loads it as a
  `JumpReLUSAE` whose threshold is one scalar repeated for every latent (the TopK-to-JumpReLU
  conversion of its authors), with the dataset-norm scaling folded into the weights at load.
- Project SAEs are saved with `save_model`: a TopK SAE loads as `TopKSAE`; a BatchTopK SAE is
  saved by sae-lens as a JumpReLU SAE (its learned global threshold), so it loads as `JumpReLUSAE`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import EntryNotFoundError
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.util import dtype_to_str

from extract.layers import parse_layers
from extract.models import REGISTRY, LoadedModel
from store.errors import UsageError
from store.store import Store

# release -> sae_id template, so that `load_sae(release, layer=L)` works for the paper's SAEs
KNOWN_SAE_IDS = {
    "gemma-scope-2b-pt-res-canonical": "layer_{layer}/width_16k/canonical",
    "llama_scope_lxr_8x": "l{layer}r_8x",
    "llama_scope_lxr_32x": "l{layer}r_32x",
}

# what sae-lens and huggingface_hub raise for a missing directory, an unknown release or id,
# a file absent from the cache while offline, or an unreachable hub
_LOAD_ERRORS = (OSError, ValueError, KeyError, EntryNotFoundError)


def load_sae(source: str, layer: int | None = None, device: str = "cpu",
             dtype: torch.dtype | str = torch.float32) -> SAE:
    """The SAE at `source` (a sae-lens directory, "release:sae_id" or a known release), frozen, in eval mode.

    `source` may hold a `{layer}` placeholder (e.g. "runs/saes/layer_{layer}" or
    "gemma-scope-2b-pt-res-canonical:layer_{layer}/width_16k/canonical"), filled from `layer`.
    """
    source = _fill_layer(source, layer)
    dtype_str = dtype_to_str(dtype) if isinstance(dtype, torch.dtype) else dtype
    path = Path(source).expanduser()
    if path.is_dir():
        sae = _load_dir(path, device, dtype_str)
    else:
        release, sep, sae_id = source.partition(":")
        if not sep and release in KNOWN_SAE_IDS and layer is not None:
            sae_id = KNOWN_SAE_IDS[release].format(layer=layer)
        elif not sep or not release or not sae_id:
            raise UsageError(f"no SAE at {source!r}: give a directory holding {SAE_CFG_FILENAME} and "
                             f"{SAE_WEIGHTS_FILENAME}, or 'release:sae_id' "
                             f"(e.g. gemma-scope-2b-pt-res-canonical:layer_12/width_16k/canonical)")
        sae = _load_release(release, sae_id, device, dtype_str)
    sae.requires_grad_(False)
    return sae.eval()


def _fill_layer(source: str, layer: int | None) -> str:
    if "{" not in source:
        return source
    if layer is None:
        raise UsageError(f"SAE source {source!r} has a {{layer}} placeholder; give the layer too")
    try:
        return source.format(layer=layer, L=layer)
    except (KeyError, IndexError, ValueError) as err:
        raise UsageError(f"SAE source {source!r}: only {{layer}} can be filled in ({err!r})") from None


def _load_dir(path: Path, device: str, dtype: str) -> SAE:
    missing = [name for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME) if not (path / name).is_file()]
    if missing:
        raise UsageError(f"{path} is not a sae-lens SAE directory: {', '.join(missing)} missing")
    try:
        return SAE.load_from_disk(path, device=device, dtype=dtype)
    except _LOAD_ERRORS as err:
        raise UsageError(f"cannot load the SAE in {path}: {_first_line(err)}") from None


def _load_release(release: str, sae_id: str, device: str, dtype: str) -> SAE:
    try:
        return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    except _LOAD_ERRORS as err:
        raise UsageError(f"cannot load SAE {release}:{sae_id}: {_first_line(err)}; check the release and id, "
                         f"the network, or the Hugging Face cache (HF_HOME)") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_sae(sae: SAE, d_model: int, layer: int, n_layers: int) -> None:
    """Raise UsageError unless `sae` can read and write the residual after block `layer` of this model."""
    if not 0 <= layer < n_layers:
        raise UsageError(f"SAE layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    if sae.cfg.d_in != d_model:
        raise UsageError(f"SAE width d_in={sae.cfg.d_in} does not match the model's d_model={d_model}")
    if sae.cfg.normalize_activations != "none":
        # then a latent's write into the residual is not z_i * W_dec[i]: fold the scaling first
        raise UsageError(f"the layer-{layer} SAE normalizes its input at run time "
                         f"(normalize_activations={sae.cfg.normalize_activations!r}); fold it into the weights first")


def encode(sae: SAE, h: torch.Tensor) -> torch.Tensor:
    """SAE latents z of residuals h [..., d_in] -> [..., d_sae], float32 (computed in the SAE's dtype)."""
    if h.shape[-1] != sae.cfg.d_in:
        raise UsageError(f"SAE width d_in={sae.cfg.d_in} does not match the residual width {h.shape[-1]}")
    # sae-lens casts the input to `sae.dtype` itself; `sae.to(dtype)` keeps that attribute in step
    return sae.encode(h.to(device=sae.W_dec.device, dtype=sae.dtype)).float()


def decoder_rows(sae: SAE, features: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """What each latent writes into the residual per unit of activation: [n_features, d_in], float32.

    W_dec[i], except for TopK SAEs trained with `rescale_acts_by_decoder_norm`, whose decode
    divides the latent by its decoder norm first.
    """
    idx = torch.as_tensor(features, dtype=torch.long, device=sae.W_dec.device)
    rows = sae.W_dec.detach()[idx].float()                         # [n_features, d_in]
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        rows = rows / rows.norm(dim=-1, keepdim=True)
    return rows


@dataclass(frozen=True)
class SaeRef:
    """An SAE in use at one layer: the loaded module and where it came from."""

    layer: int
    source: str
    sae: Any = field(compare=False, repr=False)

    @property
    def sae_id(self) -> str:
        return hashlib.sha256(f"{self.source}\x00{self.layer}".encode()).hexdigest()[:12]

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)


def resolve_saes(store: Store, model: LoadedModel, explicit: tuple[str, ...], sae_layers: str) -> list[SaeRef]:
    """SAEs for this run: explicit LAYER=SOURCE, else the registry's release, else the store's trained ones."""
    sources: dict[int, str] = {}
    for entry in explicit:
        layer, sep, source = entry.partition("=")
        if not sep or not layer.strip().isdigit():
            raise UsageError(f"--sae must be LAYER=SOURCE (e.g. 12=stores/default/saes/layer_12), got {entry!r}")
        sources[int(layer)] = source.strip()
    wanted = parse_layers(sae_layers, model.n_layers)
    spec = REGISTRY.get(model.name)
    trained = trained_saes(store, model.name)
    for layer in wanted:
        if layer in sources:
            continue
        if spec is not None and spec.sae_release:
            sources[layer] = f"{spec.sae_release}:{spec.sae_id(layer)}"
        elif layer in trained:
            sources[layer] = trained[layer]
        else:
            raise UsageError(f"no SAE for {model.name} layer {layer}; train one with "
                             f"`python cli.py sae train --model {model.name} --layers {layer}` or pass --sae")
    if not explicit and not sae_layers:
        sources = dict(trained)                 # after `sae train`, the store's SAEs are the default
    refs = []
    for layer, source in sorted(sources.items()):
        refs.append(SaeRef(layer, source, load_sae(source, layer=layer, device=model.device)))
    return refs




def trained_saes(store: Store, model: str) -> dict[int, str]:
    """layer -> directory of the store's own trained SAE for `model` (newest per layer)."""
    df = store.sql("SELECT layer, source FROM saes WHERE model = ? AND architecture <> 'external' "
                   "AND source NOT LIKE '%:%' ORDER BY created_at", [model])
    # trained SAEs live inside the store and are registered relative to it
    return {int(layer): source if Path(source).is_absolute() else str(store.path / source)
            for layer, source in df.iter_rows()}
