"""Run by tests/test_vllm.py with the vLLM environment's Python (vLLM pins transformers < 5.20, so it
lives in its own virtual environment, `make vllm-install`): serve each model in vLLM, greedy-decode the
prompts and score them, and write what vLLM produced as JSON. The test compares it with
`bltool.load_model(...)` in the project's environment.

    python tests/vllm_generate.py SPEC.json OUT.json

SPEC: {"models": [{"path": dir, "eager": bool}, ...], "prompts": [[token id, ...], ...], "max_tokens": N}
OUT:  {dir: {"architecture": str (config.json's), "model_class": str (the class vLLM instantiated, module-
      qualified), "projections": {module name: class name} (the decoder layers' fused and row-parallel
      projections as built), "stacked": {module name: [[low-rank part, ...], rows of its stacked down]} (each
      split fused group's parts whose down factors run as one GEMM), "tokens": [[id, ...] per prompt],
      "prompt_logprobs": [[float, ...]]}}

The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as bench-serving runs it), so the
model it built can be inspected directly (`LLM.apply_model`).
"""

import functools
import gc
import json
import os
import sys

from bltool.models.families import family_of


def built(model_type: str, model) -> dict:
    """The class vLLM instantiated, and the class of each decoder layer's fused and row-parallel projections
    (by the family table's names for `model_type`)."""
    family = family_of(model_type)
    names = [group.name for group in family.fused] + list(family.row_parallel)
    layers = model.get_submodule(family.layers)
    return {"model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "projections": {f"{family.layers}.{i}.{name}": type(layer.get_submodule(name)).__name__
                            for i, layer in enumerate(layers) for name in names},
            "stacked": {f"{family.layers}.{i}.{group.name}": [parts.lowrank, parts.down.output_size]
                        for i, layer in enumerate(layers) for group in family.fused
                        if hasattr(parts := layer.get_submodule(group.name), "lowrank")}}


def serve(path: str, eager: bool, prompts: list[list[int]], max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype="float32", max_model_len=256, max_num_seqs=8, seed=0, enforce_eager=eager,
              enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                            prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    model_type = json.load(open(os.path.join(path, "config.json")))["model_type"]
    (inspected,) = llm.apply_model(functools.partial(built, model_type))
    result = {
        "architecture": llm.llm_engine.model_config.architectures[0],
        **inspected,
        "eager": llm.llm_engine.vllm_config.model_config.enforce_eager,
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        # prompt_logprobs[i] holds log p(prompt[i] | prompt[:i]) (None for i = 0)
        "prompt_logprobs": [[entry[p[i]].logprob for i, entry in enumerate(o.prompt_logprobs) if i > 0]
                            for p, o in zip(prompts, outputs)],
    }
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    spec = json.load(open(sys.argv[1]))
    result = {m["path"]: serve(m["path"], m["eager"], spec["prompts"], spec["max_tokens"]) for m in spec["models"]}
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM may start engine processes by spawning, which import this file
    main()
