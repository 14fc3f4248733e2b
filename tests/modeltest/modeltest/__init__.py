"""ModelTest: accuracy on downstream datasets (BoolQ, MMLU, C-Eval) by option scoring, and
performance (first token, non-first token, end-to-end throughput), with MindIE's run.sh
arguments. Entry: `bash tests/modeltest/run.sh ...` or `python -m modeltest ...` from
tests/modeltest."""
