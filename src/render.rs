//! How results read to people: `Display` for every command's result. (`--output json` is their
//! `Serialize`.) Rendering only formats; the CLI decides where text goes.

use std::fmt::{self, Display, Formatter, Write as _};

use crate::error::Exit;
use crate::exec::{Action, Change, Outcome, StepReport};
use crate::ops::run::ReprotectResult;
use crate::ops::{Command, EnvList, FailoverResult, RunResult, StatusResult, UnlockResult};

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// The word for an action in a run's listing.
fn verb(command: Command, dry_run: bool, action: Action) -> String {
    let would = if dry_run { "would " } else { "" };
    match (command, action) {
        // adopt records what it finds; what it does not find, `up` would create.
        (Command::Adopt, Action::Create) => "missing".into(),
        (Command::Adopt, Action::Adopt) => "adopt".into(),
        (_, Action::Create) => format!("{would}create"),
        (_, Action::Adopt) => format!("{would}adopt"),
        (_, Action::Change) => format!("{would}change"),
        (_, Action::Delete) => format!("{would}delete"),
        (_, Action::Keep) => "keep".into(),
        (_, Action::Absent) => "absent".into(),
    }
}

fn change_line(f: &mut Formatter<'_>, r: &RunResult, c: &Change) -> fmt::Result {
    writeln!(
        f,
        "  {} {:<8} {:<22} {:<28} {}{}{}",
        c.action.symbol(),
        verb(r.command, r.dry_run, c.action),
        c.kind,
        c.name,
        c.region,
        c.id.as_ref().map(|i| format!("  {i}")).unwrap_or_default(),
        c.detail.as_ref().map(|d| format!("  ({d})")).unwrap_or_default()
    )
}

fn step_head(s: &StepReport) -> String {
    match &s.outcome {
        Outcome::Done => String::new(),
        Outcome::Failed { error, .. } => format!("  FAILED: {error}"),
        Outcome::Skipped { because } => format!("  skipped: {} failed", because.join(", ")),
        Outcome::Cancelled => "  not started (interrupted)".into(),
    }
}

fn summary_line(f: &mut Formatter<'_>, s: &StepReport) -> fmt::Result {
    let count = |a: &[Action]| s.changes.iter().filter(|c| a.contains(&c.action)).count();
    let what = match &s.outcome {
        Outcome::Done => format!(
            "{} created, {} adopted, {} changed, {} deleted, {} unchanged",
            count(&[Action::Create]),
            count(&[Action::Adopt]),
            count(&[Action::Change]),
            count(&[Action::Delete]),
            count(&[Action::Keep, Action::Absent])
        ),
        Outcome::Failed { .. } => "FAILED".into(),
        Outcome::Skipped { .. } => "skipped".into(),
        Outcome::Cancelled => "not started".into(),
    };
    let mark = if matches!(s.outcome, Outcome::Done) { "ok" } else { "!!" };
    writeln!(f, "  {mark} {:<18} {:>7.1}s  {what}", s.step, secs(s.elapsed_ms))
}

impl Display for RunResult {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for w in &self.warnings {
            writeln!(f, "WARNING: {w}")?;
        }
        for s in &self.report.steps {
            // Unchanged resources are listed by plan; elsewhere only when there is something to
            // say about them (a final snapshot kept, a rule left revoked).
            let shown: Vec<&Change> = s.changes.iter().filter(|c| self.dry_run || c.action != Action::Keep || c.detail.is_some()).collect();
            let head = step_head(s);
            if shown.is_empty() && head.is_empty() {
                continue;
            }
            writeln!(f, "{}{}", s.step, head)?;
            for c in shown {
                change_line(f, self, c)?;
            }
        }
        if !self.dry_run && !self.report.steps.is_empty() {
            writeln!(f, "summary:")?;
            for s in &self.report.steps {
                summary_line(f, s)?;
            }
        }
        if let Some(c) = &self.connect {
            writeln!(
                f,
                "connect: writers {}:{}  reads {}:{}  credentials: secret {}\n  TLS: sslmode=verify-ca with the RDS CA bundle (the certificate names the instance, not the record; verify-full works only on the instance endpoints)\n  instances: {}",
                c.writer,
                c.port,
                c.reader,
                c.port,
                c.secret,
                c.endpoints.join(", ")
            )?;
        }
        self.totals_line(f)
    }
}

impl RunResult {
    fn totals_line(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let t = &self.totals;
        if self.dry_run && t.nothing_to_do() && self.report.failures().next().is_none() && self.command != Command::Adopt {
            writeln!(f, "Nothing to do: the environment matches the configuration.")?;
        }
        let (c, a, ch, d) =
            if self.dry_run { ("to create", "to adopt", "to change", "to delete") } else { ("created", "adopted", "changed", "deleted") };
        writeln!(
            f,
            "{}: {} {c}, {} {a}, {} {ch}, {} {d}, {} unchanged ({:.1}s)",
            self.command,
            t.create,
            t.adopt,
            t.change,
            t.delete,
            t.keep,
            secs(self.report.elapsed_ms)
        )?;
        if self.exit == Exit::Partial {
            // After reprotect swapped the roles, finishing the job is `up`'s.
            let again = if self.command == Command::Reprotect { Command::Up } else { self.command };
            writeln!(f, "Some steps failed; the state is saved. Fix the cause above and rerun `pgdr {again} --env {}`.", self.env)?;
        }
        Ok(())
    }
}

