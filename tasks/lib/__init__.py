"""Plain helpers the stages share: no Prefect task is defined here.

- `artifacts`: the content-addressed artifact store and the Prefect cache that points at it;
- `blocks`: datatrove plumbing (word splitting, executors, stats);
- `launch`: torchrun / Slurm launch of `model.train`, with its output streamed into the run's log;
- `training_report`: training progress, metrics and loss-curve artifacts;
- `runs`: finding, keying and continuing training runs;
- `log`: run logging, and the progress lines that reach the root flow run (what `--watch` shows).
"""
