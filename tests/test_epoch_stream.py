"""Epoch plans (pure) and the crop-cache epoch stream (Ray Data)."""

from __future__ import annotations

import numpy as np
import pytest

from ipb_ray.data import catalog
from ipb_ray.patches.crops import CropViews, cut_plan, decode_rows
from ipb_ray.patches.core import StreamSpec, patch_batch
from ipb_ray.patches import plan as plans
from ipb_ray.patches.plan import stream_plan
from ipb_ray.patches.geometry import PatchGeometry
from worlds import catalog_rows

GEO = PatchGeometry(size=64, scales=(64, 32))
CLASSES = ("A", "B")
INDEX = [f"c{i}" for i in range(10)]


def _rows(n=6, seed=0):
    return catalog_rows(CLASSES, n, seed)


def _views(rows):
    import pyarrow as pa

    decoded = decode_rows(rows)
    return CropViews([pa.table({k: list(v) for k, v in decoded.items()})])


# --------------------------------------------------------------------------- plans (pure)

def test_rows_repeat_each_colony_by_its_count_with_numbered_copies():
    p = plans.epoch_rows(INDEX, {"c3": 2, "c0": 1, "c5": 0, "c7": 3})
    assert p["colony_id"].tolist() == ["c3", "c3", "c0", "c7", "c7", "c7"]
    assert p["copy"].tolist() == [0, 1, 0, 0, 1, 2]
    assert not p["fixed"].any()
    ids = plans.epoch_rows(INDEX, ids=["c1", "c2"], copies=2)
    assert ids["colony_id"].tolist() == ["c1", "c1", "c2", "c2"] and ids["copy"].tolist() == [0, 1, 0, 1]


def test_fixed_windows_travel_with_every_copy_of_their_colony():
    p = plans.epoch_rows(INDEX, {"c1": 2, "c2": 1}, coords={"c1": (5, 7, 1.5)})
    assert p["fixed"].tolist() == [True, True, False]
    assert p["x"].tolist()[:2] == [5, 5] and p["y"].tolist()[:2] == [7, 7]
    assert p["scale"].tolist()[:2] == [1.5, 1.5]


def test_bad_plans_are_refused_with_what_is_wrong():
    with pytest.raises(KeyError, match="not in the crop cache, e.g. \\['zz'\\]"):
        plans.epoch_rows(INDEX, {"zz": 1})
    with pytest.raises(ValueError, match="counts or ids"):
        plans.epoch_rows(INDEX)
    with pytest.raises(ValueError, match=">= 0"):
        plans.epoch_rows(INDEX, {"c1": -1})
    with pytest.raises(ValueError, match="need 12"):
        plans.rank_share(plans.epoch_rows(INDEX, ids=list(INDEX)), 0, 2, 3, steps=2)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        plans.rank_share(plans.epoch_rows(INDEX, ids=list(INDEX)), 2, 2, 1)
    assert len(plans.epoch_rows(INDEX, {"c1": 0})["colony_id"]) == 0
    assert plans.epoch_rows(None, {"anything": 1})["colony_id"].tolist() == ["anything"]  # no check asked


def test_shuffle_is_a_seeded_whole_epoch_permutation():
    p = plans.epoch_rows(INDEX, ids=list(INDEX), copies=3)
    a, b = plans.shuffled(p, 0, 1, 1), plans.shuffled(p, 0, 1, 1)
    assert all(np.array_equal(a[k], b[k]) for k in p)
    assert sorted(zip(a["colony_id"].tolist(), a["copy"].tolist())) == sorted(zip(p["colony_id"].tolist(), p["copy"].tolist()))
    assert a["colony_id"].tolist() != p["colony_id"].tolist()
    assert plans.shuffled(p, 0, 2, 1)["colony_id"].tolist() != a["colony_id"].tolist()  # another epoch, another order
    assert plans.shuffled(p, 0, 1, 2)["colony_id"].tolist() != a["colony_id"].tolist()  # another stream, another order
    # the copies of one colony no longer sit together: the first batch of 6 holds > 2 colonies
    assert len(set(a["colony_id"][:6].tolist())) > 2


