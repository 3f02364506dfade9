//! Directory mode: Kubernetes-style manifests in a local directory, watched
//! for changes.
//!
//! Files (`*.yaml`, `*.yml`, `*.json`, recursively, sorted by path; names
//! starting with `.` are skipped, which also skips editor lock files and the
//! `..data` indirection of mounted ConfigMap volumes) may hold several
//! documents. Kinds other than Service, Pod, EndpointSlice, policy
//! ConfigMaps and List are ignored so that Ward can be pointed at existing
//! manifests.
//!
//! Semantics are per file, "last good wins": a file with any error keeps
//! contributing the objects of its last good version; other files are
//! unaffected; a deleted file's objects disappear.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use notify::Watcher as _;
use serde::Deserialize as _;
use serde::de::DeserializeOwned;
use serde_norway::Value;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::convert::{build_mesh, object_key, validate_object};
use super::objects::{KubeObject, ObjectKind, ObjectSet};
use super::{ConfigError, DiscoveryError, DiscoveryStatus, POLICY_LABEL};
use crate::model::{Mesh, ObjectKey};

/// Quiet time after the last file event before reloading: editors and
/// `kubectl`-style tools write a file in several steps (truncate, write,
/// rename), and one reload should see the end result.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Upper bound on debouncing, so a file rewritten continuously still gets
/// picked up.
const MAX_DEBOUNCE: Duration = Duration::from_millis(500);

/// Watches a directory of manifests and publishes the mesh built from it.
pub struct DirSource {
    /// The directory read (recursively).
    dir: PathBuf,
    /// The current mesh; replaced only when it changes.
    mesh: watch::Sender<Arc<Mesh>>,
    /// The current raw objects, for the policy module (ConfigMaps).
    objects: watch::Sender<Arc<ObjectSet>>,
    /// Sync state and current errors, for the admin API.
    status: watch::Sender<Arc<DiscoveryStatus>>,
}

