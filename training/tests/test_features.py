import numpy as np
import pytest

from recsys_training.data import Item, User
from recsys_training.features import (
    CrossScorer, Feature, FeatureConfig, FeatureConfigError, history_tensor, item_sources, item_statistics,
    load_raw_config, resolve, user_histories, user_sources,
)
from recsys_training.data import Interaction


def config() -> FeatureConfig:
    # The same configuration as the Rust unit tests in crates/bundle/src/features.rs,
    # which assert the same vectors: the two encoders must agree.
    return FeatureConfig(
        fine_model="din", coarse_model="mlp", embedding_dim=4, history_length=3,
        user=[
            Feature("age", "scale", scale=100.0),
            Feature("gender", "one_hot", vocabulary=["M", "F"]),
            Feature("occupation", "one_hot", vocabulary=["artist", "student"]),
            Feature("event_count", "log1p", scale=2.0),
            Feature("events_1d", "scale"),
            Feature("hour_cos", "identity"),
            Feature("weekday_sin", "identity"),
            Feature("hours_since_last_event", "log1p", scale=2.0, clip=True),
        ],
        item=[
            Feature("genres", "multi_hot", vocabulary=["Action", "Comedy"]),
            Feature("year", "min_max", min=1900.0, max=2000.0),
            Feature("interactions", "log1p", scale=4.0),
            Feature("like_rate", "scale"),
        ],
        cross=["item_cf_score"],
    )


def test_user_features_match_the_rust_encoder():
    # Monday 1970-01-05 12:00 UTC, 2 days after the latest event.
    sources = user_sources(User("u", 25, "F", "student"), [200_000, 190_000, 100_000], 0,
                           ["age", "gender", "occupation", "event_count", "events_1d"], request_time=4 * 86_400 + 12 * 3_600)
    encoded = config().encode_user(sources)
    assert encoded[:7] == [0.25, 0.0, 1.0, 0.0, 1.0, 0.0, 2.0]
    assert encoded[7] == pytest.approx(-1.0) and encoded[8] == pytest.approx(0.0, abs=1e-9) and encoded[9] == 1.0
    assert config().user_dim == 10 and config().offset("user", "event_count") == 5


def test_item_features_match_the_rust_encoder():
    item = Item(item_id="1", title="t", genres=["Comedy"], year=1950)
    assert config().encode_item(item_sources(item, {"interactions": 0, "like_rate": 0.75})) == [0.0, 1.0, 0.5, 0.0, 0.75]


def test_unknown_year_encodes_as_zero():
    item = Item(item_id="1", title="t", genres=[], year=0)
    assert config().encode_item(item_sources(item, {"interactions": 0, "like_rate": 0.5}))[2] == 0.0


def test_the_declarative_file_resolves_against_the_data():
    raw = load_raw_config()
    users = [user_sources(User("a", 30, "M", "writer"), [10, 5], 2, ["events_1d", "events_7d", "events_30d"]),
             user_sources(User("b", 40, "F", "artist"), [7], 1, ["events_1d", "events_7d", "events_30d"])]
    items = [item_sources(Item("1", "t", ["Drama"], 1990), {"interactions": 3, "interactions_7d": 1,
                                                              "interactions_30d": 2, "like_rate": 0.5})]
    resolved = resolve(raw, users, items)
    occupation = next(f for f in resolved.user if f.source == "occupation")
    assert occupation.vocabulary == ["artist", "writer"]
    year = next(f for f in resolved.item if f.source == "year")
    assert (year.min, year.max) == (1990.0, 1990.0)
    assert resolved.fine_model in ("din", "deepfm") and resolved.cross_dim >= 3
    assert resolved.coarse_cross and max(resolved.coarse_cross) < resolved.cross_dim


def test_bad_configurations_are_named():
    with pytest.raises(FeatureConfigError, match="unknown encoding"):
        resolve({"user": [{"source": "age", "encoding": "sqrt"}]}, [], [])
    with pytest.raises(FeatureConfigError, match="unknown source"):
        resolve({"cross": [{"source": "graph_score"}]}, [], [])
    with pytest.raises(FeatureConfigError, match="coarse ranker needs"):
        resolve({"cross": [{"source": "item_cf_score", "coarse": False}]}, [], [])
    with pytest.raises(FeatureConfigError, match="fine"):
        resolve({"model": {"fine": "transformer"}}, [], [])


def test_windows_count_events_near_the_end():
    items = [Item("a", "A", []), Item("b", "B", [])]
    day = 86_400
    rows = [Interaction("u", "a", 10 * day, rating=5), Interaction("u", "b", 10 * day - 3 * day, rating=1),
            Interaction("v", "a", 1 * day, rating=4)]
    stats = item_statistics(items, rows, ["interactions_7d"])
    assert stats["a"]["interactions"] == 2 and stats["a"]["interactions_7d"] == 1
    assert stats["b"]["interactions_7d"] == 1
    assert stats["a"]["like_rate"] == pytest.approx(3 / 4)


