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
    objects: Objects,
}

/// The objects of one bucket, through a client of the bucket's region: what the backend and a
/// held lock (its heartbeat, its release on Ctrl-C) share.
#[derive(Clone, Debug)]
struct Objects {
    client: Client,
    bucket: String,
    region: String,
}

/// Who wrote an object, from its metadata (every pgdr write carries it).
struct Written {
    etag: String,
    run: String,
    seq: String,
    who: String,
    command: String,
    host: String,
    at: String,
}

/// The condition of a conditional write.
enum Cond<'a> {
    /// There must be no current version (`If-None-Match: *`).
    Absent,
    /// The current version must have this ETag (`If-Match`).
    Is(&'a str),
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

impl Objects {
    /// Retries a conditional request while S3 answers `409 ConditionalRequestConflict` (a
    /// concurrent conditional request on the key; `Kind::Throttled`), with backoff.
    async fn conflicts<T, F: std::future::Future<Output = Result<T, AwsError>>>(mut call: impl FnMut() -> F) -> Result<T, AwsError> {
        let mut attempt = 0;
        loop {
            match call().await {
                Err(e) if e.kind() == Kind::Throttled && attempt < CONFLICT_RETRIES => {
                    backoff(attempt).await;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    /// An object's bytes and ETag; `None` when there is none (or that version is gone).
    async fn get(&self, key: &str, version: Option<&str>) -> Result<Option<(Vec<u8>, String)>, AwsError> {
        let req = self.client.get_object().bucket(&self.bucket).key(key).set_version_id(version.map(str::to_owned));
        let out = match req.send().aws(&self.region).await {
            Ok(o) => o,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let etag = out.e_tag().unwrap_or_default().to_owned();
        match out.body.collect().await {
            Ok(b) => Ok(Some((b.into_bytes().to_vec(), etag))),
            // The body broke off: as good as no answer (the caller's retry or error path).
            Err(e) => Err(AwsError {
                service: "s3",
                operation: "GetObject",
                region: self.region.clone(),
                code: None,
                message: Some(format!("the body of s3://{}/{key} broke off: {e}", self.bucket)),
                request_id: None,
                transport: crate::error::Transport::Unreachable,
            }),
        }
    }

    /// Who wrote an object (a version of it, if given); `None` when there is none.
    async fn head(&self, key: &str, version: Option<&str>) -> Result<Option<Written>, AwsError> {
        let req = self.client.head_object().bucket(&self.bucket).key(key).set_version_id(version.map(str::to_owned));
        let h = match req.send().aws(&self.region).await {
            Ok(h) => h,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = h.metadata();
        let get = |k: &str| meta.and_then(|m| m.get(k)).cloned().unwrap_or_default();
        Ok(Some(Written {
            etag: h.e_tag().unwrap_or_default().to_owned(),
            run: get("pgdr-run"),
            seq: get("pgdr-seq"),
            who: get("pgdr-who"),
            command: get("pgdr-command"),
            host: get("pgdr-host"),
            at: h.last_modified().and_then(|t| t.fmt(aws_smithy_types::date_time::Format::DateTime).ok()).unwrap_or_default(),
        }))
    }

    /// A conditional `PutObject` of JSON, with pgdr's metadata; returns the new ETag.
    async fn put(&self, key: &str, body: &[u8], cond: Cond<'_>, meta: &[(&str, &str)], tag: Option<&str>) -> Result<String, AwsError> {
        let out = Self::conflicts(|| {
            let mut req = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .content_type("application/json")
                .set_tagging(tag.map(str::to_owned))
                .body(ByteStream::from(body.to_vec()));
            for (k, v) in meta {
                req = req.metadata(*k, *v);
            }
            let req = match cond {
                Cond::Absent => req.if_none_match("*"),
                Cond::Is(etag) => req.if_match(etag),
            };
            req.send().aws(&self.region)
        })
        .await?;
        Ok(out.e_tag().unwrap_or_default().to_owned())
    }

    /// `DeleteObject` with `If-Match`: gone (or never there) is success.
    async fn delete_if(&self, key: &str, etag: &str) -> Result<(), AwsError> {
        match Self::conflicts(|| self.client.delete_object().bucket(&self.bucket).key(key).if_match(etag).send().aws(&self.region)).await {
            Err(e) if e.is_not_found() => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// A lock object: its holder and ETag. An unreadable lock is still a lock, its holder unknown.
    async fn lock_info(&self, key: &str) -> Result<Option<(LockInfo, String)>, AwsError> {
        let Some((bytes, etag)) = self.get(key, None).await? else { return Ok(None) };
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

    fn name(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// Who holds the current version of `key`, for a lost race's message.
    fn describe(&self, key: &str, w: Option<&Written>) -> String {
        match w {
            Some(w) => format!("{} was written by {} (`{}` on {}) at {}", self.name(key), w.who, w.command, w.host, w.at),
            None => format!("{} was deleted by another run", self.name(key)),
        }
    }
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
        let objects = Objects { client: client(&base, &region), bucket: url.bucket.clone(), region };
        let backend = S3Backend { url: url.clone(), objects };
        backend.check_versioning(opts.allow_unversioned).await?;
        if opts.primary_region.as_deref() == Some(backend.objects.region.as_str()) {
            tracing::warn!(
                bucket = %url.bucket,
                region = %backend.objects.region,
                "the state bucket is in the primary region: if that region is lost, so is the state; keep it in the DR region"
            );
        }
        Ok(backend)
    }

    async fn check_versioning(&self, allow_unversioned: bool) -> Result<()> {
        let o = &self.objects;
        let out = o.client.get_bucket_versioning().bucket(&o.bucket).send().aws(&o.region).await.map_err(|e| self.denied(e))?;
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

    fn corrupt_fix(env: &str) -> String {
        format!("restore a good version: `pgdr state history --env {env}`, then `pgdr state restore --env {env} --version V`")
    }

    pub async fn read(&self, env: &str) -> Result<Option<Loaded>> {
        let key = self.key(env, "json");
        let Some((bytes, etag)) = self.objects.get(&key, None).await.map_err(|e| self.denied(e))? else { return Ok(None) };
        let state = state::decode(&bytes, env, &format!("state {}", self.objects.name(&key)), &Self::corrupt_fix(env))?;
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
        let meta = [
            ("pgdr-who", run.who.as_str()),
            ("pgdr-host", run.host.as_str()),
            ("pgdr-command", run.command.as_str()),
            ("pgdr-run", run.run_id.as_str()),
            ("pgdr-seq", seq.as_str()),
        ];
        let mut expect = expected.map(|v| v.0.clone());
        for attempt in 0.. {
            let cond = expect.as_deref().map_or(Cond::Absent, Cond::Is);
            let err = match self.objects.put(&key, &body, cond, &meta, None).await {
                Ok(etag) if !etag.is_empty() => return Ok(Version(etag)),
                Ok(_) => None, // no ETag in the answer: the current object says
                Err(e) => Some(e),
            };
            let refused = err.as_ref().is_some_and(|e| e.kind() == Kind::PreconditionFailed || (expect.is_some() && e.is_not_found()));
            if let Some(e) = err.as_ref().filter(|e| !refused && !e.is_unreachable()) {
                return Err(SaveError::Failed(self.denied(e.clone())));
            }
            // Refused, or no answer: the current object tells whether this run wrote it (an
            // earlier attempt whose answer was lost). Only this run writes versions with its ID,
            // so a version of ours may be replaced by this newer state, guarded by its ETag.
            let current = self.objects.head(&key, None).await.map_err(|e| SaveError::Failed(self.denied(e)))?;
            match (&current, err) {
                (Some(c), _) if c.run == run.run_id && c.seq == seq => return Ok(Version(c.etag.clone())),
                (Some(c), _) if c.run == run.run_id && attempt < CONFLICT_RETRIES => expect = Some(c.etag.clone()),
                (_, Some(e)) if !refused => return Err(SaveError::Failed(self.denied(e))),
                _ => return Err(SaveError::Conflict { found: self.objects.describe(&key, current.as_ref()) }),
            }
        }
        unreachable!("the loop returns")
    }

    pub fn retire_blocking(&self, env: &str, expected: Option<&Version>) -> Result<(), SaveError> {
        self.blocking(self.retire(env, expected))?
    }

    /// Deletes the state (a delete marker: its versions stay) if it is still the one expected.
    async fn retire(&self, env: &str, expected: Option<&Version>) -> Result<(), SaveError> {
        let key = self.key(env, "json");
        let Some(expected) = expected else { return Ok(()) };
        match self.objects.delete_if(&key, &expected.0).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == Kind::PreconditionFailed => {
                let current = self.objects.head(&key, None).await.ok().flatten();
                Err(SaveError::Conflict { found: self.objects.describe(&key, current.as_ref()) })
            }
            Err(e) => Err(SaveError::Failed(self.denied(e))),
        }
    }

    pub async fn read_lock(&self, env: &str) -> Result<Option<(LockInfo, String)>> {
        self.objects.lock_info(&self.key(env, "lock")).await.map_err(|e| self.denied(e))
    }

    pub async fn lock(&self, env: &str, run: &RunInfo) -> Result<Lock> {
        let key = self.key(env, "lock");
        let info = LockInfo::new(run);
        let body = serde_json::to_vec(&info).map_err(|e| Error::Other(e.to_string()))?;
        let meta = [("pgdr-run", run.run_id.as_str())];
        let mut attempt = 0;
        let etag = loop {
            let err = match self.objects.put(&key, &body, Cond::Absent, &meta, Some(LOCK_TAG)).await {
                Ok(etag) => break etag,
                Err(e) => e,
            };
            if err.kind() != Kind::PreconditionFailed && !err.is_unreachable() {
                return Err(self.denied(err));
            }
            // Taken, or no answer: held by someone, or by this run (an attempt whose answer was lost).
            match self.read_lock(env).await? {
                Some((h, etag)) if h.run_id == run.run_id => break etag,
                _ if err.is_unreachable() => return Err(err.into()),
                Some((h, _)) => return Err(held_error(env, Some(&h), stale_hint(&h))),
                // Released in between: try again.
                None if attempt < CONFLICT_RETRIES => attempt += 1,
                None => return Err(held_error(env, None, None)),
            }
        };
        let parts = LockParts {
            objects: self.objects.clone(),
            key,
            run_id: run.run_id.clone(),
            etag: Arc::new(Mutex::new(etag)),
            lost: Arc::new(AtomicBool::new(false)),
        };
        let beat = Some(tokio::spawn(heartbeat(parts.clone(), info.clone())));
        let release = parts.clone();
        super::register(&run.run_id, Box::new(move || release.release_blocking()));
        Ok(Lock { info, held: Held::S3(S3Lock { parts, beat }) })
    }

    pub async fn unlock(&self, env: &str, confirm: &dyn Fn(&LockInfo) -> Result<()>) -> Result<Option<LockInfo>> {
        let Some((info, etag)) = self.read_lock(env).await? else { return Ok(None) };
        confirm(&info)?;
        match self.objects.delete_if(&self.key(env, "lock"), &etag).await {
            Ok(()) => Ok(Some(info)),
            Err(e) if e.kind() == Kind::PreconditionFailed => Err(Error::user(format!(
                "the lock on {env} changed while unlocking (refreshed or taken by another run); nothing was removed: run `pgdr unlock --env {env}` again to see its holder"
            ))),
            Err(e) => Err(self.denied(e)),
        }
    }

    pub async fn envs(&self) -> Result<Vec<String>> {
        let o = &self.objects;
        let prefix = self.url.key("");
        let mut names = Vec::new();
        let mut token = None;
        loop {
            let req = o.client.list_objects_v2().bucket(&o.bucket).prefix(&prefix).delimiter("/").set_continuation_token(token);
            let out = req.send().aws(&o.region).await.map_err(|e| self.denied(e))?;
            for obj in out.contents() {
                if let Some(n) = obj.key().and_then(|k| k.strip_prefix(&prefix)).and_then(|k| k.strip_suffix(".json")) {
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

    /// The state's versions and deletions, newest first: one listing (ListObjectVersions answers
    /// a key's versions newest first, up to 1000 a page), then who wrote each kept one, sixteen at a time.
    pub async fn history(&self, env: &str, limit: usize) -> Result<Vec<HistoryEntry>> {
        let o = &self.objects;
        let key = self.key(env, "json");
        let out = o.client.list_object_versions().bucket(&o.bucket).prefix(&key).send().aws(&o.region).await.map_err(|e| self.denied(e))?;
        let fmt = |t: Option<&aws_smithy_types::DateTime>| {
            t.and_then(|t| t.fmt(aws_smithy_types::date_time::Format::DateTime).ok()).unwrap_or_default()
        };
        let entry = |version: Option<&str>, at, latest: Option<bool>, deleted: bool| HistoryEntry {
            version: version.unwrap_or("null").to_owned(),
            at: fmt(at),
            who: String::new(),
            command: if deleted { "(deleted)".into() } else { String::new() },
            latest: latest == Some(true),
            deleted,
        };
        let mine = |k: Option<&str>| k == Some(key.as_str());
        let mut entries: Vec<HistoryEntry> = out
            .versions()
            .iter()
            .filter(|v| mine(v.key()))
            .map(|v| entry(v.version_id(), v.last_modified(), v.is_latest(), false))
            .chain(
                out.delete_markers()
                    .iter()
                    .filter(|d| mine(d.key()))
                    .map(|d| entry(d.version_id(), d.last_modified(), d.is_latest(), true)),
            )
            .collect();
        entries.sort_by(|a, b| b.at.cmp(&a.at).then(b.latest.cmp(&a.latest)));
        entries.truncate(limit);
        // Sixteen at a time: far below S3's request rate per prefix, even for a long history.
        use futures::stream::StreamExt;
        let writers: Vec<_> = futures::stream::iter(entries.iter().map(|e| async {
            if e.deleted {
                return Ok(None);
            }
            o.head(&key, Some(&e.version)).await
        }))
        .buffered(16)
        .collect()
        .await;
        for (e, w) in entries.iter_mut().zip(writers) {
            if let Some(w) = w.map_err(|e| self.denied(e))? {
                (e.who, e.command) = (w.who, w.command);
            }
        }
        Ok(entries)
    }

    pub async fn read_version(&self, env: &str, version: &str) -> Result<State> {
        let key = self.key(env, "json");
        let name = self.objects.name(&key);
        let (bytes, _) = match self.objects.get(&key, Some(version)).await {
            Ok(Some(x)) => x,
            Ok(None) => {
                return Err(Error::user(format!("version {version} of {name} does not exist; see `pgdr state history --env {env}`")))
            }
            Err(e) if e.code.as_deref() == Some("InvalidArgument") => {
                return Err(Error::user(format!("{version:?} is not a version of {name}; see `pgdr state history --env {env}`")))
            }
            Err(e) => return Err(self.denied(e)),
        };
        state::decode(&bytes, env, &format!("version {version} of {name}"), "choose another version")
    }

    /// Copies the state to `<env>.json.<suffix>` and deletes the original if it is still `expected`.
    pub async fn set_aside(&self, env: &str, suffix: &str, expected: &Version) -> Result<String> {
        let o = &self.objects;
        let key = self.key(env, "json");
        let to = format!("{key}.{suffix}");
        let source = format!("{}/{}", o.bucket, percent_encode(&key));
        let req = o.client.copy_object().bucket(&o.bucket).key(&to).copy_source(source).copy_source_if_match(&expected.0);
        req.send().aws(&o.region).await.map_err(|e| self.denied(e))?;
        match self.retire(env, Some(expected)).await {
            Ok(()) => Ok(o.name(&to)),
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

/// The tag of lock objects: the lifecycle rule `state init` makes expires their old versions.
const LOCK_TAG: &str = "pgdr-object=lock";

/// A lock this run holds in S3, and its heartbeat.
#[derive(Debug)]
pub struct S3Lock {
    parts: LockParts,
    beat: Option<tokio::task::JoinHandle<()>>,
}

/// What refreshing and releasing a lock need, shared with the heartbeat and the Ctrl-C path.
#[derive(Clone, Debug)]
struct LockParts {
    objects: Objects,
    key: String,
    run_id: String,
    /// The lock's current ETag: each heartbeat changes it.
    etag: Arc<Mutex<String>>,
    lost: Arc<AtomicBool>,
}

impl S3Lock {
    pub fn lost(&self) -> bool {
        self.parts.lost.load(Ordering::SeqCst)
    }
    pub fn release_blocking(&mut self) {
        if let Some(b) = self.beat.take() {
            b.abort();
        }
        self.parts.release_blocking();
    }
}

impl LockParts {
    fn etag(&self) -> String {
        self.etag.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_etag(&self, etag: String) {
        *self.etag.lock().unwrap_or_else(|p| p.into_inner()) = etag;
    }

    /// The lock's ETag if it is still this run's (a write may have landed with its answer lost).
    async fn ours(&self) -> Option<String> {
        let (info, etag) = self.objects.lock_info(&self.key).await.ok()??;
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
        // Twice at most: a heartbeat aborted mid-flight may have changed the ETag.
        for _ in 0..2 {
            match self.objects.delete_if(&self.key, &etag).await {
                Ok(()) => return,
                Err(e) if e.kind() == Kind::PreconditionFailed => match self.ours().await {
                    Some(t) => etag = t,
                    None => break,
                },
                Err(e) => {
                    tracing::warn!(key = %self.key, error = %e, "could not release the S3 lock; `pgdr unlock` clears it");
                    return;
                }
            }
        }
        tracing::warn!(key = %self.key, "the lock is no longer this run's (forced unlock?); left in place");
    }
}

/// Refreshes the lock's heartbeat until the run ends; a lock taken over is marked lost.
async fn heartbeat(parts: LockParts, mut info: LockInfo) {
    let every = super::heartbeat_interval();
    let meta = [("pgdr-run", parts.run_id.clone())];
    let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (*k, v.as_str())).collect();
    loop {
        tokio::time::sleep(every).await;
        info.heartbeat = Some(state::now_rfc3339());
        let Ok(body) = serde_json::to_vec(&info) else { return };
        let etag = parts.etag();
        match parts.objects.put(&parts.key, &body, Cond::Is(&etag), &meta, Some(LOCK_TAG)).await {
            Ok(t) => parts.set_etag(t),
            Err(e) if e.kind() == Kind::PreconditionFailed || e.is_not_found() => match parts.ours().await {
                Some(t) => parts.set_etag(t),
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
