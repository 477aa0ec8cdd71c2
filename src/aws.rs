//! One place for what an AWS call is and what its error means.
//!
//! - [`Call::aws`] sends an SDK call and turns its error into [`AwsError`], naming the service
//!   and the operation from the call's own types: `ec2.create_vpc()….send().aws(region).await`.
//! - [`Kind`] is what an error *means* to pgdr (not found, already exists, in use, …), decided
//!   here from per-service code tables and the few messages AWS documents; call sites ask
//!   `e.is_not_found()` and never match codes or messages themselves.

use std::fmt;
use std::future::Future;

use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use aws_types::request_id::RequestId;

use crate::error::{AwsError, Transport};

/// What an AWS error means to pgdr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The resource does not exist (or no longer does).
    NotFound,
    /// A resource with that name or token exists already.
    AlreadyExists,
    /// Something still uses the resource (`DependencyViolation`, `DeleteConflict`, a non-empty zone).
    InUse,
    /// The resource is in a state that does not allow the call now.
    InvalidState,
    /// Slow down and ask again: throttling, a prior request still running, the service busy.
    Throttled,
    /// IAM changes not yet visible to the service that uses them.
    Propagation,
    /// No answer: endpoint unreachable or timed out.
    Unreachable,
    /// AWS refused the credentials themselves (unknown key, bad signature, expired token).
    BadCredentials,
    /// The caller may not do this (IAM or a bucket policy said no).
    AccessDenied,
    /// A conditional request's condition did not hold (S3 `If-Match` / `If-None-Match`: 412).
    PreconditionFailed,
    Other,
}

/// An error code (and, where AWS documents one, a message fragment) with its meaning.
struct Rule {
    code: Code,
    message: Option<&'static str>,
    kind: Kind,
}

