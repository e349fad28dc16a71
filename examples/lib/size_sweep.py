"""examples/gpu_sweep.sh's sizing, from its probe run: each sweep run's token budget and evaluation interval.

    python3 size_sweep.py PROBE_DISTILLED DATA SECONDS_PER_RUN MIN_TOKENS EVALS

prints "TOKENS EVAL_EVERY WORLD RATE STEP EPOCH": SECONDS_PER_RUN seconds at the probe's throughput (tokens/s
over every process), at least MIN_TOKENS, in whole optimizer steps of the probe's global batch (STEP tokens:
processes × batch × grad-accum × sequence length); EVAL_EVERY optimizer steps between held-out evaluations, EVALS
a run; WORLD the probe's processes; EPOCH the training split's tokens (a budget past it is warned about).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bltool.units import parse_count


def size(probe: dict, data: dict, seconds: float, min_tokens: int, evals: int) -> tuple[int, int, int, float, int, int]:
    rate = probe["training"]["tokens_per_s"]
    schedule = probe["schedule"]
    step = schedule["sequences_per_step"] * schedule["seq_len"]
    tokens = max(int(rate * seconds), min_tokens) // step * step
    epoch = data["splits"]["train"]["sequences"] * schedule["seq_len"]
    return tokens, max(1, tokens // step // evals), schedule["world_size"], rate, step, epoch


def main(argv: list[str]) -> None:
    probe = json.loads((Path(argv[0]) / "manifest.json").read_text())
    data = json.loads((Path(argv[1]) / "manifest.json").read_text())
    tokens, every, world, rate, step, epoch = size(probe, data, float(argv[2]), parse_count(argv[3], "MIN_TOKENS"),
                                                   int(argv[4]))
    if tokens > epoch:
        print(f"gpu-sweep: warning: {tokens} tokens per run pass one epoch of the training split ({epoch} tokens): "
              "the runs see sequences again; give a larger corpus or lower SECONDS_PER_RUN", file=sys.stderr)
    print(tokens, every, world, rate, step, epoch)


if __name__ == "__main__":
    main(sys.argv[1:])
