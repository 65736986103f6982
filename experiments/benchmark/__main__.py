"""`python -m experiments.benchmark`: the driver, or with --worker one job (see experiments.benchmark)."""

from absl import app

from experiments.benchmark.configs import BenchmarkConfig
from experiments.benchmark.driver import run
from experiments.flag_config import define_flags, from_flags, one_line_errors


def main(argv):
    del argv
    with one_line_errors("experiments.benchmark"):
        run(from_flags(BenchmarkConfig))


if __name__ == "__main__":
    define_flags(BenchmarkConfig)
    app.run(main)
