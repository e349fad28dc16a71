"""Run by tests/test_vllm.py with the vLLM environment's Python: bltool's vLLM model for a compressed
student, built in this one process under emulated tensor and pipeline parallelism, against the same model
built unsharded; and what building it allocates.

    python tests/vllm_parallel.py STUDENT_DIR OUT.json

Emulation: vLLM's layers look up their tensor-parallel rank and world size, and their pipeline stage,
through `vllm.distributed.parallel_state`'s groups (`get_tp_group()`, `get_pp_group()`). This script puts
stand-in groups there, so that a model built with rank r of TP = 2 / stage s of PP = 2 is what that
rank's worker would build: vLLM's `make_layers` leaves the other stage's decoder layers `PPMissingLayer`,
and the model's own `load_weights` shards every checkpoint tensor through the layers' weight loaders. The
ranks' forward passes then run one after another, with an all-reduce that sums what the ranks pass it
(what `tensor_model_parallel_all_reduce` does across processes; see `on_ranks`); column-parallel outputs
are concatenated by hand. Attention kernels need an engine and are not run; every projection of every
decoder layer is (q/k/v, o, and the whole MLP: gate/up, activation, down).

OUT: {"class": str, "forms": {module: class}, "construction": {...}, "layouts": {"tp2": {...}, "pp2": {...},
      "tp2pp2": {...}} (each {"error": str} if it could not be built or run), "refused": str | None}
"""

import json
import sys
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

N_TOKENS = 5


class Group:
    """Stands in for a vLLM GroupCoordinator of `world_size` ranks, at the rank `at` last set."""

    def __init__(self, world_size: int):
        self.world_size, self.rank_in_group = world_size, 0
        self.reduce = lambda x: x  # set by `on_ranks` while the ranks run

    @property
    def rank(self) -> int:
        return self.rank_in_group

    @property
    def first_rank(self) -> int:
        return 0

    @property
    def last_rank(self) -> int:
        return self.world_size - 1

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(x)


@contextmanager
def emulated(tp: int, pp: int):
    """vLLM's TP and PP groups replaced by stand-ins of these sizes; yields them."""
    from vllm.distributed import parallel_state

    groups = Group(tp), Group(pp)
    saved = parallel_state._TP, parallel_state._PP
    parallel_state._TP, parallel_state._PP = groups
    try:
        yield groups
    finally:
        parallel_state._TP, parallel_state._PP = saved


def at(groups, tp_rank: int, pp_rank: int) -> None:
    groups[0].rank_in_group, groups[1].rank_in_group = tp_rank, pp_rank


def on_ranks(fn, groups, pp_rank: int) -> list:
    """fn(rank) for every TP rank, with the TP group's all-reduce summing what the ranks pass it. The ranks
    run one after another, so the sums are found pass by pass: pass k runs every rank with the sums of the
    first k all-reduce calls known (those calls return them) and records what each rank passes to call k
    (which returns its input unreduced); once no rank makes a call whose sum is unknown, the outputs are
    those of the ranks run together."""
    tp = groups[0]
    sums: list[torch.Tensor] = []
    while True:
        outs, passed = [], []
        for rank in range(tp.world_size):
            at(groups, rank, pp_rank)
            calls: list[torch.Tensor] = []

            def reduce(x, calls=calls):
                calls.append(x)
                return sums[len(calls) - 1] if len(calls) <= len(sums) else x

            tp.reduce = reduce
            outs.append(fn(rank))
            passed.append(calls)
        tp.reduce = lambda x: x
        if all(len(calls) == len(sums) for calls in passed):
            return outs
        sums.append(torch.stack([calls[len(sums)] for calls in passed]).sum(0))


class Construction(TorchDispatchMode):
    """What building a model creates: the bytes of every tensor an operator makes on a real device (outputs
    that alias no input), and every parameter a module registers, with the module that registered it."""

    def __init__(self):
        super().__init__()
        self.allocated, self.registered = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        for ret, value in zip(func._schema.returns, results):
            if ret.alias_info is None and isinstance(value, torch.Tensor) and value.device.type != "meta":
                self.allocated += value.numel() * value.element_size()
        return out

    def __enter__(self):
        self._hook = torch.nn.modules.module.register_module_parameter_registration_hook(
            lambda module, name, param: self.registered.append((module, name, param)))
        return super().__enter__()

    def __exit__(self, *exc):
        self._hook.remove()
        return super().__exit__(*exc)

    def summary(self, model) -> dict:
        """Bytes allocated; the decoder layers' parameters registered during construction, in bytes, and the
        names of those the built model does not hold (built, then thrown away)."""
        names = {id(m): n for n, m in model.named_modules()}
        kept = {id(p) for p in model.parameters()}
        registered, dropped = 0, []
        for module, name, param in self.registered:
            where = names.get(id(module), getattr(module, "prefix", type(module).__name__))
            if param is None or not where.startswith("model.layers."):
                continue
            registered += param.numel() * param.element_size()
            if id(param) not in kept:
                dropped.append(f"{where}.{name} {tuple(param.shape)}")
        layers = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
        return {"allocated_bytes": self.allocated, "layer_params_registered_bytes": registered,
                "layer_params_bytes": layers, "dropped": dropped}


