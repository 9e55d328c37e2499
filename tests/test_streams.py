"""Patch streams: the pure batch function, and its Ray Data / Ray Train wiring."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ipb_ray.data import catalog
from ipb_ray.patches.geometry import PatchGeometry
from worlds import catalog_rows
from ipb_ray.patches.core import StreamSpec, patch_batch

GEO = PatchGeometry(size=64, scales=(64, 32))
CLASSES = ("A", "B")


def _rows(n=6, seed=0):
    return catalog_rows(CLASSES, n, seed)


def _coords(out):
    return list(zip(out["colony_id"], out["copy"].tolist(), out["x"].tolist(), out["y"].tolist()))


def test_batch_shapes_labels_and_range():
    out = patch_batch(_rows(), StreamSpec(GEO, CLASSES, seed=0, mode="train"), epoch=0)
    assert out["x64"].shape == (6, 1, 64, 64) and out["x32"].shape == (6, 1, 32, 32)
    assert out["x64"].dtype == np.float32 and 0 <= out["x64"].min() and out["x64"].max() <= 1
    rows = _rows()
    label_of = dict(zip(rows["colony_id"], [0, 1, 0, 1, 0, -1]))
    assert out["label"].tolist() == [label_of[c] for c in out["colony_id"]]  # rows come shuffled
    assert sorted(out["colony_id"]) == sorted(rows["colony_id"])
    assert np.array_equal(out["x32"], out["x64"][:, :, 16:48, 16:48])  # the exact centre


def test_draw_is_reproducible_per_epoch_and_fresh_across_epochs():
    rows = _rows()
    spec = StreamSpec(GEO, CLASSES, seed=7, mode="train")
    a, b = patch_batch(rows, spec, epoch=2), patch_batch(rows, spec, epoch=2)
    assert _coords(a) == _coords(b) and np.array_equal(a["x64"], b["x64"])
    c = patch_batch(rows, spec, epoch=3)
    assert _coords(a) != _coords(c)
    other_seed = patch_batch(rows, StreamSpec(GEO, CLASSES, seed=8, mode="train"), epoch=2)
    assert _coords(a) != _coords(other_seed)


def test_draw_does_not_depend_on_batching():
    rows = _rows()
    spec = StreamSpec(GEO, CLASSES, seed=1, mode="train")
    whole = patch_batch(rows, spec, epoch=0)
    halves = [patch_batch({k: v[s] for k, v in rows.items()}, spec, epoch=0)
              for s in (slice(0, 3), slice(3, 6))]
    assert sorted(_coords(whole)) == sorted(_coords(halves[0]) + _coords(halves[1]))


def test_counts_repeat_and_drop_colonies():
    rows = _rows()
    ids = rows["colony_id"]
    out = patch_batch(rows, StreamSpec(GEO, CLASSES, mode="plain"), counts={ids[0]: 3, ids[2]: 1})
    assert sorted(zip(out["colony_id"], out["copy"].tolist())) == sorted([(ids[0], 0), (ids[0], 1), (ids[0], 2),
                                                                          (ids[2], 0)])
    assert len({c for c in _coords(out) if c[0] == ids[0]}) == 3  # independent draws


def test_training_rows_are_shuffled_reproducibly_per_epoch():
    rows = _rows()
    ids = rows["colony_id"]
    spec = StreamSpec(GEO, CLASSES, seed=3, mode="train")
    counts = {cid: 8 for cid in ids}  # 48 patches, each colony's copies drawn one after another
    a, b = patch_batch(rows, spec, epoch=1, counts=counts), patch_batch(rows, spec, epoch=1, counts=counts)
    assert list(a["colony_id"]) == list(b["colony_id"]) and np.array_equal(a["x64"], b["x64"])
    c = patch_batch(rows, spec, epoch=2, counts=counts)
    assert list(a["colony_id"]) != list(c["colony_id"])
    # a colony's copies are spread: runs of one colony are short, not blocks of 8
    longest, run = 1, 1
    for prev, cur in zip(a["colony_id"][:-1], a["colony_id"][1:]):
        run = run + 1 if prev == cur else 1
        longest = max(longest, run)
    assert longest <= 3
    # every 8-row batch mixes at least 4 colonies
    assert min(len(set(a["colony_id"][i:i + 8])) for i in range(0, 48, 8)) >= 4
    # evaluation streams keep the catalog order
    t = patch_batch(rows, StreamSpec(GEO, CLASSES, mode="test"), epoch=1)
    assert list(t["colony_id"]) == list(ids)


def test_test_mode_is_deterministic_with_tta_views():
    rows = _rows()
    spec = StreamSpec(GEO, CLASSES, seed=0, mode="test", tta=3)
    a = patch_batch(rows, spec, epoch=0)
    b = patch_batch(rows, StreamSpec(GEO, CLASSES, seed=0, mode="test", tta=3), epoch=9)
    assert len(a["label"]) == 18
    first = a["copy"] == 0
    assert _coords({k: v[first] for k, v in a.items()}) == _coords({k: v[first] for k, v in b.items()})


def test_uda_mode_gives_weak_and_strong_views():
    out = patch_batch(_rows(), StreamSpec(GEO, CLASSES, mode="uda"), epoch=0)
    assert {"weak64", "weak32", "strong64", "strong32"} <= set(out)
    assert not np.array_equal(out["weak64"], out["strong64"])


def test_empty_result_is_well_typed():
    out = patch_batch(_rows(), StreamSpec(GEO, CLASSES, mode="plain"), counts={})
    assert out["x64"].shape == (0, 1, 64, 64) and out["label"].dtype == np.int64


def test_bad_mode_message():
    with pytest.raises(ValueError, match="not one of train, plain, uda, test"):
        StreamSpec(GEO, CLASSES, mode="eval")


# --------------------------------------------------------------------------- Ray

@pytest.mark.ray
def test_ray_stream_equals_the_pure_function(tiny_catalog):
    from ipb_ray.distributed.streams import patch_dataset, torch_batches

    names = tuple(catalog.read_manifest(tiny_catalog)["class_names"])
    spec = StreamSpec(GEO, names, seed=3, mode="train")
    got = {}
    for b in torch_batches(patch_dataset(tiny_catalog, spec, epoch=4), spec, batch_size=4, drop_last=False):
        for i, cid in enumerate(b["colony_id"]):
            got[cid] = b["x64"][i].numpy()
    table = catalog.read_catalog(tiny_catalog, columns=["colony_id", "image", "mask", "label"])
    want = patch_batch(table.to_pydict(), spec, epoch=4)
    assert len(got) == len(want["colony_id"]) == 32  # 8 frames x 4 colonies, each streamed once
    for i, cid in enumerate(want["colony_id"]):
        assert np.array_equal(got[cid], want["x64"][i])


@pytest.mark.ray
def test_two_ddp_workers_get_equal_batches_and_fresh_epochs(tiny_catalog, tmp_path):
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ipb_ray.distributed.streams import patch_dataset, stream_state

    names = tuple(catalog.read_manifest(tiny_catalog)["class_names"])
    spec = StreamSpec(GEO, names, seed=5, mode="train")
    state_name = f"test-stream-{tmp_path.name}"
    state = stream_state(state_name)  # the driver keeps the handle alive

    def loop(config):
        import ray
        import ray.train
        import ray.train.collective

        from ipb_ray.distributed.streams import STATE_NAMESPACE, torch_batches

        ctx = ray.train.get_context()
        actor = ray.get_actor(config["state"], namespace=STATE_NAMESPACE)
        log = []
        for epoch in range(2):
            if ctx.get_world_rank() == 0:
                ray.get(actor.set.remote(epoch))
            ray.train.collective.barrier()
            shard = ray.train.get_dataset_shard("train")
            seen = []
            for b in torch_batches(shard, config["spec"], batch_size=3):
                seen += [[cid, int(x)] for cid, x in zip(b["colony_id"], b["x64"].flatten(1).argmax(1))]
            log.append({"epoch": epoch, "batches": len(seen) // 3, "seen": seen})
        with open(f"{config['out']}/rank{ctx.get_world_rank()}.json", "w") as fh:
            json.dump(log, fh)

    trainer = TorchTrainer(
        loop, train_loop_config={"state": state_name, "spec": spec, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="streams-ddp", storage_path=str(tmp_path / "store")),
        datasets={"train": patch_dataset(tiny_catalog, spec, state_name=state_name, workers=1,
                                                    cpus=0.25)})
    trainer.fit()
    import ray
    ray.kill(state)
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    rows = catalog.read_catalog(tiny_catalog, columns=["colony_id"]).num_rows
    full = rows // 2 // 3  # each rank gets half the rows, in full batches of 3
    assert full >= 3
    for epoch in range(2):
        assert logs[0][epoch]["batches"] == logs[1][epoch]["batches"] == full
        ids = [cid for r in (0, 1) for cid, _ in logs[r][epoch]["seen"]]
        assert len(ids) == len(set(ids)) == 2 * 3 * full  # disjoint shards
    # each epoch draws fresh windows (content differs for the same colony)
    e0 = {cid: x for r in (0, 1) for cid, x in logs[r][0]["seen"]}
    e1 = {cid: x for r in (0, 1) for cid, x in logs[r][1]["seen"]}
    common = set(e0) & set(e1)
    assert common and sum(e0[c] != e1[c] for c in common) >= len(common) // 2


def test_fixed_coords_reuse_the_labelled_window_with_fresh_augmentation():
    rows = _rows()
    label = patch_batch(rows, StreamSpec(GEO, CLASSES, seed=3, mode="label"), epoch=2)
    coords = {c: (x, y, s) for c, x, y, s in zip(label["colony_id"], label["x"].tolist(), label["y"].tolist(),
                                                  label["scale"].tolist())}
    first = rows["colony_id"][0]
    uda = patch_batch(rows, StreamSpec(GEO, CLASSES, seed=3, mode="uda"), epoch=0, counts={first: 3},
                      coords=coords)
    assert uda["colony_id"].tolist() == [first] * 3
    assert {(int(x), int(y)) for x, y in zip(uda["x"], uda["y"])} == {coords[first][:2]}
    assert uda["scale"].tolist() == [np.float32(coords[first][2])] * 3
    assert not np.array_equal(uda["strong64"][0], uda["strong64"][1])  # copies: new augmentation each
    # without augmentation, the window is exactly the one the labelling pass cut
    plain = patch_batch(rows, StreamSpec(GEO, CLASSES, seed=9, mode="plain"), epoch=7, counts={first: 1},
                        coords=coords)
    assert np.array_equal(plain["x64"][0], label["x64"][0])
    # the labelling stream draws apart from the plain stream of the same seed and epoch
    other = patch_batch(rows, StreamSpec(GEO, CLASSES, seed=3, mode="plain"), epoch=2)
    assert _coords(other) != _coords(label)
