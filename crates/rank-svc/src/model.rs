//! The fine-ranking model: a small pool of ONNX Runtime sessions over the bundle's
//! `ranker.onnx`. `Session::run` needs exclusive access, so each session sits behind its
//! own mutex and a request takes whichever is free.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex, OnceLock,
    },
};

use ort::{environment::Environment, session::Session, value::Tensor};
use recsys_bundle::RankerInputs;

use crate::{RankError, Result};

const INPUT_NAMES: [&str; 4] = ["user_index", "item_index", "user_features", "item_features"];
const OUTPUT_NAME: &str = "score";

/// ONNX Runtime allows one environment per process (and one library load), so it is
/// created once and shared, also by tests that start several rank services.
pub fn onnx_environment(library: Option<&Path>) -> Result<Environment> {
    static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();
    ENVIRONMENT
        .get_or_init(|| {
            let library = library
                .map(Path::to_path_buf)
                .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(Into::into))
                .ok_or_else(|| {
                    "no ONNX Runtime library: set onnxruntime_library or ORT_DYLIB_PATH (see README)".to_string()
                })?;
            ort::init_from(&library)
                .map_err(|error| format!("cannot load {}: {error}", library.display()))?
                .with_name("rank-svc")
                .build()
                .map_err(|error| error.to_string())
        })
        .clone()
        .map_err(RankError::Onnx)
}

pub struct OnnxRanker {
    name: String,
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
}

impl OnnxRanker {
    pub fn load(path: &Path, environment: &Environment, sessions: usize, intra_op_threads: usize) -> Result<Self> {
        let name = path.display().to_string();
        let onnx = |error: ort::Error| RankError::Onnx(format!("{name}: {error}"));
        let sessions = (0..sessions.max(1))
            .map(|_| {
                Session::builder(environment)
                    .map_err(onnx)?
                    .with_intra_threads(intra_op_threads.max(1))
                    .map_err(|error| RankError::Onnx(error.to_string()))?
                    .commit_from_file(path)
                    .map_err(onnx)
                    .map(Mutex::new)
            })
            .collect::<Result<Vec<_>>>()?;
        let ranker = Self { name, sessions, next: AtomicUsize::new(0) };
        ranker.check_contract()?;
        Ok(ranker)
    }

    /// Fails at load time, not on the first request, if the model's inputs are not ours.
    fn check_contract(&self) -> Result<()> {
        let session = self.sessions[0].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let inputs: Vec<&str> = session.inputs().iter().map(|input| input.name()).collect();
        let outputs: Vec<&str> = session.outputs().iter().map(|output| output.name()).collect();
        if inputs != INPUT_NAMES || outputs.first() != Some(&OUTPUT_NAME) {
            return Err(RankError::ModelContract {
                model: self.name.clone(),
                reason: format!(
                    "expected inputs {INPUT_NAMES:?} and output {OUTPUT_NAME:?}, found {inputs:?} -> {outputs:?}"
                ),
            });
        }
        Ok(())
    }

    /// Scores one batch. Blocking (runs the model): call from a blocking thread.
    pub fn score(&self, inputs: &RankerInputs) -> Result<Vec<f32>> {
        let batch = inputs.len();
        if batch == 0 {
            return Ok(Vec::new());
        }
        let user_dim = inputs.user_features.len() / batch;
        let item_dim = inputs.item_features.len() / batch;
        let onnx = |error: ort::Error| RankError::Onnx(error.to_string());
        let feed = ort::inputs![
            INPUT_NAMES[0] => Tensor::from_array(([batch], inputs.user_index.clone())).map_err(onnx)?,
            INPUT_NAMES[1] => Tensor::from_array(([batch], inputs.item_index.clone())).map_err(onnx)?,
            INPUT_NAMES[2] => Tensor::from_array(([batch, user_dim], inputs.user_features.clone())).map_err(onnx)?,
            INPUT_NAMES[3] => Tensor::from_array(([batch, item_dim], inputs.item_features.clone())).map_err(onnx)?,
        ];
        let mut session = self.acquire();
        let outputs = session.run(feed).map_err(onnx)?;
        let (_, scores) = outputs[OUTPUT_NAME].try_extract_tensor::<f32>().map_err(onnx)?;
        if scores.len() != batch {
            return Err(RankError::ModelContract {
                model: self.name.clone(),
                reason: format!("returned {} scores for a batch of {batch}", scores.len()),
            });
        }
        Ok(scores.to_vec())
    }

    fn acquire(&self) -> std::sync::MutexGuard<'_, Session> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for offset in 0..self.sessions.len() {
            if let Ok(session) = self.sessions[(start + offset) % self.sessions.len()].try_lock() {
                return session;
            }
        }
        self.sessions[start % self.sessions.len()].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
