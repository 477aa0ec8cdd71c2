//! Invoking pgdr's data-plane function (`pgdr-<env>-agent`, see [`crate::steps::agent`]).
//!
//! Each invocation carries what the function needs to reach PostgreSQL: the master credential
//! read from Secrets Manager by this run, and the CA bundle that signs the RDS certificates.
//! The credential travels only in the invocation's payload, over Lambda's HTTPS API: it is
//! never in the function's environment, never logged (the SDK redacts the payload, which the
//! Lambda model marks sensitive), never stored, never in an error message.

use aws_sdk_lambda::primitives::Blob;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::aws::Call;
use crate::cx::{Cx, Side};
use crate::error::{Error, Result};
use crate::steps::{agent, secrets};

/// The longest one invocation of the marker writer runs (the function's timeout is 900 s).
pub const WRITER_MAX_S: u64 = 840;
/// The table of the drill's marker rows.
pub const MARKER_TABLE: &str = "pgdr_drill_markers";

/// A login role the fence makes read-only, and its setting before (restored by `unguard`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GuardedRole {
    pub role: String,
    pub previous: Option<String>,
}

/// What `check` answers.
#[derive(Debug, Deserialize)]
pub struct Check {
    pub in_recovery: bool,
    #[serde(default)]
    pub server_version: String,
    #[serde(default)]
    pub roles: Vec<GuardedRole>,
}

/// What `fence` answers: the primary's WAL position once no other session is left.
#[derive(Debug, Deserialize)]
pub struct Fenced {
    pub lsn: String,
    #[serde(default)]
    pub sessions_ended: u64,
}

/// What `catchup` answers.
#[derive(Debug, Deserialize)]
pub struct Catchup {
    pub caught_up: bool,
    pub target_lsn: String,
    #[serde(default)]
    pub replayed_lsn: Option<String>,
    #[serde(default)]
    pub waited_ms: u64,
}

/// What the marker writer answers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Written {
    pub run_id: String,
    #[serde(default)]
    pub attempts: u64,
    /// Ranges `[first, last]` of acknowledged sequence numbers.
    #[serde(default)]
    pub acked: Vec<[u64; 2]>,
    #[serde(default)]
    pub acked_count: u64,
    #[serde(default)]
    pub failed_count: u64,
    #[serde(default)]
    pub longest_gap_s: f64,
}

/// What `markers` answers.
#[derive(Debug, Deserialize)]
pub struct Markers {
    #[serde(default)]
    pub present: Vec<[u64; 2]>,
    #[serde(default)]
    pub count: u64,
}

/// Acknowledged sequence numbers missing from `present`.
pub fn missing(acked: &[[u64; 2]], present: &[[u64; 2]]) -> u64 {
    acked
        .iter()
        .map(|&[a, b]| {
            let covered: u64 = present.iter().map(|&[p, q]| if p.max(a) <= q.min(b) { q.min(b) - p.max(a) + 1 } else { 0 }).sum();
            (b.saturating_sub(a) + 1).saturating_sub(covered)
        })
        .sum()
}

#[derive(Serialize)]
struct Credentials<'a> {
    username: &'a str,
    password: &'a str,
}

/// The agents of an environment, with what their invocations carry.
pub struct Agents<'a> {
    cx: &'a Cx,
    username: String,
    password: secrets::Password,
    ca_bundle: String,
}

