//! The ONNX Runtime environment every bundle consumer that runs one of the bundle's ONNX
//! models shares (rank-svc's rankers, recall-svc's sequence encoder). ONNX Runtime allows
//! one environment per process (and one library load), so it is created once — also when
//! one process runs several services' handlers, as the whole-path benchmark's floor and
//! the tests do.

use std::{path::Path, sync::OnceLock};

use ort::environment::Environment;

/// The process's environment, loading the library at `library` (else `ORT_DYLIB_PATH`)
/// on first use; every later call returns the same environment whatever it names.
pub fn environment(library: Option<&Path>) -> Result<Environment, String> {
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
                .with_name("recsys")
                .build()
                .map_err(|error| error.to_string())
        })
        .clone()
}
