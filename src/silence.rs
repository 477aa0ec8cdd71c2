//! Regions that stopped answering: not waited for again, for a while.
//!
//! A lost region does not refuse calls, it leaves them unanswered: each call waits out its
//! connect timeouts and retries. `failover` during a region loss reads the old primary's region
//! several times (the topology check, the plan, the fence), and each of those would wait the
//! whole retry budget again before the promotion. After one call to a region has failed
//! without an answer (every retry spent, a timeout or a broken connection), calls to that
//! region fail at once, as unreachable, for [`QUIET_FOR`]; then it is asked again.
//!
//! One interceptor per client, keyed by the client's region (Route 53 and IAM, global, have
//! their own keys): a silent region never silences another.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{BeforeSerializationInterceptorContextRef, FinalizerInterceptorContextRef};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

/// How long a region that did not answer is not asked again.
pub const QUIET_FOR: Duration = Duration::from_secs(60);

/// The regions (and global services) that did not answer in this run, and since when.
#[derive(Debug, Default)]
pub struct Silence {
    since: Mutex<HashMap<String, Instant>>,
}

impl Silence {
    fn silent(&self, key: &str) -> Option<Duration> {
        let since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        since.get(key).map(Instant::elapsed).filter(|e| *e < QUIET_FOR)
    }

    fn went_silent(&self, key: &str) {
        self.since.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_owned(), Instant::now());
    }

    fn answered(&self, key: &str) {
        self.since.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// The error a call to a silent region fails with (classified unreachable: see
/// [`crate::error::AwsError::from_sdk`]).
#[derive(Debug)]
pub struct RegionSilent {
    pub key: String,
    pub ago: Duration,
}

impl fmt::Display for RegionSilent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} did not answer {} s ago: not asked again for {} s", self.key, self.ago.as_secs(), QUIET_FOR.as_secs())
    }
}

impl std::error::Error for RegionSilent {}

/// Whether an error (or one of its sources) is a call not sent to a silent region.
pub fn is_region_silent(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<RegionSilent>().is_some() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// The interceptor of one client.
#[derive(Clone, Debug)]
pub struct Listen {
    pub key: String,
    pub silence: Arc<Silence>,
}

impl Intercept for Listen {
    fn name(&self) -> &'static str {
        "pgdr-silence"
    }

    fn read_before_serialization(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        match self.silence.silent(&self.key) {
            Some(ago) => Err(Box::new(RegionSilent { key: self.key.clone(), ago })),
            None => Ok(()),
        }
    }

    fn read_after_execution(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        match context.output_or_error() {
            // An answer, even a refusal, is an answer.
            Some(Ok(_)) => self.silence.answered(&self.key),
            Some(Err(e)) if e.is_timeout_error() || e.is_connector_error() => self.silence.went_silent(&self.key),
            Some(Err(e)) if e.is_response_error() || e.is_operation_error() => self.silence.answered(&self.key),
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_region_is_quiet_for_a_while_and_alone() {
        let s = Silence::default();
        assert!(s.silent("us-east-1").is_none());
        s.went_silent("us-east-1");
        assert!(s.silent("us-east-1").is_some());
        assert!(s.silent("eu-west-1").is_none(), "one region's silence is its own");
        s.answered("us-east-1");
        assert!(s.silent("us-east-1").is_none());
        s.since.lock().unwrap().insert("us-east-1".into(), Instant::now() - QUIET_FOR - Duration::from_secs(1));
        assert!(s.silent("us-east-1").is_none(), "asked again after QUIET_FOR");
    }

    #[test]
    fn the_refusal_is_recognised_through_its_sources() {
        #[derive(Debug)]
        struct Wrap(RegionSilent);
        impl fmt::Display for Wrap {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "wrapped")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Wrap(RegionSilent { key: "us-east-1".into(), ago: Duration::from_secs(3) });
        assert!(is_region_silent(&e));
        assert!(!is_region_silent(&std::io::Error::other("x")));
        assert_eq!(e.0.to_string(), "us-east-1 did not answer 3 s ago: not asked again for 60 s");
    }
}
