"""Importers: planning (driver side) and shard running (worker side), without Ray."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from ipb_ray.data import catalog, importers
from ipb_ray.config import DataConfig


def _blob_frame(size=400, centres=((120, 120), (290, 280)), radius=55, seed=0):
    """A smooth background with textured discs: what the entropy segmentation finds."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size), 128, np.uint8)
    img = cv2.GaussianBlur((img + rng.normal(0, 2, img.shape)).clip(0, 255).astype(np.uint8), (5, 5), 0)
    for cx, cy in centres:
        yy, xx = np.ogrid[:size, :size]
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
        img[disc] = rng.integers(40, 220, int(disc.sum()), dtype=np.uint8)
    return img


def _write_csv(path, rows, header=("frame", "x0", "y0", "x1", "y1", "label")):
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture()
def frames_dir(tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    cv2.imwrite(str(d / "a.png"), _blob_frame())
    cv2.imwrite(str(d / "b.png"), _blob_frame(seed=1, centres=((200, 200),)))
    return d


def test_annotation_table_missing_columns_named(tmp_path):
    path = _write_csv(tmp_path / "ann.csv", [["a.png", 1, 2]], header=("frame", "x", "klass"))
    with pytest.raises(ValueError) as err:
        importers.read_annotation_table(path)
    msg = str(err.value)
    assert "ann.csv" in msg and "x0,y0,x1,y1 (or x,y)" in msg and "label" in msg
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        importers.read_annotation_table(tmp_path / "nope.csv")


def test_plan_frames_rejects_missing_frame_unknown_class_and_empty_box(frames_dir, tmp_path):
    ann = _write_csv(tmp_path / "ann.csv", [
        ["frames/a.png", 65, 65, 176, 176, "Dense"],
        ["frames/a.png", 235, 225, 346, 336, "Spread"],
        ["frames/missing.png", 0, 0, 10, 10, "Dense"],
        ["frames/a.png", 0, 0, 10, 10, "Unicorn"],
        ["frames/b.png", 5, 5, 5, 9, "Dense"],
    ])
    plan = importers.plan_frames(str(frames_dir), str(ann), DataConfig(class_names=("Dense", "Spread")))
    assert len(plan.tasks) == 2  # a.png and b.png (b.png listed from the folder)
    reasons = sorted(r["reason"] for r in plan.rejects)
    assert any("frame file not found" in r for r in reasons)
    assert any("unknown class 'Unicorn'" in r for r in reasons)
    assert any("empty box" in r for r in reasons)
    assert all("row" in r["item"] for r in plan.rejects)


def test_shard_keys_change_with_inputs_and_parameters(frames_dir):
    a = importers.plan_frames(str(frames_dir), None, DataConfig())
    b = importers.plan_frames(str(frames_dir), None, DataConfig())
    c = importers.plan_frames(str(frames_dir), None, DataConfig().__class__(
        segmentation=DataConfig().segmentation.__class__(min_object_px=500)))
    assert [t.key for t in a.tasks] == [t.key for t in b.tasks]
    assert set(t.key for t in a.tasks).isdisjoint(t.key for t in c.tasks)


def test_detect_importer(tmp_path, frames_dir):
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "world.json").write_text("{}")
    assert importers.detect_importer(str(tmp_path / "world"), None) == "synth"
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    assert importers.detect_importer(str(voc), None) == "voc"
    tree = tmp_path / "tree"
    (tree / "Dense").mkdir(parents=True)
    assert importers.detect_importer(str(tree), None) == "imagefolder"
    assert importers.detect_importer(str(frames_dir), None) == "frames"
    with pytest.raises(ValueError, match="data.frames"):
        importers.detect_importer(None, None)
    with pytest.raises(ValueError, match="unknown importer"):
        importers.plan(DataConfig(frames=str(frames_dir)), "zip")


