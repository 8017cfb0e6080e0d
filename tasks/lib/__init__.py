"""What two or more stages share, plain (no Prefect); no class or function here serves a single stage.

- `artifacts`: the content-addressed artifact store: fingerprints, build records with typed inputs, verification;
- `steps`: a pipeline as a list of steps, and running one without Prefect; `plan`: reuse or build, and why;
- `code_version`: what code a stage's fingerprint covers;
- `blocks`: datatrove plumbing (word splitting, counting, sampling by id, documents per source, executors);
- `sources`: reading a source's raw records (local, URL, Hugging Face) and quarantining bad ones;
- `items`: conversations and multiple-choice items read from records; `manifest`: the typed shard manifest;
- `preflight`, `commands`, `supervise`: checking, starting and watching a training launch;
- `runs`: keying, finding and starting training runs; `training_report`: a finished run's curve;
- `log`: the pipeline's logger and its progress lines.
"""
