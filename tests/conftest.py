"""Test-suite switches.

Tests marked ``slow`` (soak, minute-long churn, long fuzzing) are skipped by default. Set
``QISD_SLOW=1`` to run them in full, or ``QISD_SLOW=ci`` to run them in their shortened form
(what ``.ci/run`` does); the ``qisd_slow`` fixture tells a test which one it is in.
"""

from __future__ import annotations

import os

import pytest

SLOW = os.environ.get("QISD_SLOW", "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if SLOW or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="long run: set QISD_SLOW=1 (full) or QISD_SLOW=ci (short)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def qisd_slow() -> str:
    """'full' for QISD_SLOW=1, 'ci' for QISD_SLOW=ci (and when selected with -m slow)."""
    return "ci" if SLOW == "ci" else "full"
