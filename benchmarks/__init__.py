"""Benchmarks of nemovl-trt (run by `make bench` via benchmarks/run_all.py)."""
