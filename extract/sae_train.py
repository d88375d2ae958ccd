"""Train the project's own SAEs on residuals read from the store (`cli.py sae train`).

The recipe, for models with no published SAEs (the default model):
1. Activations are two ordinary extraction runs without logits (the forward stops after the last
   layer trained), so they are cached and resumable like every run: WikiText-2 windows from the
   corpus's train part as raw text, and the train split of AdvBench, HarmBench and Alpaca in the
   chat template. The held-out text is WikiText-2's eval part, which no SAE sees.
2. Rows trained on: every position except position 0 and except the chat-template tokens that
   are identical in every chat (kept from one prompt only). Massive activations are *excluded*:
   position 0 (role "first") always, and any other row whose residual norm exceeds
   `massive_ratio` x the layer's median norm (the default model's `<|im_start|>` sits at ~100x,
   the system prompt's first token "You" at ~17x). Their reconstruction is measured separately;
   spliced-in evaluation leaves them untouched.
3. Training: sae-lens's `SAETrainer` on a `TopKTrainingSAE` (or `BatchTopKTrainingSAE`,
   `JumpReLUTrainingSAE`), inputs scaled so their mean norm is sqrt(d_in) (folded into the
   weights at the end), b_dec initialised at the mean, cosine learning-rate decay after a short
   warm-up, TopK's auxiliary loss reviving latents dead for a window. Seeded per layer. A TopK
   step gathers the k active latents instead of dense matmuls (`sparse`, extract/sae_sparse.py).
4. Quality on held-out text: fraction of variance unexplained and mean L0 over ordinary rows,
   dead latents (never firing on any training row), relative error on the massive rows, and the
   next-token loss with the SAE's reconstruction spliced in at every ordinary position, beside
   the loss with those positions zeroed.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import torch
from sae_lens import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, JumpReLUTrainingSAE,
                      JumpReLUTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig)
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer
from tqdm.auto import tqdm

from extract.datasets import Prompt, load_prompts, text_windows
from extract.hooks import captured
from extract.models import LoadedModel
from extract.prefix import started_at
from extract.run import ExtractSettings, extract, make_items
from extract.sae_sparse import SparseTopKTrainingSAE
from extract.saes import load_sae
from store.errors import UsageError
from store.settings import Settings
from store.store import Store, code_version

ARCHITECTURES = ("topk", "batchtopk", "jumprelu")
HARMFUL_SETS = ("advbench", "harmbench")
BENIGN_SETS = ("alpaca",)
CHAT_ROWS_PER_PROMPT = 20            # about how many non-template rows a chat prompt gives


@dataclass(frozen=True)
class TrainSettings(Settings):
    layers: tuple[int, ...]
    width: int = 4096
    k: int = 32
    architecture: str = "topk"
    sparse: bool = True              # topk: the step gathers the k active latents (extract/sae_sparse.py), the
                                     # same function and gradients as sae-lens's dense step, sums reordered
    tokens: int = 100_000            # training rows collected per layer (text windows + chat prompts)
    chat_share: float = 0.25         # share of those rows taken from chat prompts
    epochs: float = 2.0              # passes over the training rows
    batch_size: int = 512
    lr: float = 3e-3
    window: int = 128                # tokens per WikiText-2 window
    eval_windows: int = 48           # held-out windows for FVU / L0 / massive rows
    ce_windows: int = 8              # held-out windows for the spliced-in loss
    massive_ratio: float = 10.0      # rows with norm > ratio x median are massive
    data_init: bool = True           # decoder rows start as random centred training rows (fewer dead latents)
    dead_window: int = 8192          # rows a latent may go unfired before the aux loss revives it
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UsageError(f"--architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.width < 1 or self.k < 1:
            raise UsageError(f"--width and --k must be >= 1, got width={self.width}, k={self.k}")
        if self.k > self.width:
            raise UsageError(f"--k ({self.k}) cannot exceed --width ({self.width})")
        if self.tokens < self.batch_size:
            raise UsageError(f"--tokens ({self.tokens}) must be at least one batch ({self.batch_size})")
        if not 0.0 <= self.chat_share <= 1.0 or self.epochs <= 0 or self.lr <= 0:
            raise UsageError("chat share must be in [0, 1], epochs and lr > 0")
        if self.eval_windows < 1 or self.ce_windows < 1:
            raise UsageError("need at least one held-out window for evaluation")
        if not self.layers:
            raise UsageError("no layers to train")

    def settings_hash(self) -> str:
        """What makes an SAE: everything but the layer list (one layer's SAE does not depend on the others)."""
        raw = {k: v for k, v in asdict(self).items() if k != "layers"}
        if raw.pop("sparse") and self.architecture == "topk":
            raw["sparse"] = True     # hashed only when it applies: dense SAEs keep the ids they had before it
        return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:10]


