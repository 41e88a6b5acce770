"""Coverage-guided fuzzing of a target with atheris.

    python tests/fuzz/run_atheris.py TARGET SCRATCH_DIR [libFuzzer flags: -runs=N -max_total_time=S]

Starts from ``tests/fuzz/corpus/TARGET``, which it only reads: the new inputs it finds
interesting go to SCRATCH_DIR. On a finding atheris writes
``crash-<sha1>`` in the working directory and exits non-zero; copy that file into the corpus
to keep it as a regression test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["qisd"]):
    from targets import TARGETS  # this directory is on sys.path when run as a script


def main() -> None:
    name, scratch = sys.argv[1], sys.argv[2]
    target = TARGETS[name]
    corpus = Path(__file__).parent / "corpus" / name
    argv = [sys.argv[0], *sys.argv[3:], scratch, str(corpus)]
    atheris.Setup(argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
