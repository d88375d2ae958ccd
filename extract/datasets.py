"""Prompt sets (named, or a user's own file) with fixed seeded splits, and general text."""

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from store.errors import UsageError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

SPLITS = ("train", "val", "test")
TEXT_KEYS = ("text", "prompt", "goal", "instruction")  # first one present is the prompt text
USER_SUFFIXES = (".csv", ".jsonl", ".json")
EVAL_EVERY = 5                                         # wikitext: every 5th article is held out


@dataclass(frozen=True)
class Prompt:
    prompt_id: str            # first 16 hex of sha256(f"{dataset}\x00{text}")
    dataset: str
    idx: int                  # 0-based data row (or JSON record) in the source file
    split: str                # "train" | "val" | "test"
    label: int                # 1 harmful (should refuse), 0 benign, -1 unknown
    category: str | None
    text: str


@dataclass(frozen=True)
class Row:
    idx: int
    text: str
    category: str | None = None
    label: int | None = None  # None: the dataset's default label


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    read: Callable[[], list[Row]]
    label: int                # default label of the rows
    description: str


def prompt_id(dataset: str, text: str) -> str:
    """Return the stable id of a prompt: 16 hex digits of sha256 over dataset and text."""
    return hashlib.sha256(f"{dataset}\x00{text}".encode("utf-8")).hexdigest()[:16]


def _read_csv(path: Path) -> pl.DataFrame:
    return pl.read_csv(path, infer_schema=False)       # every column a string; no type guessing


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _csv_rows(path: Path, text: str, category: str | None = None,
              keep: Callable[[dict[str, Any]], bool] = lambda r: True,
              label: Callable[[dict[str, Any]], int | None] = lambda r: None) -> list[Row]:
    records = _read_csv(path).to_dicts()
    return [Row(i, r[text], r[category] if category else None, label(r))
            for i, r in enumerate(records) if keep(r)]


def _coconot(file: str) -> Callable[[], list[Row]]:
    def read() -> list[Row]:
        records = _read_jsonl(DATA_DIR / "coconot" / file)
        return [Row(i, r["prompt"], f"{r['category']}/{r['subcategory']}") for i, r in enumerate(records)]
    return read


def _alpaca() -> list[Row]:
    records = json.loads((DATA_DIR / "refusal_direction" / "alpaca.json").read_text(encoding="utf-8"))
    return [Row(i, r["instruction"], r["category"]) for i, r in enumerate(records)]


def _xstest(safe_only: bool) -> Callable[[], list[Row]]:
    def read() -> list[Row]:
        def is_contrast(r: dict[str, Any]) -> bool:        # the 200 unsafe contrast prompts
            return r["type"].startswith("contrast_")
        return _csv_rows(DATA_DIR / "xstest" / "xstest_prompts.csv", "prompt", "type",
                         keep=lambda r: not (safe_only and is_contrast(r)),
                         label=lambda r: int(is_contrast(r)))
    return read


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("advbench", lambda: _csv_rows(DATA_DIR / "advbench" / "harmful_behaviors.csv", "goal"),
                1, "AdvBench harmful behaviours (goal column), 520"),
    DatasetSpec("alpaca", _alpaca,
                0, "Alpaca instructions without input (refusal_direction/alpaca.json)"),
    DatasetSpec("harmbench", lambda: _csv_rows(
                    DATA_DIR / "harmbench" / "harmbench_behaviors_text_all.csv", "Behavior",
                    "SemanticCategory", keep=lambda r: r["FunctionalCategory"] == "standard"),
                1, "HarmBench standard text behaviours, category = SemanticCategory"),
    DatasetSpec("harmbench-test", lambda: _csv_rows(
                    DATA_DIR / "harmbench" / "harmbench_behaviors_text_test.csv", "Behavior",
                    "SemanticCategory", keep=lambda r: r["FunctionalCategory"] == "standard"),
                1, "HarmBench's own test split, standard text behaviours (for transfer: prompts no stage saw)"),
    DatasetSpec("xstest", _xstest(safe_only=False),
                0, "XSTest v2: 250 safe (label 0) + 200 unsafe contrast_* prompts (label 1), category = type"),
    DatasetSpec("xstest-safe", _xstest(safe_only=True),
                0, "XSTest v2, the 250 safe prompts only"),
    DatasetSpec("coconot", _coconot("coconot_eval.jsonl"),
                1, "CoCoNot noncompliance eval set, category = category/subcategory"),
    DatasetSpec("coconot-contrast", _coconot("coconot_contrast_eval.jsonl"),
                0, "CoCoNot contrast set (should comply), category = category/subcategory"),
    DatasetSpec("jbb-benign", lambda: _csv_rows(
                    DATA_DIR / "jailbreakbench" / "benign-behaviors.csv", "goal", "category"),
                0, "JailbreakBench benign behaviours (goal column)"),
)}


