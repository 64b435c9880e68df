import json

import numpy as np
import pytest
import onnxruntime

from safetensors.numpy import load_file

from recsys_training.bundle import verify
from recsys_training.content import cold_start_scores
from recsys_training.data import Interaction, load_dataset
from recsys_training.models import auc, normalised_graph
from recsys_training.train import TrainConfig, edge_weight, held_out_mask, train_bundle


def quick_config(ranker_folds: int = 1) -> TrainConfig:
    return TrainConfig(bpr_epochs=15, graph_epochs=100, ranker_epochs=3, batch_size=256, embedding_dim=16, ranker_candidates=10,
                       ranker_random_negatives=10, ranker_folds=ranker_folds)


def test_training_publishes_a_complete_verified_bundle(small_dataset, tmp_path):
    out = tmp_path / "bundles"
    published = train_bundle(small_dataset, out, quick_config(), version="v1")
    assert published == out / "v1"
    assert (out / "current").resolve() == published.resolve()
    assert verify(published) == []
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["num_items"] == 40 and manifest["num_users"] == 60
    assert set(manifest["files"]) >= {"ranker.onnx", "items.json", "users.json", "embeddings.safetensors",
                                      "item_to_item.safetensors", "item_signals.safetensors", "coarse.onnx",
                                      "ranker_fixture.json", "sequence_encoder.onnx", "sequence_fixture.json"}
    assert manifest["metrics"]["onnx_max_abs_diff"] <= 1e-4
    assert manifest["sequence"]["file"] == "sequence_encoder.onnx" and manifest["sequence"]["length"] == 50
    assert manifest["sequence"]["onnx_max_abs_diff"] <= 1e-4
    assert sum(manifest["score_distribution"]["counts"]) > 0
    embeddings = load_file(published / "embeddings.safetensors")
    assert embeddings["item_vectors"].shape == (40, 16) and embeddings["item_vectors"].dtype == np.float32
    assert embeddings["user_vectors"].shape == (60, 16)
    # What each user's vector was trained on: their latest training event and event count.
    users = json.loads((published / "users.json").read_text())
    trained = embeddings["user_trained"]
    assert trained.shape == (60, 2) and trained.dtype == np.int64
    for position in (0, 17, 59):
        events = [i for i in load_dataset(small_dataset).interactions if i.user_id == users[position]]
        assert trained[position].tolist() == [max(i.timestamp for i in events), len(events)]
    item_to_item = load_file(published / "item_to_item.safetensors")
    offsets = item_to_item["offsets"]
    assert offsets.shape == (41,) and offsets[-1] == len(item_to_item["neighbors"]) == len(item_to_item["weights"])
    popularity = load_file(published / "item_signals.safetensors")["popularity"]
    assert popularity.shape == (40,) and popularity.max() == 1.0
    assert not list(out.glob(".staging-*")), "no staging directory is left behind"


def test_models_learn_the_planted_structure(small_dataset, tmp_path):
    published = train_bundle(small_dataset, tmp_path / "b", quick_config(), version="v1")
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["metrics"]["fine_auc"] > 0.7 and manifest["metrics"]["coarse_auc"] > 0.7
    # The strongest item-to-item weights stay inside the genre cluster users consume together.
    item_to_item = load_file(published / "item_to_item.safetensors")
    item_ids = [item["id"] for item in json.loads((published / "items.json").read_text())]
    row = item_ids.index("3")
    start, end = item_to_item["offsets"][row], item_to_item["offsets"][row + 1]
    weights = item_to_item["weights"][start:end]
    assert list(weights) == sorted(weights, reverse=True), "each row is strongest first"
    top = [int(item_ids[n]) for n in item_to_item["neighbors"][start:start + 5]]
    assert all(n < 20 for n in top), top


