"""The in-process labelling pass alone (nothing beside it), against cutting alone: is a
pass slower than plain inference because of its windows or because of what runs beside it?

    python benchmarks/label_pass.py     # Chula RBC-12 at /tmp/chula/catalog, fold 0, 1,600 U cells

A network of the benchmark's settings (untrained: the rate does not depend on the weights)
labels 1,600 unlabelled cells at batch 16 and 128 (one warm-up pass first); then the same
windows are only cut. Prints colonies/s.
"""
import time, torch
from ipb_ray.config import load_config
from ipb_ray.data.fold_views import resolve_fold_catalog
from ipb_ray.engine.fold import fold_inputs, stream_specs
from ipb_ray.engine.inprocess import MemoryPatches, MemoryLabeller
from ipb_ray.nn.models import model_kwargs, create_model
cfg = resolve_fold_catalog(load_config(preset="demo", overrides=["data.catalog=/tmp/chula/catalog", "split.folds=5", "split.labelled_fraction=0.1", "model.width=1.0", "data.global_patch=64", "data.local_patch=32", "data.window=whole", "method.name=ipb"]))
inputs = fold_inputs(cfg, 0)
specs = stream_specs(cfg, inputs.class_names, True)
patches = MemoryPatches(inputs.catalog)
kw = model_kwargs(cfg, len(inputs.class_names), inputs)
w = create_model(**kw).state_dict()
ids = sorted(inputs.unlabelled)[:1600]
for bs in (16, 128):
    lab = MemoryLabeller(patches, specs.label, bs, torch.device("cpu"))
    job = lab.job(0, ids, w, kw); job()
    t = time.perf_counter(); table = job(); dt = time.perf_counter() - t
    print(f"labelling pass alone, batch {bs}: {len(table)/dt:.0f} colonies/s")
# cutting alone
from ipb_ray.patches.plan import epoch_rows
plan = epoch_rows(patches.ids, ids=ids)
t = time.perf_counter(); n = sum(len(r["colony_id"]) for r in patches.rows(specs.label, plan, 0, 16, drop_last=False)); dt = time.perf_counter() - t
print(f"cutting alone: {n/dt:.0f} colonies/s")
