"""Paths of the embedded data, and the one switch between the normal and the fast (CI) configuration."""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
BASE_DIR = DATA_DIR / "base"  # the pretrained tiny GPT: config.json + model.safetensors


def quick() -> bool:
    """True when MINILORA_QUICK=1: notebooks, `compare` and benchmarks then pick small, fast settings
    (CI runs every notebook this way). This is the only place the variable is read."""
    return os.environ.get("MINILORA_QUICK", "0") not in ("", "0", "false", "False")
