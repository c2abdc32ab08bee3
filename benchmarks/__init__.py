"""Performance and scientific-validity benchmarks; `python -m benchmarks` runs them all."""
