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
}

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