def default_layers(n_layers: int) -> tuple[int, ...]:
    """Layers 2 .. 2/3 of the depth: where the paper's stages read (2..l*; l* is mid-depth)."""
    return tuple(range(min(2, n_layers - 1), max(min(2, n_layers - 1), round(2 * n_layers / 3)) + 1))


@dataclass(frozen=True)
class LayerResult:
    layer: int
    sae_id: str
    source: str
    metrics: dict
    reused: bool


# ---- activations ---------------------------------------------------------------------------

def training_prompts(model: LoadedModel, settings: TrainSettings) -> tuple[list[Prompt], list[Prompt]]:
    """(raw text windows, chat prompts) whose rows make up about `settings.tokens` training rows."""
    chat_rows = int(settings.tokens * settings.chat_share)
    n_chat = chat_rows // CHAT_ROWS_PER_PROMPT
    harmful = [p for name in HARMFUL_SETS for p in load_prompts(name, seed=settings.seed) if p.split == "train"]
    benign = [p for name in BENIGN_SETS for p in load_prompts(name, seed=settings.seed) if p.split == "train"]
    n_harm = min(len(harmful), n_chat // 2)
    chats = harmful[:n_harm] + benign[:n_chat - n_harm]
    n_text = math.ceil((settings.tokens - len(chats) * CHAT_ROWS_PER_PROMPT) / (settings.window - 1))
    texts = text_windows(model.tokenizer, max(n_text, 1), settings.window, settings.seed, part="train")
    return texts, chats


def collect(store: Store, model: LoadedModel, prompts: Sequence[Prompt], layers: Sequence[int], raw: bool,
            label: str, batch_size: int = 16) -> str:
    """One residuals-only extraction run (cached in the store); returns its run id."""
    settings = ExtractSettings(layers=tuple(sorted(layers)), positions="all", logits=False,
                               resid_dtype="float16", batch_size=batch_size)
    items = make_items(model, prompts, raw=raw)
    with tqdm(total=len(items), unit="prompt", desc=f"activations ({label})", dynamic_ncols=True) as bar:
        result = extract(store, model, items, (), settings, lambda n, _tok: bar.update(n))
    return result.run_id


def ordinary_rows(store: Store, run_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows to use, position-0 rows) of a run: not position 0, template tokens of one prompt only."""
    tok = store.sql("SELECT row, prompt_id, role FROM tokens WHERE run_id = ? ORDER BY row", [run_id])
    first = tok.filter(pl.col("role") == "first")["row"].to_numpy()
    template = tok.filter(pl.col("role") == "template")
    one = template["prompt_id"].min() if template.height else ""
    keep = tok.filter((pl.col("role") != "first") & ((pl.col("role") != "template") | (pl.col("prompt_id") == one)))
    return keep["row"].to_numpy(), first


def layer_rows(store: Store, run_id: str, layer: int, rows: np.ndarray) -> torch.Tensor:
    """Residual rows of one layer as float32 [n, d_model]."""
    return torch.from_numpy(store.read_rows(run_id, f"resid/{layer}", rows).astype(np.float32))


@dataclass
class LayerData:
    train: torch.Tensor                  # [n_train, d] ordinary rows
    eval: torch.Tensor                   # [n_eval, d] ordinary held-out rows
    massive: torch.Tensor                # [n_massive, d] held-out position-0 and massive-norm rows
    median_norm: float
    n_excluded: int                      # training rows excluded as massive (beyond position 0)


def layer_data(store: Store, runs: dict[str, str], layer: int, ratio: float) -> LayerData:
    parts = []
    for name in ("text", "chat"):
        rows, _ = ordinary_rows(store, runs[name])
        parts.append(layer_rows(store, runs[name], layer, rows))
    train = torch.cat(parts)
    norms = train.norm(dim=-1)
    median = float(norms.median())
    keep = norms <= ratio * median
    rows, first = ordinary_rows(store, runs["eval"])
    held = layer_rows(store, runs["eval"], layer, rows)
    ok = held.norm(dim=-1) <= ratio * median
    massive = torch.cat([layer_rows(store, runs["eval"], layer, first), held[~ok]])
    return LayerData(train[keep], held[ok], massive, median, int((~keep).sum()))


# ---- training ------------------------------------------------------------------------------

def build_training_sae(settings: TrainSettings, d_in: int, device: str):
    common = dict(d_in=d_in, d_sae=settings.width, dtype="float32", device=device,
                  normalize_activations="expected_average_only_in")
    if settings.architecture == "topk":
        cls = SparseTopKTrainingSAE if settings.sparse else TopKTrainingSAE
        return cls(TopKTrainingSAEConfig(k=settings.k, **common))
    if settings.architecture == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=settings.k, **common))
    return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**common))


def batches(x: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled batches of rows, epoch after epoch, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            yield x[order[i:i + batch_size]]


def train_layer(x: torch.Tensor, settings: TrainSettings, layer: int, device: str = "cpu",
                desc: str | None = None) -> tuple[object, dict]:
    """Train one SAE on rows x [n, d]; returns (the training SAE with its scaling folded in, stats)."""
    torch.manual_seed(settings.seed * 1009 + layer)
    sae = build_training_sae(settings, x.shape[1], device)
    factor = math.sqrt(x.shape[1]) / float(x.norm(dim=-1).mean())
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0) * factor)
        if settings.data_init:                        # latents start on random (centred) training rows
            g = torch.Generator().manual_seed(settings.seed * 1009 + layer)
            rows = x[torch.randint(len(x), (settings.width,), generator=g)] - x.mean(0)
            rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            sae.W_dec.copy_(rows * sae.W_dec.norm(dim=-1, keepdim=True))
            sae.W_enc.copy_(rows.T)
    batch_size = min(settings.batch_size, len(x))
    n_samples = int(len(x) * settings.epochs) // batch_size * batch_size
    steps = max(1, n_samples // batch_size)
    schedule = "cosineannealing" if steps >= 20 else "constant"      # a few steps: no schedule to speak of
    cfg = SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size,
                           lr=settings.lr, lr_end=settings.lr / 10, lr_scheduler_name=schedule,
                           lr_warm_up_steps=steps // 20, lr_decay_steps=0, device=device,
                           dead_feature_window=max(1, settings.dead_window // batch_size), feature_sampling_window=10**9)
    trainer = SAETrainer(cfg, sae, batches(x, batch_size, settings.seed * 1009 + layer))
    trainer.activation_scaler.scaling_factor = factor
    t0 = time.perf_counter()
    losses = []
    with tqdm(total=steps, desc=desc or f"layer {layer}", unit="step", dynamic_ncols=True) as bar:
        for _ in range(steps):
            trainer.maybe_reset_sparsity()
            out = trainer.step(next(trainer.data_provider))
            trainer.n_training_steps += 1
            losses.append(float(out.loss.detach()))
            bar.update(1)
            if trainer.n_training_steps % 10 == 0:
                bar.set_postfix_str(f"loss {losses[-1]:.3g}")
    sae.fold_activation_norm_scaling_factor(factor)
    trainer.activation_scaler.scaling_factor = None
    sae.eval()
    return sae, {"steps": steps, "batch_size": batch_size, "first_loss": losses[0], "last_loss": losses[-1],
                 "train_seconds": time.perf_counter() - t0, "scaling_factor": factor}


# ---- quality -------------------------------------------------------------------------------

@torch.no_grad()
def reconstruct(sae, x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction, L0 per row) of rows x through an SAE (inference or training)."""
    outs, l0 = [], []
    for part in x.split(chunk):
        part = part.to(sae.W_dec.device, sae.W_dec.dtype)
        z = sae.encode(part)
        outs.append(sae.decode(z).float().cpu())
        l0.append((z > 0).sum(-1).cpu())
    if not outs:
        return torch.zeros_like(x), torch.zeros(0)
    return torch.cat(outs), torch.cat(l0).float()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: sum |x - x_hat|^2 / sum |x - mean(x)|^2."""
    total = ((x - x.mean(0)) ** 2).sum()
    return float(((x - x_hat) ** 2).sum() / total) if total > 0 else float("nan")


@torch.no_grad()
def firing_counts(sae, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    for part in x.split(chunk):
        counts += (sae.encode(part.to(sae.W_dec.device)) > 0).sum(0).cpu()
    return counts


@dataclass(frozen=True)
class CleanPass:
    """The clean forward over the CE windows, once for every layer: its mean CE and the residuals it passed."""
    ce: float
    residuals: dict[int, list[torch.Tensor]]          # layer -> per batch of windows [batch, seq, d_model]


@torch.no_grad()
def clean_pass(model: LoadedModel, windows: Sequence[Sequence[int]], layers: Sequence[int],
               batch_size: int = 4) -> CleanPass:
    """Mean next-token CE (nats) of the clean model on the windows, keeping the residuals at `layers`."""
    total, n = 0.0, 0
    residuals: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for i in range(0, len(windows), batch_size):
        ids = torch.tensor(windows[i:i + batch_size], device=model.device)
        with captured(model.blocks, list(layers)) as acts:
            logits = model.model(input_ids=ids, use_cache=False).logits
        for layer in layers:
            residuals[layer].append(acts[layer])
        total += _ce_sum(logits, ids)
        n += ids[:, 1:].numel()
    return CleanPass(total / n, residuals)


@torch.no_grad()
def spliced_losses(model: LoadedModel, sae, layer: int, windows: Sequence[Sequence[int]], massive_norm: float,
                   batch_size: int = 4, modes: Sequence[str] = ("clean", "spliced", "zero"),
                   clean: CleanPass | None = None) -> dict[str, float]:
    """Mean next-token CE (nats) on windows: clean, SAE reconstruction spliced in, zero-ablated.

    Spliced/zeroed at every position of layer `layer` except position 0 and rows whose norm exceeds
    `massive_norm` (the massive activations, which the SAE was not trained on). With `clean` (the clean
    pass over the same windows and batch size, holding this layer), the edited forwards start at block
    layer + 1 from the stored clean residual instead of rerunning blocks 0..layer (extract/prefix.py).
    """
    totals = {mode: 0.0 for mode in modes}
    n = 0
    reuse = clean is not None and layer in clean.residuals and layer + 1 < model.n_layers
    for k, i in enumerate(range(0, len(windows), batch_size)):
        ids = torch.tensor(windows[i:i + batch_size], device=model.device)
        for mode in totals:
            if mode == "clean":
                logits = model.model(input_ids=ids, use_cache=False).logits
            elif reuse:
                h = _splice(sae, mode, massive_norm, clean.residuals[layer][k])
                with started_at(model.blocks, layer + 1, h):
                    logits = model.model(input_ids=ids, use_cache=False).logits
            else:
                handle = model.blocks[layer].register_forward_hook(_splice_hook(sae, mode, massive_norm))
                try:
                    logits = model.model(input_ids=ids, use_cache=False).logits
                finally:
                    handle.remove()
            totals[mode] += _ce_sum(logits, ids)
            del logits
        n += ids[:, 1:].numel()
    return {mode: total / n for mode, total in totals.items()}


def _ce_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                   reduction="sum"))


def _splice(sae, mode: str, massive_norm: float, h: torch.Tensor) -> torch.Tensor:
    """h with the SAE reconstruction (or zeros) in place of every ordinary row (not position 0, not massive)."""
    ordinary = h.norm(dim=-1) <= massive_norm                           # [batch, seq]
    ordinary[:, 0] = False
    if mode == "spliced":
        new = sae.decode(sae.encode(h.to(sae.W_dec.dtype))).to(h.dtype)
    else:
        new = torch.zeros_like(h)
    return torch.where(ordinary[..., None], new, h)


def _splice_hook(sae, mode: str, massive_norm: float):
    def hook(module, args, out):
        h = _splice(sae, mode, massive_norm, out[0] if isinstance(out, tuple) else out)
        return (h, *out[1:]) if isinstance(out, tuple) else h
    return hook


def quality(model: LoadedModel, sae, data: LayerData, layer: int, ce_ids: Sequence[Sequence[int]],
            ratio: float, clean: CleanPass | None = None) -> dict:
    x_hat, l0 = reconstruct(sae, data.eval)
    m_hat, _ = reconstruct(sae, data.massive)
    counts = firing_counts(sae, data.train)
    modes = ("spliced", "zero") if clean is not None else ("clean", "spliced", "zero")
    losses = {"clean": clean.ce if clean is not None else None,
              **spliced_losses(model, sae, layer, ce_ids, ratio * data.median_norm, modes=modes, clean=clean)}
    massive_err = (float(((data.massive - m_hat) ** 2).sum() / (data.massive ** 2).sum())
                   if len(data.massive) else float("nan"))
    d_spliced, d_zero = losses["spliced"] - losses["clean"], losses["zero"] - losses["clean"]
    return {
        "fvu": fvu(data.eval, x_hat), "l0": float(l0.mean()), "dead_frac": float((counts == 0).float().mean()),
        "n_train_rows": len(data.train), "n_eval_rows": len(data.eval), "n_massive_eval_rows": len(data.massive),
        "n_excluded_massive_train_rows": data.n_excluded, "median_norm": data.median_norm,
        "massive_rel_err": massive_err,
        "ce_clean": losses["clean"], "ce_spliced": losses["spliced"], "ce_zero": losses["zero"],
        "ce_increase": d_spliced, "ce_zero_increase": d_zero,
        "ce_ratio": d_spliced / d_zero if d_zero > 0 else float("nan"),
    }


# ---- the command ---------------------------------------------------------------------------

def sae_dir(store: Store, model: str, settings: TrainSettings, layer: int) -> Path:
    """Where a trained SAE lives, relative to the store."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
    return Path("saes") / safe / settings.settings_hash() / f"layer_{layer}"


def existing(store: Store, sae_id: str) -> dict | None:
    df = store.sql("SELECT source, metrics FROM saes WHERE sae_id = ?", [sae_id])
    if not df.height:
        return None
    return {"source": df["source"][0], "metrics": json.loads(df["metrics"][0] or "{}")}


def train_saes(store: Store, model: LoadedModel, settings: TrainSettings,
               log: Callable[[str], None] = print) -> list[LayerResult]:
    """Collect activations (cached runs), train and evaluate one SAE per layer, register each in `saes`.

    A layer whose SAE with the same settings is already registered is reused, so a killed run
    resumes at the layer it was on.
    """
    for layer in settings.layers:
        if not 0 <= layer < model.n_layers:
            raise UsageError(f"layer {layer} is out of range: {model.name} has layers 0..{model.n_layers - 1}")
    todo = [layer for layer in settings.layers
            if existing(store, f"{model.name}/{settings.settings_hash()}/layer_{layer}") is None]
    results: dict[int, LayerResult] = {}
    if todo:
        texts, chats = training_prompts(model, settings)
        evals = text_windows(model.tokenizer, settings.eval_windows, settings.window, settings.seed, part="eval")
        log(f"activations: {len(texts)} WikiText-2 windows + {len(chats)} chat prompts (train), "
            f"{len(evals)} held-out windows; layers {todo[0]}..{todo[-1]}")
        runs = {"text": collect(store, model, texts, todo, raw=True, label="text"),
                "chat": collect(store, model, chats, todo, raw=False, label="chat"),
                "eval": collect(store, model, evals, todo, raw=True, label="held-out")}
        ce_ids = [model.tokenizer(p.text, add_special_tokens=False)["input_ids"][:settings.window]
                  for p in evals[:settings.ce_windows]]
        ce_len = min(len(ids) for ids in ce_ids)
        ce_ids = [ids[:ce_len] for ids in ce_ids]
        clean = clean_pass(model, ce_ids, todo)                                  # once for all layers
        for layer in todo:
            results[layer] = _train_one(store, model, settings, layer, runs, ce_ids, clean)
            m = results[layer].metrics
            log(f"layer {layer}: FVU {m['fvu']:.3f}  L0 {m['l0']:.1f}  dead {m['dead_frac']:.1%}  "
                f"CE +{m['ce_increase']:.3f} (zero-abl. +{m['ce_zero_increase']:.3f})  {m['train_seconds']:.0f} s")
    for layer in settings.layers:
        if layer not in results:
            sae_id = f"{model.name}/{settings.settings_hash()}/layer_{layer}"
            found = existing(store, sae_id)
            results[layer] = LayerResult(layer, sae_id, found["source"], found["metrics"], True)
    return [results[layer] for layer in settings.layers]


def _train_one(store: Store, model: LoadedModel, settings: TrainSettings, layer: int,
               runs: dict[str, str], ce_ids, clean: CleanPass | None = None) -> LayerResult:
    data = layer_data(store, runs, layer, settings.massive_ratio)
    if len(data.train) < 2:
        raise UsageError(f"layer {layer}: only {len(data.train)} training rows; raise --tokens")
    t0 = time.perf_counter()
    sae, stats = train_layer(data.train, settings, layer, device=model.device)
    metrics = {**quality(model, sae, data, layer, ce_ids, settings.massive_ratio, clean), **stats,
               "seconds": time.perf_counter() - t0, "runs": runs}
    rel = sae_dir(store, model.name, settings, layer)
    sae.save_inference_model(store.path / rel)
    load_sae(str(store.path / rel))                     # it must load the way every later command loads it
    sae_id = f"{model.name}/{settings.settings_hash()}/layer_{layer}"
    row = pl.DataFrame({
        "sae_id": [sae_id], "model": [model.name], "layer": [layer], "source": [str(rel)],
        "architecture": [settings.architecture], "d_in": [model.d_model], "d_sae": [settings.width],
        "settings": [json.dumps({**asdict(settings), "layers": None, "code_version": code_version()})],
        "metrics": [json.dumps(metrics)], "created_at": [datetime.now(timezone.utc).replace(tzinfo=None)],
    })
    quality_row = pl.DataFrame([{
        "sae_id": sae_id, "model": model.name, "layer": layer, "architecture": settings.architecture,
        "width": settings.width, "k": settings.k, "seed": settings.seed, "settings_hash": settings.settings_hash(),
        **{key: metrics[key] for key in QUALITY_COLUMNS},
    }])
    with store.transaction() as con:
        con.execute("DELETE FROM saes WHERE sae_id = ?", [sae_id])
        con.execute("DELETE FROM sae_quality WHERE sae_id = ?", [sae_id])
        con.register("new_sae", row)
        con.execute("INSERT INTO saes BY NAME SELECT * REPLACE (CAST(settings AS JSON) AS settings, "
                    "CAST(metrics AS JSON) AS metrics) FROM new_sae")
        con.register("new_quality", quality_row)
        con.execute("INSERT INTO sae_quality BY NAME SELECT *, now() AS created_at FROM new_quality")
    return LayerResult(layer, sae_id, str(rel), metrics, False)


QUALITY_COLUMNS = ("fvu", "l0", "dead_frac", "ce_clean", "ce_spliced", "ce_zero", "ce_increase",
                   "ce_zero_increase", "ce_ratio", "massive_rel_err", "n_train_rows", "n_eval_rows",
                   "n_massive_eval_rows", "n_excluded_massive_train_rows", "median_norm", "steps", "train_seconds")


def quality_table(results: Sequence[LayerResult]) -> pl.DataFrame:
    """One row per layer with the quality metrics, for printing."""
    return pl.DataFrame([{"layer": r.layer, "reused": r.reused,
                          **{key: r.metrics.get(key) for key in ("fvu", "l0", "dead_frac", "ce_increase",
                                                                 "ce_zero_increase", "ce_ratio", "massive_rel_err",
                                                                 "n_train_rows", "train_seconds")}}
                         for r in results])


def summary_line(results: Sequence[LayerResult]) -> str:
    """One line: SAEs trained and reused, at which layers, and their held-out FVU."""
    n_reused = sum(r.reused for r in results)
    fvu = [r.metrics["fvu"] for r in results]
    layers = [r.layer for r in results]
    return (f"{len(results) - n_reused} SAEs trained, {n_reused} reused at layers {layers[0]}..{layers[-1]}; "
            f"held-out FVU {min(fvu):.3f}..{max(fvu):.3f}")


def detail_lines(results: Sequence[LayerResult], settings: TrainSettings) -> list[str]:
    """The quality table: FVU, L0, dead latents and spliced-in CE per layer."""
    lines = [f"{settings.architecture}, width {settings.width}, k {settings.k}, settings {settings.settings_hash()}; "
             "held-out WikiText-2, ordinary positions:",
             f"{'layer':>5} {'FVU':>6} {'L0':>6} {'dead':>6} {'dCE':>7} {'dCE0':>7} {'ratio':>6} {'massive':>8} {'rows':>7}"]
    for r in results:
        m = r.metrics
        lines.append(f"{r.layer:>5} {m['fvu']:>6.3f} {m['l0']:>6.1f} {m['dead_frac']:>6.1%} {m['ce_increase']:>7.3f} "
                     f"{m['ce_zero_increase']:>7.3f} {m['ce_ratio']:>6.3f} {m['massive_rel_err']:>8.3f} "
                     f"{m['n_train_rows']:>7}{'  (reused)' if r.reused else ''}")
    lines.append("dCE: loss increase with the reconstruction spliced in; dCE0: with zero-ablation; massive: "
                 "relative error on position-0 / massive-norm rows (excluded from training)")
    return lines