impl<'a> Agents<'a> {
    /// Reads the CA bundle (the `tls_ca_bundle` setting) and the master credential.
    pub async fn new(cx: &'a Cx) -> Result<Agents<'a>> {
        let ca_bundle = ca_bundle(cx)?;
        let (username, password) = secrets::read_credentials(cx).await?;
        Ok(Agents { cx, username, password, ca_bundle })
    }

    /// Runs `action` on the agent in `side`'s region and decodes its answer.
    pub async fn call<T: DeserializeOwned>(&self, side: Side, action: &str, mut args: serde_json::Value) -> Result<T> {
        let cx = self.cx;
        let reg = cx.regional(side);
        let name = agent::function_name(cx);
        if let Some(map) = args.as_object_mut() {
            map.insert("action".into(), action.into());
            map.insert("database".into(), cx.env.settings.database_name.clone().into());
            map.insert("port".into(), 5432.into());
            map.insert("ca_bundle".into(), self.ca_bundle.clone().into());
            let creds = Credentials { username: &self.username, password: &self.password.0 };
            map.insert("credentials".into(), serde_json::to_value(creds).map_err(|e| Error::Other(format!("internal: {e}")))?);
        }
        let payload = serde_json::to_vec(&args).map_err(|e| Error::Other(format!("internal: {e}")))?;
        let out = reg
            .lambda
            .invoke()
            .function_name(&name)
            .payload(Blob::new(payload))
            .customize()
            .config_override(long_invoke())
            .send()
            .aws(&reg.region)
            .await?;
        let body = out.payload.as_ref().map(|b| b.as_ref().to_vec()).unwrap_or_default();
        if let Some(kind) = out.function_error.as_deref() {
            return Err(Error::failed(format!(
                "the agent {name} in {} failed to {action} ({kind}): {}; its log group /aws/lambda/{name} has the details",
                reg.region,
                function_message(&body)
            )));
        }
        serde_json::from_slice(&body).map_err(|e| {
            Error::failed(format!(
                "the agent {name} in {} answered {action} with something pgdr does not read ({e}); redeploy it with `pgdr up`",
                reg.region
            ))
        })
    }
}

/// Timeouts for a synchronous Invoke: Lambda answers when the handler returns, up to the
/// function's timeout later (the marker writer runs for minutes), so the clients' usual 60 s
/// read timeout would cut the answer off and the SDK would invoke again, running the action
/// twice ("How do I troubleshoot retry and timeout issues when I invoke a Lambda function
/// using an AWS SDK?", AWS Knowledge Center). One attempt may last the function's timeout plus
/// a margin; the whole call fits one such attempt after any retries of a refused one (a
/// throttled Invoke never ran).
fn long_invoke() -> aws_sdk_lambda::config::Builder {
    let attempt = Duration::from_secs(agent::TIMEOUT_S.unsigned_abs().into()) + Duration::from_secs(30);
    aws_sdk_lambda::config::Builder::default().timeout_config(
        aws_smithy_types::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(attempt)
            .operation_attempt_timeout(attempt)
            .operation_timeout(attempt + Duration::from_secs(60))
            .build(),
    )
}

/// The one line of a function error (`errorMessage`), without a stack trace.
fn function_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct FunctionError {
        #[serde(rename = "errorMessage", default)]
        message: String,
    }
    let text =
        serde_json::from_slice::<FunctionError>(body).map(|e| e.message).unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    crate::error::one_line(&text)
}

/// The CA certificates the agent verifies the servers with.
fn ca_bundle(cx: &Cx) -> Result<String> {
    const FIX: &str = "download AWS's RDS bundle (https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem) and set tls_ca_bundle to its path in pgdr.toml";
    let Some(path) = cx.env.settings.tls_ca_bundle.as_deref() else {
        return Err(Error::user(format!("tls_ca_bundle is not set: the agent verifies the database's TLS certificate; {FIX}")));
    };
    let text = std::fs::read_to_string(path).map_err(|e| Error::user(format!("cannot read tls_ca_bundle {path}: {e}; {FIX}")))?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(Error::user(format!("tls_ca_bundle {path} holds no PEM certificate; {FIX}")));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_counts_acknowledged_rows_not_found() {
        assert_eq!(missing(&[[1, 10]], &[[1, 10]]), 0);
        assert_eq!(missing(&[[1, 10]], &[[1, 4], [7, 10]]), 2);
        assert_eq!(missing(&[[1, 3], [5, 6]], &[[2, 5]]), 2);
        assert_eq!(missing(&[[1, 3]], &[]), 3);
        // Rows present but never acknowledged (a commit whose answer was lost) are not loss.
        assert_eq!(missing(&[[2, 2]], &[[1, 3]]), 0);
    }
}
