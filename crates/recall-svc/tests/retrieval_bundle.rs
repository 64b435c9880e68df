//! recall-svc on a catalogue-scale (retrieval) bundle: no per-user table, an HNSW index,
//! item-to-item rows and popularity as memory-mapped safetensors. The bundle is written
//! here the way `training/recsys_training/scale.py` writes one.

use std::{collections::HashMap, path::Path};

use recall_svc::{Channel, ExcludedItems, RecallIndex};
use recsys_bundle::{tensors::sha256_file, ANN_INDEX_FILE, EMBEDDINGS_FILE, ITEM_SIGNALS_FILE, ITEM_TO_ITEM_FILE};
use recsys_proto::v1::CatalogItem;
use safetensors::{tensor::TensorView, Dtype};
use serde_json::json;

const ITEMS: usize = 3_000;
const DIM: usize = 8;
/// The last items have no interactions: two per cluster.
const NEW_ITEMS: usize = 60;

fn bytes<T: Copy>(values: &[T], to_le: impl Fn(T) -> Vec<u8>) -> Vec<u8> {
    values.iter().flat_map(|&v| to_le(v)).collect()
}

fn write_tensors(path: &Path, tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| (name.to_string(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A deterministic value in [-1, 1) from two integers.
fn scatter(a: usize, b: usize) -> f32 {
    let mixed = (a as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (b as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    ((mixed.wrapping_mul(0x94D0_49BB_1331_11EB) >> 40) % 2000) as f32 / 1000.0 - 1.0
}

/// Cluster `c`'s direction, unit length.
fn cluster_direction(c: usize) -> Vec<f32> {
    let raw: Vec<f32> = (0..DIM).map(|d| scatter(c, d)).collect();
    let norm = raw.iter().map(|v| v * v).sum::<f32>().sqrt();
    raw.iter().map(|v| v / norm).collect()
}

/// Unit vectors in 30 directions (item n points mostly along direction n % 30).
fn vectors() -> Vec<f32> {
    let mut values = Vec::with_capacity(ITEMS * DIM);
    for item in 0..ITEMS {
        let cluster = item % 30;
        let raw: Vec<f32> = (0..DIM).map(|d| scatter(cluster, d) + 0.02 * scatter(item + 1000, d)).collect();
        let norm = raw.iter().map(|v| v * v).sum::<f32>().sqrt();
        values.extend(raw.iter().map(|v| v / norm));
    }
    values
}

/// `cold_start`: the manifest says the items without interactions have content vectors.
fn write_bundle(dir: &Path, cold_start: bool) {
    let vectors = vectors();
    write_tensors(
        &dir.join(EMBEDDINGS_FILE),
        vec![("item_vectors", Dtype::F32, vec![ITEMS, DIM], bytes(&vectors, |v: f32| v.to_le_bytes().to_vec()))],
    );
    // Item n's neighbours: the next two items of its cluster.
    let mut offsets = vec![0i64];
    let (mut neighbors, mut weights) = (Vec::new(), Vec::new());
    for item in 0..ITEMS {
        for (step, weight) in [(30, 0.9f32), (60, 0.5)] {
            neighbors.push(((item + step) % ITEMS) as u32);
            weights.push(weight);
        }
        offsets.push(neighbors.len() as i64);
    }
    write_tensors(
        &dir.join(ITEM_TO_ITEM_FILE),
        vec![
            ("offsets", Dtype::I64, vec![ITEMS + 1], bytes(&offsets, |v: i64| v.to_le_bytes().to_vec())),
            ("neighbors", Dtype::U32, vec![neighbors.len()], bytes(&neighbors, |v: u32| v.to_le_bytes().to_vec())),
            ("weights", Dtype::F32, vec![weights.len()], bytes(&weights, |v: f32| v.to_le_bytes().to_vec())),
        ],
    );
    let popularity: Vec<f32> = (0..ITEMS).map(|n| 1.0 / (n + 1) as f32).collect();
    write_tensors(
        &dir.join(ITEM_SIGNALS_FILE),
        vec![("popularity", Dtype::F32, vec![ITEMS], bytes(&popularity, |v: f32| v.to_le_bytes().to_vec()))],
    );
    // A one-layer navigable graph in the layout of `training/recsys_training/ann.py`: each
    // item links to the next four members of its cluster and to four items scattered over
    // the catalogue.
    let mut links = Vec::new();
    for item in 0..ITEMS {
        links.push(8u32);
        links.extend([30, 60, 90, 120].map(|step| ((item + step) % ITEMS) as u32));
        links.extend((1..=4).map(|step| ((scatter(item, step) + 1.0) * 0.5 * ITEMS as f32) as u32 % ITEMS as u32));
    }
    let (codes, scales): (Vec<Vec<i8>>, Vec<f32>) = vectors.chunks_exact(DIM).map(recall_svc::hnsw::quantize).unzip();
    write_tensors(
        &dir.join(ANN_INDEX_FILE),
        vec![
            ("level0_links", Dtype::U32, vec![ITEMS, 9], bytes(&links, |v: u32| v.to_le_bytes().to_vec())),
            ("upper_offsets", Dtype::I64, vec![ITEMS + 1], vec![0; 8 * (ITEMS + 1)]),
            ("upper_links", Dtype::U32, vec![0, 7], Vec::new()),
            ("entry_point", Dtype::U32, vec![1], 0u32.to_le_bytes().to_vec()),
            ("item_codes", Dtype::I8, vec![ITEMS, DIM], codes.concat().iter().map(|&c| c as u8).collect()),
            ("item_code_scales", Dtype::F32, vec![ITEMS], bytes(&scales, |v: f32| v.to_le_bytes().to_vec())),
        ],
    );
    let catalog: Vec<_> = (0..ITEMS)
        .map(|n| {
            let interactions = if n < ITEMS - NEW_ITEMS { 5 } else { 0 };
            json!({"id": format!("i{n}"), "title": "", "genres": [], "year": 2000 + n % 20, "interactions": interactions})
        })
        .collect();
    std::fs::write(dir.join("items.json"), serde_json::to_string(&catalog).unwrap()).unwrap();
    std::fs::write(dir.join("users.json"), "[]").unwrap();
    let files: HashMap<String, serde_json::Value> =
        [EMBEDDINGS_FILE, ITEM_TO_ITEM_FILE, ITEM_SIGNALS_FILE, ANN_INDEX_FILE]
            .iter()
            .map(|name| {
                let path = dir.join(name);
                let entry =
                    json!({"sha256": sha256_file(&path).unwrap(), "bytes": std::fs::metadata(&path).unwrap().len()});
                (name.to_string(), entry)
            })
            .collect();
    let mut manifest = json!({
        "format": recsys_bundle::FORMAT_VERSION, "version": "retrieval-test", "created_at": "",
        "training_data_sha256": "", "embedding_dim": DIM, "num_users": 0, "num_items": ITEMS, "files": files,
        "contents": "retrieval",
        "feature_config": {"fine_model": "", "coarse_model": "", "embedding_dim": DIM, "history_length": 0,
                           "user": [], "item": [], "cross": []},
    });
    if cold_start {
        // Genre "g{c}" maps to cluster c's direction (eras and the intercept to nothing).
        let mut mapping: Vec<Vec<f32>> = (0..30).map(cluster_direction).collect();
        mapping.extend(std::iter::repeat_n(vec![0.0; DIM], 7 + 2));
        let genres: Vec<String> = (0..30).map(|c| format!("g{c}")).collect();
        manifest["cold_start"] = json!({
            "items": NEW_ITEMS, "share": 0.3, "score": "inner_product", "threshold": 0.5,
            "content": {"genres": genres, "newest_year": 2019, "era_edges": [0, 1, 2, 4, 8, 18, 38], "mapping": mapping},
        });
    }
    std::fs::write(dir.join("manifest.json"), serde_json::to_string(&manifest).unwrap()).unwrap();
}

#[test]
fn a_retrieval_bundle_is_served_from_its_index_with_the_history_excluded() {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), false);
    let index = RecallIndex::load(dir.path(), 64, None).unwrap();
    assert!(index.is_approximate());

    // A user the bundle has never seen: the query is pooled from the history.
    let history: Vec<String> = ["i5", "i35", "i65"].iter().map(|id| id.to_string()).collect();
    let excluded: ExcludedItems = [5, 35, 65].into_iter().collect();
    let signals = index.signals("someone-new", &history, &[], &[1.0; 5]);
    let proposals = index.propose(Channel::Embedding, &signals, &excluded, 50);
    assert_eq!(proposals.len(), 50);
    assert!(proposals.iter().all(|item| !excluded.contains(item)), "seen items are skipped inside the search");
    // The history's direction is cluster 5: the nearest items are its other members.
    assert!(proposals.iter().take(20).all(|item| item % 30 == 5), "{proposals:?}");
    let best = index.score(Channel::Embedding, &signals, proposals[0]).unwrap();
    assert!(best > 0.99, "unit vectors of one direction: cosine {best}");

    // Item-to-item accumulates the history's neighbours only.
    let item_cf = index.propose(Channel::ItemCf, &signals, &excluded, 10);
    assert_eq!(item_cf, vec![95, 125], "neighbours of 5, 35 and 65 not yet seen, strongest first");
    assert_eq!(index.propose(Channel::Popular, &signals, &excluded, 4), vec![0, 1, 2, 3]);

    // A click a second ago changes the query without retraining.
    let moved = index.signals("someone-new", &["i7".to_string()], &[], &[1.0]);
    let after = index.propose(Channel::Embedding, &moved, &ExcludedItems::default(), 5);
    assert!(after.iter().all(|item| item % 30 == 7), "{after:?}");
}

#[test]
fn a_bundle_whose_index_was_altered_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), false);
    let path = dir.path().join(ANN_INDEX_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let error = RecallIndex::load(dir.path(), 64, None).err().expect("refused").to_string();
    assert!(error.contains(ANN_INDEX_FILE) && error.contains("sha256"), "{error}");
}

#[test]
fn the_cold_start_channel_finds_new_items_near_the_users_vector() {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), true);
    let index = RecallIndex::load(dir.path(), 64, None).unwrap();
    assert_eq!(index.new_item_count(), NEW_ITEMS);
    let history: Vec<String> = ["i5", "i35"].iter().map(|id| id.to_string()).collect();
    let signals = index.signals("someone-new", &history, &[], &[1.0; 5]);
    let excluded = ExcludedItems::from_iter([ITEMS - NEW_ITEMS + 35]);
    let proposals = index.propose(Channel::ColdStart, &signals, &excluded, 10);
    assert_eq!(proposals.len(), 10);
    assert!(proposals.iter().all(|&item| item >= ITEMS - NEW_ITEMS), "only items without interactions: {proposals:?}");
    // Cluster 5 holds two new items; one is excluded, the other leads.
    assert_eq!(proposals[0], ITEMS - NEW_ITEMS + 5, "{proposals:?}");
    // Its score is the model's, u·v: the embedding channel's for the same item, also for
    // a user between two clusters, whose vector is far shorter than 1.
    let between: Vec<String> = ["i5", "i6"].iter().map(|id| id.to_string()).collect();
    for user in [&signals, &index.signals("someone-new", &between, &[], &[1.0; 5])] {
        let score = index.score(Channel::ColdStart, user, proposals[0]).unwrap();
        let inner_product = index.score(Channel::Embedding, user, proposals[0]).unwrap();
        assert_eq!(score, inner_product, "the cold-start score against u·v");
    }

    // An item added after training is placed by the vector its attributes map to: a
    // genre of the user's cluster first, whatever is newer.
    let runtime = |id: &str, category: &str| {
        std::sync::Arc::new(CatalogItem { item_id: id.into(), category: category.into(), ..CatalogItem::default() })
    };
    let added = [runtime("newest", "g7"), runtime("of-cluster-5", "g5|unknown"), runtime("no-genre", "")];
    let ordered = index.order_runtime_items(&signals, &added, 2);
    assert_eq!(ordered[0].0, "of-cluster-5", "{ordered:?}");
    assert!(ordered[0].1 > 0.99, "u·v with the cluster's direction, |u| about 1 here: {ordered:?}");
    assert_eq!(ordered.len(), 2);

    // A bundle whose manifest does not say how the channel scores was written when it
    // scored u·v / |u|: its threshold is on that. A user between two clusters has a
    // vector shorter than 1, which that score divides out.
    let manifest_path = dir.path().join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["cold_start"].as_object_mut().unwrap().remove("score");
    std::fs::write(&manifest_path, serde_json::to_string(&manifest).unwrap()).unwrap();
    let index = RecallIndex::load(dir.path(), 64, None).unwrap();
    let signals = index.signals("someone-new", &between, &[], &[1.0; 5]);
    let scaled: Vec<f32> = [ITEMS - NEW_ITEMS + 5, ITEMS - NEW_ITEMS + 6]
        .into_iter()
        .map(|item| {
            index.score(Channel::ColdStart, &signals, item).unwrap()
                / index.score(Channel::Embedding, &signals, item).unwrap()
        })
        .collect();
    assert!(scaled[0] > 1.1 && (scaled[0] - scaled[1]).abs() < 1e-4, "both divided by the same |u| < 1: {scaled:?}");

    // Without the manifest's cold-start section the channel proposes nothing from the
    // bundle, and run-time items newest first.
    let plain = tempfile::tempdir().unwrap();
    write_bundle(plain.path(), false);
    let index = RecallIndex::load(plain.path(), 64, None).unwrap();
    let signals = index.signals("someone-new", &history, &[], &[1.0; 5]);
    assert!(index.propose(Channel::ColdStart, &signals, &ExcludedItems::default(), 10).is_empty());
    let ordered = index.order_runtime_items(&signals, &added, 2);
    assert_eq!(ordered, [("newest".to_string(), 1.0), ("of-cluster-5".to_string(), 1.0)]);
}
