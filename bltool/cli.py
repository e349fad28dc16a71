"""The `bltool` command line: one thin command per stage.

Each command parses its options into the stage's frozen config, calls the stage's `run`, and prints
the path of what it wrote on stdout. Messages and progress go to stderr. Errors from the library
become one line on stderr and an exit code: 2 for bad input, 1 for a runtime failure.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bltool import __version__, ui
from bltool.errors import BltoolError

app = typer.Typer(
    name="bltool",
    help="Budgeted LoRA distillation: from a teacher LM to a student that is cheaper to serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _fail(message: str, code: int):
    ui.console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(code)


def stage_command(func):
    """Run a command body, turning library errors into one line on stderr and an exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except BltoolError as err:
            _fail(str(err), err.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)
        except MemoryError:
            _fail("out of memory; lower --batch-size", 1)
        except Exception as err:  # a bug, or a failure the library did not anticipate
            if os.environ.get("BLTOOL_DEBUG"):
                raise
            import torch

            if isinstance(err, torch.OutOfMemoryError):
                _fail("out of GPU memory; lower --batch-size or use --dtype bfloat16", 1)
            _fail(f"{type(err).__name__}: {err} (set BLTOOL_DEBUG=1 for the traceback)", 1)

    return wrapper


def _emit(path: Path) -> None:
    """The one line a command prints on stdout: the path of what it wrote."""
    typer.echo(str(path))


def _version(value: bool):
    if value:
        typer.echo(f"bltool {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
):
    """Budgeted LoRA distillation: from a teacher LM to a student that is cheaper to serve."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------------


@app.command()
@stage_command
def teachers(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """List known teacher aliases and whether each is available on this machine.

    Add your own in $BLTOOL_HOME/teachers.toml (or the file $BLTOOL_TEACHERS names), one per line:
    `1b = "/models/teacher-1b"` (a checkpoint directory or a .gguf file).
    """
    from bltool.stages import teachers as stage

    statuses = stage.run()
    if as_json:
        typer.echo(json.dumps([s.as_dict() for s in statuses], indent=2))
        return
    table = Table(title=f"teachers (registry: {stage.registry_file()})", title_justify="left")
    table.add_column("alias", no_wrap=True)
    for column in ("available", "converted", "source"):
        table.add_column(column)
    for s in statuses:
        converted = "-" if s.converted is None else ("yes" if s.converted else "on first use")
        table.add_row(s.name, "yes" if s.available else "[red]no[/red]", converted, s.target or "-")
    from rich.console import Console

    out = Console(soft_wrap=True)
    out.print(table)
    for s in statuses:
        if not s.available:
            out.print(f"{s.name}: not available; " + (f"install with `{s.install}`" if s.install else
                                                      f"its path is set in {s.origin}"), soft_wrap=True)


@app.command("prepare-data")
@stage_command
def prepare_data(
    inputs: Annotated[list[str], typer.Argument(
        help="Text files or directories of them, JSON Lines, Parquet, Arrow, or save_to_disk directories.",
        show_default=False)],
    tokenizer: Annotated[str, typer.Option(help="Model (path, .gguf or alias) whose tokenizer to use.")],
    out: Annotated[str, typer.Option(help="Output directory.")],
    heldout: Annotated[float, typer.Option(help="Fraction of documents held out (MD5 rule; paper 0.002).")] = 0.002,
    seq_len: Annotated[int, typer.Option(help="Packed sequence length.")] = 1024,
    glob: Annotated[str, typer.Option(help="Which files of an input directory are documents.")] = "**/*.txt",
    text_field: Annotated[str, typer.Option(help="Field/column holding the text.")] = "text",
    id_field: Annotated[str, typer.Option(
        help="Field/column with a document id, hashed for the split when present ('' for none).")] = "id",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
):
    """Split a corpus into train and held-out (MD5 rule), tokenize, and pack into Arrow sequences."""
    from bltool.stages.prepare_data import PrepareDataConfig, run

    config = PrepareDataConfig(
        inputs=tuple(inputs), tokenizer=tokenizer, out=out, heldout=heldout, seq_len=seq_len, glob=glob,
        text_field=text_field, id_field=id_field or None, overwrite=overwrite,
    )
    _emit(run(config))


@app.command("build-student")
@stage_command
def build_student(
    teacher: Annotated[str, typer.Option(help="Teacher model: checkpoint directory, .gguf file or alias.")],
    out: Annotated[str, typer.Option(help="Output directory (a Hugging Face checkpoint).")],
    layers: Annotated[int, typer.Option(help="Student depth: how many teacher layers to keep.")] = 6,
    mode: Annotated[str, typer.Option(help="Layer choice: first (truncated), middle, last or mixed.")] = "mixed",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
):
    """Make a student from chosen teacher layers (plus embeddings, final norm and LM head)."""
    from bltool.stages.build_student import BuildStudentConfig, run

    _emit(run(BuildStudentConfig(teacher=teacher, out=out, layers=layers, mode=mode, overwrite=overwrite)))


@app.command("eval-ppl")
@stage_command
def eval_ppl(
    model: Annotated[str, typer.Argument(help="Model: checkpoint directory, .gguf file or alias.", show_default=False)],
    data: Annotated[str, typer.Option(help="A prepare-data output directory.")],
    out: Annotated[str | None, typer.Option(help="Output directory [default: DATA/ppl/<model name>].",
                                            show_default=False)] = None,
    max_tokens: Annotated[int, typer.Option(help="Token budget (capped by the held-out split).")] = 10_000_000,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    dtype: Annotated[str, typer.Option(help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.")]
    = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    chunk: Annotated[int, typer.Option(help="Positions per LM-head chunk (bounds logits memory).")] = 256,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
):
    """Held-out perplexity and bits-per-byte, with the exact protocol recorded."""
    from bltool.stages.eval_ppl import EvalPplConfig, run

    config = EvalPplConfig(model=model, data=data, out=out, max_tokens=max_tokens, batch_size=batch_size,
                           dtype=dtype, device=device, chunk=chunk, overwrite=overwrite)
    _emit(run(config))


def main() -> None:
    app(prog_name="bltool")


if __name__ == "__main__":  # pragma: no cover
    main()
