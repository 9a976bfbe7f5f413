"""The `edgekd` command: each command parses its options, calls one library function, and prints.

Errors the user can fix are printed as one line (`error: ...`) with exit code 2; set EDGEKD_DEBUG=1 for
the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from edgekd.engines.registry import QUANT_SCHEMES
from edgekd.errors import EdgekdError
from edgekd.recipe import load_recipe
from edgekd.tasks import of_recipe

DEVICE = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                      help="Where training runs (the teacher too).")
OUT = click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                   help="Run folder to write into.")
QUIET = click.option("--quiet", is_flag=True, help="No progress bars.")
REUSE_TEACHER = click.option("--reuse-teacher", is_flag=True,
                             help="Use OUT/teacher.safetensors as it is even when it was trained with another "
                                  "[data]/[teacher] section (by default that is refused).")
RESUME = click.option("--resume", is_flag=True, help="Continue a killed run from OUT/checkpoints/ and skip the "
                      "models already trained.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgekd")
def cli() -> None:
    """Distill a large model into a small one, quantize it, and build and profile engines for edge targets."""


def _training_command(fn: Any) -> click.Command:
    """A training stage's command: RECIPE, --out, --device, --quiet and --resume, then its own options."""
    for decorate in (RESUME, QUIET, DEVICE, OUT, click.argument("recipe")):
        fn = decorate(fn)
    return cli.command()(fn)


@_training_command
def teacher(recipe: str, out: Path, device: str, quiet: bool, resume: bool) -> None:
    """Train the teacher on the task (fine-tune it when [teacher].checkpoint is set).

    RECIPE is a TOML file, or the built-in name 'digits'.
    """
    from edgekd.distillation import metrics_table, train_teacher
    from edgekd.distributed import is_main

    loaded = load_recipe(recipe)
    task = of_recipe(loaded)
    if task.teacher_command is not None:   # a task that trains its own way
        click.echo(task.teacher_command(loaded, out, progress=not quiet))
        return
    metrics = train_teacher(loaded, out, device=device, progress=not quiet, resume=resume)
    if not is_main():   # under torchrun only rank 0 prints the table
        return
    click.echo(metrics_table(metrics))
    click.echo(f"\nwrote {out / 'teacher.safetensors'}")


