//! The ranking models: a small pool of ONNX Runtime sessions (`recsys_bundle::onnx`) over
//! one of the bundle's `.onnx` files (`coarse.onnx`, `ranker.onnx`), checked against the
//! inputs rank-svc feeds.

use std::path::Path;

use ort::{
    environment::Environment,
    session::{Session, SessionInputValue},
    value::TensorRef,
};
use recsys_bundle::onnx::SessionPool;
use serde::{Deserialize, Serialize};

use crate::{RankError, Result};

/// Every ranking model returns one score per row under this name.
const OUTPUT_NAME: &str = "score";

/// The fine ranker's inputs, in order (see `training/recsys_training/train.py`).
pub const FINE_INPUTS: [&str; 6] =
    ["user_index", "item_index", "history", "user_features", "item_features", "cross_features"];
/// The coarse ranker sees only the cross features.
pub const COARSE_INPUTS: [&str; 1] = ["cross_features"];

/// Which of the bundle's fine models serves: the trained teacher, its dynamically
/// quantised INT8 copy, or the smaller student distilled from it (see the README's
/// "Ranking speed" for what each costs and scores).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FineVariant {
    #[default]
    Teacher,
    Int8,
    Student,
}

impl FineVariant {
    /// The manifest metric of this variant's held-out AUC (the teacher's is `fine_auc`).
    pub fn auc_metric(self) -> Option<&'static str> {
        match self {
            FineVariant::Teacher => None,
            FineVariant::Int8 => Some("int8_auc"),
            FineVariant::Student => Some("student_auc"),
        }
    }

    pub fn file(self) -> &'static str {
        match self {
            FineVariant::Teacher => "ranker.onnx",
            FineVariant::Int8 => "ranker.int8.onnx",
            FineVariant::Student => "ranker.student.onnx",
        }
    }
}

/// How a user with no behaviour this bundle knows (a new user, or one whose items are all
/// unknown to it) is ranked. Every behaviour input is empty then, and the models rank by
/// item features learned on users with behaviour: on `make eval`'s temporal split they
/// served such users worse than plain popularity did. Recall's order for them is its
/// popular channel's — the bundle's recency-weighted popularity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WithoutBehaviour {
    /// Recall's fused order and scores, no model run.
    #[default]
    RecallOrder,
    /// The coarse and fine models, as for every other user.
    Models,
}

/// How the models are run: shared by the coarse and the fine model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelOptions {
    /// Independent ONNX sessions per model, so that concurrent requests do not queue on one.
    pub sessions: usize,
    /// Threads each session may use inside one inference.
    pub intra_op_threads: usize,
    pub fine_variant: FineVariant,
    pub without_behaviour: WithoutBehaviour,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            sessions: 2,
            intra_op_threads: 1,
            fine_variant: FineVariant::Teacher,
            without_behaviour: WithoutBehaviour::RecallOrder,
        }
    }
}

/// One named input tensor of a batch: its row width and row-major values.
pub enum ModelInput<'a> {
    Int64 { name: &'static str, width: usize, values: &'a [i64] },
    Float32 { name: &'static str, width: usize, values: &'a [f32] },
}

impl ModelInput<'_> {
    fn name(&self) -> &'static str {
        match *self {
            ModelInput::Int64 { name, .. } | ModelInput::Float32 { name, .. } => name,
        }
    }
}

/// The process's ONNX Runtime environment (`recsys_bundle::onnx`: one per process, shared
/// with any other service's handlers running in it).
pub fn onnx_environment(library: Option<&Path>) -> Result<Environment> {
    recsys_bundle::onnx::environment(library).map_err(RankError::Onnx)
}

pub struct OnnxModel {
    inputs: &'static [&'static str],
    sessions: SessionPool,
}