def test_histories_are_latest_first_and_cross_features_follow_the_weights():
    rows = [Interaction("u", "a", 1), Interaction("u", "b", 5), Interaction("u", "c", 5)]
    histories = user_histories(rows, {"u": 0}, {"a": 0, "b": 1, "c": 2, "d": 3}, 1)
    assert histories[0].items == [2, 1, 0]  # equal timestamps: the later row first
    assert history_tensor(histories, 4).tolist() == [[3, 2, 1, 0]]
    weights = np.zeros((4, 4), dtype=np.float32)
    weights[0, 3] = 0.5
    weights[1, 3] = 0.25
    scorer = CrossScorer(weights, np.ones((1, 2)), np.ones((4, 2)), ["item_cf_score", "embedding_score"])
    assert scorer.features(0, [0, 1], np.array([3])).tolist() == [[0.75, 2.0]]


def test_recent_and_standardised_cross_features():
    weights = np.zeros((14, 14), dtype=np.float32)
    weights[:, 13] = 1.0  # every item points at item 13
    item_vectors = np.arange(28, dtype=np.float32).reshape(14, 2)
    scorer = CrossScorer(weights, np.array([[1.0, 0.0]]), item_vectors,
                         ["item_cf_recent_score", "embedding_zscore", "item_cf_zscore"])
    history = list(range(12))  # latest first: only the first 10 count as recent
    recent, embedding_z, item_cf_z = scorer.features(0, history, np.array([12, 13])).T
    assert recent.tolist() == [0.0, 10.0]
    # Unseen items are 12 and 13 (embedding scores 24 and 26): standardised to -1 and +1.
    assert embedding_z.tolist() == pytest.approx([-1.0, 1.0])
    assert item_cf_z.tolist() == pytest.approx([-1.0, 1.0])


def test_live_item_counts_are_the_stores_windows_as_of_the_request():
    """The training side of the live item features agrees with the store's definition
    (counters.py, itself checked against feature-svc's Rust) for requests after the
    events, and never counts an event at or after the request."""
    from recsys_training.counters import COUNTED, Counters
    from recsys_training.features import LIVE_MEASURES, LIVE_WINDOWS, ItemEventLog

    rng = np.random.default_rng(3)
    start = 1_700_000_000
    items = rng.integers(0, 3, 400)
    times = np.sort(start + rng.integers(0, 40 * 86_400, 400))
    kinds = rng.integers(-1, len(COUNTED), 400)
    log = ItemEventLog(items, times, kinds)
    asked = int(times[-1]) + 1 + int(rng.integers(0, 7_200))
    for item in range(3):
        counters = Counters()
        for i, t, k in zip(items, times, kinds):
            if i == item and k >= 0:
                counters.record(COUNTED[k], int(t) * 1_000)
        expected = counters.windows(asked * 1_000)
        served = log.windowed_counts(item, asked)
        for window in LIVE_WINDOWS:
            for measure in LIVE_MEASURES:
                want = expected[window][measure]
                want = 0.0 if want is None else float(np.float32(want))
                assert served[window][measure] == pytest.approx(want), (item, window, measure)
    # Point in time: an event at the request's second is not counted.
    at_request = ItemEventLog(np.array([0]), np.array([start]), np.array([COUNTED.index("click")]))
    assert at_request.values(np.array([0, 0]), np.array([start, start + 1]), ["clicks_last_hour"])[
        "clicks_last_hour"].tolist() == [0.0, 1.0]


def test_live_features_resolve_encode_and_drop_constant_sources():
    from recsys_training.features import encode_live, resolve_live

    raw = {"live_item": [{"source": "clicks_last_day", "encoding": "log1p", "scale": "max"},
                         {"source": "ctr_last_7_days", "encoding": "scale", "scale": "max"},
                         {"source": "purchases_last_hour", "encoding": "log1p"}]}
    values = {"clicks_last_day": np.array([0.0, 3.0, 7.0]), "ctr_last_7_days": np.array([0.05, 0.0, 0.1]),
              "purchases_last_hour": np.zeros(3)}
    features = resolve_live(raw, values)
    assert [f.source for f in features] == ["clicks_last_day", "ctr_last_7_days"], "constant sources are dropped"
    encoded = encode_live(features, values, 3)
    for row in range(3):
        out: list[float] = []
        for feature in features:
            feature.encode(values[feature.source][row], out)
        assert encoded[row].tolist() == pytest.approx(out)
    assert encoded[2].tolist() == pytest.approx([1.0, 1.0])
    assert encode_live([], values, 3).shape == (3, 0)
    with pytest.raises(FeatureConfigError, match="views_last_day"):
        resolve_live({"live_item": [{"source": "views_last_day"}]}, {})
    with pytest.raises(FeatureConfigError, match="not numeric"):
        resolve_live({"live_item": [{"source": "clicks_last_day", "encoding": "one_hot"}]}, {})
