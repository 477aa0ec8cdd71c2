//! The directory backend: `<dir>/<env>.json` written atomically (temp file, fsync, rename; the
//! previous version kept as `<env>.json.bak`), mode 0600; `<dir>/<env>.lock` created with
//! `O_EXCL`. A state write first checks that the file is still the one this run read or wrote.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{held_error, Held, HistoryEntry, Loaded, Lock, LockInfo, RunInfo, SaveError, Version};
use crate::error::{Error, Result};
use crate::state::{self, State};

#[derive(Debug)]
pub struct DirBackend {
    pub dir: PathBuf,
}

/// The version of a file's content (FNV-1a): what this run read or wrote.
fn version_of(bytes: &[u8]) -> Version {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Version(format!("{h:016x}-{}", bytes.len()))
}

impl DirBackend {
    pub fn new(dir: &Path) -> DirBackend {
        DirBackend { dir: dir.to_owned() }
    }

    pub fn state_path(&self, env: &str) -> PathBuf {
        self.dir.join(format!("{env}.json"))
    }

    fn bak_path(&self, env: &str) -> PathBuf {
        self.dir.join(format!("{env}.json.bak"))
    }

    fn lock_path(&self, env: &str) -> PathBuf {
        self.dir.join(format!("{env}.lock"))
    }

