//! The local state file: one JSON document per environment, listing every resource pgdr
//! created or adopted, so that `down` can reverse them.
//!
//! Written atomically (temp file, fsync, rename) after every change, the previous version kept
//! as `<env>.json.bak`, mode 0600. It never holds a secret: only IDs, names and settings.
//! A lock file `<env>.lock` keeps two runs on one environment from interleaving.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const SCHEMA: u32 = 1;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub schema: u32,
    pub env: String,
    #[serde(default)]
    pub updated_at: String,
    /// Every resource, keyed `<owner>/<region>/<what>` (e.g. `network/us-east-1/vpc`).
    #[serde(default)]
    pub resources: BTreeMap<Key, Resource>,
    /// Which region holds the writer now, and what happened to get there.
    #[serde(default)]
    pub topology: Topology,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Topology {
    /// Region of the current writer; empty until the primary exists.
    #[serde(default)]
    pub writer_region: String,
    /// Region of the protected primary (the source of the replica), when `reprotect` has
    /// swapped the roles of the configured regions; empty means the configured primary region.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub primary_region: String,
    /// Regions whose old primary is fenced, with the ingress rules `failover` revoked there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fenced: BTreeMap<String, Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<TopologyEvent>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TopologyEvent {
    pub at: String,
    pub what: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// A create was about to be sent: the resource may or may not exist.
    Pending,
    /// Created by pgdr.
    Created,
    /// Found by tag or name and taken over.
    Adopted,
}

/// A resource's key in the state file: `<owner>/<region>/<what>`. Each key is spelled by the
/// module that owns the resource (`steps::network::Net::key`, …), nowhere else.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Key(String);

