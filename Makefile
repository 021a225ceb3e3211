# Benchmarks: every speed figure in the README, as ratios to baselines timed in the same run (see bench/run_all.py).
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: bench bench-quick

bench:
	$(PYTHON) bench/run_all.py --out BENCHMARKS.md

bench-quick:
	$(PYTHON) bench/run_all.py --quick   # writes bench/out/BENCHMARKS_quick.md