    fn read_bytes(&self, path: &Path) -> Result<Option<Vec<u8>>> {
        match fs::read(path) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::user(format!("cannot read state file {}: {e}; check its permissions", path.display()))),
        }
    }

    pub fn read(&self, env: &str) -> Result<Option<Loaded>> {
        let path = self.state_path(env);
        let Some(bytes) = self.read_bytes(&path)? else { return Ok(None) };
        let fix = format!("restore {}.bak or move the file aside and run `pgdr adopt --env {env}`", path.display());
        let state = state::decode(&bytes, env, &format!("state file {}", path.display()), &fix)?;
        Ok(Some(Loaded { state, version: version_of(&bytes) }))
    }

    fn ensure_dir(&self) -> Result<()> {
        if !self.dir.exists() {
            fs::create_dir_all(&self.dir).map_err(|e| {
                Error::user(format!("cannot create state directory {}: {e}; choose another with --state", self.dir.display()))
            })?;
            let _ = fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700));
        }
        Ok(())
    }

    pub fn save(&self, state: &State, expected: Option<&Version>) -> Result<Version, SaveError> {
        self.ensure_dir()?;
        let path = self.state_path(&state.env);
        let found = self.read_bytes(&path)?;
        let found_version = found.as_deref().map(version_of);
        if found_version.as_ref() != expected {
            let found = match found_version {
                Some(_) => format!("{} was changed by another run", path.display()),
                None => format!("{} was removed by another run", path.display()),
            };
            return Err(SaveError::Conflict { found });
        }
        let mut text = serde_json::to_vec_pretty(state).map_err(|e| Error::Other(format!("internal: state does not serialize: {e}")))?;
        text.push(b'\n');
        self.write_atomic(&state.env, &text)?;
        Ok(version_of(&text))
    }

    /// Temp file, fsync, keep the old file as `.bak`, rename, fsync the directory.
    fn write_atomic(&self, env: &str, text: &[u8]) -> Result<()> {
        let path = self.state_path(env);
        let tmp = self.dir.join(format!(".{env}.json.tmp"));
        let bak_tmp = self.dir.join(format!(".{env}.json.bak.tmp"));
        let dir = &self.dir;
        let io = |what: &str, e: std::io::Error| {
            Error::Other(format!("cannot {what} in {}: {e}; the previous state file is intact", dir.display()))
        };
        {
            let _ = fs::remove_file(&tmp);
            let mut f =
                OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(|e| io("write the state file", e))?;
            f.write_all(text).map_err(|e| io("write the state file", e))?;
            f.sync_all().map_err(|e| io("sync the state file", e))?;
        }
        if path.exists() {
            // Keep the previous version; a hard link and a rename keep `<env>.json` in place throughout.
            let _ = fs::remove_file(&bak_tmp);
            if fs::hard_link(&path, &bak_tmp).is_ok() {
                fs::rename(&bak_tmp, self.bak_path(env)).map_err(|e| io("keep the state backup", e))?;
            }
        }
        fs::rename(&tmp, &path).map_err(|e| io("replace the state file", e))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    pub fn retire(&self, env: &str) -> Result<(), SaveError> {
        let path = self.state_path(env);
        if path.exists() {
            fs::rename(&path, self.bak_path(env)).map_err(|e| Error::Other(format!("cannot remove {}: {e}", path.display())))?;
        }
        Ok(())
    }

    pub fn read_lock(&self, env: &str) -> Option<LockInfo> {
        let text = fs::read(self.lock_path(env)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn lock(&self, env: &str, run: &RunInfo) -> Result<Lock> {
        self.ensure_dir()?;
        let path = self.lock_path(env);
        let info = LockInfo::new(run);
        match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
            Ok(mut f) => {
                let text = serde_json::to_vec(&info).map_err(|e| Error::Other(e.to_string()))?;
                f.write_all(&text)?;
                f.sync_all()?;
                let (p, pid) = (path.clone(), info.pid);
                super::register(&info.run_id, Box::new(move || release_file(&p, pid)));
                Ok(Lock { info, held: Held::Dir(DirLock { path }) })
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder = self.read_lock(env);
                let stale = holder
                    .as_ref()
                    .filter(|h| h.host == super::hostname() && !pid_alive(h.pid))
                    .map(|h| format!("pid {} on this host is gone", h.pid));
                Err(held_error(env, holder.as_ref(), stale))
            }
            Err(e) => Err(Error::user(format!("cannot create lock file {}: {e}; check the state directory's permissions", path.display()))),
        }
    }

    /// Removes the lock once confirmed; refused while its process is alive on this host.
    pub fn unlock(&self, env: &str, confirm: &dyn Fn(&LockInfo) -> Result<()>) -> Result<Option<LockInfo>> {
        let path = self.lock_path(env);
        if !path.exists() {
            return Ok(None);
        }
        let info = self.read_lock(env);
        match &info {
            Some(h) if h.host == super::hostname() && pid_alive(h.pid) && h.pid != std::process::id() => {
                return Err(Error::user(format!(
                    "environment {env} is locked by a running process (pid {}, `{}`); stop it first",
                    h.pid, h.command
                )));
            }
            Some(h) => confirm(h)?,
            None => {}
        }
        fs::remove_file(&path).map_err(|e| Error::user(format!("cannot remove {}: {e}", path.display())))?;
        Ok(info)
    }

    pub fn envs(&self) -> Result<Vec<String>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::user(format!("cannot read state directory {}: {e}", self.dir.display()))),
        };
        Ok(entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).map(str::to_owned))
            .collect())
    }

    /// A directory keeps two versions: `current` and `bak`.
    pub fn history(&self, env: &str) -> Result<Vec<HistoryEntry>> {
        let mut out = Vec::new();
        for (version, path) in [("current", self.state_path(env)), ("bak", self.bak_path(env))] {
            let Some(bytes) = self.read_bytes(&path)? else { continue };
            let at = serde_json::from_slice::<State>(&bytes).map(|s| s.updated_at).unwrap_or_default();
            out.push(HistoryEntry {
                version: version.into(),
                at,
                who: String::new(),
                command: String::new(),
                latest: version == "current",
                deleted: false,
            });
        }
        Ok(out)
    }

    pub fn read_version(&self, env: &str, version: &str) -> Result<State> {
        let path = match version {
            "current" => self.state_path(env),
            "bak" => self.bak_path(env),
            other => {
                return Err(Error::user(format!(
                    "{other:?} is not a version of a state directory: use `current` or `bak` (see `pgdr state history --env {env}`)"
                )))
            }
        };
        let bytes = self.read_bytes(&path)?.ok_or_else(|| Error::user(format!("{} does not exist", path.display())))?;
        state::decode(&bytes, env, &format!("state file {}", path.display()), "choose another version")
    }

    pub fn set_aside(&self, env: &str, suffix: &str) -> Result<String> {
        let from = self.state_path(env);
        let to = self.dir.join(format!("{env}.json.{suffix}"));
        fs::rename(&from, &to).map_err(|e| Error::Other(format!("cannot rename {} to {}: {e}", from.display(), to.display())))?;
        Ok(to.display().to_string())
    }
}

/// A lock file this process created.
#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
}

impl DirLock {
    pub fn release(&mut self) {
        release_file(&self.path, std::process::id());
    }
}