def test_ranks_share_the_epoch_without_overlap_in_whole_batches():
    p = plans.shuffled(plans.epoch_rows(INDEX, ids=list(INDEX), copies=3), 0, 0, 1)  # 30 rows
    shares = [plans.rank_share(p, r, 2, 4) for r in range(2)]
    assert [len(s["colony_id"]) for s in shares] == [12, 12]  # 15 per rank, cut to whole batches of 4
    pairs = [set(zip(s["colony_id"].tolist(), s["copy"].tolist())) for s in shares]
    assert not pairs[0] & pairs[1]
    steps = [plans.rank_share(p, r, 3, 2, steps=5) for r in range(3)]
    assert [len(s["colony_id"]) for s in steps] == [10, 10, 10]
    assert np.array_equal(np.concatenate([s["colony_id"] for s in steps]), p["colony_id"])


def test_stream_plan_gives_every_rank_its_steps_of_the_same_epoch():
    counts = {c: 2 for c in INDEX}
    a = stream_plan(INDEX, seed=1, epoch=2, stream="labelled", counts=counts, rank=0, world=2, batch_size=4, steps=2)
    b = stream_plan(INDEX, seed=1, epoch=2, stream="labelled", counts=counts, rank=1, world=2, batch_size=4, steps=2)
    assert len(a["colony_id"]) == len(b["colony_id"]) == 8
    unshuffled = stream_plan(INDEX, seed=1, epoch=2, stream="labelled", counts=counts, shuffle=False)
    assert unshuffled["colony_id"].tolist() == [c for c in INDEX for _ in range(2)]


# --------------------------------------------------------------------------- cutting (pure)

def test_cached_crops_round_trip_the_catalog_pixels():
    rows = _rows()
    views = _views(rows)
    for cid, img_png, mask_png in zip(rows["colony_id"], rows["image"], rows["mask"]):
        image, mask = views.crop(cid)
        assert np.array_equal(image, catalog.decode_png(img_png))
        assert np.array_equal(mask, catalog.decode_png(mask_png) > 0)
    assert views.ids == list(rows["colony_id"]) and views.labels[rows["colony_id"][-1]] is None
    with pytest.raises(KeyError, match="colony nope is not in the crop cache"):
        views.crop("nope")


@pytest.mark.parametrize("mode", ["train", "uda", "test", "plain"])
def test_cut_plan_cuts_the_very_patches_of_the_catalog_path(mode):
    rows = _rows()
    views = _views(rows)
    spec = StreamSpec(GEO, CLASSES, seed=4, mode=mode)
    counts = {c: 2 for c in views.ids}
    p = plans.shuffled(plans.epoch_rows(views.ids, counts), 4, 3, 1)
    got = cut_plan(p, spec, 3, views)
    want = patch_batch(rows, spec, epoch=3, counts=counts)
    key = {(c, k): i for i, (c, k) in enumerate(zip(want["colony_id"], want["copy"].tolist()))}
    order = [key[(c, k)] for c, k in zip(got["colony_id"], got["copy"].tolist())]
    assert len(order) == len(key) == 12
    for col in spec.columns():
        if col != "colony_id":
            assert np.array_equal(got[col], want[col][order]), col
    assert got["label"].tolist()[:0] == [] and set(got["label"].tolist()) <= {-1, 0, 1}


def test_cut_plan_uses_the_fixed_window():
    rows = _rows()
    views = _views(rows)
    spec = StreamSpec(GEO, CLASSES, seed=0, mode="uda")
    cid = views.ids[0]
    got = cut_plan(plans.epoch_rows([cid], {cid: 2}, coords={cid: (3, 4, 1.0)}), spec, 0, views)
    assert got["x"].tolist() == [3, 3] and got["y"].tolist() == [4, 4] and got["met"].all()
    assert not np.array_equal(got["strong64"][0], got["strong64"][1])  # same window, fresh augmentation


def test_a_corrupt_crop_names_its_colony():
    rows = _rows(2)
    rows["image"][1] = b"not a png"
    with pytest.raises(ValueError, match=f"colony {rows['colony_id'][1]}"):
        decode_rows(rows)


# --------------------------------------------------------------------------- Ray

