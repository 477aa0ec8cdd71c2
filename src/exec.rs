//! The plan executor: steps declare their dependencies; independent steps run concurrently,
//! a failed step's dependents are skipped while independent branches finish, and `down`
//! walks the same graph in reverse.
//!
//! Steps run as futures on one task (I/O-bound AWS calls), so nothing here needs `Send`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::LocalBoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;

use crate::error::{Error, Exit};

/// What a step did, or (in plan mode) would do, to one resource.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Adopt,
    Change,
    Delete,
    Keep,
    /// Already absent (for `down`).
    Absent,
}

impl Action {
    pub fn mutates(self) -> bool {
        matches!(self, Action::Create | Action::Change | Action::Delete)
    }
    pub fn symbol(self) -> &'static str {
        match self {
            Action::Create => "+",
            Action::Adopt => "&",
            Action::Change => "~",
            Action::Delete => "-",
            Action::Keep | Action::Absent => "=",
        }
    }
}

/// What a run may do: the one place that says whether AWS may change and state is saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Say what would change; change nothing, save nothing.
    Plan,
    /// Change AWS and record every change in state.
    Apply,
    /// Change nothing in AWS; record what is found in state.
    Adopt,
    /// Change nothing, save nothing: report what is there.
    Status,
}

impl Mode {
    /// Whether this run may send a call that changes AWS.
    pub fn changes_aws(self) -> bool {
        self == Mode::Apply
    }
    /// Whether what this run finds or makes is saved to the state file.
    pub fn saves_state(self) -> bool {
        matches!(self, Mode::Apply | Mode::Adopt)
    }
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Change {
    pub action: Action,
    pub kind: String,
    pub name: String,
    pub region: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Change {
    pub fn new(action: Action, kind: &str, name: &str, region: &str) -> Change {
        Change { action, kind: kind.into(), name: name.into(), region: region.into(), id: None, detail: None }
    }
    pub fn id(mut self, id: impl Into<String>) -> Change {
        self.id = Some(id.into());
        self
    }
    pub fn maybe_id(mut self, id: Option<&str>) -> Change {
        self.id = id.map(Into::into);
        self
    }
    pub fn detail(mut self, detail: impl Into<String>) -> Change {
        self.detail = Some(detail.into());
        self
    }
    pub fn maybe_detail(mut self, detail: Option<String>) -> Change {
        self.detail = detail;
        self
    }
}

/// Progress events; the CLI renders them on stderr. Library code never prints.
pub trait Progress {
    fn started(&self, _step: &str) {}
    fn status(&self, _step: &str, _msg: &str) {}
    fn finished(&self, _step: &str, _report: &StepReport) {}
}

pub struct NoProgress;
impl Progress for NoProgress {}

/// Set by the first Ctrl-C: no new step starts; running steps stop at their next wait.
#[derive(Clone, Default, Debug)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    pub fn check(&self) -> Result<(), Error> {
        if self.is_cancelled() {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// Handed to a running step: it records changes and reports progress through it.
pub struct Recorder<'a> {
    pub step: String,
    pub mode: Mode,
    changes: Mutex<Vec<Change>>,
    progress: &'a dyn Progress,
    pub cancel: Cancel,
}

impl<'a> Recorder<'a> {
    pub fn new(step: &str, mode: Mode, progress: &'a dyn Progress, cancel: Cancel) -> Self {
        Recorder { step: step.to_owned(), mode, changes: Mutex::new(Vec::new()), progress, cancel }
    }

    /// Whether this run only looks (plan, adopt, status): writes are recorded, not sent.
    pub fn planning(&self) -> bool {
        !self.mode.changes_aws()
    }

    /// Records what a step found or decided without changing AWS (keep, adopt, absent).
    pub fn record(&self, c: Change) {
        tracing::debug!(step = %self.step, action = ?c.action, kind = %c.kind, name = %c.name, region = %c.region, id = ?c.id, "change");
        self.changes.lock().unwrap_or_else(|p| p.into_inner()).push(c);
    }

    /// The effect boundary: the one way a step changes AWS. `write` runs only when the mode
    /// changes AWS (it may complete the change, e.g. with the new ID); the change is recorded
    /// either way. Returns `None` when the write was not performed.
    ///
    /// The clients back this up: in a mode that does not change AWS they refuse every call that
    /// is not a read before it is sent ([`crate::reads::WatchChanges`]).
    pub async fn apply<T>(&self, change: Change, write: impl AsyncFnOnce(&mut Change) -> Result<T, Error>) -> Result<Option<T>, Error> {
        self.apply_part(Some(change), write).await
    }

    /// As [`Recorder::apply`]; with `None`, the write is part of a change recorded already (a
    /// new role's policy is part of creating the role) and records nothing of its own.
    pub async fn apply_part<T>(
        &self,
        change: Option<Change>,
        write: impl AsyncFnOnce(&mut Change) -> Result<T, Error>,
    ) -> Result<Option<T>, Error> {
        if self.planning() {
            if let Some(c) = change {
                self.record(c);
            }
            return Ok(None);
        }
        self.cancel.check()?;
        let mut c = change.clone().unwrap_or_else(|| Change::new(Action::Keep, "", "", ""));
        let v = write(&mut c).await?;
        if change.is_some() {
            self.record(c);
        }
        Ok(Some(v))
    }
    pub fn status(&self, msg: &str) {
        self.progress.status(&self.step, msg);
    }
    pub fn changes(&self) -> Vec<Change> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub type StepResult = Result<(), Error>;

pub use crate::graph::{Graph, GraphError};

/// One node of the graph. `C` is the context (AWS clients, state, settings), `I` the step IDs.
pub trait Step<C, I> {
    fn id(&self) -> I;
    fn deps(&self) -> Vec<I>;
    fn up<'a>(&'a self, cx: &'a C, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult>;
    fn down<'a>(&'a self, cx: &'a C, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult>;
    /// The reads `up` will make when nothing has to change, sent ahead of the walk (see
    /// [`crate::reads`]). Errors are not reported here: the step meets them again when it runs.
    fn reads<'a>(&'a self, _cx: &'a C) -> LocalBoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Outcome {
    Done,
    Failed {
        error: String,
        #[serde(skip)]
        exit: Exit,
    },
    /// Not run because a step it needs failed: `because` names the root causes.
    Skipped {
        because: Vec<String>,
    },
    /// Not started: the run was interrupted.
    Cancelled,
}

#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub step: String,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub changes: Vec<Change>,
    pub elapsed_ms: u64,
}

#[derive(Clone, Debug, Serialize, Default)]
pub struct RunReport {
    pub steps: Vec<StepReport>,
    pub elapsed_ms: u64,
}

impl RunReport {
    pub fn failures(&self) -> impl Iterator<Item = &StepReport> {
        self.steps.iter().filter(|s| matches!(s.outcome, Outcome::Failed { .. }))
    }
    pub fn changes(&self) -> impl Iterator<Item = &Change> {
        self.steps.iter().flat_map(|s| s.changes.iter())
    }
    /// 0 when every step finished; 130 when interrupted; 3 when some work was done before a
    /// failure (state saved, rerun to finish); else the first failure's code.
    pub fn exit(&self) -> Exit {
        let failed: Vec<&StepReport> = self.failures().collect();
        let cancelled = self.steps.iter().any(|s| matches!(s.outcome, Outcome::Cancelled))
            || failed.iter().any(|s| matches!(s.outcome, Outcome::Failed { exit: Exit::Interrupted, .. }));
        if cancelled {
            return Exit::Interrupted;
        }
        let Some(first) = failed.first() else { return Exit::Success };
        let progressed = self.changes().any(|c| c.action.mutates() || c.action == Action::Adopt);
        match first.outcome {
            Outcome::Failed { exit: Exit::User, .. } if !progressed => Exit::User,
            _ if progressed => Exit::Partial,
            Outcome::Failed { exit, .. } => exit,
            _ => Exit::Failure,
        }
    }
}

/// Runs the graph in `dir`. Up: a step starts when all its dependencies are done. Down: a step
/// starts when every step that depends on it is done (reverse order).
///
/// One function over the length pgdr otherwise keeps to: scheduling and settling share the
/// running futures, which borrow the recorders and the graph; split, they would need a struct
/// holding self-borrows.
pub async fn execute<C, I: Copy + Eq + std::fmt::Display>(
    graph: &Graph<'_, C, I>,
    cx: &C,
    dir: Direction,
    mode: Mode,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> RunReport {
    let start = Instant::now();
    let steps = &graph.steps;
    let ids: Vec<String> = steps.iter().map(|s| s.id().to_string()).collect();
    // waits_on[i] = indexes that must finish before step i starts.
    let waits_on: Vec<Vec<usize>> = (0..steps.len())
        .map(|i| match dir {
            Direction::Up => graph.needs[i].clone(),
            Direction::Down => (0..steps.len()).filter(|&j| graph.needs[j].contains(&i)).collect(),
        })
        .collect();
    let mut reports: BTreeMap<usize, StepReport> = BTreeMap::new();
    // Steps in the order they settled, for reports that read like what happened.
    let mut order: Vec<usize> = Vec::new();
    // Root causes that block each step (empty = not blocked).
    let mut started = vec![false; steps.len()];
    let recorders: Vec<Recorder> = ids
        .iter()
        .map(|id| Recorder { step: id.clone(), mode, changes: Mutex::new(Vec::new()), progress, cancel: cancel.clone() })
        .collect();
    let recorders = &recorders;
    let mut running = FuturesUnordered::new();
    let finished = RefCell::new(vec![false; steps.len()]);

    loop {
        // Start or skip everything whose prerequisites are settled.
        for i in 0..steps.len() {
            if started[i] || !waits_on[i].iter().all(|&j| finished.borrow()[j]) {
                continue;
            }
            started[i] = true;
            let mut because: Vec<String> = Vec::new();
            for &j in &waits_on[i] {
                match &reports[&j].outcome {
                    Outcome::Failed { .. } => because.push(ids[j].clone()),
                    Outcome::Skipped { because: b } => because.extend(b.iter().cloned()),
                    Outcome::Cancelled => because.push("interrupted".into()),
                    Outcome::Done => {}
                }
            }
            because.sort();
            because.dedup();
            if cancel.is_cancelled() || because.iter().any(|b| b == "interrupted") {
                reports.insert(i, StepReport { step: ids[i].clone(), outcome: Outcome::Cancelled, changes: vec![], elapsed_ms: 0 });
                order.push(i);
                finished.borrow_mut()[i] = true;
                continue;
            }
            if !because.is_empty() {
                let r = StepReport { step: ids[i].clone(), outcome: Outcome::Skipped { because }, changes: vec![], elapsed_ms: 0 };
                progress.finished(&ids[i], &r);
                reports.insert(i, r);
                order.push(i);
                finished.borrow_mut()[i] = true;
                continue;
            }
            progress.started(&ids[i]);
            let step = &steps[i];
            let rec = &recorders[i];
            running.push(async move {
                let t = Instant::now();
                let res = match dir {
                    Direction::Up => step.up(cx, rec).await,
                    Direction::Down => step.down(cx, rec).await,
                };
                (i, res, t.elapsed())
            });
        }
        // Newly settled skips may unblock others: loop again before waiting.
        if steps.iter().enumerate().any(|(i, _)| !started[i] && waits_on[i].iter().all(|&j| finished.borrow()[j])) {
            continue;
        }
        let Some((i, res, elapsed)) = running.next().await else { break };
        let outcome = match res {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Failed { exit: e.exit(), error: e.to_string() },
        };
        let r = StepReport { step: ids[i].clone(), outcome, changes: recorders[i].changes(), elapsed_ms: duration_ms(elapsed) };
        progress.finished(&ids[i], &r);
        reports.insert(i, r);
        order.push(i);
        finished.borrow_mut()[i] = true;
    }
    let steps = order.into_iter().filter_map(|i| reports.remove(&i)).collect();
    RunReport { steps, elapsed_ms: duration_ms(start.elapsed()) }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A fake step: sleeps, logs start and end times, optionally fails.
    struct Fake {
        id: &'static str,
        deps: Vec<&'static str>,
        ms: u64,
        fail: bool,
    }

    struct Log {
        t0: Instant,
        events: RefCell<Vec<(String, &'static str, u128)>>,
    }

    impl Step<Log, &'static str> for Fake {
        fn id(&self) -> &'static str {
            self.id
        }
        fn deps(&self) -> Vec<&'static str> {
            self.deps.clone()
        }
        fn up<'a>(&'a self, cx: &'a Log, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
            Box::pin(async move {
                cx.events.borrow_mut().push((self.id.into(), "start", cx.t0.elapsed().as_millis()));
                tokio::time::sleep(Duration::from_millis(self.ms)).await;
                cx.events.borrow_mut().push((self.id.into(), "end", cx.t0.elapsed().as_millis()));
                rec.record(Change::new(Action::Create, "fake", self.id, "r"));
                if self.fail {
                    Err(Error::failed(format!("{} broke", self.id)))
                } else {
                    Ok(())
                }
            })
        }
        fn down<'a>(&'a self, cx: &'a C2, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
            self.up(cx, rec)
        }
    }
    type C2 = Log;

    fn fake(id: &'static str, deps: &[&'static str], ms: u64, fail: bool) -> Box<dyn Step<Log, &'static str>> {
        Box::new(Fake { id, deps: deps.to_vec(), ms, fail })
    }

    fn at(log: &Log, id: &str, what: &str) -> u128 {
        log.events.borrow().iter().find(|(i, w, _)| i == id && *w == what).map(|e| e.2).unwrap_or_else(|| panic!("{id} {what} missing"))
    }

    fn ran(log: &Log, id: &str) -> bool {
        log.events.borrow().iter().any(|(i, _, _)| i == id)
    }

    fn graph() -> Graph<'static, Log, &'static str> {
        Graph::new(vec![
            fake("net-a", &[], 200, false),
            fake("net-b", &[], 200, false),
            fake("peering", &["net-a", "net-b"], 50, false),
            fake("db", &["net-a"], 50, false),
        ])
        .unwrap()
    }

    #[tokio::test]
    async fn independent_steps_overlap_and_dependents_wait() {
        let log = Log { t0: Instant::now(), events: RefCell::new(vec![]) };
        let steps = graph();
        let r = execute(&steps, &log, Direction::Up, Mode::Apply, &NoProgress, &Cancel::default()).await;
        assert_eq!(r.exit(), Exit::Success);
        // Both networks started before either ended: they ran at the same time.
        assert!(at(&log, "net-b", "start") < at(&log, "net-a", "end"));
        assert!(at(&log, "net-a", "start") < at(&log, "net-b", "end"));
        assert!(at(&log, "peering", "start") >= at(&log, "net-a", "end"));
        assert!(at(&log, "peering", "start") >= at(&log, "net-b", "end"));
        assert!(at(&log, "db", "start") >= at(&log, "net-a", "end"));
        assert!(r.elapsed_ms < 390, "ran serially: {} ms", r.elapsed_ms);
    }

    #[tokio::test]
    async fn failure_skips_dependents_but_not_independent_branches() {
        let log = Log { t0: Instant::now(), events: RefCell::new(vec![]) };
        let steps = Graph::new(vec![
            fake("net-a", &[], 10, false),
            fake("net-b", &[], 10, true),
            fake("peering", &["net-a", "net-b"], 10, false),
            fake("dns", &["peering"], 10, false),
            fake("db", &["net-a"], 100, false),
        ])
        .unwrap();
        let r = execute(&steps, &log, Direction::Up, Mode::Apply, &NoProgress, &Cancel::default()).await;
        assert!(!ran(&log, "peering") && !ran(&log, "dns"));
        assert!(ran(&log, "db") && at(&log, "db", "end") > 0);
        let by = |id: &str| r.steps.iter().find(|s| s.step == id).unwrap().outcome.clone();
        assert!(matches!(by("db"), Outcome::Done));
        // Only the root cause is named, also two levels down.
        match by("dns") {
            Outcome::Skipped { because } => assert_eq!(because, vec!["net-b".to_string()]),
            o => panic!("{o:?}"),
        }
        assert_eq!(r.failures().count(), 1);
        assert_eq!(r.exit(), Exit::Partial);
    }

    #[tokio::test]
    async fn down_runs_in_reverse() {
        let log = Log { t0: Instant::now(), events: RefCell::new(vec![]) };
        let steps = graph();
        let r = execute(&steps, &log, Direction::Down, Mode::Apply, &NoProgress, &Cancel::default()).await;
        assert_eq!(r.exit(), Exit::Success);
        assert!(at(&log, "net-a", "start") >= at(&log, "peering", "end"));
        assert!(at(&log, "net-a", "start") >= at(&log, "db", "end"));
        assert!(at(&log, "net-b", "start") >= at(&log, "peering", "end"));
        // net-b does not wait for db, which does not depend on it.
        assert!(at(&log, "net-b", "start") < at(&log, "db", "end") + 5);
    }

    #[tokio::test]
    async fn plan_mode_records_writes_without_performing_them() {
        let cancel = Cancel::default();
        for (mode, performed) in [(Mode::Plan, false), (Mode::Adopt, false), (Mode::Status, false), (Mode::Apply, true)] {
            let rec = Recorder::new("s", mode, &NoProgress, cancel.clone());
            let ran = std::cell::Cell::new(false);
            let out = rec
                .apply(Change::new(Action::Create, "vpc", "v", "r"), async |c| {
                    ran.set(true);
                    *c = c.clone().id("vpc-1");
                    Ok(7)
                })
                .await
                .unwrap();
            assert_eq!(ran.get(), performed, "{mode:?}");
            assert_eq!(out, performed.then_some(7));
            let changes = rec.changes();
            assert_eq!(changes.len(), 1);
            assert_eq!(changes[0].id.as_deref(), performed.then_some("vpc-1"));
        }
    }

    #[tokio::test]
    async fn cancel_stops_new_work() {
        let log = Log { t0: Instant::now(), events: RefCell::new(vec![]) };
        let steps = graph();
        let cancel = Cancel::default();
        cancel.cancel();
        let r = execute(&steps, &log, Direction::Up, Mode::Apply, &NoProgress, &cancel).await;
        assert!(log.events.borrow().is_empty());
        assert_eq!(r.exit(), Exit::Interrupted);
    }
}