/// Removes a lock file only if it is still this process's.
fn release_file(path: &Path, pid: u32) {
    let ours = fs::read(path)
        .ok()
        .and_then(|t| serde_json::from_slice::<LockInfo>(&t).ok())
        .is_some_and(|h| h.pid == pid && h.host == super::hostname());
    if ours {
        let _ = fs::remove_file(path);
    }
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Key, Resource, Status};

    fn state_with(n: usize) -> State {
        let mut s = State { schema: state::SCHEMA, env: "dev".into(), ..Default::default() };
        for i in 0..n {
            s.resources.insert(
                Key::new("network", "us-east-1", &format!("vpc{i}")),
                Resource::new("vpc", "us-east-1", format!("vpc-{i}"), Status::Created),
            );
        }
        s
    }

    #[test]
    fn atomic_write_keeps_backup_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let b = DirBackend::new(dir.path());
        let v1 = b.save(&state_with(1), None).unwrap();
        b.save(&state_with(2), Some(&v1)).unwrap();
        let mode = fs::metadata(b.state_path("dev")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(b.read("dev").unwrap().unwrap().state.resources.len(), 2);
        assert_eq!(b.read_version("dev", "bak").unwrap().resources.len(), 1);
        assert_eq!(b.history("dev").unwrap().len(), 2);
    }

    #[test]
    fn a_write_that_lost_a_race_overwrites_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let b = DirBackend::new(dir.path());
        let v1 = b.save(&state_with(1), None).unwrap();
        let other = b.save(&state_with(3), Some(&v1)).unwrap();
        let e = b.save(&state_with(2), Some(&v1)).unwrap_err();
        assert!(matches!(e, SaveError::Conflict { .. }), "{e:?}");
        assert_eq!(b.read("dev").unwrap().unwrap().version, other);
        // Creating over an existing state is a conflict too.
        assert!(matches!(b.save(&state_with(2), None), Err(SaveError::Conflict { .. })));
    }

    #[test]
    fn corrupt_and_newer_files_are_user_errors() {
        let dir = tempfile::tempdir().unwrap();
        let b = DirBackend::new(dir.path());
        let path = b.state_path("dev");
        fs::write(&path, b"{\"schema\": 1, \"env\": \"dev\", \"resour").unwrap();
        let e = b.read("dev").unwrap_err();
        assert!(matches!(e, Error::User(_)) && e.to_string().contains("corrupt"), "{e}");
        fs::write(&path, b"{\"schema\": 99, \"env\": \"dev\"}").unwrap();
        let e = b.read("dev").unwrap_err();
        assert!(e.to_string().contains("newer"), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"{\"schema\": 99, \"env\": \"dev\"}");
    }

    #[test]
    fn lock_is_exclusive_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let b = DirBackend::new(dir.path());
        let lock = b.lock("dev", &RunInfo::this_process("pgdr up")).unwrap();
        let e = b.lock("dev", &RunInfo::this_process("pgdr down")).unwrap_err();
        assert!(e.to_string().contains("locked by"), "{e}");
        assert!(e.to_string().contains("pgdr up"), "{e}");
        drop(lock);
        assert!(b.lock("dev", &RunInfo::this_process("pgdr down")).is_ok());
    }

    #[test]
    fn stale_lock_is_named_not_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let b = DirBackend::new(dir.path());
        let mut info = LockInfo::new(&RunInfo::this_process("pgdr up"));
        info.pid = 99_999_999;
        fs::write(b.lock_path("dev"), serde_json::to_vec(&info).unwrap()).unwrap();
        let e = b.lock("dev", &RunInfo::this_process("pgdr up")).unwrap_err();
        assert!(e.to_string().contains("stale") && e.to_string().contains("pgdr unlock"), "{e}");
        assert!(b.lock_path("dev").exists());
        let refused = b.unlock("dev", &|_| Err(Error::user("not confirmed")));
        assert!(refused.is_err() && b.lock_path("dev").exists(), "a declined unlock keeps the lock");
        assert_eq!(b.unlock("dev", &|_| Ok(())).unwrap().map(|h| h.pid), Some(99_999_999));
        assert!(!b.lock_path("dev").exists());
    }

    #[test]
    fn a_live_local_holder_is_never_unlocked() {
        let dir = tempfile::tempdir().unwrap();
        let b = DirBackend::new(dir.path());
        let mut info = LockInfo::new(&RunInfo::this_process("pgdr up"));
        info.pid = 1; // init: alive
        fs::write(b.lock_path("dev"), serde_json::to_vec(&info).unwrap()).unwrap();
        assert!(b.unlock("dev", &|_| Ok(())).is_err());
        assert!(b.lock_path("dev").exists());
    }
}
