//! The S3 backend: `<prefix>/<env>.json` and `<prefix>/<env>.lock` in a versioned bucket.
//!
//! - Lock: `PutObject` with `If-None-Match: *` (S3 user guide, "Conditional writes"); refreshed
//!   every [`super::heartbeat_interval`] with `If-Match` on its ETag; released by `DeleteObject`
//!   with `If-Match` ("Conditional deletes", general purpose buckets since September 2025).
//! - State: `PutObject` with `If-Match` on the ETag this run last read or wrote (`If-None-Match:
//!   *` for a new state); `409 ConditionalRequestConflict` is retried, as S3 documents.
//! - A conditional write retried after its answer was lost finds its own write (`412`): each write
//!   carries the run's ID and a sequence number in its metadata, so it is recognised, not taken for
//!   someone else's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

use super::{held_error, Held, HistoryEntry, Loaded, Lock, LockInfo, OpenOptions, RunInfo, S3Url, SaveError, Version};
use crate::aws::{Call, Kind};
use crate::clients::Connection;
use crate::error::{AwsError, Error, Result};
use crate::state::{self, State};

#[derive(Debug)]
pub struct S3Backend {
    pub url: S3Url,
    pub region: String,
    client: Client,
}

/// Who wrote a state object.
struct Written {
    etag: String,
    run: String,
    seq: String,
}

/// Attempts of an S3 call (the SDK's standard retry: throttling, 5xx, lost answers).
const STATE_RETRY_ATTEMPTS: u32 = 10;

/// Retries of a conditional request answered `409 ConditionalRequestConflict`.
const CONFLICT_RETRIES: u32 = 6;

/// Builds an S3 client for `region` from the shared config; path-style addressing when a custom
/// endpoint is set (S3-compatible stores and emulators have no per-bucket host names).
pub fn client(base: &aws_types::SdkConfig, region: &str) -> Client {
    let conf = aws_sdk_s3::config::Builder::from(base)
        .region(aws_types::region::Region::new(region.to_owned()))
        .force_path_style(base.endpoint_url().is_some())
        .build();
    Client::from_conf(conf)
}

/// The region of `bucket`, from `HeadBucket` (its `x-amz-bucket-region` answers from any region,
/// on success and on the 301 a wrong region gets). A missing bucket or a refusal is a user error.
pub async fn bucket_region(base: &aws_types::SdkConfig, bucket: &str) -> Result<Option<String>> {
    use aws_smithy_runtime_api::client::result::SdkError;
    let probe = client(base, "us-east-1");
    let err = match probe.head_bucket().bucket(bucket).send().await {
        Ok(out) => return Ok(Some(out.bucket_region().unwrap_or("us-east-1").to_owned())),
        Err(e) => e,
    };
    if let SdkError::ServiceError(ctx) = &err {
        let raw = ctx.raw();
        let status = raw.status().as_u16();
        if let Some(r) = raw.headers().get("x-amz-bucket-region") {
            if status != 404 && status != 403 {
                return Ok(Some(r.to_owned()));
            }
        }
        match status {
            404 => return Ok(None),
            403 => {
                return Err(Error::user(format!(
                    "access to bucket {bucket} is denied (403 on HeadBucket); grant the policy in docs/reliability.md (\"IAM for the S3 state\") or choose another --profile"
                )))
            }
            _ => {}
        }
    }
    Err(AwsError::from_sdk("s3", "HeadBucket", "us-east-1", &err).into())
}

impl S3Backend {
    pub async fn open(url: &S3Url, conn: &Connection, opts: &OpenOptions) -> Result<S3Backend> {
        // A state write that fails stops the run: retry transient failures longer than other calls.
        let conn = Connection { retry_max_attempts: conn.retry_max_attempts.max(STATE_RETRY_ATTEMPTS), ..conn.clone() };
        let base = crate::clients::load_config(&conn, "us-east-1").await?;
        let Some(region) = bucket_region(&base, &url.bucket).await? else {
            return Err(Error::user(format!(
                "state bucket {} does not exist; create it with `pgdr state init s3://{}` (or fix --state)",
                url.bucket, url.bucket
            )));
        };
        let backend = S3Backend { url: url.clone(), client: client(&base, &region), region };
        backend.check_versioning(opts.allow_unversioned).await?;
        if opts.primary_region.as_deref() == Some(backend.region.as_str()) {
            tracing::warn!(
                bucket = %url.bucket,
                region = %backend.region,
                "the state bucket is in the primary region: if that region is lost, so is the state; keep it in the DR region"
            );
        }
        Ok(backend)
    }

