"""One evaluation over several processes (one per host, each with its local devices), through
`jax.distributed`: every process runs the same batches on one global mesh (each question's row is
computed by one device), every process receives every answer, and process 0 alone decides what is
left to do (its prediction files) and writes every file. So each question is answered and written
once, whatever the processes' file systems share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np

from experiments.benchmarks.io import PredictionWriter

WRITER = 0  # the process that reads and writes the output directory


def initialize(coordinator_address: str | None, num_processes: int, process_id: int) -> None:
    """Join the processes of a multi-process run (`jax.distributed.initialize`; before any JAX work)."""
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process_id={process_id} must be one of 0 .. {num_processes - 1} (--num_processes={num_processes})"
        )
    if num_processes == 1:
        return
    if not coordinator_address:
        raise ValueError("--num_processes > 1 needs --coordinator_address=HOST:PORT (process 0's host)")
    import jax

    if not jax.distributed.is_initialized():
        jax.distributed.initialize(coordinator_address, num_processes, process_id)


def count() -> int:
    import jax

    return jax.process_count()


def is_writer() -> bool:
    import jax

    return jax.process_index() == WRITER


def from_writer(values: np.ndarray) -> np.ndarray:
    """Process 0's ``values`` on every process (the same shape everywhere)."""
    if count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(values))


def on_writer(work: Callable[[], None]) -> None:
    """``work()`` on process 0; its error, if any, stops every process (the others with a pointer to
    process 0's message), so none waits for a collective that will not come."""
    error = None
    if is_writer():
        try:
            work()
        except (ValueError, OSError) as caught:
            error = caught
    failed = bool(from_writer(np.asarray(error is not None)))
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"process {WRITER} stopped the run (its log says why)")


def answered(path: str, question_ids: list[str], read: Callable[[str], dict]) -> set[str]:
    """The question ids among ``question_ids`` with an answer in ``path``, as process 0 reads it."""
    import os

    mask = np.zeros(len(question_ids), bool)
    if is_writer() and os.path.exists(path):
        done = read(path)
        mask = np.array([question_id in done for question_id in question_ids], bool)
    mask = from_writer(mask)
    return {question_id for question_id, is_done in zip(question_ids, mask) if is_done}


class _NoWriter:
    def write(self, record) -> None:
        del record


def prediction_writer(path: str):
    """Process 0's `PredictionWriter` for ``path``; a writer of nothing on the others."""
    return PredictionWriter(path) if is_writer() else contextlib.nullcontext(_NoWriter())
