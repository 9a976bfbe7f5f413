"""The `edgekd` command: each command parses its options, calls one library function, and prints.

Errors the user can fix are printed as one line (`error: ...`) with exit code 2; set EDGEKD_DEBUG=1 for
the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from edgekd.errors import EdgekdError

DEVICE = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                      help="Where training runs (the teacher too).")
OUT = click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                   help="Run folder to write into.")
QUIET = click.option("--quiet", is_flag=True, help="No progress bars.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgekd")
def cli() -> None:
    """Distill a large model into a small one, quantize it, and build and profile engines for edge targets."""


@cli.command()
@click.argument("recipe")
@OUT
@DEVICE
@QUIET
def teacher(recipe: str, out: Path, device: str, quiet: bool) -> None:
    """Train the teacher on the task (fine-tune it when [teacher].checkpoint is set).

    RECIPE is a TOML file, or the built-in name 'digits'.
    """
    from edgekd.distillation import metrics_table, train_teacher
    from edgekd.recipe import load_recipe

    metrics = train_teacher(load_recipe(recipe), out, device=device, progress=not quiet)
    click.echo(metrics_table(metrics))
    click.echo(f"\nwrote {out / 'teacher.safetensors'}")


@cli.command()
@click.argument("recipe")
@OUT
@DEVICE
@QUIET
def distill(recipe: str, out: Path, device: str, quiet: bool) -> None:
    """Distill the student from the teacher, and train the same student from scratch as the baseline.

    Uses OUT/teacher.safetensors (or [teacher].checkpoint) when present, else trains the teacher first.
    """
    from edgekd.distillation import distill as run_distill
    from edgekd.distillation import metrics_table
    from edgekd.recipe import load_recipe

    metrics = run_distill(load_recipe(recipe), out, device=device, progress=not quiet)
    click.echo(metrics_table(metrics))
    click.echo(f"\nwrote {out}/{{student,scratch}}.safetensors, metrics.json, recipe.toml")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one clear line and exit code 2 for errors the user can fix."""
    debug = os.environ.get("EDGEKD_DEBUG") == "1"
    try:
        cli.main(args=argv, prog_name="edgekd", standalone_mode=False)
    except EdgekdError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if e.exit_code in (1, 2) else e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
