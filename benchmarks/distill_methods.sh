#!/usr/bin/env bash
# Distillation throughput, peak memory and training compute of the three methods on the demo setting
# (SmolLM2-135M teacher, Python 3.11 docs, 6-layer mixed student), with the live teacher and with a
# teacher-logits cache. Prints one line per run from each run's manifest; /usr/bin/time gives the
# process's peak resident set (the manifest records it too).
#   bash benchmarks/distill_methods.sh DATA STUDENT OUT_DIR [TOKENS] [BATCH]
# TEACHER (default smollm2-135m, or the site's BLTOOL_TEACHER: examples/lib/site.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../examples/lib/site.sh"
data=$1; student=$2; out=$3; tokens=${4:-30720}; batch=${5:-1}
teacher=${TEACHER:-${BLTOOL_TEACHER:-smollm2-135m}}
mkdir -p "$out"
run() {  # name, then distill flags
  local name=$1; shift
  /usr/bin/time -f "%M" -o "$out/$name.maxrss" bltool distill --student "$student" --data "$data" \
    --tokens "$tokens" --batch-size "$batch" --out "$out/$name" --overwrite "$@" >/dev/null
}
run kd-full --teacher "$teacher" --method kd-full
run kd-lora --teacher "$teacher" --method kd-lora
run bl-0.4 --teacher "$teacher" --method budgeted-lora --budget 0.4
cache=$(bltool teacher-logits --teacher "$teacher" --data "$data" --tokens "$tokens" --out "$out/cache" --overwrite)
run bl-0.4-cached --teacher-logits "$cache" --method budgeted-lora --budget 0.4
run kd-lora-cached --teacher-logits "$cache" --method kd-lora
python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
cache = json.loads((out / "cache" / "manifest.json").read_text())["timing"]
print(f"teacher-logits: {cache['tokens_per_s']:,.0f} tok/s, {cache['bytes_per_token']:,.0f} bytes/token")
print(f"{'run':<16}{'steps':>6}{'tok/s':>8}{'peak RSS MiB':>14}{'proxy':>8}{'realised':>10}{'dense exec':>11}"
      f"{'final ρ=0':>10}{'final loss':>11}")
for name in ("kd-full", "kd-lora", "bl-0.4", "kd-lora-cached", "bl-0.4-cached"):
    m = json.loads((out / name / "manifest.json").read_text())
    t, c = m["training"], m["compute"]
    rss = int((out / f"{name}.maxrss").read_text().split()[-1]) / 1024
    dropped = (m.get("controller") or {}).get("modules_dropped", 0)
    print(f"{name:<16}{t['steps']:>6}{t['tokens_per_s']:>8.1f}{rss:>14,.0f}{c['proxy']:>8.3f}{c['realised']:>10.3f}"
          f"{c['dense_fraction_executed']:>11.3f}{dropped:>10}{t['final_loss']:>11.3f}")
PY
