//! The sequence channel on the default bundle (`make test` trains it): the encoder served
//! through ONNX Runtime gives the query vectors PyTorch computed at training time for the
//! same histories (`sequence_fixture.json`), and the channel proposes by them.

use std::path::{Path, PathBuf};

use recall_svc::{Channel, ExcludedItems, RecallIndex};
use serde::Deserialize;

#[derive(Deserialize)]
struct Example {
    /// Most recent first, as serving sends a history.
    history_item_ids: Vec<String>,
    query: Vec<f32>,
}

fn bundle_dir() -> PathBuf {
    let root = std::env::var_os("RECSYS_TEST_BUNDLE")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/bundles"), PathBuf::from);
    recsys_bundle::resolve_dir(&root).expect("a bundle exists: run `make test`, which bootstraps it")
}

fn fixture(dir: &Path) -> Vec<Example> {
    let text =
        std::fs::read_to_string(dir.join("sequence_fixture.json")).expect("the default bundle has a sequence encoder");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn the_served_encoder_gives_trainings_queries_and_the_channel_searches_by_them() {
    let dir = bundle_dir();
    let index =
        RecallIndex::load(&dir, 128, None).expect("ORT_DYLIB_PATH points at libonnxruntime (make test sets it)");
    let examples = fixture(&dir);
    assert!(examples.len() >= 4, "the fixture holds several histories");
    let vectors = &index.embeddings.item_vectors;
    for example in &examples {
        let signals = index.signals("", &example.history_item_ids, &[], &[]);
        // The channel's score of an item is the query's inner product with its vector.
        for item in [0, 1, 100, vectors.rows - 1] {
            let trained: f32 = example.query.iter().zip(vectors.row(item)).map(|(q, v)| q * v).sum();
            let served = index.score(Channel::Sequence, &signals, item).expect("a known history has a query");
            assert!((served - trained).abs() <= 1e-3 * trained.abs().max(1.0), "item {item}: {served} vs {trained}");
        }
        let seen: ExcludedItems =
            example.history_item_ids.iter().filter_map(|id| index.embeddings.item_position(id)).collect();
        let proposals = index.propose(Channel::Sequence, &signals, &seen, 20);
        assert_eq!(proposals.len(), 20);
        assert!(proposals.iter().all(|item| !seen.contains(item)), "the history is not proposed again");
        let scores: Vec<f32> =
            proposals.iter().map(|&item| index.score(Channel::Sequence, &signals, item).unwrap()).collect();
        assert!(scores.windows(2).all(|pair| pair[0] >= pair[1]), "best first: {scores:?}");
    }
    // Only the order of the latest items differs: the query does too (it reads a sequence,
    // not a set).
    let history = &examples[0].history_item_ids;
    let mut swapped = history.clone();
    let second = 1.min(swapped.len() - 1);
    swapped.swap(0, second);
    if swapped != *history {
        let (one, other) = (index.signals("", history, &[], &[]), index.signals("", &swapped, &[], &[]));
        assert_ne!(index.score(Channel::Sequence, &one, 0), index.score(Channel::Sequence, &other, 0));
    }
    // The channel off (no quota or weight): the encoder does not run, the channel is silent.
    let off = index.signals_with("", history, &[], &[], false);
    assert_eq!(index.score(Channel::Sequence, &off, 0), None);
    assert!(index.propose(Channel::Sequence, &off, &ExcludedItems::default(), 10).is_empty());
    // Nothing known to read, nothing to say.
    let unknown = index.signals("", &["no-such-item".to_string()], &[], &[]);
    assert_eq!(index.score(Channel::Sequence, &unknown, 0), None);
    assert!(index.propose(Channel::Sequence, &unknown, &ExcludedItems::default(), 10).is_empty());
}

#[test]
fn a_bundle_whose_sequence_encoder_was_altered_is_refused() {
    let source = bundle_dir();
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, copy.path().join(path.file_name().unwrap())).unwrap();
    }
    let encoder = copy.path().join("sequence_encoder.onnx");
    let mut bytes = std::fs::read(&encoder).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&encoder, bytes).unwrap();
    let error = RecallIndex::load(copy.path(), 128, None).err().expect("refused").to_string();
    assert!(error.contains("sequence_encoder.onnx"), "{error}");
}
