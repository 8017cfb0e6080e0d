"""One pipeline stage per module (`tasks/<stage>.py`: its datatrove blocks and its plain `build` function, no
Prefect); what two or more stages share in tasks/lib/; every Prefect task in tasks/prefect_tasks.py."""

import os
from pathlib import Path

# datatrove and datasets cache downloaded assets under HF_HOME: keep them inside the project, not in ~.
os.environ.setdefault("HF_HOME", str(Path(__file__).resolve().parents[1] / ".cache" / "huggingface"))
