"""The Node facade in-process: real UDP sockets on 127.0.0.1 and real SQLite stores.

Each test runs its own event loop with ``asyncio.run`` and waits on the node's own events
(subscriptions, futures) under ``asyncio.timeout``; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from qisd.config import DhtConfig, NodeConfig
from qisd.core.packet import RESULT_SCHEMA
from qisd.errors import FieldError, PacketError, UsageError
from qisd.net.datadir import DaemonRunningError, init_identity
from qisd.net.node import Node

PATH = "clinical.oncology/treatment_response_classification"
FINE = PATH + "/transformer-256d"


def row(i: int = 0, **overrides: Any) -> dict[str, Any]:
    out = {
        "domain": "clinical.oncology",
        "problem_type": "treatment_response_classification",
        "model_architecture": "transformer-256d",
        "training_phase": "epoch_5_of_50",
        "metric_name": "val_auc",
        "metric_value": 0.847,
        "metric_delta": 0.01 + 0.001 * i,
        "confidence": 0.91,
        "intervention_type": "learning_rate_schedule",
        "intervention_params": {"schedule": "cosine_annealing", "T_max": 10},
        "outcome_decile": 8,
        "sample_count": 1240,
    }
    out.update(overrides)
    return out


def config(data_dir: Path, *peers: tuple[str, int], **extra: Any) -> NodeConfig:
    init_identity(data_dir) if not (data_dir / "node.key").exists() else None
    return NodeConfig(
        data_dir=str(data_dir),
        host="127.0.0.1",
        port=0,
        bootstrap=tuple(f"{h}:{p}" for h, p in peers),
        bootstrap_file=os.devnull,
        dht=DhtConfig(ksize=8, rpc_timeout=1.0),
        **extra,
    )


def run(main: Callable[[], Awaitable[Any]], timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await main()

    return asyncio.run(bounded())


async def settle(nodes: list[Node]) -> None:
    """Wait until no node has DHT work pending (new contacts being verified, hand-offs)."""
    while True:
        pending = [t for n in nodes for t in n.dht.protocol._tasks]
        if not pending:
            return
        await asyncio.gather(*pending, return_exceptions=True)


@contextlib.asynccontextmanager
async def network(tmp_path: Path, n: int, **extra: Any) -> AsyncIterator[list[Node]]:
    """``n`` nodes, each bootstrapped to the first."""
    nodes: list[Node] = []
    try:
        first = await Node.open(config(tmp_path / "n0", **extra))
        nodes.append(first)
        assert first.address is not None
        for i in range(1, n):
            nodes.append(await Node.open(config(tmp_path / f"n{i}", first.address, **extra)))
        await settle(nodes)
        yield nodes
    finally:
        for node in reversed(nodes):
            await node.close()


BY_PHASE = {
    "domain": "clinical.oncology",
    "fields": ["domain", "problem_type", "model_architecture", "training_phase"],
    "levels": [2, 3],
}
"""A template with a field it does not file by: a 4-segment path is deeper than every key."""
EARLY = FINE + "/epoch_5_of_50"
LATE = FINE + "/epoch_9_of_50"


@contextlib.asynccontextmanager
async def phase_network(tmp_path: Path, n: int, **extra: Any) -> AsyncIterator[list[Node]]:
    """``network`` whose nodes all have ``BY_PHASE`` pinned for clinical.oncology."""
    async with network(tmp_path, n) as nodes:
        tid = (await nodes[0].publish_template(BY_PHASE))["template_id"]
        for node in nodes[1:]:
            await node.templates("clinical.oncology")  # a pin needs its document in the store
    pinned = {"clinical.oncology": tid}
    async with network(tmp_path, n, pinned_templates=pinned, **extra) as nodes:
        yield nodes


def test_emit_commits_before_returning_and_query_reads_it_back(tmp_path: Path) -> None:
    async def main() -> None:
        async with network(tmp_path, 1) as (node,):
            result = await node.emit([row(0), row(1)])
            assert result.rows == 2 and len(result.packet_ids) == 1
            # Committed: a second handle on the same file sees it without the node's help.
            table = await node.query(PATH, local_only=True)
            assert table.schema == RESULT_SCHEMA
            assert table.num_rows == 2
            assert set(table.column("node_id").to_pylist()) == {node.identity.node_id}
            assert set(table.column("packet_id").to_pylist()) == set(result.packet_ids)
            # Stored under both routable levels of the default template.
            assert (await node.query(FINE, local_only=True)).num_rows == 2
            assert node.status()["counters"]["rows_emitted"] == 2

    run(main)


def test_a_query_deeper_than_the_routable_levels_filters_on_the_further_fields(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with phase_network(tmp_path, 1) as (node,):
            await node.emit([row(0), row(1, training_phase="epoch_9_of_50")])
            assert (await node.query(FINE, local_only=True)).num_rows == 2
            early = await node.query(EARLY, local_only=True)
            assert early.column("training_phase").to_pylist() == ["epoch_5_of_50"]
            assert (await node.query(FINE + "/epoch_7_of_50")).num_rows == 0
            with pytest.raises(UsageError, match="too coarse"):
                await node.query("clinical.oncology")
            with pytest.raises(UsageError, match="4 fields"):
                await node.query(FINE + "/epoch_5_of_50/val_auc")

    run(main)


def test_emit_is_all_or_nothing_and_names_the_bad_row(tmp_path: Path) -> None:
    async def main() -> None:
        async with network(tmp_path, 1) as (node,):
            with pytest.raises(FieldError) as err:
                await node.emit([row(0), row(1, confidence=1.5)])
            assert err.value.field == "confidence" and err.value.row == 1
            assert "row 1" in str(err.value)
            assert node.store.stats()["packets"] == 0
            with pytest.raises(UsageError):
                await node.emit([])
            with pytest.raises(FieldError, match="older than the packet lifetime"):
                await node.emit([row(0, timestamp_utc=1_000)])
            assert node.store.stats()["packets"] == 0
            assert node.status()["counters"]["rejected_emits"] == 2

    run(main)


def test_emit_table_partial_keeps_valid_rows_and_reports_rejections(tmp_path: Path) -> None:
    async def main() -> None:
        async with network(tmp_path, 1) as (node,):
            rows = [row(0), row(1, outcome_decile=11), row(2), row(3, confidence=-0.5)]
            table = pa.Table.from_pylist([dict(r, intervention_params='{"a":1}') for r in rows])
            with pytest.raises(PacketError):
                await node.emit_table(table)
            assert node.store.stats()["packets"] == 0
            result = await node.emit_table(table, partial=True)
            assert result.rows == 2
            assert [i for i, _ in result.rejected] == [1, 3]
            assert "outcome_decile" in result.rejected[0][1]
            assert (await node.query(PATH, local_only=True)).num_rows == 2
            # A row past the packet lifetime is left out like a bad one, by its own row number
            # (not by its place among the rows that passed).
            now = int(time.time() * 1000)
            rows = [row(4, confidence=2.0), row(5, timestamp_utc=1_000), row(6)]
            rows = [{"timestamp_utc": now, **r, "intervention_params": "{}"} for r in rows]
            table = pa.Table.from_pylist(rows)
            result = await node.emit_table(table, partial=True)
            assert result.rows == 1
            assert [i for i, _ in result.rejected] == [0, 1]
            assert result.rejected[1][1].startswith("row 1: timestamp_utc=1000")
            assert "older than the packet lifetime" in result.rejected[1][1]

    run(main)


def test_packet_emitted_on_one_node_is_found_from_another(tmp_path: Path) -> None:
    async def main() -> None:
        async with network(tmp_path, 4) as nodes:
            emitter, asker = nodes[2], nodes[3]
            result = await emitter.emit([row(7)], wait_replicas=1)
            (pid,) = result.packet_ids
            assert result.replicas[pid] >= 1
            table = await asker.query(PATH)
            assert table.column("packet_id").to_pylist() == [pid]
            got = table.to_pylist()[0]
            assert got["node_id"] == emitter.identity.node_id
            assert got["intervention_params"] == '{"schedule":"cosine_annealing","T_max":10}'
            # The network's packets are kept: the asker now has them locally.
            assert (await asker.query(PATH, local_only=True)).num_rows == 1
            assert emitter.status()["peers"] >= 1

    run(main)


def test_subscribers_get_local_emits_and_network_pushes(tmp_path: Path) -> None:
    async def main() -> None:
        async with network(tmp_path, 3) as nodes:
            emitter, follower = nodes[1], nodes[2]
            stream = follower.subscribe(PATH)
            first = asyncio.ensure_future(anext(stream))
            local = emitter.subscribe(PATH)
            local_first = asyncio.ensure_future(anext(local))
            await follower.follow(PATH)  # registers with the key's holders (listen)
            result = await emitter.emit([row(3)], wait_replicas=1)
            pushed = await first
            assert pushed.column("packet_id").to_pylist() == result.packet_ids
            assert (await local_first).column("packet_id").to_pylist() == result.packet_ids
            await stream.aclose()
            await local.aclose()
            assert not follower._subscribers and not emitter._subscribers

    run(main)


def test_a_subscriber_to_a_deeper_path_gets_only_its_own_rows(tmp_path: Path) -> None:
    async def main() -> None:
        async with phase_network(tmp_path, 1) as (node,):
            early, late = node.subscribe(EARLY), node.subscribe(LATE)
            early_first = asyncio.ensure_future(anext(early))
            late_first = asyncio.ensure_future(anext(late))
            # Filed under the same key, matching neither path: delivered to neither.
            await node.emit([row(0, training_phase="epoch_7_of_50")])
            # One packet with a row for each path: each subscriber gets its own row only.
            both = await node.emit([row(1), row(2, training_phase="epoch_9_of_50")])
            assert len(both.packet_ids) == 1
            async with asyncio.timeout(10):  # a local emit is handed over as it commits
                got = await early_first
            assert got.column("training_phase").to_pylist() == ["epoch_5_of_50"]
            assert got.column("packet_id").to_pylist() == both.packet_ids
            got = await late_first
            assert got.column("training_phase").to_pylist() == ["epoch_9_of_50"]
            await late.aclose()
            # Nothing else was queued for the early subscriber in between.
            only = await node.emit([row(3)])
            assert (await anext(early)).column("packet_id").to_pylist() == only.packet_ids
            # Both listened where their packets are filed: the deepest routable level.
            assert early.key == late.key == node.query_route(FINE)[0]
            await early.aclose()
            assert not node._subscribers

            # A path no key answers is refused, as a query of it is, not silently empty.
            with pytest.raises(UsageError, match="too coarse"):
                node.subscribe("clinical.oncology")
            with pytest.raises(UsageError, match="too coarse"):
                await node.follow("clinical.oncology")
            with pytest.raises(UsageError, match="4 fields"):
                await node.follow(EARLY + "/val_auc")
            assert node.followed() == []

    run(main)


def test_followers_of_deeper_paths_sharing_a_key_each_keep_their_own(tmp_path: Path) -> None:
    async def main() -> None:
        async with phase_network(tmp_path, 2, election_seconds=3600) as (seed, node):
            await node.follow(EARLY)
            await node.follow(LATE)
            key = node.query_route(LATE)[0]
            assert key == node.query_route(EARLY)[0] and key in node._listening
            await node.unfollow(EARLY)
            # LATE reads the same key: unfollowing EARLY must not stop listening on it.
            assert node.followed() == [LATE] and key in node._listening
            stream = node.subscribe(LATE)
            waiting = asyncio.ensure_future(anext(stream))
            await seed.emit(
                [row(0, intervention_type="warmup"), row(1, training_phase="epoch_9_of_50")],
                wait_replicas=1,
            )
            got = await waiting  # from the network
            assert got.column("training_phase").to_pylist() == ["epoch_9_of_50"]
            await stream.aclose()
            assert key in node._listening  # still followed
            # The followed path's synthesis is of its own rows, not of the whole key.
            while node._syntheses.get(LATE, {}).get("packets_analyzed") != 1:
                node._elected.clear()
                await node._elected.wait()
            synthesis = node.status()["syntheses"][LATE]
            assert [i["intervention"] for i in synthesis["interventions"]] == [
                "learning_rate_schedule"
            ]

    run(main)


def test_a_followed_path_moves_to_the_key_a_newly_hired_template_routes_it_to(
    tmp_path: Path,
) -> None:
    domain = "clinical.oncology"
    # Files by domain/problem only: FINE becomes deeper than every key it routes by.
    coarse = {
        "domain": domain,
        "fields": ["domain", "problem_type", "model_architecture"],
        "levels": [2],
    }

    async def main() -> None:
        async with network(tmp_path, 3, election_seconds=3600) as (a, b, c):
            await c.follow(FINE)
            old, before = c.query_route(FINE)
            assert before == {} and old in c._listening  # a key of its own under the default
            tid = (await a.publish_template(coarse))["template_id"]
            await a.endorse_template(tid)
            await b.endorse_template(tid, domain)
            assert (await c.templates(domain))["hired"] == tid
            new, wanted = c.query_route(FINE)
            assert new == c.query_route(PATH)[0] != old
            assert wanted == {"model_architecture": "transformer-256d"}
            # The next pass of the election loop listens where the path now lives and lets
            # the old key go (nothing else reads it).
            c._elected.clear()
            c._dirty.set()
            await c._elected.wait()
            assert new in c._listening and old not in c._listening
            # And a packet filed there is pushed to c, whose synthesis of the path takes it.
            await a.emit([row(0, intervention_type="warmup")], wait_replicas=2)
            while c._syntheses.get(FINE, {}).get("packets_analyzed") != 1:
                c._elected.clear()
                await c._elected.wait()

    run(main)


def test_a_follow_made_while_the_election_loop_registers_keeps_its_key(tmp_path: Path) -> None:
    one, two = PATH + "_one", PATH + "_two"

    async def main() -> None:
        async with network(tmp_path, 1, election_seconds=3600) as (node,):
            first, second = node.query_route(one)[0], node.query_route(two)[0]
            entered, gate = asyncio.Event(), asyncio.Event()
            real = node.dht.follow

            async def slow_follow(key: bytes, callback: Any) -> None:
                if key == first:  # a registration that takes a while (a slow crawl)
                    entered.set()
                    await gate.wait()
                await real(key, callback)

            node.dht.follow = slow_follow  # type: ignore[method-assign]
            node._followed.append(one)  # followed, not yet registered (as after a re-hire)
            registering = asyncio.ensure_future(node._listen_to_follows())
            await entered.wait()
            await node.follow(two)  # while the pass is registering the first key
            assert second in node._listening
            gate.set()
            await registering
            assert {first, second} <= node._listening

    run(main)


def test_follows_persist_across_restarts_and_feed_the_election_loop(tmp_path: Path) -> None:
    async def main() -> None:
        async with network(tmp_path, 2, election_seconds=3600) as (seed, node):
            await node.follow(PATH)
            await node.follow(PATH)  # idempotent
            assert node.followed() == [PATH]
            with pytest.raises(UsageError):
                await node.unfollow("clinical.oncology/other")
            stream = node.subscribe(PATH)
            waiting = asyncio.ensure_future(anext(stream))
            await seed.emit([row(1)], wait_replicas=1)
            await waiting  # pushed to the follower, not fetched
            await stream.aclose()
            # The push wakes the election loop, which re-runs the synthesis of the path.
            while node._syntheses.get(PATH, {}).get("packets_analyzed") != 1:
                node._elected.clear()
                await node._elected.wait()
            status = node.status()
            assert status["followed"] == [PATH]
            assert status["syntheses"][PATH]["packets_analyzed"] == 1
        reopened = await Node.open(config(tmp_path / "n1"), network=False)
        try:
            assert reopened.followed() == [PATH]
        finally:
            await reopened.close()

    run(main)


def test_synthesis_over_three_sites_found_by_a_fourth(tmp_path: Path) -> None:
    async def main() -> None:
        async with network(tmp_path, 4) as nodes:
            for i, node in enumerate(nodes[:3]):
                await node.emit(
                    [
                        row(i, intervention_type="warmup", metric_delta=0.05 + 0.001 * i),
                        row(i, intervention_type="dropout", metric_delta=0.01 + 0.001 * i),
                    ],
                    wait_replicas=1,
                )
            result = await nodes[3].synthesize(PATH)
            assert result["status"] == "synthesized"
            assert result["distinct_signers"] == 3
            assert result["best_intervention"] == "warmup"
            assert result["packets_analyzed"] == 6

    run(main)


def test_a_second_node_on_one_data_directory_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with network(tmp_path, 1):
            with pytest.raises(DaemonRunningError, match="another qisd daemon"):
                await Node.open(config(tmp_path / "n0"))

    run(main)


def test_a_closed_node_refuses_work_and_releases_the_directory(tmp_path: Path) -> None:
    async def main() -> None:
        node = await Node.open(config(tmp_path / "a"), network=False)
        await node.emit([row(0)])
        await node.close()
        await node.close()  # idempotent
        with pytest.raises(UsageError, match="closed"):
            await node.emit([row(1)])
        again = await Node.open(config(tmp_path / "a"), network=False)
        try:
            assert (await again.query(PATH, local_only=True)).num_rows == 1
        finally:
            await again.close()

    run(main)


def test_hiring_endorsed_templates_route_emits_and_darwinism_scores_them(
    tmp_path: Path,
) -> None:

    domain = "clinical.oncology"
    by_phase = {
        "domain": domain,
        "fields": ["domain", "problem_type", "training_phase"],
        "levels": [2, 3],
        "note": "phase matters more than architecture",
    }

    async def main() -> None:
        async with network(tmp_path, 3) as (a, b, c):
            assert (await c.templates(domain))["reason"] == "default"
            published = await a.publish_template(by_phase)
            tid = published["template_id"]
            assert published["replicas"] >= 1
            # One signer is not enough (min 2 distinct endorsers); the author counts once.
            await a.endorse_template(tid)
            assert (await c.templates(domain))["hired"] != tid
            # A prefix copied from a table works (8+ hex digits); too short a one is refused.
            with pytest.raises(UsageError, match="not known"):
                await b.endorse_template(tid[:6], domain)
            endorsed = await b.endorse_template(tid[:12], domain)
            assert endorsed["template_id"] == tid
            listing = await c.templates(domain)
            assert listing["hired"] == tid and listing["reason"] == "endorsed"
            (entry,) = [t for t in listing["templates"] if t["template_id"] == tid]
            assert entry["endorsers"] == 2 and entry["hired"]

            # c now routes this domain by training phase: its packets live under that key.
            await c.emit([row(0, intervention_type="warmup")], wait_replicas=1)
            phase_path = f"{PATH}/epoch_5_of_50"
            assert (await a.query(phase_path)).num_rows == 1
            assert (await c.query(FINE, local_only=True)).num_rows == 0

            # Darwinism: once c was recommended warmup and reports what happened, every
            # candidate template is scored and the state persists.
            for other in (a, b):
                await other.emit([row(1, intervention_type="warmup")], wait_replicas=1)
            assert (await c.synthesize(phase_path))["best_intervention"] == "warmup"
            await c.emit([row(2, intervention_type="warmup", metric_delta=0.02)])
            await asyncio.gather(*c._callbacks)
            assert c.counters["darwin_observations"] == 1
            assert c.darwin.rounds(domain) == 1
            assert tid in c.darwin.weights(domain)
        again = await Node.open(config(tmp_path / "n2"), network=False)
        try:
            assert again.darwin.rounds(domain) == 1
        finally:
            await again.close()

    run(main)


def test_a_pinned_template_always_wins(tmp_path: Path) -> None:
    from qisd.core.hiring import default_template_doc

    domain = "clinical.oncology"
    default_id = default_template_doc(domain).template_id

    async def main() -> None:
        node = await Node.open(
            config(tmp_path / "p", pinned_templates={domain: default_id}), network=False
        )
        try:
            assert node.hire(domain).reason == "pinned"
            assert node.template_for(domain)[0] == default_id
        finally:
            await node.close()
        unknown = await Node.open(
            config(tmp_path / "q", pinned_templates={domain: "ab" * 20}), network=False
        )
        try:
            with pytest.raises(UsageError, match="pinned template"):
                await unknown.emit([row(0)])
        finally:
            await unknown.close()

    run(main)