impl Key {
    pub fn new(owner: &str, region: &str, what: &str) -> Key {
        Key(format!("{owner}/{region}/{what}"))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The owner part (`network`, `primary`, `retired`, …).
    pub fn owner(&self) -> &str {
        self.0.split('/').next().unwrap_or("")
    }
    /// The region part.
    pub fn region(&self) -> &str {
        self.0.split('/').nth(1).unwrap_or("")
    }
    /// The same resource under another owner (`reprotect` swaps `primary` and `replica`).
    pub fn with_owner(&self, owner: &str) -> Key {
        Key::new(owner, self.region(), self.what())
    }
    /// What follows `<owner>/<region>/`.
    pub fn what(&self) -> &str {
        self.0.splitn(3, '/').nth(2).unwrap_or("")
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The facts kept beside a resource's ID. Never a secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attr {
    /// The resource's ARN.
    Arn,
    /// An instance's endpoint address.
    Endpoint,
    /// An instance's allocated storage, as the alarms' thresholds follow it.
    StorageGib,
    /// The idempotency token of a pending create.
    Token,
    /// The identifier an instance will have (before it has an ID in state).
    Identifier,
    /// The connection facts written into the secret (`host:port/db`).
    Connection,
}

impl Attr {
    pub fn name(self) -> &'static str {
        match self {
            Attr::Arn => "arn",
            Attr::Endpoint => "endpoint",
            Attr::StorageGib => "storage_gib",
            Attr::Token => "token",
            Attr::Identifier => "identifier",
            Attr::Connection => "connection",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Resource {
    pub kind: String,
    /// Region, or `global` for Route 53 and IAM.
    pub region: String,
    /// The AWS ID (or name, or ARN, for services keyed that way); `None` while pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub status: Status,
    /// Facts later steps or `down` need (ARNs, endpoints, association IDs). Never secrets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attrs: BTreeMap<String, String>,
}

impl Resource {
    pub fn new(kind: &str, region: &str, id: impl Into<String>, status: Status) -> Self {
        Resource { kind: kind.to_owned(), region: region.to_owned(), id: Some(id.into()), status, attrs: BTreeMap::new() }
    }
    pub fn pending(kind: &str, region: &str) -> Self {
        Resource { kind: kind.to_owned(), region: region.to_owned(), id: None, status: Status::Pending, attrs: BTreeMap::new() }
    }
    pub fn with(mut self, a: Attr, v: impl Into<String>) -> Self {
        self.attrs.insert(a.name().to_owned(), v.into());
        self
    }
    pub fn attr(&self, a: Attr) -> Option<&str> {
        self.attrs.get(a.name()).map(String::as_str)
    }
    pub fn set(&mut self, a: Attr, v: impl Into<String>) {
        self.attrs.insert(a.name().to_owned(), v.into());
    }
}

pub fn now_rfc3339() -> String {
    aws_smithy_types::DateTime::from(std::time::SystemTime::now()).fmt(aws_smithy_types::date_time::Format::DateTime).unwrap_or_default()
}

pub fn state_path(dir: &Path, env: &str) -> PathBuf {
    dir.join(format!("{env}.json"))
}

/// Reads a state file. A missing file is `Ok(None)`; a corrupt or newer one is a user error
/// and the file is left as it is.
pub fn read(dir: &Path, env: &str) -> Result<Option<State>> {
    let path = state_path(dir, env);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::user(format!("cannot read state file {}: {e}; check its permissions", path.display()))),
    };
    #[derive(Deserialize)]
    struct Probe {
        schema: Option<u32>,
    }
    let corrupt = |why: String| {
        Error::user(format!(
            "state file {} is corrupt ({why}); restore {}.bak or move the file aside and run `pgdr adopt --env {env}`",
            path.display(),
            path.display()
        ))
    };
    let probe: Probe = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    match probe.schema {
        Some(s) if s > SCHEMA => {
            return Err(Error::user(format!(
                "state file {} has schema {s}, newer than this pgdr understands ({SCHEMA}); upgrade pgdr",
                path.display()
            )))
        }
        None => return Err(corrupt("no schema field".into())),
        _ => {}
    }
    let state: State = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    if state.env != env {
        return Err(corrupt(format!("it belongs to environment {:?}", state.env)));
    }
    Ok(Some(state))
}

/// Writes `state` atomically: temp file, fsync, keep the old file as `.bak`, rename, fsync dir.
pub fn write_atomic(dir: &Path, state: &State) -> Result<()> {
    let path = state_path(dir, &state.env);
    let tmp = dir.join(format!(".{}.json.tmp", state.env));
    let bak = dir.join(format!("{}.json.bak", state.env));
    let bak_tmp = dir.join(format!(".{}.json.bak.tmp", state.env));
    let text = serde_json::to_vec_pretty(state).map_err(|e| Error::Other(format!("internal: state does not serialize: {e}")))?;
    let io =
        |what: &str, e: std::io::Error| Error::Other(format!("cannot {what} in {}: {e}; the previous state file is intact", dir.display()));
    {
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(|e| io("write the state file", e))?;
        f.write_all(&text).map_err(|e| io("write the state file", e))?;
        f.write_all(b"\n").map_err(|e| io("write the state file", e))?;
        f.sync_all().map_err(|e| io("sync the state file", e))?;
    }
    if path.exists() {
        // Keep the previous version; a hard link and a rename keep `<env>.json` in place throughout.
        let _ = fs::remove_file(&bak_tmp);
        if fs::hard_link(&path, &bak_tmp).is_ok() {
            fs::rename(&bak_tmp, &bak).map_err(|e| io("keep the state backup", e))?;
        }
    }
    fs::rename(&tmp, &path).map_err(|e| io("replace the state file", e))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub fn ensure_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir)
            .map_err(|e| Error::user(format!("cannot create state directory {}: {e}; choose another with --state-dir", dir.display())))?;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    }
    Ok(())
}

/// The live state of one run: in memory, saved after every change unless read-only (plan).
pub struct Store {
    dir: PathBuf,
    state: Mutex<State>,
    persist: bool,
}

impl Store {
    /// The store of a run in `mode`: saved after every change only when the mode saves state.
    pub fn new(dir: &Path, env: &str, existing: Option<State>, mode: crate::exec::Mode) -> Store {
        let state = existing.unwrap_or_else(|| State { schema: SCHEMA, env: env.to_owned(), ..Default::default() });
        Store { dir: dir.to_owned(), state: Mutex::new(state), persist: mode.saves_state() }
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn get(&self, key: &Key) -> Option<Resource> {
        self.with(|s| s.resources.get(key).cloned())
    }

    pub fn id(&self, key: &Key) -> Option<String> {
        self.get(key).and_then(|r| r.id)
    }

    pub fn attr(&self, key: &Key, attr: Attr) -> Option<String> {
        self.get(key).and_then(|r| r.attr(attr).map(str::to_owned))
    }

    /// Sets an attribute of a recorded resource (nothing when the resource is not recorded).
    pub fn set_attr(&self, key: &Key, attr: Attr, value: impl Into<String>) -> Result<()> {
        let value = value.into();
        self.update(|s| {
            if let Some(r) = s.resources.get_mut(key) {
                r.set(attr, value);
            }
        })
    }

    pub fn snapshot(&self) -> State {
        self.with(|s| s.clone())
    }

    pub fn put(&self, key: &Key, res: Resource) -> Result<()> {
        self.update(|s| {
            s.resources.insert(key.clone(), res);
        })
    }

    pub fn remove(&self, key: &Key) -> Result<()> {
        self.update(|s| {
            s.resources.remove(key);
        })
    }

    /// Changes the state and saves it before returning. The closure runs under the state lock:
    /// it must not call back into the store (compute what it needs first).
    pub fn update(&self, f: impl FnOnce(&mut State)) -> Result<()> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let before = g.clone();
        f(&mut g);
        if *g == before || !self.persist {
            return Ok(());
        }
        g.updated_at = now_rfc3339();
        ensure_dir(&self.dir)?;
        if let Err(e) = write_atomic(&self.dir, &g) {
            *g = before;
            return Err(e);
        }
        Ok(())
    }

