//! `pgdr state init s3://BUCKET`: a bucket fit for state, made idempotently.
//!
//! Versioning (history and recovery), default encryption (SSE-KMS, the account's `aws/s3` key
//! unless one is given), every public access blocked, a bucket policy refusing any request
//! without TLS, and a lifecycle rule expiring old versions of lock objects (tagged
//! `pgdr-object=lock`: every heartbeat makes one) and the delete markers left behind.

use serde::Serialize;

use super::s3;
use super::S3Url;
use crate::aws::Call;
use crate::clients::Connection;
use crate::error::{Error, Result};

#[derive(Clone, Debug, Default)]
pub struct InitOptions {
    /// Where to create the bucket when it does not exist (the DR region by default).
    pub region: String,
    /// The primary region: a bucket there is warned about.
    pub primary_region: String,
    /// A KMS key (ID, alias or ARN) for default encryption; the `aws/s3` key otherwise.
    pub kms_key: Option<String>,
}

/// What `state init` found and did.
#[derive(Debug, Serialize)]
pub struct InitResult {
    pub bucket: String,
    pub region: String,
    pub created: bool,
    /// Settings applied, in order.
    pub applied: Vec<String>,
    pub warnings: Vec<String>,
    /// The `--state` value to use.
    pub state: String,
}

pub async fn init_bucket(url: &S3Url, conn: &Connection, opts: &InitOptions) -> Result<InitResult> {
    let base = crate::clients::load_config(conn, &opts.region).await?;
    let (region, created) = match s3::bucket_region(&base, &url.bucket).await? {
        Some(r) => (r, false),
        None => {
            create(&s3::client(&base, &opts.region), &url.bucket, &opts.region).await?;
            (opts.region.clone(), true)
        }
    };
    let c = s3::client(&base, &region);
    let b = url.bucket.as_str();
    let r = region.as_str();
    let fail = |e: crate::error::AwsError| -> Error {
        if e.kind() == crate::aws::Kind::AccessDenied {
            Error::user(format!(
                "access denied setting up bucket {b} ({} {}); `state init` needs the bucket-administration actions listed in docs/reliability.md",
                e.operation,
                e.code.as_deref().unwrap_or("")
            ))
        } else {
            e.into()
        }
    };
    use aws_sdk_s3::types::{
        BucketVersioningStatus, PublicAccessBlockConfiguration, ServerSideEncryption, ServerSideEncryptionByDefault,
        ServerSideEncryptionConfiguration, ServerSideEncryptionRule, VersioningConfiguration,
    };
    let mut applied = Vec::new();

    let mut warnings = Vec::new();
    let was = c.get_bucket_versioning().bucket(b).send().aws(r).await.map_err(fail)?;
    if was.status() != Some(&BucketVersioningStatus::Enabled) {
        let versioning = VersioningConfiguration::builder().status(BucketVersioningStatus::Enabled).build();
        c.put_bucket_versioning().bucket(b).versioning_configuration(versioning).send().aws(r).await.map_err(fail)?;
        // S3 user guide, "Enabling versioning on buckets": up to 15 minutes to propagate; reads of
        // objects written meanwhile may answer 404 NoSuchKey.
        warnings.push(format!(
            "versioning was just enabled on {b}: S3 takes up to 15 minutes to apply it everywhere, and reads of objects written meanwhile may fail; wait 15 minutes before the first pgdr run on this bucket"
        ));
    }
    applied.push("versioning enabled".to_owned());

    let mut sse = ServerSideEncryptionByDefault::builder().sse_algorithm(ServerSideEncryption::AwsKms);
    if let Some(k) = &opts.kms_key {
        sse = sse.kms_master_key_id(k);
    }
    let sse = sse.build().map_err(|e| Error::Other(format!("internal: {e}")))?;
    let rule = ServerSideEncryptionRule::builder().apply_server_side_encryption_by_default(sse).bucket_key_enabled(true).build();
    let enc = ServerSideEncryptionConfiguration::builder().rules(rule).build().map_err(|e| Error::Other(format!("internal: {e}")))?;
    c.put_bucket_encryption().bucket(b).server_side_encryption_configuration(enc).send().aws(r).await.map_err(fail)?;
    applied.push(format!("default encryption SSE-KMS ({})", opts.kms_key.as_deref().unwrap_or("aws/s3")));

    let block = PublicAccessBlockConfiguration::builder()
        .block_public_acls(true)
        .ignore_public_acls(true)
        .block_public_policy(true)
        .restrict_public_buckets(true)
        .build();
    c.put_public_access_block().bucket(b).public_access_block_configuration(block).send().aws(r).await.map_err(fail)?;
    applied.push("public access blocked".to_owned());

    c.put_bucket_policy().bucket(b).policy(tls_only_policy(b)).send().aws(r).await.map_err(fail)?;
    applied.push("bucket policy: TLS only".to_owned());

    c.put_bucket_lifecycle_configuration().bucket(b).lifecycle_configuration(lifecycle()?).send().aws(r).await.map_err(fail)?;
    applied.push("lifecycle: old lock versions expire after 1 day".to_owned());

    if region == opts.primary_region {
        warnings.push(format!(
            "bucket {b} is in the primary region {region}: if that region is lost, so is the state; keep it in the DR region (--region)"
        ));
    }
    Ok(InitResult { bucket: b.to_owned(), region, created, applied, warnings, state: url.to_string() })
}

