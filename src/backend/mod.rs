//! Where state and locks live: a local directory (the default) or an S3 prefix shared by a team.
//!
//! Both backends keep `<env>.json` (the state) and `<env>.lock` (who runs on the environment
//! now) and give the same guarantees:
//! - a lock is taken atomically (`O_EXCL` file; S3 `PutObject` with `If-None-Match: *`) and
//!   released only while it is still ours (pid and host; S3 `DeleteObject` with `If-Match` on the
//!   lock's ETag);
//! - every state write is a compare-and-swap on the version this run last read or wrote (a
//!   content hash; the S3 ETag with `If-Match`): a write that lost a race overwrites nothing;
//! - history: the S3 bucket's versions (the directory keeps one `.bak`).
//!
//! [`crate::state::Store`] saves through [`Backend::save`]; the commands use the rest.

mod dir;
pub mod init;
mod s3;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clients::Connection;
use crate::error::{Error, Result};
use crate::state::State;

pub use init::{init_bucket, InitOptions, InitResult};

/// Where the state lives, as `--state`, `PGDR_STATE` or the config's `state` name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Dir(PathBuf),
    S3(S3Url),
}

/// `s3://BUCKET[/PREFIX]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Without leading or trailing slashes; empty for the bucket's root.
    pub prefix: String,
}

impl S3Url {
    /// The object key of `name` under the prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Dir(d) => write!(f, "{}", d.display()),
            Location::S3(u) => u.fmt(f),
        }
    }
}

impl Location {
    /// Parses a directory path or an `s3://` URL. A malformed URL is a user error naming the fix.
    pub fn parse(s: &str) -> Result<Location> {
        let Some(rest) = s.strip_prefix("s3://") else {
            if s.contains("://") || s.starts_with("s3:") {
                return Err(Error::user(format!("state location {s:?} is neither a directory nor s3://BUCKET/PREFIX; fix --state")));
            }
            if s.is_empty() {
                return Err(Error::user("the state location is empty; give a directory or s3://BUCKET/PREFIX to --state"));
            }
            return Ok(Location::Dir(PathBuf::from(s)));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if !valid_bucket_name(bucket) {
            return Err(Error::user(format!(
                "{s:?} does not name a valid S3 bucket ({bucket:?}: 3-63 lowercase letters, digits, dots and dashes); use s3://BUCKET/PREFIX"
            )));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.contains("//") || prefix.split('/').any(|p| p == "." || p == "..") {
            return Err(Error::user(format!("{s:?} has an empty or relative path segment in its prefix; use s3://BUCKET/PREFIX")));
        }
        Ok(Location::S3(S3Url { bucket: bucket.to_owned(), prefix: prefix.to_owned() }))
    }
}

/// S3's bucket naming rules (general purpose buckets): 3-63 characters, lowercase letters,
/// digits, dots and hyphens, beginning and ending with a letter or digit, no `..`.
fn valid_bucket_name(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && b.starts_with(|c: char| c.is_ascii_alphanumeric())
        && b.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !b.contains("..")
}

/// The version of the state this run last read or wrote: what a compare-and-swap expects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version(pub String);

/// A state as read, with the version a write must replace.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub state: State,
    pub version: Version,
}

/// The run writing: on the lock, and on every state version in S3 (for `state history`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunInfo {
    pub who: String,
    pub host: String,
    pub pid: u32,
    pub command: String,
    /// Unique per run: tells a write that landed before its answer was lost from another run's.
    pub run_id: String,
}

impl RunInfo {
    pub fn this_process(command: &str) -> RunInfo {
        RunInfo {
            who: std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| user_name()),
            host: hostname(),
            pid: std::process::id(),
            command: command.to_owned(),
            run_id: format!("{:016x}{:08x}", fastrand::u64(..), std::process::id()),
        }
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
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub run_id: String,
    /// Refreshed while the run goes on (S3): a lock whose heartbeat is old is stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<String>,
}

