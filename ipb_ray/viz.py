"""Pictures people would rather look at than read (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