impl Display for StatusResult {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let h = &self.health;
        let state = if self.healthy { "HEALTHY" } else { "DEGRADED" };
        writeln!(f, "environment {}  ({} -> {})  {state}", self.env, self.primary_region, self.dr_region)?;
        for p in &self.problems {
            writeln!(f, "  ! {p}")?;
        }
        writeln!(f, "writer: {}", h.writer_region.as_deref().unwrap_or("none"))?;
        for i in &h.instances {
            writeln!(f, "  {:<8} {:<28} {:<10} {}", i.role, i.id, i.region, i.status)?;
        }
        let lag = h.replica_lag_seconds.map(|l| format!("{l:.0} s")).unwrap_or_else(|| "no recent datapoint".into());
        writeln!(f, "replica lag: {lag}")?;
        writeln!(f, "dns {}: writers -> {}", h.dns_record, h.dns_writer_region.as_deref().unwrap_or("-"))?;
        for r in &h.dns {
            let check = r.health_check.as_ref().map(|c| format!("  health check {c}")).unwrap_or_default();
            writeln!(f, "  [{}] weight {:<3} {}{check}", r.set_id, r.weight, r.value)?;
        }
        let alarming = h.alarms.iter().filter(|a| a.state == "ALARM").count();
        writeln!(f, "alarms: {} ({alarming} in ALARM)", h.alarms.len())?;
        writeln!(f, "failover function: {}", if h.failover_function { "present" } else { "missing" })?;
        match &self.last_drill {
            Some(d) => writeln!(
                f,
                "last drill: {} ({}), RTO {:.1} s, RPO {} rows of {} written",
                d["finished_at"].as_str().unwrap_or("?"),
                d["mode"].as_str().unwrap_or("?"),
                d["rto_seconds"].as_f64().unwrap_or(f64::NAN),
                d["rpo_rows"].as_u64().unwrap_or(0),
                d["rows_written"].as_u64().unwrap_or(0)
            )?,
            None => writeln!(f, "last drill: never (`pgdr drill --env {}`)", self.env)?,
        }
        writeln!(f, "resources:")?;
        for r in &self.resources {
            let detail = r.detail.as_ref().map(|d| format!("  ({d})")).unwrap_or_default();
            writeln!(f, "  {:<9} {:<22} {:<28} {:<10} {}{detail}", r.state, r.kind, r.name, r.region, r.id.as_deref().unwrap_or("-"))?;
        }
        Ok(())
    }
}

impl Display for EnvList {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if self.environments.is_empty() {
            writeln!(f, "no environments in {}", self.location)?;
        }
        for e in &self.environments {
            match &e.error {
                Some(err) => writeln!(f, "{:<20} error: {err}", e.env)?,
                None => writeln!(
                    f,
                    "{:<20} {:>3} resources  writer {:<12} updated {}{}",
                    e.env,
                    e.resources,
                    if e.writer_region.is_empty() { "-" } else { &e.writer_region },
                    e.updated_at,
                    e.locked_by
                        .as_ref()
                        .map(|l| format!(
                            "  locked by {l}{}",
                            e.lock_silent_s.map(|s| format!(", heard of {}s ago", s)).unwrap_or_default()
                        ))
                        .unwrap_or_default()
                )?,
            }
        }
        Ok(())
    }
}

impl Display for UnlockResult {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match &self.removed {
            Some(info) => writeln!(f, "removed the lock of {} (`{}`, pid {} on {})", self.env, info.command, info.pid, info.host),
            None => writeln!(f, "environment {} is not locked", self.env),
        }
    }
}

/// A failover's outcome reads as its timeline; a plan alone was shown before the question.
impl Display for FailoverResult {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let FailoverResult::Done(out) = self else { return Ok(()) };
        writeln!(f, "failover timeline:")?;
        for p in &out.timeline {
            writeln!(f, "  {:<10} {:>7.1}s  {}", p.phase, secs(p.ms), p.detail)?;
        }
        if let Some(note) = &out.pending {
            writeln!(f, "WARNING: {note}")?;
        }
        Ok(())
    }
}

impl Display for crate::ops::SwitchoverResult {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let crate::ops::SwitchoverResult::Switched { switched, reprotect } = self else { return Ok(()) };
        write!(f, "{reprotect}")?;
        writeln!(f, "switchover timeline ({} -> {}):", switched.from_region, switched.to_region)?;
        for p in &switched.timeline {
            writeln!(f, "  {:<10} {:>7.1}s  {}", p.phase, secs(p.ms), p.detail)?;
        }
        writeln!(f, "writes paused {:.1} s (fence to DNS moved; clients follow within the record TTL)", secs(switched.write_pause_ms))?;
        if let Some(note) = &switched.pending {
            writeln!(f, "WARNING: {note}")?;
        }
        Ok(())
    }
}