    /// Removes the state file (after `down` removed everything); the backup stays.
    pub fn delete_file(&self) -> Result<()> {
        if !self.persist {
            return Ok(());
        }
        let env = self.with(|s| s.env.clone());
        let path = state_path(&self.dir, &env);
        if path.exists() {
            let bak = self.dir.join(format!("{env}.json.bak"));
            fs::rename(&path, &bak).map_err(|e| Error::Other(format!("cannot remove {}: {e}", path.display())))?;
        }
        Ok(())
    }
}

/// Who holds an environment's lock.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LockInfo {
    pub who: String,
    pub pid: u32,
    pub host: String,
    pub command: String,
    pub since: String,
}

/// The lock this process holds, so that a forced exit (second Ctrl-C) can still release it.
static HELD: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Removes this process's lock file, if it holds one (for exits that skip destructors).
pub fn release_held_lock() {
    let held = HELD.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(path) = held {
        let ours =
            fs::read(&path).ok().and_then(|t| serde_json::from_slice::<LockInfo>(&t).ok()).is_some_and(|h| h.pid == std::process::id());
        if ours {
            let _ = fs::remove_file(&path);
        }
    }
}

/// An acquired lock; released when dropped.
#[derive(Debug)]
pub struct Lock {
    path: PathBuf,
    info: LockInfo,
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

pub fn lock_path(dir: &Path, env: &str) -> PathBuf {
    dir.join(format!("{env}.lock"))
}

pub fn read_lock(dir: &Path, env: &str) -> Option<LockInfo> {
    let text = fs::read(lock_path(dir, env)).ok()?;
    serde_json::from_slice(&text).ok()
}

impl Lock {
    pub fn acquire(dir: &Path, env: &str, command: &str) -> Result<Lock> {
        ensure_dir(dir)?;
        let path = lock_path(dir, env);
        let info = LockInfo {
            who: std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into()),
            pid: std::process::id(),
            host: hostname(),
            command: command.to_owned(),
            since: now_rfc3339(),
        };
        match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
            Ok(mut f) => {
                let text = serde_json::to_vec(&info).map_err(|e| Error::Other(e.to_string()))?;
                f.write_all(&text)?;
                f.sync_all()?;
                *HELD.lock().unwrap_or_else(|p| p.into_inner()) = Some(path.clone());
                Ok(Lock { path, info })
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(held_error(dir, env)),
            Err(e) => Err(Error::user(format!("cannot create lock file {}: {e}; check the state directory's permissions", path.display()))),
        }
    }

    pub fn info(&self) -> &LockInfo {
        &self.info
    }
}

fn held_error(dir: &Path, env: &str) -> Error {
    let path = lock_path(dir, env);
    match read_lock(dir, env) {
        Some(h) if h.host == hostname() && !pid_alive(h.pid) => Error::user(format!(
            "environment {env} has a stale lock from `{}` (pid {} on this host is gone, since {}); if no pgdr is running, clear it with `pgdr unlock --env {env}`",
            h.command, h.pid, h.since
        )),
        Some(h) => Error::user(format!(
            "environment {env} is locked by {} (`{}`, pid {} on {}, since {}); wait for that run to finish",
            h.who, h.command, h.pid, h.host, h.since
        )),
        None => Error::user(format!(
            "environment {env} is locked ({} exists but is unreadable); if no pgdr is running, run `pgdr unlock --env {env}`",
            path.display()
        )),
    }
}

