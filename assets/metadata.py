"""Helpers that turn library statistics into Dagster metadata people want to see in the UI."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping

import numpy as np
import pandas as pd
from dagster import MetadataValue


def table_md(frame: pd.DataFrame, max_rows: int = 40, floatfmt: str = ".3f") -> MetadataValue:
    """A markdown table (first and last rows when long)."""
    if len(frame) > max_rows:
        half = max_rows // 2
        frame = pd.concat([frame.head(half), frame.tail(half)])
    return MetadataValue.md(frame.to_markdown(floatfmt=floatfmt))


def histogram_md(
    series: Mapping[str, np.ndarray], title: str, bins: int = 20, range_: tuple[float, float] = (0, 1)
) -> MetadataValue:
    """A small PNG histogram embedded in markdown, which the Dagster UI renders as a plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 2.6), squeeze=False)
    for ax, (name, values) in zip(axes[0], series.items()):
        values = np.asarray(values, dtype=float)
        ax.hist(values[np.isfinite(values)], bins=bins, range=range_, color="#4a72b0")
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return MetadataValue.md(f"![{title}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})")


def span(days) -> str:
    days = sorted(days)
    return f"{days[0]} .. {days[-1]} ({len(days)} days)" if days else "empty"
