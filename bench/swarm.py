"""Swarm simulation of the election loop: does a bigger swarm learn faster, per site?

N simulated sites (default N = 10, 100, 1,000) share a hidden ground truth: for each of P
problem types, one intervention is best. Every round each site reads what it can see for its
fingerprint through an *exchange*, runs :func:`qisd.core.synthesis.synthesize`, follows the
recommendation (or explores with probability epsilon, or picks at random while there is no
trustworthy recommendation), observes a noisy outcome of what it did, and publishes that
outcome row. Measured per N:

* rounds until a new site (no history of its own) picks the best intervention for every
  problem type, and keeps picking it for the rest of the run;
* regret per site: sum over rounds of (best true delta - true delta of the choice);
* the same with a fraction of lying sites (default 20 %) that claim +10 for a poor
  intervention with the largest weight anyone can claim.

The exchange is pluggable: anything with ``publish(rows)`` and ``fetch(path)`` (see
:class:`Exchange`). :class:`InMemoryExchange` stores each row under every routable level of
the template, as the DHT does; a DHT-backed exchange can replace it without touching the rest.

Run:  .venv/bin/python bench/swarm.py --sites 10,100,1000 --seeds 3,3,1 --dht-sites ''
      .venv/bin/python bench/swarm.py --sites 10,100 --rounds 20 --seeds 2 --rules quorum,trust
The trust rule synthesizes once per site per round (its answer depends on the site's own
outcomes), so N = 1,000 costs minutes per run where the other rules take seconds.
Prints a table; writes PNG plots to bench/out/ when matplotlib is importable.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qisd.core.fingerprint import DEFAULT_TEMPLATE, Template
from qisd.core.hiring import default_template_doc
from qisd.core.math import MathConfig
from qisd.core.synthesis import synthesize
from qisd.core.trust import Evidence, TrustConfig

DOMAIN = "bench.swarm"
ARCH = "resnet"
T0 = 1_760_000_000_000
ROUND_MS = 3_600_000


class Exchange(Protocol):
    """What a site needs from the network: publish its rows, fetch a fingerprint's rows."""

    def publish(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Make ``rows`` (one signer's outcome rows) visible to everyone following their paths."""

    def fetch(self, path: str) -> list[dict[str, Any]]:
        """Every row currently visible under fingerprint ``path``."""


class InMemoryExchange:
    """An :class:`Exchange` in one process: rows filed under every routable level's path."""

    def __init__(self, template: Template = DEFAULT_TEMPLATE) -> None:
        self.template = template
        self._rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.publishes = 0
        self.fetches = 0

    def publish(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.publishes += 1
        for row in rows:
            for _fields, path, _key in self.template.routes(row):
                self._rows[path].append(dict(row))

    def fetch(self, path: str) -> list[dict[str, Any]]:
        self.fetches += 1
        return list(self._rows.get(path, ()))


class DhtExchange:
    """An :class:`Exchange` over a real in-process qisd DHT: one node per site on 127.0.0.1.

    Each site gets its own Ed25519 identity, SQLite store (in a temporary directory) and
    :class:`~qisd.net.dht.DhtNode`; a publish signs the site's rows with its key and stores
    them at the k closest nodes of every routable level, a fetch crawls the path's key from a
    node of the swarm. The nodes run on an event loop in a background thread, so the
    simulation above stays synchronous. Counts the messages every publish and fetch sends.
    """

    def __init__(self, n_sites: int, template: Template = DEFAULT_TEMPLATE) -> None:
        import asyncio
        import tempfile
        import threading

        from qisd.config import DhtConfig, StoreLimits
        from qisd.core.crypto import Identity
        from qisd.net.dht import DhtNode
        from qisd.net.store import Store

        self.template = template
        self._routes = [template.fields_at(level) for level in template.levels]
        self._tmp = tempfile.TemporaryDirectory(prefix="qisd-swarm-")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        config = DhtConfig()
        self._ids = [Identity.generate() for _ in range(n_sites)]
        self._sites: dict[str, int] = {}
        self.publishes = self.fetches = 0
        self.publish_messages = self.fetch_messages = 0
        self.min_replicas: list[int] = []

        async def build() -> list[Any]:
            nodes, addrs = [], []
            for k, ident in enumerate(self._ids):
                store = Store.open(
                    Path(self._tmp.name) / f"site{k}",
                    limits=StoreLimits(),
                    ttl_ms=config.ttl_seconds * 1000,
                )
                node = DhtNode(ident, store, config)
                addrs.append(await node.start("127.0.0.1", 0))
                nodes.append((node, store))
            for node, _ in nodes[1:]:
                await node.bootstrap([addrs[0]])
            return nodes

        self._nodes = self._run(build())

    def _run(self, coro: Any) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=600)

    def _site(self, node_id: str) -> int:
        return self._sites.setdefault(node_id, len(self._sites) % len(self._ids))

    def publish(self, rows: Sequence[Mapping[str, Any]]) -> None:
        from qisd.core.packet import build_rows, pack_rows

        k = self._site(str(rows[0]["node_id"]))
        ident = self._ids[k]
        node, store = self._nodes[k]
        now = max(int(r["timestamp_utc"]) for r in rows)
        signed = build_rows(rows, ident, now_ms=now)
        envs = [e for body in pack_rows(ident, signed, self._routes) for e in body]

        async def go() -> Any:
            store.put(envs, now_ms=now, local=True)
            return await node.publish(envs)

        before = self._sent(node)
        result = self._run(go())
        self.publishes += 1
        # This node's own RPCs during the publish (the publishes run one at a time).
        self.publish_messages += self._sent(node) - before
        self.min_replicas.append(result.min_replicas)

    @staticmethod
    def _sent(node: Any) -> int:
        return int(sum(node.stats()["rpcs_sent"].values()))

    def fetch(self, path: str) -> list[dict[str, Any]]:
        from qisd.core.fingerprint import key_for_path
        from qisd.core.packet import batch_rows

        node, _ = self._nodes[self.fetches % len(self._nodes)]
        before = self._sent(node)
        envs = self._run(node.fetch(key_for_path(path)))
        self.fetches += 1
        self.fetch_messages += self._sent(node) - before
        return [row for env in envs for row in batch_rows(env.batch())]

    def sent_total(self) -> int:
        """Every RPC any node of the swarm sent so far (lookups, stores, pings, hand-offs)."""
        return sum(self._sent(node) for node, _ in self._nodes)

    def close(self) -> None:
        async def stop() -> None:
            for node, store in self._nodes:
                await node.stop()
                store.close()

        self._run(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._tmp.cleanup()


@dataclass(frozen=True)
class World:
    """The hidden ground truth: true mean delta per (problem type, intervention)."""

    problems: tuple[str, ...]
    interventions: tuple[str, ...]
    truth: dict[str, dict[str, float]]
    noise: float

    def best(self, problem: str) -> str:
        effects = self.truth[problem]
        return max(effects, key=lambda x: effects[x])

    @classmethod
    def make(cls, rng: random.Random, problems: int = 4, interventions: int = 6) -> World:
        names = tuple(f"problem{p}" for p in range(problems))
        xs = tuple(f"intervention{i}" for i in range(interventions))
        truth: dict[str, dict[str, float]] = {}
        bests = rng.sample(xs, problems) if problems <= interventions else list(xs) * problems
        for p, best in zip(names, bests, strict=False):
            truth[p] = {x: round(rng.uniform(0.0, 0.2), 3) for x in xs}
            truth[p][best] = 0.30
        return cls(names, xs, truth, noise=0.10)


@dataclass
class Site:
    """One simulated site (a liar's ``kind`` says how it lies; honest sites have ``""``)."""

    node_id: str
    problem: str
    kind: str = ""
    regret: float = 0.0
    curve: list[float] = field(default_factory=list)

    @property
    def liar(self) -> bool:
        """Whether the site ever lies."""
        return bool(self.kind)


RULES = ("quorum", "no quorum", "trust")
"""The election rules compared: The Math's quorum, the quorum off, the trust rule."""
STRATEGIES = ("constant", "sybil", "sleeper", "copier")
"""How liars lie (see :func:`run`)."""
LIE = 10.0
"""What constant liars, sybils and sleepers claim for their pick."""
COPIER_MARGIN = 0.15
"""Copiers claim the best true delta plus this for their pick: plausible, and the best."""


def _row(
    site: Site,
    x: str,
    delta: float,
    ts: int,
    rng: random.Random,
    *,
    boast: bool = False,
    node_id: str | None = None,
) -> dict[str, Any]:
    return {
        "node_id": node_id or site.node_id,
        "timestamp_utc": ts,
        "domain": DOMAIN,
        "problem_type": site.problem,
        "model_architecture": ARCH,
        "training_phase": "finetune",
        "metric_name": "accuracy",
        "metric_delta": delta,
        "metric_value": 0.6 + delta,
        "confidence": 1.0 if boast else round(rng.uniform(0.6, 0.95), 2),
        "intervention_type": x,
        "intervention_params": json.dumps({"strength": 1}),
        "outcome_decile": 10 if boast else min(10, max(1, int(5 + delta * 15))),
        "sample_count": 10**9 if boast else rng.randint(20, 500),
        "raw_data_hash": "",
    }  # fmt: skip


@dataclass(frozen=True)
class RunResult:
    """What one simulated run measured."""

    sites: int
    liars: int
    rounds_to_best: int | None
    regret_per_site: float
    curve: list[float]
    seconds: float
    violations: int = 0
    """Site-rounds whose recommendation was the liars' pick, while the liars' keys were under
    a third of the path's signers, and would not have been without the liars' rows (the
    guarantee says 0)."""
    guarded: int = 0
    """Site-rounds in which the liars' keys were under a third of the path's signers."""


def _pick(out: Mapping[str, Any]) -> str | None:
    best = out["best_intervention"] if out["status"] == "synthesized" else None
    return None if best is None else str(best)


def run(
    n_sites: int,
    rounds: int,
    seed: int,
    *,
    liar_fraction: float = 0.0,
    strategy: str = "constant",
    sleep_rounds: int = 8,
    epsilon: float = 0.1,
    guided: bool = True,
    exchange: Exchange | None = None,
    config: MathConfig | None = None,
    rule: str | None = None,
    trust: TrustConfig | None = None,
    t0: int = T0,
) -> RunResult:
    """Simulate ``rounds`` synchronous rounds of ``n_sites`` sites and measure learning.

    ``rule``: ``"quorum"`` (default, unless ``config`` is given), ``"no quorum"`` or
    ``"trust"`` (each site synthesizes with its own node id, so its own outcomes check the
    others). Liars (``liar_fraction`` of the sites, spread over the problem types) push the
    intervention that is worst for their problem type:

    * ``constant``: every round, +10 for it with the largest weight anyone can claim;
    * ``sybil``: the same, signed with a fresh key every round;
    * ``sleeper``: honest (follow the election, report truly) for ``sleep_rounds`` rounds,
      then constant;
    * ``copier``: every round, a copy of one honest report of the previous round on another
      intervention (so they agree with what sites observe), and the best true delta + 0.15
      for their pick with the largest weight.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown liar strategy {strategy!r}")
    if rule is None:
        rule = "quorum" if config is None or config.byzantine_fraction > 0 else "no quorum"
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}")
    if config is None:
        config = MathConfig(byzantine_fraction=0) if rule == "no quorum" else MathConfig()
    started = time.perf_counter()
    rng = random.Random(seed)
    world = World.make(rng)
    exchange = exchange if exchange is not None else InMemoryExchange()
    template_id = default_template_doc(DOMAIN).template_id
    level = DEFAULT_TEMPLATE.levels[-1]
    n_liars = int(n_sites * liar_fraction)
    sites = [
        Site(
            f"{k:032x}",
            world.problems[k % len(world.problems)],
            kind=strategy if k % n_sites < n_liars else "",
        )
        for k in range(n_sites)
    ]
    rng.shuffle(sites)  # liars spread over the problem types
    # Each liar boosts the intervention that is worst for its problem type.
    target = {p: min(world.truth[p], key=lambda x: world.truth[p][x]) for p in world.problems}
    paths = {
        p: DEFAULT_TEMPLATE.path(
            {"domain": DOMAIN, "problem_type": p, "model_architecture": ARCH}, level
        )
        for p in world.problems
    }
    honest = [s for s in sites if not s.liar]
    liar_keys: dict[str, set[str]] = {p: set() for p in world.problems}
    previous: dict[str, list[dict[str, Any]]] = {p: [] for p in world.problems}
    newcomer = "f" * 32  # a site with no history of its own, for "rounds to best"
    stable_since: int | None = None
    violations = guarded = 0
    for r in range(rounds):
        now = t0 + r * ROUND_MS
        shared: dict[str, dict[str, Any]] = {}
        evidence: dict[str, Evidence] = {}
        fetched: dict[str, list[dict[str, Any]]] = {}
        for p, path in paths.items():
            rows = fetched[p] = exchange.fetch(path)
            if rule == "trust":
                evidence[p] = Evidence.from_rows(rows, config, now_ms=now)
                shared[p] = synthesize(
                    evidence[p], path=path, template_id=template_id, now_ms=now,
                    own_node_id=newcomer, trust=trust,
                )  # fmt: skip
            else:
                # All sites of one path see the same rows this round, so one synthesis per
                # path stands for each of theirs (a simulation shortcut; the result is
                # identical). The trust rule's result depends on the site's own rows.
                shared[p] = synthesize(
                    rows, path=path, template_id=template_id, now_ms=now, config=config
                )

        # A new site with no history would follow the recommendation as it stands now.
        if all(_pick(shared[p]) == world.best(p) for p in world.problems):
            if stable_since is None:
                stable_since = r
        else:
            stable_since = None
        published: dict[str, list[dict[str, Any]]] = {p: [] for p in world.problems}
        for site in sites:
            p = site.problem
            lying = site.kind in ("constant", "sybil") or (
                site.kind == "sleeper" and r >= sleep_rounds
            )
            if lying or site.kind == "copier":
                key = f"{int(site.node_id, 16):016x}{r:016x}" if site.kind == "sybil" else None
                claim = LIE if lying else world.truth[p][world.best(p)] + COPIER_MARGIN
                row = _row(site, target[p], claim, now + 1, rng, boast=True, node_id=key)
                liar_keys[p].add(row["node_id"])
                rows_out = [row]
                if site.kind == "copier":
                    pool = [h for h in previous[p] if h["intervention_type"] != target[p]]
                    if pool:
                        copy = dict(rng.choice(pool))
                        copy.update(node_id=site.node_id, timestamp_utc=now + 1)
                        rows_out.append(copy)
                exchange.publish(rows_out)
                continue
            out = shared[p]
            if rule == "trust":
                out = synthesize(
                    evidence[p], path=paths[p], template_id=template_id, now_ms=now,
                    own_node_id=site.node_id, trust=trust,
                )  # fmt: skip
            if site.liar:  # a sleeper, honest for now
                liar_keys[p].add(site.node_id)
            elif liar_keys[p] and 3 * len(liar_keys[p]) < out["distinct_signers"]:
                # The guarantee: liars under a third never make their pick the
                # recommendation on their own, i.e. unless it would be without them too.
                guarded += 1
                if _pick(out) == target[p]:
                    honest_rows = [h for h in fetched[p] if h["node_id"] not in liar_keys[p]]
                    alone = synthesize(
                        honest_rows, path=paths[p], template_id=template_id, now_ms=now,
                        config=config, own_node_id=site.node_id if rule == "trust" else None,
                        trust=trust,
                    )  # fmt: skip
                    violations += _pick(alone) != target[p]
            pick = _pick(out)
            leads = out["worth_exploring"] if guided else []
            if pick is not None and rng.random() >= epsilon:
                x = pick
            elif leads and rng.random() < 0.5:
                # Guided exploration: half of the exploring goes to what synthesis flags.
                x = rng.choice(leads)
            else:
                x = rng.choice(world.interventions)
            effect = world.truth[p][x]
            row = _row(site, x, rng.gauss(effect, world.noise), now + 1, rng)
            if not site.liar:
                loss = world.truth[p][world.best(p)] - effect
                site.regret += loss
                site.curve.append(loss)
                published[p].append(row)
            exchange.publish([row])
        previous = published
    curve = [statistics.fmean(s.curve[r] for s in honest) for r in range(rounds)]
    return RunResult(
        sites=n_sites,
        liars=n_liars,
        rounds_to_best=stable_since,
        regret_per_site=statistics.fmean(s.regret for s in honest),
        curve=curve,
        seconds=time.perf_counter() - started,
        violations=violations,
        guarded=guarded,
    )


def _fmt_rounds(values: list[int | None], rounds: int) -> str:
    shown = [str(v) if v is not None else f">{rounds - 1}" for v in values]
    known = [v for v in values if v is not None]
    median = statistics.median(known) if len(known) == len(values) else None
    head = f"{median:g}" if median is not None else "n/a"
    return f"{head} [{', '.join(shown)}]"


Variant = tuple[str, float, bool, str]
"""(liar strategy, liar fraction, guided exploration, rule)."""


def _label(variant: Variant) -> str:
    strategy, frac, guided, rule = variant
    text = ("guided" if guided else "uniform") + f", {rule}"
    if frac:
        text += f", {round(frac * 100)}% " + ("liars" if strategy == "constant" else strategy)
    return text


def _strategies(text: str) -> list[tuple[str, float]]:
    out = []
    for item in text.split(","):
        if item:
            name, _, frac = item.partition(":")
            if name not in STRATEGIES:
                raise SystemExit(f"unknown liar strategy {name!r} (one of {STRATEGIES})")
            out.append((name, float(frac or 0.2)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="10,100,1000", help="comma-separated swarm sizes")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument(
        "--seeds",
        default="",
        help="runs per size (seeds 0..n-1): one number, or one per size (e.g. 3,3,1); "
        "default 3, and 1 from N = 1,000 (the trust rule takes minutes per run there)",
    )
    parser.add_argument(
        "--liars",
        default="constant:0.2,constant:0.33,sybil:0.2,sleeper:0.2,copier:0.2",
        help="liar strategies as name:fraction ('' = none); names: " + ", ".join(STRATEGIES),
    )
    parser.add_argument("--sleep-rounds", type=int, default=8, help="sleepers' honest rounds")
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated rules")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    parser.add_argument(
        "--dht-sites",
        default="10,50,100",
        help="swarm sizes also run over a real in-process DHT ('' = none)",
    )
    parser.add_argument("--dht-rounds", type=int, default=8, help="rounds of each DHT run")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sites.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s] or [1 if n >= 1000 else 3 for n in sizes]
    if len(seeds) == 1:
        seeds *= len(sizes)
    if len(seeds) != len(sizes):
        raise SystemExit("--seeds takes one number or one per size")
    rules = [r for r in args.rules.split(",") if r]
    if unknown := set(rules) - set(RULES):
        raise SystemExit(f"unknown rules {sorted(unknown)} (from {RULES})")
    variants: list[Variant] = [("constant", 0.0, False, "quorum")]
    for strategy, frac in [("constant", 0.0), *_strategies(args.liars)]:
        variants += [(strategy, frac, True, rule) for rule in rules]
    results: dict[tuple[int, Variant], list[RunResult]] = {}
    started = time.perf_counter()
    for n, n_seeds in zip(sizes, seeds, strict=True):
        for variant in variants:
            strategy, frac, guided, rule = variant
            results[(n, variant)] = [
                run(
                    n,
                    args.rounds,
                    seed,
                    liar_fraction=frac,
                    strategy=strategy,
                    guided=guided,
                    rule=rule,
                    sleep_rounds=args.sleep_rounds,
                )  # fmt: skip
                for seed in range(n_seeds)
            ]
            print(f"  ran N={n} {_label(variant)}", file=sys.stderr, flush=True)
    total = time.perf_counter() - started

    print(
        f"swarm: {args.rounds} rounds, 4 problem types x 6 interventions, noise sd 0.10, "
        f"best +0.30, epsilon 0.1, seeds per size {dict(zip(sizes, seeds, strict=True))}, "
        "sleepers honest for "
        f"{args.sleep_rounds} rounds"
    )
    header = (
        f"{'sites':>6} {'variant':<34} {'rounds to best: median [per seed]':<34} "
        f"{'regret/site':>11} {'last-5 regret/round':>20} {'liar pick recommended':>22} "
        f"{'s/run':>6}"
    )
    print(header)
    print("-" * len(header))
    for (n, variant), runs in results.items():
        regret = statistics.fmean(r.regret_per_site for r in runs)
        tail = statistics.fmean(statistics.fmean(r.curve[-5:]) for r in runs)
        secs = statistics.fmean(r.seconds for r in runs)
        guarded = sum(r.guarded for r in runs)
        shown = f"{sum(r.violations for r in runs)}/{guarded}" if guarded else "-"
        print(
            f"{n:>6} {_label(variant):<34} "
            f"{_fmt_rounds([r.rounds_to_best for r in runs], args.rounds):<34} "
            f"{regret:>11.3f} {tail:>20.4f} {shown:>22} {secs:>6.2f}"
        )
    print(f"total {total:.1f} s")
    _goals(results, sizes)
    _plot(results, Path(args.out), args.rounds)
    dht_sizes = [int(x) for x in args.dht_sites.split(",") if x]
    if dht_sizes:
        _dht_runs(dht_sizes, args.dht_rounds)
    return 0


def _goals(results: dict[tuple[int, Variant], list[RunResult]], sizes: Sequence[int]) -> None:
    """The trust rule's goals: honest regret within 1.1x of no quorum's, liars' regret at or
    below the quorum rule's, the liars' pick never recommended under a third."""

    def regret(n: int, strategy: str, frac: float, rule: str) -> float | None:
        runs = results.get((n, (strategy, frac, True, rule)))
        return statistics.fmean(r.regret_per_site for r in runs) if runs else None

    print()
    print("trust rule goals (ratio = trust / reference regret; violations = site-rounds):")
    for n in sizes:
        t, nq = regret(n, "constant", 0.0, "trust"), regret(n, "constant", 0.0, "no quorum")
        if t is None or nq is None:
            continue
        print(f"  N={n}: no liars, trust / no quorum = {t / nq:.3f} (goal <= 1.1)")
        for (m, variant), runs in results.items():
            strategy, frac, _, rule = variant
            if m != n or not frac or rule != "trust":
                continue
            q = regret(n, strategy, frac, "quorum")
            ratio = f"{statistics.fmean(r.regret_per_site for r in runs) / q:.3f}" if q else "-"
            bad = sum(r.violations for r in runs)
            print(
                f"  N={n}: {_label(variant)}: trust / quorum = {ratio} (goal <= 1), "
                f"liars' pick recommended {bad} times while under a third (goal 0)"
            )


def _dht_runs(sizes: Sequence[int], rounds: int) -> None:
    """The same loop with every publish and fetch going over a real in-process DHT."""
    print()
    print(
        f"over the DHT (real DhtNodes on 127.0.0.1, k=20, alpha=3; {rounds} rounds, seed 0, "
        "guided, quorum on): messages each site sends per round = one publish (its outcome, "
        "2 routable levels) + one fetch (its path)"
    )
    header = (
        f"{'sites':>6} {'msgs/publish':>13} {'msgs/fetch':>11} {'msgs/site/round':>16} "
        f"{'all sent/site/round':>20} {'min replicas':>13} {'regret/site':>12} {'s':>6}"
    )
    print(header)
    print("-" * len(header))
    for n in sizes:
        started = time.perf_counter()
        exchange = DhtExchange(n)
        try:
            sent0 = exchange.sent_total()
            t0 = int(time.time() * 1000) - (rounds + 1) * ROUND_MS
            result = run(n, rounds, 0, exchange=exchange, t0=t0)
            per_pub = exchange.publish_messages / max(exchange.publishes, 1)
            per_fetch = exchange.fetch_messages / max(exchange.fetches, 1)
            all_sent = (exchange.sent_total() - sent0) / (n * rounds)
            print(
                f"{n:>6} {per_pub:>13.1f} {per_fetch:>11.1f} {per_pub + per_fetch:>16.1f} "
                f"{all_sent:>20.1f} {min(exchange.min_replicas):>13} "
                f"{result.regret_per_site:>12.3f} {time.perf_counter() - started:>6.1f}"
            )
        finally:
            exchange.close()


def _plot(results: dict[tuple[int, Variant], list[RunResult]], out: Path, rounds: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plots written", file=sys.stderr)
        return
    if not results:
        return
    out.mkdir(parents=True, exist_ok=True)
    scenarios = list(dict.fromkeys((v[0], v[1]) for _, v in results if v[2]))
    styles = {"quorum": "-", "no quorum": "-.", "trust": "--"}
    cols = min(3, len(scenarios))
    rows_n = -(-len(scenarios) // cols)
    sizes = sorted({n for n, _ in results})

    def title(strategy: str, frac: float) -> str:
        if not frac:
            return "no liars"
        return f"{round(frac * 100)}% " + ("liars" if strategy == "constant" else strategy)

    for name, per_round in (("swarm_regret_curve.png", True), ("swarm_regret_vs_n.png", False)):
        fig, axes = plt.subplots(
            rows_n, cols, figsize=(4.2 * cols, 3.3 * rows_n), squeeze=False, sharey=per_round
        )
        for k, (strategy, frac) in enumerate(scenarios):
            ax = axes[k // cols][k % cols]
            for rule in RULES:
                variant = (strategy, frac, True, rule)
                if per_round:
                    runs = results.get((sizes[-1], variant))
                    if runs:
                        curve = [statistics.fmean(r.curve[i] for r in runs) for i in range(rounds)]
                        ax.plot(range(rounds), curve, styles[rule], label=rule)
                else:
                    ns = [n for n in sizes if (n, variant) in results]
                    regrets = [
                        statistics.fmean(r.regret_per_site for r in results[(n, variant)])
                        for n in ns
                    ]
                    ax.plot(ns, regrets, "o" + styles[rule], label=rule)
            ax.set_title(title(strategy, frac), fontsize=9)
            if per_round:
                ax.set_xlabel("round")
            else:
                ax.set_xscale("log")
                ax.set_xlabel("sites N")
            ax.legend(fontsize=7)
        for k in range(len(scenarios), rows_n * cols):
            axes[k // cols][k % cols].axis("off")
        fig.supylabel(
            f"regret per honest site per round (N={sizes[-1]})"
            if per_round
            else f"cumulative regret per honest site ({rounds} rounds)",
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    print(f"plots: {out / 'swarm_regret_curve.png'}, {out / 'swarm_regret_vs_n.png'}")


if __name__ == "__main__":
    raise SystemExit(main())
