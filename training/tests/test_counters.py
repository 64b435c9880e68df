"""The training pipeline's windowed counts agree with feature-svc's on a shared fixture."""

import json
import pathlib

import pytest

from recsys_training.counters import Counters

FIXTURE = pathlib.Path(__file__).parent / "data" / "counters.json"


def test_counts_match_the_shared_fixture():
    fixture = json.loads(FIXTURE.read_text())
    counters = Counters()
    for event in fixture["events"]:
        counters.record(event["event"], event["timestamp_ms"])
    for query in fixture["queries"]:
        windows = counters.windows(query["as_of_ms"])
        for name in ("last_hour", "last_day", "last_7_days", "last_30_days"):
            window = windows[name]
            got = [window["impressions"], window["clicks"], window["likes"], window["purchases"]]
            assert got == query[name], (query["as_of_ms"], name)
        ctr = windows["last_hour"]["ctr"]
        if query["last_hour_ctr"] is None:
            assert ctr is None
        else:
            assert ctr == pytest.approx(query["last_hour_ctr"], rel=1e-5)
