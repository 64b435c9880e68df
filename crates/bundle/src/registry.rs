//! Bundle versions loaded side by side, and the one that serves by default: the model
//! lifecycle every bundle consumer shares.
//!
//! - A request takes the version it needs once — the current one, or the one it is pinned
//!   to — as an `Arc`, and finishes on it even if the current version changes meanwhile.
//! - A version becomes current only after it loaded and passed its checks: every file
//!   against the manifest's size and sha256 (the tensor files when they are mapped, the
//!   others here), the service's own loader (feature contract, models, a smoke batch whose
//!   outputs must be finite), and the quality gate — its offline metrics no worse than the
//!   current version's beyond `max_regression`, unless forced (the article's deployment
//!   check). Whatever fails leaves the current version serving, with the reason logged
//!   and returned.
//! - Versions are directories next to each other under the bundle root, the pipeline's
//!   layout; `follow_current` polls the root's `current` link and loads what it names.
//! - Several versions stay loaded until retired, so that requests pinned to the previous
//!   version (by recall, upstream) still find it during a rollout; a pinned version that
//!   is not loaded yet is loaded on first use, one load at a time.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{read_manifest, tensors::verify_file, BundleError, Manifest, Result};

/// The deployment check on a new version's offline metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QualityGate {
    /// Metrics (manifest `metrics` keys, higher is better) compared when both versions have them.
    pub metrics: Vec<String>,
    /// How much lower than the current version's a new version's metric may be.
    pub max_regression: f64,
}

impl Default for QualityGate {
    fn default() -> Self {
        Self { metrics: vec!["fine_auc".into(), "coarse_auc".into()], max_regression: 0.01 }
    }
}

impl QualityGate {
    /// Why `candidate` must not replace `serving`, if it must not.
    pub fn refuses(&self, serving: &Manifest, candidate: &Manifest) -> Option<String> {
        self.metrics.iter().find_map(|name| {
            let old = serving.metrics.get(name)?.as_f64()?;
            let new = candidate.metrics.get(name)?.as_f64()?;
            (new < old - self.max_regression).then(|| {
                format!("{name} {new:.4} is below the serving version's {old:.4} by more than {}", self.max_regression)
            })
        })
    }
}

/// One loaded version, as `list` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionInfo {
    pub version: String,
    pub current: bool,
    pub created_at: String,
    pub metrics: BTreeMap<String, f64>,
}

type Loader<T> = dyn Fn(&Path, &Manifest) -> Result<T> + Send + Sync;

struct Slot<T> {
    value: Arc<T>,
    manifest: Manifest,
    /// Load order, for evicting the oldest version beyond `MAX_LOADED`.
    loaded: u64,
}

struct State<T> {
    versions: BTreeMap<String, Slot<T>>,
    current: String,
    loads: u64,
}

/// Versions kept loaded at most: the current one, the one before it (requests pinned to
/// it during a roll-out), a canary's and some slack; beyond it the oldest non-current
/// version is unloaded (requests holding it finish on it).
pub const MAX_LOADED: usize = 4;

/// How long a version that failed to load is refused without trying again, so requests
/// pinned to it do not each repeat a heavy failing load.
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(30);

pub struct Registry<T> {
    service: &'static str,
    /// Where version directories (and the `current` link) live.
    versions_dir: PathBuf,
    loader: Box<Loader<T>>,
    gate: QualityGate,
    state: RwLock<State<T>>,
    /// One load (or retirement) at a time: loads are heavy, and two requests pinned to the
    /// same new version must not load it twice.
    loading: Mutex<()>,
    /// Versions whose load failed recently: when, and why.
    failed: Mutex<BTreeMap<String, (std::time::Instant, String)>>,
}

