"""Procedural VQA testbed: a small LLaVA is trained on it, then token-pruning methods are compared.

Answers hinge on objects 1 to 3 patches wide on a textured 336 x 336 background, so pruning that
drops the wrong visual tokens visibly costs accuracy. `scenes` gathers the public names of the
generator (words, layout, rendering, questions, encoding, splits); `model` holds the LLaVA
configuration trained on it and `training` the trainer. The eval harness reads a written split through
`experiments.benchmarks.testbed`.
"""