impl DirSource {
    /// Cheap: reads nothing until [`DirSource::run`].
    pub fn new(dir: PathBuf) -> DirSource {
        let status = DiscoveryStatus {
            source: format!("dir:{}", dir.display()),
            ..DiscoveryStatus::default()
        };
        DirSource {
            dir,
            mesh: watch::Sender::new(Arc::new(Mesh::default())),
            objects: watch::Sender::new(Arc::new(ObjectSet::default())),
            status: watch::Sender::new(Arc::new(status)),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current mesh. Empty until the first load (see
    /// [`DiscoveryStatus::synced`]); changes only when the mesh does.
    pub fn mesh(&self) -> watch::Receiver<Arc<Mesh>> {
        self.mesh.subscribe()
    }

    /// The current raw objects (policy ConfigMaps among them).
    pub fn objects(&self) -> watch::Receiver<Arc<ObjectSet>> {
        self.objects.subscribe()
    }

    pub fn status(&self) -> watch::Receiver<Arc<DiscoveryStatus>> {
        self.status.subscribe()
    }

    /// Read the directory once, for one-shot commands (`ward bootstrap`,
    /// `ward describe`). Errors in the configuration are returned, not
    /// logged; only an unreadable directory is an `Err`.
    pub fn load_once(dir: &Path) -> Result<(Mesh, ObjectSet, Vec<ConfigError>), DiscoveryError> {
        let snapshot = Loader::new(dir.to_path_buf(), false).load()?;
        Ok((snapshot.mesh, snapshot.objects, snapshot.errors))
    }

    /// Load, then reload on every change until `shutdown`. Fails if the
    /// directory is missing or cannot be watched at start; later problems
    /// are logged and shown in the status, and the last mesh stays in force.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DiscoveryError> {
        check_dir(&self.dir)?;
        // Watch before the first load so no change slips in between.
        let wake = Arc::new(Notify::new());
        let mut watcher = {
            let wake = Arc::clone(&wake);
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                match &event {
                    Err(e) => {
                        warn!(error = %e, "file watch error; reloading the discovery directory")
                    }
                    // Opening and reading a file (the reload itself does)
                    // changes nothing; reacting to it made every reload
                    // trigger the next, several full reloads a second.
                    Ok(ev) if is_read_only(&ev.kind) => return,
                    Ok(_) => {}
                }
                // Any event reloads: renames, symlink swaps (mounted
                // ConfigMaps) and directory changes all matter, and the
                // reload itself skips unchanged files.
                wake.notify_one();
            })
            .map_err(|source| DiscoveryError::Watch {
                dir: self.dir.clone(),
                source,
            })?
        };
        watcher
            .watch(&self.dir, notify::RecursiveMode::Recursive)
            .map_err(|source| DiscoveryError::Watch {
                dir: self.dir.clone(),
                source,
            })?;

        let loader = Loader::new(self.dir.clone(), true);
        let (mut loader, snapshot) = reload(loader).await?;
        let snapshot = snapshot?;
        info!(
            dir = %self.dir.display(),
            services = snapshot.mesh.services.len(),
            workloads = snapshot.mesh.workloads.len(),
            errors = snapshot.errors.len(),
            "discovery directory loaded"
        );
        self.publish(snapshot, true);

        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = wake.notified() => {}
            }
            let deadline = Instant::now() + MAX_DEBOUNCE;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = wake.notified() => if Instant::now() >= deadline { break },
                    _ = tokio::time::sleep(DEBOUNCE) => break,
                }
            }
            let (next, snapshot) = reload(loader).await?;
            loader = next;
            match snapshot {
                Ok(snapshot) => self.publish(snapshot, false),
                Err(e) => {
                    warn!(error = %e, "cannot reload the discovery directory; keeping the last mesh");
                    self.status.send_modify(|status| {
                        let status = Arc::make_mut(status);
                        status.reloads += 1;
                        status.errors = vec![
                            ConfigError::new("directory", "", e.to_string())
                                .with_source(self.dir.clone()),
                        ];
                    });
                }
            }
        }
    }

    fn publish(&self, snapshot: Snapshot, initial: bool) {
        let Snapshot {
            mesh,
            objects,
            errors,
        } = snapshot;
        let counts = objects.counts();
        super::publish_if_changed(&self.objects, objects, false);
        // The first load always publishes, so readers can wait for the
        // mesh channel to change to know discovery has synced.
        let changed = super::publish_if_changed(&self.mesh, mesh, initial);
        if changed && !initial {
            debug!(dir = %self.dir.display(), "mesh changed");
        }
        self.status.send_modify(|status| {
            let status = Arc::make_mut(status);
            status.synced = true;
            status.reloads += 1;
            if changed {
                status.generation += 1;
            }
            status.errors = errors;
            status.objects = counts;
        });
    }
}

/// A watch event that changes no file: opening, reading or closing a file
/// without writing it.
fn is_read_only(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    matches!(kind, notify::EventKind::Access(a) if *a != AccessKind::Close(AccessMode::Write))
}

/// Run one load on the blocking pool (it reads files), handing the loader
/// back for the next time.
async fn reload(
    mut loader: Loader,
) -> Result<(Loader, Result<Snapshot, DiscoveryError>), DiscoveryError> {
    let dir = loader.dir.clone();
    tokio::task::spawn_blocking(move || {
        let snapshot = loader.load();
        (loader, snapshot)
    })
    .await
    .map_err(|e| DiscoveryError::Reload {
        dir,
        message: e.to_string(),
    })
}

fn check_dir(dir: &Path) -> Result<(), DiscoveryError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(DiscoveryError::NotADirectory {
            dir: dir.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(DiscoveryError::DirNotFound {
            dir: dir.to_path_buf(),
        }),
        Err(source) => Err(DiscoveryError::ReadDir {
            dir: dir.to_path_buf(),
            source,
        }),
    }
}

/// The result of one load.
struct Snapshot {
    mesh: Mesh,
    objects: ObjectSet,
    errors: Vec<ConfigError>,
}

