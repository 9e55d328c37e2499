"""The tiny annotated frame world several test files build (not a test module).

``make_frames`` writes n 360 px frames with four round colonies each and an annotation
table labelling every colony (one multi-label per frame); ``small_catalog_at`` also builds
its catalog with 2 folds at 30 % labelled. Shared here rather than imported from another
test file.
"""

from __future__ import annotations

import csv

import cv2
import numpy as np

from ipb_ray.config import load_config

CLASSES = ("Debris", "Dense", "Spread")


def _frame(rng, centres, size=360, radius=45):
    img = cv2.GaussianBlur(rng.normal(128, 2, (size, size)).clip(0, 255).astype(np.uint8), (5, 5), 0)
    yy, xx = np.ogrid[:size, :size]
    for cx, cy in centres:
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
        img[disc] = rng.integers(30, 230, int(disc.sum()), dtype=np.uint8)
    return img


def make_frames(root, n_frames=6, seed=0):
    """n frames with four colonies each, every colony labelled (one multi-label per frame)."""
    rng = np.random.default_rng(seed)
    (root / "frames").mkdir(parents=True)
    centres = ((80, 80), (260, 90), (90, 260), (270, 270))
    rows = []
    for f in range(n_frames):
        name = f"frames/f{f:02d}.png"
        cv2.imwrite(str(root / name), _frame(rng, centres))
        for i, (cx, cy) in enumerate(centres):
            label = "Dense;Spread" if i == 3 else CLASSES[(f + i) % 3]
            rows.append([name, cx - 46, cy - 46, cx + 47, cy + 47, label, f])
    with (root / "ann.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["frame", "x0", "y0", "x1", "y1", "labels", "frame_index"])
        w.writerows(rows)
    return root


def small_catalog_at(root, n_frames, seed):
    """make_frames + build_catalog with 2 folds and 30 % labelled; returns the catalog path."""
    from ipb_ray.distributed.preprocess import build_catalog

    make_frames(root, n_frames=n_frames, seed=seed)
    build_catalog(load_config(preset="demo", overrides=[
        f"data.frames={root / 'frames'}", f"data.annotations={root / 'ann.csv'}",
        f"data.catalog={root / 'catalog'}", "split.folds=2", "split.labelled_fraction=0.3"]))
    return str(root / "catalog")




def catalog_rows(classes, n=6, seed=0):
    """``n`` catalog rows (PNG bytes) of elliptical colonies in random crops, labelled in
    turn with ``classes``; the last one unlabelled. Columns as a patch stream reads them."""
    from ipb_ray.data import catalog

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        h, w = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        yy, xx = np.ogrid[:h, :w]
        mask = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 <= 1
        crop = rng.integers(0, 255, (h, w), dtype=np.uint8)
        rows.append(catalog.colony_row(source=f"f{i}", bbox=(0, 0, w, h), crop=crop, mask=mask,
                                       labels=[classes[i % len(classes)]] if i < n - 1 else [], importer="t"))
    return {k: [r[k] for r in rows] for k in ("colony_id", "image", "mask", "label")}
