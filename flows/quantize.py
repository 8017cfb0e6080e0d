"""Quantization flow: quantize the pretrained and the instruction-tuned checkpoints' exports in each scheme
(model/quantize.py) and score every variant beside its original, on the same items (the evaluation flow with
`quantize` set; report.md and a `quantization` table in the UI).

    python -m flows.quantize                               # the newest runs, int8 and int4-g32
    python -m flows.quantize --scheme int4-g128 --tuned runs/sft-tiny-<hash>
"""

from __future__ import annotations

import argparse

from prefect import flow

from flows.data import require_server
from flows.evaluate import evaluate_flow


@flow(name="quantize")
def quantize_flow(pretrained: str | None = None, tuned: str | None = None,
                  schemes: list[str] = ["int8", "int4-g32"], eval_spec_path: str = "data_specs/eval_default.yaml",
                  runs_dir: str = "runs", reports_dir: str = "reports") -> str:
    """Returns the report directory; `pretrained` and `tuned` default to the newest finished runs."""
    return evaluate_flow(pretrained, tuned, eval_spec_path, runs_dir, reports_dir, quantize=schemes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--tuned", default=None)
    parser.add_argument("--scheme", action="append", default=None, help="default: int8 and int4-g32")
    args = parser.parse_args()
    require_server()
    print(quantize_flow(args.pretrained, args.tuned, args.scheme or ["int8", "int4-g32"]))
