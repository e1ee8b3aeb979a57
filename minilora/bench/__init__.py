"""Benchmarks: measured numbers next to the analytic ones; each writes a JSON under runs/."""
