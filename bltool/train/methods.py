"""The distillation methods: one entry per `--method`, holding everything a stage needs to know about it.

`distill`, `compress`, `report` and the training-compute accounting read a method's fields and never
compare its name, so adding a method means one entry in `REGISTRY` and its tests (README, "Where to
add a method"). Free of torch, so that the CLI can validate `--method` without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass

from bltool.errors import UsageError
from bltool.train.accounting import ComputeProxy
from bltool.train.budget import BudgetController

# How `distill` makes the student trainable.
FULL = "full"  # every student weight trains, in float32
LORA = "lora"  # the student frozen in --dtype; LoRA trains on the target projections
GATED_LORA = "gated-lora"  # LoRA with per-rank gates, and a dense retention ρ per module (docs/method.md §2)
TRAINABLE = (FULL, LORA, GATED_LORA)

# What `compress` does with the method's output.
COPY = "copy"  # nothing to compress: the dense student is written as it is
MERGE = "merge"  # each LoRA module multiplied into its dense weight, W + (α/r)BA (saves nothing)
BY_RHO = "by-rho"  # each module dropped, SVD-compressed or kept dense from its final ρ (docs/method.md §5)
COMPRESS_ACTIONS = (COPY, MERGE, BY_RHO)


@dataclass(frozen=True)
class Method:
    name: str  # the --method value; manifests record it
    label: str  # how the report's figures name its runs
    default_lr: float  # peak learning rate when --lr is not given
    trainable: str  # one of TRAINABLE
    controller: type[BudgetController] | None  # steers ρ each step: built as controller(costs, budget, steps)
    compute: ComputeProxy  # its training-compute proxy (bltool.train.accounting)
    compress: str  # one of COMPRESS_ACTIONS
    compress_note: str | None  # what `compress` says after its summary
    color: str  # matplotlib colour of its runs in the report's figures
    takes_budget: bool  # --budget F is required with it (and refused without)
    baseline: bool  # the method the report's claims compare budgeted runs against

    def __post_init__(self):
        if self.trainable not in TRAINABLE:
            raise ValueError(f"method {self.name}: trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.compress not in COMPRESS_ACTIONS:
            raise ValueError(f"method {self.name}: compress must be one of {COMPRESS_ACTIONS}, got {self.compress!r}")
        if (self.compress == BY_RHO) != (self.trainable == GATED_LORA):
            raise ValueError(f"method {self.name}: compressing by ρ needs gated LoRA, and gated LoRA needs it")
        if (self.compress == COPY) != (self.trainable == FULL):
            raise ValueError(f"method {self.name}: only a full fine-tune is copied through compress")
        if self.takes_budget != (self.controller is not None):
            raise ValueError(f"method {self.name}: a budget controller and --budget go together")
        if self.compute.dense_passes != (3 if self.trainable == FULL else 2):
            raise ValueError(f"method {self.name}: the dense weights get a weight backward exactly when they train")
        if self.compute.scheduled != self.takes_budget:
            raise ValueError(f"method {self.name}: the dense cost follows the schedule exactly under --budget")

    @property
    def lora(self) -> bool:
        """The student is frozen and LoRA adapters train (and are saved with it)."""
        return self.trainable != FULL

    @property
    def gated(self) -> bool:
        return self.trainable == GATED_LORA


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method(name="kd-full", label="kd-full", default_lr=1e-4, trainable=FULL, controller=None,
           compute=ComputeProxy(dense_passes=3, scheduled=False), compress=COPY,
           compress_note="a dense student; nothing to compress, passed through unchanged",
           color="tab:red", takes_budget=False, baseline=False),
    Method(name="kd-lora", label="kd-lora", default_lr=3e-4, trainable=LORA, controller=None,
           compute=ComputeProxy(dense_passes=2, scheduled=False), compress=MERGE,
           compress_note="LoRA merged into the dense weights; this saves nothing (1.00× MACs): plain LoRA is "
                         "never cheaper than its base",
           color="tab:orange", takes_budget=False, baseline=True),
    Method(name="budgeted-lora", label="budgeted-lora", default_lr=3e-4, trainable=GATED_LORA,
           controller=BudgetController, compute=ComputeProxy(dense_passes=2, scheduled=True), compress=BY_RHO,
           compress_note=None, color="tab:blue", takes_budget=True, baseline=False),
)}
DEFAULT = "budgeted-lora"  # distill's --method when none is given


def names() -> str:
    """The registered names, for help text and errors: "kd-full, kd-lora or budgeted-lora"."""
    *rest, last = REGISTRY
    return f"{', '.join(rest)} or {last}" if rest else last


def get(name: str, flag: str = "--method") -> Method:
    """The method called `name`; an unknown name is a UsageError naming `flag` and the registered names."""
    if name not in REGISTRY:
        raise UsageError(f"{flag} must be one of {', '.join(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def find(name: str | None) -> Method | None:
    """The method called `name`, or None for a name that is not one (a report row of the teacher, say)."""
    return REGISTRY.get(name) if name is not None else None


def budgeted() -> list[Method]:
    return [m for m in REGISTRY.values() if m.takes_budget]


def baseline() -> Method:
    """The method whose runs the report's claims compare budgeted runs against."""
    return next(m for m in REGISTRY.values() if m.baseline)


def from_adapters(adapters: dict | None) -> list[Method]:
    """The methods whose output carries these adapters (a distill manifest's `adapters` section)."""
    return [m for m in REGISTRY.values() if m.lora == bool(adapters) and m.gated == bool((adapters or {}).get("gated"))]