impl<T: Send + Sync + 'static> Registry<T> {
    /// Loads the bundle `root` names (a bundle directory, or a root holding `current`) as
    /// the current version.
    pub fn open(
        service: &'static str,
        root: &Path,
        gate: QualityGate,
        loader: impl Fn(&Path, &Manifest) -> Result<T> + Send + Sync + 'static,
    ) -> Result<Self> {
        let dir = crate::resolve_dir(root)?;
        let dir = std::fs::canonicalize(&dir).map_err(|_| BundleError::NotFound(dir.clone()))?;
        let versions_dir = if root.join("manifest.json").is_file() {
            root.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        } else {
            root.to_path_buf()
        };
        let loader: Box<Loader<T>> = Box::new(loader);
        let (manifest, value) = load_checked(&dir, loader.as_ref())?;
        let current = manifest.version.clone();
        let mut versions = BTreeMap::new();
        versions.insert(current.clone(), Slot { value: Arc::new(value), manifest, loaded: 0 });
        Ok(Self {
            service,
            versions_dir,
            loader,
            gate,
            state: RwLock::new(State { versions, current, loads: 1 }),
            loading: Mutex::new(()),
            failed: Mutex::new(BTreeMap::new()),
        })
    }

    /// `open`, shared, and following the root's `current` link every `follow_current_ms`
    /// (0: only `load` changes versions).
    pub fn open_shared(
        service: &'static str,
        root: &Path,
        gate: QualityGate,
        follow_current_ms: u64,
        loader: impl Fn(&Path, &Manifest) -> Result<T> + Send + Sync + 'static,
    ) -> Result<Arc<Self>> {
        let registry = Arc::new(Self::open(service, root, gate, loader)?);
        if follow_current_ms > 0 {
            registry.follow_current(Duration::from_millis(follow_current_ms));
        }
        Ok(registry)
    }

    /// The current version and its name.
    pub fn current(&self) -> (String, Arc<T>) {
        let state = self.read();
        (state.current.clone(), Arc::clone(&state.versions[&state.current].value))
    }

    pub fn current_version(&self) -> String {
        self.read().current.clone()
    }

    /// A loaded version.
    pub fn get(&self, version: &str) -> Option<Arc<T>> {
        self.read().versions.get(version).map(|slot| Arc::clone(&slot.value))
    }

    /// A version, loaded now (without making it current) if it is not loaded yet.
    /// Blocking: call from a blocking thread.
    pub fn get_or_load(&self, version: &str) -> Result<Arc<T>> {
        if let Some(value) = self.get(version) {
            return Ok(value);
        }
        let recent_failure = {
            let failed = self.failed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            failed.get(version).filter(|(at, _)| at.elapsed() < RETRY_FAILED_AFTER).map(|(_, reason)| reason.clone())
        };
        if let Some(reason) = recent_failure {
            return Err(rejected(version, &format!("it failed to load recently: {reason}")));
        }
        if let Err(error) = self.load(Some(version), false, false) {
            let mut failed = self.failed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            failed.insert(version.to_string(), (std::time::Instant::now(), error.to_string()));
            return Err(error);
        }
        self.get(version).ok_or_else(|| BundleError::NotFound(self.versions_dir.join(version)))
    }

    /// Loads `version` (a directory under the bundle root; `None`: what `current` names)
    /// and, if `make_current`, makes it the current version — after the quality gate
    /// unless `force`. Returns the version. Blocking.
    pub fn load(&self, version: Option<&str>, make_current: bool, force: bool) -> Result<String> {
        let dir = match version {
            Some(version) => {
                if version.is_empty() || version.contains(['/', '\\']) || version.starts_with('.') {
                    return Err(rejected(version, "a version is the name of a directory under the bundle root"));
                }
                self.versions_dir.join(version)
            }
            None => self.versions_dir.join("current"),
        };
        let _loading = self.loading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // The directory itself, not the link: files read later must be this version's.
        let dir = std::fs::canonicalize(&dir).map_err(|_| BundleError::NotFound(dir.clone()))?;
        let manifest = read_manifest(&dir)?;
        let name = manifest.version.clone();
        if let Some(asked) = version.filter(|asked| *asked != name) {
            return Err(rejected(asked, &format!("its manifest names version {name}")));
        }
        // Retirements also hold `loading`, so what is checked here stays loaded below.
        let loaded = if self.read().versions.contains_key(&name) {
            None
        } else {
            let checked = load_checked(&dir, self.loader.as_ref()).inspect_err(|error| {
                tracing::error!(service = self.service, version = %name, %error, "bundle rejected; the current version keeps serving");
            })?;
            tracing::info!(service = self.service, version = %name, "bundle loaded");
            Some(checked)
        };
        let mut state = self.write();
        if let Some((manifest, value)) = loaded {
            state.loads += 1;
            let loaded = state.loads;
            state.versions.insert(name.clone(), Slot { value: Arc::new(value), manifest, loaded });
        }
        if make_current && state.current != name {
            let serving = &state.versions[&state.current].manifest;
            let candidate = &state.versions[&name].manifest;
            if let Some(reason) = self.gate.refuses(serving, candidate).filter(|_| !force) {
                tracing::error!(service = self.service, version = %name, %reason, "bundle refused by the quality gate; the current version keeps serving");
                return Err(rejected(&name, &format!("quality gate: {reason} (force to override)")));
            }
            tracing::info!(service = self.service, from = %state.current, to = %name, "current bundle version changed");
            state.current = name.clone();
        }
        // Bounded: the oldest versions that are neither current nor just loaded go.
        while state.versions.len() > MAX_LOADED {
            let oldest = state
                .versions
                .iter()
                .filter(|(version, _)| **version != state.current && **version != name)
                .min_by_key(|(_, slot)| slot.loaded)
                .map(|(version, _)| version.clone());
            let Some(oldest) = oldest else { break };
            tracing::info!(service = self.service, version = %oldest, "bundle unloaded (more than {MAX_LOADED} loaded)");
            state.versions.remove(&oldest);
        }
        drop(state);
        self.failed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&name);
        Ok(name)
    }

    /// Unloads a version that is not the current one (requests holding it finish first).
    pub fn retire(&self, version: &str) -> Result<()> {
        let _loading = self.loading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut state = self.write();
        if state.current == version {
            return Err(rejected(version, "it is the current version; make another current first"));
        }
        state.versions.remove(version).map(|_| ()).ok_or_else(|| rejected(version, "it is not loaded"))
    }

    pub fn list(&self) -> Vec<VersionInfo> {
        let state = self.read();
        state
            .versions
            .iter()
            .map(|(version, slot)| VersionInfo {
                version: version.clone(),
                current: *version == state.current,
                created_at: slot.manifest.created_at.clone(),
                metrics: slot
                    .manifest
                    .metrics
                    .as_object()
                    .map(|metrics| metrics.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// Polls the root's `current` link every `interval` and, when the version it names
    /// changes, loads it and makes it current (once per change: a failed load is logged
    /// and retried only when the link moves again, and an operator's `load --current`
    /// of another version is not undone until it does). Returns at once; the poller lives
    /// as long as the registry.
    pub fn follow_current(self: &Arc<Self>, interval: Duration) {
        let registry = Arc::downgrade(self);
        let link = self.versions_dir.join("current");
        let mut acted_on = read_manifest(&link).map(|manifest| manifest.version).ok();
        std::thread::Builder::new()
            .name(format!("{}-bundle-watch", self.service))
            .spawn(move || loop {
                std::thread::sleep(interval);
                let Some(registry) = registry.upgrade() else { return };
                let Ok(manifest) = read_manifest(&link) else { continue };
                if acted_on.as_ref() == Some(&manifest.version) {
                    continue;
                }
                acted_on = Some(manifest.version);
                let _ = registry.load(None, true, false);
            })
            .expect("the OS starts a thread");
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State<T>> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State<T>> {
        self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn rejected(version: &str, reason: &str) -> BundleError {
    BundleError::Rejected { version: version.to_string(), reason: reason.to_string() }
}

/// The manifest, every file it lists that is not a tensor file (those are checked when
/// they are mapped), then the service's loader.
fn load_checked<T>(dir: &Path, loader: &Loader<T>) -> Result<(Manifest, T)> {
    let manifest = read_manifest(dir)?;
    let mut names: Vec<&String> = manifest.files.keys().filter(|name| !name.ends_with(".safetensors")).collect();
    names.sort();
    for name in names {
        verify_file(&dir.join(name), name, &manifest)?;
    }
    let value = loader(dir, &manifest)?;
    Ok((manifest, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::sha256_file;

    /// A version directory `root/name` with a manifest, a checksummed model file and the
    /// given offline metric.
    fn write_version(root: &Path, name: &str, fine_auc: f64) {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.bin"), name.as_bytes()).unwrap();
        let mut manifest = crate::tests::empty_manifest();
        manifest.version = name.to_string();
        manifest.metrics = serde_json::json!({ "fine_auc": fine_auc });
        manifest.files.insert(
            "model.bin".into(),
            crate::FileEntry { sha256: sha256_file(&dir.join("model.bin")).unwrap(), bytes: name.len() as u64 },
        );
        std::fs::write(dir.join("manifest.json"), serde_json::to_string(&manifest).unwrap()).unwrap();
    }

    fn point_current(root: &Path, name: &str) {
        let link = root.join("current");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(name, &link).unwrap();
    }

    /// The "model" is the file's contents; loading a version whose model says "broken" fails
    /// like a model that does not pass its smoke batch.
    fn open(root: &Path) -> Registry<String> {
        Registry::open("test-svc", root, QualityGate::default(), |dir, manifest| {
            let model = std::fs::read_to_string(dir.join("model.bin")).unwrap();
            if model.contains("broken") {
                return Err(BundleError::Rejected { version: manifest.version.clone(), reason: "smoke batch".into() });
            }
            Ok(model)
        })
        .unwrap()
    }

    #[test]
    fn a_new_version_serves_after_it_loads_and_requests_keep_the_one_they_took() {
        let root = tempfile::tempdir().unwrap();
        write_version(root.path(), "v1", 0.80);
        write_version(root.path(), "v2", 0.81);
        point_current(root.path(), "v1");
        let registry = open(root.path());
        let (name, in_flight) = registry.current();
        assert_eq!((name.as_str(), in_flight.as_str()), ("v1", "v1"));
        assert_eq!(registry.load(Some("v2"), true, false).unwrap(), "v2");
        assert_eq!(*registry.current().1, "v2");
        assert_eq!(*in_flight, "v1", "a request holding v1 finishes on it");
        assert_eq!(*registry.get("v1").unwrap(), "v1", "the previous version stays loaded for pinned requests");
        let listed: Vec<(String, bool)> = registry.list().into_iter().map(|v| (v.version, v.current)).collect();
        assert_eq!(listed, [("v1".to_string(), false), ("v2".to_string(), true)]);
        registry.retire("v1").unwrap();
        assert!(registry.get("v1").is_none());
        assert!(registry.retire("v2").is_err(), "the current version cannot be retired");
    }

    #[test]
    fn a_worse_corrupt_or_broken_version_is_refused_and_the_current_one_keeps_serving() {
        let root = tempfile::tempdir().unwrap();
        write_version(root.path(), "v1", 0.80);
        write_version(root.path(), "worse", 0.70);
        write_version(root.path(), "corrupt", 0.85);
        write_version(root.path(), "broken", 0.85);
        std::fs::write(root.path().join("corrupt/model.bin"), b"tampered").unwrap();
        point_current(root.path(), "v1");
        let registry = open(root.path());
        let error = registry.load(Some("worse"), true, false).unwrap_err().to_string();
        assert!(error.contains("quality gate") && error.contains("fine_auc"), "{error}");
        assert_eq!(*registry.current().1, "v1");
        let error = registry.load(Some("corrupt"), true, false).unwrap_err().to_string();
        assert!(error.contains("sha256") || error.contains("bytes"), "{error}");
        let error = registry.load(Some("broken"), true, false).unwrap_err().to_string();
        assert!(error.contains("smoke batch"), "{error}");
        assert!(registry.load(Some("../v1"), false, false).is_err(), "versions are directory names");
        assert!(matches!(registry.load(Some("nowhere"), false, false), Err(BundleError::NotFound(_))));
        assert_eq!(*registry.current().1, "v1");
        // An operator may override the gate.
        registry.load(Some("worse"), true, true).unwrap();
        assert_eq!(*registry.current().1, "worse");
    }

    #[test]
    fn an_operators_rollback_holds_until_the_link_moves_and_at_most_four_versions_stay_loaded() {
        let root = tempfile::tempdir().unwrap();
        for version in ["v1", "v2", "v3", "v4", "v5"] {
            write_version(root.path(), version, 0.80);
        }
        point_current(root.path(), "v1");
        let registry = Arc::new(open(root.path()));
        registry.follow_current(Duration::from_millis(10));
        point_current(root.path(), "v2");
        let wait_for = |version: &str| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while registry.current_version() != version {
                assert!(std::time::Instant::now() < deadline, "{version} never became current");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait_for("v2");
        registry.load(Some("v1"), true, false).unwrap(); // the operator rolls back
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(registry.current_version(), "v1", "the follower does not undo the rollback");
        for version in ["v3", "v4", "v5"] {
            registry.get_or_load(version).unwrap();
        }
        let loaded: Vec<String> = registry.list().into_iter().map(|v| v.version).collect();
        assert_eq!(loaded.len(), MAX_LOADED);
        assert!(loaded.contains(&"v1".to_string()) && loaded.contains(&"v5".to_string()), "{loaded:?}");
        assert!(!loaded.contains(&"v2".to_string()), "the oldest non-current version went: {loaded:?}");
        // A version that fails to load is not retried by every request.
        write_version(root.path(), "broken", 0.80);
        std::fs::write(root.path().join("broken/model.bin"), b"broken").unwrap();
        let refresh = root.path().join("broken/manifest.json");
        let mut manifest: Manifest = serde_json::from_str(&std::fs::read_to_string(&refresh).unwrap()).unwrap();
        manifest.files.get_mut("model.bin").unwrap().sha256 =
            sha256_file(&root.path().join("broken/model.bin")).unwrap();
        std::fs::write(&refresh, serde_json::to_string(&manifest).unwrap()).unwrap();
        assert!(registry.get_or_load("broken").unwrap_err().to_string().contains("smoke batch"));
        assert!(registry.get_or_load("broken").unwrap_err().to_string().contains("failed to load recently"));
    }

    #[test]
    fn a_pinned_version_loads_on_first_use_and_the_current_link_is_followed() {
        let root = tempfile::tempdir().unwrap();
        write_version(root.path(), "v1", 0.80);
        write_version(root.path(), "v2", 0.80);
        point_current(root.path(), "v1");
        let registry = Arc::new(open(root.path()));
        assert_eq!(*registry.get_or_load("v2").unwrap(), "v2");
        assert_eq!(registry.current_version(), "v1", "loading a pinned version does not make it current");
        write_version(root.path(), "v3", 0.80);
        registry.follow_current(Duration::from_millis(10));
        point_current(root.path(), "v3");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while registry.current_version() != "v3" {
            assert!(std::time::Instant::now() < deadline, "the current link was not followed");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
