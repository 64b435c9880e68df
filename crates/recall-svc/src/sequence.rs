//! The sequence channel's encoder (`Channel::Sequence`): the bundle's ONNX model from the
//! user's latest items' vectors, in their order, to one query vector in the item space,
//! which the channel searches like the embedding channel searches the user's vector
//! (training's `sequence.py` trains it; the manifest's `sequence` section names it).
//!
//! It reads item vectors, not item ids, so it holds no per-item table: its size and cost
//! do not grow with the catalogue.

use std::path::Path;

use ort::{
    environment::Environment,
    session::{Session, SessionInputValue},
    value::TensorRef,
};
use recsys_bundle::{onnx::SessionPool, tensors::verify_file, BundleError, Manifest, SequenceEncoderSpec};

const INPUTS: [&str; 2] = ["history_vectors", "history_mask"];
const OUTPUT: &str = "query";
/// Sessions per loaded version: concurrent requests take whichever is free.
const SESSIONS: usize = 2;

pub struct SequenceEncoder {
    length: usize,
    dim: usize,
    sessions: SessionPool,
}

impl SequenceEncoder {
    /// Loads the encoder `spec` names from `dir` (its checksum verified), checks its
    /// inputs and output, and runs one history through every session: a bundle whose
    /// encoder does not answer a finite `dim`-wide vector is refused at load.
    pub fn load(
        dir: &Path,
        manifest: &Manifest,
        spec: &SequenceEncoderSpec,
        environment: &Environment,
    ) -> Result<Self, BundleError> {
        let path = dir.join(&spec.file);
        let malformed = |reason: String| BundleError::Malformed { path: path.clone(), reason };
        verify_file(&path, &spec.file, manifest)?;
        if spec.length == 0 {
            return Err(malformed("the manifest's sequence length is 0".into()));
        }
        let sessions = SessionPool::load(&path, environment, SESSIONS, 1).map_err(malformed)?;
        let encoder = Self { length: spec.length, dim: manifest.embedding_dim, sessions };
        {
            let (inputs, outputs) = encoder.sessions.signature();
            if inputs != INPUTS || outputs != [OUTPUT] {
                return Err(malformed(format!(
                    "expected inputs {INPUTS:?} and output {OUTPUT:?}, found {inputs:?} -> {outputs:?}"
                )));
            }
        }
        let probe = vec![0.1_f32; encoder.dim];
        for mut session in encoder.sessions.each() {
            encoder.encode(&mut session, std::iter::once(probe.as_slice())).map_err(malformed)?;
        }
        Ok(encoder)
    }

    /// The query vector for a history given newest first (the newest `length` are read);
    /// `None` for an empty history. Blocking (runs the model).
    pub fn query<'a>(&self, newest_first: impl Iterator<Item = &'a [f32]>) -> Result<Option<Vec<f32>>, String> {
        let mut session = self.sessions.acquire();
        self.encode(&mut session, newest_first)
    }

    fn encode<'a>(
        &self,
        session: &mut Session,
        newest_first: impl Iterator<Item = &'a [f32]>,
    ) -> Result<Option<Vec<f32>>, String> {
        let (length, dim) = (self.length, self.dim);
        let mut vectors = vec![0.0_f32; length * dim];
        let mut mask = vec![0.0_f32; length];
        // Oldest first with the padding in front: the newest item sits in the last slot.
        let mut read = 0;
        for (slot, vector) in (0..length).rev().zip(newest_first) {
            if vector.len() != dim {
                return Err(format!(
                    "{}: an item vector of {} values for a {dim}-wide encoder",
                    self.sessions.name(),
                    vector.len()
                ));
            }
            vectors[slot * dim..(slot + 1) * dim].copy_from_slice(vector);
            mask[slot] = 1.0;
            read += 1;
        }
        if read == 0 {
            return Ok(None);
        }
        let onnx = |error: ort::Error| format!("{}: {error}", self.sessions.name());
        let feed: [SessionInputValue<'_>; 2] = [
            TensorRef::from_array_view(([1, length, dim], vectors.as_slice())).map_err(onnx)?.into(),
            TensorRef::from_array_view(([1, length], mask.as_slice())).map_err(onnx)?.into(),
        ];
        let outputs = session.run(feed).map_err(onnx)?;
        let (_, query) = outputs[OUTPUT].try_extract_tensor::<f32>().map_err(onnx)?;
        if query.len() != dim {
            return Err(format!("{}: a query of {} values, expected {dim}", self.sessions.name(), query.len()));
        }
        if let Some(bad) = query.iter().find(|value| !value.is_finite()) {
            return Err(format!("{}: the query holds {bad}", self.sessions.name()));
        }
        Ok(Some(query.to_vec()))
    }
}
