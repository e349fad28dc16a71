"""Serving engines: the server protocol `bench-serving`, `capacity --validate` and `bench --engine vllm` work
through, and the table of engines (transformers' continuous batching, vLLM), each with its page size and
how its server is made from bench-serving's settings and again from a bench-serving measurement. The
README's "Where to add a serving engine" says what a new one needs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol, runtime_checkable

import torch

from bltool.errors import UsageError
from bltool.models.loading import ModelRef, load_model, refuse_adapted
from bltool.serve.serving import ServedRun, ServingSettings, TransformersServer, kv_tokens_needed
from bltool.serve.simulator import ServerSpec
from bltool.serve.vllm_serving import VllmServer


@runtime_checkable
class Server(Protocol):
    """A continuous-batching server on one model: what `serving.measure` times (bench-serving) and
    `validation.measure_load` serves a workload on (capacity --validate)."""

    engine_name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def config(self) -> Any: ...  # the model's Hugging Face config (its KV shape)

    @property
    def scheduler(self) -> dict: ...  # {"type", "safety_margin": share of free pages kept from new admissions}

    def serve(self, prompts: list[list[int]], max_new_tokens: list[int] | int, *, kv_tokens: int,
              max_batch_tokens: int, max_requests: int, page_size: int,
              arrival_s: list[float] | None = None) -> ServedRun:
        """Each request generates exactly its `max_new_tokens`; every iteration recorded (`ServedRun`)."""

    def describe(self) -> dict: ...  # what result.json records about the engine (its name, versions)

    def close(self) -> None: ...  # free the model and the KV cache for the next server


class Engine(ABC):
    """One serving engine: its name (`--engine`), its page size, which models it serves, and how its server
    is made from bench-serving's settings and again from a bench-serving measurement."""

    name = ""

    def default_page_size(self, device: str) -> int:
        return 16

    def page_size(self, asked: int, device: str) -> int:
        """--page-size, or the engine's default on `device` (0 asks for it)."""
        return asked or self.default_page_size(device)

    def check_model(self, ref: ModelRef, flag: str) -> None:
        """Refuse, in one line, a model this engine cannot load (before any model loads); by default every
        model `bltool.load_model` loads is served."""
        return None

    @abstractmethod
    def server(self, ref: ModelRef, settings: ServingSettings, *, dtype: torch.dtype, device: str,
               eager: bool = False) -> Server:
        """The server bench-serving measures at `settings` (its page size resolved)."""

    @abstractmethod
    def measured_server(self, ref: ModelRef, measured: dict, spec: ServerSpec, longest: int) -> Server:
        """The server a bench-serving result (`measured`) measured, made again for capacity --validate with
        `spec`'s cache, token budget, sequence cap and pages; `longest` the longest request it will serve."""


class TransformersEngine(Engine):
    """transformers' continuous batching on `bltool.load_model`'s model (pages of 16 tokens)."""

    name = "transformers"

    def server(self, ref, settings, *, dtype, device, eager=False):
        return TransformersServer(load_model(ref, dtype=dtype, device=device))

    def measured_server(self, ref, measured, spec, longest):
        device = measured["device"]
        return TransformersServer(load_model(ref, dtype=getattr(torch, measured["dtype"]), device=device,
                                             flag="MODELS"))


class VllmEngine(Engine):
    """A vLLM engine (`vllm_serving.VllmServer`), its KV cache fixed when it is made. Pages of 16 tokens on CUDA
    and 128 on the CPU, whose attention kernels take multiples of 32 only (vLLM's own defaults)."""

    name = "vllm"

    def default_page_size(self, device: str) -> int:
        return 16 if device.startswith("cuda") else 128

    def page_size(self, asked: int, device: str) -> int:
        if asked and not device.startswith("cuda") and asked % 32:
            raise UsageError(f"--page-size: vLLM's CPU attention takes pages of a multiple of 32 tokens, got {asked}")
        return super().page_size(asked, device)

    def check_model(self, ref, flag):
        refuse_adapted(ref, flag, "vLLM")

    def server(self, ref, settings, *, dtype, device, eager=False):
        # the cache the largest of `serving.measure`'s runs asks for
        kv_tokens = kv_tokens_needed(settings)
        return VllmServer(ref.path, dtype=str(dtype).replace("torch.", ""), kv_tokens=kv_tokens,
                          max_batch_tokens=settings.concurrency + settings.chunk, max_requests=settings.concurrency,
                          page_size=settings.page_size, max_model_len=kv_tokens // settings.concurrency,
                          eager=eager, seed=settings.seed)

    def measured_server(self, ref, measured, spec, longest):
        max_model_len = -(-longest // spec.page_size) * spec.page_size
        return VllmServer(ref.path, dtype=measured["dtype"], kv_tokens=spec.kv_tokens,
                          max_batch_tokens=spec.max_batch_tokens, max_requests=spec.max_seqs, page_size=spec.page_size,
                          max_model_len=max_model_len, eager=bool(measured.get("eager", False)))


ENGINES: dict[str, Engine] = {engine.name: engine for engine in (TransformersEngine(), VllmEngine())}


def engine(name: str, flag: str = "--engine") -> Engine:
    """The engine named `name`, or a UsageError listing the table's engines."""
    try:
        return ENGINES[name]
    except KeyError:
        raise UsageError(f"{flag} must be one of {', '.join(ENGINES)}, got {name!r}") from None


def measured_engine(measured: dict) -> Engine:
    """The engine a bench-serving result measured (results from before --engine: transformers)."""
    return engine(measured.get("engine", "transformers"), "MODELS: the measured engine")
