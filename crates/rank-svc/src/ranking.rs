//! Coarse then fine ranking of one user's candidates.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    path::Path,
    sync::Arc,
};

use ort::environment::Environment;
use recsys_bundle::{
    read_catalog, read_manifest, read_user_ids, AttributeCrosses, CatalogItem, CrossSource, EmbeddingSpace,
    FeatureConfig, ItemIds, ItemScores, ItemToItem, ItemWindowCounts, PositionHasher, RankerInputs, UserAttributes,
    RECENT_ITEMS,
};
use recsys_proto::v1::{CandidateColumns, Channel, ChannelColumn, UserFeatures};

use crate::{
    drift::ScoreDrift, ModelInput, ModelOptions, OnnxModel, RankError, Result, WithoutBehaviour, COARSE_INPUTS,
    FINE_INPUTS,
};

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

/// Rows of the warm-up batch: the served fine batch (`coarse_keep`, 50 by default).
const WARM_UP_BATCH: usize = 50;

/// The fine model's inputs as named tensors, in the model's order.
pub(crate) fn fine_feed(inputs: &RankerInputs) -> [ModelInput<'_>; 6] {
    let width = |values: usize| values / inputs.len().max(1);
    [
        ModelInput::Int64 { name: FINE_INPUTS[0], width: 0, values: &inputs.user_index },
        ModelInput::Int64 { name: FINE_INPUTS[1], width: 0, values: &inputs.item_index },
        ModelInput::Int64 { name: FINE_INPUTS[2], width: width(inputs.history.len()), values: &inputs.history },
        ModelInput::Float32 {
            name: FINE_INPUTS[3],
            width: width(inputs.user_features.len()),
            values: &inputs.user_features,
        },
        ModelInput::Float32 {
            name: FINE_INPUTS[4],
            width: width(inputs.item_features.len()),
            values: &inputs.item_features,
        },
        ModelInput::Float32 {
            name: FINE_INPUTS[5],
            width: width(inputs.cross_features.len()),
            values: &inputs.cross_features,
        },
    ]
}

#[derive(Debug, Clone, PartialEq)]
pub struct RankedCandidate {
    pub item: usize,
    pub coarse_score: f32,
    pub fine_score: f32,
}

pub struct Ranker {
    version: String,
    /// The score at which a new item earns the new-item slot (`Manifest::cold_start`);
    /// `None`: training set no threshold.
    cold_start_threshold: Option<f32>,
    embeddings: EmbeddingSpace,
    catalog: Vec<CatalogItem>,
    features: FeatureConfig,
    /// 1-based model index of each trained user (0 is unknown).
    user_index: HashMap<String, i64>,
    /// Item features precomputed once: they change only with the bundle.
    item_features: Vec<f32>,
    /// The cross features in column order (parsed once from `features.cross`).
    cross: Vec<CrossSource>,
    /// The automated attribute crosses' tables, resolved against the catalogue.
    attribute_crosses: AttributeCrosses,
    item_to_item: ItemToItem,
    coarse_model: OnnxModel,
    fine_model: Arc<OnnxModel>,
    drift: Option<ScoreDrift>,
    /// Drift of the user-activity and item-popularity inputs: (column, monitor).
    user_activity_drift: Option<(usize, ScoreDrift)>,
    item_popularity_drift: Option<(usize, ScoreDrift)>,
    without_behaviour: WithoutBehaviour,
}

/// What one request's user contributes to every candidate's inputs, computed once, at a
/// cost of history × neighbours and dim² — never the catalogue.
struct UserContext<'r> {
    index: i64,
    features: Vec<f32>,
    /// Whether any history item is one this bundle knows.
    has_behaviour: bool,
    /// `history_length` 1-based item indices, latest first, 0-padded.
    history: Vec<i64>,
    /// The item-to-item model's scores given the whole history (zero outside the
    /// history's neighbour lists), and their spread over the items the user has not seen.
    item_cf: ItemScores,
    item_cf_spread: Spread,
    /// The same given only the latest `RECENT_ITEMS` items (unless not configured).
    item_cf_recent: Option<ItemScores>,
    /// The user's query vector and the spread of its inner products over unseen items.
    vector: Option<Vec<f32>>,
    embedding_spread: Spread,
    /// The user's lift row of each attribute cross (`None`: nothing known of the user).
    attribute_lifts: Vec<Option<Cow<'r, [f64]>>>,
}

