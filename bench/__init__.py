"""Benchmarks of the service and of its Grad-CAM; figures go to bench/RESULTS.md with their commands."""