/// What Ward remembers about one file between loads.
struct FileState {
    /// Hash of the content last read; an unchanged file is not parsed again.
    digest: Option<[u8; 32]>,
    /// Size, mtime, ctime and inode when the content was last read, and
    /// whether the file had been stable for a while then: an unchanged stamp
    /// of a stable file skips reading and hashing it (the 3 MB manifest of a
    /// 10,000-pod mesh was hashed on every change of any other file).
    stamp: Option<FileStamp>,
    /// The objects of the last version of the file that had no error.
    last_good: Vec<(ObjectKey, KubeObject)>,
    /// Errors of the current version (empty when it is the last good one).
    errors: Vec<ConfigError>,
}

/// Reads the directory, keeping per-file state between loads.
struct Loader {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Log errors (each once, when it first appears)? Off for one-shot use,
    /// where the caller prints them.
    log: bool,
    /// Errors of the previous load, so an error is logged once, not on
    /// every reload.
    logged: BTreeSet<ConfigError>,
}

impl Loader {
    fn new(dir: PathBuf, log: bool) -> Self {
        Self {
            dir,
            files: BTreeMap::new(),
            log,
            logged: BTreeSet::new(),
        }
    }

    fn load(&mut self) -> Result<Snapshot, DiscoveryError> {
        check_dir(&self.dir)?;
        let mut errors = Vec::new();
        let mut paths = Vec::new();
        list_files(&self.dir, &mut paths, &mut errors).map_err(|source| {
            DiscoveryError::ReadDir {
                dir: self.dir.clone(),
                source,
            }
        })?;
        paths.sort();

        let mut files = BTreeMap::new();
        for path in paths {
            let previous = self.files.remove(&path);
            let state = read_file(&path, previous);
            files.insert(path, state);
        }
        // Whatever is left was deleted (or renamed away): its objects go.
        self.files = files;

        let mut objects = ObjectSet::default();
        for (path, state) in &self.files {
            errors.extend(state.errors.iter().cloned());
            for (key, obj) in &state.last_good {
                let kind = obj.kind();
                if let Some(first) = objects.origin(kind, key) {
                    errors.push(
                        ConfigError::new(
                            kind.describe(key),
                            "",
                            format!(
                                "also defined in {}; the definition there (first by path) is used",
                                first.display()
                            ),
                        )
                        .with_source(path.clone()),
                    );
                    continue;
                }
                objects.insert(key.clone(), obj.clone());
                objects.origins.insert((kind, key.clone()), path.clone());
            }
        }
        let (mesh, mesh_errors) = build_mesh(&objects);
        errors.extend(mesh_errors);

        if self.log {
            for e in &errors {
                if !self.logged.contains(e) {
                    warn!("{e}");
                }
            }
            self.logged = errors.iter().cloned().collect();
        }
        Ok(Snapshot {
            mesh,
            objects,
            errors,
        })
    }
}

/// Every manifest file under `dir`, recursively. Unreadable subdirectories
/// are reported as errors; only an unreadable `dir` itself fails.
fn list_files(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    errors: &mut Vec<ConfigError>,
) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // file_type does not follow symlinks: symlinked directories are not
        // descended into (no loops), symlinked files are read.
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir {
            if let Err(e) = list_files(&path, out, errors) {
                errors.push(
                    ConfigError::new("directory", "", format!("cannot be read: {e}"))
                        .with_source(path),
                );
            }
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

/// What identifies a version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
        }
    }
}

/// A file modified less than this before it was read may be modified again
/// within the same timestamp tick, so its stamp is not trusted (git's
/// "racily clean" rule).
const STAMP_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

fn read_file(path: &Path, previous: Option<FileState>) -> FileState {
    let mut state = previous.unwrap_or(FileState {
        digest: None,
        stamp: None,
        last_good: Vec::new(),
        errors: Vec::new(),
    });
    let before = fs::metadata(path).ok();
    let stamp = before.as_ref().map(FileStamp::of);
    if stamp.is_some() && state.digest.is_some() && state.stamp == stamp {
        return state;
    }
    // Trust this stamp next time only if the file was already settled now.
    let settled = before
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age > STAMP_SETTLE);
    state.stamp = stamp.filter(|_| settled);
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            state.digest = None;
            state.stamp = None;
            state.errors = vec![
                ConfigError::new("file", "", format!("cannot be read: {e}")).with_source(path),
            ];
            return state;
        }
    };
    let digest: [u8; 32] = Sha256::digest(&bytes).into();
    if state.digest == Some(digest) {
        return state;
    }
    state.digest = Some(digest);
    let (objects, errors) = parse_file(path, &bytes);
    if errors.is_empty() {
        state.last_good = objects;
    }
    state.errors = errors;
    state
}

