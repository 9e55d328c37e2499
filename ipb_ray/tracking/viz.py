"""Pictures people would rather look at than read (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

__all__ = ["plot_confusion", "save_patch_grid", "save_training_curves"]


def save_patch_grid(batch: dict[str, Any], spec: Any, class_names: Sequence[str], path: str | Path,
                    max_items: int = 8) -> Path:
    """A grid of a patch batch: one row per scale, one column per patch, titled with labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = spec.patch_columns()
    n = min(max_items, len(batch["label"]))
    fig, axes = plt.subplots(len(columns), n, figsize=(1.6 * n, 1.7 * len(columns)), squeeze=False)
    for r, col in enumerate(columns):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(batch[col][c, 0].numpy() if hasattr(batch[col][c, 0], "numpy") else batch[col][c, 0],
                      cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            label = int(batch["label"][c])
            if r == 0:
                ax.set_title(class_names[label] if label >= 0 else "?", fontsize=8)
            if c == 0:
                ax.set_ylabel(col, fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of ``key``; ``key@stage`` keeps the epochs of that stage only."""
    key, _, stage = key.partition("@")
    xs, ys = [], []
    for h in history:
        if stage and h.get("stage") != stage:
            continue
        if key in h and h[key] is not None:
            xs.append(int(h["epoch"]))
            ys.append(float(h[key]))
    return xs, ys


def save_training_curves(history: Sequence[dict[str, Any]], class_names: Sequence[str], path: str | Path,
                         title: str = "") -> Path:
    """A run's per-epoch curves (the paper's Figures 2, 6 and 7): losses, validation balanced
    accuracy, the teacher's estimated class proportions against the unlabelled set's hidden
    class mix, and the sampling weights. Panels without data are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(h["stage"] for h in history if h.get("stage")))
    by_stage = [(f"train_loss@{s}", s) for s in stages]
    panels = [("losses (trained network, by stage)", by_stage + [("teacher_loss", "teacher (MPL steps)")]),
              ("validation balanced accuracy", [(f"val_balanced_accuracy@{s}", s) for s in stages]
               + [("teacher_val_balanced_accuracy", "teacher (MPL steps)")]),
              ("teacher's class proportions (dashed: hidden truth of U)",
               [(f"teacher_proportion/{c}", c) for c in class_names]),
              ("sampling weight per class", [(f"sampling_weight/{c}", c) for c in class_names])]
    used = [(t, [(k, n) for k, n in series if _series(history, k)[0]]) for t, series in panels]
    used = [(t, s) for t, s in used if s]
    fig, axes = plt.subplots(1, max(len(used), 1), figsize=(4.2 * max(len(used), 1), 3.4), squeeze=False)
    for ax, (panel_title, series) in zip(axes[0], used):
        for i, (key, name) in enumerate(series):
            xs, ys = _series(history, key)
            (line,) = ax.plot(xs, ys, marker="o", ms=3, label=name)
            if key.startswith("teacher_proportion/"):
                txs, tys = _series(history, key.replace("teacher_proportion/", "unlabelled_true_share/"))
                ax.plot(txs, tys, ls="--", color=line.get_color(), lw=1)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path,
                    title: str = "") -> Path:
    """Confusion matrix picture: colours are row shares (TPR on the diagonal), cells show
    counts and row percentages. Uses matplotlib's object API (no pyplot state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(matrix, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(class_names)
    side = max(3.2, 0.9 * n + 1.8)
    fig = Figure(figsize=(side + 0.8, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{int(cm[i, j])}\n{100 * share[i, j]:.0f}%", ha="center", va="center",
                    fontsize=8, color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(n), labels=list(class_names), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels=list(class_names), fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
