"""Pictures of training and of graphs: PNG curves and filters (matplotlib), SVG graphs (Graphviz).

matplotlib is an optional dependency (the `demo` extra); functions raise ImportError naming
the extra when it is missing. Graphviz's `dot` is optional too: without it the DOT text is
written instead, with a hint on how to render it.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError('plots need matplotlib: pip install "graphc[demo]"') from None
    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt
    return plt


def plot_training_curves(history, path) -> Path:
    """Mean training loss and train/test error per epoch (the generalization gap between them)."""
    plt = _pyplot()
    epochs = [r.epoch for r in history]
    fig, (ax_loss, ax_error) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r.loss for r in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="mean training loss", title="Training loss")
    ax_error.plot(epochs, [100 * r.train_error for r in history], marker="o", label="train error")
    ax_error.plot(epochs, [100 * r.test_error for r in history], marker="o", label="test error")
    ax_error.set(xlabel="epoch", ylabel="error (%)", title="Train vs test error")
    ax_error.legend()
    return _save(fig, plt, path)


def plot_learning_curve(sizes, train_errors, test_errors, path, title="Learning curve") -> Path:
    """Error against training-set size: more data narrows the generalization gap."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [100 * e for e in train_errors], marker="o", label="train error")
    ax.plot(sizes, [100 * e for e in test_errors], marker="o", label="test error")
    ax.set(xlabel="training examples", ylabel="error (%)", title=title, xscale="log")
    ax.legend()
    return _save(fig, plt, path)


def plot_filters(weights: np.ndarray, path, title="First-layer filters") -> Path:
    """Each output channel's filter (first input channel) as a small grey image."""
    plt = _pyplot()
    filters = np.asarray(weights)[:, 0]
    count = len(filters)
    columns = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, kernel in zip(axes.ravel(), filters):
        ax.imshow(kernel, cmap="gray", interpolation="nearest")
    fig.suptitle(title)
    return _save(fig, plt, path)


def render_dot(dot_text: str, path_without_suffix) -> tuple[Path, str | None]:
    """Render DOT to SVG with Graphviz's `dot`; without it, write the .dot file and return a hint."""
    stem = Path(path_without_suffix)
    stem.parent.mkdir(parents=True, exist_ok=True)
    dot_path = stem.with_suffix(".dot")
    dot_path.write_text(dot_text)
    if shutil.which("dot") is None:
        return dot_path, (f"Graphviz's `dot` is not installed: wrote {dot_path}; render it with "
                          f"`dot -Tsvg {dot_path} -o {stem.with_suffix('.svg')}` (apt install graphviz)")
    svg_path = stem.with_suffix(".svg")
    subprocess.run(["dot", "-Tsvg", str(dot_path), "-o", str(svg_path)], check=True, timeout=120)
    return svg_path, None


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