impl Display for crate::ops::DrillReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(f, "drill of {} ({:?}), {} s", self.env, self.mode, self.seconds)?;
        writeln!(f, "  {:<11} {:<22} {:>8} {:>8} {:>9}", "leg", "move", "RTO s", "RPO rows", "written")?;
        for l in &self.legs {
            let mv = format!("{} -> {}", l.from_region, l.to_region);
            writeln!(
                f,
                "  {:<11} {:<22} {:>8.1} {:>8} {:>9}",
                format!("{:?}", l.kind).to_lowercase(),
                mv,
                l.rto_seconds,
                l.rpo_rows,
                l.rows_written
            )?;
            for p in &l.timeline {
                writeln!(f, "      {:<10} {:>7.1}s  {}", p.phase, secs(p.ms), p.detail)?;
            }
        }
        writeln!(
            f,
            "RTO {:.1} s (worst leg), RPO {} acknowledged rows lost of {} written",
            self.rto_seconds, self.rpo_rows, self.rows_written
        )?;
        writeln!(
            f,
            "final: primary in {}, replica in {}, {}",
            self.final_state.primary_region,
            self.final_state.replica_region,
            if self.final_state.protected { "protected" } else { "NOT protected: rerun `pgdr up`" }
        )
    }
}

/// A reprotect reads as the walk that rebuilt protection; a plan alone was shown before.
impl Display for ReprotectResult {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            ReprotectResult::Planned(_) => Ok(()),
            ReprotectResult::Done(r) => r.fmt(f),
        }
    }
}

impl crate::failover::Plan {
    /// The plan as the operator reads it before confirming.
    pub fn describe(&self, dry_run: bool) -> String {
        let lag = match (self.replica_lag_seconds, self.replica_lag_age_seconds) {
            (Some(l), Some(age)) if age >= 120 => format!("{l:.0} s (its newest datapoint is {age} s old)"),
            (Some(l), _) => format!("{l:.0} s"),
            (None, _) => "unknown (no recent datapoint)".into(),
        };
        let mut t = format!(
            "failover {}: {} ({}) -> {} ({})\n  primary {} is {}\n  replica {} is {}, lag {lag}\n",
            self.env,
            self.from_region,
            self.primary,
            self.to_region,
            self.replica,
            self.primary,
            self.primary_status,
            self.replica,
            self.replica_status,
        );
        if let Some(e) = &self.dns_unreachable {
            let _ = writeln!(t, "  DNS: Route 53 did not answer ({e}); the promotion goes ahead, DNS is moved if Route 53 answers by then");
        }
        for st in &self.steps {
            let _ = writeln!(t, "  {}will {st}", if dry_run { "(dry run) " } else { "" });
        }
        t
    }
}

impl crate::reprotect::Plan {
    /// The plan as the operator reads it before confirming.
    pub fn describe(&self, dry_run: bool) -> String {
        let mut t = format!(
            "reprotect {}: primary {} in {}, new replica {} in {}\n",
            self.env, self.new_primary, self.new_primary_region, self.new_replica, self.new_replica_region
        );
        for st in &self.steps {
            let _ = writeln!(t, "  {}will {st}", if dry_run { "(dry run) " } else { "" });
        }
        t
    }
}

impl Display for crate::backend::InitResult {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let how = if self.created { "created" } else { "found" };
        writeln!(f, "bucket {} {how} in {}", self.bucket, self.region)?;
        for a in &self.applied {
            writeln!(f, "  {a}")?;
        }
        for w in &self.warnings {
            writeln!(f, "WARNING: {w}")?;
        }
        writeln!(f, "use it: pgdr --state {} … (or state = \"{}\" in pgdr.toml, or PGDR_STATE)", self.state, self.state)
    }
}

impl Display for crate::ops::HistoryResult {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if self.versions.is_empty() {
            return writeln!(f, "no versions of {}", self.location);
        }
        writeln!(f, "{}:", self.location)?;
        writeln!(f, "  {:<38} {:<22} {:<12} command", "version", "time", "who")?;
        for v in &self.versions {
            let mark = if v.latest { " (current)" } else { "" };
            writeln!(f, "  {:<38} {:<22} {:<12} {}{mark}", v.version, v.at, if v.who.is_empty() { "-" } else { &v.who }, v.command)?;
        }
        Ok(())
    }
}

impl Display for crate::ops::RestoreResult {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "restored version {} of {} ({} resources); run `pgdr plan --env {}` to see what AWS has",
            self.restored, self.env, self.resources, self.env
        )
    }
}

impl Display for crate::ops::MigrateResult {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(f, "moved the state of {} ({} resources) from {} to {}", self.env, self.resources, self.from, self.to)?;
        writeln!(f, "the old copy is kept as {}", self.old_copy)
    }
}