/// Removes a lock after checking that it is safe: refused while its process is alive on this
/// host, and for another host unless `force`.
pub fn unlock(dir: &Path, env: &str, force: bool) -> Result<Option<LockInfo>> {
    let path = lock_path(dir, env);
    if !path.exists() {
        return Ok(None);
    }
    let info = read_lock(dir, env);
    if let Some(h) = &info {
        if h.host == hostname() && pid_alive(h.pid) && h.pid != std::process::id() {
            return Err(Error::user(format!(
                "environment {env} is locked by a running process (pid {}, `{}`); stop it first",
                h.pid, h.command
            )));
        }
        if h.host != hostname() && !force {
            return Err(Error::user(format!(
                "environment {env} is locked by a run on host {} (pid {}, `{}`); if it is really gone, run `pgdr unlock --env {env} --force`",
                h.host, h.pid, h.command
            )));
        }
    }
    fs::remove_file(&path).map_err(|e| Error::user(format!("cannot remove {}: {e}", path.display())))?;
    Ok(info)
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Remove the lock only if it is still ours.
        if read_lock(self.path.parent().unwrap_or(Path::new(".")), self.path.file_stem().and_then(|s| s.to_str()).unwrap_or(""))
            .is_some_and(|h| h.pid == self.info.pid && h.host == self.info.host)
        {
            let _ = fs::remove_file(&self.path);
        }
        let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
        if held.as_ref() == Some(&self.path) {
            *held = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_keeps_backup_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "dev", None, crate::exec::Mode::Apply);
        store.put(&Key::new("network", "us-east-1", "vpc"), Resource::new("vpc", "us-east-1", "vpc-1", Status::Created)).unwrap();
        store.put(&Key::new("network", "eu-west-1", "vpc"), Resource::new("vpc", "eu-west-1", "vpc-2", Status::Created)).unwrap();
        let path = state_path(dir.path(), "dev");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = read(dir.path(), "dev").unwrap().unwrap();
        assert_eq!(back.resources.len(), 2);
        let bak: State = serde_json::from_slice(&fs::read(dir.path().join("dev.json.bak")).unwrap()).unwrap();
        assert_eq!(bak.resources.len(), 1);
    }

    #[test]
    fn corrupt_and_newer_files_are_user_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path(), "dev");
        fs::write(&path, b"{\"schema\": 1, \"env\": \"dev\", \"resour").unwrap();
        let e = read(dir.path(), "dev").unwrap_err();
        assert!(matches!(e, Error::User(_)) && e.to_string().contains("corrupt"), "{e}");
        fs::write(&path, b"{\"schema\": 99, \"env\": \"dev\"}").unwrap();
        let e = read(dir.path(), "dev").unwrap_err();
        assert!(e.to_string().contains("newer"), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"{\"schema\": 99, \"env\": \"dev\"}");
    }

    #[test]
    fn lock_is_exclusive_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let lock = Lock::acquire(dir.path(), "dev", "pgdr up").unwrap();
        let e = Lock::acquire(dir.path(), "dev", "pgdr down").unwrap_err();
        assert!(e.to_string().contains("locked by"), "{e}");
        assert!(e.to_string().contains("pgdr up"), "{e}");
        drop(lock);
        assert!(Lock::acquire(dir.path(), "dev", "pgdr down").is_ok());
    }

    #[test]
    fn stale_lock_is_named_not_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let info = LockInfo { who: "x".into(), pid: 99_999_999, host: hostname(), command: "pgdr up".into(), since: now_rfc3339() };
        fs::write(lock_path(dir.path(), "dev"), serde_json::to_vec(&info).unwrap()).unwrap();
        let e = Lock::acquire(dir.path(), "dev", "pgdr up").unwrap_err();
        assert!(e.to_string().contains("stale") && e.to_string().contains("pgdr unlock"), "{e}");
        assert!(lock_path(dir.path(), "dev").exists());
        unlock(dir.path(), "dev", false).unwrap();
        assert!(!lock_path(dir.path(), "dev").exists());
    }

    #[test]
    fn foreign_host_lock_needs_force() {
        let dir = tempfile::tempdir().unwrap();
        let info = LockInfo { who: "x".into(), pid: 1, host: "elsewhere".into(), command: "pgdr up".into(), since: now_rfc3339() };
        fs::write(lock_path(dir.path(), "dev"), serde_json::to_vec(&info).unwrap()).unwrap();
        assert!(unlock(dir.path(), "dev", false).is_err());
        assert!(unlock(dir.path(), "dev", true).is_ok());
    }
}
