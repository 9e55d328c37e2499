"""The ``ipb`` command line: a thin shell over the library.

Each subcommand parses arguments, resolves the typed config and calls one library
function; progress bars and tables live here, never in the library.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Column, Table

from ipb_ray import config as cfgmod

__all__ = [
    "ADDRESS_OPT", "CONFIG_OPT", "DEMO_DEFAULTS", "DEMO_METHODS", "DEMO_OWN_KEYS", "DEMO_WORLD",
    "OVERRIDES_ARG", "PRESET_OPT", "RESUME_HINTS", "app", "compare", "config_app", "config_methods",
    "config_presets", "config_reference", "config_show", "config_validate", "console", "cv", "demo",
    "err_console", "export_cmd", "folds", "interrupt_hint", "jobs_app", "jobs_list", "jobs_logs",
    "jobs_status", "jobs_stop", "local_cluster", "main", "predict", "preprocess", "print_history",
    "print_paired", "print_report", "register", "report", "submit", "synth", "train", "tune",
]

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
OVERRIDES_ARG = typer.Argument(None, help="Dotted overrides, e.g. method.mpl.threshold=0.7 split.folds=5",
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
    """Check a config file; exit 0 with 'ok', or 2 listing every bad key with its value and fix."""
    errors = cfgmod.validate_all(str(config), overrides or ())
    if errors:
        for exc in errors:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        err_console.print(f"{len(errors)} error{'s' * (len(errors) != 1)} in {escape(str(config))}; "
                          "fix them and run `ipb config validate` again", highlight=False)
        raise typer.Exit(code=2)
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


@config_app.command("reference")
def config_reference() -> None:
    """Print every config key with its default, allowed values and meaning (docs/config.md)."""
    print(cfgmod.reference_markdown(), end="")


@config_app.command("methods")
def config_methods(config: Optional[Path] = CONFIG_OPT, preset: Optional[str] = PRESET_OPT,
                   overrides: Optional[List[str]] = OVERRIDES_ARG) -> None:
    """List the registered methods (their stages under the given config) and balancers."""
    from ipb_ray.methods import get_balancer, get_method, list_balancers, list_methods
    from ipb_ray.methods.base import LOOP_KEYS, SEMI_KEYS

    with _user_errors():
        cfg = _resolve(config, preset or ("demo" if config is None else None), overrides)
    table = Table(*(Column(h) for h in ("method.name", "what it is", "stages (epochs)", "default balancer",
                                        "own method.* keys")),
                  caption="stages under the given config (default: the demo preset); method.balancer picks "
                          "another balancer for a semi-supervised method")
    for name in list_methods():
        cls = get_method(name)
        run = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name=name, balancer=None))
        stages = ", ".join(f"{s.name} ({s.epochs})" for s in cls.stages(run))
        table.add_row(name, cls.title, stages, cls.default_balancer if cls.semi_supervised else "-",
                      _own_keys_text(cls))
    console.print(table)
    console.print(f"every method also reads method.{{{', '.join(LOOP_KEYS)}}}; semi-supervised ones "
                  f"method.{{{', '.join(SEMI_KEYS)}}}", highlight=False)
    for name in list_balancers():
        cls = get_balancer(name)
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        keys = f" (reads {_own_keys_text(cls)})" if cls.params is not None else ""
        console.print(f"balancer [bold]{name}[/]: {escape(doc)}{keys}", highlight=False)


def _own_keys_text(cls: type) -> str:
    """``method.mpl: teacher_lr, student_lr, ...`` (a method's or balancer's own section)."""
    from ipb_ray.methods.base import own_keys

    keys = own_keys(cls)
    return f"method.{cls.section}: " + ", ".join(k.split(".", 1)[1] for k in keys) if keys else "-"


# --------------------------------------------------------------------------- data

def _synth_world(out: Path, frames: int, size: int, colonies: int, scale: float, seed: int,
                 image_format: str, class_weights: Any = None):
    from ipb_ray.data import synth
    extra = {"class_weights": tuple(class_weights.items())} if class_weights else {}
    cfg = synth.SynthConfig(frames=frames, frame_size=size, colonies_per_frame=colonies,
                            colony_scale=scale, seed=seed, image_format=image_format, **extra)
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


def _preprocess(cfg: cfgmod.ExperimentConfig, importer: str, out: Optional[str], overwrite: bool = False):
    from ipb_ray.cluster.paths import check_output_dir
    from ipb_ray.distributed.preprocess import build_catalog

    target = out or cfg.data.catalog
    if "://" not in target:  # a remote store checks itself when written
        check_output_dir(target, "--out" if out else "data.catalog")
    with _progress() as bar:
        task = bar.add_task("segmenting shards", total=None)
        summary = build_catalog(cfg, importer=importer, out=out, overwrite=overwrite,
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
    for text in summary.warnings:
        console.print(f"[yellow]check:[/] {escape(text)}", highlight=False)
    _print_folds(summary.folds, summary.catalog, summary.folds_note)
    return summary


def _print_folds(folds: list, where: str, why: str = "") -> None:
    if not folds:
        console.print(f"[yellow]no folds drawn:[/] "
                      f"{escape(why or 'too few labelled colonies for split.folds')}", highlight=False)
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
    from ipb_ray.data.fold_views import make_catalog_folds, why_no_folds

    with _user_errors():
        cfg = _resolve(config, preset, overrides)
        root = catalog_dir or cfg.data.catalog
        plan = make_catalog_folds(root, cfg)
        _print_folds(plan.summary() if plan else [], root, "" if plan else why_no_folds(root, cfg))


@app.command()
def preprocess(config: Optional[Path] = CONFIG_OPT, preset: Optional[str] = PRESET_OPT,
               overrides: Optional[List[str]] = OVERRIDES_ARG,
               frames: Optional[str] = typer.Option(None, help="Frames folder/glob, a synth world, a VOC "
                                                    "folder or a class-folder tree (data.frames)."),
               annotations: Optional[str] = typer.Option(None, help="Annotation CSV/Parquet (data.annotations)."),
               out: Optional[str] = typer.Option(None, "--out", "-o", help="Catalog directory (data.catalog)."),
               importer: str = typer.Option("auto", help="auto, frames, synth, imagefolder or voc."),
               address: Optional[str] = typer.Option(None, help="Ray cluster address; default starts a "
                                                     "local cluster."),
               overwrite: bool = typer.Option(False, "--overwrite", help="Replace a catalog of other inputs "
                                              "already in --out (refused without it).")) -> None:
    """Segment frames and build the colony catalog on Ray Data (rerun the same command to resume)."""
    extra = [f"data.frames={frames}"] if frames else []
    extra += [f"data.annotations={annotations}"] if annotations else []
    extra += [f"resources.address={address}"] if address else []
    with _user_errors():
        cfg = _resolve(config, preset, list(overrides or []) + extra)
        _preprocess(cfg, importer, out, overwrite)


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
    """Train one fold on Ray Train (method.name: see `ipb config methods`) and print test metrics."""
    extra = [f"resources.address={address}"] if address else []
    with _user_errors():
        cfg = _resolve(config, preset, list(overrides or []) + extra)
        _train_and_report(cfg, cfg.split.fold if fold is None else fold)


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "" if v is None else format(v, spec)


def print_history(history: list, class_names: Sequence[str]) -> None:
    """One row per epoch: the stage, the trained network's loss and validation balanced
    accuracy (and the teacher's, during MPL steps); with a pseudo-balancer a second table of
    the labeller's class proportion -> the unlabelled stream's share, per class."""
    teacher = any("teacher_loss" in h for h in history)
    table = Table("epoch", "stage", "loss", "val BA", *(("teacher loss", "teacher val BA") if teacher else ()), "s",
                  title="per epoch")
    for h in history:
        extra = (_fmt(h.get("teacher_loss")), _fmt(h.get("teacher_val_balanced_accuracy"))) if teacher else ()
        table.add_row(str(h["epoch"]), str(h.get("stage", "")), _fmt(h.get("train_loss")),
                      _fmt(h.get("val_balanced_accuracy")), *extra, _fmt(h.get("epoch_seconds"), ".1f"))
    console.print(table)
    balanced = [h for h in history if f"teacher_proportion/{class_names[0]}" in h]
    if balanced:
        table = Table("epoch", *class_names, title="pseudo-balancing: teacher proportion -> student stream share")
        for h in balanced:
            table.add_row(str(h["epoch"]), *(f"{h[f'teacher_proportion/{c}']:.2f}->{h.get(f'stream_share/{c}', 0):.2f}"
                                             for c in class_names))
        console.print(table)


def _train_and_report(cfg: cfgmod.ExperimentConfig, fold: int) -> dict:
    from ipb_ray.data.fold_views import resolve_fold_catalog
    from ipb_ray.distributed.fold import run_fold

    before = cfg.data.catalog
    cfg = resolve_fold_catalog(cfg)  # the folds split.* asks for, not whatever the catalog holds
    if cfg.data.catalog != before:
        console.print(f"split.* differs from the folds stored in {escape(str(before))}: using the catalog "
                      f"view {escape(str(cfg.data.catalog))}", highlight=False)

    from ipb_ray.methods import get_method

    m = cfg.method
    phases = " + ".join(f"{s.epochs} {s.title or s.name}" for s in get_method(m.name).stages(cfg)) + " epochs"
    from ipb_ray.distributed.training import needs_ray, runs_in_process

    where = "in this process" if runs_in_process(cfg) else f"{cfg.resources.num_workers} Ray Train worker(s)"
    console.print(f"training fold {fold}: {m.name}, {cfg.model.backbone} "
                  f"{'multi-scale' if cfg.data.multi_scale else 'single-scale'}, {phases}, {where}",
                  highlight=False)
    from ipb_ray.cluster.paths import check_cluster_paths
    from ipb_ray.distributed.ray_setup import init_ray

    connected = needs_ray(cfg)  # resources.num_workers=0: this process alone, no Ray unless a cluster is named
    if connected:
        init_ray(cfg.resources)
    check_cluster_paths(cfg, connected=connected)
    metrics = run_fold(cfg, fold)
    names = metrics["test_report"]["class_names"]
    if metrics.get("history"):
        print_history(metrics["history"], names)
    print_report(metrics["test_report"], f"test fold {fold} ({m.name}; best epoch on V)")
    if metrics.get("resumed_from_epoch", -1) >= 0:
        console.print(f"resumed from the checkpoint of epoch {metrics['resumed_from_epoch']}", highlight=False)
    console.print(f"checkpoint: {metrics['checkpoint']}", highlight=False)
    if metrics.get("curves"):
        console.print(f"curves: {metrics['curves']}", highlight=False)
    return metrics


def _parse_fractions(text: Optional[str]) -> list[float]:
    if not text:
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--labelled-fraction {text!r} should be numbers separated by commas, "
                         "e.g. 0.01,0.05,0.1") from None
    bad = [v for v in values if not 0 < v < 1]
    if bad:
        raise ValueError(f"--labelled-fraction values must lie in (0, 1), got {bad}")
    return values


def print_paired(rows: list, name_a: str, name_b: str) -> None:
    """The paired tests as a table; ``*`` marks p < alpha."""
    def p(v: float, sig: bool) -> str:
        return "n/a" if v != v else f"{v:.3g}{' *' if sig else ''}"

    alpha = rows[0]["alpha"] if rows else 0.05
    table = Table("metric", name_a, name_b, "B - A", "t-test p", "Wilcoxon p", "n",
                  title=f"{name_b} (B) against {name_a} (A), paired over folds; * p < {alpha:g}")
    for r in rows:
        label = f"TPR {r['name']}" if r["metric"] == "tpr" else r["name"]
        table.add_row(label, f"{r['mean_a']:.3f}", f"{r['mean_b']:.3f}", f"{r['diff']:+.3f}",
                      p(r["p_t"], r["significant_t"]), p(r["p_w"], r["significant_w"]), str(r["n"]))
    console.print(table)


def _cv_one(cfg: cfgmod.ExperimentConfig, folds: Optional[List[int]], parallel: Optional[int],
            log_model: bool, run_name: Optional[str] = None):
    from ipb_ray.distributed.cv import run_cv

    with _progress() as bar:
        task = bar.add_task(f"{run_name or cfg.name + '-' + cfg.method.name}: folds", total=None)
        done: list[int] = []

        def on_event(kind: str, fold: int, info: dict) -> None:
            if kind in ("skipped", "finished"):
                done.append(fold)
                rep = info["test_report"]
                note = "already finished in MLflow" if kind == "skipped" else "finished"
                bar.console.print(f"fold {fold} {note}: macro TPR {rep['macro_tpr']:.4f}, "
                                  f"macro F1 {rep['macro_f1']:.4f}", highlight=False)
            elif kind == "started":
                bar.console.print(f"fold {fold} started", highlight=False)
            bar.update(task, completed=len(done))

        result = run_cv(cfg, folds, parallel=parallel, log_model=log_model, run_name=run_name, on_event=on_event)
    s = result.summary
    table = Table("class", "TPR mean ± std", "F1 mean ± std",
                  title=f"{run_name or cfg.name + '-' + cfg.method.name}: {s['folds']} fold(s)")
    for c in s["class_names"]:
        table.add_row(c, f"{s['tpr']['mean'][c]:.4f} ± {s['tpr']['std'][c]:.4f}",
                      f"{s['f1']['mean'][c]:.4f} ± {s['f1']['std'][c]:.4f}")
    table.add_row("[bold]macro", f"[bold]{s['macro_tpr']['mean']:.4f} ± {s['macro_tpr']['std']:.4f}",
                  f"[bold]{s['macro_f1']['mean']:.4f} ± {s['macro_f1']['std']:.4f}")
    console.print(table)
    console.print(f"MLflow: parent run {result.parent_run_id} in experiment '{cfg.tracking.experiment}' at "
                  f"{cfg.tracking.tracking_uri}", highlight=False)
    return result


@app.command()
def cv(config: Optional[Path] = CONFIG_OPT, preset: Optional[str] = PRESET_OPT,
       overrides: Optional[List[str]] = OVERRIDES_ARG,
       folds: Optional[int] = typer.Option(None, "--folds", help="Run only the first N folds (default: all)."),
       fold: Optional[List[int]] = typer.Option(None, "--fold", help="Run this fold (repeatable)."),
       labelled_fraction: Optional[str] = typer.Option(
           None, "--labelled-fraction", help="Sweep: comma-separated fractions of labelled colonies, one CV each "
           "(e.g. 0.01,0.05,0.1,0.5,0.8)."),
       parallel: Optional[int] = typer.Option(None, help="Folds at once (default: what the cluster holds)."),
       tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (tracking.tracking_uri)."),
       no_model: bool = typer.Option(False, "--no-model", help="Do not log the best student as an MLflow model."),
       address: Optional[str] = typer.Option(None, help="Ray cluster address; default starts a local cluster.")
       ) -> None:
    """Cross-validate a configuration on Ray: every fold trained and tested, tracked in MLflow.
    Rerun the same command to skip finished folds and resume unfinished ones."""
    extra = [f"resources.address={address}"] if address else []
    extra += [f"tracking.tracking_uri={tracking_uri}"] if tracking_uri else []
    with _user_errors():
        cfg = _resolve(config, preset, list(overrides or []) + extra)
        chosen = list(fold) if fold else (list(range(folds)) if folds else None)
        fractions = _parse_fractions(labelled_fraction)
        if not fractions:
            _cv_one(cfg, chosen, parallel, not no_model)
            return
        for frac in fractions:
            console.rule(f"[bold]labelled fraction {frac:g}")
            swept = cfg.replace(f"split.labelled_fraction={frac}", f"name={cfg.name}-lf{frac:g}")
            _cv_one(swept, chosen, parallel, not no_model)


@app.command()
def compare(run_a: str = typer.Argument(..., help="Parent run (name or id) of configuration A."),
            run_b: str = typer.Argument(..., help="Parent run (name or id) of configuration B."),
            experiment: str = typer.Option("ipb-ray", help="MLflow experiment."),
            tracking_uri: str = typer.Option("sqlite:///mlflow.db", help="MLflow tracking URI."),
            alpha: float = typer.Option(0.05, help="Significance level."),
            markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table instead.")) -> None:
    """Paired comparison of two cross-validated configurations, per class and macro, over
    their common folds: Student's t-test (as in the paper) and Wilcoxon signed-rank."""
    from ipb_ray.evaluation.stats import format_comparison, paired_tests
    from ipb_ray.tracking.runs import load_cv

    with _user_errors():
        _, a = load_cv(tracking_uri, experiment, run_a)
        _, b = load_cv(tracking_uri, experiment, run_b)
        common = sorted(set(a) & set(b))
        if len(common) < 2:
            raise ValueError(f"{run_a} has folds {sorted(a)} and {run_b} has folds {sorted(b)}; a paired test "
                             "needs at least 2 common folds (run more folds with `ipb cv`)")
        rows = paired_tests([a[f] for f in common], [b[f] for f in common], alpha=alpha)
        console.print(f"folds compared: {common}", highlight=False)
        if markdown:
            print(format_comparison(rows, run_a, run_b))
        else:
            print_paired(rows, run_a, run_b)


@app.command()
def report(experiment: str = typer.Argument("ipb-ray", help="MLflow experiment to report on."),
           out: Path = typer.Option(Path("report"), "--out", "-o", help="Output directory."),
           tracking_uri: str = typer.Option("sqlite:///mlflow.db", help="MLflow tracking URI."),
           baseline: Optional[str] = typer.Option(None, help="Configuration the others are compared with "
                                                  "(default: the supervised one).")) -> None:
    """Render the paper's tables and figures for an experiment's CV runs (HTML and Markdown)."""
    from ipb_ray.cluster.paths import check_cluster_paths, check_output_dir
    from ipb_ray.tracking.report import render_report

    with _user_errors():
        check_cluster_paths(cfgmod.load_config(overrides=[f"tracking.tracking_uri={tracking_uri}"]),
                            {"--out": str(out)}, catalog=False, storage=False, connected=False)
        check_output_dir(out)
        paths = render_report(tracking_uri, experiment, out, baseline=baseline)
        console.print(f"report: {paths['html']} (open in a browser) and {paths['markdown']}", highlight=False)


@app.command()
def register(run: str = typer.Argument(None, help="Cross-validation parent run (name or id) whose fold models to "
                                        "register; leave out with --version to move an alias only."),
             name: str = typer.Option(..., "--name", "-n", help="Registered model name."),
             alias: str = typer.Option("champion", help="Alias pointed at the new version (moved from any other)."),
             version: Optional[str] = typer.Option(None, help="Move --alias to this existing version instead of "
                                                   "registering a new one."),
             experiment: str = typer.Option("ipb-ray", help="MLflow experiment of RUN."),
             tracking_uri: str = typer.Option("sqlite:///mlflow.db", help="MLflow tracking URI.")) -> None:
    """Register a cross-validated configuration's fold models, as one ensemble, in the MLflow
    Model Registry (class names, patch geometry, normalisation and version travel with it);
    `ipb predict --model models:/NAME@ALIAS` applies it."""
    from ipb_ray.tracking.registry import register_configuration, set_alias

    with _user_errors():
        if version is not None:
            set_alias(tracking_uri, name, alias, version)
            console.print(f"models:/{name}@{alias} -> version {version}", highlight=False)
            return
        if not run:
            raise ValueError("name the cross-validation run to register (or give --version to move an alias)")
        info = register_configuration(tracking_uri, experiment, run, name, alias)
    est = f", cross-validated macro TPR {info['cv_macro_tpr']:.3f}" if info["cv_macro_tpr"] is not None else ""
    console.print(f"registered {info['name']} version {info['version']} (folds {info['folds']}{est}); "
                  f"{info['uri']} points at it", highlight=False)


@app.command("export")
def export_cmd(model: str = typer.Argument(..., help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/FOLD_RUN/model "
                                           "or a training checkpoint directory."),
               fmt: str = typer.Option(..., "--format", help="onnx, torchscript (with WSInfer's config.json) or "
                                       "bioimageio (a BioImage Model Zoo package)."),
               out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
               fold: Optional[int] = typer.Option(None, help="Export this fold network alone (default: the whole "
                                                  "fold ensemble as one graph)."),
               sample: Optional[str] = typer.Option(None, help="Catalog whose colonies give the sample patches the "
                                                    "export is checked on (default: the model's data.catalog)."),
               tracking_uri: str = typer.Option("sqlite:///mlflow.db", help="MLflow tracking URI (for models:/, "
                                                "runs:/).")) -> None:
    """Write a trained model for other tools: ONNX, TorchScript (WSInfer, QuPath) or a
    bioimage.io package; each export is checked against the PyTorch model on real patches."""
    from ipb_ray.prediction.export import export_model
    from ipb_ray.tracking.registry import load_predictor

    with _user_errors():
        predictor = load_predictor(model, tracking_uri)
        result = export_model(predictor, fmt, out, fold=fold, sample=sample)
    console.print(f"{fmt}: the export reproduces the PyTorch model's probabilities to {result.max_abs_diff:.1e} "
                  "on the sample patches", highlight=False)
    for key, path in result.files.items():
        console.print(f"  {key}: {path}", highlight=False)


@app.command()
def predict(model: str = typer.Option(..., "--model", "-m", help="models:/NAME@ALIAS, models:/NAME/VERSION, "
                                      "runs:/FOLD_RUN/model or a training checkpoint directory."),
            frames: str = typer.Option(..., "--frames", "-f", help="Directory or glob of frames."),
            out: Path = typer.Option(..., "--out", "-o", help="Output directory (a rerun skips finished frames)."),
            annotations: Optional[str] = typer.Option(None, help="Annotation table (CSV/Parquet) as `ipb "
                                                      "preprocess` reads: labels kept beside the predictions; "
                                                      "columns well and time place each frame."),
            pattern: Optional[str] = typer.Option(None, help="Well and time point from each frame's file name, "
                                                  "e.g. '{well}_t{time}'."),
            workers: int = typer.Option(1, help="Classifying actors (each holds the model once)."),
            gpu: bool = typer.Option(False, "--gpu", help="GPU actors, when the cluster has GPUs."),
            batch_size: int = typer.Option(64, help="Colonies per inference batch."),
            suggest: int = typer.Option(0, help="Write the N unlabelled colonies most worth labelling next."),
            overlays: int = typer.Option(4, help="Frames drawn with their colonies outlined."),
            tracking_uri: str = typer.Option("sqlite:///mlflow.db", help="MLflow tracking URI (for models:/, runs:/)."),
            config: Optional[Path] = CONFIG_OPT, preset: Optional[str] = PRESET_OPT,
            overrides: Optional[List[str]] = OVERRIDES_ARG) -> None:
    """Apply a model to new frames on Ray: segment, classify every colony, write Parquet,
    per-frame and per-well tables, time courses, overlays and an HTML page."""
    from ipb_ray.cluster.paths import check_cluster_paths, check_output_dir
    from ipb_ray.distributed.predict import run_predict
    from ipb_ray.tracking.registry import load_predictor

    with _user_errors():
        cfg = _resolve(config, preset, overrides)
        frames_root = frames if Path(frames).is_dir() else str(Path(frames).parent)
        check_cluster_paths(cfg, {"--out": str(out), "--frames": frames_root}, catalog=False, storage=False,
                            connected=False)
        check_output_dir(out)
        predictor = load_predictor(model, tracking_uri)
        with _progress() as bar:
            task = bar.add_task("predicting frames", total=None)
            summary = run_predict(predictor, frames, out, annotations=annotations, pattern=pattern, cfg=cfg,
                                  workers=workers, use_gpu=gpu, batch_size=batch_size, suggest=suggest,
                                  overlays=overlays, progress=lambda d, t: bar.update(task, completed=d, total=t))
    console.print(f"{summary.frames} frames ({summary.frames_skipped} already done), {summary.colonies} colonies, "
                  f"{summary.rejects} rejects in {summary.seconds:.1f} s", highlight=False)
    for key in ("report", "colonies", "per_well", "suggestions", "rejects"):
        if key in summary.files:
            console.print(f"  {key}: {summary.files[key]}", highlight=False)


@app.command()
def tune(config: Optional[Path] = CONFIG_OPT, preset: Optional[str] = PRESET_OPT,
         overrides: Optional[List[str]] = OVERRIDES_ARG,
         space: Path = typer.Option(Path("tune/spaces/ipb.yaml"), "--space", help="Search space YAML."),
         trials: int = typer.Option(10, "--trials", help="Trials to run (added to the study with --resume)."),
         out: Path = typer.Option(Path("tune_results"), "--out", "-o", help="Study, Tune results and best.yaml."),
         objective: str = typer.Option("fold", help="fold: validation balanced accuracy on one fold (ASHA per "
                                       "epoch); kfold: the mean over --folds folds."),
         folds: int = typer.Option(3, help="Folds of the kfold objective."),
         fold: int = typer.Option(0, help="Fold of the fold objective."),
         resume: bool = typer.Option(False, "--resume", help="Add trials to the study in --out."),
         max_concurrent: Optional[int] = typer.Option(None, help="Trials at once (default: what the cluster holds)."),
         grace_period: int = typer.Option(1, help="ASHA: epochs (or folds) every trial gets."),
         top: int = typer.Option(5, help="Trials to list at the end."),
         address: Optional[str] = typer.Option(None, help="Ray cluster address; default starts a local cluster.")
         ) -> None:
    """Search hyperparameters with Ray Tune (Optuna TPE + ASHA), tracked in MLflow; writes the
    best configuration as a YAML that `ipb cv --config` takes."""
    from ipb_ray.cluster.paths import check_output_dir
    from ipb_ray.distributed.search import run_search

    extra = [f"resources.address={address}"] if address else []
    with _user_errors():
        cfg = _resolve(config, preset, list(overrides or []) + extra)
        check_output_dir(out)
        chosen = (fold,) if objective == "fold" else tuple(range(folds))
        result = run_search(cfg, space, trials, out=out, objective=objective, folds=chosen, resume=resume,
                            max_concurrent=max_concurrent, grace_period=grace_period)
        keys = sorted({k for r in result.trials for k in r["params"]})
        table = Table("objective", "epochs", *keys, title=f"top {top} trials of this run (objective: {objective})")
        ranked = sorted(result.trials, key=lambda r: -(r["objective"] if r["objective"] == r["objective"] else -1))
        for r in ranked[:top]:
            table.add_row(f"{r['objective']:.4f}", str(r["iterations"]),
                          *(f"{r['params'].get(k):.4g}" if isinstance(r["params"].get(k), float)
                            else str(r["params"].get(k)) for k in keys))
        console.print(table)
        if result.importances:
            imp = Table("parameter", "importance", title="parameter importances (Optuna, whole study)")
            for k, v in sorted(result.importances.items(), key=lambda kv: -kv[1]):
                imp.add_row(k, f"{v:.3f}")
            console.print(imp)
        console.print(f"best objective {result.best_value:.4f} with {result.best_params}", highlight=False)
        console.print(f"best config: {result.best_yaml}  ->  ipb cv --config {result.best_yaml}", highlight=False)
        console.print(f"Optuna study: {result.study_storage} (study 'ipb-search'); MLflow parent run "
                      f"{result.parent_run_id}", highlight=False)


# --------------------------------------------------------------------------- Ray jobs

jobs_app = typer.Typer(help="Ask about, follow and stop submitted Ray jobs (see `ipb submit`).",
                       no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
ADDRESS_OPT = typer.Option(None, "--address", "-a", help="The cluster's job API, e.g. http://127.0.0.1:8265 "
                           "(default: RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, or http://127.0.0.1:8265).")


def _job_address(address: Optional[str], check_token: bool = False) -> str:
    from ipb_ray.cluster.submit import TOKEN_OFF, address_warning, dashboard_address, requires_token

    url = dashboard_address(address)
    warning = address_warning(url)
    if check_token and requires_token(url) is False:
        warning = (warning + "\n" if warning else "") + TOKEN_OFF.format(address=url)
    if warning:
        err_console.print(f"[bold yellow]warning:[/] {warning}")
    return url


def _print_job_end(info: Any, job_id: str, full: bool = True) -> int:
    """Print the job's final status (and Ray's message unless it succeeded); the exit code.
    ``full=False``: the message's first line only (its log tail was just streamed)."""
    from ipb_ray.cluster.submit import status_name

    status = status_name(info)
    colour = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow"}.get(status, "white")
    console.print(f"job {job_id}: [bold {colour}]{status}[/]", highlight=False)
    if status != "SUCCEEDED" and info.message:
        message = info.message if full else info.message.splitlines()[0].split(", last available logs")[0]
        console.print(message, highlight=False, markup=False)
    return 0 if status == "SUCCEEDED" else 1


@app.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": False})
def submit(argv: List[str] = typer.Argument(..., help="The ipb command and its arguments, after --: "
                                            "preprocess, train, cv, tune or report.", show_default=False),
           address: Optional[str] = ADDRESS_OPT,
           working_dir: Optional[Path] = typer.Option(None, help="Project directory uploaded as the job's "
                                                      "working_dir (default: this project)."),
           with_deps: bool = typer.Option(False, "--with-deps", help="Also pip-install the project's requirements "
                                          "in the job (for nodes that lack them; slow on first use)."),
           python: str = typer.Option("python", help="Python on the cluster's nodes."),
           job_id: Optional[str] = typer.Option(None, "--job-id", help="Submission id (default: Ray's)."),
           wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the job's log until it ends."),
           timeout: Optional[float] = typer.Option(None, help="Stop following after this many seconds."),
           include: Optional[List[str]] = typer.Option(None, "--include", help="Upload files a default rule or "
                                                       ".gitignore leaves out (a shell pattern; repeatable)."),
           dry_run: bool = typer.Option(False, "--dry-run", help="List every file the job would upload, and "
                                        "submit nothing.")) -> None:
    """Run an ipb command on a Ray cluster as a Ray job, e.g.
    `ipb submit --address http://127.0.0.1:8265 -- cv --config my.yaml`.
    Prints what is uploaded (dotfiles, keys, credentials, data and results never are, unless
    --include names them), the submission id, streams the job's log and exits non-zero
    unless it SUCCEEDED."""
    from ipb_ray.cluster.submit import auth_errors, checked_upload, entrypoint, follow, submit as submit_job

    with _user_errors():
        entrypoint(argv)  # an unknown command fails before anything is read
        upload = checked_upload(working_dir, include or ())
        if dry_run:
            for rel, size in upload.files:
                console.print(f"{size:>12,d}  {rel}", highlight=False, markup=False)
            console.print(upload.summary(limit=1000), highlight=False, markup=False)
            return
        console.print(upload.summary(), highlight=False, markup=False)
        url = _job_address(address, check_token=True)
        with auth_errors(url):
            sid = submit_job(url, argv, with_deps=with_deps, python=python, submission_id=job_id, upload=upload)
    console.print(f"submitted job [bold]{sid}[/] to {url}", highlight=False)
    console.print(f"  status: ipb jobs status {sid} --address {url}\n  logs:   ipb jobs logs {sid} --address {url}"
                  f" --follow\n  stop:   ipb jobs stop {sid} --address {url}", highlight=False)
    if not wait:
        return
    try:
        info = follow(url, sid, lambda text: print(text, end="", flush=True), timeout_s=timeout)
    except KeyboardInterrupt:
        err_console.print(f"stopped following; job {sid} keeps running (ipb jobs stop {sid} to stop it)")
        raise typer.Exit(code=130) from None
    except TimeoutError as exc:
        err_console.print(f"[bold yellow]{exc}[/]")
        raise typer.Exit(code=124) from None
    raise typer.Exit(code=_print_job_end(info, sid, full=False))


@app.command("local-cluster")
def local_cluster(workers: int = typer.Option(1, help="Worker nodes besides the head."),
                  cpus: int = typer.Option(2, help="Logical CPUs per node."),
                  work_dir: Path = typer.Option(Path("local-cluster"), "--dir", help="Logs and the MLflow store."),
                  mlflow: bool = typer.Option(True, "--mlflow/--no-mlflow", help="Also start an MLflow server.")
                  ) -> None:
    """Rehearse a cluster run on this machine: a Ray head and worker nodes (each its own
    `ray start`, all on 127.0.0.1) and an MLflow server; Ctrl-C stops them all."""
    from ipb_ray.cluster.local import LocalCluster

    work = work_dir.resolve()
    with _user_errors(), LocalCluster(work, workers=workers, cpus=cpus, mlflow=mlflow) as c:
        console.print(f"[green]Ray cluster up[/]: head + {workers} worker node(s), {cpus} CPUs each", highlight=False)
        listening, exposed = c.listening(), c.exposed()
        if exposed:
            err_console.print("[bold yellow]warning:[/] listening beyond 127.0.0.1: " + ", ".join(
                f"{name} {ip}:{port}" for name, ip, port in exposed), highlight=False)
        else:
            console.print(f"  all {len(listening)} listening ports (Ray, its agents, MLflow) are on 127.0.0.1 only",
                          highlight=False)
        console.print(f"  job API and dashboard: {c.address}\n  GCS (ray start --address, ipb --address): "
                      f"{c.gcs_address}" + (f"\n  MLflow server: {c.mlflow_uri}" if mlflow else ""), highlight=False)
        tracking = f" tracking.tracking_uri={c.mlflow_uri}" if mlflow else ""
        console.print(f"try, in another shell:\n  ipb submit --address {c.address} -- cv --preset demo "
                      f"data.catalog=$PWD/demo/catalog tracking.storage_path={work / 'ray_results'}{tracking}\n"
                      f"  ipb jobs list --address {c.address}\nCtrl-C stops the cluster "
                      f"(logs in {work}).", highlight=False, markup=False)
        try:
            while all(p.poll() is None for p in c.procs):
                time.sleep(1.0)
            err_console.print(f"[bold red]a node or the MLflow server exited[/]; logs in {work}")
        except KeyboardInterrupt:
            console.print("stopping the cluster")


@jobs_app.command("status")
def jobs_status(job_id: str = typer.Argument(..., help="Submission id."), address: Optional[str] = ADDRESS_OPT
                ) -> None:
    """A job's status, entrypoint, times and (when it ended badly) Ray's message; exit 1 if it FAILED or STOPPED."""
    from ipb_ray.cluster.submit import job_info, status_name

    with _user_errors():
        info = job_info(_job_address(address), job_id)
    console.print(f"entrypoint: {info.entrypoint}", highlight=False, markup=False)
    for label, ms in (("started", info.start_time), ("ended", info.end_time)):
        if ms:
            console.print(f"{label}: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ms / 1000))}",
                          highlight=False)
    if status_name(info) in ("PENDING", "RUNNING"):
        console.print(f"job {job_id}: [bold]{status_name(info)}[/]", highlight=False)
        return
    raise typer.Exit(code=_print_job_end(info, job_id))


@jobs_app.command("logs")
def jobs_logs(job_id: str = typer.Argument(..., help="Submission id."), address: Optional[str] = ADDRESS_OPT,
              follow_log: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends.")
              ) -> None:
    """Print a job's log (the driver's output)."""
    from ipb_ray.cluster.submit import auth_errors, client, follow, job_info

    with _user_errors():
        url = _job_address(address)
        c = client(url)
        job_info(url, job_id, c)
        with auth_errors(url):
            if follow_log:
                info = follow(url, job_id, lambda t: print(t, end="", flush=True), c=c)
                raise typer.Exit(code=_print_job_end(info, job_id, full=False))
            print(c.get_job_logs(job_id), end="")


@jobs_app.command("stop")
def jobs_stop(job_id: str = typer.Argument(..., help="Submission id."), address: Optional[str] = ADDRESS_OPT,
              wait_s: float = typer.Option(30.0, "--wait", help="Seconds to wait for STOPPED.")) -> None:
    """Stop a running job and wait until Ray reports it stopped."""
    from ipb_ray.cluster.submit import TERMINAL, auth_errors, client, job_info, status_name

    with _user_errors():
        url = _job_address(address)
        c = client(url)
        job_info(url, job_id, c)
        with auth_errors(url):
            c.stop_job(job_id)
            t0 = time.monotonic()
            info = c.get_job_info(job_id)
            while status_name(info) not in TERMINAL and time.monotonic() - t0 < wait_s:
                time.sleep(0.5)
                info = c.get_job_info(job_id)
    console.print(f"job {job_id}: {status_name(info)}", highlight=False)


@jobs_app.command("list")
def jobs_list(address: Optional[str] = ADDRESS_OPT) -> None:
    """Submitted jobs, newest first."""
    from ipb_ray.cluster.submit import auth_errors, client, status_name

    with _user_errors():
        url = _job_address(address)
        with auth_errors(url):
            jobs = client(url).list_jobs()
    table = Table("submission id", "status", "started", "entrypoint")
    for j in sorted(jobs, key=lambda j: -(j.start_time or 0)):
        if not j.submission_id:
            continue  # drivers that were not submitted (e.g. `ipb cv --address ...`)
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(j.start_time / 1000)) if j.start_time else ""
        table.add_row(j.submission_id, status_name(j), started, j.entrypoint)
    console.print(table)


#: The demo's synthetic world: still imbalanced (Spread 3x Diff), but the rarest class has
#: enough colonies that every fold's L holds >= 2 and its T >= 3 of each class.
DEMO_WORLD = {"frames": 12, "colonies": 20,
              "class_weights": {"Spread": 0.36, "Dense": 0.18, "Debris": 0.16, "Diff": 0.12, "multi": 0.18}}

#: The methods the demo compares (the paper's Table 5 core), the baseline first.
DEMO_METHODS = ("supervised", "mpl", "ipb")


@app.command()
def demo(out: Path = typer.Option(Path("demo"), "--out", "-o", help="Working directory of the demo."),
         seed: int = typer.Option(0, help="Seed of the synthetic world and the run."),
         folds: int = typer.Option(3, help="Cross-validation folds per method (of the preset's 5)."),
         overrides: Optional[List[str]] = typer.Argument(
             None, help="Dotted overrides of the demo preset, e.g. method.epochs=8 (data.*, name, seed and "
                        "tracking.* are the demo's own).", show_default=False)) -> None:
    """Run the demo: a synthetic world, its catalog and folds, a patch stream, then a small
    cross-validation of the supervised baseline, MPL and IPB, tracked in MLflow, compared,
    and rendered as a report."""
    t0 = time.perf_counter()
    from ipb_ray.cluster.paths import check_output_dir

    with _user_errors():
        world = out / "world"
        cfg = cfgmod.load_config(preset="demo", overrides=_demo_overrides(seed, world, out, overrides))
        check_output_dir(out)
        console.rule("[bold]1. synthetic colony world")
        _synth_world(world, frames=DEMO_WORLD["frames"], size=1024, colonies=DEMO_WORLD["colonies"], scale=0.4,
                     seed=seed, image_format="tif", class_weights=DEMO_WORLD["class_weights"])
        console.rule("[bold]2. colony catalog and folds on Ray Data")
        _preprocess(cfg, "auto", None, overwrite=True)  # the demo owns its folder
        console.rule("[bold]3. patch stream of fold 0 (labelled L, augmented) on Ray Data")
        _demo_stream(cfg, out)
        results = {}
        from ipb_ray.methods import get_method

        for step, method in enumerate(DEMO_METHODS, start=4):
            console.rule(f"[bold]{step}. {method}: {get_method(method).title}: {folds}-fold cross-validation "
                         "(Ray Train, MLflow)")
            run = _cv_one(cfg.replace(f"method.name={method}"), list(range(folds)), None, True)
            results[method] = run
        console.rule("[bold]7. comparison")
        _demo_compare(results, folds)
        console.rule("[bold]8. report")
        from ipb_ray.tracking.report import render_report

        paths = render_report(cfg.tracking.tracking_uri, cfg.tracking.experiment, out / "report")
    minutes = (time.perf_counter() - t0) / 60
    console.print(f"[green]demo finished in {minutes:.1f} min[/]: world in {world}, catalog in {out / 'catalog'}, "
                  f"patches in {out / 'patches.png'}, checkpoints in {out / 'ray_results'}.", highlight=False)
    console.print(f"report: {paths['html']} (open it in a browser)", highlight=False)
    console.print(f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {cfg.tracking.tracking_uri} --host 127.0.0.1",
                  highlight=False)


def _demo_compare(results: dict, folds: int) -> None:
    from ipb_ray.evaluation.stats import paired_tests

    table = Table("method", "macro TPR (mean ± std)", "worst-class TPR (mean)", "macro F1 (mean ± std)",
                  title=f"test folds 0..{folds - 1}: the three methods (compare RESULTS.md, demo-size rows)")
    for method, run in results.items():
        s = run.summary
        tprs = {c: v for c, v in s["tpr"]["mean"].items() if v == v}
        worst = min(tprs, key=tprs.get) if tprs else "-"
        table.add_row(method, f"{s['macro_tpr']['mean']:.4f} ± {s['macro_tpr']['std']:.4f}",
                      f"{tprs.get(worst, float('nan')):.4f} ({worst})",
                      f"{s['macro_f1']['mean']:.4f} ± {s['macro_f1']['std']:.4f}")
    console.print(table)
    baseline, *others = results
    base = results[baseline].reports
    for method in others:
        other = results[method].reports
        common = sorted(set(base) & set(other))
        if len(common) >= 2:
            print_paired(paired_tests([base[f] for f in common], [other[f] for f in common]), baseline, method)


DEMO_OWN_KEYS = ("data.", "tracking.", "name=", "seed=")
#: what the demo sets before the user's overrides (which may change it)
DEMO_DEFAULTS = ["resources.num_workers=0"]


def _demo_overrides(seed: int, world: Path, out: Path, extra: Optional[List[str]] = None) -> list[str]:
    """The demo's own keys (world, catalog, stores, seed) after the user's overrides, which
    may change training but not where the demo writes."""
    extra = list(extra or ())
    own = [o for o in extra if o.startswith(DEMO_OWN_KEYS)]
    if own:
        raise ValueError(f"ipb demo sets {', '.join(own)} itself; use --out and --seed, or run "
                        "`ipb synth`, `ipb preprocess` and `ipb cv` for your own data")
    # Ray Train's local mode unless the user asks for workers: the loop runs in this process
    # and a fold skips ~40 s of actor start-up on a 2-core laptop (BENCHMARKS.md)
    return DEMO_DEFAULTS + extra + [
        f"seed={seed}", f"name=demo-seed{seed}", f"data.frames={world}", "data.annotations=null",
        f"data.catalog={out / 'catalog'}", f"tracking.storage_path={out / 'ray_results'}",
        f"tracking.tracking_uri=sqlite:///{(out / 'mlflow.db').resolve()}"]


def _demo_stream(cfg: cfgmod.ExperimentConfig, out: Path) -> None:
    from ipb_ray.data import catalog as catmod
    from ipb_ray.data.folds import read_folds
    from ipb_ray.patches.geometry import PatchGeometry
    from ipb_ray.patches.core import StreamSpec
    from ipb_ray.distributed.streams import patch_dataset, torch_batches
    from ipb_ray.tracking.viz import save_patch_grid

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


#: What a command keeps when it is interrupted, and how to go on.
RESUME_HINTS = {
    "preprocess": "rerun the same command to resume: finished shards are kept",
    "train": "rerun the same command to resume from the run's last checkpoint",
    "cv": "rerun the same command to resume: finished folds are kept, a running fold restarts from its checkpoint",
    "predict": "rerun the same command to resume: finished frames are skipped",
    "tune": "rerun it with --resume to add trials to the same study",
    "demo": "rerun `ipb demo` to start it again",
}


def interrupt_hint(argv: Sequence[str]) -> str | None:
    """The line printed on Ctrl-C for the command in ``argv`` (None for the others)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    hint = RESUME_HINTS.get(command or "")
    return f"interrupted; {hint}" if hint else None


def _install_interrupt_hint(argv: Sequence[str]) -> None:
    import signal

    hint = interrupt_hint(argv)
    if hint is None or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return

    def on_interrupt(signum, frame):  # noqa: ARG001 - the signal API
        print(f"\n{hint}", file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)


def main(argv: Optional[Sequence[str]] = None, prog_name: Optional[str] = None) -> None:
    """The ``ipb`` console script (and, with ``argv``, the Ray job entrypoints in jobs/)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv is None:  # the console script: say how to resume after Ctrl-C
        _install_interrupt_hint(sys.argv[1:])
    # MLflow's database set-up chatter on a new tracking store (MLflow reads this at import)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    app(args=None if argv is None else list(argv), prog_name=prog_name)


if __name__ == "__main__":
    main()