/// Mean and standard deviation of a user's scores over the unseen catalogue, from sums
/// (training standardises the same way: `scale_rankers.CrossFeatures`, `CrossScorer`).
#[derive(Debug, Default, Clone, Copy)]
struct Spread {
    mean: f64,
    std: f64,
}

impl Spread {
    fn from_sums(sum: f64, squares: f64, count: usize) -> Self {
        let count = count.max(1) as f64;
        let mean = sum / count;
        Self { mean, std: (squares / count - mean * mean).max(0.0).sqrt() }
    }

    /// 0 when the scores are flat (no signal), as training encodes it.
    fn z(&self, score: f64) -> f32 {
        if self.std > 1e-9 {
            ((score - self.mean) / self.std) as f32
        } else {
            0.0
        }
    }
}

impl Ranker {
    pub fn load(dir: &Path, environment: &Environment, options: &ModelOptions) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        let features = manifest.feature_config.clone();
        let unknown = features.unknown_sources();
        if !unknown.is_empty() {
            return Err(RankError::ModelContract {
                model: dir.display().to_string(),
                reason: format!("the feature configuration names sources this rank-svc cannot compute: {unknown:?}"),
            });
        }
        let catalog = read_catalog(dir)?;
        let embeddings =
            EmbeddingSpace::load_with(dir, &manifest, ItemIds::new(catalog.iter().map(|item| item.id.as_str())))?;
        let user_index = read_user_ids(dir)?.into_iter().enumerate().map(|(n, id)| (id, n as i64 + 1)).collect();
        let mut item_features = Vec::with_capacity(catalog.len() * features.item_dim());
        for item in &catalog {
            features.item_features(item, &mut item_features);
        }
        let item_to_item = ItemToItem::load(dir, &manifest)?;
        let cross = features.cross.iter().filter_map(|name| features.cross_source(name)).collect();
        let attribute_crosses = AttributeCrosses::resolve(&features.attribute_crosses, &catalog)
            .map_err(|reason| RankError::ModelContract { model: dir.display().to_string(), reason })?;
        let load = |file: &str, inputs| {
            OnnxModel::load(&dir.join(file), inputs, environment, options.sessions, options.intra_op_threads)
        };
        let coarse_model = load("coarse.onnx", &COARSE_INPUTS)?;
        let fine_model = Arc::new(load(options.fine_variant.file(), &FINE_INPUTS)?);
        let drift = manifest.score_distribution.as_ref().and_then(ScoreDrift::new);
        if drift.is_none() {
            tracing::warn!("bundle has no training score distribution: drift is not monitored");
        }
        let feature_drift = |name: &str, column: Option<usize>| {
            let reference = manifest.feature_distributions.get(name)?;
            Some((column?, ScoreDrift::for_feature(name, reference)?))
        };
        let user_activity_drift = feature_drift("user_events", features.user_offset("event_count"));
        let item_popularity_drift = feature_drift("item_interactions", features.item_offset("interactions"));
        MODEL_INFO.with_label_values(&["rank", manifest.version.as_str()]).set(1);
        let ranker = Self {
            cold_start_threshold: manifest.cold_start.as_ref().map(|policy| policy.threshold),
            version: manifest.version,
            embeddings,
            catalog,
            features,
            user_index,
            item_features,
            cross,
            attribute_crosses,
            item_to_item,
            coarse_model,
            fine_model,
            drift,
            user_activity_drift,
            item_popularity_drift,
            without_behaviour: options.without_behaviour,
        };
        ranker.warm_up()?;
        Ok(ranker)
    }

    /// The fine model, for the micro-batcher's workers.
    pub fn fine_model(&self) -> Arc<OnnxModel> {
        Arc::clone(&self.fine_model)
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// Items in the bundle's catalogue.
    pub fn item_count(&self) -> usize {
        self.catalog.len()
    }

    pub fn item_id(&self, item: usize) -> &str {
        &self.catalog[item].id
    }

    /// Recall's candidates as this version reads them. `scored_here` says recall scored
    /// them on this very bundle version (the request is pinned to it): then each one's
    /// catalogue position and embedding inner product come with it and are used as they are.
    pub fn candidates(&self, candidates: &CandidateColumns, scored_here: bool) -> Result<Candidates> {
        candidates.check_aligned().map_err(RankError::InvalidArgument)?;
        let mut items = Vec::with_capacity(candidates.len());
        let mut unscored = Vec::new();
        // Recall's inner products, when it computed them on this version for this user.
        let recalled = candidates
            .channels
            .iter()
            .enumerate()
            .find(|(_, column)| column.channel() == Channel::Embedding && !column.scores.is_empty())
            .filter(|_| scored_here);
        let mut embedding_scores = recalled.map(|_| Vec::with_capacity(candidates.len()));
        let mut fused_scores = (!candidates.scores.is_empty()).then(|| Vec::with_capacity(candidates.len()));
        // The best new item recall's cold-start channel proposed at or above the bundle's
        // threshold, by that channel's score.
        let cold_start = candidates.channel(Channel::ColdStart);
        let threshold = self.cold_start_threshold;
        let mut cold_start_pick: Option<(f32, usize)> = None;
        for (index, item_id) in candidates.item_ids.iter().enumerate() {
            let position = candidates.position(index);
            let item = match position {
                // Recall's position on this very version: checked, not looked up.
                position if scored_here && position > 0 => {
                    match self.embeddings.item_at(position as usize - 1, item_id) {
                        Some(item) => item,
                        None => {
                            return Err(RankError::InvalidArgument(format!(
                                "candidates.positions[{index}] {position} does not hold item {item_id:?} in bundle {}",
                                self.version
                            )))
                        }
                    }
                }
                _ => match self.embeddings.item_position(item_id) {
                    Some(item) => item,
                    None => {
                        unscored.push(item_id.clone());
                        continue;
                    }
                },
            };
            items.push(item);
            // Only an item recall proposed from this very version, which this version
            // says nobody has interacted with, can be the pick (the catalogue is read
            // last: at a million items each read is a cache miss).
            let new_here = || scored_here && position > 0 && self.catalog[item].interactions == 0;
            if let Some(score) = threshold
                .zip(cold_start)
                .and_then(|(threshold, column)| new_item_score(column, index, threshold))
                .filter(|_| new_here())
            {
                if cold_start_pick.is_none_or(|(best, _)| score > best) {
                    cold_start_pick = Some((score, item));
                }
            }
            if let Some(scores) = &mut fused_scores {
                let score = candidates.scores[index];
                if !score.is_finite() {
                    return Err(RankError::InvalidArgument(format!(
                        "candidates.scores[{index}]: the fused score is not a finite number"
                    )));
                }
                scores.push(score);
            }
            if let (Some((channel, column)), Some(scores)) = (recalled, &mut embedding_scores) {
                let score = column.score(index);
                if !score.is_finite() {
                    return Err(RankError::InvalidArgument(format!(
                        "candidates.channels[{channel}].scores[{index}]: the embedding score is not a finite number"
                    )));
                }
                scores.push(score);
            }
        }
        Ok(Candidates {
            items,
            embedding_scores,
            fused_scores,
            unscored,
            cold_start_pick: cold_start_pick.map(|(_, item)| item),
        })
    }

    /// Positions of the known items among `item_ids` (unknown ids are dropped: they
    /// come from another bundle version and cannot be scored).
    pub fn resolve_items<'a>(&self, item_ids: impl IntoIterator<Item = &'a str>) -> Vec<usize> {
        item_ids.into_iter().filter_map(|id| self.embeddings.item_position(id)).collect()
    }

    fn user_context(&self, user: &UserFeatures, request_time: i64) -> UserContext<'_> {
        let profile = user.profile.clone().unwrap_or_default();
        let attributes = UserAttributes {
            age: profile.age,
            gender: &profile.gender,
            occupation: &profile.occupation,
            event_count: user.event_count,
            history_timestamps: &user.history_timestamps,
            request_time,
        };
        let mut features = Vec::with_capacity(self.features.user_dim());
        self.features.user_features(&attributes, &mut features);

        let history_items: Vec<usize> = self.resolve_items(user.history_item_ids.iter().map(String::as_str));
        let mut history = vec![0i64; self.features.history_length];
        for (slot, &item) in history.iter_mut().zip(&history_items) {
            *slot = item as i64 + 1;
        }
        let attribute_lifts = self.attribute_crosses.user_lifts(&attributes, &history_items);
        let seen: HashSet<usize, PositionHasher> = history_items.iter().copied().collect();
        let unseen = self.catalog.len().saturating_sub(seen.len());
        let wants = |source: CrossSource| self.cross.contains(&source);
        let item_cf = self.item_to_item.sparse_scores(&history_items);
        let (sum, squares) = item_cf
            .nonzero()
            .filter(|(item, _)| !seen.contains(item))
            .fold((0.0, 0.0), |(sum, squares), (_, score)| (sum + score, squares + score * score));
        let item_cf_spread = Spread::from_sums(sum, squares, unseen);
        let vector = self.embeddings.user_vector(&user.user_id, &user.history_item_ids, &user.history_timestamps);
        let embedding_spread = match &vector {
            Some(vector) if wants(CrossSource::EmbeddingZscore) => {
                let (mut sum, mut squares) = self.embeddings.moments.score_sums(vector);
                for &item in &seen {
                    let score = f64::from(self.embeddings.score(vector, item));
                    sum -= score;
                    squares -= score * score;
                }
                Spread::from_sums(sum, squares, unseen)
            }
            _ => Spread::default(),
        };
        let item_cf_recent = wants(CrossSource::ItemCfRecentScore)
            .then(|| self.item_to_item.sparse_scores(&history_items[..history_items.len().min(RECENT_ITEMS)]));
        UserContext {
            index: self.user_index.get(&user.user_id).copied().unwrap_or(0),
            features,
            has_behaviour: !history_items.is_empty(),
            history,
            item_cf,
            item_cf_spread,
            item_cf_recent,
            vector,
            embedding_spread,
            attribute_lifts,
        }
    }

    /// The cross features of `items`, rows in the configuration's column order;
    /// `recalled` holds recall's embedding inner products of the same items, if it sent them.
    fn cross_features(&self, context: &UserContext<'_>, items: &[usize], recalled: Option<&[f32]>) -> Vec<f32> {
        let mut out = Vec::with_capacity(items.len() * self.cross.len());
        let wants_embedding = self
            .cross
            .iter()
            .any(|source| matches!(source, CrossSource::EmbeddingScore | CrossSource::EmbeddingZscore));
        for (row, &item) in items.iter().enumerate() {
            // One inner product per candidate, whichever columns use it — and none when
            // recall already computed it: at catalogue scale the item's vector is a cache
            // miss, the largest cost of these features.
            let embedding = match (&context.vector, recalled) {
                (Some(_), Some(scores)) if wants_embedding => scores[row],
                (Some(vector), None) if wants_embedding => self.embeddings.score(vector, item),
                _ => 0.0,
            };
            let item_cf = context.item_cf.get(item);
            for source in &self.cross {
                out.push(match source {
                    CrossSource::ItemCfScore => item_cf as f32,
                    CrossSource::ItemCfZscore => context.item_cf_spread.z(item_cf),
                    CrossSource::ItemCfRecentScore => {
                        context.item_cf_recent.as_ref().map_or(0.0, |scores| scores.get(item) as f32)
                    }
                    CrossSource::EmbeddingScore => embedding,
                    CrossSource::EmbeddingZscore => context.embedding_spread.z(f64::from(embedding)),
                    CrossSource::Attribute(cross) => {
                        self.attribute_crosses.value(*cross, context.attribute_lifts[*cross].as_deref(), item)
                    }
                });
            }
        }
        out
    }

    /// The fine model's inputs for `user` against each of `items`, in bundle encoding.
    pub fn fine_inputs(&self, user: &UserFeatures, items: &[usize], request_time: i64) -> RankerInputs {
        let context = self.user_context(user, request_time);
        self.inputs_for(&context, items, self.cross_features(&context, items, None))
    }

    /// Each row's item input is the bundle's item columns, then the live ones as zeros
    /// (`fill_live_item_features` writes them once the store has answered).
    fn inputs_for(&self, context: &UserContext<'_>, items: &[usize], cross_features: Vec<f32>) -> RankerInputs {
        let item_dim = self.features.item_dim();
        let live_dim = self.features.live_item_dim();
        let mut inputs = RankerInputs { cross_features, ..RankerInputs::default() };
        inputs.item_features.reserve(items.len() * (item_dim + live_dim));
        for &item in items {
            inputs.user_index.push(context.index);
            inputs.item_index.push(item as i64 + 1);
            inputs.history.extend_from_slice(&context.history);
            inputs.user_features.extend_from_slice(&context.features);
            inputs.item_features.extend_from_slice(&self.item_features[item * item_dim..(item + 1) * item_dim]);
            inputs.item_features.extend(std::iter::repeat_n(0.0, live_dim));
        }
        inputs
    }

    /// Whether the fine model reads the candidates' windowed counts from the feature store
    /// (the bundle's `live_item` features).
    pub fn reads_live_item_features(&self) -> bool {
        self.features.live_item_dim() > 0
    }

    /// Writes the live item columns of each row of `inputs` from its candidate's counts
    /// (`counts[n]` for row n; `None` where the store did not answer encodes as zeros).
    pub fn fill_live_item_features(&self, inputs: &mut RankerInputs, counts: &[Option<ItemWindowCounts>]) {
        let (item_dim, live_dim) = (self.features.item_dim(), self.features.live_item_dim());
        if live_dim == 0 {
            return;
        }
        let mut live = Vec::with_capacity(live_dim);
        for (row, counts) in inputs.item_features.chunks_exact_mut(item_dim + live_dim).zip(counts) {
            live.clear();
            self.features.live_item_features(counts.as_ref(), &mut live);
            row[item_dim..].copy_from_slice(&live);
        }
    }

    /// Scores a batch with the fine model. Blocking.
    pub fn fine_scores(&self, inputs: &RankerInputs) -> Result<Vec<f32>> {
        self.fine_model.score(inputs.len(), &fine_feed(inputs))
    }

    /// Runs both models on every session with a typical batch (the first catalogue items
    /// for an anonymous user) before the service reports SERVING; see `OnnxModel::warm_up`.
    fn warm_up(&self) -> Result<()> {
        let items: Vec<usize> = (0..self.catalog.len().min(WARM_UP_BATCH)).collect();
        if items.is_empty() {
            return Ok(());
        }
        let context = self.user_context(&UserFeatures::default(), 0);
        let cross = self.cross_features(&context, &items, None);
        let coarse = [ModelInput::Float32 { name: COARSE_INPUTS[0], width: self.features.cross_dim(), values: &cross }];
        self.coarse_model.warm_up(items.len(), &coarse)?;
        let inputs = self.inputs_for(&context, &items, cross);
        self.fine_model.warm_up(items.len(), &fine_feed(&inputs))
    }

    /// Scores rows of cross features with the coarse model. Blocking.
    pub fn coarse_scores(&self, cross_features: &[f32]) -> Result<Vec<f32>> {
        let width = self.features.cross_dim();
        let rows = cross_features.len() / width.max(1);
        self.coarse_model.score(rows, &[ModelInput::Float32 { name: COARSE_INPUTS[0], width, values: cross_features }])
    }

    /// Feeds the activity / popularity columns of the inputs to the drift monitors: one
    /// value per request for the user, one per ranked item.
    fn observe_input_drift(&self, inputs: &RankerInputs) {
        if inputs.is_empty() {
            return;
        }
        let item_dim = inputs.item_features.len() / inputs.len();
        if let Some((column, drift)) = &self.user_activity_drift {
            drift.observe(&[inputs.user_features[*column]]);
        }
        if let Some((column, drift)) = &self.item_popularity_drift {
            let values: Vec<f32> = inputs.item_features.chunks_exact(item_dim).map(|row| row[*column]).collect();
            drift.observe(&values);
        }
    }

    /// Coarse-ranks `items`, keeps `coarse_keep`, fine-ranks those; best first.
    /// Blocking (runs the models).
    /// `request_time` (Unix seconds) feeds the context features.
    pub fn rank(
        &self,
        user: &UserFeatures,
        items: &[usize],
        coarse_keep: usize,
        request_time: i64,
    ) -> Result<Vec<RankedCandidate>> {
        let candidates = Candidates { items: items.to_vec(), ..Candidates::default() };
        self.rank_candidates(user, &candidates, coarse_keep, request_time)
    }

    /// `rank` for candidates as `candidates` read them from a request.
    pub fn rank_candidates(
        &self,
        user: &UserFeatures,
        candidates: &Candidates,
        coarse_keep: usize,
        request_time: i64,
    ) -> Result<Vec<RankedCandidate>> {
        let stage = match self.coarse_stage(user, candidates, coarse_keep, request_time)? {
            CoarseOutcome::Decided(ranked) => return Ok(ranked),
            CoarseOutcome::Fine(stage) => stage,
        };
        let fine_span = tracing::info_span!("fine", items = stage.inputs.len()).entered();
        let fine = self.fine_scores(&stage.inputs)?;
        drop(fine_span);
        Ok(self.finish(stage.coarse, fine))
    }

    /// Coarse-ranks `items` and keeps the best `coarse_keep` with the fine model's inputs
    /// built for them — or, for a user without behaviour, decides the order without either
    /// model. Blocking (runs the coarse model).
    pub fn coarse_stage(
        &self,
        user: &UserFeatures,
        candidates: &Candidates,
        coarse_keep: usize,
        request_time: i64,
    ) -> Result<CoarseOutcome> {
        let items = candidates.items.as_slice();
        if candidates.embedding_scores.as_ref().is_some_and(|scores| scores.len() != items.len()) {
            return Err(RankError::InvalidArgument("one embedding score per candidate is required".into()));
        }
        let context = self.user_context(user, request_time);
        if let Some(ranked) = self.in_recall_order(&context, candidates, coarse_keep) {
            return Ok(CoarseOutcome::Decided(ranked));
        }
        let _coarse_span = tracing::info_span!("coarse", items = items.len()).entered();
        BATCH_SIZE.with_label_values(&["coarse"]).observe(items.len() as f64);
        let cross = self.cross_features(&context, items, candidates.embedding_scores.as_deref());
        let coarse_scores = self.coarse_scores(&cross)?;
        let cross_dim = self.features.cross_dim();
        let mut coarse: Vec<(usize, f32, &[f32])> = items
            .iter()
            .zip(coarse_scores)
            .zip(cross.chunks_exact(cross_dim.max(1)))
            .map(|((&item, score), row)| (item, score, row))
            .collect();
        // Stable: candidates the model cannot tell apart keep recall's order (for a user
        // with no history every cross feature is zero and the coarse scores tie, and
        // recall's popular order is then the best order known).
        coarse.sort_by(|a, b| b.1.total_cmp(&a.1));
        // The new-item pick is fine-ranked whatever its coarse score: the coarse model has
        // no item-to-item evidence for an item nobody has interacted with.
        if let Some(pick) = candidates.cold_start_pick {
            if let Some(at) = coarse.iter().position(|&(item, _, _)| item == pick).filter(|&at| at >= coarse_keep) {
                let entry = coarse.remove(at);
                coarse.insert(coarse_keep.saturating_sub(1), entry);
            }
        }
        coarse.truncate(coarse_keep);
        let kept: Vec<usize> = coarse.iter().map(|&(item, _, _)| item).collect();
        let kept_cross: Vec<f32> = coarse.iter().flat_map(|&(_, _, row)| row.iter().copied()).collect();
        BATCH_SIZE.with_label_values(&["fine"]).observe(kept.len() as f64);
        let inputs = self.inputs_for(&context, &kept, kept_cross);
        self.observe_input_drift(&inputs);
        Ok(CoarseOutcome::Fine(FineStage {
            coarse: coarse.into_iter().map(|(item, score, _)| (item, score)).collect(),
            inputs,
        }))
    }

    /// For a user without behaviour (and `WithoutBehaviour::RecallOrder`), the first
    /// `coarse_keep` candidates in recall's order with recall's fused scores as both their
    /// scores: neither model runs. `None` when the models rank this user.
    fn in_recall_order(
        &self,
        context: &UserContext<'_>,
        candidates: &Candidates,
        coarse_keep: usize,
    ) -> Option<Vec<RankedCandidate>> {
        if context.has_behaviour || self.without_behaviour != WithoutBehaviour::RecallOrder {
            return None;
        }
        let scores = candidates.fused_scores.as_ref()?;
        let ranked = candidates
            .items
            .iter()
            .zip(scores)
            .take(coarse_keep)
            .map(|(&item, &score)| RankedCandidate { item, coarse_score: score, fine_score: score })
            .collect();
        Some(ranked)
    }

    /// Orders a coarse stage's survivors by their fine scores (one per row of its inputs).
    pub fn finish(&self, coarse: Vec<(usize, f32)>, fine: Vec<f32>) -> Vec<RankedCandidate> {
        if let Some(drift) = &self.drift {
            drift.observe(&fine);
        }
        let mut ranked: Vec<RankedCandidate> = coarse
            .into_iter()
            .zip(fine)
            .map(|((item, coarse_score), fine_score)| RankedCandidate { item, coarse_score, fine_score })
            .collect();
        // Stable, as the coarse cut: ties keep the coarse order.
        ranked.sort_by(|a, b| b.fine_score.total_cmp(&a.fine_score));
        ranked
    }
}