def test_imagefolder_plan_labels_multi_and_unlabelled(tmp_path):
    root = tmp_path / "tree"
    for sub in ("Dense", "Spread", "multi_label/Dense+Spread", "unlabeled", "Ghost"):
        (root / sub).mkdir(parents=True)
        cv2.imwrite(str(root / sub / "c1.png"), _blob_frame(size=120, centres=((60, 60),), radius=40))
    plan = importers.plan_imagefolder(str(root), DataConfig(class_names=("Dense", "Spread")))
    items = {it["source"]: it for t in plan.tasks for it in t.items}
    assert items["Dense/c1.png"]["labels"] == ["Dense"]
    assert items["multi_label/Dense+Spread/c1.png"]["labels"] == ["Dense", "Spread"]
    assert items["multi_label/Dense+Spread/c1.png"]["multi_label"] is True
    assert items["unlabeled/c1.png"]["labels"] == []
    assert [r["reason"] for r in plan.rejects] == ["unknown class 'Ghost'; known: Dense, Spread"]
    with pytest.raises(FileNotFoundError, match="class folders"):
        importers.plan_imagefolder(str(_empty(tmp_path)), DataConfig())


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


@pytest.mark.realdata
def test_voc_plan_on_bccd(shared_data):
    plan = importers.plan_voc(str(shared_data / "bccd"), DataConfig())
    singles = [it for t in plan.tasks for it in t.items if not it["multi_label"]]
    multis = [it for t in plan.tasks for it in t.items if it["multi_label"]]
    names = {it["labels"][0] for it in singles}
    assert names == {"RBC", "WBC", "Platelets"}
    assert len(singles) > 4000 and len(multis) > 200
    assert all(len(it["labels"]) >= 2 for it in multis)


# --------------------------------------------------------------------------- shard runner: bad input

def _frame_task(path, annotations=(), source="a.png"):
    item = {"path": str(path), "source": source, "annotations": list(annotations), "frame_index": 3}
    return importers.ShardTask("k", "frames", (item,))


def test_run_frame_joins_boxes_points_and_multi_labels(frames_dir):
    anns = [{"row": "r2", "labels": ["Dense"], "box": [65, 65, 176, 176]},
            {"row": "r3", "labels": ["Spread"], "point": [290, 280]},
            {"row": "r4", "labels": ["Dense"], "point": [300, 290]}]
    rows, rejects = importers.run_shard(_frame_task(frames_dir / "a.png", anns), DataConfig())
    assert rejects == []
    assert len(rows) == 2
    by_x = sorted(rows, key=lambda r: r["x0"])
    assert by_x[0]["label"] == "Dense" and not by_x[0]["multi_label"]
    assert by_x[1]["labels"] == ["Dense", "Spread"] and by_x[1]["multi_label"] and by_x[1]["label"] is None
    assert all(r["frame_index"] == 3 and r["source"] == "a.png" for r in rows)
    mask = catalog.decode_png(by_x[0]["mask"]) > 0
    assert mask.shape == (by_x[0]["height"], by_x[0]["width"]) and 0.6 < mask.mean() < 0.9


def test_run_frame_rejects_outside_and_unmatched_annotations(frames_dir):
    anns = [{"row": "r2", "labels": ["Dense"], "box": [350, 350, 500, 500]},
            {"row": "r3", "labels": ["Dense"], "box": [0, 0, 30, 30]}]
    rows, rejects = importers.run_shard(_frame_task(frames_dir / "a.png", anns), DataConfig())
    assert len(rows) == 2 and all(r["labels"] == [] for r in rows)  # unlabelled colonies are kept
    reasons = {r["item"]: r["reason"] for r in rejects}
    assert "outside the 400x400 frame" in reasons["r2"]
    assert "matches no segmented colony" in reasons["r3"]


def test_run_frame_rejects_truncated_empty_and_colony_free_frames(tmp_path, frames_dir):
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes((frames_dir / "a.png").read_bytes()[:200])
    flat = tmp_path / "flat.png"
    cv2.imwrite(str(flat), np.full((300, 300), 90, np.uint8))
    smooth = tmp_path / "smooth.png"
    cv2.imwrite(str(smooth), np.tile(np.linspace(0, 255, 300).astype(np.uint8), (300, 1)))
    for path, needle in ((truncated, "unreadable frame"), (flat, "empty frame"),
                         (smooth, "no colonies found")):
        rows, rejects = importers.run_shard(_frame_task(path, source=path.name), DataConfig())
        assert rows == [] and len(rejects) == 1, path
        assert needle in rejects[0]["reason"] and rejects[0]["source"] == path.name