    async fn check_versioning(&self, allow_unversioned: bool) -> Result<()> {
        let out =
            self.client.get_bucket_versioning().bucket(&self.url.bucket).send().aws(&self.region).await.map_err(|e| self.denied(e))?;
        let enabled = out.status().is_some_and(|s| *s == aws_sdk_s3::types::BucketVersioningStatus::Enabled);
        if !enabled && !allow_unversioned {
            return Err(Error::user(format!(
                "state bucket {} has no versioning, so an overwritten or deleted state could not be recovered; enable it with `pgdr state init s3://{}`, or pass --allow-unversioned",
                self.url.bucket, self.url.bucket
            )));
        }
        Ok(())
    }

    /// An access-denied answer as one line naming the policy; other errors unchanged.
    fn denied(&self, e: AwsError) -> Error {
        if e.kind() == Kind::AccessDenied {
            return Error::user(format!(
                "access denied to {} ({} {}, request {}); grant the policy in docs/reliability.md (\"IAM for the S3 state\")",
                self.url,
                e.operation,
                e.code.as_deref().unwrap_or("AccessDenied"),
                e.request_id.as_deref().unwrap_or("-")
            ));
        }
        e.into()
    }

    fn key(&self, env: &str, ext: &str) -> String {
        self.url.key(&format!("{env}.{ext}"))
    }

