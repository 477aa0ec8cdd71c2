//! `pgdr state …`: a bucket for team state (`init`), the state's versions (`history`,
//! `restore`), and moving a state between a directory and S3 (`migrate`).

use serde::Serialize;

use super::{Command, Operator, Report, Target};
use crate::backend::{self, Backend, HistoryEntry, Location, RunInfo, SaveError};
use crate::clients::Connection;
use crate::config;
use crate::error::{Error, Exit, Result};

impl Report for backend::InitResult {
    fn exit(&self) -> Exit {
        Exit::Success
    }
}

/// `state init s3://BUCKET[/PREFIX]`: the bucket, made fit for state, in `region` (the DR region
/// of the config's defaults unless given).
pub async fn init(
    url: &str,
    conn: &Connection,
    config: Option<&std::path::Path>,
    region: Option<&str>,
    kms_key: Option<&str>,
) -> Result<backend::InitResult> {
    let Location::S3(url) = Location::parse(url)? else {
        return Err(Error::user(format!("`state init` prepares an S3 bucket: give s3://BUCKET (not {url:?})")));
    };
    let defaults = config::load_defaults(config)?;
    let region = region.map(str::to_owned).unwrap_or_else(|| defaults.dr_region.clone());
    config::validate_region("--region", &region, &defaults)?;
    let opts = backend::InitOptions { region, primary_region: defaults.primary_region.clone(), kms_key: kms_key.map(str::to_owned) };
    backend::init_bucket(&url, conn, &opts).await
}

/// `state history --env E`: the state's versions, newest first.
#[derive(Debug, Serialize)]
pub struct HistoryResult {
    pub env: String,
    pub location: String,
    pub versions: Vec<HistoryEntry>,
}

impl Report for HistoryResult {
    fn exit(&self) -> Exit {
        Exit::Success
    }
}

pub async fn history(t: &Target, limit: usize) -> Result<HistoryResult> {
    config::validate_env_name(&t.env)?;
    let backend = t.backend(None).await?;
    let versions = backend.history(&t.env, limit).await?;
    Ok(HistoryResult { env: t.env.clone(), location: backend.state_name(&t.env), versions })
}

/// `state restore --env E --version V`: that version becomes the current state (a new
/// version: the one it replaces stays in the history).
#[derive(Debug, Serialize)]
pub struct RestoreResult {
    pub env: String,
    pub restored: String,
    pub resources: usize,
}

impl Report for RestoreResult {
    fn exit(&self) -> Exit {
        Exit::Success
    }
}

pub async fn restore(t: &Target, version: &str, operator: &dyn Operator) -> Result<RestoreResult> {
    config::validate_env_name(&t.env)?;
    let backend = t.backend(None).await?;
    let env = t.env.as_str();
    let mut old = backend.read_version(env, version).await?;
    let run = RunInfo::this_process(&format!("pgdr state restore {version}"));
    let _lock = backend.lock(env, &run).await?;
    let current = backend.read(env).await?;
    let now = current.as_ref().map(|c| c.state.resources.len()).unwrap_or(0);
    let what = format!(
        "This makes version {version} of {env} ({} resources, saved {}) its current state, replacing the current one ({now} resources; kept in the history).",
        old.resources.len(),
        old.updated_at
    );
    operator.confirm(&what, env)?;
    old.updated_at = crate::state::now_rfc3339();
    save(&backend, &old, current.as_ref().map(|c| &c.version), &run)?;
    Ok(RestoreResult { env: env.to_owned(), restored: version.to_owned(), resources: old.resources.len() })
}

fn save(backend: &Backend, state: &crate::state::State, expected: Option<&backend::Version>, run: &RunInfo) -> Result<backend::Version> {
    match backend.save(state, expected, run, 1) {
        Ok(v) => Ok(v),
        Err(SaveError::Conflict { found }) => {
            Err(Error::failed(format!("{found} while this command ran; nothing was overwritten: run it again")))
        }
        Err(SaveError::Failed(e)) => Err(e),
    }
}

/// `state migrate --env E --to LOCATION`: the state copied under both locks, read back and
/// compared, and the old copy renamed (never deleted).
#[derive(Debug, Serialize)]
pub struct MigrateResult {
    pub env: String,
    pub from: String,
    pub to: String,
    pub resources: usize,
    /// Where the old copy is kept.
    pub old_copy: String,
}

impl Report for MigrateResult {
    fn exit(&self) -> Exit {
        Exit::Success
    }
}

pub async fn migrate(t: &Target, to: &Location) -> Result<MigrateResult> {
    let env = t.load_env()?;
    let name = env.name.as_str();
    let src = t.backend(Some(&env.settings.primary_region)).await?;
    let dst_target = Target { state: to.clone(), ..t.clone() };
    let dst = dst_target.backend(Some(&env.settings.primary_region)).await?;
    if src.location() == dst.location() {
        return Err(Error::user(format!("--to names the current state location ({}); give the other one", src.location())));
    }
    let run = RunInfo::this_process(&Command::State.lock_label());
    let _src_lock = src.lock(name, &run).await?;
    let _dst_lock = dst.lock(name, &run).await?;
    let Some(loaded) = src.read(name).await? else {
        return Err(Error::user(format!("there is no state of {name} at {} to migrate; check --state", src.location())));
    };
    if dst.read(name).await?.is_some() {
        return Err(Error::user(format!(
            "{} already holds a state of {name}; nothing was changed: move it aside first (or migrate to another prefix)",
            dst.state_name(name)
        )));
    }
    save(&dst, &loaded.state, None, &run)?;
    let back = dst.read(name).await?.map(|l| l.state);
    if back.as_ref() != Some(&loaded.state) {
        return Err(Error::failed(format!(
            "the copy at {} does not read back identical; the original at {} is untouched",
            dst.state_name(name),
            src.state_name(name)
        )));
    }
    let stamp = crate::state::now_rfc3339().replace([':', '-'], "");
    let old_copy = src.set_aside(name, &format!("migrated-{stamp}"), &loaded.version).await?;
    Ok(MigrateResult {
        env: name.to_owned(),
        from: src.state_name(name),
        to: dst.state_name(name),
        resources: loaded.state.resources.len(),
        old_copy,
    })
}