/// Parse and validate one file. Any error makes the whole file bad (its
/// objects are then not used), so the objects are only meaningful when the
/// errors are empty.
fn parse_file(path: &Path, bytes: &[u8]) -> (Vec<(ObjectKey, KubeObject)>, Vec<ConfigError>) {
    let mut parsed = Parsed::default();
    match std::str::from_utf8(bytes) {
        Err(e) => parsed
            .errors
            .push(ConfigError::new("file", "", format!("is not UTF-8: {e}"))),
        // JSON is parsed as JSON: YAML accepts most of it but not, for
        // example, tab indentation, and JSON errors then point at JSON.
        Ok(text) if path.extension().is_some_and(|e| e == "json") => {
            let docs = serde_json::Deserializer::from_str(text).into_iter::<Value>();
            for (i, doc) in docs.enumerate() {
                let label = format!("document {}", i + 1);
                match doc {
                    Err(e) => {
                        parsed
                            .errors
                            .push(ConfigError::new(label, "", e.to_string()));
                        break;
                    }
                    Ok(Value::Null) => {}
                    Ok(value) => parsed.document(value, &label),
                }
            }
        }
        Ok(text) => {
            for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
                let label = format!("document {}", i + 1);
                match Value::deserialize(doc) {
                    // After a syntax error the parser cannot find the next
                    // document reliably (and would repeat the error).
                    Err(e) => {
                        parsed
                            .errors
                            .push(ConfigError::new(label, "", e.to_string()));
                        break;
                    }
                    Ok(Value::Null) => {}
                    Ok(value) => parsed.document(value, &label),
                }
            }
        }
    }
    let errors = parsed
        .errors
        .into_iter()
        .map(|e| e.with_source(path))
        .collect();
    (parsed.objects, errors)
}

#[derive(Default)]
struct Parsed {
    objects: Vec<(ObjectKey, KubeObject)>,
    errors: Vec<ConfigError>,
    /// Where each object was first seen in this file, for duplicate errors.
    seen: BTreeMap<(ObjectKind, ObjectKey), String>,
}

impl Parsed {
    /// One document (or List item); `label` names it when it has no name.
    fn document(&mut self, value: Value, label: &str) {
        let Value::Mapping(map) = &value else {
            self.errors.push(ConfigError::new(
                label,
                "",
                "is not a mapping (a Kubernetes object with apiVersion and kind)",
            ));
            return;
        };
        let field = |name: &str| map.get(name).and_then(Value::as_str);
        let (Some(api_version), Some(kind)) = (field("apiVersion"), field("kind")) else {
            let missing = if field("apiVersion").is_none() {
                "apiVersion"
            } else {
                "kind"
            };
            self.errors
                .push(ConfigError::new(label, missing, "is required (a string)"));
            return;
        };
        let name = describe(&value, kind).unwrap_or_else(|| label.to_string());
        let obj = match (api_version, kind) {
            ("v1", "List") => {
                match map.get("items") {
                    None | Some(Value::Null) => {}
                    Some(Value::Sequence(items)) => {
                        for (i, item) in items.iter().enumerate() {
                            self.document(item.clone(), &format!("{label} items[{i}]"));
                        }
                    }
                    Some(_) => self
                        .errors
                        .push(ConfigError::new(label, "items", "must be a list")),
                }
                return;
            }
            ("v1", "Service") => decode::<Service>(value, &name).map(KubeObject::Service),
            ("v1", "Pod") => decode::<Pod>(value, &name).map(KubeObject::Pod),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                decode::<EndpointSlice>(value, &name).map(KubeObject::EndpointSlice)
            }
            ("v1", "ConfigMap") => {
                let labelled = value
                    .get("metadata")
                    .and_then(|m| m.get("labels"))
                    .and_then(|l| l.get(POLICY_LABEL))
                    .is_some();
                if !labelled {
                    // Not Ward's: never parsed, so never an error.
                    debug!(object = %name, "ignoring ConfigMap without the {POLICY_LABEL} label");
                    return;
                }
                decode::<ConfigMap>(value, &name).map(KubeObject::ConfigMap)
            }
            _ => {
                debug!(object = %name, api_version, "ignoring a kind Ward does not read");
                return;
            }
        };
        let mut obj = match obj {
            Ok(o) => o,
            Err(e) => {
                self.errors.push(e);
                return;
            }
        };
        let key = match object_key(obj.metadata(), &name) {
            Ok(k) => k,
            Err(e) => {
                self.errors.push(e);
                return;
            }
        };
        // The namespace kubectl would have used, so later readers of the
        // object see the same one as its key.
        obj.metadata_mut().namespace = Some(key.namespace.clone());
        let errors = validate_object(&key, &obj);
        if !errors.is_empty() {
            self.errors.extend(errors);
            return;
        }
        let kind = obj.kind();
        if let Some(first) = self.seen.get(&(kind, key.clone())) {
            self.errors.push(ConfigError::new(
                kind.describe(&key),
                "",
                format!("defined twice in this file ({first} and {label})"),
            ));
            return;
        }
        self.seen.insert((kind, key.clone()), label.to_string());
        self.objects.push((key, obj));
    }
}