    async fn get(&self, key: &str, version: Option<&str>) -> Result<Option<(Vec<u8>, String)>> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.url.bucket)
            .key(key)
            .set_version_id(version.map(str::to_owned))
            .send()
            .aws(&self.region)
            .await
        {
            Ok(o) => o,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(self.denied(e)),
        };
        let etag = out.e_tag().unwrap_or_default().to_owned();
        let bytes = out.body.collect().await.map_err(|e| Error::Other(format!("cannot read s3://{}/{key}: {e}", self.url.bucket)))?;
        Ok(Some((bytes.into_bytes().to_vec(), etag)))
    }

    fn corrupt_fix(env: &str) -> String {
        format!("restore a good version: `pgdr state history --env {env}`, then `pgdr state restore --env {env} --version V`")
    }

    pub async fn read(&self, env: &str) -> Result<Option<Loaded>> {
        let key = self.key(env, "json");
        let Some((bytes, etag)) = self.get(&key, None).await? else { return Ok(None) };
        let state = state::decode(&bytes, env, &format!("state s3://{}/{key}", self.url.bucket), &Self::corrupt_fix(env))?;
        Ok(Some(Loaded { state, version: Version(etag) }))
    }

    /// Runs an S3 call from synchronous code (the store saves there).
    fn blocking<T: Send>(&self, f: impl std::future::Future<Output = T> + Send) -> Result<T> {
        run_blocking(f).ok_or_else(|| Error::Other("internal: an S3 state write outside the multi-thread runtime".into()))
    }

    pub fn save_blocking(&self, state: &State, expected: Option<&Version>, run: &RunInfo, seq: u64) -> Result<Version, SaveError> {
        self.blocking(self.save(state, expected, run, seq))?
    }

    pub async fn save(&self, state: &State, expected: Option<&Version>, run: &RunInfo, seq: u64) -> Result<Version, SaveError> {
        let key = self.key(&state.env, "json");
        let mut body = serde_json::to_vec_pretty(state).map_err(|e| Error::Other(format!("internal: state does not serialize: {e}")))?;
        body.push(b'\n');
        let seq = seq.to_string();
        let mut expect = expected.map(|v| v.0.clone());
        for attempt in 0.. {
            let req = self
                .client
                .put_object()
                .bucket(&self.url.bucket)
                .key(&key)
                .content_type("application/json")
                .body(ByteStream::from(body.clone()))
                .metadata("pgdr-who", &run.who)
                .metadata("pgdr-host", &run.host)
                .metadata("pgdr-command", &run.command)
                .metadata("pgdr-run", &run.run_id)
                .metadata("pgdr-seq", &seq);
            let req = match &expect {
                Some(v) => req.if_match(v),
                None => req.if_none_match("*"),
            };
            let err = match req.send().aws(&self.region).await {
                Ok(out) => match out.e_tag() {
                    Some(t) => return Ok(Version(t.to_owned())),
                    None => match self.current(&key).await? {
                        Some(c) if c.run == run.run_id && c.seq == seq => return Ok(Version(c.etag)),
                        _ => return Err(SaveError::Failed(Error::Other("S3 answered a state write without an ETag".into()))),
                    },
                },
                Err(e) => e,
            };
            let refused = err.kind() == Kind::PreconditionFailed || (expect.is_some() && err.is_not_found());
            if err.kind() == Kind::Throttled && attempt < CONFLICT_RETRIES {
                backoff(attempt).await;
                continue;
            }
            if !refused && !err.is_unreachable() {
                return Err(SaveError::Failed(self.denied(err)));
            }
            // Refused, or no answer: the current object tells whether this run wrote it (an
            // earlier attempt whose answer was lost). Only this run writes versions with its ID,
            // so a version of ours may be replaced by this newer state, guarded by its ETag.
            match self.current(&key).await? {
                Some(c) if c.run == run.run_id && c.seq == seq => return Ok(Version(c.etag)),
                Some(c) if c.run == run.run_id && attempt < CONFLICT_RETRIES => expect = Some(c.etag),
                _ if !refused => return Err(SaveError::Failed(self.denied(err))),
                _ => return Err(SaveError::Conflict { found: self.describe_current(&key).await }),
            }
        }
        unreachable!("the loop returns")
    }

    /// The current state object's ETag and the run and sequence number that wrote it.
    async fn current(&self, key: &str) -> Result<Option<Written>> {
        let head = match self.client.head_object().bucket(&self.url.bucket).key(key).send().aws(&self.region).await {
            Ok(h) => h,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(self.denied(e)),
        };
        let meta = head.metadata();
        let get = |k: &str| meta.and_then(|m| m.get(k)).cloned().unwrap_or_default();
        Ok(Some(Written { etag: head.e_tag().unwrap_or_default().to_owned(), run: get("pgdr-run"), seq: get("pgdr-seq") }))
    }

    /// Who wrote the current object, for a lost race's message.
    async fn describe_current(&self, key: &str) -> String {
        let name = format!("s3://{}/{key}", self.url.bucket);
        match self.client.head_object().bucket(&self.url.bucket).key(key).send().aws(&self.region).await {
            Ok(h) => {
                let meta = h.metadata();
                let get = |k: &str| meta.and_then(|m| m.get(k)).cloned().unwrap_or_else(|| "?".into());
                let at = h.last_modified().and_then(|t| t.fmt(aws_smithy_types::date_time::Format::DateTime).ok()).unwrap_or_default();
                format!("{name} was written by {} (`{}` on {}) at {at}", get("pgdr-who"), get("pgdr-command"), get("pgdr-host"))
            }
            Err(e) if e.is_not_found() => format!("{name} was deleted by another run"),
            Err(_) => format!("{name} was changed by another run"),
        }
    }

    pub fn retire_blocking(&self, env: &str, expected: Option<&Version>) -> Result<(), SaveError> {
        self.blocking(self.retire(env, expected))?
    }

    /// Deletes the state (a delete marker: its versions stay) if it is still the one expected.
    async fn retire(&self, env: &str, expected: Option<&Version>) -> Result<(), SaveError> {
        let key = self.key(env, "json");
        let Some(expected) = expected else { return Ok(()) };
        for attempt in 0.. {
            match self.client.delete_object().bucket(&self.url.bucket).key(&key).if_match(&expected.0).send().aws(&self.region).await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_not_found() => return Ok(()),
                Err(e) if e.kind() == Kind::PreconditionFailed => {
                    return Err(SaveError::Conflict { found: self.describe_current(&key).await })
                }
                Err(e) if e.kind() == Kind::Throttled && attempt < CONFLICT_RETRIES => backoff(attempt).await,
                Err(e) => return Err(SaveError::Failed(self.denied(e))),
            }
        }
        unreachable!("the loop returns")
    }

    pub async fn read_lock(&self, env: &str) -> Result<Option<(LockInfo, String)>> {
        let Some((bytes, etag)) = self.get(&self.key(env, "lock"), None).await? else { return Ok(None) };
        // An unreadable lock is still a lock: its holder is unknown.
        let info = serde_json::from_slice(&bytes).unwrap_or_else(|_| LockInfo {
            who: "unknown".into(),
            pid: 0,
            host: "unknown".into(),
            command: "unreadable lock".into(),
            since: String::new(),
            run_id: String::new(),
            heartbeat: None,
        });
        Ok(Some((info, etag)))
    }

    pub async fn lock(&self, env: &str, run: &RunInfo) -> Result<Lock> {
        let key = self.key(env, "lock");
        let info = LockInfo::new(run);
        let body = serde_json::to_vec(&info).map_err(|e| Error::Other(e.to_string()))?;
        let mut attempt = 0;
        let etag = loop {
            let put = self
                .client
                .put_object()
                .bucket(&self.url.bucket)
                .key(&key)
                .content_type("application/json")
                .tagging("pgdr-object=lock")
                .metadata("pgdr-run", &run.run_id)
                .if_none_match("*")
                .body(ByteStream::from(body.clone()));
            match put.send().aws(&self.region).await {
                Ok(out) => break out.e_tag().unwrap_or_default().to_owned(),
                Err(e) if e.kind() == Kind::PreconditionFailed => {
                    let holder = self.read_lock(env).await?;
                    match holder {
                        // Our own attempt landed before its answer was lost.
                        Some((h, etag)) if h.run_id == run.run_id => break etag,
                        Some((h, _)) => return Err(held_error(env, Some(&h), stale_hint(&h))),
                        // Released in between: try again.
                        None if attempt < CONFLICT_RETRIES => {}
                        None => return Err(held_error(env, None, None)),
                    }
                }
                Err(e) if e.kind() == Kind::Throttled && attempt < CONFLICT_RETRIES => backoff(attempt).await,
                // No answer: the lock may be ours already.
                Err(e) if e.is_unreachable() => match self.read_lock(env).await? {
                    Some((h, etag)) if h.run_id == run.run_id => break etag,
                    _ => return Err(e.into()),
                },
                Err(e) => return Err(self.denied(e)),
            }
            attempt += 1;
        };
        let held = S3Lock {
            client: self.client.clone(),
            bucket: self.url.bucket.clone(),
            key,
            region: self.region.clone(),
            run_id: run.run_id.clone(),
            etag: Arc::new(Mutex::new(etag)),
            lost: Arc::new(AtomicBool::new(false)),
            beat: None,
        };
        let mut held = held;
        held.beat = Some(tokio::spawn(heartbeat(held.clone_parts(), info.clone())));
        let parts = held.clone_parts();
        super::register(&run.run_id, Box::new(move || parts.release_blocking()));
        Ok(Lock { info, held: Held::S3(held) })
    }

    pub async fn unlock(&self, env: &str, confirm: &dyn Fn(&LockInfo) -> Result<()>) -> Result<Option<LockInfo>> {
        let Some((info, etag)) = self.read_lock(env).await? else { return Ok(None) };
        confirm(&info)?;
        let key = self.key(env, "lock");
        for attempt in 0.. {
            match self.client.delete_object().bucket(&self.url.bucket).key(&key).if_match(&etag).send().aws(&self.region).await {
                Ok(_) => return Ok(Some(info)),
                Err(e) if e.is_not_found() => return Ok(Some(info)),
                Err(e) if e.kind() == Kind::PreconditionFailed => {
                    return Err(Error::user(format!(
                        "the lock on {env} changed while unlocking (refreshed or taken by another run); nothing was removed: run `pgdr unlock --env {env}` again to see its holder"
                    )))
                }
                Err(e) if e.kind() == Kind::Throttled && attempt < CONFLICT_RETRIES => backoff(attempt).await,
                Err(e) => return Err(self.denied(e)),
            }
        }
        unreachable!("the loop returns")
    }

    pub async fn envs(&self) -> Result<Vec<String>> {
        let prefix = self.url.key("");
        let mut names = Vec::new();
        let mut token = None;
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.url.bucket)
                .prefix(&prefix)
                .delimiter("/")
                .set_continuation_token(token)
                .send()
                .aws(&self.region)
                .await
                .map_err(|e| self.denied(e))?;
            for o in out.contents() {
                if let Some(n) = o.key().and_then(|k| k.strip_prefix(&prefix)).and_then(|k| k.strip_suffix(".json")) {
                    names.push(n.to_owned());
                }
            }
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        Ok(names)
    }

    pub async fn history(&self, env: &str, limit: usize) -> Result<Vec<HistoryEntry>> {
        let key = self.key(env, "json");
        let out = self
            .client
            .list_object_versions()
            .bucket(&self.url.bucket)
            .prefix(&key)
            .send()
            .aws(&self.region)
            .await
            .map_err(|e| self.denied(e))?;
        let fmt = |t: Option<&aws_smithy_types::DateTime>| {
            t.and_then(|t| t.fmt(aws_smithy_types::date_time::Format::DateTime).ok()).unwrap_or_default()
        };
        let mut entries: Vec<HistoryEntry> = Vec::new();
        for v in out.versions().iter().filter(|v| v.key() == Some(key.as_str())) {
            let version = v.version_id().unwrap_or("null").to_owned();
            entries.push(HistoryEntry {
                version,
                at: fmt(v.last_modified()),
                who: String::new(),
                command: String::new(),
                latest: v.is_latest() == Some(true),
                deleted: false,
            });
        }
        for d in out.delete_markers().iter().filter(|d| d.key() == Some(key.as_str())) {
            let version = d.version_id().unwrap_or("null").to_owned();
            entries.push(HistoryEntry {
                version,
                at: fmt(d.last_modified()),
                who: String::new(),
                command: String::from("(deleted)"),
                latest: d.is_latest() == Some(true),
                deleted: true,
            });
        }
        entries.sort_by(|a, b| b.at.cmp(&a.at).then(b.latest.cmp(&a.latest)));
        entries.truncate(limit);
        for e in entries.iter_mut().filter(|e| !e.deleted) {
            let head = self
                .client
                .head_object()
                .bucket(&self.url.bucket)
                .key(&key)
                .version_id(&e.version)
                .send()
                .aws(&self.region)
                .await
                .map_err(|e| self.denied(e))?;
            if let Some(m) = head.metadata() {
                e.who = m.get("pgdr-who").cloned().unwrap_or_default();
                e.command = m.get("pgdr-command").cloned().unwrap_or_default();
            }
        }
        Ok(entries)
    }

    pub async fn read_version(&self, env: &str, version: &str) -> Result<State> {
        let key = self.key(env, "json");
        let (bytes, _) = match self.get(&key, Some(version)).await {
            Ok(Some(x)) => x,
            Ok(None) => {
                return Err(Error::user(format!(
                    "version {version} of s3://{}/{key} does not exist; see `pgdr state history --env {env}`",
                    self.url.bucket
                )))
            }
            Err(Error::Aws(e)) if e.code.as_deref() == Some("InvalidArgument") => {
                return Err(Error::user(format!(
                    "{version:?} is not a version of s3://{}/{key}; see `pgdr state history --env {env}`",
                    self.url.bucket
                )))
            }
            Err(e) => return Err(e),
        };
        state::decode(&bytes, env, &format!("version {version} of s3://{}/{key}", self.url.bucket), "choose another version")
    }

    /// Copies the state to `<env>.json.<suffix>` and deletes the original if it is still `expected`.
    pub async fn set_aside(&self, env: &str, suffix: &str, expected: &Version) -> Result<String> {
        let key = self.key(env, "json");
        let to = format!("{key}.{suffix}");
        let source = format!("{}/{}", self.url.bucket, percent_encode(&key));
        self.client
            .copy_object()
            .bucket(&self.url.bucket)
            .key(&to)
            .copy_source(source)
            .copy_source_if_match(&expected.0)
            .send()
            .aws(&self.region)
            .await
            .map_err(|e| self.denied(e))?;
        match self.retire(env, Some(expected)).await {
            Ok(()) => Ok(format!("s3://{}/{to}", self.url.bucket)),
            Err(SaveError::Conflict { found }) => Err(Error::failed(format!("{found}; the copy {to} is kept"))),
            Err(SaveError::Failed(e)) => Err(e),
        }
    }
}

