#!/usr/bin/env bash
# Mutation score of the engine's core (atb_llm/cache, compression, runtime, the sampler included)
# with mutmut: every mutant of those modules is run against the fast tests named in pyproject.toml
# ([tool.mutmut]). A benchmark, not part of CI: the whole set (about 3900 mutants) takes many hours
# on 2 cores, so a uniform random sample of it gives the score in a fraction of that time.
#   bash tests/mutation/mutation_score.sh                               # every mutant
#   bash tests/mutation/mutation_score.sh "atb_llm.runtime.scheduler*"  # the mutants of one module
#   bash tests/mutation/mutation_score.sh --sample 400 [--seed 0]       # a random sample of the whole scope
# The score is printed twice: over every mutant run, and over those not listed as equivalent in
# tests/mutation/mutation_equivalent.txt (a mutant that no test can kill because the behaviour is the same,
# each with its reason). Then: .venv/bin/mutmut results (the survivors), .venv/bin/mutmut show NAME.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
"$PY" -m pip show mutmut >/dev/null 2>&1 || "$PY" -m pip install --quiet "mutmut==3.8.1"

SAMPLE="" SEED=0 ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --sample) SAMPLE="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

if [[ -n "$SAMPLE" ]]; then
  if ! ls mutants/atb_llm/cache/*.meta >/dev/null 2>&1; then
    # mutmut writes the mutants (and records which tests reach which function) before it filters by
    # name; a name matching nothing stops it right there.
    .venv/bin/mutmut run "generate-mutants-only" >/dev/null 2>&1 || true
  fi
  mapfile -t ARGS < <("$PY" - "$SAMPLE" "$SEED" <<'PY'
import glob, json, random, sys
names = sorted(k for f in glob.glob("mutants/atb_llm/**/*.meta", recursive=True) for k in json.load(open(f))["exit_code_by_key"])
for name in sorted(random.Random(int(sys.argv[2])).sample(names, min(int(sys.argv[1]), len(names)))):
    print(name)
PY
)
  printf '%s\n' "${ARGS[@]}" > mutants/sample.txt
fi

.venv/bin/mutmut run --max-children 2 "${ARGS[@]}" || true

"$PY" - "${ARGS[@]}" <<'PY'
import fnmatch, glob, json, sys
from collections import Counter

from mutmut.stats import status_by_exit_code as verdict

exit_codes = {k: v for f in glob.glob("mutants/atb_llm/**/*.meta", recursive=True) for k, v in json.load(open(f))["exit_code_by_key"].items()}
wanted = sys.argv[1:]
names = [k for k in exit_codes if not wanted or any(k == w or fnmatch.fnmatch(k, w) for w in wanted)]
count = Counter(verdict[exit_codes[k]] for k in names)
equivalent = {line.split()[0] for line in open("tests/mutation/mutation_equivalent.txt") if line.strip() and not line.startswith("#")}
run = [k for k in names if exit_codes[k] is not None]
killed = [k for k in run if verdict[exit_codes[k]] in ("killed", "timeout", "segfault")]
print(f"mutants {len(names)}: " + ", ".join(f"{v} {n}" for v, n in sorted(count.items())))
if run:
    print(f"score over run mutants (no tests and survivors count as not killed): {len(killed)}/{len(run)} = {len(killed) / len(run):.1%}")
    real = [k for k in run if k not in equivalent or k in killed]
    print(f"score over non-equivalent mutants ({len(run) - len(real)} equivalent): {len(killed)}/{len(real)} = {len(killed) / len(real):.1%}")
    for k in sorted(set(run) - set(killed) - equivalent):
        print("  not killed:", k)
PY
