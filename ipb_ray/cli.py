"""The ``ipb`` command line: a thin shell over the library.

Each subcommand parses arguments, resolves the typed config and calls one library
function; progress bars and tables live here, never in the library.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Column, Table

from ipb_ray import config as cfgmod

app = typer.Typer(
    name="ipb",
    help="Iterative Pseudo Balancing on Ray: train, tune and evaluate semi-supervised "
         "colony classifiers. Every command takes --help.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show, validate and list experiment configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

CONFIG_OPT = typer.Option(None, "--config", "-c", help="Experiment YAML (may 'extends:' a preset).")
PRESET_OPT = typer.Option(None, "--preset", "-p", help="Preset name; see `ipb config presets`.")
OVERRIDES_ARG = typer.Argument(None, help="Dotted overrides, e.g. method.threshold=0.7 split.folds=5",
                               show_default=False)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the library's user-facing errors into a red message and exit code 2."""
    try:
        yield
    except (cfgmod.ConfigError, FileExistsError, FileNotFoundError, ValueError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=2) from None


def _resolve(config: Optional[Path], preset: Optional[str], overrides: Optional[List[str]]
             ) -> cfgmod.ExperimentConfig:
    return cfgmod.load_config(str(config) if config else None, overrides or (), preset=preset)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    disable=not console.is_terminal)


# --------------------------------------------------------------------------- config

@config_app.command("show")
def config_show(config: Optional[Path] = CONFIG_OPT, preset: Optional[str] = PRESET_OPT,
                overrides: Optional[List[str]] = OVERRIDES_ARG,
                flat: bool = typer.Option(False, help="One dotted key per line.")) -> None:
    """Print the fully resolved config (defaults <- preset <- file <- overrides) as YAML."""
    with _user_errors():
        cfg = _resolve(config, preset, overrides)
    if flat:
        for key, value in cfgmod.flatten(cfg).items():
            console.print(f"{key} = {value!r}", highlight=False, markup=False)
    else:
        console.print(cfgmod.dump_yaml(cfg), highlight=False, markup=False, end="")


@config_app.command("validate")
def config_validate(config: Path = typer.Argument(..., help="Experiment YAML to check."),
                    overrides: Optional[List[str]] = OVERRIDES_ARG) -> None:
    """Check a config file; exit 0 with 'ok', or 2 with the key, the value and the fix."""
    with _user_errors():
        cfg = _resolve(config, None, overrides)
    console.print(f"[green]ok[/] {config}: method={cfg.method.name} backbone={cfg.model.backbone} "
                  f"multi_scale={cfg.data.multi_scale} multi_label={cfg.data.multi_label}")


@config_app.command("presets")
def config_presets() -> None:
    """List the shipped presets (the paper's configurations and `demo`)."""
    table = Table(*(Column(h, no_wrap=True) for h in
                    ("preset", "method", "backbone", "MS", "ML", "L bal.")),
                  caption="MS multi-scale, ML multi-label colonies in U, L bal. labelled set resampled")
    for name in cfgmod.list_presets():
        c = cfgmod.load_config(preset=name)
        yes = {True: "yes", False: "-"}
        table.add_row(name, c.method.name, c.model.backbone, yes[c.data.multi_scale],
                      yes[c.data.multi_label], yes[c.method.balance_labelled])
    console.print(table)


# --------------------------------------------------------------------------- data

def _synth_world(out: Path, frames: int, size: int, colonies: int, scale: float, seed: int,
                 image_format: str):
    from ipb_ray import synth

    cfg = synth.SynthConfig(frames=frames, frame_size=size, colonies_per_frame=colonies,
                            colony_scale=scale, seed=seed, image_format=image_format)
    with _progress() as bar:
        task = bar.add_task("synthesising frames", total=frames)
        summary = synth.write_world(cfg, out, progress=lambda done, total: bar.update(task, completed=done))
    table = Table("class", "colonies", title=f"synthetic world in {out}")
    for name, count in sorted(summary.counts.items()):
        table.add_row(name, str(count))
    table.add_row("[bold]total", f"[bold]{summary.colonies}")
    console.print(table)
    return summary


