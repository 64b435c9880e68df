import math

import numpy as np

from recsys_training.crosses import AttributeCross, columns, fit_cross, mutual_information, select
from recsys_training.data import Interaction, Item, User


def table(name: str, user_field: str, item_field: str, user_values: list[str], item_values: list[str]) -> AttributeCross:
    lift = [[(10 * u + i + 1) / 10 for i in range(len(item_values))] for u in range(len(user_values))]
    prior = [1 / len(item_values)] * len(item_values)
    return AttributeCross(name, user_field, item_field, user_values, item_values, lift, prior, 2.0)


def test_columns_match_what_rank_svc_computes():
    # The same tables, users and items as crates/bundle/src/attribute_crosses.rs's
    # `a_cross_is_the_mean_lift_over_the_items_values_and_zero_when_unknown`.
    catalogue = [Item("a", "", ["Comedy", "Drama"], 1995), Item("b", "", ["Horror"], 0), Item("c", "", ["Drama"], 1971)]
    crosses = [
        table("gender×genres", "gender", "genres", ["F", "M"], ["Comedy", "Drama"]),
        table("age_band×decade", "age_band", "decade", ["20", "30"], ["1970", "1990"]),
        table("daypart×genres", "daypart", "genres", ["0", "2"], ["Drama"]),
        table("history×genres", "history", "genres", [], ["Comedy", "Drama"]),
    ]
    male = User("u", 34, "M", "")
    at = np.full(3, 86_400 * 3 + 13 * 3_600)  # 13:00 UTC: daypart 2
    # Latest first: c (Drama), b (Horror: unknown here), a (Comedy and Drama).
    history = [2, 1, 0]
    values = columns(crosses, catalogue, [male], [history], np.zeros(3, dtype=np.int64), np.array([0, 1, 2]), at)
    # history: 2 known items, Comedy 0.5 and Drama 1.5 of them, priors 0.5, smoothing 2:
    # Comedy log((0.5 + 1) / 4 / 0.5) = log(0.75), Drama log((1.5 + 1) / 4 / 0.5) = log(1.25).
    comedy, drama = math.log(0.75), math.log(1.25)
    assert np.allclose(values, [[1.15, 1.2, 1.1, (comedy + drama) / 2], [0, 0, 0, 0], [1.2, 1.1, 1.1, drama]])
    unknown = columns(crosses, catalogue, [User("v", 0, "", ""), None], [[], [1]], np.array([0, 1]), np.array([0, 2]),
                      np.full(2, 3 * 3_600))
    assert np.allclose(unknown, [[0, 0, 0.1, 0], [0, 0, 0.1, 0]]), \
        "unknown gender and age, no known history item; daypart 0 is known"


def test_a_lift_says_how_much_more_often_a_group_chooses_a_value():
    items = {"d": Item("d", "", ["Drama"], 1990), "c": Item("c", "", ["Comedy"], 1990),
             "x": Item("x", "", ["Comedy", "Drama"], 1990)}
    users = {"f": User("f", 30, "F", ""), "m": User("m", 30, "M", "")}
    rows = [Interaction("f", "d", 0, "rating", 5)] * 30 + [Interaction("f", "c", 0, "rating", 5)] * 10 + \
           [Interaction("m", "c", 0, "rating", 5)] * 30 + [Interaction("m", "d", 0, "rating", 5)] * 10
    cross = fit_cross("gender", "genres", rows, users, items, smoothing=0.0)
    assert cross.user_values == ["F", "M"] and cross.item_values == ["Comedy", "Drama"]
    # Half of all choices are dramas; three quarters of the women's: lift log(1.5).
    assert math.isclose(cross.lift[0][1], math.log(1.5), abs_tol=1e-6)
    assert math.isclose(cross.lift[0][0], math.log(0.5), abs_tol=1e-6)
    assert cross.prior == [0.5, 0.5]
    # Pseudo-events pull a group towards no lift.
    smoothed = fit_cross("gender", "genres", rows, users, items, smoothing=40.0)
    assert 0 < smoothed.lift[0][1] < cross.lift[0][1]
    # A film of both genres is worth the mean of the two.
    value = columns([cross], list(items.values()), [users["f"]], [[]], np.zeros(1, dtype=np.int64), np.array([2]),
                    np.zeros(1))
    assert math.isclose(float(value[0, 0]), (math.log(1.5) + math.log(0.5)) / 2, abs_tol=1e-6)


def test_selection_keeps_a_cross_that_adds_to_the_main_effects_and_drops_noise():
    rng = np.random.default_rng(0)
    n = 20_000
    a, b = rng.integers(0, 2, n), rng.integers(0, 2, n)
    # The label depends on a and b only through their agreement: no main effect has it.
    labels = (rng.random(n) < np.where(a == b, 0.7, 0.3)).astype(np.float64)
    base = np.stack([a, b], axis=1).astype(np.float64)
    candidates = np.stack([np.where(a == b, 1.0, -1.0), rng.standard_normal(n)], axis=1)
    half = n // 2
    chosen = select(base[:half], candidates[:half], labels[:half], base[half:], candidates[half:], labels[half:],
                    ["agreement", "noise"], min_gain=0.001, min_z=2.0, max_kept=4, rng=rng)
    assert chosen.kept == [0]
    report = chosen.report
    assert report["kept"] == ["agreement"]
    gains = {row["name"]: row["held_out_log_loss_gain"] for row in report["candidates"]}
    assert gains["agreement"] > 0.05 and gains["noise"] < 0.001
    errors = {row["name"]: row["gain_standard_error"] for row in report["candidates"]}
    assert 0 < errors["agreement"] < gains["agreement"] / 10
    assert report["probe_held_out_auc_with"] > report["probe_held_out_auc_without"] + 0.1
    # At most max_kept, and none below the gain asked for.
    assert select(base[:half], candidates[:half], labels[:half], base[half:], candidates[half:], labels[half:],
                  ["agreement", "noise"], min_gain=1.0, min_z=2.0, max_kept=4, rng=rng).kept == []


def test_mutual_information_is_zero_for_independent_values():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 50_000)
    assert mutual_information(rng.standard_normal(50_000), labels) < 0.001
    assert mutual_information(labels + 0.1 * rng.standard_normal(50_000), labels) > 0.5
