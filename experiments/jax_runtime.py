"""JAX settings every entry point shares: the persistent compilation cache (a rerun of the same shapes
skips compiling) and a quiet backend probe."""

from __future__ import annotations

import logging
import os

# The directory the command-line programs use unless told otherwise (gitignored).
DEFAULT_DIR = ".jax_cache"


def use_compilation_cache(directory: str, *, every_program: bool = False) -> None:
    """Cache compiled programs under `directory` ('' = off); `every_program`: also the small and quick
    ones JAX leaves out by default. Call before anything is compiled: JAX reads the setting when it
    first compiles."""
    if not directory:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
    if every_program:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def quiet_backend_probe() -> None:
    """JAX logs, at INFO, every accelerator plugin it probes and does not find (e.g. a TPU library on a
    GPU or CPU machine): noise in front of every run, not a problem."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
