"""Run by tests/test_vllm.py with the vLLM environment's Python (vLLM pins transformers < 5.20, so it
lives in its own virtual environment, `make vllm-install`): serve each model in vLLM, greedy-decode the
prompts and score them, and write what vLLM produced as JSON. The test compares it with
`bltool.load_model(...)` in the project's environment.

    python tests/vllm_generate.py SPEC.json OUT.json

SPEC: {"models": [dir, ...], "prompts": [[token id, ...], ...], "max_tokens": N}
OUT:  {dir: {"architecture": str, "tokens": [[id, ...] per prompt], "prompt_logprobs": [[float, ...]]}}
"""

import gc
import json
import sys


def serve(path: str, prompts: list[list[int]], max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype="float32", max_model_len=256, max_num_seqs=8, seed=0, enforce_eager=True,
              enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                            prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    architecture = llm.llm_engine.model_config.architectures[0]
    result = {
        "architecture": architecture,
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        # prompt_logprobs[i] holds log p(prompt[i] | prompt[:i]) (None for i = 0)
        "prompt_logprobs": [[entry[p[i]].logprob for i, entry in enumerate(o.prompt_logprobs) if i > 0]
                            for p, o in zip(prompts, outputs)],
    }
    del llm
    gc.collect()
    return result


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    result = {path: serve(path, spec["prompts"], spec["max_tokens"]) for path in spec["models"]}
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM starts its engine in spawned processes, which import this file
    main()
