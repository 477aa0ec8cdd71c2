//! Shared pieces of the two Lambda functions (failover, probe) and of every log group pgdr
//! owns: the zip built in memory from
//! the handler source embedded in the binary, the IAM role with ARN-scoped inline policies, the
//! log group with 7-day retention, and the function itself.

use std::io::Write;
use std::time::Duration;

use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::{Environment, FunctionCode, FunctionConfiguration, Runtime, VpcConfig};

use super::Res;
use crate::aws::Call;
use crate::clients::Regional;
use crate::cx::Cx;
use crate::error::{Error, Result};
use crate::exec::{Action, Change, Recorder};
use crate::read;
use crate::state::Key;
use crate::wait::{self, Look, Pace, Wait};

pub const FAILOVER_SOURCE: &str = include_str!("../lambda/failover.py");
pub const PROBE_SOURCE: &str = include_str!("../lambda/probe.py");

/// A zip holding one file, byte-for-byte the same for the same source (fixed timestamps), so
/// that its hash tells whether the deployed code is current.
pub fn zip_source(file: &str, source: &str) -> Result<Vec<u8>> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .last_modified_time(zip::DateTime::default())
            .unix_permissions(0o644);
        z.start_file(file, opts).map_err(|e| Error::Other(format!("cannot zip {file}: {e}")))?;
        z.write_all(source.as_bytes())?;
        z.finish().map_err(|e| Error::Other(format!("cannot zip {file}: {e}")))?;
    }
    Ok(buf.into_inner())
}

