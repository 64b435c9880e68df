import json

from recsys_training.data import load_dataset
from recsys_training.feedback import merge_events
from recsys_training.train import TrainConfig, train_bundle


def logged(user, item, event, ts_ms, event_id="", value=0.0):
    return json.dumps({"user_id": user, "item_id": item, "event": event, "timestamp_ms": ts_ms, "value": value,
                       **({"event_id": event_id} if event_id else {})})


def test_logged_events_train_the_next_bundle(small_dataset, tmp_path):
    """The loop from serving back to training: a user known only from logged clicks is in
    the next bundle, with their clicks as interactions."""
    log = tmp_path / "feature-events.jsonl"
    lines = [logged("newcomer", str(item), "click", 2_000_000_000 + item, f"e{item}") for item in range(20, 30)]
    lines += [
        logged("newcomer", "25", "click", 2_000_000_025, "e25"),  # a retried event id
        logged("newcomer", "31", "impression", 2_000_000_100),
        logged("newcomer", "no-such-item", "click", 2_000_000_200),
        logged("1", "3", "rating", 2_000_000_300, value=4.0),
        '{"user_id":"torn","ite',
    ]
    log.write_text("\n".join(lines) + "\n")
    merged = merge_events(small_dataset, log, tmp_path / "merged")
    assert (merged.logged_events, merged.duplicates, merged.impressions, merged.unknown_items,
            merged.unreadable_lines) == (11, 1, 1, 1, 1)
    data = load_dataset(tmp_path / "merged")
    assert len(data.interactions) == merged.seed_interactions + 11
    newcomer = [i for i in data.interactions if i.user_id == "newcomer"]
    assert sorted(i.item_id for i in newcomer) == [str(n) for n in range(20, 30)]
    assert all(i.timestamp == 2_000_000 + int(i.item_id) // 1000 for i in newcomer)
    rating = [i for i in data.interactions if i.user_id == "1" and i.event == "rating" and i.rating == 4.0]
    assert rating, "a logged rating keeps its value"

    config = TrainConfig(bpr_epochs=5, graph_epochs=5, ranker_epochs=1, student_epochs=1, batch_size=256, embedding_dim=16,
                         ranker_candidates=10, ranker_random_negatives=10)
    published = train_bundle(tmp_path / "merged", tmp_path / "bundles", config, version="next")
    assert "newcomer" in json.loads((published / "users.json").read_text())
