"""Figures logged with a run: metric curves and a 2-D projection of test embeddings.

Pure functions returning matplotlib figures built with the object-oriented API (no pyplot:
no display needed on servers, no global backend switched in the user's process); the
Tracker uploads them as PNG artifacts under ``plots/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure


def pca_2d(embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
    """Project (N, D) embeddings on their two leading principal components -> (N, 2).

    Exact SVD of the centred matrix in float64 (N is a test set, D a few thousand at most),
    so the projection is deterministic up to the sign of each axis.
    """
    z = torch.as_tensor(embeddings).detach().to("cpu", torch.float64)
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) embeddings, got shape {tuple(z.shape)}")
    z = z - z.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(z, full_matrices=False)
    comps = vh[:2].T
    if comps.shape[1] < 2:  # D == 1: pad a zero axis
        comps = torch.cat([comps, torch.zeros_like(comps)], dim=1)
    return (z @ comps).numpy()


def plot_curves(series: Mapping[str, tuple[Sequence[int], Sequence[float]]], *,
                title: str, ylabel: str) -> Figure:
    """One line per metric: ``{name: (steps, values)}`` against the step."""
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    for name, (steps, values) in series.items():
        ax.plot(list(steps), list(values), marker="o" if len(steps) < 30 else None,
                markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def is_curve(steps: Sequence[int]) -> bool:
    """Whether a metric history makes a curve: a single point (kNN evaluated only at the end)
    is a number, not a plot; it is in the run's metrics."""
    return len(set(steps)) >= 2


def plot_projection(points: np.ndarray, labels: Sequence[int] | np.ndarray | torch.Tensor, *,
                    title: str, class_names: Sequence[str] | None = None) -> Figure:
    """Scatter (N, 2) points coloured by integer label (-1: unlabelled, grey); the legend
    names each label by `class_names` (the manifest's classes) when given."""
    labels = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
    if len(labels) != len(points):
        raise ValueError(f"{len(points)} points but {len(labels)} labels")
    fig = Figure(figsize=(6, 5), dpi=100)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10" if labels.max(initial=0) < 10 else "tab20"]
    for lab in np.unique(labels):
        sel = labels == lab
        color = "0.6" if lab < 0 else cmap(int(lab) % cmap.N)
        name = (str(class_names[int(lab)]) if class_names is not None
                and 0 <= int(lab) < len(class_names) else str(lab))
        ax.scatter(points[sel, 0], points[sel, 1], s=6, alpha=0.7, color=color, label=name)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    if len(np.unique(labels)) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best",
                  title="class" if class_names is not None else "label")
    fig.tight_layout()
    return fig
