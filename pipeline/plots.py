"""Histogram plots written twice: as CSV for ``dvc plots show/diff`` and as a PNG for MLflow and reports.

Every stage that shows a distribution (token lengths per split, chosen vs rejected lengths, reward-model
scores) writes it through :func:`write_histogram`, so the files share one layout: a first column of bin
starts, then one count column per series.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.outputs import write_atomic


def write_histogram(folder: Path, name: str, series: dict[str, list[float]], bins: int, x_field: str,
                    xlabel: str, ylabel: str, title: str, fmt: Callable[[float], str] = lambda x: str(int(x))) -> None:
    """Write ``<folder>/<name>.csv`` (``x_field`` = bin start, then a count per series) and ``<name>.png``
    (overlaid histograms, each labelled with its size and mean), both atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    values = [v for vs in series.values() for v in vs]
    edges = np.histogram_bin_edges(values or [0], bins=bins)
    counts = {label: np.histogram(vs, bins=edges)[0] for label, vs in series.items()}
    lines = [",".join([x_field, *counts])]
    lines += [",".join([fmt(edges[i]), *(str(int(c[i])) for c in counts.values())]) for i in range(len(edges) - 1)]
    write_atomic(folder / f"{name}.csv", "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, vs in series.items():
        mean = f", mean {np.mean(vs):.2f}" if len(vs) else ""
        ax.hist(vs, bins=edges, alpha=0.55, label=f"{label} ({len(vs)}{mean})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = folder / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(folder / f"{name}.png")
