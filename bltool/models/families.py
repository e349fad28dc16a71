"""The model families bltool supports, one entry each; every per-family rule in the code is read from here.

A family is named by its `config.json` `model_type`. Its entry gives the class names (strings, resolved where
they are used, so that this module imports neither torch nor transformers), where its decoder layers sit,
its projections, the groups vLLM fuses, and which projections carry a bias. bltool's compressed form of a
family is the model type `bltool_lowrank_<model_type>` (bltool/adapt/lowrank_models.py). Adding a family
is one entry here plus its tests (README, "Adding a model family").
"""

from __future__ import annotations

from dataclasses import dataclass

from bltool.errors import UsageError

COMPRESSED_PREFIX = "bltool_lowrank_"


@dataclass(frozen=True)
class Fused:
    """A layer vLLM computes several projections with: its name in a decoder layer, the projections it holds
    in the order its forward splits the output, and the vLLM linear class that builds it."""

    name: str
    members: tuple[str, ...]
    vllm_linear: str


QKV = Fused("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "QKVParallelLinear")
GATE_UP = Fused("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"), "MergedColumnParallelLinear")
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    name: str  # class-name stem: transformers' <name>Config and <name>ForCausalLM, vLLM's <name>ForCausalLM
    vllm_module: str  # the vLLM module that defines <name>ForCausalLM
    layers: str = "model.layers"  # the decoder layers' ModuleList, as a dotted path (and state-dict prefix)
    attention: tuple[str, ...] = ATTENTION  # attention projections, relative to a decoder layer
    mlp: tuple[str, ...] = MLP  # MLP projections, relative to a decoder layer
    fused: tuple[Fused, ...] = (QKV, GATE_UP)  # column-parallel groups vLLM computes as one layer
    row_parallel: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")  # vLLM's RowParallelLinear layers
    biases: tuple[str, ...] = ()  # projections with a bias in the family's default configuration

    @property
    def projections(self) -> tuple[str, ...]:
        """Every linear projection of a decoder layer, in the layer's registration order."""
        return self.attention + self.mlp

    @property
    def targets(self) -> tuple[str, ...]:
        """The projections' attribute names (`--target-modules` names linears by attribute name)."""
        return tuple(p.rpartition(".")[2] for p in self.projections)

    @property
    def config_class(self) -> str:
        return f"{self.name}Config"

    @property
    def model_class(self) -> str:
        """transformers' causal-LM class; vLLM's class of the same name in `vllm_module`."""
        return f"{self.name}ForCausalLM"

    @property
    def compressed_type(self) -> str:
        return COMPRESSED_PREFIX + self.model_type

    @property
    def compressed_config_class(self) -> str:
        return f"BltoolLowRank{self.name}Config"

    @property
    def compressed_class(self) -> str:
        """The compressed form's architecture: its transformers class and its vLLM class."""
        return f"BltoolLowRank{self.name}ForCausalLM"


FAMILIES: dict[str, Family] = {family.model_type: family for family in (
    Family("llama", "Llama", "vllm.model_executor.models.llama"),
    Family("mistral", "Mistral", "vllm.model_executor.models.mistral"),
    Family("qwen2", "Qwen2", "vllm.model_executor.models.qwen2",
           biases=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Family("qwen3", "Qwen3", "vllm.model_executor.models.qwen3"),
)}
COMPRESSED_TYPES = tuple(family.compressed_type for family in FAMILIES.values())
# --target-modules' default: the projections every family has, in registration order
DEFAULT_TARGETS = tuple(t for t in next(iter(FAMILIES.values())).targets
                        if all(t in family.targets for family in FAMILIES.values()))


def compressed_family(model_type: str | None) -> Family | None:
    """`bltool_lowrank_llama` → the llama family; None for any other model type."""
    if model_type is None or not model_type.startswith(COMPRESSED_PREFIX):
        return None
    return FAMILIES.get(model_type[len(COMPRESSED_PREFIX):])


def family_of(model_type: str | None) -> Family | None:
    """The family of a plain (`llama`) or compressed (`bltool_lowrank_llama`) model type; None for others."""
    return FAMILIES.get(model_type) or compressed_family(model_type)  # type: ignore[arg-type]


def plain_type(model_type: str) -> str:
    """The plain model type a compressed one is of (`bltool_lowrank_llama` → `llama`); others unchanged."""
    family = compressed_family(model_type)
    return family.model_type if family else model_type


def unsupported(where: str, model_type, compressed: bool = True) -> UsageError:
    """The one-line refusal of a model of no family in the table."""
    forms = " (and bltool's compressed forms of them)" if compressed else ""
    return UsageError(f"{where} is a {model_type!r} model; supported: {', '.join(FAMILIES)}{forms}")


def family_for(model_type: str | None, where: str) -> Family:
    """The family of a plain or compressed model type, or the refusal naming `where` (a flag and a path)."""
    family = family_of(model_type)
    if family is None:
        raise unsupported(where, model_type)
    return family