def _parse_label(raw: Any, where: str) -> int:
    if raw is None or raw == "":
        return -1
    try:
        label = int(raw) if not isinstance(raw, float) or raw.is_integer() else None
    except (TypeError, ValueError):
        label = None
    if label not in (-1, 0, 1):
        raise UsageError(f"{where}: label must be 1 (harmful), 0 (benign) or -1 (unknown), got {raw!r}")
    return label


def _user_records(path: Path) -> list[dict[str, Any]]:
    try:
        if path.suffix.lower() == ".csv":
            return _read_csv(path).to_dicts()
        if path.suffix.lower() == ".jsonl":
            return _read_jsonl(path)
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, pl.exceptions.PolarsError, UnicodeDecodeError) as err:
        first_line = str(err).strip().splitlines()[0]       # polars errors run to many lines
        raise UsageError(f"cannot read {path}: {first_line}") from err
    if not isinstance(records, list):
        raise UsageError(f"{path}: expected a JSON list of objects with a 'text' key")
    return records


def _user_rows(path: Path) -> list[Row]:
    expected = (f"expected a .csv/.jsonl/.json file with a column {' / '.join(TEXT_KEYS)} "
                "and optional 'label' (1 harmful, 0 benign) and 'category'")
    if not path.is_file():
        raise UsageError(f"no dataset named or file found at {str(path)!r}; {expected}; "
                         f"or a name: {', '.join(DATASETS)}")
    records = _user_records(path)
    if not records or not all(isinstance(r, dict) for r in records):
        raise UsageError(f"{path} has no records, or records that are not objects; {expected}")
    text_key = next((k for k in TEXT_KEYS if k in records[0]), None)
    if text_key is None:
        raise UsageError(f"{path} has no text column (found {sorted(records[0])}); {expected}")
    rows = []
    for i, r in enumerate(records):
        if not isinstance(r.get(text_key), str) or not r[text_key].strip():
            raise UsageError(f"{path} record {i}: empty or missing {text_key!r}; {expected}")
        category = r.get("category")
        label = _parse_label(r.get("label"), f"{path} record {i}")
        rows.append(Row(i, r[text_key], None if category in (None, "") else str(category), label))
    return rows


def _rows(name_or_path: str) -> tuple[str, int, list[Row]]:
    if name_or_path in DATASETS:
        spec = DATASETS[name_or_path]
        return spec.name, spec.label, spec.read()
    path = Path(name_or_path)
    if path.suffix.lower() not in USER_SUFFIXES:
        raise UsageError(f"unknown dataset {name_or_path!r}; known: {', '.join(DATASETS)}; "
                         f"or give a path to a .csv/.jsonl/.json file")
    return path.stem, -1, _user_rows(path)


def load_prompts(name_or_path: str, limit: int | None = None, seed: int = 0) -> list[Prompt]:
    """Return a dataset's prompts in a seeded permutation, each with its fixed split.

    Position p in the permutation of the whole (deduplicated) set decides the split:
    p % 10 in 0..7 train, 8 val, 9 test. `limit` keeps the first `limit` (at most) of that
    permutation, so a prompt's split never depends on `limit`. Texts are stripped of
    surrounding whitespace; repeated texts keep their first row.
    """
    if limit is not None and limit < 0:
        raise UsageError(f"limit must be >= 0, got {limit}")
    if seed < 0:
        raise UsageError(f"seed must be >= 0, got {seed}")
    dataset, default_label, rows = _rows(name_or_path)
    seen: set[str] = set()
    unique = []
    for row in rows:
        text = row.text.strip()
        if text not in seen:
            seen.add(text)
            unique.append((row, text))
    order = np.random.default_rng(seed).permutation(len(unique))[:limit]
    prompts = []
    for p, i in enumerate(order.tolist()):
        row, text = unique[i]
        label = default_label if row.label is None else row.label
        prompts.append(Prompt(prompt_id(dataset, text), dataset, row.idx, _split(p), label, row.category, text))
    return prompts


