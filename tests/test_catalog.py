"""Colony catalog: schema, rows, atomic shards, manifest-last completeness."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from ipb_ray.data import catalog
def _row(source="f.tif", bbox=(0, 0, 4, 3), labels=("A",), **kw):
    rng = np.random.default_rng(0)
    h, w = bbox[3] - bbox[1], bbox[2] - bbox[0]
    crop = rng.integers(0, 255, (h, w), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    mask[1:, 1:] = True
    return catalog.colony_row(source=source, bbox=bbox, crop=crop, mask=mask, labels=labels,
                              importer="test", **kw), crop, mask


def test_row_round_trips_crop_and_mask():
    row, crop, mask = _row()
    assert np.array_equal(catalog.decode_png(row["image"]), crop)
    assert np.array_equal(catalog.decode_png(row["mask"]) > 0, mask)
    assert row["area_px"] == int(mask.sum()) and (row["height"], row["width"]) == (3, 4)
    assert row["label"] == "A" and row["labels"] == ["A"] and row["multi_label"] is False


def test_labels_decide_single_multi_or_unlabelled():
    multi, _, _ = _row(labels=("Spread", "Dense", "Dense"))
    assert multi["label"] is None and multi["labels"] == ["Dense", "Spread"] and multi["multi_label"]
    none, _, _ = _row(labels=())
    assert none["label"] is None and none["labels"] == [] and not none["multi_label"]
    flagged, _, _ = _row(labels=(), multi_label=True)
    assert flagged["multi_label"] and flagged["label"] is None


def test_colony_id_is_stable_and_distinct():
    a = catalog.colony_id("f.tif", (1, 2, 3, 4))
    assert a == catalog.colony_id("f.tif", (1, 2, 3, 4))
    assert a != catalog.colony_id("f.tif", (1, 2, 3, 5)) != catalog.colony_id("g.tif", (1, 2, 3, 4))


def test_mismatched_crop_and_bbox_is_refused():
    with pytest.raises(ValueError, match="disagree"):
        catalog.colony_row(source="f.tif", bbox=(0, 0, 5, 5), crop=np.zeros((3, 3), np.uint8),
                           mask=np.zeros((3, 3), bool), importer="test")


def test_build_is_complete_only_after_finish(tmp_path):
    root = tmp_path / "cat"
    todo = catalog.begin_build(root, ["s1", "s2"])
    assert todo == ["s1", "s2"]
    catalog.write_shard(root, "s1", [_row()[0]], [])
    with pytest.raises(catalog.IncompleteCatalogError, match="ipb preprocess"):
        catalog.read_catalog(root)
    with pytest.raises(RuntimeError, match="unfinished"):
        catalog.finish_build(root, ["s1", "s2"], {})
    assert catalog.begin_build(root, ["s1", "s2"]) == ["s2"]  # s1 survives a restart
    catalog.write_shard(root, "s2", [_row(source="g.tif", labels=("B", "A"))[0]],
                        [catalog.reject_row("h.tif", "frame", "no colonies found", "test")])
    manifest = catalog.finish_build(root, ["s1", "s2"], {"importer": "test"})
    assert manifest["colonies"] == 2 and manifest["rejects"] == 1
    assert manifest["counts"] == {"A": 1, "multi_label": 1} and manifest["class_names"] == ["A", "B"]
    assert json.loads((root / "catalog.json").read_text())["fingerprint"] == manifest["fingerprint"]
    table = catalog.read_catalog(root)
    assert table.schema.equals(catalog.SCHEMA) and table.num_rows == 2
    # plain pyarrow reads the parts too, in row groups
    assert pq.ParquetFile(next((root / "parts").glob("*.parquet"))).metadata.num_row_groups >= 1


def test_restart_removes_stale_parts_and_temp_files(tmp_path):
    root = tmp_path / "cat"
    catalog.begin_build(root, ["old"])
    catalog.write_shard(root, "old", [_row()[0]], [])
    catalog.finish_build(root, ["old"], {})
    (root / "parts" / ".new.parquet.123.tmp").write_bytes(b"half")
    with pytest.raises(catalog.CatalogExistsError, match="--overwrite"):  # never without the flag
        catalog.begin_build(root, ["new"])
    assert (root / "parts" / "old.parquet").exists() and (root / "catalog.json").exists()
    todo = catalog.begin_build(root, ["new"], overwrite=True)
    assert todo == ["new"] and not (root / "catalog.json").exists()
    assert not (root / "parts" / "old.parquet").exists()
    assert not list((root / "parts").glob(".*.tmp"))


def test_duplicate_colony_ids_are_refused(tmp_path):
    root = tmp_path / "cat"
    catalog.begin_build(root, ["a", "b"])
    catalog.write_shard(root, "a", [_row()[0]], [])
    catalog.write_shard(root, "b", [_row()[0]], [])
    with pytest.raises(RuntimeError, match="duplicate colony ids"):
        catalog.finish_build(root, ["a", "b"], {})
