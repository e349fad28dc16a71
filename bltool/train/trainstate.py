"""Training checkpoints that resume bit for bit, without pickle.

A checkpoint directory holds
- `trainable.safetensors`: the parameters that train (by name),
- `optimizer.safetensors`: the optimizer's per-parameter state tensors (`<index>.<key>`),
- `rng.safetensors`: the torch CPU (and CUDA) generator states of every rank,
- `state.json`: step, optimizer hyper-parameter groups, learning-rate scheduler, budget controller,
  compute meter, the per-step log so far, and the run's config,
and a manifest like every artifact. It is written atomically (a temporary sibling renamed into
place), so a run killed while saving keeps the previous checkpoint.

Restoring all of this makes a resumed run continue exactly as the uninterrupted one would have: on the
CPU the final weights are bitwise equal (tests/test_distill.py checks it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bltool.artifacts import Stage, atomic_output, read_manifest, write_json, write_manifest
from bltool.errors import ArtifactError


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (shared parameters appear once, under their first name)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"{index}.{key}"] = value
    return tensors, state["param_groups"]


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]):
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(rank_states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"rank{r}.{key}": value for r, states in enumerate(rank_states) for key, value in states.items()}


def local_rng_state() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_local_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor],
         state: dict[str, Any], config: dict[str, Any]) -> None:
    """Write a checkpoint atomically to `directory` (replacing the previous one)."""
    with atomic_output(Path(directory), overwrite=True, flag="--checkpoint-dir") as tmp:
        save_file({k: v.contiguous().cpu() for k, v in trainable_state(model).items()},
                  str(tmp / "trainable.safetensors"))
        tensors, groups = _optimizer_tensors(optimizer)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
        save_file({k: v.contiguous().cpu() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        write_json(tmp / "state.json", {**state, "param_groups": groups})
        write_manifest(tmp, Stage.DISTILL_CHECKPOINT, config=config, inputs=[], step=state["step"])


def load(directory: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state.json, trainable tensors, optimizer tensors, rng tensors) of a checkpoint, checked."""
    directory = Path(directory)
    read_manifest(directory, (Stage.DISTILL_CHECKPOINT,), "--checkpoint-dir")
    try:
        state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
        trainable = load_file(str(directory / "trainable.safetensors"))
        optim = load_file(str(directory / "optimizer.safetensors"))
        rng = load_file(str(directory / "rng.safetensors"))
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ArtifactError(f"--checkpoint-dir: {directory} is damaged ({err})") from None
    return state, trainable, optim, rng


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable: dict[str, torch.Tensor],
            optim: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Copy a checkpoint's trainable weights and optimizer state into a freshly built run."""
    expected = trainable_state(model)
    if set(expected) != set(trainable):
        missing = sorted(set(expected) - set(trainable))[:3]
        extra = sorted(set(trainable) - set(expected))[:3]
        raise ArtifactError(f"--checkpoint-dir: its trainable parameters do not match this run "
                            f"(missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in trainable:
                if trainable[name].shape != param.shape:
                    raise ArtifactError(f"--checkpoint-dir: {name} has shape {tuple(trainable[name].shape)}, "
                                        f"this run's is {tuple(param.shape)}")
                param.copy_(trainable[name])
    _restore_optimizer(optimizer, optim, groups)  # load_state_dict moves state to each parameter's device
