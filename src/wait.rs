//! Waiting for AWS: poll with backoff and jitter within a budget, tolerate throttling and
//! unknown statuses, stop on terminal ones and on Ctrl-C.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::exec::Cancel;
use crate::reads::Reads;

/// What one look at a resource found.
#[derive(Debug, Clone, PartialEq)]
pub enum Look<T> {
    /// The resource reached the wanted state.
    Ready(T),
    /// Still working; the text is the current status, shown in progress.
    Pending(String),
    /// A terminal status: waiting longer cannot help.
    Failed(String),
}

/// Poll pacing: first look at once, then `first`, growing by half up to `max`, with jitter.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub first: Duration,
    pub max: Duration,
}

impl Pace {
    /// For resources that take minutes: a change is noticed within `max`.
    /// Two instances polled at this pace stay far below the RDS limit of 12 requests/s.
    pub const SLOW: Pace = Pace { first: Duration::from_secs(1), max: Duration::from_secs(3) };
    /// For things that settle in seconds.
    pub const FAST: Pace = Pace { first: Duration::from_millis(250), max: Duration::from_secs(3) };
}

/// When a wait counts as long, and how often it looks from then on.
const LONG_WAIT: Duration = Duration::from_secs(180);
const LONG_WAIT_PACE: Duration = Duration::from_secs(15);

/// Told each status a wait sees and the time waited so far.
type OnStatus<'a> = Box<dyn FnMut(&str, Duration) + 'a>;

/// A wait for AWS: `Wait::new("RDS instance x").budget(d).pace(Pace::SLOW).hint("rerun …")
/// .progress(|status, elapsed| …).until(cancel, reads, look)`.
pub struct Wait<'a> {
    what: String,
    budget: Duration,
    pace: Pace,
    hint: &'a str,
    progress: OnStatus<'a>,
}

impl<'a> Wait<'a> {
    /// A wait named `what` in messages: ten minutes, fast pace, "rerun the command" when it runs out.
    pub fn new(what: impl Into<String>) -> Wait<'a> {
        Wait {
            what: what.into(),
            budget: Duration::from_secs(600),
            pace: Pace::FAST,
            hint: "rerun the command",
            progress: Box::new(|_, _| {}),
        }
    }
    pub fn budget(mut self, budget: Duration) -> Self {
        self.budget = budget;
        self
    }
    pub fn pace(mut self, pace: Pace) -> Self {
        self.pace = pace;
        self
    }
    /// What the operator should do when the budget runs out.
    pub fn hint(mut self, hint: &'a str) -> Self {
        self.hint = hint;
        self
    }
    /// Called with each status seen and the time waited so far.
    pub fn progress(mut self, f: impl FnMut(&str, Duration) + 'a) -> Self {
        self.progress = Box::new(f);
        self
    }

    /// Polls `look` until it is ready, failed, cancelled or out of budget. A wait expects
    /// something to change: every look after the first reads afresh (`reads` is emptied before
    /// it), so no answer kept from before the wait is seen twice.
    pub async fn until<T>(self, cancel: &Cancel, reads: &Reads, look: impl AsyncFnMut() -> Result<Look<T>>) -> Result<T> {
        let Wait { what, budget, pace, hint, progress } = self;
        poll(&what, budget, pace, cancel, reads, progress, hint, look).await
    }
}

#[allow(clippy::too_many_arguments)] // private: the builder above is the interface
async fn poll<T>(
    what: &str,
    budget: Duration,
    pace: Pace,
    cancel: &Cancel,
    reads: &Reads,
    mut on_status: OnStatus<'_>,
    hint: &str,
    mut look: impl AsyncFnMut() -> Result<Look<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut delay = pace.first;
    let mut last = String::new();
    let mut first = true;
    loop {
        cancel.check()?;
        if !std::mem::take(&mut first) {
            reads.changed();
        }
        match look().await {
            Ok(Look::Ready(v)) => return Ok(v),
            Ok(Look::Failed(status)) => {
                return Err(Error::failed(format!(
                    "{what} reached status {status:?}, which will not resolve by waiting; see the AWS console events for it"
                )))
            }
            Ok(Look::Pending(status)) => {
                if status != last {
                    tracing::info!(what, status, elapsed_s = start.elapsed().as_secs(), "waiting");
                }
                on_status(&status, start.elapsed());
                last = status;
            }
            Err(Error::Aws(e)) if e.is_transient() => {
                tracing::warn!(what, error = %e, "transient error while waiting; will look again");
            }
            Err(e) => return Err(e),
        }
        if start.elapsed() + delay > budget {
            return Err(Error::failed(format!(
                "{what} is still {} after {}; it stays recorded in state: {hint}",
                if last.is_empty() { "not ready".to_owned() } else { format!("{last:?}") },
                human(budget)
            )));
        }
        let jitter = Duration::from_millis(fastrand::u64(0..=delay.as_millis() as u64 / 5));
        tokio::select! {
            _ = tokio::time::sleep(delay + jitter) => {}
            _ = cancelled(cancel) => return Err(Error::Interrupted),
        }
        delay = (delay * 3 / 2).min(pace.max);
        // A long wait is not worth a call every few seconds: after the first minutes, look every
        // 15 s or more (RDS and EC2 throttle busy accounts; the answer rarely changes faster).
        if start.elapsed() > LONG_WAIT {
            delay = delay.max(LONG_WAIT_PACE);
        }
    }
}

