"""Number formatting shared by the stages' summary lines (missing values print as '-')."""

from __future__ import annotations

from collections.abc import Sequence


def fmt(x: float | None, spec: str = ".2f") -> str:
    """`x` in `spec`, '-' for None."""
    return "-" if x is None else format(x, spec)


def pct(x: float | None) -> str:
    """A share as a whole percentage: 0.625 -> '62%'."""
    return "-" if x is None else f"{100 * x:.0f}%"


def span(layers: Sequence[int]) -> str:
    """'10..15' for a layer list, '-' when empty."""
    return f"{layers[0]}..{layers[-1]}" if len(layers) else "-"


def frame_text(df) -> str:
    """A polars frame as a Markdown-style text table (up to 60 rows)."""
    import polars as pl

    with pl.Config(tbl_rows=60, tbl_cols=14, fmt_str_lengths=70, tbl_hide_dataframe_shape=True,
                   tbl_formatting="ASCII_MARKDOWN", tbl_hide_column_data_types=True):
        return str(df)


def share_text(share: float | None, n: int) -> str:
    """A share of n items with its Wilson 95% interval: '62% [31%, 86%] (5/8)'; '-' when not measured."""
    from analyze.metrics import rate_text

    return "-" if share is None else rate_text(round(share * n), n)
