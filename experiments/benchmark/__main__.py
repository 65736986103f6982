"""`python -m experiments.benchmark`: the driver, or with --worker one job (see experiments.benchmark)."""

from absl import app

from experiments.benchmark.driver import main

if __name__ == "__main__":
    app.run(main)
