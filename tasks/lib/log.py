"""Logging for stages and flows, and the progress lines a terminal follows.

`prefect deployment run NAME --watch` streams the logs of the flow run it started, the root run. Stages log in
child flow runs (the data flow under pretrain, every flow under pipeline) and their tasks, which the watch does
not see, so `progress()` logs a line on the current run and again on the root run. The UI shows it in both
places, and the terminal shows each stage starting and ending, training steps and where the results are.
"""

from __future__ import annotations

import logging

_root_of: dict[str, str | None] = {}  # flow run id -> its root flow run's id, or None when it is the root


def get_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow/task run (so lines show in the UI), a plain logger elsewhere."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # outside a run context Prefect raises MissingContextError
        return logging.getLogger("llm_pipeline")


def progress(message: str) -> None:
    """Log `message` on this run and, from inside a child flow run, on the root flow run too."""
    get_logger().info(message, stacklevel=2)
    root = _root_flow_run()
    if root is not None:  # to the API only: a console already printed the line above
        from prefect.logging.handlers import APILogHandler

        record = logging.LogRecord("prefect.flow_runs", logging.INFO, __file__, 0, message, None, None)
        record.flow_run_id, record.task_run_id = root, None
        APILogHandler().emit(record)


def _root_flow_run() -> str | None:
    try:
        from prefect.runtime import flow_run

        current = flow_run.id
        if current and current not in _root_of:
            root = flow_run.root_flow_run_id  # walks up the parents through the API: once per flow run
            _root_of[current] = root if root != current else None
        return _root_of.get(current) if current else None
    except Exception:  # no server, or not in a run: the line was logged where it could be
        return None
