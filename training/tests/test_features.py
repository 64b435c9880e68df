from recsys_training.data import Item
from recsys_training.features import FeatureSpec


def spec() -> FeatureSpec:
    # The same specification as the Rust unit tests in crates/bundle/src/features.rs,
    # which assert the same vectors: the two encoders must agree.
    return FeatureSpec(
        genres=["Action", "Comedy"], occupations=["artist", "student"], age_scale=100.0,
        user_events_log_scale=2.0, item_interactions_log_scale=4.0, year_min=1900, year_max=2000,
    )


def test_user_features_match_the_rust_encoder():
    assert spec().user_features(25, "F", "student", 0) == [0.25, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert len(spec().user_features(0, "", "", 0)) == spec().user_feature_dim


def test_item_features_match_the_rust_encoder():
    item = Item(item_id="1", title="t", genres=["Comedy"], year=1950)
    assert spec().item_features(item, 0) == [0.0, 1.0, 0.5, 0.0]
    assert len(spec().item_features(item, 3)) == spec().item_feature_dim


def test_unknown_year_encodes_as_zero():
    item = Item(item_id="1", title="t", genres=[], year=0)
    assert spec().item_features(item, 0)[2] == 0.0
