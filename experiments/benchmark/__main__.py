"""`python -m experiments.benchmark`: the driver, or with --worker one job (see experiments.benchmark)."""

from absl import app

from experiments.benchmark.configs import BenchmarkConfig
from experiments.benchmark.driver import run
from experiments.flag_config import define_flags, from_flags


def main(argv):
    del argv
    run(from_flags(BenchmarkConfig))


if __name__ == "__main__":
    define_flags(BenchmarkConfig)
    app.run(main)
