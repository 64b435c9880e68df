from recsys_training.data import Interaction
from recsys_training.temporal_eval import ease_with_popularity, temporal_split


def row(user, item, timestamp):
    return Interaction(user_id=user, item_id=item, timestamp=timestamp)


def test_temporal_split_cuts_at_the_time_leaving_the_last_fifth():
    rows = [row(str(n % 3), str(n), 1000 + n) for n in range(10)]
    train, test, cut = temporal_split(rows, test_share=0.2)
    assert cut == 1008
    assert [r.timestamp for r in train] == list(range(1000, 1008))
    assert [r.timestamp for r in test] == [1008, 1009]
    # Ties at the cut go to test: nothing of the cut's moment is known at training time.
    tied = [row("a", "x", 1), row("b", "y", 2), row("c", "z", 2), row("d", "w", 2), row("e", "v", 3)]
    train, test, cut = temporal_split(tied, test_share=0.4)
    assert cut == 2 and len(train) == 1 and len(test) == 4


def test_ease_recommends_co_occurring_items_and_popularity_to_new_users():
    # Items a and b always go together; c is the most popular; users 0-5 know a and b.
    train = [row(str(u), item, u) for u in range(6) for item in ("a", "b")]
    train += [row(str(u), "c", 100 + u) for u in range(10, 18)]
    train += [row("solo", "a", 200)]
    recommended = ease_with_popularity(train, ["solo", "stranger"], k=2, l2=1.0)
    assert recommended["solo"][0] == "b", recommended
    assert "a" not in recommended["solo"], "a seen item is never recommended"
    assert recommended["stranger"] == ["c", "a"], "users without history get the most popular items"


def test_cold_items_are_a_seeded_tenth_and_recall_counts_each_group_apart():
    from recsys_training.cold_start_eval import cold_items, recall_at_k, split_relevance

    items = [str(n) for n in range(100)]
    cold = cold_items(items)
    assert len(cold) == 10 and cold == cold_items(items) and cold != cold_items(items, seed=7)
    test = [row("u", "a", 1), row("u", "b", 2), row("v", "a", 3)]
    cold_relevant, warm_relevant = split_relevance(test, {"a"})
    assert cold_relevant == {"u": {"a"}, "v": {"a"}} and warm_relevant == {"u": {"b"}}
    recommended = {"u": ["a", "x"], "v": ["y"]}
    assert recall_at_k(cold_relevant, recommended) == 0.5
    assert recall_at_k(warm_relevant, recommended) == 0.0
