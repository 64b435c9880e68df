import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys_training.cli import main
from recsys_training.data import load_dataset
from recsys_training.synthetic import SyntheticConfig, generate

SMALL = SyntheticConfig(items=2_000, users=500, interactions=20_000, clusters=20, seed=7)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    summary = generate(SMALL, out)
    return out, summary


def test_writes_the_projects_format_that_training_loads(synthetic):
    out, summary = synthetic
    assert summary["interactions"] == 20_000
    dataset = load_dataset(out)
    assert len(dataset.items) == 2_000
    assert len(dataset.interactions) == 20_000
    assert len(dataset.users) == 500
    assert {i.event for i in dataset.interactions} == {"impression", "click", "like", "purchase"}
    assert all(item.genres and item.year > 1960 for item in dataset.items)


def test_the_same_seed_gives_the_same_data_and_another_seed_does_not(synthetic, tmp_path):
    out, _ = synthetic
    generate(SMALL, tmp_path / "again")
    for table in ("items", "users", "interactions"):
        assert pq.read_table(out / f"{table}.parquet").equals(pq.read_table(tmp_path / "again" / f"{table}.parquet"))
    other = SyntheticConfig(**{**SMALL.__dict__, "seed": 8})
    generate(other, tmp_path / "other")
    assert not pq.read_table(out / "interactions.parquet").equals(pq.read_table(tmp_path / "other" / "interactions.parquet"))


def test_item_popularity_has_a_long_tail(synthetic):
    out, _ = synthetic
    items = pq.read_table(out / "interactions.parquet").column("item_id").combine_chunks().indices.to_numpy()
    counts = np.sort(np.bincount(items, minlength=2_000))[::-1]
    head = counts[:20].sum() / counts.sum()  # the top 1% of items
    assert head > 0.15, head
    assert (counts == 0).sum() > 100, "a long tail of items nobody touched"


def test_users_have_tastes_and_engage_more_with_them(synthetic):
    out, _ = synthetic
    interactions = pq.read_table(out / "interactions.parquet")
    user = interactions.column("user_id").combine_chunks().indices.to_numpy()
    item = interactions.column("item_id").combine_chunks().indices.to_numpy()
    event = interactions.column("event").combine_chunks().indices.to_numpy()
    categories = pq.read_table(out / "items.parquet").column("genres").to_numpy()
    # A user's most frequent category covers far more of their events than it would if
    # the same events were dealt out to users at random.
    def top_category_share(items_of_events):
        shares = []
        for u in np.unique(user)[:200]:
            mine = categories[items_of_events[user == u]]
            if len(mine) >= 10:
                _, counts = np.unique(mine, return_counts=True)
                shares.append(counts.max() / len(mine))
        return np.mean(shares)

    shuffled = np.random.default_rng(0).permutation(item)
    assert top_category_share(item) > 2 * top_category_share(shuffled)
    # Clicks or better are frequent enough to learn from, and rare enough to be a signal.
    engaged = (event > 0).mean()
    assert 0.1 < engaged < 0.5, engaged


def test_each_users_events_are_time_ordered_and_never_precede_the_items_release(synthetic):
    out, _ = synthetic
    interactions = pq.read_table(out / "interactions.parquet")
    user = interactions.column("user_id").combine_chunks().indices.to_numpy()
    item = interactions.column("item_id").combine_chunks().indices.to_numpy()
    timestamp = interactions.column("timestamp").to_numpy()
    same_user = user[1:] == user[:-1]
    assert (timestamp[1:][same_user] >= timestamp[:-1][same_user]).all()
    release = pq.read_table(out / "items.parquet").column("release_time").to_numpy()
    assert (timestamp >= release[item]).all()
    # Sessions: most gaps are short, some are days.
    gaps = (timestamp[1:] - timestamp[:-1])[same_user]
    assert np.median(gaps) < 600 and (gaps > 86_400).mean() > 0.05


def test_the_command_line_reports_impossible_sizes(tmp_path, capsys):
    assert main(["synthesize", "--out", str(tmp_path), "--items", "10", "--clusters", "20"]) == 2
    assert "clusters (20) cannot exceed items (10)" in capsys.readouterr().err
    assert main(["synthesize", "--out", str(tmp_path), "--items", "100", "--users", "20", "--interactions", "500", "--clusters", "5"]) == 0
    assert pq.read_table(tmp_path / "interactions.parquet").num_rows == 500
