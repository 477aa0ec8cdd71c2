//! pgdr's error type and its mapping to exit codes.
//!
//! Every failure an operator can see is one of four kinds, and each kind has one exit code
//! (documented in `--help` and the README). Messages are one line: the problem, then the fix.

use std::fmt;

use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use aws_types::request_id::RequestId;

pub use crate::aws::Kind;

/// Exit codes of the `pgdr` binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    /// Bad flag, bad config, declined confirmation, lock held, corrupt state.
    User = 1,
    /// AWS refused or failed, or something unexpected happened.
    Failure = 2,
    /// Some steps finished, state saved; rerun to finish.
    Partial = 3,
    /// Stopped by Ctrl-C; state saved.
    Interrupted = 130,
}

/// An error raised by an AWS call, with what an operator needs to look it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsError {
    pub service: &'static str,
    pub operation: &'static str,
    pub region: String,
    pub code: Option<String>,
    pub message: Option<String>,
    pub request_id: Option<String>,
    pub transport: Transport,
}

/// How a call failed: AWS answered with an error, or no answer came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// AWS answered with an error.
    Service,
    /// No answer: endpoint unreachable, connection reset, DNS failure.
    Unreachable,
    /// No answer in time.
    Timeout,
    /// The request could not be built or the answer could not be read.
    Other,
}

impl AwsError {
    pub fn from_sdk<E, R>(service: &'static str, operation: &'static str, region: &str, err: &SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: fmt::Debug + 'static,
        SdkError<E, R>: RequestId,
    {
        let transport = match err {
            // Not sent: the region did not answer moments ago (see crate::silence).
            _ if crate::silence::is_region_silent(err) => Transport::Unreachable,
            SdkError::ServiceError(_) => Transport::Service,
            SdkError::TimeoutError(_) => Transport::Timeout,
            SdkError::DispatchFailure(d) if d.is_timeout() => Transport::Timeout,
            SdkError::DispatchFailure(_) => Transport::Unreachable,
            _ => Transport::Other,
        };
        let (code, message) = match err {
            SdkError::ServiceError(_) => (err.code().map(str::to_owned), err.message().map(str::to_owned)),
            other => (None, Some(root_cause(other))),
        };
        AwsError {
            service,
            operation,
            region: region.to_owned(),
            code,
            message,
            request_id: err.request_id().map(str::to_owned),
            transport,
        }
    }

    /// What the error means (decided in [`crate::aws`], nowhere else).
    pub fn kind(&self) -> Kind {
        crate::aws::classify(self.service, self.transport, self.code.as_deref(), self.message.as_deref())
    }
    pub fn is_not_found(&self) -> bool {
        self.kind() == Kind::NotFound
    }
    pub fn is_already_exists(&self) -> bool {
        self.kind() == Kind::AlreadyExists
    }
    pub fn is_in_use(&self) -> bool {
        self.kind() == Kind::InUse
    }
    pub fn is_invalid_state(&self) -> bool {
        self.kind() == Kind::InvalidState
    }
    pub fn is_propagation(&self) -> bool {
        self.kind() == Kind::Propagation
    }
    pub fn is_unreachable(&self) -> bool {
        self.kind() == Kind::Unreachable
    }
    /// Worth asking again later: throttled, busy, or no answer.
    pub fn is_transient(&self) -> bool {
        matches!(self.kind(), Kind::Throttled | Kind::Unreachable)
    }
}

/// Treats "not found" as `None`.
#[allow(clippy::result_large_err)] // the crate's AwsError, large by design (code, message, request ID, region)
pub fn absent<T>(r: Result<T, AwsError>) -> Result<Option<T>, AwsError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Treats "not found" as done (for deletes).
#[allow(clippy::result_large_err)] // as `absent`
pub fn gone<T>(r: Result<T, AwsError>) -> Result<(), AwsError> {
    absent(r).map(|_| ())
}

/// The innermost error's text: the SDK's outer layers only say "dispatch failure".
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &(dyn std::error::Error + 'static) = err;
    let mut text = cur.to_string();
    while let Some(next) = cur.source() {
        cur = next;
        text = cur.to_string();
    }
    text
}

impl fmt::Display for AwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} in {}", self.service, self.operation, self.region)?;
        match self.transport {
            Transport::Service => write!(f, " failed: {}", self.code.as_deref().unwrap_or("unknown error"))?,
            Transport::Unreachable => write!(f, " could not reach the endpoint")?,
            Transport::Timeout => write!(f, " timed out")?,
            Transport::Other => write!(f, " failed")?,
        }
        if let Some(m) = self.message.as_deref().filter(|m| !m.is_empty()) {
            write!(f, ": {}", one_line(m))?;
        }
        if let Some(id) = &self.request_id {
            write!(f, " (request id {id})")?;
        }
        match self.transport {
            Transport::Unreachable => write!(f, "; check your network, --endpoint-url and AWS_ENDPOINT_URL"),
            Transport::Timeout => write!(f, "; rerun the command, it resumes where it stopped"),
            _ => Ok(()),
        }
    }
}

pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: the message names the problem and the fix.
    #[error("{0}")]
    User(String),
    #[error("{0}")]
    Aws(Box<AwsError>),
    /// A wait ran out of budget or a resource reached a terminal status.
    #[error("{0}")]
    Failed(String),
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn user(msg: impl Into<String>) -> Self {
        Error::User(msg.into())
    }
    pub fn failed(msg: impl Into<String>) -> Self {
        Error::Failed(msg.into())
    }
    pub fn exit(&self) -> Exit {
        match self {
            Error::User(_) => Exit::User,
            Error::Interrupted => Exit::Interrupted,
            Error::Aws(_) | Error::Failed(_) | Error::Other(_) => Exit::Failure,
        }
    }
    pub fn aws(&self) -> Option<&AwsError> {
        match self {
            Error::Aws(e) => Some(e),
            _ => None,
        }
    }
}

impl From<AwsError> for Error {
    fn from(e: AwsError) -> Self {
        Error::Aws(Box::new(e))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Other(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
