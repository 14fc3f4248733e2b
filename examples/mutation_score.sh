#!/usr/bin/env bash
# Mutation score of the engine's core (atb_llm/cache, compression, runtime, the sampler included)
# with mutmut: every mutant of those modules is run against the fast tests named in pyproject.toml
# ([tool.mutmut]). A benchmark, not part of CI: the whole set takes hours on 2 cores.
#   bash examples/mutation_score.sh                               # every mutant
#   bash examples/mutation_score.sh "atb_llm.runtime.scheduler*"  # the mutants of one module
# Then: .venv/bin/mutmut results (the survivors), .venv/bin/mutmut show NAME (a survivor's diff).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
"$PY" -m pip show mutmut >/dev/null 2>&1 || "$PY" -m pip install --quiet "mutmut==3.8.1"
.venv/bin/mutmut run --max-children 2 "$@" || true
.venv/bin/mutmut export-cicd-stats >/dev/null
"$PY" - <<'PY'
import json
s = json.load(open("mutants/mutmut-cicd-stats.json"))
done = s["killed"] + s["survived"] + s["timeout"] + s["suspicious"]
print(f"mutants {s['total']}: killed {s['killed']}, timeout {s['timeout']}, survived {s['survived']}, "
      f"suspicious {s['suspicious']}, no tests {s['no_tests']}, skipped {s['skipped']}")
if done:
    print(f"score (killed + timeout over run mutants): {(s['killed'] + s['timeout']) / done:.1%}")
PY
