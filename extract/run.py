"""Extraction runs: forward passes (with or without interventions) written into the store.

A run is a list of items (prompt, intervention). Its id is the hash of the model, the SAEs, the
settings and the items, so asking for the same thing twice computes it once. Items are sorted by
length and batched with left padding; each batch is one staged chunk, so an interrupted run
resumes at the first chunk that was not written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from extract import workers
from extract.chat import Chat, render_chat, render_raw
from extract.datasets import Prompt
from extract.hooks import captured, intervened, run_until
from extract.interventions import Intervention
from extract.models import LoadedModel
from extract.prefix import PrefixSource, left_padded, start_layer, started_at
from extract.saes import SaeRef, encode
from store import RunPlan, Store, UsageError, begin_run
from store.settings import Settings

Progress = Callable[[int, int], None]                  # (items done in this step, tokens done)


@dataclass(frozen=True)
class ExtractSettings(Settings):
    layers: tuple[int, ...] = ()          # residual layers stored in Zarr
    positions: str = "all"                # "all" or "last:N": which token positions get rows
    generate: int = 0                     # greedy completion length (0: none)
    save_logits: bool = False             # store last-position logits (float16 [n_items, vocab]) in Zarr
    batch_size: int = 16
    threshold: float = 0.0                # an SAE latent is stored when its value > threshold
    sae_rows: bool = True                 # False: the SAEs only serve interventions; no sae_acts rows
    resid_dtype: str = "float32"          # float32 | float16
    loss: bool = False                    # items.ce_loss: mean next-token CE (nats) over user-role tokens
    logits: bool = True                   # False: stop the forward after the last stored layer (no P("I"))
    reuse_prefix: bool = True             # start eligible forwards at their first edited block (extract/prefix.py)
    one_prefill: bool = True              # with generation, P("I") comes from the generation's first step

    # fields added later are hashed into run ids only when not at their default, so older runs keep their ids.
    # reuse_prefix and one_prefill change the arithmetic in the last bits only (other padding, other position
    # ids), not what is computed, so a run made before them keeps its id and is reused.
    _HASHED_WHEN_SET = ("loss", "logits", "sae_rows", "reuse_prefix", "one_prefill")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {self.batch_size}")
        if self.generate < 0:
            raise UsageError(f"--generate must be >= 0, got {self.generate}")
        if self.resid_dtype not in ("float32", "float16"):
            raise UsageError(f"resid dtype must be float32 or float16, got {self.resid_dtype}")
        self.last_n                       # validates positions
        if not self.logits and (self.generate or self.save_logits or self.loss):
            raise UsageError("a run without logits cannot generate, save logits or measure loss")

    def hashed(self) -> dict[str, Any]:
        """As the base, except that runs without sae_acts rows hash as they did before the flag existed
        (a threshold no latent reaches, 1e30), so their run ids hold."""
        out = super().hashed()
        if not self.sae_rows:
            del out["sae_rows"]
            out["threshold"] = 1e30
        return out

    @property
    def last_n(self) -> int | None:
        """N of "last:N", None for "all"."""
        if self.positions == "all":
            return None
        head, _, n = self.positions.partition(":")
        if head != "last" or not n.isdigit() or int(n) < 1:
            raise UsageError(f"--positions must be 'all' or 'last:N' (N >= 1), got {self.positions!r}")
        return int(n)




@dataclass(frozen=True)
class Item:
    prompt: Prompt
    intervention: Intervention
    chat: Chat
    raw: bool = False                     # plain text, no chat template (see make_items)


@dataclass(frozen=True)
class RunResult:
    run_id: str
    cached: bool                          # True when the store already held the complete run
    n_items: int
    n_rows: int


def make_items(model: LoadedModel, prompts: Sequence[Prompt],
               interventions: Sequence[Intervention] | Intervention | None = None, *,
               raw: bool = False) -> list[Item]:
    """Pair prompts with interventions (one for all, or one each) and render their chats.

    raw=True: the prompt text as plain text (BOS first if the model's chat starts with one), no template.
    """
    if interventions is None:
        interventions = Intervention()
    if isinstance(interventions, Intervention):
        interventions = [interventions] * len(prompts)
    if len(interventions) != len(prompts):
        raise ValueError("one intervention per prompt, or one for all")
    chats: dict[str, Chat] = {}
    items = []
    for prompt, spec in zip(prompts, interventions):
        if prompt.prompt_id not in chats:
            chats[prompt.prompt_id] = (render_raw(model.tokenizer, prompt.text, model.has_bos) if raw
                                       else render_chat(model.tokenizer, prompt.text))
        items.append(Item(prompt, spec, chats[prompt.prompt_id], raw))
    return items


def run_id_for(model: LoadedModel, saes: Sequence[SaeRef], settings: ExtractSettings,
               items: Sequence[Item]) -> str:
    """The run's id: a hash of everything that determines its contents."""
    request = {
        "model": model.name, "dtype": str(model.dtype),
        "saes": {str(s.layer): s.source for s in saes},
        "settings": settings.hashed(),
        "items": [[it.prompt.prompt_id, it.intervention.spec_hash(), *(["raw"] if it.raw else [])] for it in items],
    }
    blob = json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def processing_order(items: Sequence[Item]) -> list[int]:
    """Items sorted by length (little padding per batch); ties keep their order."""
    return sorted(range(len(items)), key=lambda i: (len(items[i].chat.input_ids), i))


def _rows_of(n_tokens: int, last_n: int | None) -> np.ndarray:
    """Token positions that get rows in the store."""
    start = 0 if last_n is None else max(0, n_tokens - last_n)
    return np.arange(start, n_tokens)


def plan_run(model: LoadedModel, saes: Sequence[SaeRef], settings: ExtractSettings,
             items: Sequence[Item]) -> tuple[RunPlan, np.ndarray]:
    """The catalog's view of the run before it starts, and each item's first row."""
    n_rows_each = np.array([len(_rows_of(len(it.chat.input_ids), settings.last_n)) for it in items])
    # rows follow the processing order (items sorted by length), so a batch's rows are contiguous
    row_start = np.zeros(len(items), dtype=np.int64)
    row_start[processing_order(items)] = np.concatenate([[0], np.cumsum(n_rows_each[processing_order(items)])[:-1]])
    uniq = {it.prompt.prompt_id: it for it in items}
    prompts = pl.DataFrame([{k: getattr(it.prompt, k) for k in
                             ("prompt_id", "dataset", "idx", "split", "label", "category", "text")}
                            for it in uniq.values()],
                           schema={"prompt_id": pl.String, "dataset": pl.String, "idx": pl.Int32,
                                   "split": pl.String, "label": pl.Int8, "category": pl.String,
                                   "text": pl.String})
    chatted = {pid: it for pid, it in uniq.items() if not it.raw}      # `chats` holds template renderings only
    chats = pl.DataFrame({"model": [model.name] * len(chatted), "prompt_id": list(chatted),
                          "chat_text": [it.chat.chat_text for it in chatted.values()],
                          "n_tokens": [len(it.chat.input_ids) for it in chatted.values()]},
                         schema={"model": pl.String, "prompt_id": pl.String, "chat_text": pl.String,
                                 "n_tokens": pl.Int32})
    specs = {it.intervention.spec_hash(): it.intervention.to_json() for it in items}
    one_spec = len(specs) == 1
    plan = RunPlan(
        run_id=run_id_for(model, saes, settings, items), model=model.name,
        sae_set={str(s.layer): s.source for s in saes},
        intervention=json.loads(next(iter(specs.values()))) if one_spec else {"per_item": True},
        settings={**asdict(settings), "dtype": str(model.dtype), "device": str(model.device)},
        n_items=len(items), n_rows=int(n_rows_each.sum()), prompts=prompts, chats=chats, specs=specs,
    )
    return plan, row_start


def extract(store: Store, model: LoadedModel, items: Sequence[Item], saes: Sequence[SaeRef] = (),
            settings: ExtractSettings = ExtractSettings(), progress: Progress | None = None) -> RunResult:
    """Run (or resume, or find) one extraction run and return its id."""
    _validate(model, saes, settings, items)
    plan, row_start = plan_run(model, saes, settings, items)
    writer = begin_run(store, plan)
    if writer is None:
        return RunResult(plan.run_id, True, plan.n_items, plan.n_rows)
    resid_np = np.float16 if settings.resid_dtype == "float16" else np.float32
    for layer in settings.layers:
        writer.array(f"resid/{layer}", (plan.n_rows, model.d_model), settings.resid_dtype)
    if settings.generate:                       # indexed by item, written out of row order: not row-buffered
        writer.array("completion_ids", (plan.n_items, settings.generate), "int32", row_buffered=False)
    if settings.save_logits:
        vocab = model.model.get_output_embeddings().weight.shape[0]
        writer.array("logits_last", (plan.n_items, vocab), "float16", row_buffered=False)
    done = writer.done_chunks()
    order = processing_order(items)
    batches = [order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    todo = [(chunk, batch) for chunk, batch in enumerate(batches) if chunk not in done]
    try:
        prefix = _prefix_for(store, model, saes, settings, items) if todo else None
        job = workers.Job(plan.run_id, tuple(saes), settings, items, row_start, resid_np, prefix)
        if progress and done:                       # batches staged before a resume
            resumed = [batches[c] for c in sorted(done) if c < len(batches)]
            progress(sum(map(len, resumed)), sum(len(items[i].chat.input_ids) for b in resumed for i in b))
        for chunk, (arrays, tables) in workers.active().compute(model, job, todo):   # in chunk order
            writer.submit(chunk, arrays, tables)
            if progress:
                progress(len(batches[chunk]), sum(len(items[i].chat.input_ids) for i in batches[chunk]))
        layers = _layers_table(plan.run_id, model, saes, settings)
        writer.commit({"layers": layers})
    except BaseException:
        writer.abort()
        raise
    return RunResult(plan.run_id, False, plan.n_items, plan.n_rows)


def prefix_layer(model: LoadedModel, saes: Sequence[SaeRef], settings: ExtractSettings,
                 items: Sequence[Item]) -> int | None:
    """The block this run's forwards can start at (extract/prefix.py), None when they run in full."""
    if not settings.reuse_prefix or not settings.logits or settings.generate or settings.loss:
        return None
    layer = start_layer([it.intervention for it in items], model.n_layers)
    stored = set(settings.layers) | ({s.layer for s in saes} if settings.sae_rows else set())
    return layer if layer is not None and all(l >= layer for l in stored) else None


def prefix_source(store: Store, model: LoadedModel, items: Sequence[Item], layer: int) -> PrefixSource:
    """The clean residual after block layer - 1 of the items' prompts: an ordinary run, computed once."""
    uniq = {(it.prompt.prompt_id, it.raw): it for it in items}
    clean = [Item(it.prompt, Intervention(), it.chat, it.raw) for it in uniq.values()]
    settings = ExtractSettings(layers=(layer - 1,), positions="all", logits=False, sae_rows=False,
                               batch_size=32)
    run = extract(store, model, clean, (), settings)
    rows = store.sql("SELECT item, row_start, n_rows FROM items WHERE run_id = ? ORDER BY item", [run.run_id])
    every = store.read_rows(run.run_id, f"resid/{layer - 1}", np.arange(run.n_rows))
    residuals = {clean[i].prompt.prompt_id: every[start:start + n]
                 for i, start, n in rows.select("item", "row_start", "n_rows").iter_rows()}
    return PrefixSource(run.run_id, layer, residuals)


def _prefix_for(store: Store, model: LoadedModel, saes: Sequence[SaeRef], settings: ExtractSettings,
                items: Sequence[Item]) -> PrefixSource | None:
    layer = prefix_layer(model, saes, settings, items)
    if layer is None or len({it.raw for it in items}) > 1:   # one rendering per prompt id in the prefix run
        return None
    return prefix_source(store, model, items, layer)


def _validate(model: LoadedModel, saes: Sequence[SaeRef], settings: ExtractSettings,
              items: Sequence[Item]) -> None:
    for layer in settings.layers:
        if not 0 <= layer < model.n_layers:
            raise UsageError(f"layer {layer} is out of range: {model.name} has layers 0..{model.n_layers - 1}")
    d_sae = {}
    for ref in saes:
        if not 0 <= ref.layer < model.n_layers:
            raise UsageError(f"SAE layer {ref.layer} is out of range: {model.name} has layers 0..{model.n_layers - 1}")
        if int(ref.sae.cfg.d_in) != model.d_model:
            raise UsageError(f"the layer-{ref.layer} SAE ({ref.source}) has d_in={ref.sae.cfg.d_in}, "
                             f"but {model.name} has d_model={model.d_model}")
        d_sae[ref.layer] = ref.d_sae
    for spec in {it.intervention.spec_hash(): it.intervention for it in items}.values():
        spec.validate_against(model.n_layers, model.d_model, d_sae)


def _layers_table(run_id: str, model: LoadedModel, saes: Sequence[SaeRef],
                  settings: ExtractSettings) -> pl.DataFrame:
    by_layer = {s.layer: s.sae_id for s in saes}
    layers = sorted(set(settings.layers) | set(by_layer))
    return pl.DataFrame({
        "run_id": [run_id] * len(layers), "layer": layers, "d_model": [model.d_model] * len(layers),
        "resid_array": [f"resid/{l}" if l in settings.layers else None for l in layers],
        "sae_id": [by_layer.get(l) for l in layers],
    }, schema={"run_id": pl.String, "layer": pl.Int16, "d_model": pl.Int32,
               "resid_array": pl.String, "sae_id": pl.String})


@torch.inference_mode()
def _run_batch(model: LoadedModel, saes: Sequence[SaeRef], settings: ExtractSettings,
               items: Sequence[Item], batch: list[int], row_start: np.ndarray, run_id: str,
               resid_np: type, prefix: PrefixSource | None = None
               ) -> tuple[list[tuple[str, int, np.ndarray]], dict[str, pl.DataFrame]]:
    """One batched forward: residuals, SAE activations, P("I") and optional completions.

    With `prefix`, the forward starts at block prefix.layer from the stored clean residual. With
    generation (and `one_prefill`, no loss, nothing captured), P("I") is read from the generation's first
    step, so the prompt is run once."""
    ids, mask, pad = _left_pad([items[i].chat.input_ids for i in batch], model)
    specs = [items[i].intervention for i in batch]
    sae_by_layer = {s.layer: s.sae for s in saes}
    want = sorted(set(settings.layers) | set(sae_by_layer))
    capture = sorted(set(settings.layers) | (set(sae_by_layer) if settings.sae_rows else set()))
    embed = model.model.get_input_embeddings()
    if settings.logits and settings.generate and settings.one_prefill and not settings.loss and not capture:
        acts: dict[int, torch.Tensor] = {}
        ce = None
        completions, logits = _generate(model, ids, mask, specs, sae_by_layer, pad, settings.generate,
                                        first_logits=True)
        probs, p_i = _p_i(model, logits)
    elif prefix is not None:
        h_prev = left_padded(prefix, [items[i].prompt.prompt_id for i in batch], ids.shape[1], model.dtype,
                             model.device)
        with intervened(model.blocks, specs, sae_by_layer, embed, pad_offsets=pad), \
                started_at(model.blocks, prefix.layer, h_prev), captured(model.blocks, capture) as acts:
            logits = model.model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].clone()
        probs, p_i = _p_i(model, logits)
        ce = completions = None
    elif not settings.logits:                                           # residuals only: stop after the last layer
        with intervened(model.blocks, specs, sae_by_layer, embed, pad_offsets=pad), \
                captured(model.blocks, want) as acts:
            run_until(model.model, {"input_ids": ids, "attention_mask": mask}, model.blocks, max(want))
        probs = p_i = None
        ce = completions = None
    else:
        with intervened(model.blocks, specs, sae_by_layer, embed, pad_offsets=pad), \
                captured(model.blocks, want) as acts:
            every = model.model(input_ids=ids, attention_mask=mask, logits_to_keep=0 if settings.loss else 1).logits
        logits = every[:, -1].clone()                                 # [batch, vocab]; frees `every` below
        ce = _ce_losses(every, items, batch, pad) if settings.loss else None
        del every
        probs, p_i = _p_i(model, logits)
        completions = _generate(model, ids, mask, specs, sae_by_layer, pad, settings.generate)

    rows = [(b, row_start[i], _rows_of(len(items[i].chat.input_ids), settings.last_n)) for b, i in enumerate(batch)]
    first_row = int(rows[0][1])
    assert all(int(start) == first_row + k for k, start in
               zip(np.cumsum([0] + [len(p) for _, _, p in rows[:-1]]), (r[1] for r in rows)))
    arrays = [(f"resid/{layer}", first_row, _gather(acts[layer], rows, pad).float().cpu().numpy().astype(resid_np))
              for layer in settings.layers]
    sae_rows = _sae_rows(run_id, acts, sae_by_layer if settings.sae_rows else {}, rows, pad, settings.threshold)
    tables = {
        "items": _items_rows(run_id, items, batch, row_start, rows, p_i, probs, completions, ce),
        "tokens": _token_rows(run_id, items, batch, rows),
        "sae_acts": sae_rows,
    }
    if settings.generate:
        arrays += [("completion_ids", i, completions[1][b:b + 1]) for b, i in enumerate(batch)]
    if settings.save_logits:
        last = logits.float().cpu().numpy().astype(np.float16)                # [batch, vocab]
        arrays += [("logits_last", i, last[b:b + 1]) for b, i in enumerate(batch)]
    return arrays, tables


def _p_i(model: LoadedModel, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token probabilities [batch, vocab] and P("I") [batch] from last-position logits."""
    probs = torch.softmax(logits.float(), dim=-1)
    return probs, probs[:, list(model.i_token_ids)].sum(-1).clamp(1e-12, 1 - 1e-7)


def _gather(h: torch.Tensor, rows, pad: torch.Tensor) -> torch.Tensor:
    """The stored positions of each batch row, concatenated: [n_rows_batch, d_model]."""
    return torch.cat([h[b, int(pad[b]) + torch.from_numpy(pos)] for b, _, pos in rows])


def _left_pad(seqs: list[list[int]], model: LoadedModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    pad_id = model.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else model.eos_token_ids[0]
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, seq in enumerate(seqs):
        ids[b, width - len(seq):] = torch.tensor(seq)
        mask[b, width - len(seq):] = 1
    pad = torch.tensor([width - len(s) for s in seqs])
    return ids.to(model.device), mask.to(model.device), pad


def _generate(model: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, specs: list[Intervention],
              saes: dict[int, Any], pad: torch.Tensor, n_new: int, first_logits: bool = False):
    """Greedy completions under the same interventions (texts, ids [batch, n_new] padded with -1); with
    `first_logits`, also the logits of the first step (the last prompt position) [batch, vocab]."""
    if not n_new:
        return None
    eos = model.eos_token_ids                         # a property that reads the whole vocab: once, not per token
    first: list[torch.Tensor] = []                    # the first forward's logits: the prefill's last position

    def keep_first(module, args, out):                # on the whole model: logits after any final soft-capping
        if not first:
            first.append(out.logits[:, -1].detach().clone())

    head = model.model.register_forward_hook(keep_first) if first_logits else None
    try:
        with intervened(model.blocks, specs, saes, model.model.get_input_embeddings(), pad_offsets=pad):
            out = model.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                                       eos_token_id=list(eos), pad_token_id=eos[0])
    finally:
        if head is not None:
            head.remove()
    completions = _decoded(model, out[:, ids.shape[1]:].cpu(), len(specs), n_new, eos)
    return (completions, first[0]) if first_logits else completions


def _decoded(model: LoadedModel, new: torch.Tensor, n: int, n_new: int, eos: tuple[int, ...]):
    result = np.full((n, n_new), -1, dtype=np.int32)
    texts = []
    for b in range(n):
        toks = new[b].tolist()
        cut = next((k for k, t in enumerate(toks) if t in eos), len(toks))
        result[b, :cut] = toks[:cut]
        texts.append(model.tokenizer.decode(toks[:cut], skip_special_tokens=True))
    return texts, result


def _sae_rows(run_id: str, acts: dict[int, torch.Tensor], saes: dict[int, Any], rows, pad,
              threshold: float) -> pl.DataFrame:
    cols: dict[str, list[np.ndarray]] = {"row": [], "layer": [], "feature": [], "value": []}
    for layer, sae in saes.items():
        h = _gather(acts[layer], rows, pad)                                   # [n_rows_batch, d_model]
        z = encode(sae, h)                                                    # [n_rows_batch, d_sae]
        row_ids = torch.from_numpy(np.concatenate([start + np.arange(len(pos)) for _, start, pos in rows]))
        r, f = torch.nonzero(z > threshold, as_tuple=True)
        cols["row"].append(row_ids[r].numpy().astype(np.int32))
        cols["layer"].append(np.full(len(r), layer, dtype=np.int16))
        cols["feature"].append(f.numpy().astype(np.int32))
        cols["value"].append(z[r, f].numpy().astype(np.float32))
    data = {k: np.concatenate(v) if v else np.zeros(0, dtype=np.int32) for k, v in cols.items()}
    n = len(data["row"])
    return pl.DataFrame({"run_id": [run_id] * n, **data},
                        schema={"run_id": pl.String, "row": pl.Int32, "layer": pl.Int16,
                                "feature": pl.Int32, "value": pl.Float32})


def _ce_losses(logits: torch.Tensor, items, batch, pad: torch.Tensor) -> tuple[list[float | None], list[int]]:
    """Per item: mean next-token cross-entropy (nats) over its user-role tokens, and their count.

    Token p is predicted from position p - 1 (logits column pad + p - 1 with left padding); position 0
    has no prediction. Chat items: the instruction's tokens; raw items: every token but the first.
    """
    means: list[float | None] = []
    counts: list[int] = []
    for b, i in enumerate(batch):
        chat = items[i].chat
        pos = [p for p, role in enumerate(chat.roles) if role == "user" and p > 0]
        counts.append(len(pos))
        if not pos:
            means.append(None)
            continue
        cols = torch.tensor(pos, device=logits.device) + int(pad[b]) - 1
        targets = torch.tensor([chat.input_ids[p] for p in pos], device=logits.device)
        means.append(float(torch.nn.functional.cross_entropy(logits[b, cols].float(), targets)))
    return means, counts


def _items_rows(run_id, items, batch, row_start, rows, p_i, probs, completions, ce=None) -> pl.DataFrame:
    texts = completions[0] if completions else [None] * len(batch)
    ce_loss, n_loss_tokens = ce if ce is not None else ([None] * len(batch), [None] * len(batch))
    if p_i is None:                                   # a run without logits: NULL scores
        p_i_col = refusal_col = top_col = [None] * len(batch)
    else:
        p = p_i.cpu().double()
        p_i_col = p.float().numpy()
        refusal_col = (torch.log(p) - torch.log1p(-p)).float().numpy()
        top_col = probs.argmax(-1).cpu().numpy().astype(np.int32)
    return pl.DataFrame({
        "run_id": [run_id] * len(batch), "item": batch,
        "prompt_id": [items[i].prompt.prompt_id for i in batch],
        "spec_hash": [items[i].intervention.spec_hash() for i in batch],
        "row_start": [int(row_start[i]) for i in batch],
        "n_rows": [len(pos) for _, _, pos in rows],
        "n_tokens": [len(items[i].chat.input_ids) for i in batch],
        "p_i": p_i_col, "refusal_score": refusal_col, "top_token_id": top_col,
        "completion": texts, "ce_loss": ce_loss, "n_loss_tokens": n_loss_tokens,
    }, schema={"run_id": pl.String, "item": pl.Int32, "prompt_id": pl.String, "spec_hash": pl.String,
               "row_start": pl.Int32, "n_rows": pl.Int32, "n_tokens": pl.Int32, "p_i": pl.Float32,
               "refusal_score": pl.Float32, "top_token_id": pl.Int32, "completion": pl.String,
               "ce_loss": pl.Float32, "n_loss_tokens": pl.Int32})


def _token_rows(run_id, items, batch, rows) -> pl.DataFrame:
    out: dict[str, list] = {"row": [], "item": [], "prompt_id": [], "pos": [], "token_id": [],
                            "token_text": [], "role": []}
    for (b, start, pos), i in zip(rows, batch):
        chat = items[i].chat
        out["row"] += list(range(int(start), int(start) + len(pos)))
        out["item"] += [i] * len(pos)
        out["prompt_id"] += [items[i].prompt.prompt_id] * len(pos)
        out["pos"] += pos.tolist()
        out["token_id"] += [chat.input_ids[p] for p in pos]
        out["token_text"] += [chat.token_texts[p] for p in pos]
        out["role"] += [chat.roles[p] for p in pos]
    return pl.DataFrame({"run_id": [run_id] * len(out["row"]), **out},
                        schema={"run_id": pl.String, "row": pl.Int32, "item": pl.Int32,
                                "prompt_id": pl.String, "pos": pl.Int32, "token_id": pl.Int32,
                                "token_text": pl.String, "role": pl.String})
