"""The attach check's figures: exact counts, the interface label, and how workers' figures merge.

The RSGI app is driven directly, as Granian calls it (``__rsgi__(scope, protocol)``); the
server path itself is covered by test_eir_service.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from imeisync.adapters.attach_index import AttachIndex
from imeisync.entrypoints.eir import EIC_PATH, KeeperLookup, create_app
from imeisync.entrypoints.eir_metrics import Metrics
from imeisync.entrypoints.telemetry import merge as merge_families
from imeisync.entrypoints.telemetry import render
from support.eir_harness import call_rsgi

BLOCKED = 35209900176148


class _Keeper:
    def __init__(self) -> None:
        self.index = AttachIndex()
        self.index.blocked.add(BLOCKED)

    def health(self) -> dict[str, Any]:
        return {"ready": True, "database_reachable": True, "entries": 1}

    def stop(self) -> None:
        pass


def _drive(app: Any, requests: list[tuple[str, str, str]]) -> list[int]:
    async def run() -> list[int]:
        return [(await call_rsgi(app, *request))[0] for request in requests]

    return asyncio.run(run())


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted((k, v) for k, v in s.labels.items() if k != "worker")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name}


def test_every_answer_is_counted_once_by_outcome_and_in_the_histogram() -> None:
    app = create_app(KeeperLookup(_Keeper()))
    requests = ([("GET", EIC_PATH, f"pei=imei-{BLOCKED}0")] * 7
                + [("GET", EIC_PATH, "pei=imei-01234567890123")] * 5
                + [("GET", EIC_PATH, "supi=imsi-238010000000001")] * 3
                + [("POST", EIC_PATH, "")] * 2 + [("GET", "/healthz", "")] * 4)

    codes = _drive(app, requests)

    assert codes == [200] * 12 + [400] * 3 + [405] * 2 + [200] * 4
    text = app.render_metrics().decode()
    counts = _samples(text, "imeisync_attach_checks_total")
    labelled = {dict(k)["outcome"]: v for k, v in counts.items()}
    assert {dict(k)["interface"] for k in counts} == {"n5g-eir"}
    assert labelled["BLACKLISTED"] == 7 and labelled["WHITELISTED"] == 5
    assert labelled["bad_request"] == 3 and labelled["method_not_allowed"] == 2
    assert sum(labelled.values()) == 17  # /healthz is not an attach check
    histogram = _samples(text, "imeisync_attach_check_seconds_count")
    assert histogram == {(("interface", "n5g-eir"),): 17.0}


def test_a_workers_snapshot_renders_the_same_families_and_merges_with_s13_figures() -> None:
    live = Metrics(lambda: {"entries": 3, "ready": True}, worker="101")
    live.observe(1, 0.0001)
    live.observe(1, 0.002)
    s13 = Metrics(lambda: {"entries": 3}, interface="s13", worker="202")
    s13.observe(0, 0.00003)

    restored = Metrics.from_snapshot(live.snapshot(live.health()))
    again = Metrics.from_snapshot(s13.snapshot(s13.health()))
    text = render(merge_families([restored, again])).decode()

    assert text.count("# TYPE imeisync_attach_checks_total counter") == 1
    counts = _samples(text, "imeisync_attach_checks_total")
    assert counts[(("interface", "n5g-eir"), ("outcome", "BLACKLISTED"))] == 2
    assert counts[(("interface", "s13"), ("outcome", "WHITELISTED"))] == 1
    assert _samples(text, "imeisync_attach_check_seconds_count") == {
        (("interface", "n5g-eir"),): 2.0, (("interface", "s13"),): 1.0}
    assert render(merge_families([live])) == render(merge_families([restored]))
