//! The local state file: one JSON document per environment, listing every resource pgdr
//! created or adopted, so that `down` can reverse them.
//!
//! Saved after every change through a [`crate::backend::Backend`] (a directory or S3), each save
//! a compare-and-swap. It never holds a secret: only IDs, names and settings.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Loaded, RunInfo, SaveError, Version};
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
    /// The last drills' reports (newest last, at most [`DRILLS_KEPT`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drills: Vec<serde_json::Value>,
}

/// How many drill reports the state keeps.
pub const DRILLS_KEPT: usize = 10;

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
    /// A planned switchover under way: what a rerun must finish or undo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover: Option<SwitchoverMark>,
}

/// Where a switchover stands, written before each irreversible or fencing call.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SwitchoverMark {
    pub started_at: String,
    pub from_region: String,
    pub to_region: String,
    pub phase: SwitchoverPhase,
    /// The login roles the fence makes read-only, with their settings before.
    #[serde(default)]
    pub guarded: Vec<crate::agent::GuardedRole>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SwitchoverPhase {
    /// The primary may be fenced; nothing is promoted: a rerun unfences it first.
    Fencing,
    /// The promotion was asked for: a rerun finishes the switchover.
    Promoting,
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

/// Decodes a state document. A corrupt or newer one is a user error naming `origin` and `fix`;
/// nothing is changed.
pub fn decode(bytes: &[u8], env: &str, origin: &str, fix: &str) -> Result<State> {
    #[derive(Deserialize)]
    struct Probe {
        schema: Option<u32>,
    }
    let corrupt = |why: String| Error::user(format!("{origin} is corrupt ({why}); {fix}"));
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| corrupt(crate::error::one_line(&e.to_string())))?;
    match probe.schema {
        Some(s) if s > SCHEMA => {
            return Err(Error::user(format!("{origin} has schema {s}, newer than this pgdr understands ({SCHEMA}); upgrade pgdr")))
        }
        None => return Err(corrupt("no schema field".into())),
        _ => {}
    }
    let state: State = serde_json::from_slice(bytes).map_err(|e| corrupt(crate::error::one_line(&e.to_string())))?;
    if state.env != env {
        return Err(corrupt(format!("it belongs to environment {:?}", state.env)));
    }
    Ok(state)
}

thread_local! {
    /// Set while [`Store::update`]'s closure runs on this thread.
    static IN_UPDATE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Clears [`IN_UPDATE`], also when the closure panics.
struct ResetOnDrop;

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        IN_UPDATE.set(false);
    }
}

/// The live state of one run: in memory, saved through its backend after every change unless
/// the mode does not save (plan, status).
///
/// Every save is a compare-and-swap on the version last read or written. A save that lost the
/// race (another run wrote: a forced unlock) writes nothing, keeps this run's state in
/// `.pgdr-recovery/`, and poisons the store: every later change fails the same way, so the run
/// stops instead of working on a state it can no longer save.
pub struct Store {
    backend: Arc<Backend>,
    state: Mutex<State>,
    persist: bool,
    saved: Mutex<Saved>,
    run: RunInfo,
}

#[derive(Default)]
struct Saved {
    version: Option<Version>,
    seq: u64,
    conflict: Option<String>,
    /// A save failed (no answer, refused): the state is kept in the run's recovery file until a
    /// save succeeds.
    unsaved: bool,
}

impl Store {
    /// The store of a run in `mode`: saved after every change only when the mode saves state.
    pub fn new(backend: Arc<Backend>, env: &str, existing: Option<Loaded>, mode: crate::exec::Mode, run: RunInfo) -> Store {
        let (state, version) = match existing {
            Some(l) => (l.state, Some(l.version)),
            None => (State { schema: SCHEMA, env: env.to_owned(), ..Default::default() }, None),
        };
        Store {
            backend,
            state: Mutex::new(state),
            persist: mode.saves_state(),
            saved: Mutex::new(Saved { version, ..Default::default() }),
            run,
        }
    }

    /// A store on a local directory (tests).
    pub fn local(dir: &Path, env: &str, mode: crate::exec::Mode) -> Store {
        Store::new(Backend::dir(dir), env, None, mode, RunInfo::this_process("test"))
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// The run this store writes for.
    pub fn run(&self) -> &RunInfo {
        &self.run
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut g = self.lock_state();
        f(&mut g)
    }

    /// The state lock. Taking it again inside [`Store::update`]'s closure, on the same thread,
    /// would wait forever: that bug panics here, naming itself, instead of hanging a run.
    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        assert!(!IN_UPDATE.get(), "internal error: the state was read inside Store::update's closure (compute it before)");
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
        let mut g = self.lock_state();
        let before = g.clone();
        IN_UPDATE.set(true);
        let reset = ResetOnDrop;
        f(&mut g);
        drop(reset);
        if *g == before || !self.persist {
            return Ok(());
        }
        g.updated_at = now_rfc3339();
        // Saved under the state lock: writes leave in the order the changes were made.
        let mut saved = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = &saved.conflict {
            return Err(Error::failed(c.clone()));
        }
        saved.seq += 1;
        match self.backend.save(&g, saved.version.as_ref(), &self.run, saved.seq) {
            Ok(v) => {
                saved.version = Some(v);
                if std::mem::take(&mut saved.unsaved) {
                    let _ = std::fs::remove_file(crate::backend::recovery_path(&g, &self.run));
                }
                Ok(())
            }
            Err(SaveError::Conflict { found }) => {
                let msg = self.lost_race(&g, &found);
                saved.conflict = Some(msg.clone());
                Err(Error::failed(msg))
            }
            Err(SaveError::Failed(e)) => {
                // What this run created must not be lost with the write: kept locally until a
                // later save succeeds (the error itself is the step's, with its AWS code).
                let first = !std::mem::replace(&mut saved.unsaved, true);
                match crate::backend::save_recovery(&g, &self.run) {
                    Ok(p) if first => tracing::warn!(
                        "the state of {} could not be saved at {}; this run's state is kept in {} until a save succeeds",
                        g.env,
                        self.backend.state_name(&g.env),
                        p.display()
                    ),
                    Ok(_) => {}
                    Err(k) => tracing::warn!("the state could not be saved, nor kept locally: {k}"),
                }
                Err(e)
            }
        }
    }

