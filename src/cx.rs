//! The context every step runs in: settings, clients, state, options.

use std::sync::Arc;

use crate::clients::{Clients, Regional};
use crate::config::Env;
use crate::exec::Cancel;
use crate::state::Store;

/// Options of `up` and `down` that are not settings of the environment.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `down`: delete the primary without a final snapshot and the secret at once.
    pub skip_final_snapshot: bool,
    /// `down`: turn deletion protection off first.
    pub force: bool,
}

pub struct Cx {
    pub env: Env,
    pub clients: Clients,
    pub store: Store,
    /// What this run may do (plan, apply, adopt, status).
    pub mode: crate::exec::Mode,
    pub opts: Options,
    pub cancel: Cancel,
    /// IDs this run created or just saw exist: the next calls on them may not see them yet
    /// (see [`Cx::settle`]).
    pub fresh: Fresh,
}

/// IDs created in this run.
#[derive(Debug, Default)]
pub struct Fresh(std::sync::Mutex<std::collections::HashSet<String>>);

impl Fresh {
    pub fn insert(&self, id: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_owned());
    }
    pub fn contains(&self, id: &str) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).contains(id)
    }
}

/// How long a new ID may stay invisible to the calls that follow its create. AWS gives no
/// bound ("Eventual consistency in the Amazon EC2 API": typically seconds); two minutes is far
/// past what is observed and short enough to report a real problem.
const FRESH_BUDGET: std::time::Duration = std::time::Duration::from_secs(120);

/// Which side of the pair a region plays in the initial deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    Primary,
    Dr,
}

impl Side {
    pub fn label(self) -> &'static str {
        match self {
            Side::Primary => "primary",
            Side::Dr => "dr",
        }
    }
    pub fn other(self) -> Side {
        match self {
            Side::Primary => Side::Dr,
            Side::Dr => Side::Primary,
        }
    }
}

impl Cx {
    pub fn name(&self) -> &str {
        &self.env.name
    }
    pub fn regional(&self, side: Side) -> &Arc<Regional> {
        match side {
            Side::Primary => &self.clients.primary,
            Side::Dr => &self.clients.dr,
        }
    }
    /// The VPC CIDR block of a side's region.
    pub fn cidr(&self, side: Side) -> crate::config::Cidr {
        match side {
            Side::Primary => self.env.primary_cidr(),
            Side::Dr => self.env.dr_cidr(),
        }
    }
    pub fn region(&self, side: Side) -> &str {
        &self.regional(side).region
    }
    /// `pgdr:env`, `pgdr:resource` and the configured extra tags.
    pub fn tags(&self, resource: &str) -> Vec<(String, String)> {
        let mut t = vec![
            ("pgdr:env".to_owned(), self.env.name.clone()),
            ("pgdr:resource".to_owned(), resource.to_owned()),
            ("Name".to_owned(), format!("pgdr-{}-{}", self.env.name, resource)),
        ];
        for (k, v) in &self.env.settings.tags {
            if k != "Name" {
                t.push((k.clone(), v.clone()));
            }
        }
        t
    }
}

impl Cx {
    /// Calls `call`, which uses `ids`; while it answers "not found" for an ID this run just
    /// created, asks again (EC2 API reference, "Eventual consistency in the Amazon EC2 API":
    /// a resource just created may not be visible to the next call). An ID this run has not seen
    /// exist that is not found is an error at once.
    pub async fn settle<T>(
        &self,
        ids: &[&str],
        what: &str,
        mut call: impl AsyncFnMut() -> crate::error::Result<T>,
    ) -> crate::error::Result<T> {
        use crate::wait::{Look, Pace, Wait};
        if !ids.iter().any(|id| self.fresh.contains(id)) {
            return call().await;
        }
        Wait::new(what)
            .budget(FRESH_BUDGET)
            .pace(Pace::FAST)
            .hint("the new resource never became visible; rerun the command")
            .until(&self.cancel, &self.clients.reads, async || match call().await {
                Ok(v) => Ok(Look::Ready(v)),
                Err(crate::error::Error::Aws(e)) if e.is_not_found() => {
                    Ok(Look::Pending("not visible yet (EC2 eventual consistency)".into()))
                }
                Err(e) => Err(e),
            })
            .await
    }

    /// The side in the configured primary region. Resources that do not move with the roles
    /// (the secret, the peering) stay there; after a `reprotect` the roles are swapped and this
    /// is the DR side.
    pub fn home(&self) -> Side {
        if self.env.swapped {
            Side::Dr
        } else {
            Side::Primary
        }
    }

    /// The side that holds the writer now: the primary region until a failover moved it.
    pub fn writer(&self) -> Side {
        let w = self.store.snapshot().topology.writer_region;
        if !w.is_empty() && w == self.region(Side::Dr) {
            Side::Dr
        } else {
            Side::Primary
        }
    }
}
