"""`python tests/slow_build_python.py -m MODULE ARGS...`: run MODULE as `python -m` would, with
a slow model build when MODULE is tulip_mega.train.

The model build (`tulip_mega.training.loop.build_model_chunks`) first touches the file named by
SLOW_BUILD_MARKER (so a test knows the build has started and can send a signal then), then
sleeps SLOW_BUILD_SECONDS (default 5) before building: a stand-in for the minutes a 512-rank
start-up takes. Used as `$PYTHON` by tests (tests/integration/test_signals.py, tests/integration/test_slurm.py), so
the production code carries no test hook.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path


def _slow(build):
    def slow_build(*args, **kwargs):
        marker = os.environ.get("SLOW_BUILD_MARKER")
        if marker:
            Path(marker).parent.mkdir(parents=True, exist_ok=True)
            Path(f"{marker}.{os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0'))}").touch()
        time.sleep(float(os.environ.get("SLOW_BUILD_SECONDS", "5")))
        return build(*args, **kwargs)

    return slow_build


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: slow_build_python.py -m MODULE [ARGS...]")
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    sys.path.insert(0, os.getcwd())
    if module == "tulip_mega.train":
        import tulip_mega.training.loop as loop

        loop.build_model_chunks = _slow(loop.build_model_chunks)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
