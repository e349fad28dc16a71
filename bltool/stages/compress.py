"""compress: turn a distilled student into the model that is actually served (docs/method.md §5).

Takes the output of `bltool distill` for every method:
- kd-full        passes through (a plain dense student; nothing to compress),
- kd-lora        merges each LoRA module into its dense weight (W + (α/r)BA): the same cost as the
                 dense student, which the summary says,
- budgeted-lora  compresses each module into drop / SVD / keep from its final ρ (bltool.adapt.compression).

The output is a Hugging Face checkpoint (config, tokenizer, model.safetensors) whose adapted modules are
dense or two-factor low-rank linears; the manifest's `compressed` section lists each module's form, ρ,
kept LoRA rank, SVD rank, MACs and parameters, and `bltool.load_model` rebuilds it from there. With
`--densify` every low-rank layer is multiplied out, so any tool that reads dense Hugging Face weights
can load it, and the speedup is given up. The distill manifest's `compute` section is carried over so
that `bench` can report training compute next to inference speed.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from bltool import ui
from bltool.adapt.compression import (
    CompressionPolicy,
    compress_model,
    compressed_section,
    densify_model,
    merge_model,
    save_compressed,
)
from bltool.artifacts import Stage, artifact_ref, atomic_output, check_output_dir, read_manifest, write_manifest
from bltool.configs import CompressConfig
from bltool.errors import ArtifactError, UsageError
from bltool.models.loading import count_parameters, load_model, load_tokenizer, model_inputs, resolve_model
from bltool.train import methods

# What each compress action of a method (bltool.train.methods) does to the loaded model: its records.
ACTIONS = {
    methods.COPY: lambda model, policy: [],
    methods.MERGE: lambda model, policy: merge_model(model),
    methods.BY_RHO: compress_model,
}


def distill_method(manifest: dict, path: Path) -> methods.Method:
    """The training method, from the manifest's config, checked against its adapters section."""
    adapters = manifest.get("adapters")
    fitting = methods.from_adapters(adapters)
    name = (manifest.get("config") or {}).get("method") or None
    if name is None and len(fitting) == 1:
        return fitting[0]
    if name is None:
        raise ArtifactError(f"MODEL: {path}'s manifest names no method, and its adapters fit "
                            f"{' and '.join(m.name for m in fitting) or 'none'}")
    method = methods.find(name)
    if method is None:
        raise ArtifactError(f"MODEL: {path} was distilled with unknown method {name!r}")
    if method not in fitting:
        said = " or ".join(m.name for m in fitting) or "no method"
        raise ArtifactError(f"MODEL: {path}'s manifest says method {name!r} but its adapters say {said!r}")
    return method


def compression_policy(config: CompressConfig, default_tau_drop: float) -> CompressionPolicy:
    return CompressionPolicy(tau_rank=config.tau_rank,
                             tau_drop=config.tau_drop if config.tau_drop is not None else default_tau_drop,
                             tau_svd=config.tau_svd, k_max=config.k_max, dense_fallback=config.dense_fallback)


def run(config: CompressConfig) -> Path:
    out = Path(config.out)
    check_output_dir(out, config.overwrite, stage=Stage.COMPRESS, inputs=model_inputs("MODEL", config.model))
    path = Path(config.model)
    if not path.is_dir():
        raise UsageError(f"MODEL: {config.model} is not a directory; give the output of `bltool distill`")
    manifest = read_manifest(path, (Stage.DISTILL,), "MODEL")
    method = distill_method(manifest, path)
    policy = compression_policy(config, float((manifest.get("budget") or {}).get("tau_drop", 0.05)))
    ref = resolve_model(str(path), flag="MODEL")
    model = load_model(ref, flag="MODEL")
    tokenizer = load_tokenizer(ref, flag="MODEL")

    records = ACTIONS[method.compress](model, policy)
    speedup = compressed_section(method.name, policy, records, densified=False)["summary"]["mac_speedup"]
    if config.densify:
        records = densify_model(model, records)
    section = compressed_section(method.name, policy if method.compress == methods.BY_RHO else None, records,
                                 config.densify)
    summary = section["summary"]
    parameters = {"model": count_parameters(model),
                  "dense_model": count_parameters(model) - summary["params"] + summary["dense_params"],
                  "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}

    with atomic_output(out, config.overwrite) as tmp:
        save_compressed(tmp, model, tokenizer)
        write_manifest(
            tmp,
            Stage.COMPRESS,
            config={**asdict(replace(config, tau_drop=policy.tau_drop)), "out": str(out.absolute())},
            inputs=[artifact_ref(path, manifest, "model")],
            compressed=section,
            compute=manifest.get("compute"),
            parameters=parameters,
        )
    print_summary(config.model, section, parameters)
    if method.compress_note:
        ui.info(f"{method.name}: {method.compress_note}")
    if config.densify and speedup and speedup > 1.0:
        ui.warn(f"--densify: every module multiplied out into a dense linear; this gives up the {speedup:.2f}× "
                "MAC speedup of the low-rank forms (the weights still compute the compressed function)")
    return out


def print_summary(name: str, section: dict, parameters: dict) -> None:
    """The paper's Table 8 for this student (one column), on stderr."""
    from rich.table import Table

    s = section["summary"]
    title = f"compress {name}: {section['method']}{', densified' if section['densified'] else ''}"
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("quantity")
    table.add_column("value", justify="right")

    def fmt(value, spec, suffix=""):
        return "-" if value is None else format(value, spec) + suffix

    rows = [
        ("adapted modules", str(s["modules"])),
        ("dense kept", str(s["kept"])),
        ("SVD", str(s["svd"])),
        ("dropped", str(s["dropped"])),
        ("multiplied out (low rank cost more)", str(s["multiplied_out"])),
        ("average kept LoRA rank", fmt(s["average_kept_lora_rank"], ".1f")),
        ("average rank of low-rank modules", fmt(s["average_lowrank_rank"], ".1f")),
        ("MAC speedup (adapted modules)", fmt(s["mac_speedup"], ".2f", "×")),
        ("parameter reduction (adapted modules)", fmt(s["param_reduction"], ".1%")),
        ("model parameters (dense → now)", f"{parameters['dense_model']:,} → {parameters['model']:,}"),
    ]
    for row in rows:
        table.add_row(*row)
    ui.console.print(table)
    if s["multiplied_out"] and not section["densified"]:
        ui.info(f"{s['multiplied_out']} low-rank module(s) multiplied out into dense linears: their low-rank form "
                "would cost at least as many MACs as the dense matrix (--no-dense-fallback keeps them low-rank)")