/// FNV-1a: a stable fingerprint of the code, kept in the function's description.
pub fn fingerprint(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// `arn:<partition>:<service>:<region>:<account>:...` → (partition, account).
pub fn partition_account(arn: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = arn.split(':').collect();
    (parts.len() > 5 && !parts[4].is_empty()).then(|| (parts[1].to_owned(), parts[4].to_owned()))
}

const TRUST: &str =
    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"lambda.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;

/// What [`ensure_role`] reads of an existing role, for the read phase.
pub async fn role_reads(cx: &Cx, name: &str, managed: bool) {
    let iam = &cx.clients.iam;
    let _ = futures::join!(
        async { read!(cx.clients.reads, "global", iam.get_role().role_name(name)) },
        async { read!(cx.clients.reads, "global", iam.get_role_policy().role_name(name).policy_name("pgdr")) },
        async {
            if managed {
                let _ = read!(cx.clients.reads, "global", iam.list_attached_role_policies().role_name(name));
            }
        },
    );
}

/// What [`ensure_function`], [`ensure_permission`] and [`ensure_log_group`] read of an existing
/// function and its log group, for the read phase.
pub async fn function_reads(reg: &Regional, name: &str, log_group: &str, permission: bool) {
    let _ = futures::join!(get_function(reg, name), log_groups(reg, log_group), async {
        if permission {
            let _ = read!(reg.reads, &reg.region, reg.lambda.get_policy().function_name(name));
        }
    });
}

/// The function's configuration and code location.
pub async fn get_function(
    reg: &Regional,
    name: &str,
) -> std::result::Result<aws_sdk_lambda::operation::get_function::GetFunctionOutput, crate::error::AwsError> {
    read!(reg.reads, &reg.region, reg.lambda.get_function().function_name(name))
}

/// Log groups whose name starts with `name`.
pub async fn log_groups(
    reg: &Regional,
    name: &str,
) -> std::result::Result<aws_sdk_cloudwatchlogs::operation::describe_log_groups::DescribeLogGroupsOutput, crate::error::AwsError> {
    read!(reg.reads, &reg.region, reg.logs.describe_log_groups().log_group_name_prefix(name))
}

/// The function's role: trust `lambda.amazonaws.com`, one inline policy, optional managed policies.
pub async fn ensure_role(
    cx: &Cx,
    rec: &Recorder<'_>,
    key: &Key,
    name: &str,
    policy: &serde_json::Value,
    managed: &[String],
) -> Result<Option<String>> {
    let iam = &cx.clients.iam;
    let r = Res::new(key.clone(), "iam-role", name.to_owned(), "global");
    let found = match read!(cx.clients.reads, "global", iam.get_role().role_name(name)) {
        Ok(o) => o.role.map(|r| r.arn),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(e.into()),
    };
    let exists = found.is_some();
    let arn = super::ensure(
        cx,
        rec,
        &r,
        async |_| Ok(found.clone()),
        async |_| {
            let tags = cx
                .tags("iam-role")
                .into_iter()
                .map(|(k, v)| aws_sdk_iam::types::Tag::builder().key(k).value(v).build().map_err(|e| Error::Other(e.to_string())))
                .collect::<Result<Vec<_>>>()?;
            let out = iam
                .create_role()
                .role_name(name)
                .assume_role_policy_document(TRUST)
                .description(format!("pgdr {}: {name}", cx.name()))
                .set_tags(Some(tags))
                .send()
                .aws("global")
                .await?;
            out.role.map(|r| r.arn).ok_or_else(|| Error::Other("CreateRole returned no role".into()))
        },
    )
    .await?;
    // The inline policy: compare documents as JSON, write only when different.
    let want = policy.to_string();
    let have = if exists {
        match read!(cx.clients.reads, "global", iam.get_role_policy().role_name(name).policy_name("pgdr")) {
            Ok(o) => {
                let doc = percent_decode(&o.policy_document);
                serde_json::from_str::<serde_json::Value>(&doc).ok()
            }
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    if have.as_ref() != Some(policy) {
        let change = exists.then(|| Change::new(Action::Change, "iam-role", name, "global").detail("inline policy"));
        let put = iam.put_role_policy().role_name(name).policy_name("pgdr").policy_document(&want);
        rec.apply_part(change, async |_| Ok(put.send().aws("global").await?)).await?;
    }
    if !managed.is_empty() {
        let attached: Vec<String> = if exists {
            let out = read!(cx.clients.reads, "global", iam.list_attached_role_policies().role_name(name))?;
            out.attached_policies.unwrap_or_default().into_iter().filter_map(|p| p.policy_arn).collect()
        } else {
            vec![]
        };
        for m in managed.iter().filter(|m| !attached.contains(m)) {
            let change = exists.then(|| Change::new(Action::Change, "iam-role", name, "global").detail(format!("attach {m}")));
            rec.apply_part(change, async |_| Ok(iam.attach_role_policy().role_name(name).policy_arn(m).send().aws("global").await?))
                .await?;
        }
    }
    Ok(arn)
}

/// IAM returns policy documents URL-encoded.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn delete_role(cx: &Cx, rec: &Recorder<'_>, key: &Key, name: &str, managed: &[String]) -> Result<()> {
    let iam = &cx.clients.iam;
    let r = Res::new(key.clone(), "iam-role", name.to_owned(), "global");
    super::remove(
        cx,
        rec,
        &r,
        async |_| match iam.get_role().role_name(name).send().aws("global").await {
            Ok(o) => Ok(o.role.map(|r| r.role_name)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        },
        async |name| {
            // A role with policies cannot be deleted: remove them first.
            let gone = |e: &crate::error::AwsError| e.is_not_found();
            if let Err(e) = iam.delete_role_policy().role_name(&name).policy_name("pgdr").send().aws("global").await {
                if !gone(&e) {
                    return Err(e.into());
                }
            }
            for m in managed {
                if let Err(e) = iam.detach_role_policy().role_name(&name).policy_arn(m).send().aws("global").await {
                    if !gone(&e) {
                        return Err(e.into());
                    }
                }
            }
            match iam.delete_role().role_name(&name).send().aws("global").await {
                Ok(_) => Ok(()),
                Err(e) if gone(&e) => Ok(()),
                Err(e) => Err(e.into()),
            }
        },
    )
    .await
}

/// The function's log group, created by pgdr (7-day retention) so that `down` removes it.
pub async fn ensure_log_group(cx: &Cx, rec: &Recorder<'_>, reg: &Regional, key: &Key, name: &str) -> Result<()> {
    let r = Res::new(key.clone(), "log-group", name.to_owned(), &reg.region);
    let out = log_groups(reg, name).await?;
    let found = out.log_groups.unwrap_or_default().into_iter().find(|g| g.log_group_name.as_deref() == Some(name));
    let retention = found.as_ref().and_then(|g| g.retention_in_days);
    let exists = found.is_some();
    let keep_7_days = async || -> Result<()> {
        reg.logs.put_retention_policy().log_group_name(name).retention_in_days(7).send().aws(&reg.region).await?;
        Ok(())
    };
    super::ensure(
        cx,
        rec,
        &r,
        async |_| Ok(exists.then(|| name.to_owned())),
        async |_| {
            let tags = cx.tags("log-group").into_iter().collect();
            match reg.logs.create_log_group().log_group_name(name).set_tags(Some(tags)).send().aws(&reg.region).await {
                Ok(_) => {}
                Err(e) if e.is_already_exists() => {}
                Err(e) => return Err(e.into()),
            }
            keep_7_days().await?;
            Ok(name.to_owned())
        },
    )
    .await?;
    if exists && retention != Some(7) {
        let change = Change::new(Action::Change, "log-group", name, &reg.region).detail(format!("retention {retention:?} -> 7 days"));
        rec.apply(change, async |_| keep_7_days().await).await?;
    }
    Ok(())
}

pub async fn delete_log_group(cx: &Cx, rec: &Recorder<'_>, reg: &Regional, key: &Key, name: &str) -> Result<()> {
    let r = Res::new(key.clone(), "log-group", name.to_owned(), &reg.region);
    super::remove(
        cx,
        rec,
        &r,
        async |_| {
            let out = reg.logs.describe_log_groups().log_group_name_prefix(name).send().aws(&reg.region).await?;
            Ok(out.log_groups.unwrap_or_default().into_iter().find_map(|g| g.log_group_name.filter(|n| n == name)))
        },
        async |name| match reg.logs.delete_log_group().log_group_name(name).send().aws(&reg.region).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        },
    )
    .await
}

/// What a function should look like.
pub struct FunctionSpec<'a> {
    pub name: String,
    pub file: &'a str,
    pub source: &'a str,
    pub handler: &'a str,
    pub role_arn: String,
    pub timeout_s: i32,
    pub env: Vec<(String, String)>,
    /// Subnets and security groups, for a function that must be in a VPC.
    pub vpc: Option<(Vec<String>, Vec<String>)>,
}

/// Creates the function, or brings its code and configuration up to date. Returns its ARN.
pub async fn ensure_function(cx: &Cx, rec: &Recorder<'_>, reg: &Regional, key: &Key, spec: &FunctionSpec<'_>) -> Result<Option<String>> {
    let zip = zip_source(spec.file, spec.source)?;
    let description = format!("pgdr {}: {} (code {})", cx.name(), spec.name, fingerprint(&zip));
    let r = Res::new(key.clone(), "lambda-function", spec.name.clone(), &reg.region);
    let found = match get_function(reg, &spec.name).await {
        Ok(o) => o.configuration,
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(e.into()),
    };
    let arn = super::ensure(
        cx,
        rec,
        &r,
        async |_| Ok(found.as_ref().and_then(|f| f.function_arn.clone())),
        async |_| create_function(cx, rec, reg, spec, &zip, &description).await,
    )
    .await?;
    if let Some(f) = found {
        update_function(cx, rec, reg, spec, &f, &zip, &description).await?;
    }
    Ok(arn)
}

fn environment(spec: &FunctionSpec<'_>) -> Environment {
    Environment::builder().set_variables(Some(spec.env.iter().cloned().collect())).build()
}

/// Creates the function, waiting while IAM has not propagated its new role to Lambda (the two
/// messages of [`crate::aws::Kind::Propagation`]).
async fn create_function(
    cx: &Cx,
    rec: &Recorder<'_>,
    reg: &Regional,
    spec: &FunctionSpec<'_>,
    zip: &[u8],
    description: &str,
) -> Result<String> {
    let tags: std::collections::HashMap<String, String> = cx.tags("lambda-function").into_iter().collect();
    let vpc = spec
        .vpc
        .as_ref()
        .map(|(s, g)| VpcConfig::builder().set_subnet_ids(Some(s.clone())).set_security_group_ids(Some(g.clone())).build());
    let create = reg
        .lambda
        .create_function()
        .function_name(&spec.name)
        .runtime(Runtime::Python312)
        .handler(spec.handler)
        .role(&spec.role_arn)
        .timeout(spec.timeout_s)
        .memory_size(256)
        .description(description)
        .environment(environment(spec))
        .set_vpc_config(vpc)
        .code(FunctionCode::builder().zip_file(Blob::new(zip.to_vec())).build())
        .set_tags(Some(tags));
    Wait::new(format!("creating function {}", spec.name))
        .budget(Duration::from_secs(180))
        .pace(Pace::FAST)
        .hint("rerun `pgdr up`")
        .progress(|s, t| rec.status(&format!("{}: {s} ({})", spec.name, wait::human(t))))
        .until(&cx.cancel, &cx.clients.reads, async || match create.clone().send().aws(&reg.region).await {
            Ok(o) => Ok(Look::Ready(o.function_arn.unwrap_or_default())),
            Err(e) if e.is_propagation() => Ok(Look::Pending("waiting for IAM to make the new role usable by Lambda".into())),
            Err(e) => Err(e.into()),
        })
        .await
}

/// What differs between the function's configuration and the spec.
fn config_diff(f: &FunctionConfiguration, spec: &FunctionSpec<'_>, description: &str) -> Vec<String> {
    let have_env: std::collections::BTreeMap<String, String> =
        f.environment.clone().and_then(|e| e.variables).unwrap_or_default().into_iter().collect();
    let want_env: std::collections::BTreeMap<String, String> = spec.env.iter().cloned().collect();
    let mut diff = Vec::new();
    if have_env != want_env {
        diff.push("environment".to_owned());
    }
    if f.timeout != Some(spec.timeout_s) {
        diff.push(format!("timeout {:?} -> {}", f.timeout, spec.timeout_s));
    }
    if f.role.as_deref() != Some(spec.role_arn.as_str()) {
        diff.push("role".into());
    }
    if f.handler.as_deref() != Some(spec.handler) {
        diff.push("handler".into());
    }
    if f.description.as_deref() != Some(description) {
        diff.push("description".into());
    }
    diff
}

/// Brings an existing function up to date: code (by fingerprint), then configuration. A
/// function still `Pending` (just created) or mid-update is waited for first: Lambda refuses
/// an update then (`ResourceConflictException`).
async fn update_function(
    cx: &Cx,
    rec: &Recorder<'_>,
    reg: &Regional,
    spec: &FunctionSpec<'_>,
    f: &FunctionConfiguration,
    zip: &[u8],
    description: &str,
) -> Result<()> {
    let region = reg.region.as_str();
    let code_changed = f.description.as_deref() != Some(description);
    let diff = config_diff(f, spec, description);
    let busy = f.state.as_ref().is_some_and(|s| s.as_str() == "Pending")
        || f.last_update_status.as_ref().is_some_and(|s| s.as_str() == "InProgress");
    if busy && (code_changed || !diff.is_empty()) && !rec.planning() {
        wait_updated(cx, rec, reg, &spec.name).await?;
    }
    if code_changed {
        rec.apply(Change::new(Action::Change, "lambda-function", &spec.name, region).detail("code"), async |_| {
            reg.lambda.update_function_code().function_name(&spec.name).zip_file(Blob::new(zip.to_vec())).send().aws(region).await?;
            wait_updated(cx, rec, reg, &spec.name).await
        })
        .await?;
    }
    if diff.is_empty() {
        return Ok(());
    }
    let update = reg
        .lambda
        .update_function_configuration()
        .function_name(&spec.name)
        .role(&spec.role_arn)
        .handler(spec.handler)
        .timeout(spec.timeout_s)
        .description(description)
        .environment(environment(spec));
    rec.apply(Change::new(Action::Change, "lambda-function", &spec.name, region).detail(diff.join(", ")), async |_| {
        update.send().aws(region).await?;
        wait_updated(cx, rec, reg, &spec.name).await
    })
    .await?;
    Ok(())
}

/// Waits until a function's last update finished (AWS refuses a second update meanwhile).
async fn wait_updated(cx: &Cx, rec: &Recorder<'_>, reg: &Regional, name: &str) -> Result<()> {
    Wait::new(format!("update of {name}"))
        .budget(Duration::from_secs(300))
        .pace(Pace::FAST)
        .hint("rerun `pgdr up`")
        .progress(|s, _| rec.status(&format!("{name}: {s}")))
        .until(&cx.cancel, &cx.clients.reads, async || {
            let out = reg.lambda.get_function_configuration().function_name(name).send().aws(&reg.region).await?;
            if out.state.as_ref().is_some_and(|s| s.as_str() == "Pending") {
                return Ok(Look::Pending("Pending".into()));
            }
            Ok(match out.last_update_status.as_ref().map(|s| s.as_str().to_owned()).as_deref() {
                None | Some("Successful") => Look::Ready(()),
                Some("Failed") => Look::Failed(out.last_update_status_reason.unwrap_or_else(|| "Failed".into())),
                Some(s) => Look::Pending(s.to_owned()),
            })
        })
        .await
}

pub async fn delete_function(cx: &Cx, rec: &Recorder<'_>, reg: &Regional, key: &Key, name: &str) -> Result<()> {
    let r = Res::new(key.clone(), "lambda-function", name.to_owned(), &reg.region);
    super::remove(
        cx,
        rec,
        &r,
        async |_| match reg.lambda.get_function().function_name(name).send().aws(&reg.region).await {
            Ok(o) => Ok(o.configuration.and_then(|c| c.function_name)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        },
        async |name| match reg.lambda.delete_function().function_name(name).send().aws(&reg.region).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        },
    )
    .await
}

/// Grants `principal` (from `source_arn`) the right to invoke the function, once.
pub async fn ensure_permission(
    _cx: &Cx,
    rec: &Recorder<'_>,
    reg: &Regional,
    function: &str,
    sid: &str,
    principal: &str,
    source_arn: &str,
) -> Result<()> {
    let region = reg.region.as_str();
    let policy = match read!(reg.reads, region, reg.lambda.get_policy().function_name(function)) {
        Ok(o) => o.policy.unwrap_or_default(),
        Err(e) if e.is_not_found() => String::new(),
        Err(e) => return Err(e.into()),
    };
    let doc: serde_json::Value = serde_json::from_str(&policy).unwrap_or_default();
    let present = doc["Statement"].as_array().is_some_and(|s| s.iter().any(|st| st["Sid"] == sid));
    if present {
        return Ok(());
    }
    let change =
        Change::new(Action::Create, "lambda-permission", &format!("{function}/{sid}"), region).detail(format!("{principal} may invoke"));
    let add = reg
        .lambda
        .add_permission()
        .function_name(function)
        .statement_id(sid)
        .action("lambda:InvokeFunction")
        .principal(principal)
        .source_arn(source_arn);
    rec.apply(change, async |_| Ok(add.send().aws(region).await?)).await?;
    Ok(())
}

/// Waits until the network interfaces Lambda made for a deleted VPC function are gone,
/// deleting those that are `available` (Lambda developer guide, "Connecting outbound
/// networking to resources in a VPC": interfaces stay after the function, for minutes; the
/// Terraform AWS provider waits up to 45 minutes for them).
pub async fn release_enis(cx: &Cx, rec: &Recorder<'_>, reg: &Regional, function: &str) -> Result<()> {
    let filter = aws_sdk_ec2::types::Filter::builder().name("description").values(format!("AWS Lambda VPC ENI-{function}-*")).build();
    Wait::new(format!("network interfaces of {function}"))
        .budget(Duration::from_secs(45 * 60))
        .pace(Pace::SLOW)
        .hint("delete the function's network interfaces in the EC2 console once they are available, then rerun")
        .progress(|s, t| rec.status(&format!("{function}: {s} ({})", wait::human(t))))
        .until(&cx.cancel, &cx.clients.reads, async || {
            let out = reg.ec2.describe_network_interfaces().filters(filter.clone()).send().aws(&reg.region).await?;
            let enis = out.network_interfaces.unwrap_or_default();
            if enis.is_empty() {
                return Ok(Look::Ready(()));
            }
            let mut in_use = 0;
            for eni in &enis {
                let id = eni.network_interface_id().unwrap_or_default();
                let available = eni.status().is_some_and(|s| s.as_str().eq_ignore_ascii_case("available"));
                if !available {
                    in_use += 1;
                    continue;
                }
                match reg.ec2.delete_network_interface().network_interface_id(id).send().aws(&reg.region).await {
                    Ok(_) => {}
                    Err(e) if e.is_not_found() || e.is_in_use() || e.is_invalid_state() => in_use += 1,
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(Look::Pending(format!("{in_use} of {} network interfaces still held by Lambda", enis.len())))
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zip_is_deterministic_and_holds_the_handler() {
        let a = zip_source("failover.py", FAILOVER_SOURCE).unwrap();
        let b = zip_source("failover.py", FAILOVER_SOURCE).unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(a)).unwrap();
        let mut f = z.by_name("failover.py").unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut f, &mut text).unwrap();
        assert!(text.contains("def handler("));
        assert_ne!(fingerprint(&zip_source("probe.py", PROBE_SOURCE).unwrap()), fingerprint(&b));
    }

    #[test]
    fn arn_parts() {
        assert_eq!(partition_account("arn:aws:rds:us-east-1:123456789012:db:x"), Some(("aws".into(), "123456789012".into())));
        assert_eq!(partition_account("nope"), None);
    }
}