async fn cancelled(cancel: &Cancel) {
    while !cancel.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}.{}s", s, d.subsec_millis() / 100)
    }
}

/// RDS instance statuses: which are terminal, which mean "available".
pub fn rds_status(status: &str) -> Look<()> {
    match status {
        // After a storage change RDS optimizes the volume for hours, fully usable meanwhile.
        "available" | "storage-optimization" => Look::Ready(()),
        "failed"
        | "storage-full"
        | "inaccessible-encryption-credentials"
        | "inaccessible-encryption-credentials-recoverable"
        | "restore-error" => Look::Failed(status.to_owned()),
        s if s.starts_with("incompatible-") => Look::Failed(s.to_owned()),
        // Any other status, including ones AWS adds later, means "still working".
        s => Look::Pending(s.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn aws_err(code: &str) -> Error {
        Error::Aws(Box::new(crate::error::AwsError {
            service: "rds",
            operation: "DescribeDBInstances",
            region: "us-east-1".into(),
            code: Some(code.into()),
            message: None,
            request_id: Some("req-1".into()),
            transport: crate::error::Transport::Service,
        }))
    }

    const QUICK: Pace = Pace { first: Duration::from_millis(1), max: Duration::from_millis(2) };

    async fn run(seq: Vec<Result<&'static str, &'static str>>, budget_ms: u64) -> (Result<()>, usize) {
        let calls = Cell::new(0usize);
        let r = Wait::new("db pgdr-dev")
            .budget(Duration::from_millis(budget_ms))
            .pace(QUICK)
            .hint("rerun `pgdr up`")
            .until(&Cancel::default(), &Reads::default(), async || {
                let i = calls.get();
                calls.set(i + 1);
                match seq.get(i).or(seq.last()).cloned().unwrap() {
                    Ok(s) => Ok(rds_status(s)),
                    Err(code) => Err(aws_err(code)),
                }
            })
            .await;
        (r, calls.get())
    }

    #[tokio::test]
    async fn creating_then_available() {
        let (r, n) = run(vec![Ok("creating"), Ok("backing-up"), Ok("available")], 5_000).await;
        assert!(r.is_ok());
        assert_eq!(n, 3);
    }

    #[tokio::test]
    async fn storage_optimization_is_usable() {
        let (r, n) = run(vec![Ok("modifying"), Ok("storage-optimization"), Ok("modifying")], 5_000).await;
        assert!(r.is_ok());
        assert_eq!(n, 2);
    }

    #[tokio::test]
    async fn unknown_status_keeps_waiting() {
        let (r, n) = run(vec![Ok("delete-precheck"), Ok("configuring-enhanced-monitoring"), Ok("available")], 5_000).await;
        assert!(r.is_ok());
        assert_eq!(n, 3);
    }

    #[tokio::test]
    async fn terminal_status_is_an_error_naming_it() {
        let (r, n) = run(vec![Ok("creating"), Ok("incompatible-parameters"), Ok("available")], 5_000).await;
        let e = r.unwrap_err().to_string();
        assert!(e.contains("incompatible-parameters"), "{e}");
        assert_eq!(n, 2);
    }

    #[tokio::test]
    async fn budget_expiry_says_to_rerun() {
        let (r, n) = run(vec![Ok("creating")], 30).await;
        let e = r.unwrap_err().to_string();
        assert!(e.contains("still \"creating\"") && e.contains("rerun `pgdr up`"), "{e}");
        assert!(n >= 2);
    }

    #[tokio::test]
    async fn throttling_during_polls_is_tolerated() {
        let (r, n) = run(vec![Err("Throttling"), Err("ThrottlingException"), Ok("available")], 5_000).await;
        assert!(r.is_ok());
        assert_eq!(n, 3);
        let (r, _) = run(vec![Err("AccessDenied")], 5_000).await;
        assert!(r.unwrap_err().to_string().contains("AccessDenied"));
    }
}
