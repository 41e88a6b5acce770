"""Packet benchmark: sign+encode and decode+verify rates against the raw Ed25519 limit.

    python bench/packets.py [--seconds 0.5] [--rounds 7] [--batch 64]

Runs on one core (pinned where the OS allows). Each round measures the raw Ed25519 verify rate
(`cryptography`'s verify in a loop over the same signed messages) right next to qisd's
decode+verify, so machine noise hits both alike; the ratio is the median over rounds.
Decode+verify is shown both one envelope per call (`open_envelope`, what the CLI and Flight
use for a single packet) and an RPC's worth per call (`open_envelopes`, what a node does with
every store_packets request and find_packets page).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from qisd.core import packet as P
from qisd.core.crypto import Identity
from qisd.core.fingerprint import DEFAULT_TEMPLATE

ROUTES = [DEFAULT_TEMPLATE.fields_at(level) for level in DEFAULT_TEMPLATE.levels]
ARTICLE_ROW = {
    "domain": "clinical.oncology",
    "problem_type": "treatment_response_classification",
    "model_architecture": "transformer-256d",
    "training_phase": "epoch_5_of_50",
    "metric_name": "val_auc",
    "metric_value": 0.847,
    "metric_delta": 0.023,
    "confidence": 0.91,
    "intervention_type": "learning_rate_schedule",
    "intervention_params": {"schedule": "cosine_annealing", "T_max": 10, "eta_min": 1e-6},
    "outcome_decile": 8,
    "sample_count": 1240,
    "data_ref": "/local/oncology_data/site_a/",
}


def rate(fn: Callable[[], int], seconds: float) -> float:
    """Items per second of ``fn`` (which returns how many items one call handled)."""
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        done += fn()
    return done / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="length of one measurement")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median reported)")
    ap.add_argument("--batch", type=int, default=64, help="envelopes per open_envelopes call")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    ident = Identity.generate()
    now = int(time.time() * 1000)
    envs = [
        P.pack_rows(
            ident,
            P.build_rows([dict(ARTICLE_ROW, metric_delta=i / 1e4)], ident, now_ms=now),
            ROUTES,
        )[0][-1]
        for i in range(args.batch)
    ]
    raws = [e.raw for e in envs]
    key = Ed25519PublicKey.from_public_bytes(ident.public_key)
    signed = [
        (e.signature, P._signed_message(e.kind, e.key, P._fields_bytes(e.fields), e.body))
        for e in envs
    ]
    one_row = P.build_rows([ARTICLE_ROW], ident, now_ms=now)

    def raw_verify() -> int:
        for sig, msg in signed:
            key.verify(sig, msg)
        return len(signed)

    def single() -> int:
        for raw in raws:
            P.open_envelope(raw, now_ms=now)
        return len(raws)

    def batched() -> int:
        out = P.open_envelopes(raws, now_ms=now)
        assert all(isinstance(e, P.Envelope) for e in out)
        return len(out)

    def seal() -> int:
        P.seal_packets(ident, one_row, ROUTES[-1:])
        return 1

    def raw_sign() -> int:
        ident.sign(signed[0][1])
        return 1

    cols: dict[str, list[float]] = {k: [] for k in ("raw", "single", "batched", "seal", "sign")}
    for _ in range(args.rounds):
        cols["raw"].append(rate(raw_verify, args.seconds))
        cols["single"].append(rate(single, args.seconds))
        cols["batched"].append(rate(batched, args.seconds))
        cols["sign"].append(rate(raw_sign, args.seconds))
        cols["seal"].append(rate(seal, args.seconds))
    med = {k: statistics.median(v) for k, v in cols.items()}
    ratio_single = statistics.median(
        s / r for s, r in zip(cols["single"], cols["raw"], strict=True)
    )
    ratio_batched = statistics.median(
        b / r for b, r in zip(cols["batched"], cols["raw"], strict=True)
    )
    ratio_seal = statistics.median(s / r for s, r in zip(cols["seal"], cols["sign"], strict=True))

    print(
        f"qisd packet benchmark, one core, {args.rounds} rounds x {args.seconds}s, "
        f"python {sys.version.split()[0]}"
    )
    print(f"{'what':44} {'per s':>10} {'vs raw':>8}")
    print(f"{'raw Ed25519 verify (cryptography)':44} {med['raw']:>10,.0f} {'1.00':>8}")
    print(
        f"{'decode+verify, one envelope per call':44} {med['single']:>10,.0f} {ratio_single:>8.2f}"
    )
    print(
        f"{f'decode+verify, {args.batch} per call (RPC path)':44} {med['batched']:>10,.0f} "
        f"{ratio_batched:>8.2f}"
    )
    print(f"{'raw Ed25519 sign (cryptography)':44} {med['sign']:>10,.0f} {'1.00':>8}")
    print(f"{'sign+encode, one row, one level':44} {med['seal']:>10,.0f} {ratio_seal:>8.2f}")
    print()
    print("envelope bytes per row (article's row, rows differing in metric_delta)")
    print(f"{'rows':>6} {'envelopes':>10} {'bytes':>8} {'bytes/row':>10}")
    for n in (1, 10, 100):
        rows = P.build_rows(
            [dict(ARTICLE_ROW, metric_delta=i / 1e4) for i in range(n)], ident, now_ms=now
        )
        bodies = P.pack_rows(ident, rows, ROUTES)
        total = sum(len(b[-1].raw) for b in bodies)
        print(f"{n:>6} {len(bodies):>10} {total:>8} {total / n:>10.1f}")
    ipc = len(P._inflate(envs[0].body))
    print(f"one-row Arrow IPC message {ipc} bytes -> signed envelope {len(envs[0].raw)} bytes")
    goal = ratio_batched >= 0.70
    print(f"goal decode+verify >= 0.70 x raw verify (RPC path): {'met' if goal else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
