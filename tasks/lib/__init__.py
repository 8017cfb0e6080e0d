"""Plain helpers the stages share: no Prefect task is defined here.

- `artifacts`: the content-addressed artifact store and the Prefect cache that points at it;
- `blocks`: datatrove plumbing and blocks (word splitting, counting, sampling, tokenize-and-pack, executors, stats);
- `normalise`: reading raw records and normalising them to documents, in datatrove tasks (the download stage);
- `launch`: torchrun / Slurm launch of `model.train`, with its output streamed into the run's log;
- `training_report`: training progress, metrics and loss-curve artifacts;
- `runs`: finding, keying and continuing training runs;
- `log`: run logging, and the progress lines that reach the root flow run (what `--watch` shows).
"""