impl OnnxModel {
    /// Loads `path` and checks that its inputs are `inputs` (in order) and its output is `score`.
    pub fn load(
        path: &Path,
        inputs: &'static [&'static str],
        environment: &Environment,
        sessions: usize,
        intra_op_threads: usize,
    ) -> Result<Self> {
        let sessions = SessionPool::load(path, environment, sessions, intra_op_threads)
            .map_err(|error| RankError::Onnx(format!("{}: {error}", path.display())))?;
        let ranker = Self { inputs, sessions };
        ranker.check_contract()?;
        Ok(ranker)
    }

    /// Fails at load time, not on the first request, if the model's inputs are not ours.
    fn check_contract(&self) -> Result<()> {
        let (inputs, outputs) = self.sessions.signature();
        if inputs != self.inputs || outputs.first().map(String::as_str) != Some(OUTPUT_NAME) {
            return Err(RankError::ModelContract {
                model: self.sessions.name().to_string(),
                reason: format!(
                    "expected inputs {:?} and output {OUTPUT_NAME:?}, found {inputs:?} -> {outputs:?}",
                    self.inputs
                ),
            });
        }
        Ok(())
    }

    /// Scores a batch of `batch` rows. Blocking (runs the model): call from a blocking thread.
    pub fn score(&self, batch: usize, inputs: &[ModelInput<'_>]) -> Result<Vec<f32>> {
        if batch == 0 {
            return Ok(Vec::new());
        }
        self.run(&mut self.sessions.acquire(), batch, inputs)
    }

    /// Runs `inputs` once on every session, and refuses the model if a score is not
    /// finite. ONNX Runtime sizes its buffers on a session's first run, which costs about
    /// a whole rank budget here: done at load, before the service reports SERVING, the
    /// first live requests do not pay for it.
    pub fn warm_up(&self, batch: usize, inputs: &[ModelInput<'_>]) -> Result<()> {
        for mut session in self.sessions.each() {
            let scores = self.run(&mut session, batch, inputs)?;
            if let Some(bad) = scores.iter().find(|score| !score.is_finite()) {
                return Err(RankError::ModelContract {
                    model: self.sessions.name().to_string(),
                    reason: format!("scored {bad} on the warm-up batch"),
                });
            }
        }
        Ok(())
    }

    fn run(&self, session: &mut Session, batch: usize, inputs: &[ModelInput<'_>]) -> Result<Vec<f32>> {
        let onnx = |error: ort::Error| RankError::Onnx(error.to_string());
        // The tensors borrow the caller's buffers: nothing is copied on the way in.
        // `check_contract` fixed the model's input order, so they are passed by position.
        let names: Vec<&str> = inputs.iter().map(ModelInput::name).collect();
        if names != self.inputs {
            return Err(RankError::ModelContract {
                model: self.sessions.name().to_string(),
                reason: format!("fed {names:?}, the model takes {:?}", self.inputs),
            });
        }
        let mut feed: Vec<SessionInputValue<'_>> = Vec::with_capacity(inputs.len());
        for input in inputs {
            feed.push(match *input {
                ModelInput::Int64 { width, values, .. } => {
                    TensorRef::from_array_view((shape(batch, width), values)).map_err(onnx)?.into()
                }
                ModelInput::Float32 { width, values, .. } => {
                    TensorRef::from_array_view((shape(batch, width), values)).map_err(onnx)?.into()
                }
            });
        }
        let outputs = session.run(feed.as_slice()).map_err(onnx)?;
        let (_, scores) = outputs[OUTPUT_NAME].try_extract_tensor::<f32>().map_err(onnx)?;
        if scores.len() != batch {
            return Err(RankError::ModelContract {
                model: self.sessions.name().to_string(),
                reason: format!("returned {} scores for a batch of {batch}", scores.len()),
            });
        }
        Ok(scores.to_vec())
    }
}

/// `[batch]` for per-row scalars (width 0), `[batch, width]` otherwise.
fn shape(batch: usize, width: usize) -> Vec<usize> {
    if width == 0 {
        vec![batch]
    } else {
        vec![batch, width]
    }
}