@pytest.mark.ray
def test_epoch_stream_streams_the_plan_in_order_as_torch_batches(tiny_catalog):
    from ipb_ray.distributed.epoch_stream import crop_cache, plan_batches, plan_dataset

    names = tuple(catalog.read_manifest(tiny_catalog)["class_names"])
    spec = StreamSpec(GEO, names, seed=3, mode="train")
    cache = crop_cache(tiny_catalog)
    assert crop_cache(tiny_catalog) is cache  # one cache per catalog and process
    assert len(cache) == 32 and cache.nbytes > 0
    ids = sorted(cache.ids)
    plan = stream_plan(cache.ids, seed=3, epoch=4, stream="labelled", ids=ids, copies=2)
    batches = list(plan_batches(cache, spec, plan, epoch=4, batch_size=8, workers=2, cpus=0.5))
    assert [len(b["label"]) for b in batches] == [8] * 8
    assert [c for b in batches for c in b["colony_id"]] == plan["colony_id"].tolist()
    rows = list(plan_dataset(cache, spec, plan, epoch=4, batch_size=8).iter_batches(batch_size=8))
    streamed = [(c, int(k)) for b in rows for c, k in zip(b["colony_id"], b["copy"].tolist())]
    assert streamed == list(zip(plan["colony_id"].tolist(), plan["copy"].tolist()))
    table = catalog.read_catalog(tiny_catalog, columns=["colony_id", "image", "mask", "label"])
    want = patch_batch(table.to_pydict(), spec, epoch=4, counts={c: 2 for c in ids})
    key = {(c, k): i for i, (c, k) in enumerate(zip(want["colony_id"], want["copy"].tolist()))}
    got = np.concatenate([b["x64"].numpy() for b in batches])
    assert np.array_equal(got, want["x64"][[key[p] for p in streamed]])
    # a partial last batch is kept when asked, and dropped by default
    short = {k: v[:20] for k, v in plan.items()}
    assert [len(b["label"]) for b in plan_batches(cache, spec, short, epoch=4, batch_size=8, drop_last=False)] \
        == [8, 8, 4]
    assert [len(b["label"]) for b in plan_batches(cache, spec, short, epoch=4, batch_size=8)] == [8, 8]


def test_gpu_feed_benchmark_says_what_it_would_measure_without_a_gpu(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run benchmarks/gpu_feed.py itself")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_feed.py"
    out = subprocess.run([sys.executable, str(script), "--catalog", str(tmp_path), "--cpus", "1", "3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "No CUDA GPU here: skipping" in out.stdout
    for figure in ("samples/s", "GPU busy", "data-wait", "[1, 3] data CPUs", "hrnet at 224 + 112 px (bf16)"):
        assert figure in out.stdout, figure


@pytest.mark.ray
def test_a_stream_starts_when_less_than_a_cpu_is_free(tiny_catalog):
    """Inside a Tune trial the Train worker holds a CPU and a trial a sliver: an epoch's
    stream must not need a whole CPU for anything (Ray's from_arrow asks one per table)."""
    import threading

    import ray

    from ipb_ray.distributed.epoch_stream import crop_cache, plan_batches

    names = tuple(catalog.read_manifest(tiny_catalog)["class_names"])
    spec = StreamSpec(GEO, names, seed=1, mode="train")
    cache = crop_cache(tiny_catalog)
    plan = stream_plan(cache.ids, seed=1, epoch=0, stream="labelled", ids=sorted(cache.ids))
    free = ray.available_resources().get("CPU", 0.0)
    hog = ray.remote(num_cpus=free - 0.5)(type("Hog", (), {"ping": lambda self: 1})).remote()
    ray.get(hog.ping.remote())
    got: list[int] = []
    try:
        reader = threading.Thread(target=lambda: got.extend(
            len(b["label"]) for b in plan_batches(cache, spec, plan, epoch=0, batch_size=8, cpus=0.25)), daemon=True)
        reader.start()
        reader.join(120)
        assert not reader.is_alive(), "the stream waited for a CPU that never came"
        assert got == [8, 8, 8, 8]
    finally:
        ray.kill(hog)


def test_the_cache_refuses_unfinished_and_empty_catalogs_with_the_path(tmp_path):
    from ipb_ray.distributed.epoch_stream import build_crop_cache
    from ipb_ray.distributed.rebalance import labelling_dataset

    with pytest.raises(catalog.IncompleteCatalogError, match="not a finished colony catalog"):
        build_crop_cache(str(tmp_path))
    (tmp_path / "parts").mkdir()
    (tmp_path / catalog.MANIFEST).write_text("{}")
    with pytest.raises(ValueError, match=f"the catalog at {tmp_path} has no colonies"):
        build_crop_cache(str(tmp_path))
    with pytest.raises(ValueError, match="needs the ids to label"):
        labelling_dataset(str(tmp_path), StreamSpec(GEO, CLASSES, mode="label"), "s", {}, cache=object())
