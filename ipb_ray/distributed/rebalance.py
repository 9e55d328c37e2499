"""IPB's per-epoch pseudo-label rebalancing: the labelling pass on Ray Data and the draw.

At the start of every IPB epoch (shared/IPB.md, step 2a):

1. **Labelling pass** (Ray Data): one fresh random window of every unlabelled colony is
   cut (stream mode ``label``, seeded by ``(seed, epoch, colony)``) and the current
   teacher predicts its class. The stage is :class:`TeacherLabeller`; it reads the
   epoch and the teacher weights that rank 0 published on a :class:`~ipb_ray.distributed.streams.StreamState`
   actor, and loads a new teacher only when the published version changes. On CPU it
   runs as Ray tasks (their processes outlive an epoch, so the teacher's module is built
   once per process); with GPUs as an actor pool holding a GPU each.
2. **Draw** (pure, :func:`ipb_ray.patches.pseudo_labels.epoch_plan`): every colony weighs 1/n_c of its pseudo-label's
   class and ``n`` windows are drawn from that multinomial with replacement
   (:func:`ipb_ray.patches.balance.pseudo_balance`), reproducible from ``(seed, epoch)``. The
   drawn colonies, their copy counts and the labelled windows go to the student's stream,
   so the student trains on the very patches the teacher labelled, freshly augmented.

Without balancing (plain MPL, ``method.name=mpl``) there is no labelling pass: every
unlabelled colony appears once per epoch at a fresh random window.

With ``method.pseudo_balance.relabel=reuse`` the pass runs only in the first epoch of a run; later
epochs draw on the pseudo-labels the teacher gave during the previous epoch's MPL steps
(a colony not drawn then keeps its older label and window).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ipb_ray.engine.labelling import collect_labels, empty_labels, label_rows
from ipb_ray.patches.core import StreamSpec, patch_batch
from ipb_ray.distributed.streams import current_state, state_handle
from ipb_ray.patches.pseudo_labels import LabelTable  # what a labelling pass returns

__all__ = ["TeacherLabeller", "labelling_dataset", "run_labelling"]


# --------------------------------------------------------------------------- Ray Data stage

class TeacherLabeller:
    """``map_batches`` stage: rows -> one pseudo-labelled window per colony.

    Rows are catalog rows (PNG bytes; the colonies to label are the state's counts) or,
    with ``cache`` (an :class:`ipb_ray.distributed.epoch_stream.CropCache`), plan rows cut
    from the decoded crops. Reads the epoch and the teacher from the named
    :class:`~ipb_ray.distributed.streams.StreamState`; rebuilds nothing but the weights when rank 0
    publishes a new teacher version. ``model_kwargs`` are
    :func:`ipb_ray.nn.models.create_model`'s arguments."""

    def __init__(self, spec: StreamSpec, state_name: str, model_kwargs: Mapping[str, Any], device: str = "cpu",
                 cache: Any = None):
        import torch

        from ipb_ray.nn.models import create_model

        if spec.mode != "label":
            raise ValueError(f"the labelling stage needs a stream of mode 'label', got {spec.mode!r}")
        if device == "cpu":
            torch.set_num_threads(1)  # one CPU per data task; no oversubscription
        self.spec, self.state_name, self.device, self.cache = spec, state_name, torch.device(device), cache
        self.model = create_model(**model_kwargs).to(self.device).eval()
        self.version = None

    def _refresh(self) -> None:
        import ray
        import torch

        version, refs = ray.get(state_handle(self.state_name).teacher.remote())
        if not refs:
            raise RuntimeError(f"no teacher has been published on {self.state_name}; rank 0 publishes it "
                               "before the labelling pass")
        if version != self.version:
            weights = ray.get(refs[0])
            self.model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
            self.version = version

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        epoch, counts, _ = current_state(self.state_name)
        if self.cache is not None:
            from ipb_ray.distributed.epoch_stream import views_of
            from ipb_ray.patches.crops import cut_plan, unpack_plan

            rows = cut_plan(unpack_plan(batch), self.spec, epoch, views_of(self.cache))
        else:
            rows = patch_batch(batch, self.spec, epoch, counts)
        if not len(rows["colony_id"]):
            return empty_labels()
        self._refresh()
        return label_rows(self.model, rows, self.spec, self.device)


_LABELLERS: dict[tuple[str, str], TeacherLabeller] = {}


def _label_task(batch: dict[str, np.ndarray], spec: StreamSpec, state_name: str,
                model_kwargs: Mapping[str, Any], cache: Any = None) -> dict[str, np.ndarray]:
    """Task form of :class:`TeacherLabeller`: one labeller per worker process, kept between
    epochs (an actor pool would start new processes every epoch)."""
    key = (state_name, repr(sorted(model_kwargs.items())), cache.key if cache is not None else "")
    labeller = _LABELLERS.get(key)
    if labeller is None:
        labeller = _LABELLERS[key] = TeacherLabeller(spec, state_name, model_kwargs, cache=cache)
    return labeller(batch)


def labelling_dataset(catalog_dir: str, spec: StreamSpec, state_name: str, model_kwargs: Mapping[str, Any], *,
                      batch_size: int = 64, cpus: float = 1.0, actors: int = 1, gpus: float = 0.0,
                      use_actors: bool = False, workers: int | None = None, cache: Any = None,
                      ids: Sequence[str] | None = None):
    """A lazy ``ray.data.Dataset`` of :data:`LABEL_COLUMNS`: the labelling pass over the
    colonies that ``state_name`` counts, by the teacher published there.

    With ``cache`` (the run's :class:`ipb_ray.distributed.epoch_stream.CropCache`) the
    windows are cut from the decoded crops of ``ids`` (the colonies to label), not read and
    decoded from the catalog's Parquet. ``use_actors``: an actor pool of ``actors``
    labellers holding ``gpus`` each (for GPU clusters); otherwise Ray tasks of ``cpus``
    each, at most ``workers`` at once (default: as many as the free CPUs allow)."""
    import ray

    from ipb_ray.data import catalog
    from ipb_ray.patches.core import CATALOG_COLUMNS

    if cache is not None:
        from ipb_ray.distributed.epoch_stream import plan_source
        from ipb_ray.patches.plan import epoch_rows

        if ids is None:
            raise ValueError("a labelling pass over the crop cache needs the ids to label")
        ds = plan_source(epoch_rows(cache.ids, ids=sorted(ids)), batch_size, max(int(workers or actors), 1))
    else:
        catalog.read_manifest(catalog_dir)
        ray.data.DataContext.get_current().use_datasource_v2 = False  # see streams.patch_dataset
        ds = ray.data.read_parquet(f"{catalog_dir}/parts", columns=CATALOG_COLUMNS, num_cpus=cpus)
    rows = 1 if cache is not None else batch_size  # a plan source row holds a whole batch
    if use_actors:
        return ds.map_batches(TeacherLabeller, batch_size=rows, batch_format="numpy",
                              fn_constructor_kwargs=dict(spec=spec, state_name=state_name, model_kwargs=model_kwargs,
                                                         device="cuda" if gpus > 0 else "cpu", cache=cache),
                              compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus,
                              **({"num_gpus": gpus} if gpus > 0 else {}))
    extra = {"compute": ray.data.TaskPoolStrategy(size=workers)} if workers else {}
    return ds.map_batches(_label_task, batch_size=rows, batch_format="numpy", num_cpus=cpus, **extra,
                          fn_kwargs=dict(spec=spec, state_name=state_name, model_kwargs=dict(model_kwargs),
                                         cache=cache))


def run_labelling(dataset) -> LabelTable:
    """Execute a labelling dataset and collect its rows into a :class:`LabelTable`."""
    return collect_labels(dataset.iter_batches(batch_size=None, batch_format="numpy"))
