"""The `bltool` command line: one thin command per stage.

Each command parses its options into the stage's frozen config, calls the stage's `run`, and prints
the path of what it wrote on stdout. Messages and progress go to stderr. Errors from the library
become one line on stderr and an exit code: 2 for bad input, 1 for a runtime failure.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from bltool import __version__, options, ui
from bltool.configs import STAGE_CONFIGS
from bltool.errors import BltoolError, UsageError

app = typer.Typer(
    name="bltool",
    help="Budgeted LoRA distillation: from a teacher LM to a student that is cheaper to serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _error_line(message: str) -> None:
    ui.console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)


def _fail(message: str, code: int):
    _error_line(message)
    raise typer.Exit(code)


def _quiet_libraries() -> None:
    """No transformers warnings or hub progress bars in a command's output (set BLTOOL_DEBUG=1, or
    TRANSFORMERS_VERBOSITY yourself, to see them). Runs when a command starts, not at `--help`, so the
    CLI answers without importing transformers or torch."""
    if os.environ.get("BLTOOL_DEBUG"):
        return
    if "transformers" in sys.modules:  # already imported (e.g. bltool used from Python, then the CLI)
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def stage_command(func):
    """Run a command body, turning library errors into one line on stderr and an exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
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
    out = ui.make_console(stderr=False)
    out.print(table)
    for s in statuses:
        if not s.available:
            out.print(f"{s.name}: not available; " + (f"install with `{s.install}`" if s.install else
                                                      f"its path is set in {s.origin}"), soft_wrap=True)



# ---------------------------------------------------------------------------------------------------
# Stage commands: each one's options are its config class's fields (bltool.configs), built into a Typer
# signature here; `--config FILE` fills them from a TOML file or a manifest (flags given still win).

CONFIG_HELP = ("TOML file of options keyed by their flags' names (`batch-size = 4`), or a manifest.json of this "
               "command to replay its run (all but out, overwrite, resume, checkpoint-dir); flags given win.")


def _config_file(ctx: typer.Context, param, value: str | None):
    """Eager: read --config before the other options and make its values their defaults (click's default_map)."""
    if value is None:
        return value
    try:
        values = options.read_file(value, STAGE_CONFIGS[ctx.command.name], ctx.command.name)
    except UsageError as err:
        raise typer.BadParameter(str(err), ctx=ctx, param=param) from None
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _typer_parameter(leaf: options.Leaf) -> inspect.Parameter:
    spec = leaf.spec
    optional = leaf.default is None or (spec.multiple and not leaf.required)
    if spec.multiple:
        kind = list[str]
    elif spec.parser is not None:
        kind = str
    else:
        kind = leaf.type
    if optional and kind is not leaf.type:
        kind = kind | None
    if leaf.required:
        default = inspect.Parameter.empty
    elif spec.multiple:
        default = None
    else:
        default = spec.text if spec.text is not None else leaf.default
    info = (typer.Argument(help=spec.help, show_default=spec.show_default) if spec.argument else
            typer.Option(*spec.decls, help=spec.help, show_default=spec.show_default))
    return inspect.Parameter(leaf.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, info])


def _stage(name: str, doc: str, run: Callable[[Any], Path | None]) -> None:
    """Register `bltool NAME`: options from STAGE_CONFIGS[NAME], the config built from them, `run` called on it,
    the path it returns printed (None: a torchrun rank other than 0, which prints nothing)."""
    config_class = STAGE_CONFIGS[name]

    def command(**values):
        values.pop("config", None)
        path = run(options.build(config_class, values))
        if path is not None:
            _emit(path)

    parameters = [_typer_parameter(leaf) for leaf in options.leaves(config_class)]
    parameters.append(inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[str | None, typer.Option(help=CONFIG_HELP, is_eager=True, callback=_config_file,
                                                      metavar="FILE", show_default=False)]))
    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__name__ = command.__qualname__ = name.replace("-", "_")
    command.__doc__ = doc
    app.command(name)(stage_command(command))


