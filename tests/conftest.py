"""Test set-up: the tests folder is importable (harness), markers are declared."""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
# megatron-core warns at import that TE/apex are missing; expected on a CPU machine.
warnings.filterwarnings("ignore", message=".*not installed.*")


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: spawns several gloo ranks")
    config.addinivalue_line("markers", "slow: takes more than ~30 s; still run in CI")
