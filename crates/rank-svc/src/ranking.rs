//! Coarse then fine ranking of one user's candidates.

use std::{collections::HashMap, path::Path};

use ort::environment::Environment;
use recsys_bundle::{
    read_catalog, read_manifest, read_user_ids, CatalogItem, EmbeddingSpace, FeatureSpec, RankerInputs, UserAttributes,
};
use recsys_proto::v1::UserFeatures;

use crate::{drift::ScoreDrift, OnnxRanker, Result};

static BATCH_SIZE: std::sync::LazyLock<prometheus::HistogramVec> = std::sync::LazyLock::new(|| {
    prometheus::register_histogram_vec!(
        "recsys_rank_batch_size",
        "Items scored per request by each ranking step",
        &["step"],
        prometheus::exponential_buckets(1.0, 2.0, 13).expect("valid buckets")
    )
    .expect("metric registers once")
});

static MODEL_INFO: std::sync::LazyLock<prometheus::IntGaugeVec> = std::sync::LazyLock::new(|| {
    prometheus::register_int_gauge_vec!(
        "recsys_model_info",
        "Loaded model bundle (value 1) by service and version",
        &["service", "version"]
    )
    .expect("metric registers once")
});

#[derive(Debug, Clone, PartialEq)]
pub struct RankedCandidate {
    pub item: usize,
    pub coarse_score: f32,
    pub fine_score: f32,
}

pub struct Ranker {
    version: String,
    embeddings: EmbeddingSpace,
    catalog: Vec<CatalogItem>,
    feature_spec: FeatureSpec,
    /// 1-based model index of each trained user (0 is unknown).
    user_index: HashMap<String, i64>,
    /// Item features precomputed once: they change only with the bundle.
    item_features: Vec<f32>,
    model: OnnxRanker,
    drift: Option<ScoreDrift>,
    /// Drift of the user-activity and item-popularity inputs (last column of each row).
    user_activity_drift: Option<ScoreDrift>,
    item_popularity_drift: Option<ScoreDrift>,
}

impl Ranker {
    pub fn load(dir: &Path, environment: &Environment, sessions: usize, intra_op_threads: usize) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        let catalog = read_catalog(dir)?;
        let user_index = read_user_ids(dir)?.into_iter().enumerate().map(|(n, id)| (id, n as i64 + 1)).collect();
        let mut item_features = Vec::with_capacity(catalog.len() * manifest.feature_spec.item_feature_dim());
        for item in &catalog {
            manifest.feature_spec.item_features(item, &mut item_features);
        }
        let model = OnnxRanker::load(&dir.join("ranker.onnx"), environment, sessions, intra_op_threads)?;
        let drift = manifest.score_distribution.as_ref().and_then(ScoreDrift::new);
        if drift.is_none() {
            tracing::warn!("bundle has no training score distribution: drift is not monitored");
        }
        let feature_drift = |name: &str| {
            manifest.feature_distributions.get(name).and_then(|reference| ScoreDrift::for_feature(name, reference))
        };
        let user_activity_drift = feature_drift("user_events");
        let item_popularity_drift = feature_drift("item_interactions");
        MODEL_INFO.with_label_values(&["rank", manifest.version.as_str()]).set(1);
        Ok(Self {
            version: manifest.version,
            embeddings: EmbeddingSpace::load(dir)?,
            catalog,
            feature_spec: manifest.feature_spec,
            user_index,
            item_features,
            model,
            drift,
            user_activity_drift,
            item_popularity_drift,
        })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn item_id(&self, item: usize) -> &str {
        &self.catalog[item].id
    }

    /// Positions of the known items among `item_ids` (unknown ids are dropped: they
    /// come from another bundle version and cannot be scored).
    pub fn resolve_items(&self, item_ids: &[String]) -> Vec<usize> {
        item_ids.iter().filter_map(|id| self.embeddings.item_position(id)).collect()
    }

    /// Inner product with the user's embedding; without any user signal, popularity.
    pub fn coarse(&self, user: &UserFeatures, items: &[usize]) -> Vec<(usize, f32)> {
        match self.embeddings.user_vector(&user.user_id, &user.history_item_ids) {
            Some(vector) => items.iter().map(|&item| (item, self.embeddings.score(&vector, item))).collect(),
            None => items.iter().map(|&item| (item, (self.catalog[item].interactions as f32).ln_1p())).collect(),
        }
    }

    /// The fine model's inputs for `user` against each of `items`, in bundle encoding.
    pub fn fine_inputs(&self, user: &UserFeatures, items: &[usize]) -> RankerInputs {
        let profile = user.profile.clone().unwrap_or_default();
        let attributes = UserAttributes {
            age: profile.age,
            gender: &profile.gender,
            occupation: &profile.occupation,
            event_count: user.event_count,
        };
        let mut user_row = Vec::with_capacity(self.feature_spec.user_feature_dim());
        self.feature_spec.user_features(&attributes, &mut user_row);
        let user_index = self.user_index.get(&user.user_id).copied().unwrap_or(0);
        let item_dim = self.feature_spec.item_feature_dim();
        let mut inputs = RankerInputs::default();
        for &item in items {
            inputs.user_index.push(user_index);
            inputs.item_index.push(item as i64 + 1);
            inputs.user_features.extend_from_slice(&user_row);
            inputs.item_features.extend_from_slice(&self.item_features[item * item_dim..(item + 1) * item_dim]);
        }
        inputs
    }

    /// Feeds the last (log-activity / log-popularity) column of the inputs to the drift
    /// monitors: one value per request for the user, one per ranked item.
    fn observe_input_drift(&self, inputs: &RankerInputs) {
        if inputs.is_empty() {
            return;
        }
        let user_dim = inputs.user_features.len() / inputs.len();
        let item_dim = inputs.item_features.len() / inputs.len();
        if let Some(drift) = &self.user_activity_drift {
            drift.observe(&[inputs.user_features[user_dim - 1]]);
        }
        if let Some(drift) = &self.item_popularity_drift {
            let values: Vec<f32> = inputs.item_features.chunks_exact(item_dim).map(|row| row[item_dim - 1]).collect();
            drift.observe(&values);
        }
    }

    /// Coarse-ranks `items`, keeps `coarse_keep`, fine-ranks those; best first.
    /// Blocking (runs the model).
    pub fn rank(&self, user: &UserFeatures, items: &[usize], coarse_keep: usize) -> Result<Vec<RankedCandidate>> {
        let coarse_span = tracing::info_span!("coarse", items = items.len()).entered();
        BATCH_SIZE.with_label_values(&["coarse"]).observe(items.len() as f64);
        let mut coarse = self.coarse(user, items);
        coarse.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        coarse.truncate(coarse_keep);
        drop(coarse_span);
        let kept: Vec<usize> = coarse.iter().map(|&(item, _)| item).collect();
        let fine_span = tracing::info_span!("fine", items = kept.len()).entered();
        BATCH_SIZE.with_label_values(&["fine"]).observe(kept.len() as f64);
        let inputs = self.fine_inputs(user, &kept);
        let fine = self.model.score(&inputs)?;
        drop(fine_span);
        self.observe_input_drift(&inputs);
        if let Some(drift) = &self.drift {
            drift.observe(&fine);
        }
        let mut ranked: Vec<RankedCandidate> = coarse
            .into_iter()
            .zip(fine)
            .map(|((item, coarse_score), fine_score)| RankedCandidate { item, coarse_score, fine_score })
            .collect();
        ranked.sort_by(|a, b| b.fine_score.total_cmp(&a.fine_score).then(a.item.cmp(&b.item)));
        Ok(ranked)
    }
}