def parse_config(argv: list[str]):
    """The config `bltool ARGV` would run its stage with, from the command line (and its --config), without
    running the stage: `parse_config(["distill", "--student", "s", ...])`."""
    name, *rest = argv
    command = typer.main.get_command(app).commands[name]
    with command.make_context(name, list(rest)) as ctx:
        values = {k: v for k, v in ctx.params.items() if k != "config"}
    return options.build(STAGE_CONFIGS[name], values)


def _runner(module: str) -> Callable[[Any], Path | None]:
    def run(config):
        return importlib.import_module(module).run(config)
    return run


_stage("prepare-data", "Split a corpus into train and held-out (MD5 rule), tokenize, and pack into Arrow sequences.",
       _runner("bltool.stages.prepare_data"))
_stage("build-student", "Make a student from chosen teacher layers (plus embeddings, final norm and LM head).",
       _runner("bltool.stages.build_student"))
_stage("eval-ppl", "Held-out perplexity and bits-per-byte, with the exact protocol recorded.",
       _runner("bltool.stages.eval_ppl"))
_stage("eval-icl", "In-context-learning probes: exact-match accuracy per task and seed, and the macro composite.",
       _runner("bltool.stages.eval_icl"))
_stage("eval-harness", "EleutherAI lm-evaluation-harness tasks on any model bltool names (needs `pip install "
                       "'bltool[harness]'`).", _runner("bltool.stages.eval_harness"))
_stage("distill", "Distil a student: kd-full, kd-lora or budgeted-lora (the budget controller). Runs under torchrun "
                  "too.", _runner("bltool.stages.distill"))
_stage("teacher-logits", "Store a teacher's top-k logits, or draws from it (--sample), for the sequences distillation "
                         "will read\n    (pay for the teacher once).\n\n    Runs under torchrun too (each process "
                         "computes its share); a killed run continues with --resume.",
       _runner("bltool.stages.teacher_logits"))
_stage("capacity", r"Serving plan under KV-cache memory: capacity M, E\[g], μ = M/(b̄·E\[g]), the bound that binds, "
                   "GPUs.", _runner("bltool.stages.capacity"))
_stage("compress", "Compress a distilled student into dense / low-rank linears (drop, SVD or keep by ρ).",
       _runner("bltool.stages.compress"))
_stage("bench", """Measured speedup of a compressed student against its dense baseline, per module and end to end,
    next to the MAC bound. (The serving measurements for `capacity` are `bltool bench-serving`.)""",
       _runner("bltool.stages.bench"))
_stage("bench-serving", "Measure continuous batching at saturation (b̄, prefill and decode tokens/s) for `bltool "
                        "capacity`.", _runner("bltool.stages.bench_serving"))
_stage("report", "Collect runs into the paper's Table 2 shape (Markdown, CSV, Arrow) with the frontier figures.",
       _runner("bltool.stages.report"))


def main() -> None:
    """The `bltool` entry point: a usage error (unknown flag, missing option, bad value) is one line on
    stderr naming the flag, exit 2, like every other bad input."""
    try:
        code = app(prog_name="bltool", standalone_mode=False)
    except Exception as err:  # click's UsageError / BadParameter (typer vendors click: matched by shape)
        ctx, message = getattr(err, "ctx", None), getattr(err, "format_message", None)
        if message is None or not hasattr(err, "exit_code"):
            raise
        if type(err).__name__ == "NoArgsIsHelpError":  # plain `bltool`: the help, as before
            typer.echo(message(), err=True)
        else:
            where = f" (`{ctx.command_path} --help`)" if ctx is not None else ""
            _error_line(" ".join(message().split()) + where)
        raise SystemExit(err.exit_code) from None
    raise SystemExit(code or 0)



if __name__ == "__main__":  # pragma: no cover
    main()
