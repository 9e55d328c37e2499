"""The in-process labelling pass alone (nothing beside it), against cutting alone: is a
pass slower than plain inference because of its windows or because of what runs beside it?

    python benchmarks/label_pass.py [CATALOG] [--pool 1600] [--sizes 16,128] [overrides ...]

CATALOG defaults to Chula RBC-12 at /tmp/chula/catalog (RESULTS.md builds it); fold 0 of
the folds ``split.*`` asks for (default: 5 folds, 10 % labelled). A network of the accuracy
benchmark's settings (untrained: the rate does not depend on the weights) labels ``--pool``
unlabelled cells at each batch size (one warm-up pass first); then the same windows are only
cut. Prints colonies/s; compare with ``benchmarks/eval_batch.py`` (plain inference).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = ["split.folds=5", "split.labelled_fraction=0.1", "model.width=1.0", "data.global_patch=64",
            "data.local_patch=32", "data.window=whole", "method.name=ipb"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("catalog", nargs="?", default="/tmp/chula/catalog")
    ap.add_argument("--pool", type=int, default=1600)
    ap.add_argument("--sizes", default="16,128")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)

    import torch

    from ipb_ray.config import load_config
    from ipb_ray.data.fold_views import resolve_fold_catalog
    from ipb_ray.engine.fold import fold_inputs, stream_specs
    from ipb_ray.engine.inprocess import MemoryLabeller, MemoryPatches
    from ipb_ray.nn.models import create_model, model_kwargs
    from ipb_ray.patches.plan import epoch_rows

    cfg = resolve_fold_catalog(load_config(preset="demo", overrides=[f"data.catalog={args.catalog}", *SETTINGS,
                                                                     *args.overrides]))
    inputs = fold_inputs(cfg, 0)
    spec = stream_specs(cfg, inputs.class_names, True).label
    patches = MemoryPatches(inputs.catalog)
    kwargs = model_kwargs(cfg, len(inputs.class_names), inputs)
    weights = create_model(**kwargs).state_dict()
    ids = sorted(inputs.unlabelled)[:args.pool]
    for size in (int(s) for s in args.sizes.split(",")):
        job = MemoryLabeller(patches, spec, size, torch.device("cpu")).job(0, ids, weights, kwargs)
        job()  # warm-up
        t0 = time.perf_counter()
        table = job()
        print(f"labelling pass alone, batch {size}: {len(table) / (time.perf_counter() - t0):.0f} colonies/s")
    plan = epoch_rows(patches.ids, ids=ids)
    t0 = time.perf_counter()
    n = sum(len(rows["colony_id"]) for rows in patches.rows(spec, plan, 0, 16, drop_last=False))
    print(f"cutting alone: {n / (time.perf_counter() - t0):.0f} colonies/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