/// `Kind namespace/name` read from an undecoded document, so that even a
/// type error names the object.
fn describe(value: &Value, kind: &str) -> Option<String> {
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str().filter(|n| !n.is_empty())?;
    let ns = meta
        .get("namespace")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or(super::convert::DEFAULT_NAMESPACE);
    Some(format!("{kind} {ns}/{name}"))
}

/// Deserialize a Kubernetes type; a type error names the field path.
fn decode<T: DeserializeOwned>(value: Value, object: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        ConfigError::new(object, field, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, TargetPort};

    fn key(s: &str) -> ObjectKey {
        s.parse().unwrap()
    }

    fn write(dir: &Path, name: &str, text: &str) {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(path, text).unwrap();
    }

    fn service(name: &str, port: u16) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\n\
             spec: {{selector: {{app: {name}}}, ports: [{{name: http, port: {port}, targetPort: 8080}}]}}\n"
        )
    }

    fn pod(name: &str, app: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {{app: {app}}}}}\n\
             spec: {{serviceAccountName: {app}, containers: [{{name: app, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
             status: {{podIP: {ip}}}\n"
        )
    }

    fn strings(errors: &[ConfigError]) -> Vec<String> {
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn parses_multi_document_files_lists_and_ignores_other_kinds() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(
            d,
            "a/services.yaml",
            &format!(
                "---\n{}---\n# only a comment\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: x}}\n---\n{}",
                service("server", 80),
                service("client", 81)
            ),
        );
        write(d, "pods.yml", &pod("server-0", "server", "10.0.0.1"));
        write(
            d,
            "list.json",
            &("{\"apiVersion\": \"v1\",\n\t\"kind\": \"List\",\n\t\"items\": [".to_string()
                + r#"
                 {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client-0", "namespace": "demo", "labels": {"app": "client"}},
                  "status": {"podIP": "10.0.0.2"}},
                 {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "mesh", "labels": {"ward.io/policy": "mesh"}}, "data": {"scope": "mesh", "mode": "STRICT"}},
                 {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "unrelated"}, "data": {"a": 1}},
                 {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": {"name": "kn"}}
               ]}"#),
        );
        write(d, "README.md", "not yaml: [");
        write(d, ".#pods.yaml", "not yaml: [");
        write(d, ".hidden/x.yaml", "not yaml: [");

        let (mesh, objects, errors) = DirSource::load_once(d).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            mesh.services
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["demo/client", "demo/server"]
        );
        assert_eq!(
            mesh.workloads
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["demo/client-0", "demo/server-0"]
        );
        assert_eq!(
            objects
                .config_maps
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["default/mesh"],
            "only labelled ConfigMaps, namespace defaulted"
        );
        assert_eq!(
            objects.config_maps[&key("default/mesh")]
                .metadata
                .namespace
                .as_deref(),
            Some("default")
        );
        assert_eq!(
            objects.origin(ObjectKind::Pod, &key("demo/server-0")),
            Some(d.join("pods.yml").as_path())
        );
        assert_eq!(mesh.endpoints(&key("demo/server"), 80).len(), 1);
    }

    #[test]
    fn type_error_names_the_field_path() {
        let tmp = tempfile::tempdir().unwrap();
        let text = service("server", 80).replace("port: 80", "port: x");
        write(
            tmp.path(),
            "svc.yaml",
            &format!("{}---\n{text}", pod("p", "a", "10.0.0.1")),
        );
        let (_, _, errors) = DirSource::load_once(tmp.path()).unwrap();
        let source = tmp.path().join("svc.yaml");
        assert_eq!(
            errors,
            vec![ConfigError {
                source: Some(source.clone()),
                object: "Service demo/server".into(),
                field: "spec.ports[0].port".into(),
                message: "invalid type: string \"x\", expected i32".into(),
            }]
        );
        assert_eq!(
            errors[0].to_string(),
            format!(
                "{}: Service demo/server: spec.ports[0].port: invalid type: string \"x\", expected i32",
                source.display()
            )
        );
    }

    #[test]
    fn document_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let cases = [
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {namespace: demo}\n",
                "document 1: metadata.name: is required",
            ),
            (
                "kind: Pod\nmetadata: {name: x}\n",
                "document 1: apiVersion: is required (a string)",
            ),
            (
                "---\napiVersion: v1\n",
                "document 1: kind: is required (a string)",
            ),
            (
                "- a\n- b\n",
                "document 1: is not a mapping (a Kubernetes object with apiVersion and kind)",
            ),
            (
                "apiVersion: v1\nkind: List\nitems: [{kind: Pod}]\n",
                "document 1 items[0]: apiVersion: is required (a string)",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nstatus: {podIP: nope}\n",
                "Pod default/x: status.podIP: \"nope\" is not an IP address",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: default}\n",
                "Pod default/x: defined twice in this file (document 1 and document 2)",
            ),
        ];
        for (text, want) in cases {
            write(d, "f.yaml", text);
            let (_, _, errors) = DirSource::load_once(d).unwrap();
            let prefix = format!("{}: ", d.join("f.yaml").display());
            assert_eq!(strings(&errors), vec![format!("{prefix}{want}")], "{text}");
        }
        write(d, "f.yaml", "apiVersion: v1\nkind: Pod\n  bad indent: [\n");
        let (_, _, errors) = DirSource::load_once(d).unwrap();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].object, "document 1");
        assert!(errors[0].message.contains("line"), "{}", errors[0].message);

        fs::remove_file(d.join("f.yaml")).unwrap();
        write(d, "f.json", "{\"apiVersion\": \"v1\",\n\t\"kind\": }");
        let (_, _, errors) = DirSource::load_once(d).unwrap();
        assert_eq!(
            strings(&errors),
            vec![format!(
                "{}: document 1: expected value at line 2 column 10",
                d.join("f.json").display()
            )]
        );
    }

    #[test]
    fn bad_file_keeps_last_good_objects_while_other_files_apply() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(
            d,
            "server.yaml",
            &(service("server", 80) + "---\n" + &pod("server-0", "server", "10.0.0.1")),
        );
        write(d, "client.yaml", &service("client", 81));
        let mut loader = Loader::new(d.to_path_buf(), false);
        let first = loader.load().unwrap();
        assert!(first.errors.is_empty());

        // Break server.yaml (a syntax error and, separately, a validation
        // error), edit client.yaml: the client edit applies, the server
        // stays as it was.
        for broken in [
            "apiVersion: v1\nkind: Service\nmetadata: {name: server, namespace: demo\n".to_string(),
            service("server", 0),
        ] {
            write(d, "server.yaml", &broken);
            write(d, "client.yaml", &service("client", 82));
            let next = loader.load().unwrap();
            assert_eq!(next.errors.len(), 1, "{:?}", next.errors);
            assert_eq!(
                next.errors[0].source.as_deref(),
                Some(d.join("server.yaml").as_path())
            );
            assert_eq!(
                next.mesh.services[&key("demo/server")],
                first.mesh.services[&key("demo/server")]
            );
            assert_eq!(next.mesh.workloads, first.mesh.workloads);
            assert_eq!(next.mesh.services[&key("demo/client")].ports[0].port, 82);
            write(d, "client.yaml", &service("client", 81));
        }

        // Fixed: the new content applies, the error is gone.
        write(d, "server.yaml", &service("server", 90));
        let fixed = loader.load().unwrap();
        assert!(fixed.errors.is_empty());
        assert_eq!(fixed.mesh.services[&key("demo/server")].ports[0].port, 90);
        assert!(fixed.mesh.workloads.is_empty());
    }

    #[test]
    fn file_bad_from_the_start_contributes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "a.yaml", &service("server", 0));
        write(tmp.path(), "b.yaml", &service("client", 80));
        let (mesh, _, errors) = DirSource::load_once(tmp.path()).unwrap();
        assert_eq!(errors.len(), 1);
        assert_eq!(
            mesh.services.keys().collect::<Vec<_>>(),
            [&key("demo/client")]
        );
    }

    #[test]
    fn deleted_file_removes_its_objects() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "server.yaml", &service("server", 80));
        write(d, "sub/client.yaml", &service("client", 80));
        let mut loader = Loader::new(d.to_path_buf(), false);
        assert_eq!(loader.load().unwrap().mesh.services.len(), 2);
        fs::remove_file(d.join("sub/client.yaml")).unwrap();
        let next = loader.load().unwrap();
        assert_eq!(
            next.mesh.services.keys().collect::<Vec<_>>(),
            [&key("demo/server")]
        );
        assert!(
            next.objects
                .origin(ObjectKind::Service, &key("demo/client"))
                .is_none()
        );
    }

    #[test]
    fn duplicate_object_across_files_names_both_and_first_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "b.yaml", &service("server", 90));
        write(d, "a.yaml", &service("server", 80));
        let (mesh, objects, errors) = DirSource::load_once(d).unwrap();
        assert_eq!(
            strings(&errors),
            vec![format!(
                "{}: Service demo/server: also defined in {}; the definition there (first by path) is used",
                d.join("b.yaml").display(),
                d.join("a.yaml").display()
            )]
        );
        assert_eq!(mesh.services[&key("demo/server")].ports[0].port, 80);
        assert_eq!(
            objects.origin(ObjectKind::Service, &key("demo/server")),
            Some(d.join("a.yaml").as_path())
        );
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope");
        let err = DirSource::load_once(&missing).unwrap_err();
        assert!(matches!(err, DiscoveryError::DirNotFound { .. }));
        assert_eq!(
            err.to_string(),
            format!("discovery directory {}: does not exist", missing.display())
        );
        write(tmp.path(), "file.yaml", "");
        let err = DirSource::load_once(&tmp.path().join("file.yaml")).unwrap_err();
        assert!(matches!(err, DiscoveryError::NotADirectory { .. }), "{err}");
    }

    #[tokio::test]
    async fn run_fails_on_missing_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let source = DirSource::new(tmp.path().join("nope"));
        let err = source.run(CancellationToken::new()).await.unwrap_err();
        assert!(matches!(err, DiscoveryError::DirNotFound { .. }), "{err}");
    }

    /// Wait (up to 5 s) until the status satisfies `done`.
    async fn eventually_status(
        rx: &mut watch::Receiver<Arc<DiscoveryStatus>>,
        done: impl Fn(&DiscoveryStatus) -> bool,
    ) -> Arc<DiscoveryStatus> {
        let status = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| done(s)))
            .await
            .expect("timed out waiting for the discovery status")
            .unwrap();
        Arc::clone(&status)
    }

    #[tokio::test]
    async fn watch_publishes_edits_and_not_no_op_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().to_path_buf();
        write(&d, "server.yaml", &service("server", 80));
        let source = DirSource::new(d.clone());
        let mut mesh_rx = source.mesh();
        let mut status_rx = source.status();
        let mut objects_rx = source.objects();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(shutdown.clone()));

        let status = eventually_status(&mut status_rx, |s| s.synced).await;
        assert_eq!(status.generation, 1);
        assert_eq!(status.objects.services, 1);
        assert!(status.source.starts_with("dir:"));
        assert!(mesh_rx.has_changed().unwrap(), "the first load publishes");
        assert_eq!(mesh_rx.borrow_and_update().services.len(), 1);
        objects_rx.mark_unchanged();

        // An edit, written the way editors do: a new file renamed over the
        // old one.
        write(
            &d,
            ".server.yaml.tmp",
            &(service("server", 80) + "---\n" + &service("client", 81)),
        );
        fs::rename(d.join(".server.yaml.tmp"), d.join("server.yaml")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), mesh_rx.changed())
            .await
            .expect("edit not published within 5 s")
            .unwrap();
        let mesh = mesh_rx.borrow_and_update().clone();
        assert_eq!(mesh.services.len(), 2);
        assert_eq!(
            mesh.services[&key("demo/client")].ports[0].protocol,
            Protocol::Http
        );
        assert!(objects_rx.has_changed().unwrap());
        let status = eventually_status(&mut status_rx, |s| s.generation == 2).await;
        let reloads = status.reloads;

        // Rewriting the same content reloads but publishes nothing.
        write(
            &d,
            "server.yaml",
            &(service("server", 80) + "---\n" + &service("client", 81)),
        );
        let status = eventually_status(&mut status_rx, |s| s.reloads > reloads).await;
        assert_eq!(status.generation, 2);
        assert!(
            !mesh_rx.has_changed().unwrap(),
            "a no-op write must not publish a mesh"
        );

        // Reading the files (the reload itself) is no reason to reload:
        // with nothing written, the reload count stays put.
        let quiet = eventually_status(&mut status_rx, |_| true).await.reloads;
        status_rx.mark_unchanged();
        assert!(
            tokio::time::timeout(Duration::from_secs(1), status_rx.changed())
                .await
                .is_err(),
            "reloaded without a change: {} reloads, then more",
            quiet
        );

        // A new file with an error: reported, the rest unaffected.
        write(&d, "bad.yaml", &service("bad", 0));
        let status = eventually_status(&mut status_rx, |s| !s.errors.is_empty()).await;
        assert_eq!(status.errors[0].object, "Service demo/bad");
        assert!(!mesh_rx.has_changed().unwrap());

        shutdown.cancel();
        task.await.unwrap().unwrap();
    }

    #[test]
    fn local_mesh_example() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/local-mesh");
        let (mesh, objects, errors) = DirSource::load_once(&dir).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(objects.counts().pods, 2);

        let server = &mesh.services[&key("demo/server")];
        assert_eq!(server.ports.len(), 1);
        assert_eq!(server.ports[0].name, "http");
        assert_eq!(server.ports[0].port, 9080);
        assert_eq!(server.ports[0].target_port, TargetPort::Name("http".into()));
        assert_eq!(server.ports[0].protocol, Protocol::Http);
        assert_eq!(mesh.services.len(), 2);

        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        for (pod, sa, pod_ip, app_ip) in [
            ("demo/server-0", "server", "127.0.0.20", "127.0.1.20"),
            ("demo/client-0", "client", "127.0.0.10", "127.0.1.10"),
        ] {
            let w = &mesh.workloads[&key(pod)];
            assert_eq!(w.service_account, sa);
            assert_eq!(w.ip, ip(pod_ip));
            assert_eq!(w.app_ip, ip(app_ip));
            assert_eq!(w.outbound_ip, ip(pod_ip));
            assert!(w.ready);
        }

        let endpoints = |svc: &str, port: u16| -> Vec<(String, u16, Option<String>)> {
            mesh.endpoints(&key(svc), port)
                .iter()
                .map(|e| (e.ip.to_string(), e.port, e.service_account.clone()))
                .collect()
        };
        assert_eq!(
            endpoints("demo/server", 9080),
            [("127.0.0.20".into(), 8080, Some("server".into()))]
        );
        assert_eq!(
            endpoints("demo/client", 9081),
            [("127.0.0.10".into(), 8080, Some("client".into()))]
        );
    }
}
