"""Plots the notebooks and `compare` share (matplotlib; the numbers come from train()'s records)."""
from __future__ import annotations

import matplotlib.pyplot as plt


def plot_curves(records: dict, title: str = ""):
    """Validation loss and accuracy against step for several runs: {label: train() record}."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for label, r in records.items():
        steps = [h["step"] for h in r["history"]]
        a1.plot(steps, [h["loss"] for h in r["history"]], marker=".", label=label)
        if "accuracy" in r["history"][0]:
            a2.plot(steps, [100 * h["accuracy"] for h in r["history"]], marker=".", label=label)
    a1.set_xlabel("step"), a1.set_ylabel("validation answer loss"), a1.legend(fontsize=8)
    a2.set_xlabel("step"), a2.set_ylabel("validation accuracy (%)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_compare(results: dict, path=None):
    """Test accuracy against trainable parameters (log scale); marker area grows with memory."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results["rows"]:
        acc = 100 * r.get("test", {}).get("accuracy", float("nan"))
        ax.scatter(r["trainable_params"], acc, s=20 + 4 * r["peak_memory_mb"], alpha=0.6)
        ax.annotate(r["method"], (r["trainable_params"], acc), textcoords="offset points", xytext=(5, 5))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"task {results['task']}: accuracy vs trainable params (area ~ memory)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def summary_table(records: dict) -> str:
    """A small Markdown table of runs: {label: train() record}."""
    lines = ["| run | trainable | memory (MB) | ms/step | val loss | test acc |", "|---|---:|---:|---:|---:|---:|"]
    for label, r in records.items():
        acc = r.get("test", {}).get("accuracy", float("nan"))
        lines.append(f"| {label} | {r['trainable_params']:,} | {r['peak_memory_mb']:.1f} | "
                     f"{1000 * r['s_per_step']:.0f} | {r['val']['loss']:.3f} | {100 * acc:.1f}% |")
    return "\n".join(lines)
