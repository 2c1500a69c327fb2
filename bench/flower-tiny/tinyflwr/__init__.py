"""The tiny plan (tests/plans/tiny_plan.py) as a stock Flower App: the benchmarks' reference."""
