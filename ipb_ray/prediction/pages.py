"""The figures and the page of ``ipb predict``: class proportions over time per well (with
the fold ensemble's spread), frames with their colonies outlined in their predicted
class's colour, and one self-contained HTML page tying them to the tables."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["overlay", "PALETTE", "timecourse_figure", "write_all"]

#: Class colours (RGB), in class order; the same in every figure.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (128, 128, 0))
_STYLE = ("body{font-family:Helvetica,Arial,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#1b1b1b}"
          "h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #bbb;margin-top:1.8em}"
          "table{border-collapse:collapse;font-size:.88em}td,th{border:1px solid #bbb;padding:.2em .5em}"
          "th{background:#eee}td.n{text-align:right}img{max-width:100%;border:1px solid #ddd}"
          ".muted{color:#666;font-size:.9em}.swatch{display:inline-block;width:.9em;height:.9em;margin-right:.3em}")


def _colour(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def timecourse_figure(course: Mapping[str, Mapping[str, np.ndarray]], names: Sequence[str], path: Path) -> Path:
    """One panel per well (at most 12): each class's expected share of the colonies over time
    (mean class probability), a band of +- the ensemble's spread, and the share of colonies
    predicted as the class (dots)."""
    plt = _plt()
    wells = list(course)[:12]
    cols = min(len(wells), 3)
    rows = math.ceil(len(wells) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False, sharey=True)
    for ax, well in zip(axes.ravel(), wells):
        c = course[well]
        t = c["time"] if not np.all(np.isnan(c["time"])) else np.arange(len(c["time"]), dtype=float)
        for i, name in enumerate(names):
            rgb = tuple(v / 255 for v in _colour(i))
            ax.plot(t, c["expected"][:, i], color=rgb, label=name, lw=1.8)
            ax.fill_between(t, c["expected"][:, i] - c["spread"][:, i], c["expected"][:, i] + c["spread"][:, i],
                            color=rgb, alpha=0.2, lw=0)
            ax.plot(t, c["share"][:, i], "o", color=rgb, ms=3)
        ax.set_title(f"well {well or '(none)'}: {int(c['colonies'].sum())} colonies", fontsize=9)
        ax.set_xlabel("time point")
        ax.set_ylim(0, 1)
    for ax in axes.ravel()[len(wells):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("share of colonies")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    fig.suptitle("Class proportions over time per well (line: mean probability, band: ensemble spread, "
                 "dots: predicted share)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def overlay(frame_path: str, colonies: Sequence[Mapping[str, Any]], names: Sequence[str], path: Path,
            max_side: int = 1200, plane: Any = None) -> Path:
    """The frame with each colony's outline in its predicted class's colour (PNG);
    ``plane``: the plane of a stack file the colonies were found on."""
    import cv2

    from ipb_ray.data.catalog import decode_png
    from ipb_ray.data.segmentation import load_frame, to_uint8

    grey = to_uint8(load_frame(frame_path, plane))
    img = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    thick = max(2, int(round(max(img.shape) / 500)))
    index = {n: i for i, n in enumerate(names)}
    for c in colonies:
        mask = (decode_png(c["mask"]) > 0).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        r, g, b = _colour(index.get(c["predicted"], 0))
        cv2.drawContours(img, contours, -1, (b, g, r), thick, offset=(int(c["x0"]), int(c["y0"])))
    scale = min(1.0, max_side / max(img.shape[:2]))
    if scale < 1.0:
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(path), img)
    return path


def _embed(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f'<td class="n">{"" if math.isnan(v) else format(v, ".4g")}</td>'
        if isinstance(v, (int, np.integer)):
            return f'<td class="n">{v}</td>'
        return f"<td>{html.escape(str(v))}</td>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_all(out: Path, cols: Mapping[str, np.ndarray], table: Any, names: Sequence[str],
              course: Mapping[str, Mapping[str, np.ndarray]], frame_recs: Sequence[Mapping[str, Any]],
              rejects: Sequence[Mapping[str, Any]], predictor: Any, frames: str, overlays: int) -> dict[str, str]:
    """``timecourse.png``, ``overlays/*.png`` (the first ``overlays`` frames) and ``report.html``."""
    files: dict[str, str] = {}
    figure = timecourse_figure(course, names, out / "timecourse.png")
    files["timecourse"] = str(figure)
    (out / "overlays").mkdir(exist_ok=True)
    shown = []
    frame_col = np.asarray(table.column("frame").to_pylist(), object)
    for frame in sorted(set(frame_col))[:max(overlays, 0)]:
        idx = np.flatnonzero(frame_col == frame)
        keep = ["x0", "y0", "mask", "predicted", "path"] + (["plane"] if "plane" in table.column_names else [])
        rows = table.take(idx).select(keep).to_pylist()
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(frame))[-80:]
        plane = json.loads(rows[0]["plane"]) if rows[0].get("plane") else None
        try:
            shown.append((frame, len(idx), overlay(rows[0]["path"], rows, names, out / "overlays" / f"{safe}.png",
                                                   plane=plane)))
        except (OSError, ValueError):  # the frame moved since: the tables still stand
            continue
    files["overlays"] = str(out / "overlays")
    legend = " ".join(f'<span class="swatch" style="background:rgb{_colour(i)}"></span>{html.escape(n)}'
                      for i, n in enumerate(names))
    total = len(cols["predicted"])
    counts = [(n, int(np.sum(cols["predicted"] == n))) for n in names]
    est = predictor.cv_estimate
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>ipb predict</title>",
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Predictions: {html.escape(str(frames))}</h1>",
             f"<p>model <code>{html.escape(predictor.source)}</code> ({predictor.members} fold network(s))"
             + (f"; cross-validated macro TPR {est['macro_tpr']:.3f}" if "macro_tpr" in est else "") + "</p>",
             f"<p>{len(frame_recs)} frames, {total} colonies, {len(rejects)} rejects. {legend}</p>",
             "<h2>Colonies per predicted class</h2>",
             _table(["class", "colonies", "share"], [(n, c, c / max(total, 1)) for n, c in counts]),
             "<h2>Time course per well</h2>", f"<img alt='time course' src='{_embed(figure)}'>",
             "<h2>Per frame</h2>",
             _table(["frame", "well", "time", "colonies", *[f"{n}" for n in names]],
                    [(r["frame"], r["well"], r["time"], r["colonies"], *[r[f"count/{n}"] for n in names])
                     for r in frame_recs[:200]]),
             "<p class='muted'>All frames: per_frame.csv; per well and time point: per_well.csv; every colony: "
             "colonies.parquet.</p>", "<h2>Frames with their colonies</h2>"]
    for frame, n, p in shown:
        parts.append(f"<h3>{html.escape(str(frame))} ({n} colonies)</h3><img alt='overlay' src='{_embed(p)}'>")
    parts.append("<h2>Rejects</h2>")
    parts.append(_table(["frame", "item", "reason"], [(r["frame"], r["item"], r["reason"]) for r in rejects[:200]])
                 if rejects else "<p class='muted'>none</p>")
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts), encoding="utf-8")
    files["report"] = str(out / "report.html")
    return files
