"""Forward hooks on decoder blocks: apply interventions, capture residuals, stop a forward early.

"Layer L" is the output of `blocks[L]` (HF hidden_states[L+1]; for the last block HF's
hidden_states[-1] is taken after the final norm, the capture here is before it).

Hook order on a block, whatever order the contexts are entered in: intervention hooks are
registered with `prepend=True`, so they run before every other forward hook on the block
(captures here, and the hooks transformers installs for `output_hidden_states`, so those see the
edited residual too); captures are appended, so they record the residual after the edit.
Within one layer's intervention the order is: SAE edits (zero-ablate, clamp), then direction_add,
then direction_ablate, so with direction_ablate the residual never contains the direction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import SAE
from torch import nn

from extract.interventions import Intervention
from extract.saes import decoder_rows, encode
from store.errors import UsageError

# (batch rows [n], positions [n] relative to each row's real tokens, seq_len) -> columns [n]
PositionsIndex = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


class _StopForward(Exception):
    """Raised by `stop_after` once the last needed block has run."""


@dataclass(frozen=True)
class _SaeEdit:
    """One layer's zero-ablations and clamps for the rows that have any."""
    sae: SAE
    rows: torch.Tensor | None           # [n_sel] batch rows edited; None: every row
    features: torch.Tensor              # [n_f] union of the edited features, ascending
    W: torch.Tensor                     # [n_f, d_model] what each feature writes (float32)
    ablate: torch.Tensor                # [n_sel, n_f] 1.0 where zero-ablated
    clamp: torch.Tensor                 # [n_sel, n_f] True where clamped
    value: torch.Tensor                 # [n_sel, n_f] clamp values
    ablates_row: torch.Tensor           # [n_sel] the row has zero-ablations (at every position)
    skips_first: torch.Tensor           # [n_sel] the row's zero-ablations leave position 0 alone
    clamp_all: torch.Tensor             # [n_sel] the row clamps at every position
    pos: torch.Tensor                   # [n_sel, max_pos] clamp positions (0 where not valid)
    pos_valid: torch.Tensor             # [n_sel, max_pos]


@dataclass(frozen=True)
class _DirectionEdit:
    rows: torch.Tensor | None           # [n_sel]; None: every row
    vectors: torch.Tensor               # [n_sel, d_model] float32: unit r (ablate) or scale * unit r (add)


@dataclass(frozen=True)
class _LayerPlan:
    sae: _SaeEdit | None
    add: _DirectionEdit | None


@dataclass(frozen=True)
class _BatchPlan:
    layers: dict[int, _LayerPlan]
    ablate: _DirectionEdit | None


