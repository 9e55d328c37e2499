"""IPB's per-epoch rebalancing: the pure plan, and the Ray Data labelling stage against it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ipb_ray.patches.pseudo_labels import LabelTable, class_histogram, epoch_plan, pseudo_label_tpr, steps_per_epoch


def _table(pseudo, truth=None, seed=0):
    n = len(pseudo)
    rng = np.random.default_rng(seed)
    ids = [f"{i:04x}" for i in rng.permutation(n)]  # deliberately unsorted
    return LabelTable.from_rows({"colony_id": ids, "pseudo": pseudo, "confidence": np.full(n, 0.9),
                                 "truth": truth if truth is not None else [-1] * n,
                                 "x": np.arange(n), "y": np.arange(n) * 2, "scale": np.ones(n)})


def test_table_is_sorted_and_rejects_duplicates():
    t = _table([0, 1, 2, 3, 0])
    assert t.colony_id.tolist() == sorted(t.colony_id.tolist())
    assert t.pseudo[t.lookup(["0000"])][0] in (0, 1, 2, 3)
    with pytest.raises(ValueError, match="labelled once"):
        LabelTable.from_rows({"colony_id": ["a", "a"], "pseudo": [0, 1], "confidence": [1, 1], "truth": [0, 0],
                              "x": [0, 0], "y": [0, 0], "scale": [1, 1]})
    with pytest.raises(KeyError, match="'zz' is not in the pseudo-label table"):
        t.lookup(["zz"])


def test_ipb_plan_draws_n_windows_at_the_labelled_coordinates_reproducibly():
    pseudo = [0] * 80 + [1] * 15 + [2] * 5
    t = _table(pseudo)
    plan = epoch_plan(t.colony_id.tolist(), t, 3, seed=4, epoch=2, n_draws=96)
    assert sum(plan.counts.values()) == 96 and plan.n_draws == 96
    assert set(plan.coords) == set(plan.counts)  # only drawn colonies, each at its labelled window
    for cid, (x, y, s) in plan.coords.items():
        i = t.lookup([cid])[0]
        assert (x, y, s) == (t.x[i], t.y[i], t.scale[i])
    assert plan.balance.class_counts.tolist() == [80, 15, 5]
    assert np.allclose(plan.balance.class_weights, np.array([1 / 80, 1 / 15, 1 / 5]) / (1 / 80 + 1 / 15 + 1 / 5))
    again = epoch_plan(t.colony_id.tolist(), t, 3, seed=4, epoch=2, n_draws=96)
    assert again.counts == plan.counts
    assert epoch_plan(t.colony_id.tolist(), t, 3, seed=4, epoch=3, n_draws=96).counts != plan.counts
    # drawn class frequencies are far closer to uniform than the pseudo-labels themselves
    drawn = np.zeros(3)
    for cid, k in plan.counts.items():
        drawn[t.pseudo[t.lookup([cid])[0]]] += k
    assert drawn.min() > 15 and drawn.max() < 50


def test_ipb_plan_with_a_missing_class_warns_and_never_divides_by_zero():
    t = _table([0] * 10 + [2] * 3)
    with pytest.warns(RuntimeWarning, match="no patch the class"):
        plan = epoch_plan(t.colony_id.tolist(), t, 3, seed=0, epoch=0, n_draws=30, class_names=("a", "b", "c"))
    assert plan.balance.missing == (1,) and plan.balance.class_weights[1] == 0
    assert np.isfinite(plan.balance.class_weights).all() and sum(plan.counts.values()) == 30


def test_mpl_plan_streams_every_colony_once_or_a_seeded_subset():
    ids = [f"c{i}" for i in range(10)]
    full = epoch_plan(ids, None, 4, seed=1, epoch=0, n_draws=10)
    assert full.counts == {c: 1 for c in ids} and full.coords is None and full.balance is None
    part = epoch_plan(ids, None, 4, seed=1, epoch=0, n_draws=8)
    assert sum(part.counts.values()) == 8 and set(part.counts.values()) == {1}
    assert part.counts != epoch_plan(ids, None, 4, seed=1, epoch=1, n_draws=8).counts
    more = epoch_plan(ids, None, 4, seed=1, epoch=0, n_draws=23)
    assert sum(more.counts.values()) == 23 and set(more.counts.values()) == {2, 3}
    with pytest.raises(ValueError, match="n_draws must be >= 0"):
        epoch_plan(ids, None, 4, seed=1, epoch=0, n_draws=-1)


def test_steps_histograms_and_pseudo_label_accuracy():
    assert steps_per_epoch(100, 2, 16) == 3 and steps_per_epoch(10, 1, 16) == 0
    assert class_histogram([0, 2, 2, -1], 3).tolist() == [1, 0, 2]
    t = _table([0, 0, 1, 1, 2], truth=[0, 1, 1, 1, -1])
    order = [t.lookup([c])[0] for c in t.colony_id]
    tpr, acc = pseudo_label_tpr(t, 3)
    assert order == list(range(5))
    # truth 0: one colony, right; truth 1: three colonies (pseudo 0, 1, 1 in some order); truth 2: none
    assert tpr[0] in (0.0, 1.0) and np.isnan(tpr[2])
    known = t.truth >= 0
    assert acc == pytest.approx(float((t.pseudo[known] == t.truth[known]).mean()))


def test_reused_labels_replace_the_pass_labels_last_one_winning():
    t = _table([0, 0, 0, 0])
    ids = t.colony_id.tolist()
    new = t.with_labels([ids[1], ids[2], ids[1]], [2, 1, 3])
    assert new.pseudo.tolist() == [0, 3, 1, 0] and t.pseudo.tolist() == [0, 0, 0, 0]
    assert new.x.tolist() == t.x.tolist()  # windows are kept


# --------------------------------------------------------------------------- Ray Data stage

@pytest.mark.ray
def test_labelling_stage_matches_the_reference_and_draws_pass_chi_square(tiny_catalog):
    import ray
    import torch
    from scipy.stats import chisquare

    from ipb_ray.data import catalog
    from ipb_ray.nn.models import create_model
    from ipb_ray.patches.geometry import PatchGeometry
    from ipb_ray.distributed.rebalance import TeacherLabeller, labelling_dataset, run_labelling
    from ipb_ray.patches.core import StreamSpec, patch_batch
    from ipb_ray.distributed.streams import patch_dataset, stream_state

    names = tuple(catalog.read_manifest(tiny_catalog)["class_names"])
    spec_label = StreamSpec(PatchGeometry(size=48, scales=(48,)), names, seed=2, mode="label")
    spec_uda = StreamSpec(PatchGeometry(size=48, scales=(48,)), names, seed=2, mode="uda")
    kwargs = dict(name="patch_stats", num_classes=len(names), feature_dim=6, multi_scale=False)
    teacher = create_model(**kwargs).eval()
    rows = catalog.read_catalog(tiny_catalog, columns=["colony_id", "image", "mask", "label"]).to_pydict()
    # a teacher that splits patches by mean intensity, unevenly: class 0 below the 60th
    # percentile, class 1 up to the 90th, class 2 above (the draw must even that out)
    spec_one = StreamSpec(PatchGeometry(size=48, scales=(48,)), names, seed=2, mode="label")
    means = patch_batch(rows, spec_one, epoch=0)["x48"].mean(axis=(1, 2, 3))
    t1, t2 = np.quantile(means, [0.6, 0.9])
    k = 200.0
    with torch.no_grad():
        net = teacher.backbone.proj
        net.weight.copy_(torch.eye(6))
        net.bias.fill_(0.0)
        teacher.head.weight.zero_()
        teacher.head.bias.zero_()
        teacher.head.weight[:3, 0] = torch.tensor([-k, 0.0, k])
        teacher.head.bias[:3] = torch.tensor([k * t1, 0.0, -k * t2])
        if len(names) > 3:
            teacher.head.bias[3:] = -1e4
    p_state, u_state = stream_state("test-label-state"), stream_state("test-u-state")
    try:
        ids = catalog.read_catalog(tiny_catalog, columns=["colony_id"]).column("colony_id").to_pylist()
        ray.get(p_state.publish.remote(1, [ray.put(teacher.state_dict())]))
        observed, expected, n = np.zeros(len(names)), np.zeros(len(names)), 64
        present_counts = []
        for epoch in range(8):
            ray.get(p_state.set.remote(epoch, {c: 1 for c in ids}))
            table = run_labelling(labelling_dataset(tiny_catalog, spec_label, "test-label-state", kwargs,
                                                    batch_size=8, cpus=0.25))
            if epoch == 0:  # the Ray stage labels exactly as the labeller run in this process
                local = TeacherLabeller(spec_label, "test-label-state", kwargs)(rows)
                ref = LabelTable.from_rows(local)
                assert ref.colony_id.tolist() == table.colony_id.tolist() == sorted(ids)
                assert ref.pseudo.tolist() == table.pseudo.tolist()
                assert np.allclose(ref.confidence, table.confidence, atol=1e-5)
                # ... and the pass over the run's crop cache (what training uses) labels the same windows
                from ipb_ray.distributed.epoch_stream import crop_cache

                cached = run_labelling(labelling_dataset(tiny_catalog, spec_label, "test-label-state", kwargs,
                                                         batch_size=8, cpus=0.25, cache=crop_cache(tiny_catalog),
                                                         ids=ids))
                assert cached.colony_id.tolist() == table.colony_id.tolist()
                assert cached.x.tolist() == table.x.tolist() and cached.y.tolist() == table.y.tolist()
                assert cached.pseudo.tolist() == table.pseudo.tolist()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a class the teacher never predicts
                plan = epoch_plan(ids, table, len(names), seed=2, epoch=epoch, n_draws=n)
            ray.get(u_state.set.remote(epoch, plan.counts, plan.coords))
            got: dict[str, int] = {}
            for b in patch_dataset(tiny_catalog, spec_uda, state_name="test-u-state", batch_size=8,
                                   cpus=0.25).iter_batches(batch_format="numpy", batch_size=None):
                for cid, x, y in zip(b["colony_id"], b["x"].tolist(), b["y"].tolist()):
                    assert (x, y) == plan.coords[cid][:2]  # the student gets the labelled window
                    got[cid] = got.get(cid, 0) + 1
            assert got == plan.counts  # the stream emits exactly the draw
            present = plan.balance.class_counts > 0
            present_counts.append(int(present.sum()))
            expected[present] += n / present.sum()
            for cid, k in got.items():
                observed[table.pseudo[table.lookup([cid])[0]]] += k
    finally:
        ray.kill(p_state)
        ray.kill(u_state)
    print("observed", observed, "expected", expected, "classes present per epoch", present_counts)
    assert max(present_counts) >= 2, "the teacher should give at least two classes for this test to mean much"
    cells = expected > 0
    assert observed[~cells].sum() == 0
    p = chisquare(observed[cells], expected[cells]).pvalue
    assert p > 1e-3, (observed, expected, p)


def test_pseudo_label_quality_and_draw_figures():
    from ipb_ray.patches.pseudo_labels import draw_figures, pseudo_label_quality

    # truth 0 0 0 1 1 2 (-1 unknown); pseudo 0 0 1 1 1 1 2
    t = _table([0, 0, 1, 1, 1, 1, 2], truth=[0, 0, 0, 1, 1, 2, -1])
    q = pseudo_label_quality(t, 3)
    np.testing.assert_allclose(q["precision"][:2], [2 / 2, 2 / 4])
    assert np.isnan(q["precision"][2])  # the only colony called 2 has no known label
    np.testing.assert_allclose(q["recall"], [2 / 3, 2 / 2, 0 / 1])
    plan = epoch_plan(t.colony_id.tolist(), t, 3, seed=0, epoch=0, n_draws=70)
    fig = draw_figures(plan, t, 3)
    assert fig["max_copies"] == max(plan.counts.values()) and fig["drawn_colonies"] == len(plan.counts)
    np.testing.assert_allclose(fig["draw_share"].sum(), 1.0)
    rows = t.lookup(list(plan.counts))
    k = np.array(list(plan.counts.values()))
    known = t.truth[rows] >= 0
    want = k[known & (t.pseudo[rows] == t.truth[rows])].sum() / k[known].sum()
    assert fig["draw_precision"] == pytest.approx(want)


def test_label_table_keeps_probabilities_through_sorting_and_checkpoints():
    n = 5
    probs = np.eye(3)[[0, 1, 2, 0, 1]].astype(np.float32)
    t = LabelTable.from_rows({"colony_id": ["e", "d", "c", "b", "a"], "pseudo": [0, 1, 2, 0, 1],
                              "confidence": np.ones(n), "truth": [-1] * n, "x": np.zeros(n), "y": np.zeros(n),
                              "scale": np.ones(n), "probs": probs})
    assert t.colony_id.tolist() == ["a", "b", "c", "d", "e"]
    assert t.probs.argmax(1).tolist() == t.pseudo.tolist()
    back = LabelTable.from_rows(t.to_dict())
    np.testing.assert_array_equal(back.probs, t.probs)
    assert t.with_labels(["a"], [2]).probs is t.probs


def test_label_pool_is_all_of_u_or_a_seeded_subset():
    from ipb_ray.methods.balancers import label_pool

    u = [f"c{i:03d}" for i in range(50)][::-1]
    assert label_pool(u, 0, 0, 3) == u and label_pool(u, 50, 0, 3) == u
    a = label_pool(u, 10, 0, 3)
    assert len(a) == len(set(a)) == 10 and set(a) <= set(u) and a == sorted(a)
    assert a == label_pool(u, 10, 0, 3) and a != label_pool(u, 10, 0, 4)


def test_pseudo_balancer_prior_em_relabels_the_table_and_shifts_the_methods_logits():
    """method.pseudo_balance.prior=em, without Ray: U's prior from the pass's posteriors,
    the table relabelled from re-weighted posteriors, the same shift on the method's
    logits, and the shift kept through a checkpoint."""
    from types import SimpleNamespace

    import torch

    from ipb_ray.config import load_config
    from ipb_ray.methods.balancers import PseudoBalancer

    names = ("a", "b")
    ctx = SimpleNamespace(inputs=SimpleNamespace(class_names=names, labelled_labels=(0, 1), unlabelled=()))
    rng = np.random.default_rng(2)
    y = rng.choice(2, size=4000, p=[0.15, 0.85])
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.5)
    p1 = 1.0 / (1.0 + np.exp(-2.0 * x / 1.5 ** 2))
    probs = np.stack([1 - p1, p1], 1).astype(np.float32)
    n = len(y)
    table = LabelTable.from_rows({"colony_id": [f"u{i:05d}" for i in range(n)], "pseudo": probs.argmax(1),
                                  "confidence": probs.max(1), "truth": y, "x": np.zeros(n), "y": np.zeros(n),
                                  "scale": np.ones(n), "probs": probs})
    off = PseudoBalancer(load_config(preset="demo"), ctx)
    assert off._with_prior(table) == (table, {})
    logits = torch.randn(5, 2)
    assert torch.equal(off.adjust(logits), logits)
    bal = PseudoBalancer(load_config(preset="demo", overrides=["method.pseudo_balance.prior=em"]), ctx)
    new, figures = bal._with_prior(table)
    assert figures["u_prior/a"] == pytest.approx(0.15, abs=0.03) and figures["u_prior/b"] == pytest.approx(0.85, abs=0.03)
    assert (new.pseudo == 0).sum() < (table.pseudo == 0).sum()            # fewer "rare" calls
    assert (new.pseudo == new.truth).mean() > (table.pseudo == table.truth).mean()
    shift = torch.log(torch.tensor([figures["u_prior/a"], figures["u_prior/b"]]) * 2)
    torch.testing.assert_close(bal.adjust(logits), logits + shift)
    again = PseudoBalancer(load_config(preset="demo", overrides=["method.pseudo_balance.prior=em"]), ctx)
    again.load_state_dict(bal.state_dict())
    torch.testing.assert_close(again.adjust(logits), bal.adjust(logits))
    for b in (off, bal, again):
        b.close()


def test_pseudo_balancer_prior_labelled_reads_u_in_ls_class_shares():
    """method.pseudo_balance.prior=labelled: U's prior is L's (smoothed) class shares, whatever
    the labeller's posteriors say, so a labeller trained on balanced L calls fewer colonies
    of U by the rare class; a missing class keeps a floor instead of a log(0) shift."""
    from types import SimpleNamespace

    import torch

    from ipb_ray.config import load_config
    from ipb_ray.methods.balancers import PseudoBalancer

    names = ("a", "b", "c")
    labelled = (0,) * 15 + (1,) * 85  # c never labelled
    ctx = SimpleNamespace(inputs=SimpleNamespace(class_names=names, labelled_labels=labelled, unlabelled=()))
    rng = np.random.default_rng(3)
    y = rng.choice(2, size=3000, p=[0.15, 0.85])
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.5)
    p1 = 1.0 / (1.0 + np.exp(-2.0 * x / 1.5 ** 2))
    probs = np.stack([0.98 * (1 - p1), 0.98 * p1, np.full_like(p1, 0.02)], 1).astype(np.float32)
    n = len(y)
    table = LabelTable.from_rows({"colony_id": [f"u{i:05d}" for i in range(n)], "pseudo": probs.argmax(1),
                                  "confidence": probs.max(1), "truth": y, "x": np.zeros(n), "y": np.zeros(n),
                                  "scale": np.ones(n), "probs": probs})
    bal = PseudoBalancer(load_config(preset="demo", overrides=["method.pseudo_balance.prior=labelled"]), ctx)
    new, figures = bal._with_prior(table)
    shares = np.array([figures[f"u_prior/{k}"] for k in names])
    assert shares.sum() == pytest.approx(1.0)
    want = np.array([16 / 103, 86 / 103, 0.1 / 3])  # add-one shares; c at the floor 1/(10 C)
    np.testing.assert_allclose(shares, want / want.sum(), rtol=1e-6)
    assert (new.pseudo == 0).sum() < (table.pseudo == 0).sum()
    assert (new.pseudo == new.truth).mean() > (table.pseudo == table.truth).mean()
    logits = torch.zeros(4, 3)
    assert bal.adjust(logits).argmax(1).tolist() == [1, 1, 1, 1]  # the method's own labels follow U's prior
    bal.close()


def test_pseudo_balance_prior_rejects_an_unknown_source():
    from ipb_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="method.pseudo_balance.prior.*labelled"):
        load_config(preset="demo", overrides=["method.pseudo_balance.prior=labeled"])
