"""eval-ppl: held-out perplexity and bits-per-byte (docs/method.md §6), with the standard error over the
held-out documents (or the windows, when the data does not mark its documents exactly; `bltool.eval.stats`).

The held-out split's packed windows are taken in file order until `--max-tokens` tokens. Writes into
`--out`: `result.json`, `result.arrow`, `windows.arrow` (Σ NLL, tokens and bytes per (window, document)
piece, so that `report` can compare two models scored on the same windows by their paired standard error)
and `manifest.json`.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from bltool import ui
from bltool.artifacts import Stage, atomic_output, check_output_dir, write_arrow, write_json, write_manifest
from bltool.configs import EvalPplConfig
from bltool.data.prepared import PreparedData
from bltool.errors import UsageError
from bltool.eval.nll import PieceCounter, document_separator, heldout_windows, token_nll
from bltool.eval.stats import WINDOWS, Pieces
from bltool.models.devices import resolve_device, resolve_dtype
from bltool.models.loading import (
    check_vocab_fits,
    load_model,
    load_tokenizer,
    model_content_hash,
    model_inputs,
    resolve_model,
    tokenizer_identity,
)

SE_RULE = ("delta method on the mean NLL, a ratio of sums over units: the held-out documents (null `document` "
           "in windows.arrow: not known; then the windows), se(ppl) = ppl * se(mean NLL); docs/method.md §6")


def _batches(windows, batch_size: int):
    batch = []
    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _collate(batch, pad_id: int, device: str):
    """Right-pad windows to one length: (B, T) ids and mask, and (B, T) byte counts."""
    length = max(len(ids) for ids, _ in batch)
    ids = np.full((len(batch), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), length), dtype=np.int64)
    nbytes = np.zeros((len(batch), length), dtype=np.int64)
    for row, (window_ids, window_bytes) in enumerate(batch):
        ids[row, : len(window_ids)] = window_ids
        mask[row, : len(window_ids)] = 1
        nbytes[row, : len(window_ids)] = window_bytes
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device), nbytes


def evaluate(model, data: PreparedData, config: EvalPplConfig, device: str) -> tuple[dict, Pieces]:
    """Σ NLL, tokens and bytes scored over the budgeted windows, the standard error of the perplexity, and
    the sums per (window, document) piece they come from (windows.arrow)."""
    pad_id = int(data.tokenizer["eos_token_id"])
    available = sum(len(ids) for ids, _ in heldout_windows(data, config.max_tokens))
    nll_sum, scored, scored_bytes, windows, window_tokens = 0.0, 0, 0, 0, 0
    counter = PieceCounter(document_separator(data))
    watch = ui.Stopwatch()
    with ui.token_progress() as progress:
        task = progress.add_task(Stage.EVAL_PPL, total=available, tokens=0)
        for batch in _batches(heldout_windows(data, config.max_tokens), config.batch_size):
            ids, mask, nbytes = _collate(batch, pad_id, device)
            nll = token_nll(model, ids, mask, chunk=config.chunk)  # (B, T-1) float32
            counter.add([window_ids for window_ids, _ in batch], nll, [window_bytes for _, window_bytes in batch])
            nll_sum += float(nll.double().sum())
            scored += int(mask[:, 1:].sum())
            scored_bytes += int(nbytes[:, 1:].sum())
            windows += len(batch)
            window_tokens += int(mask.sum())
            progress.update(task, advance=int(mask.sum()), tokens=window_tokens)
    seconds = watch.seconds
    if scored == 0:
        raise UsageError(f"--data: {data.path} has no held-out tokens to score")
    mean = nll_sum / scored
    pieces = counter.pieces()
    summary = pieces.summary()
    return {
        "perplexity": math.exp(mean),
        "bits_per_byte": nll_sum / (math.log(2) * scored_bytes) if scored_bytes else None,
        "mean_nll": mean,
        "nll_sum": nll_sum,
        "perplexity_se": summary["perplexity_se"],
        "mean_nll_se": summary["mean_nll_se"],
        "protocol": {
            "split": "heldout",
            "seq_len": data.seq_len,
            "windows": windows,
            "tokens_in_windows": window_tokens,
            "tokens_scored": scored,
            "bytes_scored": scored_bytes,
            "max_tokens": config.max_tokens,
            "rule": "non-overlapping windows in file order; the first token of each window is not scored",
            "se_unit": summary["se_unit"],
            "se_units": summary["se_units"],
            "se": SE_RULE,
        },
        "seconds": round(seconds, 3),
        "tokens_per_s": round(window_tokens / seconds, 1) if seconds > 0 else None,
    }, pieces


def default_out(config: EvalPplConfig, label: str) -> Path:
    return Path("ppl") / label


def run(config: EvalPplConfig) -> Path:
    data = PreparedData.open(Path(config.data))
    label = resolve_model(config.model, flag="MODEL", convert=False).label  # no GGUF converted before the check
    out = Path(config.out) if config.out else default_out(config, label)
    check_output_dir(out, config.overwrite, stage=Stage.EVAL_PPL,
                     inputs=[*model_inputs("MODEL", config.model), ("--data", config.data)])
    ref = resolve_model(config.model, flag="MODEL")
    tokenizer = load_tokenizer(ref)
    identity = tokenizer_identity(tokenizer)
    data.check_tokenizer(identity, what=config.model)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model = load_model(ref, dtype=dtype, device=device)
    check_vocab_fits(model.config, tokenizer, "MODEL")

    result, pieces = evaluate(model, data, config, device)
    result.update(
        model=config.model,
        model_path=str(ref.path),
        data=str(Path(config.data).absolute()),
        device=device,
        dtype=str(dtype).replace("torch.", ""),
        threads=torch.get_num_threads(),
    )
    with atomic_output(out, config.overwrite) as tmp:
        write_json(tmp / "result.json", result)
        row = {k: v for k, v in result.items() if k != "protocol"}
        row.update({f"protocol_{k}": v for k, v in result["protocol"].items()})
        write_arrow(tmp / "result.arrow", [row])
        write_arrow(tmp / WINDOWS, pieces.table())
        write_manifest(
            tmp,
            Stage.EVAL_PPL,
            config={**asdict(config), "out": str(out)},
            inputs=[{"role": "model", **ref.describe(), "content": model_content_hash(ref)}, data.ref()],
            result={k: result[k] for k in ("perplexity", "bits_per_byte", "mean_nll", "perplexity_se")},
        )
    p = result["protocol"]
    bpb = "n/a" if result["bits_per_byte"] is None else f"{result['bits_per_byte']:.4f}"  # no bytes scored
    rate = "n/a" if result["tokens_per_s"] is None else f"{result['tokens_per_s']:,.0f}"
    se = ("" if result["perplexity_se"] is None else
          f" ± {result['perplexity_se']:.3f} (se over {p['se_units']} {p['se_unit']})")
    ui.info(
        f"{config.model}: perplexity {result['perplexity']:.3f}{se}, bits/byte {bpb} "
        f"({p['tokens_scored']:,} tokens scored in {p['windows']} windows of ≤{p['seq_len']}; "
        f"{rate} tok/s on {device} {result['dtype']})"
    )
    return out