def build(path: str, tp_rank: int = 0, pp_rank: int = 0, construction: Construction | None = None):
    """The model vLLM's worker at (tp_rank, pp_rank) builds and loads, its weights processed for the CPU;
    returns (model, names load_weights reported loaded). With `construction`, records what building it
    creates (before any weight is loaded)."""
    from safetensors.torch import load_file
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    config = EngineArgs(model=path, dtype="float32", max_model_len=256, enforce_eager=True,
                        seed=0).create_engine_config()
    with set_current_vllm_config(config), set_default_torch_dtype(torch.float32), torch.device("cpu"):
        if construction is not None:
            with construction:
                model = initialize_model(config)
            construction.result = construction.summary(model)
        else:
            model = initialize_model(config)
        loaded = model.load_weights(load_file(f"{path}/model.safetensors").items())
        process_weights_after_loading(model, config.model_config, torch.device("cpu"))
    return model.eval(), set(loaded)


def owned(model) -> list[int]:
    from vllm.model_executor.models.utils import PPMissingLayer

    return [i for i, layer in enumerate(model.model.layers) if not isinstance(layer, PPMissingLayer)]


def layer_diffs(ref, layers: list, tp: int, run, g: torch.Generator) -> dict[str, float]:
    """One decoder layer: `ref` unsharded, `layers[r]` TP rank r's, `run(fn)` fn(layer) on every rank
    (`on_ranks`). The largest difference per projection."""
    hidden = ref.input_layernorm.weight.shape[0]
    x = torch.randn(N_TOKENS, hidden, generator=g)
    # q/k/v: each rank computes its own heads; concatenated by hand, part by part
    q_size, kv_size = ref.self_attn.q_size, ref.self_attn.kv_size
    want = ref.self_attn.qkv_proj(x)[0].split([q_size, kv_size, kv_size], dim=-1)
    local = [out.split([layer.self_attn.q_size, layer.self_attn.kv_size, layer.self_attn.kv_size], dim=-1)
             for layer, out in zip(layers, run(lambda layer: layer.self_attn.qkv_proj(x)[0]))]
    qkv = max((torch.cat([chunks[part] for chunks in local], dim=-1) - want[part]).abs().max().item()
              for part in range(3))
    # o: each rank holds its heads' input columns; the all-reduce sums the partial results
    a = torch.randn(N_TOKENS, q_size, generator=g)
    want_o = ref.self_attn.o_proj(a)[0]
    heads = a.chunk(tp, dim=-1)
    outs = run(lambda layer: layer.self_attn.o_proj(heads[layers.index(layer)].contiguous())[0])
    o_proj = max((out - want_o).abs().max().item() for out in outs)
    # the MLP as vLLM runs it: gate/up, activation, down, all-reduce
    want_mlp = ref.mlp(x)
    mlp = max((out - want_mlp).abs().max().item() for out in run(lambda layer: layer.mlp(x)))
    return {"qkv": qkv, "o_proj": o_proj, "mlp": mlp}


def compare(path: str, reference, tp: int, pp: int) -> dict:
    """Build every (TP rank, PP stage) of the layout; for each stage's decoder layers, run each projection on
    every TP rank and reduce by hand; the largest difference from the unsharded model, and what each
    stage holds and loaded."""
    g = torch.Generator().manual_seed(1)
    diffs = {"qkv": 0.0, "o_proj": 0.0, "mlp": 0.0}
    stages = []
    with emulated(tp, pp) as groups, torch.no_grad():
        for pp_rank in range(pp):
            ranks = []
            for tp_rank in range(tp):
                at(groups, tp_rank, pp_rank)
                ranks.append(build(path, tp_rank, pp_rank))
            models = [m for m, _ in ranks]
            stages.append({"layers": owned(models[0]),
                           "all_loaded": all(loaded == {n for n, _ in m.named_parameters()} for m, loaded in ranks)})
            for i in stages[-1]["layers"]:
                layers = [m.model.layers[i] for m in models]

                def run(fn, layers=layers, pp_rank=pp_rank):
                    return on_ranks(lambda rank: fn(layers[rank]), groups, pp_rank)

                for kind, diff in layer_diffs(reference.model.layers[i], layers, tp, run, g).items():
                    diffs[kind] = max(diffs[kind], diff)
    return {"tp": tp, "pp": pp, "stages": stages, "max_abs_diff": diffs}


def forms(model) -> dict[str, str]:
    """{module name: class name} of every fused or row-parallel projection of the decoder layers."""
    names = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    return {f"model.layers.{i}.{n}": type(model.model.layers[i].get_submodule(n)).__name__
            for i in owned(model) for n in names}


def attempt(fn, *args) -> dict:
    """fn(*args), or {"error": ...} when building or running the layout fails (each test then names why)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"error": f"{type(e).__name__}: {e}"}


def main() -> None:
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.engine.arg_utils import EngineArgs

    path, out = sys.argv[1], sys.argv[2]
    # one real process group of one process: what vLLM's layers need beyond the TP and PP groups
    config = EngineArgs(model=path, dtype="float32", max_model_len=256, enforce_eager=True).create_engine_config()
    with set_current_vllm_config(config):
        parallel_state.init_distributed_environment(1, 0, "tcp://127.0.0.1:0", 0, "gloo")
        parallel_state.ensure_model_parallel_initialized(1, 1)

    construction = Construction()
    with emulated(1, 1):
        reference, loaded = build(path, construction=construction)
    result = {
        "class": type(reference).__name__,
        "forms": forms(reference),
        "construction": construction.result,
        "layouts": {name: attempt(compare, path, reference, tp, pp) for name, tp, pp in
                    (("tp2", 2, 1), ("pp2", 1, 2), ("tp2pp2", 2, 2))},
    }
    try:  # more TP ranks than KV heads: vLLM would replicate KV heads; the split q/k/v group refuses
        with emulated(4, 1):
            build(path)
        result["refused"] = None
    except ValueError as e:
        result["refused"] = str(e)
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
