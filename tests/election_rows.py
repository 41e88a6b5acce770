"""Outcome rows and Byzantine scenarios shared by the election tests."""

from __future__ import annotations

import json
import random
from typing import Any

NOW = 1_760_000_000_000


def outcome(
    signer: str,
    intervention: str,
    delta: float,
    *,
    ts: int = NOW - 60_000,
    confidence: float = 0.8,
    samples: int = 200,
    decile: int = 7,
    params: dict[str, Any] | None = None,
    problem: str = "classification",
    metric: str = "accuracy",
    packet_id: str | None = None,
) -> dict[str, Any]:
    """One outcome row with the 15 packet columns (plus ``packet_id`` when given)."""
    row: dict[str, Any] = {
        "node_id": signer,
        "timestamp_utc": ts,
        "domain": "vision",
        "problem_type": problem,
        "model_architecture": "resnet",
        "training_phase": "finetune",
        "metric_name": metric,
        "metric_delta": delta,
        "metric_value": 0.5 + delta,
        "confidence": confidence,
        "intervention_type": intervention,
        "intervention_params": json.dumps(params if params is not None else {"lr": 0.001}),
        "outcome_decile": decile,
        "sample_count": samples,
        "raw_data_hash": f"c-{signer}",
    }
    if packet_id is not None:
        row["packet_id"] = packet_id
    return row


def byzantine_rows(liars: int, *, honest_report_b: bool, seed: int = 7) -> list[dict[str, Any]]:
    """100 honest signers whose best intervention is A (+0.10) against ``liars`` boosting B.

    Honest signers report A around +0.10 (confidence 0.8, 200 samples). With
    ``honest_report_b`` every honest signer also reports B around +0.02; otherwise only five
    do (liars push an intervention few honest sites use). Each liar claims B = +1000 with
    confidence 1 and a billion samples (the largest weight anyone can claim).
    """
    rng = random.Random(seed)
    rows = []
    for k in range(100):
        rows.append(outcome(f"honest{k:03d}", "A", rng.gauss(0.10, 0.03), decile=9))
        if honest_report_b or k < 5:
            rows.append(outcome(f"honest{k:03d}", "B", rng.gauss(0.02, 0.03), decile=5))
    for k in range(liars):
        rows.append(outcome(f"liar{k:03d}", "B", 1000.0, confidence=1.0, samples=10**9, decile=10))
    return rows