def _split(position: int) -> str:
    return {8: "val", 9: "test"}.get(position % 10, "train")


_ARTICLE_TITLE = re.compile(r" = [^=].*[^=] = ")      # " = Title = "; sections are " = = Title = = "


def _wikitext_documents() -> list[str]:
    """Split WikiText-2 raw test into its articles (title line included)."""
    lines = (DATA_DIR / "text" / "wikitext2_raw_test.txt").read_text(encoding="utf-8").splitlines()
    # Two equation fragments in "Constant k filter" (" = 1 rad / s and ... k = ") look like titles;
    # a real title is followed by the article's first sentence, which starts upper-case or with a quote.
    starts = [i for i, line in enumerate(lines)
              if _ARTICLE_TITLE.fullmatch(line) and i + 1 < len(lines)
              and (lines[i + 1].lstrip()[:1].isupper() or lines[i + 1].lstrip()[:1] == '"')]
    cuts = sorted({0, *starts})
    bounds = zip(cuts, [*cuts[1:], len(lines)])
    docs = ["\n".join(lines[a:b]).strip() for a, b in bounds]
    return [d for d in docs if d]


def load_texts(corpus: str = "wikitext2", part: str = "train") -> list[str]:
    """Return a general-text corpus as a list of documents, for cross-entropy and SAE checks.

    wikitext2 is the WikiText-2 raw test split cut into its articles; article k is in "eval"
    when k % 5 == 4 and in "train" otherwise.
    """
    if corpus != "wikitext2":
        raise UsageError(f"unknown corpus {corpus!r}; known: wikitext2")
    if part not in ("train", "eval"):
        raise UsageError(f"part must be 'train' or 'eval', got {part!r}")
    docs = _wikitext_documents()
    held_out = part == "eval"
    return [d for k, d in enumerate(docs) if (k % EVAL_EVERY == EVAL_EVERY - 1) == held_out]


def text_windows(tokenizer, n: int, window: int, seed: int, part: str = "eval") -> list[Prompt]:
    """n windows of `window` tokens from WikiText-2's `part` articles, drawn with the seed, as prompts.

    A window is the article's text between its first and last token (so re-tokenizing it gives
    about `window` tokens); windows do not overlap and never cross an article boundary. Dataset
    "wikitext2-<part>", split "test" for the eval part and "train" for the train part.
    """
    if n < 0 or window < 2:
        raise UsageError(f"need n >= 0 windows of >= 2 tokens, got n={n}, window={window}")
    docs = load_texts("wikitext2", part=part)
    spans = []
    for d, doc in enumerate(docs):
        offsets = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        spans += [(d, offsets[s][0], offsets[s + window - 1][1]) for s in range(0, len(offsets) - window + 1, window)]
    if len(spans) < n:
        raise UsageError(f"WikiText-2's {part} part has {len(spans)} windows of {window} tokens; ask for at most that many")
    dataset, split = f"wikitext2-{part}", ("test" if part == "eval" else "train")
    picked = np.sort(np.random.default_rng(seed).choice(len(spans), size=n, replace=False))
    prompts = []
    for k in picked.tolist():
        d, start, end = spans[k]
        text = docs[d][start:end]
        prompts.append(Prompt(prompt_id(dataset, text), dataset, k, split, -1, None, text))
    return prompts


def refusal_phrases() -> list[str]:
    """Return the refusal phrases of Arditi et al. (match lower-cased, as substrings)."""
    lines = (DATA_DIR / "refusal_phrases.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]
