"""Benchmarks: measured numbers next to the analytic ones; each prints a table and writes a JSON (under
runs/ by default) with the device, versions and command."""
import json

from minilora.checkpoint import atomic_write_text


def write_result(result: dict, path) -> None:
    """Write a benchmark's JSON atomically (never a half-written file) and say where."""
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