enum Code {
    Exact(&'static str),
    Suffix(&'static str),
}

const fn exact(code: &'static str, kind: Kind) -> Rule {
    Rule { code: Code::Exact(code), message: None, kind }
}
const fn suffix(code: &'static str, kind: Kind) -> Rule {
    Rule { code: Code::Suffix(code), message: None, kind }
}
const fn with_message(code: &'static str, message: &'static str, kind: Kind) -> Rule {
    Rule { code: Code::Exact(code), message: Some(message), kind }
}

use Kind::*;

/// Codes every service uses the same way (the SDK's standard retry classifier lists these).
#[rustfmt::skip]
const COMMON: &[Rule] = &[
    exact("Throttling", Throttled), exact("ThrottlingException", Throttled), exact("ThrottledException", Throttled),
    exact("RequestLimitExceeded", Throttled), exact("TooManyRequestsException", Throttled), exact("RequestThrottled", Throttled),
    exact("RequestThrottledException", Throttled), exact("PriorRequestNotComplete", Throttled), exact("SlowDown", Throttled),
    exact("ServiceUnavailable", Throttled), exact("InternalFailure", Throttled), exact("InternalError", Throttled),
    exact("InternalServiceError", Throttled), exact("ServiceException", Throttled),
    exact("InvalidClientTokenId", BadCredentials), exact("SignatureDoesNotMatch", BadCredentials),
    exact("ExpiredToken", BadCredentials), exact("ExpiredTokenException", BadCredentials),
    exact("UnrecognizedClientException", BadCredentials), exact("AuthFailure", BadCredentials),
    exact("AccessDenied", AccessDenied), exact("AccessDeniedException", AccessDenied),
];

/// EC2 error codes: "Error codes for the Amazon EC2 API" (every `….NotFound` is a not-found).
#[rustfmt::skip]
const EC2: &[Rule] = &[
    suffix(".NotFound", NotFound), suffix(".Malformed", Other), exact("InvalidPermission.Duplicate", AlreadyExists),
    exact("InvalidGroup.Duplicate", AlreadyExists), exact("RouteAlreadyExists", AlreadyExists),
    exact("DependencyViolation", InUse), exact("InvalidGroup.InUse", InUse), exact("InvalidNetworkInterface.InUse", InUse),
    exact("IncorrectState", InvalidState), exact("InvalidStateTransition", InvalidState),
    // Deleting a network interface still attached ("Network interface 'eni-…' is currently in use.").
    with_message("InvalidParameterValue", "currently in use", InUse),
];

/// RDS: the `…NotFound(Fault)` family, `InvalidDBInstanceState`, `…AlreadyExists(Fault)`.
#[rustfmt::skip]
const RDS: &[Rule] = &[
    exact("DBInstanceNotFound", NotFound), exact("DBInstanceNotFoundFault", NotFound),
    exact("DBSubnetGroupNotFoundFault", NotFound), exact("DBParameterGroupNotFound", NotFound),
    exact("DBParameterGroupNotFoundFault", NotFound), exact("DBSnapshotNotFound", NotFound), exact("DBSnapshotNotFoundFault", NotFound),
    exact("DBInstanceAlreadyExists", AlreadyExists), exact("DBInstanceAlreadyExistsFault", AlreadyExists),
    exact("DBSubnetGroupAlreadyExists", AlreadyExists), exact("DBSubnetGroupAlreadyExistsFault", AlreadyExists),
    exact("DBParameterGroupAlreadyExists", AlreadyExists), exact("DBParameterGroupAlreadyExistsFault", AlreadyExists),
    exact("DBSnapshotAlreadyExists", AlreadyExists), exact("DBSnapshotAlreadyExistsFault", AlreadyExists),
    exact("InvalidDBInstanceState", InvalidState), exact("InvalidDBInstanceStateFault", InvalidState),
    exact("InvalidDBSubnetGroupStateFault", InUse), exact("InvalidDBParameterGroupState", InUse),
    exact("InvalidDBParameterGroupStateFault", InUse),
];

/// Route 53: `NoSuch…`; a DELETE of a record that is not there is an `InvalidChangeBatch` whose
/// message says "not found" (Route 53 API reference, ChangeResourceRecordSets).
#[rustfmt::skip]
const ROUTE53: &[Rule] = &[
    exact("NoSuchHostedZone", NotFound), exact("NoSuchHealthCheck", NotFound), exact("NoSuchChange", NotFound),
    with_message("InvalidChangeBatch", "not found", NotFound),
    with_message("InvalidChangeBatch", "already exists", AlreadyExists),
    exact("HostedZoneAlreadyExists", AlreadyExists), exact("HealthCheckAlreadyExists", AlreadyExists),
    exact("HostedZoneNotEmpty", InUse), exact("HealthCheckInUse", InUse),
];

/// IAM: `NoSuchEntity`, `EntityAlreadyExists`, `DeleteConflict` (policies still attached).
#[rustfmt::skip]
const IAM: &[Rule] = &[
    exact("NoSuchEntity", NotFound), exact("EntityAlreadyExists", AlreadyExists), exact("DeleteConflict", InUse),
];

/// Lambda. A role just created or changed is refused by `CreateFunction` with one of two
/// messages until IAM has propagated it (Lambda developer guide, "Troubleshoot execution role").
#[rustfmt::skip]
const LAMBDA: &[Rule] = &[
    exact("ResourceNotFoundException", NotFound),
    with_message("InvalidParameterValueException", "cannot be assumed by Lambda", Propagation),
    with_message("InvalidParameterValueException", "does not have permissions to call CreateNetworkInterface", Propagation),
    with_message("ResourceConflictException", "already exist", AlreadyExists),
    exact("ResourceConflictException", InvalidState), exact("ResourceInUseException", InUse),
];

#[rustfmt::skip]
const SECRETS: &[Rule] = &[
    exact("ResourceNotFoundException", NotFound), exact("ResourceExistsException", AlreadyExists),
    exact("InvalidRequestException", InvalidState),
];

#[rustfmt::skip]
const LOGS: &[Rule] = &[exact("ResourceNotFoundException", NotFound), exact("ResourceAlreadyExistsException", AlreadyExists)];

#[rustfmt::skip]
const CLOUDWATCH: &[Rule] = &[exact("ResourceNotFound", NotFound), exact("ResourceNotFoundException", NotFound)];

#[rustfmt::skip]
const SNS: &[Rule] = &[exact("NotFound", NotFound), exact("NotFoundException", NotFound)];

/// S3: `NoSuchKey`/`NoSuchBucket` (and `NotFound`, a HEAD's 404 without a body); a conditional
/// write's condition failing is `PreconditionFailed` (412); `ConditionalRequestConflict` (409) is
/// a concurrent conditional write on the same key, to be retried (S3 user guide, "Conditional
/// writes").
#[rustfmt::skip]
const S3: &[Rule] = &[
    exact("NoSuchKey", NotFound), exact("NoSuchBucket", NotFound), exact("NotFound", NotFound), exact("NoSuchVersion", NotFound),
    exact("PreconditionFailed", PreconditionFailed), exact("ConditionalRequestConflict", Throttled),
    exact("Forbidden", AccessDenied),
];

#[rustfmt::skip]
const EVENTS: &[Rule] = &[exact("ResourceNotFoundException", NotFound), exact("ResourceAlreadyExistsException", AlreadyExists)];

fn table(service: &str) -> &'static [Rule] {
    match service {
        "ec2" => EC2,
        "rds" => RDS,
        "route53" => ROUTE53,
        "iam" => IAM,
        "lambda" => LAMBDA,
        "secretsmanager" => SECRETS,
        "logs" => LOGS,
        "cloudwatch" => CLOUDWATCH,
        "sns" => SNS,
        "events" => EVENTS,
        "s3" => S3,
        _ => &[],
    }
}

/// The meaning of an error from `service`, by its transport failure, code and message.
pub fn classify(service: &str, transport: Transport, code: Option<&str>, message: Option<&str>) -> Kind {
    match transport {
        Transport::Unreachable | Transport::Timeout => return Unreachable,
        Transport::Other => return Other,
        Transport::Service => {}
    }
    let Some(code) = code else { return Other };
    let message = message.unwrap_or("");
    let matches = |r: &&Rule| {
        let code_ok = match r.code {
            Code::Exact(c) => c == code,
            Code::Suffix(s) => code.ends_with(s),
        };
        code_ok && r.message.is_none_or(|m| message.contains(m))
    };
    // Rules with a message are more specific: a table lists them before the code alone.
    table(service).iter().chain(COMMON).find(matches).map(|r| r.kind).unwrap_or(Other)
}

/// Whether a code and message from `service` (as in a batch answer's per-item error) mean "not found".
pub fn is_not_found(service: &str, code: Option<&str>, message: Option<&str>) -> bool {
    classify(service, Transport::Service, code, message) == NotFound
}

/// The service label and operation name of an SDK call, from its error type's path
/// (`aws_sdk_ec2::operation::create_vpc::CreateVpcError` is ec2 / CreateVpc).
pub fn names_of<E>() -> (&'static str, &'static str) {
    names(std::any::type_name::<E>())
}

fn names(path: &'static str) -> (&'static str, &'static str) {
    let krate = path.split("::").next().unwrap_or("");
    let service = match krate.strip_prefix("aws_sdk_").unwrap_or(krate) {
        "cloudwatchlogs" => "logs",
        "eventbridge" => "events",
        other => other,
    };
    let last = path.rsplit("::").next().unwrap_or(path);
    let last = last.split('<').next().unwrap_or(last);
    (service, last.strip_suffix("Error").unwrap_or(last))
}

/// Sends an SDK call, turning its error into [`AwsError`] (service and operation taken from the
/// call's types, the region given because the call does not say it).
pub trait Call<T, E, R> {
    fn aws(self, region: &str) -> impl Future<Output = Result<T, AwsError>>;
}

impl<F, T, E, R> Call<T, E, R> for F
where
    F: Future<Output = Result<T, SdkError<E, R>>>,
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug + 'static,
    SdkError<E, R>: RequestId,
{
    fn aws(self, region: &str) -> impl Future<Output = Result<T, AwsError>> {
        let region = region.to_owned();
        async move {
            self.await.map_err(|e| {
                let (service, operation) = names_of::<E>();
                tracing::debug!(service, operation, error = ?e, "aws call failed");
                AwsError::from_sdk(service, operation, &region, &e)
            })
        }
    }
}

/// A read through this run's read phase ([`crate::reads`]): `read!(reads, region, builder)`.
/// The key is the builder's type and full input, so two reads share an answer only when they
/// ask exactly the same thing. Returns what [`Call::aws`] returns.
#[macro_export]
macro_rules! read {
    ($reads:expr, $region:expr, $builder:expr) => {{
        let b = $builder;
        let region: &str = $region;
        let key = format!("{}/{}/{:?}", region, ::std::any::type_name_of_val(&b), b.as_input());
        $reads.read(key, async move { $crate::aws::Call::aws(b.send(), region).await }).await
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(service: &str, code: &str, message: &str) -> Kind {
        classify(service, Transport::Service, Some(code), Some(message))
    }

    #[test]
    fn names_come_from_the_call_types() {
        assert_eq!(names_of::<aws_sdk_ec2::operation::create_vpc::CreateVpcError>(), ("ec2", "CreateVpc"));
        assert_eq!(names_of::<aws_sdk_rds::operation::describe_db_instances::DescribeDBInstancesError>(), ("rds", "DescribeDBInstances"));
        assert_eq!(names_of::<aws_sdk_cloudwatchlogs::operation::create_log_group::CreateLogGroupError>(), ("logs", "CreateLogGroup"));
        assert_eq!(names_of::<aws_sdk_eventbridge::operation::put_rule::PutRuleError>(), ("events", "PutRule"));
    }

    #[test]
    fn codes_mean_what_their_service_says() {
        assert_eq!(kind("ec2", "InvalidVpcID.NotFound", ""), NotFound);
        assert_eq!(kind("ec2", "InvalidVpcPeeringConnectionID.NotFound", ""), NotFound);
        assert_eq!(kind("ec2", "DependencyViolation", ""), InUse);
        assert_eq!(kind("ec2", "RequestLimitExceeded", ""), Throttled);
        assert_eq!(kind("rds", "DBInstanceNotFound", ""), NotFound);
        assert_eq!(kind("rds", "InvalidDBInstanceState", ""), InvalidState);
        assert_eq!(kind("iam", "NoSuchEntity", ""), NotFound);
        assert_eq!(kind("iam", "DeleteConflict", ""), InUse);
        assert_eq!(kind("route53", "HostedZoneNotEmpty", ""), InUse);
        assert_eq!(kind("route53", "PriorRequestNotComplete", ""), Throttled);
        // The same code means different things in different services.
        assert_eq!(kind("sns", "NotFound", ""), NotFound);
        assert_eq!(kind("ec2", "NotFound", ""), Other);
        assert_eq!(kind("ec2", "InvalidParameterValue", "Network interface 'eni-1' is currently in use."), InUse);
        assert_eq!(kind("sts", "InvalidClientTokenId", "The security token included in the request is invalid."), BadCredentials);
        assert_eq!(kind("s3", "PreconditionFailed", "At least one of the pre-conditions you specified did not hold"), PreconditionFailed);
        assert_eq!(kind("s3", "ConditionalRequestConflict", ""), Throttled);
        assert_eq!(kind("s3", "NoSuchKey", ""), NotFound);
        assert_eq!(kind("s3", "AccessDenied", ""), AccessDenied);
    }

    #[test]
    fn documented_messages_refine_a_code() {
        let del = "Tried to delete resource record set [name='postgres.x.', type='CNAME', set-identifier='a'] but it was not found";
        assert_eq!(kind("route53", "InvalidChangeBatch", del), NotFound);
        assert_eq!(kind("route53", "InvalidChangeBatch", "RRSet with DNS name x is not permitted in zone y"), Other);
        assert_eq!(
            kind("lambda", "InvalidParameterValueException", "The role defined for the function cannot be assumed by Lambda."),
            Propagation
        );
        assert_eq!(
            kind(
                "lambda",
                "InvalidParameterValueException",
                "The provided execution role does not have permissions to call CreateNetworkInterface on EC2"
            ),
            Propagation
        );
        assert_eq!(kind("lambda", "InvalidParameterValueException", "Unzipped size must be smaller than 262144000 bytes"), Other);
    }

    #[test]
    fn transport_failures_are_unreachable() {
        assert_eq!(classify("ec2", Transport::Timeout, None, None), Unreachable);
        assert_eq!(classify("rds", Transport::Unreachable, None, Some("connection refused")), Unreachable);
        assert_eq!(classify("rds", Transport::Other, None, None), Other);
    }
}