@_training_command
@click.option("--labels", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Learn from what a black-box teacher said about the unlabelled pool (`edgekd label` output).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Offline KD from stored top-k teacher logits (`edgekd cache-teacher` output).")
@REUSE_TEACHER
def distill(recipe: str, out: Path, device: str, quiet: bool, resume: bool, labels: Path | None,
            cache: Path | None, reuse_teacher: bool) -> None:
    """Distill the student from the teacher, and train the same student from scratch as the baseline.

    Uses OUT/teacher.safetensors (or [teacher].checkpoint) when present, else trains the teacher first.
    """
    from edgekd.distillation import distill as run_distill
    from edgekd.distillation import metrics_table
    from edgekd.distributed import is_main

    if labels is not None and cache is not None:
        raise EdgekdError("--labels and --cache: pick one source of teacher outputs")
    loaded = load_recipe(recipe)
    task = of_recipe(loaded)
    if task.distill_command is not None:   # a task that trains its own way
        click.echo(task.distill_command(loaded, out, progress=not quiet))
        return
    metrics = run_distill(loaded, out, device=device, progress=not quiet, resume=resume, labels=labels,
                          cache=cache, reuse_teacher=reuse_teacher)
    if not is_main():   # under torchrun only rank 0 prints the table
        return
    click.echo(metrics_table(metrics))
    models = ",".join(m for m in ("student", "scratch") if (out / f"{m}.safetensors").is_file() and m in metrics)
    click.echo(f"\nwrote {out}/{{{models}}}.safetensors, metrics.json, recipe.toml")


@cli.command()
@click.argument("recipe")
@click.option("--teacher", "teacher_spec", required=True,
              help="A black-box teacher: model.onnx, teacher.safetensors (the recipe's [teacher] model), or "
                   "'cmd:program args' (reads in.npz, writes out.npz; see edgekd.teachers.CommandTeacher).")
@click.option("--pool", type=click.Path(path_type=Path), default=None,
              help="Unlabelled inputs (.npz with x, .npy, or a folder of images), raw like the training data; "
                   "default [data] unlabeled.")
@OUT
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--shard-size", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Report how many pseudo-labels a confidence threshold keeps per class.")
@click.option("--balance", is_flag=True, help="Report the effect of class-balancing the pseudo-labels.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="Seconds a 'cmd:' teacher may take per batch before its process group is killed.")
@QUIET
def label(recipe: str, teacher_spec: str, pool: Path | None, out: Path, top_k: int, temperature: float,
          shard_size: int, min_confidence: float, balance: bool, timeout: float, quiet: bool) -> None:
    """Label an unlabelled pool with a black-box teacher into resumable, checksummed shards."""
    from edgekd.distillation import label as run_label

    result = run_label(load_recipe(recipe), teacher_spec, out, pool=pool, top_k=top_k, temperature=temperature,
                       shard_size=shard_size, min_confidence=min_confidence, balance=balance, timeout_s=timeout,
                       progress=not quiet)
    m = result["manifest"]
    click.echo(result["table"])
    click.echo(f"\nwrote {out}: {m['samples']} samples in {len(m['shards'])} shards ({m['output_kind']})")


@cli.command("cache-teacher")
@click.argument("recipe")
@OUT
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Augmented epochs to precompute (one view per sample and epoch).")
@click.option("--augment", default="none", show_default=True, help="'none' or e.g. 'flip,shift=2,noise=0.05'.")
@click.option("--seed", type=int, default=0, show_default=True)
@DEVICE
@QUIET
def cache_teacher(recipe: str, out: Path, top_k: int, epochs: int, augment: str, seed: int, device: str,
                  quiet: bool) -> None:
    """Precompute the teacher's top-k logits (float16) for offline KD into OUT/teacher-cache."""
    from edgekd.distillation import cache_teacher as run_cache

    m = run_cache(load_recipe(recipe), out, top_k=top_k, epochs=epochs, augment=augment, seed=seed, device=device,
                  progress=not quiet)
    click.echo(f"wrote {out / 'teacher-cache'}: top-{m['top_k']} logits for {m['samples']} samples x "
               f"{m['epochs']} epoch(s), augment {m['augment']!r}; train with `edgekd distill --cache`")


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write the shards and descriptors into.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Samples per tar shard.")
def shards(folder: Path, out: Path, shard_size: int) -> None:
    """Write an image FOLDER as WebDataset tar shards + wids descriptors in OUT (a [data] source)."""
    from edgekd.shards import write_shards

    s = write_shards(folder, out, shard_size)
    parts = ", ".join(f"{name}: {v['samples']} samples in {v['shards']} shard(s)" for name, v in s["splits"].items())
    click.echo(f"wrote {out}: {len(s['classes'])} classes; {parts}; use [data] source = \"{out}\"")


RUN_DIR = click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
TARGET = click.option("--target", "target", default="x86-cpu-ort", show_default=True,
                      help="A target name from targets/ (see `edgekd targets`) or a path to a target .toml.")


@cli.command()
@RUN_DIR
@click.option("--model", type=click.Choice(["student", "teacher", "scratch"]), default="student", show_default=True)
def export(run_dir: Path, model: str) -> None:
    """Export a trained model of RUN_DIR to ONNX, checked, with parity against PyTorch on the test split."""
    from edgekd.pipeline import export as run_export

    result = run_export(run_dir, model)
    p = result["parity"]
    click.echo(f"wrote {result['path']} ({result['size_bytes'] / 1024:.1f} KiB)")
    figures = {"max_abs_diff": "max abs diff {:.2e}", "top1_agreement": "top-1 agreement {:.4f}",
               "min_cosine": "min cosine {:.4f}"}   # the task's parity figures (edgekd.tasks)
    click.echo(f"parity vs PyTorch on {p['samples']} test samples: "
               + ", ".join(figures[k].format(v) for k, v in p.items() if k in figures))


@cli.command()
@RUN_DIR
@TARGET
def build(run_dir: Path, target: str) -> None:
    """Build the engines a target asks for (teacher and student) into RUN_DIR/engines/<target>/: float engines,
    and int8 student engines from what `edgekd quantize` wrote for the target's scheme."""
    from edgekd.pipeline import build as run_build

    result = run_build(run_dir, target)
    scheme = result["quant_scheme"]
    for e in result["engines"]:
        quant = "" if e["quantization"] == "none" else f" ({e['quantization']}, scheme {scheme['scheme']}: " \
                                                       f"{scheme['reason']})"
        click.echo(f"built {e['model']} {e['precision']}{quant}: {e['path']}")
    for s in result["skipped"]:
        click.echo(f"skipped {s['model']} {s['precision']}: {s['reason']}")


@cli.command()
@RUN_DIR
@TARGET
@click.option("--quick", is_flag=True, help="Fewer timed runs (a smoke test, not a measurement).")
def profile(run_dir: Path, target: str, quick: bool) -> None:
    """Profile every engine built for a target: latency percentiles, throughput, memory, accuracy on the engine."""
    from edgekd.pipeline import profile as run_profile
    from edgekd.pipeline import report as run_report
    from edgekd.pipeline import run_task

    run_profile(run_dir, target, quick=quick)
    rep = run_report(run_dir)
    click.echo(run_task(run_dir).engines_table(rep["engines"]))
    if rep["headline"]:
        click.echo(f"\n{rep['headline']['text']}")


def _print_report(rep: dict, out: Path) -> None:
    click.echo((out / "report.md").read_text())   # what the report stage wrote, whatever the task
    pngs = [out / name for name in ("report.png", "report_batch.png", "report_classes.png") if (out / name).is_file()]
    png = "".join(f", {p}" for p in pngs)
    click.echo(f"wrote {out / 'report.json'}, {out / 'report.md'}{png}")


@cli.command()
@click.argument("recipe")
@OUT
@click.option("--target", "targets", multiple=True, help="Target name or .toml path; repeat for several "
              "(default: x86-cpu-ort).")
@DEVICE
@QUIET
@click.option("--resume", is_flag=True, help="Continue a run in OUT: skip the models already trained and the stages "
              "whose outputs are complete and newer than their inputs.")
@REUSE_TEACHER
def run(recipe: str, out: Path, targets: tuple[str, ...], device: str, quiet: bool, resume: bool,
        reuse_teacher: bool) -> None:
    """The whole pipeline: teacher, distill, export, quantize, build, profile, report.

    RECIPE is a TOML file, or the built-in name 'digits'.
    """
    from edgekd.pipeline import DEFAULT_TARGETS
    from edgekd.pipeline import run as run_pipeline

    rep = run_pipeline(load_recipe(recipe), out, targets=targets or DEFAULT_TARGETS, device=device,
                       progress=not quiet, resume=resume, reuse_teacher=reuse_teacher)
    _print_report(rep, out)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True)