@app.command()
def synth(out: Path = typer.Option(..., "--out", "-o", help="Output directory of the world."),
          frames: int = typer.Option(4, help="Number of frames."),
          size: int = typer.Option(2908, help="Frame side in px (the paper's wells are 2908)."),
          colonies: int = typer.Option(30, help="Target colonies per frame."),
          scale: float = typer.Option(1.0, help="Colony size multiplier."),
          seed: int = typer.Option(0, help="Seed: same seed, same world."),
          image_format: str = typer.Option("tif", "--format", help="tif or png.")) -> None:
    """Generate the synthetic colony world: frames, instance masks, annotations.csv."""
    with _user_errors():
        _synth_world(out, frames, size, colonies, scale, seed, image_format)


def _preprocess(cfg: cfgmod.ExperimentConfig, importer: str, out: Optional[str]):
    from ipb_ray.preprocess import build_catalog

    with _progress() as bar:
        task = bar.add_task("segmenting shards", total=None)
        summary = build_catalog(cfg, importer=importer, out=out,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
    table = Table("class", "colonies", title=f"catalog {summary.catalog} ({summary.importer})")
    for name, count in summary.counts.items():
        table.add_row(name, str(count))
    table.add_row("[bold]total", f"[bold]{summary.colonies}")
    console.print(table)
    console.print(f"shards: {summary.shards} ({summary.shards_skipped} already done), "
                  f"rejects: {summary.rejects}, seconds: {summary.seconds:.1f}", highlight=False)
    for reason, count in sorted(summary.reject_reasons.items(), key=lambda kv: -kv[1]):
        console.print(f"  [yellow]rejected[/] {count} x {reason}", highlight=False)
    if summary.rejects:
        console.print(f"  details: {summary.catalog}/rejects (Parquet: source, item, reason)")
    _print_folds(summary.folds, summary.catalog)
    return summary


def _print_folds(folds: list, where: str) -> None:
    if not folds:
        console.print("[yellow]no folds drawn[/] (too few labelled colonies for split.folds)")
        return
    table = Table("fold", "U", "L", "V", "T", "L per class", title=f"folds in {where}/folds.parquet")
    for row in folds:
        table.add_row(str(row["fold"]), str(row["U"]), str(row["L"]), str(row["V"]), str(row["T"]),
                      " ".join(f"{k}:{v}" for k, v in row["L_counts"].items()))
    console.print(table)


@app.command()
def folds(config: Optional[Path] = CONFIG_OPT, preset: Optional[str] = PRESET_OPT,
          overrides: Optional[List[str]] = OVERRIDES_ARG,
          catalog_dir: Optional[str] = typer.Option(None, "--catalog", help="Catalog directory "
                                                    "(data.catalog).")) -> None:
    """(Re)draw the cross-validation folds of a catalog, e.g. for another labelled fraction."""
    from ipb_ray.preprocess import make_catalog_folds

    with _user_errors():
        cfg = _resolve(config, preset, overrides)
        root = catalog_dir or cfg.data.catalog
        plan = make_catalog_folds(root, cfg)
        _print_folds(plan.summary() if plan else [], root)


@app.command()
def preprocess(config: Optional[Path] = CONFIG_OPT, preset: Optional[str] = PRESET_OPT,
               overrides: Optional[List[str]] = OVERRIDES_ARG,
               frames: Optional[str] = typer.Option(None, help="Frames folder/glob, a synth world, a VOC "
                                                    "folder or a class-folder tree (data.frames)."),
               annotations: Optional[str] = typer.Option(None, help="Annotation CSV/Parquet (data.annotations)."),
               out: Optional[str] = typer.Option(None, "--out", "-o", help="Catalog directory (data.catalog)."),
               importer: str = typer.Option("auto", help="auto, frames, synth, imagefolder or voc."),
               address: Optional[str] = typer.Option(None, help="Ray cluster address; default starts a "
                                                     "local cluster.")) -> None:
    """Segment frames and build the colony catalog on Ray Data (rerun to resume)."""
    extra = [f"data.frames={frames}"] if frames else []
    extra += [f"data.annotations={annotations}"] if annotations else []
    extra += [f"resources.address={address}"] if address else []
    with _user_errors():
        cfg = _resolve(config, preset, list(overrides or []) + extra)
        _preprocess(cfg, importer, out)


def print_report(report: dict, title: str) -> None:
    """Per-class TPR / precision / F1 table, macro averages and the confusion matrix."""
    names = report["class_names"]
    table = Table("class", "TPR", "precision", "F1", "support", title=title)
    for n in names:
        table.add_row(n, f"{report['tpr'][n]:.4f}", f"{report['precision'][n]:.4f}", f"{report['f1'][n]:.4f}",
                      str(report["support"][n]))
    table.add_row("[bold]macro", f"[bold]{report['macro_tpr']:.4f}", f"{report['macro_precision']:.4f}",
                  f"[bold]{report['macro_f1']:.4f}", str(report["n"]))
    console.print(table)
    cm = Table("true \\ predicted", *names, title="confusion matrix (rows: true class)")
    for n, row in zip(names, report["confusion_matrix"]):
        cm.add_row(n, *(str(v) for v in row))
    console.print(cm)
    console.print(f"balanced accuracy {report['balanced_accuracy']:.4f}, accuracy {report['accuracy']:.4f}",
                  highlight=False)


@app.command()
def train(config: Optional[Path] = CONFIG_OPT, preset: Optional[str] = PRESET_OPT,
          overrides: Optional[List[str]] = OVERRIDES_ARG,
          fold: Optional[int] = typer.Option(None, help="Fold to run (split.fold)."),
          address: Optional[str] = typer.Option(None, help="Ray cluster address; default starts a "
                                                "local cluster.")) -> None:
    """Train one fold on Ray Train (method.name: supervised, mpl or ipb) and print test metrics."""
    extra = [f"resources.address={address}"] if address else []
    with _user_errors():
        cfg = _resolve(config, preset, list(overrides or []) + extra)
        _train_and_report(cfg, cfg.split.fold if fold is None else fold)


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "" if v is None else format(v, spec)


def print_history(history: list, class_names: Sequence[str]) -> None:
    """One row per epoch: phase, losses and validation balanced accuracy; for IPB a second
    table of the teacher's class proportion -> the student stream's share, per class."""
    table = Table("epoch", "phase", "teacher loss", "student loss", "val BA teacher", "val BA student", "s",
                  title="per epoch")
    for h in history:
        table.add_row(str(h["epoch"]), {0: "teacher", 1: "mpl"}.get(h.get("phase"), "supervised"),
                      _fmt(h.get("teacher_loss", h.get("teacher_train_loss"))),
                      _fmt(h.get("student_loss", h.get("train_loss"))), _fmt(h.get("teacher_val_balanced_accuracy")),
                      _fmt(h.get("student_val_balanced_accuracy", h.get("val_balanced_accuracy"))),
                      _fmt(h.get("epoch_seconds"), ".1f"))
    console.print(table)
    balanced = [h for h in history if f"teacher_proportion/{class_names[0]}" in h]
    if balanced:
        table = Table("epoch", *class_names, title="pseudo-balancing: teacher proportion -> student stream share")
        for h in balanced:
            table.add_row(str(h["epoch"]), *(f"{h[f'teacher_proportion/{c}']:.2f}->{h.get(f'stream_share/{c}', 0):.2f}"
                                             for c in class_names))
        console.print(table)


def _train_and_report(cfg: cfgmod.ExperimentConfig, fold: int) -> dict:
    from ipb_ray.training import train_fold
    from ipb_ray.viz import save_training_curves

    m = cfg.method
    phases = f"{m.teacher_epochs} teacher + {m.epochs} {m.name.upper()} epochs" if m.name != "supervised" \
        else f"{m.epochs} epochs"
    console.print(f"training fold {fold}: {m.name}, {cfg.model.backbone} "
                  f"{'multi-scale' if cfg.data.multi_scale else 'single-scale'}, {phases}, "
                  f"{cfg.resources.num_workers} worker(s)", highlight=False)
    metrics = train_fold(cfg, fold)
    names = metrics["test_report"]["class_names"]
    if metrics.get("history"):
        print_history(metrics["history"], names)
    print_report(metrics["test_report"], f"test fold {fold} ({m.name}; best epoch on V)")
    if metrics.get("resumed_from_epoch", -1) >= 0:
        console.print(f"resumed from the checkpoint of epoch {metrics['resumed_from_epoch']}", highlight=False)
    console.print(f"checkpoint: {metrics['checkpoint']}", highlight=False)
    if metrics.get("history") and metrics.get("checkpoint"):
        curves = save_training_curves(metrics["history"], names, Path(metrics["checkpoint"]).parent / "curves.png",
                                      title=f"{cfg.name} {m.name} fold {fold}")
        console.print(f"curves: {curves}", highlight=False)
    return metrics


def print_comparison(results: dict, title: str) -> None:
    """Methods side by side: macro TPR, the worst class's TPR, macro F1."""
    table = Table("method", "macro TPR", "worst-class TPR", "macro F1", "balanced accuracy", title=title)
    for method, report in results.items():
        tprs = {k: v for k, v in report["tpr"].items() if v == v}  # NaN: class absent from T
        worst = min(tprs, key=tprs.get) if tprs else "-"
        table.add_row(method, f"{report['macro_tpr']:.4f}", f"{tprs.get(worst, float('nan')):.4f} ({worst})",
                      f"{report['macro_f1']:.4f}", f"{report['balanced_accuracy']:.4f}")
    console.print(table)


@app.command()
def demo(out: Path = typer.Option(Path("demo"), "--out", "-o", help="Working directory of the demo."),
         seed: int = typer.Option(0, help="Seed of the synthetic world and the run.")) -> None:
    """Run the demo: a small synthetic world, its catalog and folds, a patch stream, then the
    supervised baseline, MPL and IPB on fold 0, compared."""
    with _user_errors():
        world = out / "world"
        console.rule("[bold]1. synthetic colony world")
        _synth_world(world, frames=8, size=1024, colonies=20, scale=0.4, seed=seed, image_format="tif")
        cfg = cfgmod.load_config(preset="demo", overrides=_demo_overrides(seed, world, out))
        console.rule("[bold]2. colony catalog and folds on Ray Data")
        _preprocess(cfg, "auto", None)
        console.rule("[bold]3. patch stream of fold 0 (labelled L, augmented) on Ray Data")
        _demo_stream(cfg, out)
        results = {}
        for step, (method, what) in enumerate((("supervised", "supervised multi-scale HRNet baseline"),
                                              ("mpl", "MPL, imbalanced (no pseudo-balancing)"),
                                              ("ipb", "IPB: MPL with per-epoch pseudo-balancing")), start=4):
            console.rule(f"[bold]{step}. {what} on fold 0 (Ray Train)")
            results[method] = _train_and_report(cfgmod.load_config(preset="demo", overrides=[
                *_demo_overrides(seed, world, out), f"method.name={method}", f"name=demo-seed{seed}"]),
                0)["test_report"]
        print_comparison(results, "fold 0 test set: the three methods (demo sizes: a smoke signal, not a result)")
    console.print(f"[green]demo finished[/]: world in {world}, catalog in {out / 'catalog'}, "
                  f"patches in {out / 'patches.png'}, runs in {out / 'ray_results'}.")


def _demo_overrides(seed: int, world: Path, out: Path) -> list[str]:
    return [f"seed={seed}", f"data.frames={world}", "data.annotations=null",
            f"data.catalog={out / 'catalog'}", f"tracking.storage_path={out / 'ray_results'}"]


def _demo_stream(cfg: cfgmod.ExperimentConfig, out: Path) -> None:
    import time

    from ipb_ray import catalog as catmod
    from ipb_ray.folds import read_folds
    from ipb_ray.patches import PatchGeometry
    from ipb_ray.streams import StreamSpec, patch_dataset, torch_batches
    from ipb_ray.viz import save_patch_grid

    root = cfg.data.catalog
    names = tuple(catmod.read_manifest(root)["class_names"])
    labelled = read_folds(root).roles(cfg.split.fold)["L"]
    spec = StreamSpec(PatchGeometry.from_config(cfg.data), names, seed=cfg.seed, mode="train")
    t0, n, first = time.perf_counter(), 0, None
    for batch in torch_batches(patch_dataset(root, spec, ids=labelled, epoch=0), spec,
                               cfg.method.batch_size, drop_last=False):
        n += len(batch["label"])
        first = first if first is not None else batch
    dt = time.perf_counter() - t0
    console.print(f"{n} labelled patches of fold {cfg.split.fold} in {dt:.1f} s "
                  f"({n / dt:.0f} patches/s incl. start-up); columns "
                  + ", ".join(f"{c} {tuple(first[c].shape[1:])}" for c in spec.patch_columns()),
                  highlight=False)
    if first is not None:
        save_patch_grid(first, spec, names, out / "patches.png")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