impl LockInfo {
    pub fn new(run: &RunInfo) -> LockInfo {
        let now = crate::state::now_rfc3339();
        LockInfo {
            who: run.who.clone(),
            pid: run.pid,
            host: run.host.clone(),
            command: run.command.clone(),
            since: now.clone(),
            run_id: run.run_id.clone(),
            heartbeat: Some(now),
        }
    }
    /// One line naming the holder, for errors and `status`.
    pub fn holder(&self) -> String {
        format!("{} (`{}`, pid {} on {}, since {})", self.who, self.command, self.pid, self.host, self.since)
    }
    /// Seconds since the last heartbeat (or since the lock was taken), if the time parses.
    pub fn silent_for(&self) -> Option<u64> {
        let at = self.heartbeat.as_deref().unwrap_or(&self.since);
        let t = aws_smithy_types::DateTime::from_str(at, aws_smithy_types::date_time::Format::DateTime).ok()?;
        let t = std::time::SystemTime::try_from(t).ok()?;
        std::time::SystemTime::now().duration_since(t).ok().map(|d| d.as_secs())
    }
}

/// One version of an environment's state, newest first in [`Backend::history`].
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HistoryEntry {
    pub version: String,
    pub at: String,
    pub who: String,
    pub command: String,
    /// The current version.
    pub latest: bool,
    /// A deletion (`down` removed the state), not a state.
    pub deleted: bool,
}

/// What opening a backend needs besides the location.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Accept an S3 bucket without versioning (no history, no recovery of an overwritten state).
    pub allow_unversioned: bool,
    /// The environment's primary region: a state bucket there is warned about.
    pub primary_region: Option<String>,
}

/// A state store: a directory or an S3 prefix.
#[derive(Debug)]
pub enum Backend {
    Dir(dir::DirBackend),
    S3(s3::S3Backend),
}

/// How often a held S3 lock is refreshed; a lock silent for [`STALE_AFTER_BEATS`] beats is stale.
pub fn heartbeat_interval() -> std::time::Duration {
    let secs = std::env::var("PGDR_LOCK_HEARTBEAT_SECONDS").ok().and_then(|s| s.parse::<u64>().ok()).filter(|s| *s > 0).unwrap_or(60);
    std::time::Duration::from_secs(secs)
}
pub const STALE_AFTER_BEATS: u64 = 5;

impl Backend {
    /// Opens the backend at `loc`. A directory needs nothing; S3 needs credentials, a bucket
    /// that exists (its region looked up) and, unless allowed, versioning.
    pub async fn open(loc: &Location, conn: &Connection, opts: &OpenOptions) -> Result<Arc<Backend>> {
        Ok(Arc::new(match loc {
            Location::Dir(d) => Backend::Dir(dir::DirBackend::new(d)),
            Location::S3(u) => Backend::S3(s3::S3Backend::open(u, conn, opts).await?),
        }))
    }

    /// A directory backend (tests, and the default).
    pub fn dir(d: &Path) -> Arc<Backend> {
        Arc::new(Backend::Dir(dir::DirBackend::new(d)))
    }

    pub fn location(&self) -> Location {
        match self {
            Backend::Dir(d) => Location::Dir(d.dir.clone()),
            Backend::S3(s) => Location::S3(s.url.clone()),
        }
    }

    /// Where `env`'s state lives, for messages.
    pub fn state_name(&self, env: &str) -> String {
        match self {
            Backend::Dir(d) => d.state_path(env).display().to_string(),
            Backend::S3(s) => format!("s3://{}/{}", s.url.bucket, s.url.key(&format!("{env}.json"))),
        }
    }

    /// Reads `env`'s state; `None` when there is none. A corrupt or newer state is a user error.
    pub async fn read(&self, env: &str) -> Result<Option<Loaded>> {
        match self {
            Backend::Dir(d) => d.read(env),
            Backend::S3(s) => s.read(env).await,
        }
    }

    /// Writes `state` if the stored version is still `expected` (`None`: there must be none).
    /// Blocking (the store saves from synchronous code); see [`crate::state::Store`].
    pub fn save(&self, state: &State, expected: Option<&Version>, run: &RunInfo, seq: u64) -> Result<Version, SaveError> {
        match self {
            Backend::Dir(d) => d.save(state, expected),
            Backend::S3(s) => s.save_blocking(state, expected, run, seq),
        }
    }

