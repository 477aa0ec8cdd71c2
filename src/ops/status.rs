//! `status` (one environment, or every environment in the state directory) and `unlock`.

use serde::Serialize;

use super::{graph, open, Ahead, Command, Operator, Report, Target};
use crate::backend::LockInfo;
use crate::config;
use crate::cx::Cx;
use crate::error::{Exit, Result};
use crate::exec::{self, Action, Cancel, Direction, Mode};

/// One resource as `status` sees it.
#[derive(Debug, Serialize)]
pub struct ResourceStatus {
    pub step: String,
    pub kind: String,
    pub name: String,
    pub region: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `exists`, `missing` or `drifted`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct StatusResult {
    pub env: String,
    pub primary_region: String,
    pub dr_region: String,
    pub healthy: bool,
    /// Most important first: what is wrong, and what to run.
    pub problems: Vec<String>,
    pub health: crate::health::Health,
    pub resources: Vec<ResourceStatus>,
    /// The last `pgdr drill`'s report, as kept in the state.
    pub last_drill: Option<serde_json::Value>,
    /// A switchover that stopped part-way (a rerun finishes or undoes it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchover: Option<crate::state::SwitchoverMark>,
    #[serde(skip)]
    pub exit: Exit,
}

/// `status --env E`: every resource, read from AWS (a read-only walk of the graph).
pub async fn status(t: &Target, cancel: &Cancel) -> Result<StatusResult> {
    let (cx, _) = open(t, Command::Status, Mode::Status, Ahead::WalkAndHealth, cancel).await?;
    let steps = graph()?;
    let (report, health) =
        tokio::join!(exec::execute(&steps, &cx, Direction::Up, cx.mode, &exec::NoProgress, cancel), crate::health::gather(&cx));
    let mut resources = Vec::new();
    let mut problems: Vec<String> = report
        .failures()
        .map(|f| {
            format!(
                "{}: {}",
                f.step,
                match &f.outcome {
                    exec::Outcome::Failed { error, .. } => error.as_str(),
                    _ => "",
                }
            )
        })
        .collect();
    for s in &report.steps {
        for c in &s.changes {
            let state = match c.action {
                Action::Keep => "exists",
                Action::Adopt => "untracked",
                Action::Create => "missing",
                Action::Change => "drifted",
                Action::Delete | Action::Absent => continue,
            };
            if state != "exists" {
                problems.push(format!("{} {} in {} is {state}", c.kind, c.name, c.region));
            }
            resources.push(ResourceStatus {
                step: s.step.clone(),
                kind: c.kind.clone(),
                name: c.name.clone(),
                region: c.region.clone(),
                id: c.id.clone(),
                state,
                detail: c.detail.clone(),
            });
        }
    }
    let mut first = health_problems(&cx, &health);
    let snapshot = cx.store.snapshot();
    if let Some(m) = &snapshot.topology.switchover {
        first.push(format!(
            "a switchover started {} stopped part-way ({:?}): rerun `pgdr switchover --env {}` to finish or undo it",
            m.started_at,
            m.phase,
            cx.name()
        ));
    }
    first.extend(problems);
    let problems = first;
    let healthy = problems.is_empty();
    Ok(StatusResult {
        env: cx.env.name.clone(),
        primary_region: cx.env.settings.primary_region.clone(),
        dr_region: cx.env.settings.dr_region.clone(),
        healthy,
        resources,
        health,
        problems,
        last_drill: snapshot.drills.last().cloned(),
        switchover: snapshot.topology.switchover.clone(),
        exit: if healthy { Exit::Success } else { Exit::Partial },
    })
}

/// One line per environment in the state directory.
#[derive(Debug, Serialize)]
pub struct EnvSummary {
    pub env: String,
    pub resources: usize,
    pub writer_region: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_by: Option<String>,
    /// Seconds since the lock's holder was last heard of (its heartbeat): a large figure means
    /// a stale lock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_silent_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `status` without `--env`: every environment at the state location.
#[derive(Debug, Serialize)]
pub struct EnvList {
    pub location: String,
    pub environments: Vec<EnvSummary>,
}

impl Report for EnvList {
    /// A state file that cannot be read is a problem to alert on.
    fn exit(&self) -> Exit {
        if self.environments.iter().any(|e| e.error.is_some()) {
            Exit::Partial
        } else {
            Exit::Success
        }
    }
}

/// `status` without `--env`: every environment with a state at the target's location.
pub async fn list_envs(t: &Target) -> Result<EnvList> {
    let backend = t.backend(None).await?;
    // Every environment's lock and state at once (one round trip, not two per environment).
    let summaries = backend.envs().await?.into_iter().map(|env| {
        let backend = &backend;
        async move {
            let (lock, state) = tokio::join!(backend.read_lock(&env), backend.read(&env));
            let lock = lock.ok().flatten();
            let (state, error) = match state {
                Ok(None) => return None,
                Ok(Some(l)) => (l.state, None),
                Err(e) => (crate::state::State::default(), Some(e.to_string())),
            };
            Some(EnvSummary {
                env,
                resources: state.resources.len(),
                writer_region: state.topology.writer_region,
                updated_at: state.updated_at,
                locked_by: lock.as_ref().map(|l| l.holder()),
                lock_silent_s: lock.as_ref().and_then(|l| l.silent_for()),
                error,
            })
        }
    });
    let environments = futures::future::join_all(summaries).await.into_iter().flatten().collect();
    Ok(EnvList { location: backend.location().to_string(), environments })
}

/// What makes an environment degraded, read from AWS.
fn health_problems(cx: &Cx, h: &crate::health::Health) -> Vec<String> {
    use crate::cx::Side;
    let mut p = Vec::new();
    let env = cx.name();
    for u in &h.unreachable {
        p.push(format!("could not read {u}"));
    }
    match &h.writer_region {
        None => p.push("no instance accepts writes".into()),
        Some(w) if w != cx.region(Side::Primary) => p.push(format!(
            "failed over: the writer is in {w} and nothing protects it; when {} is back run `pgdr reprotect --env {env}`",
            cx.region(Side::Primary)
        )),
        Some(_) => {}
    }
    for i in h.instances.iter().filter(|i| i.role == "old-primary") {
        p.push(format!("the old primary {} in {} is not fenced: run `pgdr failover --env {env}` to fence it", i.id, i.region));
    }
    for i in &h.instances {
        if !matches!(i.role.as_str(), "fenced" | "old-primary") && i.status != "available" {
            p.push(format!("{} {} in {} is {}", i.role, i.id, i.region, i.status));
        }
    }
    if let (Some(w), Some(d)) = (&h.writer_region, &h.dns_writer_region) {
        if w != d {
            p.push(format!("DNS sends writers to {d} but the writer is in {w}: run `pgdr failover --env {env}` or `pgdr up --env {env}`"));
        }
    }
    if let Some(lag) = h.replica_lag_seconds {
        if lag > cx.env.settings.max_failover_lag_seconds || lag < 0.0 {
            p.push(format!("replica lag is {lag:.0} s"));
        }
    }
    for a in h.alarms.iter().filter(|a| a.state == "ALARM") {
        p.push(format!("alarm {} in {} is in ALARM", a.name, a.region));
    }
    if !h.failover_function && h.writer_region.as_deref() == Some(cx.region(Side::Primary)) {
        p.push("the failover function is missing: run `pgdr up`".into());
    }
    p
}

impl Report for StatusResult {
    fn exit(&self) -> Exit {
        self.exit
    }
}

/// `unlock`: the lock removed, if there was one.
#[derive(Debug, Serialize)]
pub struct UnlockResult {
    pub env: String,
    pub removed: Option<LockInfo>,
}

impl Report for UnlockResult {
    fn exit(&self) -> Exit {
        Exit::Success
    }
}

/// Shows the lock's holder and removes the lock once the operator confirms (`--yes`).
pub async fn unlock(t: &Target, operator: &dyn Operator) -> Result<UnlockResult> {
    config::validate_env_name(&t.env)?;
    let backend = t.backend(None).await?;
    let env = t.env.as_str();
    let confirm = |h: &LockInfo| {
        let silent = h
            .silent_for()
            .map(|s| format!(", last heard of {} ago", crate::wait::human(std::time::Duration::from_secs(s))))
            .unwrap_or_default();
        let what = format!(
            "The lock of {env} is held by {}{silent}.\nRemove it only if that run is gone: a run still going on would lose its next state write.",
            h.holder()
        );
        operator.confirm(&what, env)
    };
    let removed = backend.unlock(env, &confirm).await?;
    Ok(UnlockResult { env: env.to_owned(), removed })
}