/// `CreateBucket`: no location constraint in us-east-1, the region everywhere else (S3 API
/// reference). Owned already (a rerun) is fine; owned by another account is a user error.
async fn create(c: &aws_sdk_s3::Client, bucket: &str, region: &str) -> Result<()> {
    use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
    let mut req = c.create_bucket().bucket(bucket);
    if region != "us-east-1" {
        let conf = CreateBucketConfiguration::builder().location_constraint(BucketLocationConstraint::from(region)).build();
        req = req.create_bucket_configuration(conf);
    }
    match req.send().aws(region).await {
        Ok(_) => Ok(()),
        Err(e) if e.code.as_deref() == Some("BucketAlreadyOwnedByYou") => Ok(()),
        Err(e) if e.code.as_deref() == Some("BucketAlreadyExists") => {
            Err(Error::user(format!("bucket name {bucket} is taken by another AWS account; choose another name")))
        }
        Err(e) => Err(e.into()),
    }
}

fn tls_only_policy(bucket: &str) -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "DenyWithoutTLS",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:*",
            "Resource": [format!("arn:aws:s3:::{bucket}"), format!("arn:aws:s3:::{bucket}/*")],
            "Condition": {"Bool": {"aws:SecureTransport": "false"}}
        }]
    })
    .to_string()
}

fn lifecycle() -> Result<aws_sdk_s3::types::BucketLifecycleConfiguration> {
    use aws_sdk_s3::types::{
        BucketLifecycleConfiguration, ExpirationStatus, LifecycleExpiration, LifecycleRule, LifecycleRuleFilter,
        NoncurrentVersionExpiration, Tag,
    };
    let internal = |e: aws_sdk_s3::error::BuildError| Error::Other(format!("internal: {e}"));
    let tag = Tag::builder().key("pgdr-object").value("lock").build().map_err(internal)?;
    let locks = LifecycleRule::builder()
        .id("pgdr-lock-versions")
        .status(ExpirationStatus::Enabled)
        .filter(LifecycleRuleFilter::builder().tag(tag).build())
        .noncurrent_version_expiration(NoncurrentVersionExpiration::builder().noncurrent_days(1).build())
        .build()
        .map_err(internal)?;
    let markers = LifecycleRule::builder()
        .id("pgdr-expired-delete-markers")
        .status(ExpirationStatus::Enabled)
        .filter(LifecycleRuleFilter::builder().prefix("").build())
        .expiration(LifecycleExpiration::builder().expired_object_delete_marker(true).build())
        .build()
        .map_err(internal)?;
    BucketLifecycleConfiguration::builder().rules(locks).rules(markers).build().map_err(internal)
}