def test_crop_mask_keeps_the_colony_not_the_corners():
    crop = _blob_frame(size=160, centres=((80, 80),), radius=60)
    mask = importers.crop_mask(crop, DataConfig().segmentation)
    assert mask[80, 80] and not mask[2, 2] and not mask[157, 157]


def test_imagefolder_shards_give_rows_with_masks(tmp_path):
    root = tmp_path / "tree"
    for sub in ("Dense", "multi_label/Dense+Spread", "unlabeled"):
        (root / sub).mkdir(parents=True)
        cv2.imwrite(str(root / sub / "c1.png"), _blob_frame(size=120, centres=((60, 60),), radius=40))
    (root / "Dense" / "broken.png").write_bytes(b"not a png")
    plan = importers.plan_imagefolder(str(root), DataConfig())
    rows, rejects = [], []
    for task in plan.tasks:
        r, j = importers.run_shard(task, DataConfig())
        rows += r
        rejects += j
    by_source = {r["source"]: r for r in rows}
    assert by_source["Dense/c1.png"]["label"] == "Dense"
    assert by_source["multi_label/Dense+Spread/c1.png"]["multi_label"]
    assert by_source["unlabeled/c1.png"]["labels"] == []
    assert [j["source"] for j in rejects] == ["Dense/broken.png"]
    assert "unreadable image" in rejects[0]["reason"]
    mask = catalog.decode_png(by_source["Dense/c1.png"]["mask"]) > 0
    assert mask[60, 60] and not mask[0, 0]


# --------------------------------------------------------------------------- frame paths and labels

def test_bare_frame_names_resolve_against_data_frames_too(frames_dir, tmp_path):
    (tmp_path / "tables").mkdir()
    ann = _write_csv(tmp_path / "tables" / "ann.csv", [["a.png", 65, 65, 176, 176, "Dense"],
                                                       ["b.png", 150, 150, 250, 250, "Spread"]])
    for frames in (str(frames_dir), str(frames_dir / "*.png")):
        plan = importers.plan_frames(frames, str(ann), DataConfig(class_names=("Dense", "Spread")))
        assert plan.rejects == [], frames
        anns = {t.items[0]["path"]: t.items[0]["annotations"] for t in plan.tasks}
        assert len(anns) == 2  # the listed frames and the table's rows are the same two files
        assert anns[str((frames_dir / "a.png").resolve())][0]["labels"] == ["Dense"]
        assert anns[str((frames_dir / "b.png").resolve())][0]["labels"] == ["Spread"]


def test_table_folder_wins_over_data_frames(frames_dir, tmp_path):
    (tmp_path / "tables").mkdir()
    cv2.imwrite(str(tmp_path / "tables" / "a.png"), _blob_frame(seed=2))
    ann = _write_csv(tmp_path / "tables" / "ann.csv", [["a.png", 65, 65, 176, 176, "Dense"]])
    plan = importers.plan_frames(str(frames_dir), str(ann), DataConfig())
    labelled = [t.items[0]["path"] for t in plan.tasks if t.items[0]["annotations"]]
    assert labelled == [str((tmp_path / "tables" / "a.png").resolve())]


def test_missing_frame_reject_names_both_folders(frames_dir, tmp_path):
    (tmp_path / "tables").mkdir()
    ann = _write_csv(tmp_path / "tables" / "ann.csv", [["ghost.png", 0, 0, 10, 10, "Dense"]])
    plan = importers.plan_frames(str(frames_dir / "*.png"), str(ann), DataConfig())
    (reject,) = plan.rejects
    reason = reject["reason"]
    assert reason.startswith("frame file not found: looked for 'ghost.png' in ")
    assert f"{(tmp_path / 'tables').resolve()} (the table's folder)" in reason
    assert f"{frames_dir.resolve()} (data.frames)" in reason
    assert "point data.frames at the folder" in reason and reject["item"].endswith("row 2")