@contextmanager
def intervened(blocks: Sequence[nn.Module], interventions: Sequence[Intervention] | Intervention,
               saes: Mapping[int, SAE], embed_module: nn.Module | None = None, *,
               pad_offsets: torch.Tensor | None = None,
               positions_index: PositionsIndex | None = None) -> Iterator[None]:
    """Apply one intervention to every row, or interventions[b] to batch row b, inside the context.

    Clamp positions count a row's real tokens: with LEFT padding give `pad_offsets` [batch] (position
    p >= 0 of row b is column pad_offsets[b] + p; p < 0 is column seq_len + p for every row), or a
    `positions_index` callback for any other layout. Clamps at explicit positions act on the prompt
    only: forward steps that extend a KV cache (generation) hold generated tokens and are not clamped.
    """
    per_row = not isinstance(interventions, Intervention)
    specs = list(interventions) if per_row else [interventions]
    if pad_offsets is not None and positions_index is not None:
        raise UsageError("give pad_offsets or positions_index, not both")
    _validate(specs, blocks, saes)
    active = [s for s in specs if not s.is_empty]
    if not active:                                    # nothing to do: the forward stays bit-for-bit
        yield
        return
    sae_layers = {l for s in active for l in s.layers}
    add_layers = {s.direction_add.layer for s in active if s.direction_add is not None}
    ablates = any(s.direction_ablate is not None for s in active)
    clamps_at = any(s.clamp_positions and any(s.clamp.values()) for s in active)
    plan_for = _plan_cache(specs, per_row, saes)
    state = {"offset": 0}                             # tokens already in the KV cache at this forward

    handles = []
    try:
        if clamps_at:
            handles.append(blocks[0].register_forward_pre_hook(_track_offset(state), with_kwargs=True, prepend=True))
        edit_layers = set(range(len(blocks))) if ablates else sae_layers | add_layers
        for layer in sorted(edit_layers):
            hook = _block_hook(layer, plan_for, state, pad_offsets, positions_index)
            handles.append(blocks[layer].register_forward_hook(hook, prepend=True))
        if ablates:
            # Arditi et al.: ablate wherever the residual is written: embedding, every block's input,
            # every sublayer's write (so no block reads r mid-way) and every block's output (above)
            project = _projection_hook(plan_for)
            writers = [embed_module] if embed_module is not None else []
            writers += [m for block in blocks for m in _residual_writers(block)]
            handles += [m.register_forward_hook(project, prepend=True) for m in writers]
            handles += [b.register_forward_pre_hook(_projection_pre_hook(plan_for), with_kwargs=True, prepend=True)
                        for b in blocks]
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def captured(blocks: Sequence[nn.Module], layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """A dict filled during each forward: layer -> residual after that block [batch, seq, d_model].

    Detached, in the model's dtype; runs after any intervention on the same block (see module doc).
    A later forward in the same context overwrites the entries.
    """
    acts: dict[int, torch.Tensor] = {}
    for layer in layers:
        _check_layer(layer, len(blocks))

    def keep(layer: int):
        def hook(module, args, out):
            acts[layer] = (out[0] if isinstance(out, tuple) else out).detach()
        return hook

    handles = []
    try:
        handles += [blocks[layer].register_forward_hook(keep(layer)) for layer in sorted(set(layers))]
        yield acts
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def stop_after(blocks: Sequence[nn.Module], last_layer: int) -> Iterator[None]:
    """Abort any forward inside the context once block `last_layer` and all its hooks have run.

    The abort is a private exception: run forwards through `run_until`, which catches it.
    """
    _check_layer(last_layer, len(blocks))

    def stop(*_):
        raise _StopForward

    if last_layer + 1 < len(blocks):                  # before the next block: every hook of last_layer has run
        handle = blocks[last_layer + 1].register_forward_pre_hook(stop, prepend=True)
    else:                                             # the last block: after the hooks registered so far
        handle = blocks[last_layer].register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def run_until(model: nn.Module, inputs: Mapping[str, Any], blocks: Sequence[nn.Module], last_layer: int) -> None:
    """Run `model(**inputs)` without gradients up to block `last_layer` only; captures fill as usual."""
    with torch.no_grad(), stop_after(blocks, last_layer):
        try:
            model(**{"use_cache": False, **inputs})
        except _StopForward:
            pass


def _check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise UsageError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")


def _validate(specs: list[Intervention], blocks: Sequence[nn.Module], saes: Mapping[int, SAE]) -> None:
    d_sae = {layer: int(sae.cfg.d_sae) for layer, sae in saes.items()}
    d_model = getattr(blocks[0], "hidden_size", None) if blocks else None
    if d_model is None and saes:
        d_model = int(next(iter(saes.values())).cfg.d_in)
    for spec in {id(s): s for s in specs}.values():
        if d_model is None:                           # width unknown here: the vector sets it
            width = spec.direction_ablate or (spec.direction_add.vector if spec.direction_add else ())
            spec.validate_against(len(blocks), len(width), d_sae)
        else:
            spec.validate_against(len(blocks), int(d_model), d_sae)


def _residual_writers(block: nn.Module) -> list[nn.Module]:
    """The sublayers whose outputs a block adds to its residual stream."""
    if hasattr(block, "post_feedforward_layernorm"):  # Gemma-2/3 normalize each sublayer's output, then add
        return [block.post_attention_layernorm, block.post_feedforward_layernorm]
    return [m for m in (getattr(block, "self_attn", None), getattr(block, "mlp", None)) if m is not None]


# --- plans: per-row specs turned into tensors once per batch size and device ---

def _plan_cache(specs: list[Intervention], per_row: bool, saes: Mapping[int, SAE]):
    cache: dict[tuple[int, torch.device], _BatchPlan] = {}

    def plan_for(h: torch.Tensor) -> _BatchPlan:
        n_batch = h.shape[0]
        if per_row and n_batch != len(specs):
            raise UsageError(f"{len(specs)} interventions for a batch of {n_batch} rows; "
                             f"give one per row or a single Intervention")
        key = (n_batch, h.device)
        if key not in cache:
            cache[key] = _build_plan(specs if per_row else specs * n_batch, saes, h.device)
        return cache[key]
    return plan_for


def _build_plan(specs: list[Intervention], saes: Mapping[int, SAE], device: torch.device) -> _BatchPlan:
    layers = sorted({l for s in specs for l in s.layers} | {s.direction_add.layer for s in specs if s.direction_add})
    plans = {}
    for layer in layers:
        sae = _sae_edit(layer, specs, saes.get(layer), device)
        adds = [(b, s.direction_add.vector, s.direction_add.scale) for b, s in enumerate(specs)
                if s.direction_add is not None and s.direction_add.layer == layer]
        plans[layer] = _LayerPlan(sae, _direction_edit(adds, len(specs), device))
    ablations = [(b, s.direction_ablate, 1.0) for b, s in enumerate(specs) if s.direction_ablate is not None]
    return _BatchPlan(plans, _direction_edit(ablations, len(specs), device))


def _rows_index(rows: list[int], n_batch: int, device: torch.device) -> torch.Tensor | None:
    return None if len(rows) == n_batch else torch.tensor(rows, dtype=torch.long, device=device)


def _direction_edit(items: list[tuple[int, tuple[float, ...], float]], n_batch: int,
                    device: torch.device) -> _DirectionEdit | None:
    if not items:
        return None
    vectors = torch.tensor([v for _, v, _ in items], dtype=torch.float32, device=device)   # [n_sel, d_model]
    scales = torch.tensor([s for _, _, s in items], dtype=torch.float32, device=device)
    vectors = vectors / vectors.norm(dim=-1, keepdim=True) * scales[:, None]
    return _DirectionEdit(_rows_index([b for b, _, _ in items], n_batch, device), vectors)


def _sae_edit(layer: int, specs: list[Intervention], sae: SAE | None, device: torch.device) -> _SaeEdit | None:
    rows = [b for b, s in enumerate(specs) if s.zero_ablate.get(layer) or s.clamp.get(layer)]
    if not rows:
        return None
    assert sae is not None                            # _validate checked that every used layer has an SAE
    edits = [(specs[b].zero_ablate.get(layer, ()), specs[b].clamp.get(layer, {}), specs[b].clamp_positions)
             for b in rows]
    features = sorted({f for za, cl, _ in edits for f in (*za, *cl)})
    col = {f: k for k, f in enumerate(features)}
    n_sel, n_f = len(rows), len(features)
    ablate = torch.zeros(n_sel, n_f)
    clamp = torch.zeros(n_sel, n_f, dtype=torch.bool)
    value = torch.zeros(n_sel, n_f)
    abl_r = [i for i, (za, _, _) in enumerate(edits) for _ in za]
    abl_c = [col[f] for za, _, _ in edits for f in za]
    cl_r = [i for i, (_, cl, _) in enumerate(edits) for _ in cl]
    cl_c = [col[f] for _, cl, _ in edits for f in cl]
    ablate[abl_r, abl_c] = 1.0
    clamp[cl_r, cl_c] = True
    value[cl_r, cl_c] = torch.tensor([float(v) for _, cl, _ in edits for v in cl.values()])
    explicit = [list(ps) if cl else [] for _, cl, ps in edits]
    max_pos = max(len(p) for p in explicit)
    pos = torch.tensor([p + [0] * (max_pos - len(p)) for p in explicit], dtype=torch.long).reshape(n_sel, max_pos)
    pos_valid = torch.tensor([[True] * len(p) + [False] * (max_pos - len(p)) for p in explicit],
                             dtype=torch.bool).reshape(n_sel, max_pos)
    feats = torch.tensor(features, dtype=torch.long)
    return _SaeEdit(
        sae=sae, rows=_rows_index(rows, len(specs), device), features=feats.to(sae.W_dec.device),
        W=decoder_rows(sae, feats).to(device), ablate=ablate.to(device), clamp=clamp.to(device),
        value=value.to(device), ablates_row=torch.tensor([bool(za) for za, _, _ in edits], device=device),
        skips_first=torch.tensor([not specs[b].zero_ablate_first for b in rows], device=device),
        clamp_all=torch.tensor([bool(cl) and not ps for _, cl, ps in edits], device=device),
        pos=pos.to(device), pos_valid=pos_valid.to(device))


# --- hooks ---

def _track_offset(state: dict[str, int]):
    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        # read before block 0 updates the cache: the tokens of earlier forward steps
        state["offset"] = int(cache.get_seq_length()) if cache is not None else 0
    return hook


def _block_hook(layer: int, plan_for, state: dict[str, int], pad_offsets: torch.Tensor | None,
                positions_index: PositionsIndex | None):
    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        batch = plan_for(h)
        plan = batch.layers.get(layer)
        if plan is not None and plan.sae is not None:
            h = _apply_sae_edit(h, plan.sae, state["offset"], pad_offsets, positions_index)
        if plan is not None and plan.add is not None:
            h = _rows_apply(h, plan.add, lambda x, v: x + v[:, None, :])
        if batch.ablate is not None:
            h = _project_out(h, batch.ablate)
        return (h, *out[1:]) if isinstance(out, tuple) else h
    return hook


def _projection_hook(plan_for):
    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = _project_out(h, plan_for(h).ablate)
        return (h, *out[1:]) if isinstance(out, tuple) else h
    return hook


def _projection_pre_hook(plan_for):
    def hook(module, args, kwargs):
        if args:
            return (_project_out(args[0], plan_for(args[0]).ablate), *args[1:]), kwargs
        h = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": _project_out(h, plan_for(h).ablate)}
    return hook


def _rows_apply(h: torch.Tensor, edit: _DirectionEdit, fn) -> torch.Tensor:
    """fn(x [n_sel, seq, d] float32, vectors [n_sel, d]) on the edited rows; other rows untouched."""
    sel = h if edit.rows is None else h[edit.rows]
    new = fn(sel.float(), edit.vectors).to(h.dtype)
    return new if edit.rows is None else h.index_copy(0, edit.rows, new)


def _project_out(h: torch.Tensor, edit: _DirectionEdit | None) -> torch.Tensor:
    """h - (h . r) r for unit r, computed in float32."""
    if edit is None:
        return h
    return _rows_apply(h, edit, lambda x, u: x - (x @ u[:, :, None]) * u[:, None, :])


def _apply_sae_edit(h: torch.Tensor, edit: _SaeEdit, offset: int, pad_offsets: torch.Tensor | None,
                    positions_index: PositionsIndex | None) -> torch.Tensor:
    """h - sum_ablated z_i W_i + sum_clamped (v_i - z_i) W_i; untouched positions keep their bits."""
    sel = h if edit.rows is None else h[edit.rows]                      # [n_sel, seq, d_model]
    z = encode(edit.sae, sel)[..., edit.features].to(h.device)          # [n_sel, seq, n_f]
    touched = edit.ablates_row[:, None].expand(-1, sel.shape[1])        # [n_sel, seq] zero-ablated here
    if offset == 0 and edit.skips_first.any():                          # the prompt's forward holds position 0
        touched = touched & ~_first_columns(edit, sel.shape[1], pad_offsets, positions_index, h.shape[0])
    coef = -z * edit.ablate[:, None, :] * touched[..., None]            # [n_sel, seq, n_f]
    if edit.clamp.any():
        at = _clamp_columns(edit, sel.shape[1], offset, pad_offsets, positions_index, h.shape[0])
        here = edit.clamp[:, None, :] & at[:, :, None]                  # [n_sel, seq, n_f]
        coef = torch.where(here, edit.value[:, None, :] - z, coef)
        touched = touched | at
    new = (sel.float() + coef @ edit.W).to(h.dtype)
    new = torch.where(touched[..., None], new, sel)
    return new if edit.rows is None else h.index_copy(0, edit.rows, new)


def _first_columns(edit: _SaeEdit, seq_len: int, pad_offsets: torch.Tensor | None,
                   positions_index: PositionsIndex | None, n_batch: int) -> torch.Tensor:
    """[n_sel, seq] True at position 0's column for the rows whose zero-ablations skip it."""
    device = edit.pos.device
    rows = edit.rows if edit.rows is not None else torch.arange(n_batch, device=device)
    if positions_index is not None:
        cols = positions_index(rows, torch.zeros_like(rows), seq_len).to(device).long()
    else:
        cols = (torch.zeros_like(rows) if pad_offsets is None
                else torch.as_tensor(pad_offsets, device=device).long()[rows])
    first = torch.zeros(len(rows), seq_len, dtype=torch.bool, device=device)
    first[torch.arange(len(rows), device=device), cols] = True
    return first & edit.skips_first[:, None]


def _clamp_columns(edit: _SaeEdit, seq_len: int, offset: int, pad_offsets: torch.Tensor | None,
                   positions_index: PositionsIndex | None, n_batch: int) -> torch.Tensor:
    """[n_sel, seq] True at the columns each edited row clamps in this forward step."""
    device = edit.pos.device
    rows = edit.rows if edit.rows is not None else torch.arange(n_batch, device=device)
    if offset > 0:                                    # a generation step: only generated tokens
        return edit.clamp_all[:, None].expand(-1, seq_len)
    pad = (torch.zeros_like(rows) if pad_offsets is None
           else torch.as_tensor(pad_offsets, device=device).long()[rows])  # [n_sel]
    at = edit.clamp_all[:, None] & (torch.arange(seq_len, device=device)[None, :] >= pad[:, None])
    if not edit.pos_valid.any():
        return at
    r, k = edit.pos_valid.nonzero(as_tuple=True)
    p = edit.pos[r, k]
    if positions_index is not None:
        cols = positions_index(rows[r], p, seq_len).to(device)
    else:                                             # left padding: the end is the same column for every row
        cols = torch.where(p >= 0, pad[r] + p, seq_len + p)
    bad = (cols < pad[r]) | (cols >= seq_len)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise UsageError(f"clamp position {int(p[i])} is outside row {int(rows[r[i]])}, "
                         f"which has {seq_len - int(pad[r[i]])} tokens")
    at = at.clone()
    at[r, cols] = True
    return at
