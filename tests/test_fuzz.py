"""Fuzzing: corpus replay (every past finding is a regression test) and budgeted atheris runs.

The atheris runs are coverage-guided over qisd's own code; the budget is small by default,
larger with QISD_SLOW=1 (see README, "Guarantees"). Hypothesis drives the same targets too, so
the suite still fuzzes where atheris is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.targets import TARGETS

FUZZ_DIR = Path(__file__).parent / "fuzz"
CORPUS = FUZZ_DIR / "corpus"


def _corpus_inputs() -> list[tuple[str, Path]]:
    out = []
    for name in sorted(TARGETS):
        for path in sorted((CORPUS / name).glob("*")):
            out.append((name, path))
    return out


@pytest.mark.parametrize(("target", "path"), _corpus_inputs(), ids=lambda v: getattr(v, "name", v))
def test_corpus_input_is_handled(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


def test_every_target_has_a_corpus() -> None:
    for name in TARGETS:
        assert any((CORPUS / name).glob("*")), f"no corpus for fuzz target {name}"


@pytest.mark.parametrize("target", sorted(TARGETS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_handled(target: str, data: bytes) -> None:
    TARGETS[target](data)


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_atheris_budget_finds_nothing(target: str, tmp_path: Path) -> None:
    full = os.environ.get("QISD_SLOW") == "1"
    budget = ["-max_total_time=300"] if full else ["-runs=15000", "-max_total_time=60"]
    scratch = tmp_path / "new-inputs"
    scratch.mkdir()
    proc = subprocess.run(
        [sys.executable, str(FUZZ_DIR / "run_atheris.py"), target, str(scratch), *budget],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert proc.returncode == 0 and not crashes, (
        f"fuzzing {target} found {crashes}: copy them into {CORPUS / target} "
        f"and fix the code.\n{proc.stderr[-3000:]}"
    )