def test_frames_dir_of_folder_glob_and_file(frames_dir):
    assert importers.frames_dir(str(frames_dir)) == frames_dir
    assert importers.frames_dir(str(frames_dir / "*.png")) == frames_dir
    assert importers.frames_dir(str(frames_dir / "**" / "x*.tif")) == frames_dir
    assert importers.frames_dir(str(frames_dir / "a.png")) == frames_dir
    assert importers.frames_dir(None) is None


def _catalog_without_ray(root, plan, data):
    """What build_catalog writes, shard by shard, minus Ray."""
    keys = [t.key for t in plan.tasks] + ["plan"]
    catalog.begin_build(root, keys)
    catalog.write_shard(root, "plan", [], plan.rejects)
    for task in plan.tasks:
        catalog.write_shard(root, task.key, *importers.run_shard(task, data))
    catalog.finish_build(root, keys, {"importer": plan.importer, "inputs": plan.inputs})


def test_no_folds_message_says_the_annotation_rows_were_rejected(frames_dir, tmp_path):
    from typer.testing import CliRunner

    from ipb_ray.cli import app
    from ipb_ray.config import ExperimentConfig
    from ipb_ray.data.fold_views import why_no_folds

    (tmp_path / "tables").mkdir()
    ann = _write_csv(tmp_path / "tables" / "ann.csv", [["ghost.png", 0, 0, 10, 10, "Dense"],
                                                       ["ghost2.png", 0, 0, 10, 10, "Dense"]])
    data = DataConfig()
    root = tmp_path / "catalog"
    _catalog_without_ray(root, importers.plan_frames(str(frames_dir), str(ann), data), data)
    why = why_no_folds(root, ExperimentConfig())
    assert why.startswith("no colony has a single label (3 colonies: 0 multi-label, 3 unlabelled): "
                          "2 annotation rows were rejected, first reason (")
    assert "frame file not found: looked for 'ghost" in why and f"see {root}/rejects/" in why
    assert "To fix: fix those rows" in why
    result = CliRunner().invoke(app, ["folds", "--catalog", str(root)])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())  # the console wraps long lines
    assert "no folds drawn: no colony has a single label" in flat
    assert "2 annotation rows were rejected" in flat and "too few labelled colonies" not in flat


def test_no_folds_message_without_an_annotation_table(frames_dir, tmp_path):
    from ipb_ray.config import ExperimentConfig
    from ipb_ray.data.fold_views import why_no_folds

    data = DataConfig()
    root = tmp_path / "catalog"
    _catalog_without_ray(root, importers.plan_frames(str(frames_dir), None, data), data)
    why = why_no_folds(root, ExperimentConfig())
    assert "no colony has a single label" in why and "read no annotation rows" in why
    assert "set data.annotations" in why


def test_extra_annotation_columns_are_kept_for_grouping(frames_dir, tmp_path):
    import json

    ann = _write_csv(tmp_path / "ann.csv", [["a.png", 65, 65, 176, 176, "Dense", "B3", "7"]],
                     header=("frame", "x0", "y0", "x1", "y1", "label", "well", "track"))
    (task,) = [t for t in importers.plan_frames(str(frames_dir), str(ann), DataConfig()).tasks
               if t.items[0]["annotations"]]
    assert task.items[0]["annotations"][0]["columns"] == {"well": "B3", "track": "7"}
    # two rows on the left colony; the right one no row names: it gets the frame's own column only
    anns = [{"row": "r2", "labels": ["Dense"], "box": [65, 65, 176, 176], "columns": {"well": "B3", "track": "7"}},
            {"row": "r3", "labels": ["Dense"], "point": [120, 120], "columns": {"well": "B3", "track": "8"}}]
    rows, _ = importers.run_shard(_frame_task(frames_dir / "a.png", anns), DataConfig())
    left, right = sorted(rows, key=lambda r: r["x0"])
    assert json.loads(left["provenance"])[catalog.ANNOTATION_COLUMNS] == {"well": "B3", "track": "7"}
    assert json.loads(right["provenance"])[catalog.ANNOTATION_COLUMNS] == {"well": "B3"}
    plain, _ = importers.run_shard(_frame_task(frames_dir / "a.png", [dict(anns[0], columns={})]), DataConfig())
    assert all(catalog.ANNOTATION_COLUMNS not in json.loads(r["provenance"]) for r in plain)


