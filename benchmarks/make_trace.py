"""Write a synthetic request trace with correlated prompt and output lengths (seeded, reproducible).

Lengths are log-normal with correlated logs (long prompts tend to ask for long answers), clipped to a
context budget: the shape `bltool capacity --workload` is meant to read from a real server's logs.

    python benchmarks/make_trace.py runs/trace.csv            # 2,000 requests, seed 0
    python benchmarks/make_trace.py runs/trace.csv --requests 5000 --seed 1 --correlation 0.8
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def make_trace(requests: int, seed: int, prompt_median: float, output_median: float, prompt_sigma: float,
               output_sigma: float, correlation: float, max_prompt: int, max_output: int):
    rng = np.random.default_rng(seed)
    cov = np.array([[1.0, correlation], [correlation, 1.0]])
    z = rng.normal(size=(requests, 2)) @ np.linalg.cholesky(cov).T  # (requests, 2), unit normals, corr ρ
    prompt = np.clip(np.rint(prompt_median * np.exp(prompt_sigma * z[:, 0])), 1, max_prompt).astype(int)
    output = np.clip(np.rint(output_median * np.exp(output_sigma * z[:, 1])), 1, max_output).astype(int)
    return prompt, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="CSV file to write (columns request_id, prompt_tokens, output_tokens)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-median", type=float, default=192)
    parser.add_argument("--output-median", type=float, default=48)
    parser.add_argument("--prompt-sigma", type=float, default=0.8)
    parser.add_argument("--output-sigma", type=float, default=0.7)
    parser.add_argument("--correlation", type=float, default=0.6, help="correlation of log lengths")
    parser.add_argument("--max-prompt", type=int, default=1536)
    parser.add_argument("--max-output", type=int, default=512)
    args = parser.parse_args()
    prompt, output = make_trace(args.requests, args.seed, args.prompt_median, args.output_median, args.prompt_sigma,
                                args.output_sigma, args.correlation, args.max_prompt, args.max_output)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["request_id", "prompt_tokens", "output_tokens"])
        writer.writerows(zip(range(len(prompt)), prompt.tolist(), output.tolist()))
    print(args.out)


if __name__ == "__main__":
    main()
