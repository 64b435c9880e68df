//! The ONNX Runtime environment every bundle consumer that runs one of the bundle's ONNX
//! models shares (rank-svc's rankers, recall-svc's sequence encoder). ONNX Runtime allows
//! one environment per process (and one library load), so it is created once — also when
//! one process runs several services' handlers, as the whole-path benchmark's floor and
//! the tests do.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex, MutexGuard, OnceLock,
    },
};

use ort::{environment::Environment, session::Session};

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

/// A few sessions of one ONNX model: `Session::run` needs exclusive access, so each sits
/// behind its own mutex and a caller takes whichever is free (round robin, then waits on
/// one), so concurrent requests do not queue on a single session.
pub struct SessionPool {
    /// The model file, for the callers' error messages.
    name: String,
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
}

impl SessionPool {
    /// `sessions` (at least one) sessions of the model at `path`, each running one
    /// inference on up to `intra_op_threads` threads; the error is ONNX Runtime's (the
    /// caller names the file).
    pub fn load(
        path: &Path,
        environment: &Environment,
        sessions: usize,
        intra_op_threads: usize,
    ) -> Result<Self, String> {
        let sessions = (0..sessions.max(1))
            .map(|_| {
                Session::builder(environment)?
                    .with_intra_threads(intra_op_threads.max(1))?
                    .commit_from_file(path)
                    .map(Mutex::new)
            })
            .collect::<Result<Vec<_>, ort::Error>>()
            .map_err(|error| error.to_string())?;
        Ok(Self { name: path.display().to_string(), sessions, next: AtomicUsize::new(0) })
    }

    /// The model file's path, as loaded.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The model's input and output names, in order.
    pub fn signature(&self) -> (Vec<String>, Vec<String>) {
        let session = lock(&self.sessions[0]);
        let inputs = session.inputs().iter().map(|input| input.name().to_string()).collect();
        let outputs = session.outputs().iter().map(|output| output.name().to_string()).collect();
        (inputs, outputs)
    }

    /// A free session, else the next one in turn once it is free.
    pub fn acquire(&self) -> MutexGuard<'_, Session> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let count = self.sessions.len();
        (0..count)
            .find_map(|offset| self.sessions[(start + offset) % count].try_lock().ok())
            .unwrap_or_else(|| lock(&self.sessions[start % count]))
    }

    /// Every session in turn (warm-up runs and load-time checks).
    pub fn each(&self) -> impl Iterator<Item = MutexGuard<'_, Session>> {
        self.sessions.iter().map(lock)
    }
}

/// A panic while a session ran leaves nothing half-written that a later run depends on.
fn lock(session: &Mutex<Session>) -> MutexGuard<'_, Session> {
    session.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
