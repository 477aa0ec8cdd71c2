//! AWS clients: one `SdkConfig`, one client per service per region, built once and shared.

use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_types::region::Region;
use aws_types::SdkConfig;

use crate::error::{Error, Result};
use crate::reads::{Reads, WatchChanges};
use crate::silence::{Listen, Silence};

/// How to reach AWS: the standard chain plus the command line's overrides.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    pub profile: Option<String>,
    pub endpoint_url: Option<String>,
    pub retry_max_attempts: u32,
}

/// The clients of one region.
#[derive(Clone, Debug)]
pub struct Regional {
    pub region: String,
    pub ec2: aws_sdk_ec2::Client,
    pub rds: aws_sdk_rds::Client,
    pub secrets: aws_sdk_secretsmanager::Client,
    pub cloudwatch: aws_sdk_cloudwatch::Client,
    pub logs: aws_sdk_cloudwatchlogs::Client,
    pub lambda: aws_sdk_lambda::Client,
    pub sns: aws_sdk_sns::Client,
    pub events: aws_sdk_eventbridge::Client,
    /// This run's reads, shared with the other region and the global services.
    pub reads: Arc<Reads>,
}

/// Every client pgdr uses. Route 53 and IAM are global.
#[derive(Clone, Debug)]
pub struct Clients {
    pub primary: Arc<Regional>,
    pub dr: Arc<Regional>,
    pub route53: aws_sdk_route53::Client,
    pub iam: aws_sdk_iam::Client,
    pub sts: aws_sdk_sts::Client,
    pub endpoint: Option<String>,
    pub reads: Arc<Reads>,
    /// The ARN STS named the caller by (`arn:<partition>:sts::<account>:...`): the account and
    /// partition every resource of the run is made in.
    pub caller_arn: Option<String>,
}

/// A service client whose calls are watched for changes (see [`crate::reads`]) and that stops
/// waiting for a region that did not answer (see [`crate::silence`]).
macro_rules! client {
    ($krate:ident, $conf:expr, $watch:expr, $silence:expr, $key:expr) => {
        $krate::Client::from_conf(
            $krate::config::Builder::from($conf)
                .interceptor($watch.clone())
                .interceptor(Listen { key: $key.to_owned(), silence: $silence.clone() })
                .build(),
        )
    };
}

fn regional(base: &SdkConfig, region: &str, watch: &WatchChanges, silence: &Arc<Silence>) -> Regional {
    let conf = base.to_builder().region(Region::new(region.to_owned())).build();
    Regional {
        region: region.to_owned(),
        ec2: client!(aws_sdk_ec2, &conf, watch, silence, region),
        rds: client!(aws_sdk_rds, &conf, watch, silence, region),
        secrets: client!(aws_sdk_secretsmanager, &conf, watch, silence, region),
        cloudwatch: client!(aws_sdk_cloudwatch, &conf, watch, silence, region),
        logs: client!(aws_sdk_cloudwatchlogs, &conf, watch, silence, region),
        lambda: client!(aws_sdk_lambda, &conf, watch, silence, region),
        sns: client!(aws_sdk_sns, &conf, watch, silence, region),
        events: client!(aws_sdk_eventbridge, &conf, watch, silence, region),
        reads: watch.reads.clone(),
    }
}

/// Loads the shared config (profiles, env vars, SSO, `AWS_ENDPOINT_URL`) for `region` and
/// resolves the credentials, so a missing credential is one clear line before any call.
pub async fn load_config(conn: &Connection, region: &str) -> Result<SdkConfig> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(conn.retry_max_attempts.max(1))
                .with_initial_backoff(Duration::from_millis(500))
                .with_max_backoff(Duration::from_secs(20)),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .read_timeout(Duration::from_secs(60))
                .operation_attempt_timeout(Duration::from_secs(90))
                .operation_timeout(Duration::from_secs(300))
                .build(),
        );
    if let Some(p) = &conn.profile {
        loader = loader.profile_name(p);
    }
    if let Some(u) = &conn.endpoint_url {
        loader = loader.endpoint_url(u);
    }
    let base = loader.load().await;
    check_credentials(&base).await?;
    Ok(base)
}