/// Runs `f` to completion from synchronous code inside the multi-thread runtime: on a fresh
/// thread (a nested `block_on` on a thread that is already blocking on a future can lose that
/// future's wake-up), with a worker's core handed off first (`block_in_place`) so the runtime
/// keeps its capacity. `None` outside a multi-thread runtime.
fn run_blocking<T: Send>(f: impl std::future::Future<Output = T> + Send) -> Option<T> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return None;
    }
    tokio::task::block_in_place(|| std::thread::scope(|s| s.spawn(|| handle.block_on(f)).join().ok()))
}

fn percent_encode(key: &str) -> String {
    key.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn backoff(attempt: u32) {
    let ms = 100u64 << attempt.min(6);
    tokio::time::sleep(Duration::from_millis(ms + fastrand::u64(..ms))).await;
}

/// How long a lock has been silent, when that is longer than a live run would be.
fn stale_hint(h: &LockInfo) -> Option<String> {
    let limit = super::heartbeat_interval().as_secs() * super::STALE_AFTER_BEATS;
    h.silent_for().filter(|s| *s > limit).map(|s| format!("no heartbeat for {}", crate::wait::human(Duration::from_secs(s))))
}

/// A lock this run holds in S3: its current ETag (the heartbeat changes it).
#[derive(Debug)]
pub struct S3Lock {
    client: Client,
    bucket: String,
    key: String,
    region: String,
    run_id: String,
    etag: Arc<Mutex<String>>,
    lost: Arc<AtomicBool>,
    beat: Option<tokio::task::JoinHandle<()>>,
}

/// What releasing and refreshing a lock need, shared with the heartbeat and the Ctrl-C path.
#[derive(Clone, Debug)]
struct LockParts {
    client: Client,
    bucket: String,
    key: String,
    region: String,
    run_id: String,
    etag: Arc<Mutex<String>>,
    lost: Arc<AtomicBool>,
}

impl S3Lock {
    fn clone_parts(&self) -> LockParts {
        LockParts {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            region: self.region.clone(),
            run_id: self.run_id.clone(),
            etag: self.etag.clone(),
            lost: self.lost.clone(),
        }
    }
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
    pub fn release_blocking(&mut self) {
        if let Some(b) = self.beat.take() {
            b.abort();
        }
        self.clone_parts().release_blocking();
    }
}

impl LockParts {
    fn etag(&self) -> String {
        self.etag.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The lock's ETag if it is still ours (a heartbeat may have landed with its answer lost).
    async fn ours(&self) -> Option<String> {
        let out = self.client.get_object().bucket(&self.bucket).key(&self.key).send().aws(&self.region).await.ok()?;
        let etag = out.e_tag().unwrap_or_default().to_owned();
        let bytes = out.body.collect().await.ok()?.into_bytes();
        let info: LockInfo = serde_json::from_slice(&bytes).ok()?;
        (info.run_id == self.run_id).then_some(etag)
    }

    fn release_blocking(&self) {
        if run_blocking(self.release()).is_none() {
            tracing::warn!(key = %self.key, "cannot release the S3 lock outside the runtime; it will look stale once its heartbeat stops");
        }
    }

    async fn release(&self) {
        if self.lost.load(Ordering::SeqCst) {
            tracing::warn!(key = %self.key, "the lock was taken over while this run held it; left in place");
            return;
        }
        let mut etag = self.etag();
        for attempt in 0..=CONFLICT_RETRIES {
            match self.client.delete_object().bucket(&self.bucket).key(&self.key).if_match(&etag).send().aws(&self.region).await {
                Ok(_) => return,
                Err(e) if e.is_not_found() => return,
                Err(e) if e.kind() == Kind::PreconditionFailed => match self.ours().await {
                    Some(t) => etag = t,
                    None => {
                        tracing::warn!(key = %self.key, "the lock is no longer this run's (forced unlock?); left in place");
                        return;
                    }
                },
                Err(e) if e.kind() == Kind::Throttled && attempt < CONFLICT_RETRIES => backoff(attempt).await,
                Err(e) => {
                    tracing::warn!(key = %self.key, error = %e, "could not release the S3 lock; `pgdr unlock` clears it");
                    return;
                }
            }
        }
    }
}

/// Refreshes the lock's heartbeat until the run ends; a lock taken over is marked lost.
async fn heartbeat(parts: LockParts, mut info: LockInfo) {
    let every = super::heartbeat_interval();
    loop {
        tokio::time::sleep(every).await;
        info.heartbeat = Some(state::now_rfc3339());
        let Ok(body) = serde_json::to_vec(&info) else { return };
        let put = parts
            .client
            .put_object()
            .bucket(&parts.bucket)
            .key(&parts.key)
            .content_type("application/json")
            .tagging("pgdr-object=lock")
            .metadata("pgdr-run", &parts.run_id)
            .if_match(parts.etag())
            .body(ByteStream::from(body));
        match put.send().aws(&parts.region).await {
            Ok(out) => *parts.etag.lock().unwrap_or_else(|p| p.into_inner()) = out.e_tag().unwrap_or_default().to_owned(),
            Err(e) if e.kind() == Kind::PreconditionFailed || e.is_not_found() => match parts.ours().await {
                Some(t) => *parts.etag.lock().unwrap_or_else(|p| p.into_inner()) = t,
                None => {
                    parts.lost.store(true, Ordering::SeqCst);
                    tracing::warn!(key = %parts.key, "this run's lock was removed or taken over (forced unlock?); its next state write will be refused if another run wrote");
                    return;
                }
            },
            Err(e) => tracing::warn!(key = %parts.key, error = %e, "could not refresh the lock's heartbeat; retrying"),
        }
    }
}