@DEVICE
@QUIET
@click.pass_context
def demo(ctx: click.Context, out: Path, device: str, quiet: bool) -> None:
    """`run` on the built-in digits recipe for the x86-cpu-ort target (a couple of minutes on a laptop CPU)."""
    ctx.invoke(run, recipe="digits", out=out, device=device, quiet=quiet)


@cli.command()
@click.argument("recipe")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Manifest to write (.toml); the .npz lands beside it.")
@click.option("--samples", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--split", type=click.Choice(["train", "val", "unlabeled"]), default="train", show_default=True)
def calibrate(recipe: str, out: Path, samples: int, seed: int, split: str) -> None:
    """Build a calibration set and its manifest (source, split, count, seed, sha256) for PTQ."""
    from edgekd import calibration
    from edgekd.data import load_data

    r = load_recipe(recipe)
    manifest = calibration.write(out, load_data(r.data, r.base_dir), source=r.data.source, samples=samples,
                                 seed=seed, split=split)
    click.echo(f"wrote {out} and {out.with_suffix('.npz')}: {manifest['samples']} samples of "
               f"{tuple(manifest['input_shape'])} from the {split} split (seed {seed}), "
               f"sha256 {manifest['sha256'][:16]}")


@cli.command()
@RUN_DIR
@click.option("--mode", type=click.Choice(["ptq", "qat"]), default=None,
              help="PTQ only, or PTQ and quantization-aware distillation (default: the recipe's [quantize].mode).")
@TARGET
@DEVICE
@QUIET
def quantize(run_dir: Path, mode: str | None, target: str, device: str, quiet: bool) -> None:
    """Quantize RUN_DIR's student for a target's int8 scheme into Q/DQ ONNX, which `edgekd build` turns into int8
    engines."""
    from edgekd.pipeline import quantize as run_quantize

    _print_quantized(run_dir, run_quantize(run_dir, target=target, mode=mode, device=device, progress=not quiet))


def _print_quantized(run_dir: Path, result: dict) -> None:
    for kind, path in result["onnx"].items():
        accuracy = result["pytorch_accuracy"][kind]
        click.echo(f"{kind}: {path} (scheme {result['scheme']}, PyTorch accuracy {accuracy:.4f})")
    click.echo(f"next: `edgekd build {run_dir} --target ...` builds int8 engines from them")


@cli.command()
@RUN_DIR
@click.option("--scheme", type=click.Choice(QUANT_SCHEMES), default=None,
              help="Quantization scheme (a target's quant_scheme; default: x86-cpu-ort's for this CPU).")
@DEVICE
@QUIET
def qat(run_dir: Path, scheme: str | None, device: str, quiet: bool) -> None:
    """`quantize` by scheme name (the old name, kept for scripts): PTQ baseline and quantization-aware
    distillation of RUN_DIR's student, per its recipe's [quantize]."""
    from edgekd.pipeline import quantize as run_quantize

    _print_quantized(run_dir, run_quantize(run_dir, scheme, device=device, progress=not quiet))


@cli.command()
@RUN_DIR
def report(run_dir: Path) -> None:
    """Re-render report.json/.md/.png from a run folder's metrics and profiles."""
    from edgekd.pipeline import report as run_report

    _print_report(run_report(run_dir), run_dir)


@cli.command()
@click.argument("recipe")
@click.option("--target", default=None, help="Target name or .toml path (default: [size] target, x86-cpu-ort).")
@click.option("--budget-ms", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Latency budget in ms (default: [size] budget_ms).")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Batch size of the budget (default 1).")
@click.option("--metric", type=click.Choice(["p50", "p90", "p99"]), default=None, help="Latency percentile "
              "(default p50).")
@click.option("--margin", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Noise margin (default 0.05), widened to the noise the confirmation round measures: fits "
                   "at latency * (1 + margin) <= budget, over at latency >= budget * (1 + margin).")
@OUT
@click.option("--measurements", type=click.Path(path_type=Path), default=None,
              help="Profile results from the device (a results folder or .json) for a remote target.")
@click.option("--remote", is_flag=True, help="The target is another machine: write the candidate bundles and "
              "the device command instead of profiling here.")
@DEVICE
@QUIET
def size(recipe: str, target: str | None, budget_ms: float | None, batch: int | None, metric: str | None,
         margin: float | None, out: Path, measurements: Path | None, remote: bool, device: str, quiet: bool) -> None:
    """The most accurate student of the recipe's family that meets a latency budget measured on the target."""
    from edgekd.sizing import size as run_size
    from edgekd.sizing import size_config

    r = load_recipe(recipe)
    cfg = size_config(r, target=target, budget_ms=budget_ms, batch=batch, metric=metric, margin=margin)
    rep = run_size(r, out, cfg, measurements=measurements, remote=remote, device=device, progress=not quiet)
    if rep.get("status") == "needs measurements":
        click.echo(f"wrote {len(rep['bundles'])} candidate bundles to {rep['folder']}; on the device run:\n\n"
                   f"  {rep['command']}\n\nthen copy the results folder back and run:\n\n  {rep['then']}")
        return
    click.echo((out / "size-report.md").read_text())
    click.echo(f"wrote {out / 'size-report.json'}, {out / 'size-report.md'}, {out / 'size-report.png'}")


@cli.command()
def targets() -> None:
    """The target catalog (targets/*.toml)."""
    from tabulate import tabulate

    from edgekd.targets import list_targets, targets_dir

    rows = [[t.name, t.runtime, t.device, ",".join(t.precisions), t.quant_scheme, t.description]
            for t in list_targets()]
    headers = ["name", "runtime", "device", "precisions", "int8 scheme", "description"]
    click.echo(tabulate(rows, headers=headers, tablefmt="github", maxcolwidths=[None] * 5 + [60]))
    click.echo(f"\n({targets_dir()})")


@cli.command()
def doctor() -> None:
    """Which runtimes and devices work on this machine, and the CPU instruction sets int8 speed depends on."""
    from edgekd.engines import available_runtimes
    from edgekd.targets import ISA_FLAGS, cpu_flags, cpu_quant_scheme

    for name, status in available_runtimes().items():
        click.echo(f"{name:14s} {status}")
    cpu = cpu_flags()
    known = ISA_FLAGS.get(cpu["arch"], ())
    flags = ("unknown (no /proc/cpuinfo)" if cpu["flags"] is None else
             " ".join(f if f in cpu["flags"] else f"no-{f}" for f in known) or "(none tracked for this arch)")
    click.echo(f"{'cpu':14s} {cpu['arch']}: {flags}")
    scheme, reason = cpu_quant_scheme(cpu)
    click.echo(f"{'int8 scheme':14s} {scheme} for x86-cpu-ort (quant_scheme = \"auto\"): {reason}")


def _one_line(message: str) -> str:
    """Error messages are printed as one line, even when they quote a multi-line library message."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _error_line(e: Exception) -> str:
    """The one line an error the user can fix is printed as."""
    if isinstance(e, EdgekdError):
        return _one_line(str(e))
    if isinstance(e, MemoryError):
        return "out of memory; use a smaller model, batch_size or data subset ([data] train_samples)"
    # OSError: a read or write the OS refused where no stage expected it (full disk, read-only)
    return (f"{e.filename}: " if e.filename else "") + _one_line(e.strerror or str(e))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one clear line and exit code 2 for errors the user can fix."""
    from edgekd.fileio import exit_on_sigterm

    debug = os.environ.get("EDGEKD_DEBUG") == "1"
    try:
        with exit_on_sigterm():   # SIGTERM unwinds like Ctrl-C: temp files go, the run folder's lock is released
            cli.main(args=argv, prog_name="edgekd", standalone_mode=False)
    except (EdgekdError, OSError, MemoryError) as e:
        if debug:
            raise
        click.echo(f"error: {_error_line(e)}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:  # a bad option or argument: one line too, with where to look
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        click.echo(f"error: {_one_line(e.format_message())}{hint}", err=True)
        sys.exit(2 if e.exit_code in (1, 2) else e.exit_code)
    finally:
        if "torch" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    main()
