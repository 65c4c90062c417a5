"""Side-by-side benchmarks: ``python -m benchmarks.<name>``; results land in benchmarks/results/."""
