//! `status` (one environment, or every environment in the state directory) and `unlock`.

use std::path::Path;

use serde::Serialize;

use super::{graph, open, Ahead, Command, Report, Target};
use crate::config;
use crate::cx::Cx;
use crate::error::{Error, Exit, Result};
use crate::exec::{self, Action, Cancel, Direction, Mode};
use crate::state;

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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `status` without `--env`: every environment in the state directory.
#[derive(Debug, Serialize)]
pub struct EnvList {
    #[serde(skip)]
    pub dir: std::path::PathBuf,
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

pub fn list_envs(dir: &Path) -> Result<EnvList> {
    Ok(EnvList { dir: dir.to_owned(), environments: summaries(dir)? })
}

fn summaries(dir: &Path) -> Result<Vec<EnvSummary>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::user(format!("cannot read state directory {}: {e}", dir.display()))),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).map(str::to_owned))
        .filter(|n| config::validate_env_name(n).is_ok())
        .collect();
    names.sort();
    for name in names {
        let locked_by = state::read_lock(dir, &name).map(|l| format!("{} ({}, pid {} on {})", l.who, l.command, l.pid, l.host));
        match state::read(dir, &name) {
            Ok(Some(s)) => out.push(EnvSummary {
                env: name,
                resources: s.resources.len(),
                writer_region: s.topology.writer_region,
                updated_at: s.updated_at,
                locked_by,
                error: None,
            }),
            Ok(None) => {}
            Err(e) => out.push(EnvSummary {
                env: name,
                resources: 0,
                writer_region: String::new(),
                updated_at: String::new(),
                locked_by,
                error: Some(e.to_string()),
            }),
        }
    }
    Ok(out)
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
    pub removed: Option<state::LockInfo>,
}

impl Report for UnlockResult {
    fn exit(&self) -> Exit {
        Exit::Success
    }
}

pub fn unlock(state_dir: &Path, env: &str, force: bool) -> Result<UnlockResult> {
    config::validate_env_name(env)?;
    let removed = state::unlock(state_dir, env, force)?;
    Ok(UnlockResult { env: env.to_owned(), removed })
}
