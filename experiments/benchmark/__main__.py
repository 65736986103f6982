"""`python -m experiments.benchmark`: the driver, or with --worker one job (see experiments.benchmark)."""

from absl import app

from experiments.benchmark.configs import BenchmarkConfig
from experiments.benchmark.driver import run
from experiments.flag_config import define_flags, from_flags, one_line_errors
from experiments.jax_runtime import quiet_backend_probe


def main(argv):
    del argv
    quiet_backend_probe()
    with one_line_errors("experiments.benchmark"):
        run(from_flags(BenchmarkConfig))


if __name__ == "__main__":
    define_flags(BenchmarkConfig)
    app.run(main)