/// Builds the clients of both regions; the endpoint is checked with one call first.
/// Unless `writes_allowed`, the clients refuse every call that is not a read.
pub async fn build(conn: &Connection, primary_region: &str, dr_region: &str, writes_allowed: bool) -> Result<Clients> {
    let base = load_config(conn, primary_region).await?;
    let silence = Arc::new(Silence::default());
    let caller_arn = check_reachable(&base, primary_region, dr_region, &silence).await?;
    let endpoint = base.endpoint_url().map(str::to_owned);
    if let Some(e) = &endpoint {
        tracing::info!(endpoint = %e, "all AWS calls go to a custom endpoint");
    }
    // Route 53 and IAM are global services, signed in us-east-1 (the settings admit only regions
    // of the aws partition: see config::validate).
    let global = base.to_builder().region(Region::from_static("us-east-1")).build();
    let reads = Reads::new();
    let watch = WatchChanges { reads: reads.clone(), writes_allowed };
    Ok(Clients {
        primary: Arc::new(regional(&base, primary_region, &watch, &silence)),
        dr: Arc::new(regional(&base, dr_region, &watch, &silence)),
        route53: client!(aws_sdk_route53, &global, watch, silence, "Route 53"),
        iam: client!(aws_sdk_iam, &global, watch, silence, "IAM"),
        sts: aws_sdk_sts::Client::new(&base),
        endpoint,
        reads,
        caller_arn,
    })
}

async fn check_credentials(conf: &SdkConfig) -> Result<()> {
    use aws_credential_types::provider::ProvideCredentials;
    let Some(provider) = conf.credentials_provider() else {
        return Err(no_credentials("no credentials provider is configured"));
    };
    provider.provide_credentials().await.map(|_| ()).map_err(|e| no_credentials(&crate::error::one_line(&e.to_string())))
}

/// One call before any step: an endpoint that does not answer, or credentials AWS refuses, is
/// one line with the fix, not one failure per step.
///
/// STS is asked in both regions at once, and the first answer decides: a lost primary region is
/// the disaster `failover` is for, and must neither stop it nor make it wait for the lost
/// region's timeouts (STS regional endpoints are served by each region: "Managing AWS STS in an
/// AWS Region", IAM user guide). Only every region silent is "cannot reach AWS". A region found
/// silent here is not asked again for a while (`silence`). Returns the caller's ARN.
async fn check_reachable(conf: &SdkConfig, primary_region: &str, dr_region: &str, silence: &Arc<Silence>) -> Result<Option<String>> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let dr_conf = conf.to_builder().region(Region::new(dr_region.to_owned())).build();
    let mut asks: FuturesUnordered<_> = [(conf, primary_region), (&dr_conf, dr_region)]
        .into_iter()
        .take(if dr_region == primary_region { 1 } else { 2 })
        .map(|(c, region)| caller_identity(c, region, silence))
        .collect();
    let mut silent = Vec::new();
    while let Some(answer) = asks.next().await {
        match answer {
            Ok(arn) => {
                if let Some(e) = silent.first() {
                    tracing::warn!(error = %e, "a region does not answer; going on through the other");
                }
                return Ok(arn);
            }
            Err(e) if !e.is_unreachable() => return Err(check_failure(conf, e)),
            Err(e) => silent.push(e),
        }
    }
    Err(check_failure(conf, silent.remove(0)))
}

/// The one line for a failed check: unreachable, credentials refused, or AWS's own error.
fn check_failure(conf: &SdkConfig, e: crate::error::AwsError) -> Error {
    let endpoint = conf.endpoint_url().map(|u| format!(" at {u}")).unwrap_or_default();
    let why = crate::error::one_line(e.message.as_deref().unwrap_or(""));
    if e.is_unreachable() {
        return Error::failed(format!(
            "cannot reach AWS{endpoint} ({why}); check your network, --endpoint-url and AWS_ENDPOINT_URL, then rerun"
        ));
    }
    if e.kind() == crate::aws::Kind::BadCredentials {
        return Error::user(format!(
            "AWS refused the credentials ({}: {why}); refresh them (`aws sso login`, or new keys) or choose another --profile",
            e.code.as_deref().unwrap_or("")
        ));
    }
    e.into()
}

async fn caller_identity(
    conf: &SdkConfig,
    region: &str,
    silence: &Arc<Silence>,
) -> std::result::Result<Option<String>, crate::error::AwsError> {
    use crate::aws::Call;
    let listen = Listen { key: region.to_owned(), silence: silence.clone() };
    let sts = aws_sdk_sts::Client::from_conf(aws_sdk_sts::config::Builder::from(conf).interceptor(listen).build());
    sts.get_caller_identity().send().aws(region).await.map(|o| o.arn)
}

fn no_credentials(why: &str) -> Error {
    Error::user(format!(
        "no AWS credentials found ({why}); set AWS_PROFILE or --profile, run `aws sso login`, or export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    ))
}

impl Clients {
    pub fn region(&self, region: &str) -> Option<&Arc<Regional>> {
        if self.primary.region == region {
            Some(&self.primary)
        } else if self.dr.region == region {
            Some(&self.dr)
        } else {
            None
        }
    }
}