    /// Removes `env`'s state after `down` removed everything (the previous versions stay:
    /// `.bak` in a directory, the bucket's versions in S3).
    pub fn retire(&self, env: &str, expected: Option<&Version>) -> Result<(), SaveError> {
        match self {
            Backend::Dir(d) => d.retire(env),
            Backend::S3(s) => s.retire_blocking(env, expected),
        }
    }

    /// Takes `env`'s lock, or says who holds it (exit 1).
    pub async fn lock(&self, env: &str, run: &RunInfo) -> Result<Lock> {
        match self {
            Backend::Dir(d) => d.lock(env, run),
            Backend::S3(s) => s.lock(env, run).await,
        }
    }

    pub async fn read_lock(&self, env: &str) -> Result<Option<LockInfo>> {
        match self {
            Backend::Dir(d) => Ok(d.read_lock(env)),
            Backend::S3(s) => Ok(s.read_lock(env).await?.map(|(i, _)| i)),
        }
    }

    /// Removes `env`'s lock once `confirm` accepts its holder; `None` when there was none.
    pub async fn unlock(&self, env: &str, confirm: &dyn Fn(&LockInfo) -> Result<()>) -> Result<Option<LockInfo>> {
        match self {
            Backend::Dir(d) => d.unlock(env, confirm),
            Backend::S3(s) => s.unlock(env, confirm).await,
        }
    }