    /// The message of a lost compare-and-swap, after keeping this run's state locally.
    fn lost_race(&self, state: &State, found: &str) -> String {
        let env = &state.env;
        let kept = match crate::backend::save_recovery(state, &self.run) {
            Ok(p) => format!("this run's state is kept in {}", p.display()),
            Err(e) => format!("this run's state could not be kept locally ({e})"),
        };
        format!(
            "state write refused (compare-and-swap): {found} since this run read it, so nothing was overwritten; {kept}; reconcile: check `pgdr state history --env {env}`, then `pgdr adopt --env {env}` rebuilds the state from AWS"
        )
    }

    /// Removes the state (after `down` removed everything); the previous versions stay.
    pub fn delete_file(&self) -> Result<()> {
        if !self.persist {
            return Ok(());
        }
        let env = self.with(|s| s.env.clone());
        let saved = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        match self.backend.retire(&env, saved.version.as_ref()) {
            Ok(()) => Ok(()),
            Err(SaveError::Conflict { found }) => {
                Err(Error::failed(format!("state not removed: {found}; check `pgdr state history --env {env}`")))
            }
            Err(SaveError::Failed(e)) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_is_saved_and_a_lost_race_poisons_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::local(dir.path(), "dev", crate::exec::Mode::Apply);
        store.put(&Key::new("network", "us-east-1", "vpc"), Resource::new("vpc", "us-east-1", "vpc-1", Status::Created)).unwrap();
        let backend = store.backend().clone();
        let read = |b: &Backend| futures::executor::block_on(b.read("dev")).unwrap().unwrap();
        assert_eq!(read(&backend).state.resources.len(), 1);
        // Another run writes in between.
        let mut other = read(&backend);
        other.state.topology.writer_region = "eu-west-1".into();
        backend.save(&other.state, Some(&other.version), &RunInfo::this_process("other"), 1).unwrap();
        let e =
            store.put(&Key::new("network", "eu-west-1", "vpc"), Resource::new("vpc", "eu-west-1", "vpc-2", Status::Created)).unwrap_err();
        assert!(e.to_string().contains("compare-and-swap") && e.to_string().contains("pgdr adopt"), "{e}");
        assert_eq!(read(&backend).state.topology.writer_region, "eu-west-1", "the other run's state is intact");
        assert!(store.set_attr(&Key::new("network", "us-east-1", "vpc"), Attr::Arn, "x").is_err(), "poisoned");
        let kept = crate::backend::recovery_path(&store.snapshot(), store.run());
        assert!(kept.exists(), "this run's state is kept");
        let _ = std::fs::remove_file(kept);
    }

    #[test]
    fn a_failed_save_keeps_the_state_locally_until_a_save_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, b"x").unwrap();
        let store = Store::new(Backend::dir(&blocker.join("state")), "dev", None, crate::exec::Mode::Apply, RunInfo::this_process("test"));
        let vpc = Key::new("network", "us-east-1", "vpc");
        assert!(store.put(&vpc, Resource::new("vpc", "us-east-1", "vpc-1", Status::Created)).is_err());
        let kept = crate::backend::recovery_path(&store.snapshot(), store.run());
        let recovered: State = serde_json::from_slice(&std::fs::read(&kept).unwrap()).unwrap();
        assert_eq!(recovered.resources[&vpc].id.as_deref(), Some("vpc-1"), "the created VPC is not lost");
        std::fs::remove_file(&blocker).unwrap();
        store.set_attr(&vpc, Attr::Arn, "arn:vpc-1").unwrap();
        assert!(!kept.exists(), "saved: the recovery copy is gone");
        let saved = futures::executor::block_on(store.backend().read("dev")).unwrap().unwrap();
        assert_eq!(saved.state.resources[&vpc].attr(Attr::Arn), Some("arn:vpc-1"));
    }

    #[test]
    fn reading_the_store_inside_an_update_panics_instead_of_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::local(dir.path(), "dev", crate::exec::Mode::Apply);
        let vpc = Key::new("network", "us-east-1", "vpc");
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = store.update(|s| s.topology.writer_region = store.id(&vpc).unwrap_or_default());
        }));
        let payload = caught.expect_err("a read inside update must not pass");
        let message =
            payload.downcast_ref::<&str>().map(|m| m.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_default();
        assert!(message.contains("inside Store::update"), "{message}");
        // The flag was cleared: the store works on.
        store.update(|s| s.topology.writer_region = "eu-west-1".into()).unwrap();
        assert_eq!(store.snapshot().topology.writer_region, "eu-west-1");
    }

    #[test]
    fn a_read_only_store_never_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::local(dir.path(), "dev", crate::exec::Mode::Plan);
        store.put(&Key::new("network", "us-east-1", "vpc"), Resource::new("vpc", "us-east-1", "vpc-1", Status::Created)).unwrap();
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }
}
