//! The read phase: what AWS answered to this run's reads, kept until pgdr changes something.
//!
//! A command first sends every describe its steps will make, keyed by the IDs in the state file,
//! all at once ([`crate::exec::read_ahead`]). The step walk then finds those answers here
//! instead of asking again one after another: a no-op `up` or a `status` costs one wave of
//! reads, and each resource is read once however many steps and checks look at it.
//!
//! An answer is reused only while nothing has changed. Any call that is not a read (an
//! operation not named `Describe*`, `Get*` or `List*`, seen by an SDK interceptor on every
//! client) drops every kept answer, and so does each look of a wait after its first
//! ([`crate::wait::Wait`]): a poll always asks AWS. Code that must see AWS as it is now,
//! whatever this run read before, calls the SDK directly (`instance::describe`).

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeSerializationInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

#[derive(Default)]
struct Inner {
    /// Bumped by every change; an answer fetched across a bump is not kept.
    epoch: u64,
    answers: HashMap<String, Box<dyn Any + Send>>,
    hits: u64,
}

/// Answers to reads, shared by the clients of both regions and the global services.
#[derive(Default)]
pub struct Reads {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Reads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.lock();
        f.debug_struct("Reads").field("epoch", &i.epoch).field("answers", &i.answers.len()).field("hits", &i.hits).finish()
    }
}

impl Reads {
    pub fn new() -> Arc<Reads> {
        Arc::new(Reads::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer to `key` if this run already has it and nothing changed since; else runs
    /// `fetch` and keeps its answer (unless something changed while it ran).
    pub async fn read<T, F>(&self, key: String, fetch: F) -> T
    where
        T: Clone + Send + 'static,
        F: std::future::Future<Output = T>,
    {
        let epoch = {
            let mut i = self.lock();
            if let Some(v) = i.answers.get(&key).and_then(|v| v.downcast_ref::<T>()).cloned() {
                i.hits += 1;
                tracing::trace!(key, "read answered by the read phase");
                return v;
            }
            i.epoch
        };
        let v = fetch.await;
        let mut i = self.lock();
        if i.epoch == epoch {
            i.answers.insert(key, Box::new(v.clone()));
        }
        v
    }

    /// Something in AWS changed (or is about to): no answer read so far may be reused.
    pub fn changed(&self) {
        let mut i = self.lock();
        i.epoch += 1;
        i.answers.clear();
    }

    /// How many reads were answered without a call.
    pub fn hits(&self) -> u64 {
        self.lock().hits
    }
}

/// Whether an operation only reads (by the AWS naming convention).
pub fn is_read(operation: &str) -> bool {
    ["Describe", "Get", "List"].iter().any(|p| operation.starts_with(p))
}

/// Sees every call of a client: any operation that is not a read invalidates [`Reads`]; in a run
/// that must not change AWS (plan, adopt, status: [`crate::exec::Mode`]) it is refused before it
/// is sent, whatever step sent it.
#[derive(Debug, Clone)]
pub struct WatchChanges {
    pub reads: Arc<Reads>,
    pub writes_allowed: bool,
}

impl Intercept for WatchChanges {
    fn name(&self) -> &'static str {
        "pgdr-watch-changes"
    }

    // Not `read_before_execution`: a client's interceptors run that before the operation's
    // configuration (which names it) is in the bag.
    fn read_before_serialization(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        match cfg.load::<Metadata>() {
            Some(m) if is_read(m.name()) => Ok(()),
            other if !self.writes_allowed => {
                let op = other.map(|m| format!("{} {}", m.service(), m.name())).unwrap_or_else(|| "an unnamed operation".into());
                Err(format!(
                    "pgdr refused to send {op}: this command does not change AWS (internal error: a write outside Recorder::apply)"
                )
                .into())
            }
            // Unknown operations count as changes: reusing a stale answer is worse than a call.
            _ => {
                self.reads.changed();
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test]
    async fn answers_are_reused_until_a_change() {
        let reads = Reads::default();
        let calls = Cell::new(0);
        let fetch = || async {
            calls.set(calls.get() + 1);
            calls.get()
        };
        assert_eq!(reads.read("a".into(), fetch()).await, 1);
        assert_eq!(reads.read("a".into(), fetch()).await, 1);
        assert_eq!(reads.read("b".into(), fetch()).await, 2);
        assert_eq!(reads.hits(), 1);
        reads.changed();
        assert_eq!(reads.read("a".into(), fetch()).await, 3);
        assert_eq!(calls.get(), 3);
    }

    #[tokio::test]
    async fn an_answer_fetched_across_a_change_is_not_kept() {
        let reads = Reads::default();
        let v = reads
            .read("a".to_owned(), async {
                reads.changed();
                1
            })
            .await;
        assert_eq!(v, 1);
        assert_eq!(reads.read("a".to_owned(), async { 2 }).await, 2);
    }

    #[test]
    fn reads_are_told_from_changes() {
        assert!(is_read("DescribeDBInstances") && is_read("GetFunction") && is_read("ListResourceRecordSets"));
        assert!(!is_read("CreateDBInstance") && !is_read("PromoteReadReplica") && !is_read("AuthorizeSecurityGroupIngress"));
    }
}