    /// The environments with a state here.
    pub async fn envs(&self) -> Result<Vec<String>> {
        let mut names = match self {
            Backend::Dir(d) => d.envs()?,
            Backend::S3(s) => s.envs().await?,
        };
        names.retain(|n| crate::config::validate_env_name(n).is_ok());
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// The versions of `env`'s state, newest first (at most `limit`).
    pub async fn history(&self, env: &str, limit: usize) -> Result<Vec<HistoryEntry>> {
        match self {
            Backend::Dir(d) => d.history(env),
            Backend::S3(s) => s.history(env, limit).await,
        }
    }

    /// One version of `env`'s state, as [`Backend::history`] names it.
    pub async fn read_version(&self, env: &str, version: &str) -> Result<State> {
        match self {
            Backend::Dir(d) => d.read_version(env, version),
            Backend::S3(s) => s.read_version(env, version).await,
        }
    }

    /// Moves `env`'s state aside under `<env>.json.<suffix>` (kept, never deleted).
    pub async fn set_aside(&self, env: &str, suffix: &str, expected: &Version) -> Result<String> {
        match self {
            Backend::Dir(d) => d.set_aside(env, suffix),
            Backend::S3(s) => s.set_aside(env, suffix, expected).await,
        }
    }
}

/// Why a state write did not happen.
#[derive(Debug)]
pub enum SaveError {
    /// The stored state changed since this run read or wrote it: nothing was overwritten.
    Conflict {
        found: String,
    },
    Failed(Error),
}

impl From<Error> for SaveError {
    fn from(e: Error) -> Self {
        SaveError::Failed(e)
    }
}

/// An acquired lock; released when dropped, only while it is still ours.
#[derive(Debug)]
pub struct Lock {
    info: LockInfo,
    held: Held,
}

#[derive(Debug)]
enum Held {
    Dir(dir::DirLock),
    S3(s3::S3Lock),
}

impl Lock {
    pub fn info(&self) -> &LockInfo {
        &self.info
    }
    /// The lock was taken over while held (a forced unlock): this run no longer owns it.
    pub fn lost(&self) -> bool {
        match &self.held {
            Held::Dir(_) => false,
            Held::S3(l) => l.lost(),
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        match &mut self.held {
            Held::Dir(l) => l.release(),
            Held::S3(l) => l.release_blocking(),
        }
        release_registration(&self.info.run_id);
    }
}

/// The lock this process holds, so that a forced exit (second Ctrl-C) can still release it.
static HELD: std::sync::Mutex<Vec<(String, Releaser)>> = std::sync::Mutex::new(Vec::new());

type Releaser = Box<dyn Fn() + Send>;

fn register(run_id: &str, release: Releaser) {
    HELD.lock().unwrap_or_else(|p| p.into_inner()).push((run_id.to_owned(), release));
}

fn release_registration(run_id: &str) {
    HELD.lock().unwrap_or_else(|p| p.into_inner()).retain(|(r, _)| r != run_id);
}

/// Releases every lock this process holds (for exits that skip destructors).
pub fn release_held_locks() {
    let held = std::mem::take(&mut *HELD.lock().unwrap_or_else(|p| p.into_inner()));
    for (_, release) in held {
        release();
    }
}

/// The name of this process's user, from the password database.
fn user_name() -> String {
    // SAFETY: getpwuid returns a pointer into static storage (or null); the name is copied out at
    // once, before any other call could overwrite it.
    unsafe {
        let pw = libc::getpwuid(libc::getuid());
        if pw.is_null() || (*pw).pw_name.is_null() {
            return format!("uid {}", libc::getuid());
        }
        std::ffi::CStr::from_ptr((*pw).pw_name).to_string_lossy().into_owned()
    }
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

/// The message of a lock held by someone else: the holder, and how to tell whether it is stale.
fn held_error(env: &str, holder: Option<&LockInfo>, stale_hint: Option<String>) -> Error {
    match (holder, stale_hint) {
        (Some(h), Some(stale)) => Error::user(format!(
            "environment {env} is locked by {} and the lock looks stale ({stale}); if no pgdr is running, clear it with `pgdr unlock --env {env}`",
            h.holder()
        )),
        (Some(h), None) => Error::user(format!("environment {env} is locked by {}; wait for that run to finish", h.holder())),
        (None, _) => Error::user(format!(
            "environment {env} is locked (the lock is unreadable); if no pgdr is running, run `pgdr unlock --env {env}`"
        )),
    }
}

/// Where a run keeps its state when it cannot save it (a lost race, a store that does not
/// answer): `.pgdr-recovery/<env>-<run id>.json`, one file per run, replaced atomically, 0600.
pub fn recovery_path(state: &State, run: &RunInfo) -> PathBuf {
    PathBuf::from(".pgdr-recovery").join(format!("{}-{}.json", state.env, run.run_id))
}

/// Keeps `state` at [`recovery_path`], so nothing the run knew is lost.
pub fn save_recovery(state: &State, run: &RunInfo) -> Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = recovery_path(state, run);
    let dir = path.parent().unwrap_or(Path::new("."));
    let io = |e: std::io::Error| Error::Other(format!("cannot write {}: {e}", path.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let text = serde_json::to_vec_pretty(state).map_err(|e| Error::Other(format!("internal: state does not serialize: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
    f.write_all(&text).and_then(|_| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_or_say_why_not() {
        assert_eq!(Location::parse(".pgdr").unwrap(), Location::Dir(PathBuf::from(".pgdr")));
        assert_eq!(
            Location::parse("s3://team-state/pgdr/").unwrap(),
            Location::S3(S3Url { bucket: "team-state".into(), prefix: "pgdr".into() })
        );
        assert_eq!(Location::parse("s3://team-state").unwrap(), Location::S3(S3Url { bucket: "team-state".into(), prefix: String::new() }));
        for bad in [
            "s3://",
            "s3:/team-state",
            "s3:team-state",
            "s3://Team_State/x",
            "s3://ab",
            "s3://a..b/x",
            "s3://-ab/x",
            "gs://bucket/x",
            "s3://bucket/a//b",
            "s3://bucket/../x",
            "",
        ] {
            let e = Location::parse(bad).unwrap_err();
            assert!(matches!(e, Error::User(_)), "{bad}: {e}");
            assert!(!e.to_string().contains('\n'), "{bad}: one line");
        }
        let u = S3Url { bucket: "b".into(), prefix: "p/q".into() };
        assert_eq!(u.key("dev.json"), "p/q/dev.json");
        assert_eq!(S3Url { bucket: "b".into(), prefix: String::new() }.key("dev.lock"), "dev.lock");
    }

    #[test]
    fn a_lock_without_heartbeat_ages_from_its_start() {
        let run = RunInfo::this_process("pgdr up");
        let mut info = LockInfo::new(&run);
        assert!(info.silent_for().is_some_and(|s| s < 5));
        info.heartbeat = None;
        info.since = "2020-01-01T00:00:00Z".into();
        assert!(info.silent_for().is_some_and(|s| s > 86_400));
        assert_ne!(RunInfo::this_process("x").run_id, run.run_id);
    }
}
