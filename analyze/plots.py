"""PNG plots of the stages' tables, read back from the store (so the report can redraw them)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")                                  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

import polars as pl  # noqa: E402

from store import Store, UsageError  # noqa: E402


def direction_plots(store: Store, direction_id: str, out_dir: Path) -> list[Path]:
    """Cosine(residual, r at l*) per layer, harmful vs harmless (paper Fig. 4/5), and ASR/KL per layer."""
    df = store.sql("SELECT * FROM directions WHERE direction_id = ? ORDER BY layer", [direction_id])
    if df.is_empty():
        raise UsageError(f"no direction {direction_id} in {store.path}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    best = int(df.filter(df["selected"])["layer"][0])
    layers = df["layer"].to_numpy()

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, color in (("harmful", "tab:red"), ("benign", "tab:blue")):
        mean, std = df[f"cos_{name}"].to_numpy(), df[f"cos_{name}_std"].to_numpy()
        ax.plot(layers, mean, color=color, label=name)
        ax.fill_between(layers, mean - std, mean + std, color=color, alpha=0.2)
    ax.axvline(best, color="gray", linestyle=":", label=f"l* = {best}")
    ax.set(xlabel="layer", ylabel="cos(last-token residual, r at l*)", title="Refusal direction by layer")
    ax.legend()
    cosine = out_dir / f"direction_{direction_id}_cosine.png"
    fig.tight_layout()
    fig.savefig(cosine, dpi=120)
    plt.close(fig)

    done = df.filter(df["evaluated"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(done["layer"], done["asr"], marker="o", label="ASR (content judge)")
    if done["asr_phrase"].is_not_null().any():
        ax.plot(done["layer"], done["asr_phrase"], marker="x", linestyle="--", label="ASR (phrase judge)")
    ax.axvline(best, color="gray", linestyle=":")
    ax.set(xlabel="layer of r (ablated at every layer)", ylabel="attack success rate", ylim=(-0.05, 1.05))
    kl = ax.twinx()
    kl.plot(done["layer"], done["kl_harmless"], color="tab:green", alpha=0.6, label="KL on harmless")
    kl.set_ylabel("KL(clean || ablated), first token")
    ax.legend(loc="upper left")
    kl.legend(loc="upper right")
    asr = out_dir / f"direction_{direction_id}_asr.png"
    fig.tight_layout()
    fig.savefig(asr, dpi=120)
    plt.close(fig)
    return [cosine, asr]


def stage3_asr_plot(asr: pl.DataFrame, path: str | Path, title: str = "") -> Path:
    """PNG of ASR per K: FM-ranked and probe-ranked latents ablated with the stage-2 set (dotted: the set alone)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for ranker, style in (("fm", "o-"), ("probe", "s--")):
        part = asr.filter(pl.col("ranker") == ranker).sort("k")
        if part.height:
            ax.plot(part["k"].to_list(), part["asr"].to_list(), style, label=f"{ranker}-ranked top-K + stage 2")
    base = asr.filter(pl.col("ranker") == "stage2")
    if base.height:
        ax.axhline(base["asr"][0], color="grey", linestyle=":", label="stage-2 set alone")
    ax.set(xlabel="K (latents ablated on top of the stage-2 set)", ylabel="attack success rate", ylim=(-0.02, 1.02),
           title=title or "Stage 3: ASR per K")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def stage3_plot(result, path: str | Path) -> Path:
    """The stage-3 sweep's ASR per K for a stage-3 result, in a PNG at `path` (directories made)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return stage3_asr_plot(result.asr, path, title="Stage 3: FM vs probe")