/// Candidate `index`'s cold-start channel score when that channel proposed it (one of the
/// bundle's items without interactions) and it reaches `threshold`.
fn new_item_score(cold_start: &ChannelColumn, index: usize, threshold: f32) -> Option<f32> {
    let score = cold_start.score(index);
    (cold_start.rank(index) > 0 && score.is_finite() && score >= threshold).then_some(score)
}

/// Candidates of one request: catalogue positions, and recall's embedding inner product of
/// each when recall computed them on the same bundle version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Candidates {
    pub items: Vec<usize>,
    pub embedding_scores: Option<Vec<f32>>,
    /// Recall's fused score of each of `items`, when it sent them.
    pub fused_scores: Option<Vec<f32>>,
    /// Candidates this bundle does not hold (new run-time catalogue items recall's
    /// cold-start channel proposed): no model can score them, so they are passed on last.
    pub unscored: Vec<String>,
    /// The best of the bundle's items without interactions that recall's cold-start
    /// channel proposed at or above the bundle's threshold: it passes the coarse cut and
    /// the window, marked for rerank's new-item slot.
    pub cold_start_pick: Option<usize>,
}

/// What the coarse stage decided.
pub enum CoarseOutcome {
    /// The order is final without the fine model (a user without behaviour, served
    /// recall's order).
    Decided(Vec<RankedCandidate>),
    /// The survivors, for the fine model.
    Fine(FineStage),
}

/// The candidates that survived the coarse cut, best first with their coarse scores, and
/// the fine model's inputs for them (row n is `coarse[n]`).
pub struct FineStage {
    pub coarse: Vec<(usize, f32)>,
    pub inputs: RankerInputs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_item_is_the_cold_start_channels_proposal_at_or_above_the_threshold() {
        let column = ChannelColumn {
            channel: Channel::ColdStart as i32,
            scores: vec![0.3, 0.3, f32::NAN, 0.9],
            ranks: vec![2, 0, 1],
        };
        assert_eq!(new_item_score(&column, 0, 0.3), Some(0.3));
        assert_eq!(new_item_score(&column, 0, 0.31), None, "below the threshold");
        assert_eq!(new_item_score(&column, 1, 0.0), None, "scored, not proposed: a known item");
        assert_eq!(new_item_score(&column, 2, 0.0), None);
        assert_eq!(new_item_score(&column, 3, 0.0), None, "no rank given");
        assert_eq!(new_item_score(&ChannelColumn::default(), 0, 0.0), None);
    }
}
