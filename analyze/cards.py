"""Feature cards: what a (layer, feature) fires on, read from `sae_acts` + `tokens` (as Neuronpedia, delphi).

A card holds the feature's top-activating token contexts (a window of the prompt's stored tokens
around the token, which is highlighted, with the activation), its density (the share of stored
rows it fires on), the datasets and categories of the prompts it fires on, and its imported
explanation. Only unablated items count: an ablation run's activations describe the ablation.
A prompt token seen in several runs (the same prompt extracted twice) is one context.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

from analyze.common import Feature
from queries.run import named_query
from store import Store, UsageError
from store.settings import Settings

_FEATURE = re.compile(r"(\d+):(\d+)")

CLEAN_ITEMS = ("SELECT i.run_id, i.item FROM items i JOIN interventions s ON s.spec_hash = i.spec_hash "
               "WHERE s.spec = '{}'")

CONTEXTS_SQL = f"""-- top contexts of one feature ($1 layer, $2 feature): $3 contexts, $4 tokens each side
WITH clean AS ({CLEAN_ITEMS}),
hits AS (
    SELECT a.run_id, a.value, t.item, t.prompt_id, t.pos
    FROM sae_acts a
    JOIN tokens t ON t.run_id = a.run_id AND t.row = a.row
    JOIN clean c ON c.run_id = t.run_id AND c.item = t.item
    WHERE a.layer = $1 AND a.feature = $2
    QUALIFY row_number() OVER (PARTITION BY t.prompt_id, t.pos ORDER BY a.value DESC, a.run_id) = 1
),
best AS (SELECT * FROM hits ORDER BY value DESC, prompt_id, pos LIMIT $3)
SELECT b.run_id, b.prompt_id, b.pos, b.value, p.dataset, p.category, t.pos AS ctx_pos, t.token_text
FROM best b
JOIN prompts p ON p.prompt_id = b.prompt_id
JOIN tokens t ON t.run_id = b.run_id AND t.item = b.item AND t.pos BETWEEN b.pos - $4 AND b.pos + $4
ORDER BY b.value DESC, b.prompt_id, b.pos, t.pos"""

DATASETS_SQL = f"""-- prompts of each dataset (and category) one feature ($1 layer, $2 feature) fires on, of those encoded at its layer
WITH clean AS ({CLEAN_ITEMS}),
encoded AS (
    SELECT DISTINCT t.prompt_id FROM tokens t
    JOIN clean c ON c.run_id = t.run_id AND c.item = t.item
    JOIN layers l ON l.run_id = t.run_id AND l.layer = $1 AND l.sae_id IS NOT NULL
),
fired AS (
    SELECT DISTINCT t.prompt_id FROM sae_acts a
    JOIN tokens t ON t.run_id = a.run_id AND t.row = a.row
    JOIN clean c ON c.run_id = t.run_id AND c.item = t.item
    WHERE a.layer = $1 AND a.feature = $2
)
SELECT p.dataset, p.category, count(f.prompt_id) AS n_active_prompts, count(*) AS n_prompts
FROM encoded e JOIN prompts p USING (prompt_id) LEFT JOIN fired f USING (prompt_id)
GROUP BY p.dataset, p.category
ORDER BY p.dataset, n_active_prompts DESC, p.category"""


def density_sql() -> str:
    """queries/feature_density.sql restricted to one feature ($1 layer, $2 feature)."""
    body = named_query("feature_density").strip().rstrip(";")
    return f"SELECT * FROM (\n{body}\n) WHERE layer = $1 AND feature = $2"


@dataclass(frozen=True)
class CardSettings(Settings):
    n_contexts: int = 10                  # top-activating contexts shown
    window: int = 8                       # stored tokens on each side of the highlighted one

    def __post_init__(self) -> None:
        if self.n_contexts < 1 or self.window < 0:
            raise UsageError(f"n_contexts must be >= 1 and window >= 0; got {self.n_contexts}, {self.window}")



@dataclass(frozen=True)
class Context:
    prompt_id: str
    dataset: str
    category: str | None
    pos: int
    value: float
    left: str                             # decoded text before the token (within the window)
    token: str                            # the highlighted token
    right: str


@dataclass(frozen=True)
class FeatureCard:
    layer: int
    feature: int
    explanation: str | None
    n_active: int                         # stored rows where it fires (unablated items)
    n_rows: int                           # stored rows encoded at its layer (unablated items)
    n_prompts: int                        # prompts it fires on
    max_value: float
    mean_value: float
    contexts: list[Context]
    datasets: pl.DataFrame                # dataset, category, n_active_prompts, n_prompts
    sql: dict[str, str]                   # the query behind each part, with its parameters

    @property
    def density(self) -> float:
        return self.n_active / self.n_rows if self.n_rows else 0.0

    @property
    def name(self) -> str:
        return f"{self.layer}:{self.feature}"


def parse_feature(text: str) -> Feature:
    """(layer, feature) from "LAYER:ID", e.g. "12:345"."""
    match = _FEATURE.fullmatch(text.strip())
    if not match:
        raise UsageError(f"a feature is LAYER:ID with two non-negative integers, e.g. 12:345; got {text!r}")
    return int(match.group(1)), int(match.group(2))


def card(store: Store, layer: int, feature: int, settings: CardSettings = CardSettings()) -> FeatureCard:
    """One feature's card; UsageError when the feature never fires in the store's unablated runs."""
    density = store.sql(density_sql(), [layer, feature])
    if density.is_empty():
        raise _not_found(store, layer, feature)
    d = density.row(0, named=True)
    raw = store.sql(CONTEXTS_SQL, [layer, feature, settings.n_contexts, settings.window])
    datasets = store.sql(DATASETS_SQL, [layer, feature])
    explanation = store.sql("SELECT explanation FROM feature_explanations WHERE layer = ? AND feature = ?",
                            [layer, feature])
    params = f"-- parameters: $1 = {layer}, $2 = {feature}"
    return FeatureCard(
        layer, feature, explanation["explanation"][0] if explanation.height else None,
        int(d["n_active"]), int(d["n_rows"]), int(d["n_prompts"]), float(d["max_value"]), float(d["mean_value"]),
        _contexts(raw), datasets,
        {"density": f"{params}\n{density_sql()}",
         "contexts": f"{params}, $3 = {settings.n_contexts}, $4 = {settings.window}\n{CONTEXTS_SQL}",
         "datasets": f"{params}\n{DATASETS_SQL}"})


def _not_found(store: Store, layer: int, feature: int) -> UsageError:
    """Why a feature has no rows: an id past the store's SAEs at that layer, a layer without SAEs, or silence."""
    widths = store.sql("SELECT DISTINCT d_sae FROM saes WHERE layer = ? ORDER BY d_sae", [layer])["d_sae"].to_list()
    if widths and feature >= widths[-1]:
        return UsageError(f"feature {layer}:{feature}: feature id out of range 0..{widths[-1] - 1} "
                          f"(the store's layer-{layer} SAEs have d_sae {', '.join(map(str, widths))})")
    layers = store.sql("SELECT DISTINCT layer FROM layers WHERE sae_id IS NOT NULL ORDER BY layer")["layer"].to_list()
    if layers and layer not in layers:
        return UsageError(f"feature {layer}:{feature} never fires in the unablated runs of {store.path}: layer {layer} "
                          f"has no SAE activations there (layers with SAE activations: {', '.join(map(str, layers))})")
    where = f"layers with SAE activations: {', '.join(map(str, layers))}" if layers else "no run has SAE activations"
    return UsageError(f"feature {layer}:{feature} never fires in the unablated runs of {store.path} ({where})")