# --------------------------------------------------------------------------- data.point_box

def test_point_box_crops_fixed_boxes_around_points_with_rejects(frames_dir, tmp_path):
    """Point labels on touching cells: each point becomes a point_box square (no
    segmentation); points outside the frame or too near its edge are rejected by row."""
    table = _write_csv(tmp_path / "points.csv",
                       [("a.png", 120, 120, "Dense"), ("a.png", 290, 280, "Spread"), ("a.png", 290, 280, "Dense"),
                        ("a.png", 10, 200, "Dense"), ("a.png", 450, 30, "Dense"), ("a.png", 200, 200, "")],
                       header=("frame", "x", "y", "label"))
    data = DataConfig(frames=str(frames_dir), annotations=str(table), point_box=64)
    plan = importers.plan_frames(data.frames, data.annotations, data)
    task = next(t for t in plan.tasks if t.items[0]["source"].endswith("a.png"))
    rows, rejects = importers.run_shard(task, data)
    boxes = {(r["x0"], r["y0"], r["x1"], r["y1"]): r for r in rows}
    # two labels on one point: not silently a multi-label cell, both rows rejected (below)
    assert set(boxes) == {(88, 88, 152, 152), (168, 168, 232, 232)}
    assert boxes[(88, 88, 152, 152)]["label"] == "Dense"
    assert boxes[(168, 168, 232, 232)]["labels"] == []  # a point without a label: an unlabelled cell
    for r in rows:
        assert (r["height"], r["width"]) == (64, 64) and r["area_px"] == 64 * 64
        assert catalog.decode_png(r["image"]).shape == (64, 64)
    reasons = {r["item"].rsplit(" ", 1)[-1]: r["reason"] for r in rejects}
    assert set(reasons) == {"5", "6"}, reasons
    planned = {r["item"].rsplit(" ", 1)[-1]: r["reason"] for r in plan.rejects}
    assert set(planned) == {"3", "4"} and "same box as" in planned["3"] and "'A;B'" in planned["4"]
    assert "closer than 32 px (half of data.point_box=64) to the edge of the 400x400 frame" in reasons["5"]
    assert "point [450, 30] lies outside the 400x400 frame" in reasons["6"]
    # the box side is part of the shard key: a catalog built with another side is redone
    other = importers.plan_frames(data.frames, data.annotations, DataConfig(frames=str(frames_dir),
                                                                            annotations=str(table), point_box=32))
    assert {t.key for t in plan.tasks}.isdisjoint({t.key for t in other.tasks})


def test_point_box_frame_without_points_is_rejected_with_advice(frames_dir):
    data = DataConfig(frames=str(frames_dir), point_box=48)
    task = importers.plan_frames(data.frames, None, data).tasks[0]
    rows, rejects = importers.run_shard(task, data)
    assert rows == [] and "only annotated points (or boxes) become crops" in rejects[0]["reason"]


def test_point_box_helper_fits_or_refuses():
    assert importers.point_box(32, 32, 64, 100, 100) == (0, 0, 64, 64)
    assert importers.point_box(31, 50, 64, 100, 100) is None
    assert importers.point_box(68, 68, 64, 100, 100) == (36, 36, 100, 100)
    assert importers.point_box(69, 50, 64, 100, 100) is None


def test_chula_point_table_names_classes_and_drops_the_elliptocyte_batch(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "chula_csv", Path(__file__).resolve().parents[1] / "benchmarks" / "chula_csv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "Label").mkdir()
    (tmp_path / "Label" / "1.txt").write_text("10 20 0\n30 40 7\nbad line here\n")
    (tmp_path / "Label" / "707.txt").write_text("50 60 12\n")
    rows, problems = mod.rows(tmp_path)
    assert rows == [{"frame": "1.jpg", "x": 10, "y": 20, "label": "normal"},
                    {"frame": "1.jpg", "x": 30, "y": 40, "label": "teardrop"}]
    assert len(problems) == 1 and "1.txt line 3" in problems[0]
    kept, _ = mod.rows(tmp_path, keep_elliptocytes=True)
    assert kept[-1] == {"frame": "707.jpg", "x": 50, "y": 60, "label": "elliptocyte"}