def test_onnx_rankers_take_any_batch_size(small_dataset, tmp_path):
    published = train_bundle(small_dataset, tmp_path / "b", quick_config(), version="v1")
    features = json.loads((published / "manifest.json").read_text())["feature_config"]
    width = lambda group: sum(len(f["vocabulary"]) if f["encoding"] in ("one_hot", "multi_hot") else 1 for f in features[group])
    fine = onnxruntime.InferenceSession(str(published / "ranker.onnx"), providers=["CPUExecutionProvider"])
    coarse = onnxruntime.InferenceSession(str(published / "coarse.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 300):
        cross = np.zeros((batch, len(features["cross"])), dtype=np.float32)
        scores = fine.run(["score"], {
            "user_index": np.zeros(batch, dtype=np.int64),
            "item_index": np.arange(batch, dtype=np.int64) % 41,
            "history": np.zeros((batch, features["history_length"]), dtype=np.int64),
            "user_features": np.zeros((batch, width("user")), dtype=np.float32),
            "item_features": np.zeros((batch, width("item")), dtype=np.float32),
            "cross_features": cross,
        })[0]
        assert scores.shape == (batch,)
        assert np.all((scores >= 0) & (scores <= 1))
        assert coarse.run(["score"], {"cross_features": cross})[0].shape == (batch,)


def test_bundles_carry_an_int8_copy_and_a_smaller_student_with_their_auc(small_dataset, tmp_path):
    config = quick_config()
    config.student_prune = 0.5
    published = train_bundle(small_dataset, tmp_path / "b", config, version="v1")
    manifest = json.loads((published / "manifest.json").read_text())
    assert {"ranker.int8.onnx", "ranker.student.onnx"} <= set(manifest["files"])
    metrics = manifest["metrics"]
    assert metrics["student_parameters"] < metrics["teacher_parameters"]
    for variant in ("int8", "student"):
        assert abs(metrics[f"{variant}_auc"] - metrics["teacher_onnx_auc"] - metrics[f"{variant}_auc_delta"]) < 3e-6
        assert metrics[f"{variant}_auc"] > 0.5, variant
    # The INT8 copy really holds integer weights; the student really is pruned.
    import onnx
    from onnx import numpy_helper

    int8 = onnx.load(str(published / "ranker.int8.onnx"))
    assert any(init.data_type == onnx.TensorProto.INT8 for init in int8.graph.initializer)
    student = onnx.load(str(published / "ranker.student.onnx"))
    matrices = [numpy_helper.to_array(init) for init in student.graph.initializer
                if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2 and min(init.dims) > 4]
    zeros = sum(int((m == 0).sum()) for m in matrices) / sum(m.size for m in matrices)
    assert zeros > 0.2, zeros


def test_auc_matches_hand_computed_values():
    assert auc(np.array([1, 0]), np.array([0.9, 0.1])) == 1.0
    assert auc(np.array([1, 0]), np.array([0.1, 0.9])) == 0.0
    assert auc(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5


@pytest.mark.parametrize("fine_model", ["deepfm", "wide_deep"])
def test_other_fine_models_are_selected_by_the_feature_configuration(small_dataset, tmp_path, fine_model):
    from recsys_training.features import CONFIG_PATH

    config_path = tmp_path / "features.toml"
    config_path.write_text(CONFIG_PATH.read_text().replace('fine = "din"', f'fine = "{fine_model}"'))
    config = quick_config()
    config.feature_config = str(config_path)
    published = train_bundle(small_dataset, tmp_path / "b", config, version="v1")
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["feature_config"]["fine_model"] == fine_model
    assert manifest["metrics"]["onnx_max_abs_diff"] <= 1e-4
    # Six validation users on this toy set: only "better than chance" is a stable claim.
    assert manifest["metrics"]["fine_auc"] > 0.5


def test_training_is_reproducible_with_a_seed(small_dataset, tmp_path):
    first = train_bundle(small_dataset, tmp_path / "a", quick_config(), version="v1")
    second = train_bundle(small_dataset, tmp_path / "b", quick_config(), version="v1")
    metrics = [json.loads((p / "manifest.json").read_text())["metrics"] for p in (first, second)]
    for key in ("coarse_auc", "fine_auc"):
        assert metrics[0][key] == metrics[1][key]
    assert (first / "ranker_fixture.json").read_text() == (second / "ranker_fixture.json").read_text()


def test_rows_shown_as_new_users_look_like_a_user_without_behaviour():
    import torch

    from recsys_training.train import as_new_users

    users = torch.tensor([1, 2])
    items = torch.tensor([5, 6])
    history = torch.tensor([[3, 4], [7, 8]])
    user_features = torch.tensor([[1.0, 9.0], [2.0, 9.0]])  # (exact in float32)
    item_features = torch.tensor([[0.5], [0.6]])
    cross = torch.tensor([[0.5, 0.25], [0.75, 1.5]])
    cold_rows = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # profile kept, event counts zero
    feed = as_new_users([users, items, history, user_features, item_features, cross], torch.tensor([False, True]),
                        cold_rows)
    assert feed[0].tolist() == [1, 0]
    assert feed[1] is items and feed[4] is item_features
    assert feed[2].tolist() == [[3, 4], [0, 0]]
    assert feed[3].tolist() == [[1.0, 9.0], [2.0, 0.0]]
    assert feed[5].tolist() == [[0.5, 0.25], [0.0, 0.0]]
    # A profile cross (gender × genres, say) keeps its value: serving computes it without a history.
    feed = as_new_users([users, items, history, user_features, item_features, cross], torch.tensor([False, True]),
                        cold_rows, torch.tensor([False, True]))
    assert feed[5].tolist() == [[0.5, 0.25], [0.0, 1.5]]


def test_grouped_batches_keep_each_users_rows_together_in_a_random_group_order():
    from recsys_training.train import RankerRows, grouped_permutation, row_groups

    def rows(users):
        users = np.asarray(users)
        empty = np.zeros(len(users))
        return RankerRows(users, users, empty[:, None], empty, empty)

    # Two held-out parts; user 1 appears in both, and is a different request in each.
    groups = row_groups([rows([0, 0, 1]), rows([1, 2, 2, 2])], num_users=3)
    assert groups.tolist() == [0, 0, 1, 4, 5, 5, 5]
    orders = set()
    for seed in range(20):
        order = grouped_permutation(groups, np.random.default_rng(seed))
        assert sorted(order.tolist()) == list(range(len(groups)))
        runs = [groups[order][0]] + [g for previous, g in zip(groups[order], groups[order][1:]) if g != previous]
        assert sorted(runs) == [0, 1, 4, 5]  # each group is one contiguous run
        orders.add(tuple(runs))
    assert len(orders) > 1


def test_the_coarse_loss_adds_a_per_user_softmax_of_the_positive_rows():
    import torch

    from recsys_training.train import coarse_loss

    class Logits(torch.nn.Module):
        def logit(self, values):
            return values

    logits = torch.tensor([2.0, 0.0, -1.0, 3.0, 1.0])
    clicks = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([7, 7, 7, 9, 9])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, clicks)
    assert torch.isclose(coarse_loss(0.0)(Logits(), [logits], [clicks, groups]), bce)
    # Each positive's log-softmax over its own user's rows only.
    first = 2.0 - np.log(np.exp(2.0) + np.exp(0.0) + np.exp(-1.0))
    second = 1.0 - np.log(np.exp(3.0) + np.exp(1.0))
    expected = bce - 0.5 * (first + second) / 2
    assert torch.isclose(coarse_loss(0.5)(Logits(), [logits], [clicks, groups]), expected.float())
    # Large logits stay finite (the log-sum-exp is shifted by each group's maximum).
    huge = coarse_loss(1.0)(Logits(), [logits * 1000], [clicks, groups])
    assert torch.isfinite(huge)
    # A batch without positives is the click loss alone.
    none = torch.zeros(5)
    assert torch.isclose(coarse_loss(1.0)(Logits(), [logits], [none, groups]),
                         torch.nn.functional.binary_cross_entropy_with_logits(logits, none))
    # Gradients reach every row of a group with a positive.
    values = logits.clone().requires_grad_()
    coarse_loss(1.0)(Logits(), [values], [clicks, groups]).backward()
    assert (values.grad != 0).all()


def test_new_items_get_vectors_from_their_attributes_and_a_cold_start_threshold(small_dataset, tmp_path):
    plain = train_bundle(small_dataset, tmp_path / "plain", quick_config(), version="v1")
    plain_policy = json.loads((plain / "manifest.json").read_text())["cold_start"]
    assert plain_policy["items"] == 0 and "training_users_shown" not in plain_policy, "every item has interactions"
    # The content map ships anyway (run-time catalogue items are mapped with it): a row
    # per feature (3 genres, 7 eras and an unknown year, the intercept), a column per
    # dimension.
    encoding = plain_policy["content"]
    assert encoding["genres"] == ["Action", "Comedy", "Romance"] and encoding["newest_year"] == 1999
    assert np.array(encoding["mapping"]).shape == (3 + 8 + 1, 16)
    # Four items nobody has interacted with: two of each genre cluster.
    with (small_dataset / "items.csv").open("a") as items:
        items.write("40,New 40,Action,1999\n41,New 41,Action,1999\n42,New 42,Comedy|Romance,1999\n"
                    "43,New 43,Comedy|Romance,1999\n")
    published = train_bundle(small_dataset, tmp_path / "b", quick_config(), version="v1")
    manifest = json.loads((published / "manifest.json").read_text())
    cold_start = manifest["cold_start"]
    assert cold_start["items"] == 4 and cold_start["share"] == 0.33 and cold_start["score"] == "inner_product"
    # The threshold is the median of its draws' (one draw of stand-ins alone moves the
    # share shown by a third either way).
    draws = cold_start["threshold_draws"]
    assert len(draws) == quick_config().cold_start_draws and draws == sorted(draws)
    assert cold_start["threshold"] == round(float(np.median(draws)), 6)
    embeddings = load_file(published / "embeddings.safetensors")
    users, vectors = embeddings["user_vectors"], embeddings["item_vectors"]
    # The share reported is the one the shipped threshold shows a new item to, scored as
    # recall's cold-start channel scores (u·v over the new items).
    best = cold_start_scores(users, vectors[40:44])
    assert abs(np.mean(best >= cold_start["threshold"]) - cold_start["training_users_shown"]) < 0.02  # one user in 60
    user_ids = json.loads((published / "users.json").read_text())
    action_fans = [n for n, user in enumerate(user_ids) if int(user) % 2]  # odd users take items 0-19 (Action)
    comedy_fans = [n for n, user in enumerate(user_ids) if int(user) % 2 == 0]
    for item, fans, others in ((40, action_fans, comedy_fans), (42, comedy_fans, action_fans)):
        scores = users @ vectors[item]
        assert scores[fans].mean() > scores[others].mean(), f"new item {item} leans to its genre's users"


def test_the_graph_is_weighted_and_symmetrically_normalised():
    # Users 0, 1 then items 0, 1, 2: edges u0-i0 (1), u0-i1 (0.5), u1-i1 (2); item 2 alone.
    graph = normalised_graph(2, 3, np.array([0, 0, 1]), np.array([0, 1, 1]), np.array([1.0, 0.5, 2.0]))
    dense = graph.to_dense().numpy()
    assert dense.shape == (5, 5) and np.allclose(dense, dense.T)
    degrees = {"u0": 1.5, "u1": 2.0, "i0": 1.0, "i1": 2.5}
    assert np.isclose(dense[0, 2], 1.0 / np.sqrt(degrees["u0"] * degrees["i0"]))
    assert np.isclose(dense[0, 3], 0.5 / np.sqrt(degrees["u0"] * degrees["i1"]))
    assert np.isclose(dense[1, 3], 2.0 / np.sqrt(degrees["u1"] * degrees["i1"]))
    assert not dense[4].any() and not dense[:2, :2].any(), "no edge of item 2, none between users"


def test_edge_weights_follow_the_event_type_and_the_stars():
    config = TrainConfig()
    weight = lambda event, rating=0.0: edge_weight(Interaction("u", "i", 0, event, rating), config)
    assert weight("rating", 4.0) == 0.8
    assert (weight("impression"), weight("click"), weight("like"), weight("purchase")) == (1.0, 2.0, 3.0, 5.0)
    assert weight("share-to-a-friend") == 1.0, "an event type without a weight counts as a view"


def test_the_bpr_vectors_remain_selectable(small_dataset, tmp_path):
    config = quick_config()
    config.vector_model = "bpr"
    published = train_bundle(small_dataset, tmp_path / "b", config, version="v1")
    assert verify(published) == []
    config.vector_model = "svd"
    with pytest.raises(ValueError, match="vector_model"):
        train_bundle(small_dataset, tmp_path / "c", config, version="v1")


def test_popularity_weighs_interactions_by_recency_and_keeps_every_interacted_item_above_zero():
    from recsys_training.train import recent_popularity

    day = 86_400
    rows = ([Interaction("u", "old", 0)] * 5 + [Interaction("u", "new", 100 * day)] * 2
            + [Interaction("u", "ancient", -3000 * day)])
    position = {"old": 0, "new": 1, "ancient": 2, "never": 3}
    recent = recent_popularity(rows, position, 4, half_life_days=14.0)
    # Five interactions 100 days old weigh less than two of the latest day's.
    assert recent[1] == pytest.approx(1.0, abs=1e-5)
    assert recent[0] == pytest.approx(5 * 0.5 ** (100 / 14) / 2, rel=1e-3)
    assert 0.0 < recent[2] < recent[0] and recent[3] == 0.0
    assert recent.max() <= 1.0
    all_time = recent_popularity(rows, position, 4, half_life_days=0.0)
    assert all_time.tolist() == pytest.approx([1.0, 0.4, 0.2, 0.0])


def test_automated_crosses_are_measured_on_held_out_rows_and_the_kept_ones_shipped(small_dataset, tmp_path):
    from recsys_training.crosses import AttributeCross, columns
    from recsys_training.features import CONFIG_PATH

    # Keep the two best whatever they gain, so that the shipped path is exercised.
    text = CONFIG_PATH.read_text()
    assert all(line in text for line in ("min_gain = 0.00005", "min_z = 2.0", "max_kept = 4", "fine_check = true"))
    forced = text.replace("min_gain = 0.00005", "min_gain = -1.0").replace("min_z = 2.0", "min_z = -1e9") \
        .replace("max_kept = 4", "max_kept = 2")
    config = quick_config()
    # With the fine model's check: its AUC with and without them decides what ships.
    (tmp_path / "checked.toml").write_text(forced)
    config.feature_config = str(tmp_path / "checked.toml")
    checked = json.loads((train_bundle(small_dataset, tmp_path / "checked", config, version="v1") / "manifest.json")
                         .read_text())
    selection = checked["feature_selection"]
    with_auc, without_auc = selection["fine_auc_recall_candidates_with"], selection["fine_auc_recall_candidates_without"]
    assert selection["shipped"] == (selection["kept"] if with_auc >= without_auc + 0.001 else [])
    assert [table["name"] for table in checked["feature_config"]["attribute_crosses"]] == selection["shipped"]
    shipped_auc = with_auc if selection["shipped"] else without_auc
    assert checked["metrics"]["fine_auc_recall_candidates"] == round(shipped_auc, 6)
    # Without it, the kept ones ship.
    (tmp_path / "forced.toml").write_text(forced.replace("fine_check = true", "fine_check = false"))
    config.feature_config = str(tmp_path / "forced.toml")
    published = train_bundle(small_dataset, tmp_path / "b", config, version="v1")
    manifest = json.loads((published / "manifest.json").read_text())
    selection = manifest["feature_selection"]
    assert [row["name"] for row in selection["candidates"]] == [
        f"{user}×{item}" for user in ("gender", "occupation", "age_band", "daypart", "history")
        for item in ("genres", "decade")]
    assert len(selection["kept"]) == 2 and "probe_held_out_auc_with" in selection
    # Users of the planted data choose by gender: gender × genres carries it.
    gains = {row["name"]: row["held_out_log_loss_gain"] for row in selection["candidates"]}
    assert "gender×genres" in selection["kept"], gains
    features = manifest["feature_config"]
    tables = [AttributeCross(**table) for table in features["attribute_crosses"]]
    assert [table.name for table in tables] == selection["kept"] == features["cross"][-2:]
    # The fine model reads them; the fixture's rows hold what crosses.columns computes.
    session = onnxruntime.InferenceSession(str(published / "ranker.onnx"))
    assert session.get_inputs()[-1].shape[-1] == len(features["cross"])
    dataset = load_dataset(small_dataset)
    items = {item.item_id: n for n, item in enumerate(dataset.items)}
    for example in json.loads((published / "ranker_fixture.json").read_text())[:4]:
        history = [items[i] for i in example["history_item_ids"]]
        expected = columns(tables, dataset.items, [dataset.users[example["user_id"]]], [history], np.zeros(1, np.int64),
                           np.array([items[example["item_id"]]]), np.array([example["request_time"]]))
        assert np.allclose(example["cross_features"][-2:], expected[0], atol=1e-6)
    # Without them: no selection, no tables.
    config.feature_crosses = False
    manifest = json.loads((train_bundle(small_dataset, tmp_path / "c", config, version="v1") / "manifest.json")
                          .read_text())
    assert "feature_selection" not in manifest and manifest["feature_config"]["attribute_crosses"] == []


def test_rankers_learn_from_every_held_out_part(small_dataset, tmp_path):
    def trained(parts: int) -> dict:
        published = train_bundle(small_dataset, tmp_path / f"parts-{parts}", quick_config(parts), version="v1")
        return json.loads((published / "manifest.json").read_text())

    one, three = trained(1), trained(3)
    # Each further part adds about as many rows as the first (its own candidates per user).
    assert three["metrics"]["ranker_training_rows"] > 2 * one["metrics"]["ranker_training_rows"]
    assert three["training_config"]["ranker_folds"] == 3
    assert three["metrics"]["fine_auc"] > 0.7 and three["metrics"]["coarse_auc"] > 0.7


def test_held_out_parts_are_disjoint_and_never_more_than_fit(small_dataset, tmp_path):
    draws = np.random.default_rng(0).random(10_000)
    holdout = 0.2
    parts = [held_out_mask(draws, holdout, part) for part in range(5)]
    assert (np.sum(parts, axis=0) == 1).all(), "every draw is in exactly one part"
    assert (parts[0] == (draws < holdout)).all(), "the first part is the one-part default's"
    with pytest.raises(ValueError, match="ranker_folds = 6"):
        train_bundle(small_dataset, tmp_path / "b", quick_config(6), version="v1")
