"""The testbed trainer (`python -m experiments.train_testbed`), one module per part of a run:
`config` (its settings), `batches`, `probes`, `step` (the jitted step), `state` (resumable state on
disk), `validation`, `export`, and `run`, which ties them together.
"""