def cards(store: Store, features: list[Feature], settings: CardSettings = CardSettings()) -> list[FeatureCard]:
    """Cards of the features that fire in the store (features that never fire are left out)."""
    out = []
    for layer, feature in features:
        try:
            out.append(card(store, layer, feature, settings))
        except UsageError:
            continue
    return out


def _contexts(raw: pl.DataFrame) -> list[Context]:
    out = []
    for (_, prompt_id, pos), group in raw.group_by(["run_id", "prompt_id", "pos"], maintain_order=True):
        first = group.row(0, named=True)
        toks = dict(zip(group["ctx_pos"].to_list(), group["token_text"].to_list()))
        out.append(Context(prompt_id, first["dataset"], first["category"], int(pos), float(first["value"]),
                           token_text([toks[p] for p in sorted(toks) if p < pos]), token_text([toks[pos]]),
                           token_text([toks[p] for p in sorted(toks) if p > pos])))
    return out


# ---- token strings to text -------------------------------------------------------------------------

def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable stand-ins for the 256 bytes), inverted."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES = _byte_decoder()
_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_text(tokens: list[str]) -> str:
    """Readable text of consecutive tokenizer token strings (byte-level BPE or SentencePiece)."""
    joined = "".join(tokens)
    if all(ch in _BYTES for ch in joined):                  # byte-level BPE: "Ġ" is a space, "Ċ" a newline
        return bytes(_BYTES[ch] for ch in joined).decode("utf-8", errors="replace")
    return _SP_BYTE.sub(lambda m: chr(int(m.group(1), 16)), joined.replace("\u2581", " "))


def format_card(c: FeatureCard) -> str:
    """The card as terminal text."""
    lines = [f"feature {c.name}" + (f"  \u2014 {c.explanation}" if c.explanation else "  (no explanation imported)"),
             f"fires on {c.n_active} of {c.n_rows} stored rows (density {c.density:.4f}) in {c.n_prompts} prompts; "
             f"max {c.max_value:.3g}, mean {c.mean_value:.3g}"]
    by_dataset = (c.datasets.group_by("dataset", maintain_order=True)
                  .agg(pl.col("n_active_prompts").sum(), pl.col("n_prompts").sum()))
    lines.append("prompts: " + ", ".join(f"{d} {a}/{n}" for d, a, n in by_dataset.iter_rows()))
    top = c.datasets.filter(pl.col("category").is_not_null() & (pl.col("n_active_prompts") > 0)) \
        .sort("n_active_prompts", descending=True).head(5)
    if top.height:
        lines.append("categories: " + ", ".join(f"{d}/{cat} {a}" for d, cat, a, _ in top.iter_rows()))
    lines.append("top contexts:")
    for x in c.contexts:
        text = f"{x.left}[[{x.token}]]{x.right}".replace("\n", "\u21b5")
        lines.append(f"  {x.value:8.3f}  {x.dataset:<12} {text}")
    return "\n".join(lines)


def summary_line(c: FeatureCard) -> str:
    """The card's first line: the feature and its explanation."""
    return format_card(c).split("\n")[0]


def detail_lines(c: FeatureCard) -> list[str]:
    """The rest of the card."""
    return format_card(c).split("\n")[1:]
