"""Prefect tasks, one pipeline stage per module; each wraps a plain function that runs without a server. What the
stages share (and no stage itself) is in tasks/lib/."""

import os
from pathlib import Path

# datatrove and datasets cache downloaded assets under HF_HOME: keep them inside the project, not in ~.
os.environ.setdefault("HF_HOME", str(Path(__file__).resolve().parents[1] / ".cache" / "huggingface"))
