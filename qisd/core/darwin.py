"""Darwinism: competing similarity templates per domain, weighted by Hedge (sans-I/O).

Several templates (by template id) compete for a domain. When this site reports the outcome of
an intervention it was recommended, the caller asks every candidate template what it predicted
for that intervention (the Math's weighted median at the site's fingerprint under that
template) and calls :meth:`Darwinism.observe`. Each prediction ``p`` is scored against the
observed delta ``o``::

    loss = min(1, |p - o| / scale)          (abstain_loss when the template had no estimate)
    w   <- w * exp(-learning_rate * loss)   then renormalised to sum 1

This is Hedge (multiplicative weights) over losses in [0, 1]. ``scale`` is in metric units;
the daemon passes ``3 * Tally.sigma_pooled`` of the winning template, so an error of three
typical noise widths is a full loss.

Invariants, per domain: the active weights are positive and sum to 1; a template whose weight
falls below ``floor`` after an update is retired and never comes back (except the single
highest-weight one, which is never retired, so a domain with candidates always has a winner);
a newcomer enters with an equal share ``1 / (K + 1)`` (the others scaled by ``K / (K + 1)``).

The state is plain data: :meth:`Darwinism.to_dict` / :meth:`Darwinism.from_dict` round-trip
through JSON exactly. No clock is read; ``now_ms`` is a parameter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qisd.errors import QisdError, UsageError

STATE_VERSION = 1
"""Version of the dict layout produced by :meth:`Darwinism.to_dict`."""


class DarwinStateError(QisdError):
    """A persisted Darwinism state is malformed (wrong version, types or weights)."""

    exit_code = 4


@dataclass(frozen=True)
class DarwinConfig:
    """Parameters of the Darwinism election; the defaults are documented in docs/elections.md."""

    learning_rate: float = 0.3
    """Hedge's eta: a full loss multiplies a weight by exp(-eta) (0.74 for the default)."""
    floor: float = 0.02
    """A template whose weight falls below this after an update is retired."""
    abstain_loss: float = 0.5
    """Loss of a template that had no estimate for the intervention (half of a full miss)."""
    loss_scale: float = 1.0
    """Error (metric units) that counts as a full loss when ``observe`` is given no scale."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UsageError("learning_rate must be a positive number")
        if not 0.0 <= self.floor < 1.0:
            raise UsageError("floor must lie in [0, 1)")
        if not 0.0 <= self.abstain_loss <= 1.0:
            raise UsageError("abstain_loss must lie in [0, 1]")
        if not (math.isfinite(self.loss_scale) and self.loss_scale > 0):
            raise UsageError("loss_scale must be a positive number")


@dataclass(frozen=True)
class Observed:
    """What one :meth:`Darwinism.observe` did (an event: past tense, immutable)."""

    domain: str
    observed: float
    losses: tuple[tuple[str, float], ...]
    """(template id, loss) for every candidate that was active, sorted by id."""
    weights: tuple[tuple[str, float], ...]
    """(template id, weight) of the active candidates after the update, sorted by id."""
    retired: tuple[str, ...]
    """Templates retired by this update, sorted."""
    winner: str | None
    """The winner after the update."""


@dataclass
class _Domain:
    weights: dict[str, float] = field(default_factory=dict)
    retired: dict[str, int | None] = field(default_factory=dict)
    rounds: int = 0
    updated_ms: int | None = None


def _normalise(weights: dict[str, float]) -> dict[str, float]:
    ids = sorted(weights)
    total = math.fsum(weights[i] for i in ids)
    return {i: weights[i] / total for i in ids}


class Darwinism:
    """Per-domain Hedge weights over competing template ids (see the module docstring)."""

    def __init__(self, config: DarwinConfig | None = None) -> None:
        self.config = config or DarwinConfig()
        self._domains: dict[str, _Domain] = {}

    # ------------------------------------------------------------------ queries

    def domains(self) -> list[str]:
        """Domains with any candidate or retired template, sorted."""
        return sorted(self._domains)

    def candidates(self, domain: str) -> list[str]:
        """Active template ids of ``domain``, sorted."""
        state = self._domains.get(domain)
        return sorted(state.weights) if state else []

    def weights(self, domain: str) -> dict[str, float]:
        """Active template id -> weight (sums to 1; empty if the domain has no candidate)."""
        state = self._domains.get(domain)
        return dict(state.weights) if state else {}

    def retired(self, domain: str) -> frozenset[str]:
        """Template ids retired in ``domain``."""
        state = self._domains.get(domain)
        return frozenset(state.retired) if state else frozenset()

    def rounds(self, domain: str) -> int:
        """How many observations ``domain`` has had."""
        state = self._domains.get(domain)
        return state.rounds if state else 0

    def winner(self, domain: str) -> str | None:
        """The highest-weight active template (ties: the smallest id), or None."""
        weights = self.weights(domain)
        if not weights:
            return None
        return min(weights, key=lambda i: (-weights[i], i))

    # ------------------------------------------------------------------ transitions

    def add(self, domain: str, template_id: str) -> bool:
        """Enter a candidate with an equal share; False if it is already active or retired."""
        if not domain or not template_id:
            raise UsageError("domain and template id must be non-empty")
        state = self._domains.setdefault(domain, _Domain())
        if template_id in state.weights or template_id in state.retired:
            return False
        k = len(state.weights)
        scaled = {i: w * k / (k + 1) for i, w in state.weights.items()}
        scaled[template_id] = 1.0 / (k + 1)
        state.weights = _normalise(scaled)
        return True

    def observe(
        self,
        domain: str,
        predictions: Mapping[str, float | None],
        observed: float,
        *,
        now_ms: int,
        scale: float | None = None,
    ) -> Observed:
        """Score every candidate's prediction against the observed delta and update by Hedge.

        ``predictions`` maps template id -> predicted metric_delta for the intervention this
        site carried out (None or missing: the template had no estimate). Ids not yet known
        join first (as by :meth:`add`); retired ids are ignored.
        """
        if not math.isfinite(observed):
            raise UsageError("the observed delta must be finite")
        scale = self.config.loss_scale if scale is None else scale
        if not (math.isfinite(scale) and scale > 0):
            raise UsageError("scale must be a positive number")
        for template_id in sorted(predictions):
            self.add(domain, template_id)
        state = self._domains.setdefault(domain, _Domain())
        losses: dict[str, float] = {}
        for template_id in sorted(state.weights):
            p = predictions.get(template_id)
            if p is None or not math.isfinite(p):
                losses[template_id] = self.config.abstain_loss
            else:
                losses[template_id] = min(1.0, abs(p - observed) / scale)
        eta = self.config.learning_rate
        if state.weights:
            state.weights = _normalise(
                {i: w * math.exp(-eta * losses[i]) for i, w in state.weights.items()}
            )
        retired = self._retire(state, now_ms)
        state.rounds += 1
        state.updated_ms = now_ms
        return Observed(
            domain=domain,
            observed=observed,
            losses=tuple(sorted(losses.items())),
            weights=tuple(sorted(state.weights.items())),
            retired=retired,
            winner=self.winner(domain),
        )

    def _retire(self, state: _Domain, now_ms: int) -> tuple[str, ...]:
        if not state.weights:
            return ()
        top = min(state.weights, key=lambda i: (-state.weights[i], i))
        gone = sorted(i for i, w in state.weights.items() if w < self.config.floor and i != top)
        for template_id in gone:
            del state.weights[template_id]
            state.retired[template_id] = now_ms
        if gone:
            state.weights = _normalise(state.weights)
        return tuple(gone)

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        """The state as JSON-compatible data (floats round-trip exactly through JSON)."""
        return {
            "version": STATE_VERSION,
            "domains": {
                name: {
                    "weights": dict(sorted(d.weights.items())),
                    "retired": dict(sorted(d.retired.items())),
                    "rounds": d.rounds,
                    "updated_ms": d.updated_ms,
                }
                for name, d in sorted(self._domains.items())
            },
        }

    @classmethod
    def from_dict(cls, data: Any, config: DarwinConfig | None = None) -> Darwinism:
        """Rebuild a state saved by :meth:`to_dict`; raises :class:`DarwinStateError`."""
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise DarwinStateError(f"Darwinism state must be a dict with version {STATE_VERSION}")
        domains = data.get("domains")
        if not isinstance(domains, dict):
            raise DarwinStateError("Darwinism state has no 'domains' mapping")
        out = cls(config)
        for name, raw in domains.items():
            out._domains[_check_str(name, "domain")] = _load_domain(name, raw)
        return out


def _check_str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise DarwinStateError(f"Darwinism state: {what} {value!r} must be non-empty text")
    return value


def _check_int(value: Any, what: str, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DarwinStateError(f"Darwinism state: {what} {value!r} must be a whole number")
    return value


def _load_domain(name: str, raw: Any) -> _Domain:
    if not isinstance(raw, dict):
        raise DarwinStateError(f"Darwinism state: domain {name!r} must be a mapping")
    weights = raw.get("weights")
    retired = raw.get("retired")
    if not isinstance(weights, dict) or not isinstance(retired, dict):
        raise DarwinStateError(f"Darwinism state: domain {name!r} needs weights and retired")
    state = _Domain()
    for template_id, w in weights.items():
        _check_str(template_id, "template id")
        if (
            isinstance(w, bool)
            or not isinstance(w, (int, float))
            or not (math.isfinite(w) and w > 0)
        ):
            raise DarwinStateError(f"Darwinism state: weight {w!r} must be a positive number")
        state.weights[template_id] = float(w)
    for template_id, at in retired.items():
        _check_str(template_id, "template id")
        if template_id in state.weights:
            raise DarwinStateError(f"Darwinism state: {template_id!r} is active and retired")
        state.retired[template_id] = _check_int(at, "retired time", optional=True)
    if state.weights:
        total = math.fsum(state.weights.values())
        if abs(total - 1.0) > 1e-6:
            raise DarwinStateError(f"Darwinism state: weights of {name!r} sum to {total}, not 1")
    rounds = _check_int(raw.get("rounds", 0), "rounds")
    state.rounds = rounds if rounds is not None else 0
    state.updated_ms = _check_int(raw.get("updated_ms"), "updated_ms", optional=True)
    return state
