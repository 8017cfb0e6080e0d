"""Logging for stages and flows, and the progress lines a terminal follows.

Stages log on the `llm_pipeline` logger, plain Python logging: they run the same with or without Prefect. Inside a
Prefect run, tasks/prefect_tasks.py sends that logger's lines to the run's log in the UI, and `progress` lines
also to the root flow run: `prefect deployment run NAME --watch` streams only the root run's logs, while stages log
in child flow runs (the data flow under pretrain, every flow under pipeline) and their tasks.
"""

from __future__ import annotations

import logging
from typing import Callable

LOGGER = "llm_pipeline"
# Where progress lines go besides this process's log: tasks/prefect_tasks.py adds the root flow run's log.
progress_sinks: list[Callable[[str], None]] = []


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER)


def progress(message: str) -> None:
    """Log `message`, and give it to every progress sink (the root flow run's log, inside a Prefect run)."""
    get_logger().info(message, stacklevel=2)
    for sink in progress_sinks:
        sink(message)
