"""The parts of `experiments.eval` (the entry point), one concern per module.

* `config`: `EvalConfig`, the one place each setting (and its flag's help text) is written, and
  the names of the files a run writes;
* `pairs`: the evaluated (method, keep) pairs, resolved and validated against the model;
* `inputs`: questions, images, the background image loader and the pre-flight checks;
* `generation`: the resumable per-pair answer loop and its prediction records;
* `runner`: `run`, which ties them together, scores every pair and writes the report.
"""
