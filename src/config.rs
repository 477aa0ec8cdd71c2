//! Configuration: defaults from the reference designs, overridden per environment by
//! `pgdr.toml`, then by command-line flags. Validated before any AWS call.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// AWS regions pgdr knows, all of the `aws` partition (see `partition`). A region outside this
/// list is refused unless the config sets `allow_unlisted_regions = true` (for regions newer
/// than this release).
#[rustfmt::skip]
pub const KNOWN_REGIONS: &[&str] = &[
    "af-south-1", "ap-east-1", "ap-east-2", "ap-northeast-1", "ap-northeast-2", "ap-northeast-3",
    "ap-south-1", "ap-south-2", "ap-southeast-1", "ap-southeast-2", "ap-southeast-3",
    "ap-southeast-4", "ap-southeast-5", "ap-southeast-6", "ap-southeast-7", "ca-central-1",
    "ca-west-1", "eu-central-1", "eu-central-2", "eu-north-1", "eu-south-1", "eu-south-2",
    "eu-west-1", "eu-west-2", "eu-west-3", "il-central-1", "me-central-1", "me-south-1",
    "mx-central-1", "sa-east-1", "us-east-1", "us-east-2", "us-west-1", "us-west-2",
];

/// An IPv4 network in CIDR notation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = s.split_once('/')?;
        let addr: Ipv4Addr = a.parse().ok()?;
        let prefix: u8 = p.parse().ok()?;
        if prefix > 32 {
            return None;
        }
        let c = Cidr { addr, prefix };
        // The address must be the network address itself (10.0.0.0/16, not 10.0.3.1/16).
        (c.network() == u32::from(addr)).then_some(c)
    }
    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }
    fn network(&self) -> u32 {
        u32::from(self.addr) & self.mask()
    }
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let m = self.mask() & other.mask();
        (u32::from(self.addr) & m) == (u32::from(other.addr) & m)
    }
    /// The `index`-th subnet of `prefix` bits inside this network.
    pub fn subnet(&self, prefix: u8, index: u32) -> Option<Cidr> {
        if prefix < self.prefix || prefix > 32 {
            return None;
        }
        let count = 1u64 << (prefix - self.prefix);
        if u64::from(index) >= count {
            return None;
        }
        let size = 1u64 << (32 - prefix);
        let base = u64::from(self.network()) + u64::from(index) * size;
        Some(Cidr { addr: Ipv4Addr::from(base as u32), prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Settings of one environment, after defaults and overrides. Everything is plain data.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub primary_region: String,
    pub dr_region: String,
    pub primary_cidr: String,
    pub dr_cidr: String,
    /// Extra tags on every resource (cost allocation: `Team`, `Environment`, ...).
    pub tags: BTreeMap<String, String>,
    pub engine_version: String,
    pub instance_class: String,
    pub allocated_storage_gib: i32,
    pub backup_retention_days: i32,
    pub master_username: String,
    pub database_name: String,
    pub log_statement: String,
    /// `rds.force_ssl`: on by default. Turning it off is possible and warned about.
    pub require_tls: bool,
    /// Defaults to on for environments whose name starts with `prod`.
    pub deletion_protection: Option<bool>,
    pub primary_wait_minutes: u64,
    pub replica_wait_minutes: u64,
    pub zone_name: Option<String>,
    pub record_ttl: i64,
    /// Minutes the primary must be unreachable before the automatic failover fires.
    pub failover_after_minutes: i32,
    pub max_failover_lag_seconds: f64,
    pub alarm_emails: Vec<String>,
    /// Attempts per AWS call on throttling and 5xx (the SDK's standard retry mode).
    pub retry_max_attempts: u32,
    pub allow_unlisted_regions: bool,
    /// PEM file of the CA certificates that sign the RDS server certificates (AWS's RDS
    /// global bundle): `switchover` and `drill` verify the servers against it. Read when they
    /// run, not by `up`.
    pub tls_ca_bundle: Option<String>,
    /// How long `switchover` waits for the replica to replay the fenced primary's last WAL
    /// position before it gives up, unfences and promotes nothing.
    pub switchover_catchup_seconds: u64,
    /// A production environment: `drill` needs `--production`. Defaults to on for names
    /// starting with `prod`.
    pub production: Option<bool>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            primary_region: "us-east-1".into(),
            dr_region: "eu-west-1".into(),
            primary_cidr: "10.0.0.0/16".into(),
            dr_cidr: "10.1.0.0/16".into(),
            tags: BTreeMap::new(),
            engine_version: "15".into(),
            instance_class: "db.t3.large".into(),
            allocated_storage_gib: 100,
            backup_retention_days: 7,
            master_username: "postgres".into(),
            database_name: "postgres".into(),
            // `ddl`, `mod` and `all` write `ALTER ROLE … PASSWORD '…'` in clear text to the
            // exported logs; the audit trail is pgaudit's instead (see dbgroups::wanted_parameters).
            log_statement: "none".into(),
            require_tls: true,
            deletion_protection: None,
            primary_wait_minutes: 60,
            replica_wait_minutes: 120,
            zone_name: None,
            record_ttl: 60,
            failover_after_minutes: 3,
            max_failover_lag_seconds: 60.0,
            alarm_emails: Vec::new(),
            retry_max_attempts: 5,
            allow_unlisted_regions: false,
            tls_ca_bundle: None,
            switchover_catchup_seconds: 60,
            production: None,
        }
    }
}

/// The config file: `state` (where the state lives), `[defaults]` for every environment,
/// `[env.<name>]` for one.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// A directory or `s3://BUCKET/PREFIX`, as `--state` takes.
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    defaults: Option<toml::Table>,
    #[serde(default)]
    env: BTreeMap<String, toml::Table>,
}

/// Overrides from the command line; `None` keeps the file's or the default value.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub primary_region: Option<String>,
    pub dr_region: Option<String>,
}

/// A validated environment: its name and its settings.
#[derive(Clone, Debug)]
pub struct Env {
    pub name: String,
    pub settings: Settings,
    /// The roles of the two regions are swapped (after a failover and `reprotect`): the
    /// settings' primary region and CIDR are then the DR side's, and the other way round.
    pub swapped: bool,
}

pub fn validate_env_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 20
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(Error::user(format!(
            "invalid environment name {name:?}: use 1-20 lowercase letters, digits and single dashes, starting with a letter (e.g. --env dev)"
        )))
    }
}

fn read_file(path: &Path) -> Result<File> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::user(format!("cannot read config file {}: {e}; fix the path given to --config", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        Error::user(format!(
            "config file {} is not valid: {}; fix the file (see docs/configuration.md)",
            path.display(),
            crate::error::one_line(&e.to_string())
        ))
    })
}

/// The config file's `state` setting, if any.
pub fn state_setting(path: Option<&Path>) -> Result<Option<String>> {
    match path {
        Some(p) => Ok(read_file(p)?.state),
        None => Ok(None),
    }
}

/// The settings every environment starts from: the defaults and the file's `[defaults]`.
pub fn load_defaults(path: Option<&Path>) -> Result<Settings> {
    let mut merged = toml::Table::try_from(Settings::default())
        .map_err(|e| Error::Other(format!("internal: default settings do not serialize: {e}")))?;
    if let Some(path) = path {
        for (k, v) in read_file(path)?.defaults.iter().flatten() {
            merged.insert(k.clone(), v.clone());
        }
    }
    merged.try_into().map_err(|e: toml::de::Error| {
        Error::user(format!("the config's [defaults] are not valid: {}; fix the config file", crate::error::one_line(&e.to_string())))
    })
}

/// Loads `path` (if any) and resolves the settings of environment `name`.
pub fn load(name: &str, path: Option<&Path>, overrides: &Overrides) -> Result<Env> {
    validate_env_name(name)?;
    let mut merged = toml::Table::try_from(Settings::default())
        .map_err(|e| Error::Other(format!("internal: default settings do not serialize: {e}")))?;
    if let Some(path) = path {
        let file = read_file(path)?;
        for table in file.defaults.iter().chain(file.env.get(name)) {
            for (k, v) in table {
                merged.insert(k.clone(), v.clone());
            }
        }
    }
    let mut settings: Settings = merged.try_into().map_err(|e: toml::de::Error| {
        Error::user(format!(
            "config for environment {name:?} is not valid: {}; fix the config file (see docs/configuration.md)",
            crate::error::one_line(&e.to_string())
        ))
    })?;
    if let Some(r) = &overrides.primary_region {
        settings.primary_region = r.clone();
    }
    if let Some(r) = &overrides.dr_region {
        settings.dr_region = r.clone();
    }
    validate(name, &settings)?;
    Ok(Env { name: name.to_owned(), settings, swapped: false })
}

fn looks_like_region(r: &str) -> bool {
    let parts: Vec<&str> = r.split('-').collect();
    parts.len() >= 3
        && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()))
        && parts.last().is_some_and(|p| p.chars().all(|c| c.is_ascii_digit()))
}

/// The AWS partition a region name belongs to.
fn partition(region: &str) -> &'static str {
    if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-iso") {
        "aws-iso"
    } else if region.starts_with("eu-isoe-") {
        "aws-iso-e"
    } else {
        "aws"
    }
}

/// Checks the settings before any AWS call: each problem is one line with its fix.
pub fn validate(_name: &str, s: &Settings) -> Result<()> {
    validate_regions(s)?;
    validate_networks(s)?;
    validate_database(s)?;
    validate_operations(s)
}

fn bad(msg: String) -> Result<()> {
    Err(Error::user(msg))
}

fn validate_regions(s: &Settings) -> Result<()> {
    for (what, r) in [("primary_region", &s.primary_region), ("dr_region", &s.dr_region)] {
        validate_region(what, r, s)?;
    }
    if s.primary_region == s.dr_region {
        return bad(format!(
            "primary and DR regions are both {}: disaster recovery needs two different regions; set --dr-region",
            s.primary_region
        ));
    }
    Ok(())
}

/// One region named by `what`: a region name, of the aws partition, known (or allowed).
pub fn validate_region(what: &str, r: &str, s: &Settings) -> Result<()> {
    if !looks_like_region(r) {
        return bad(format!("{what} {r:?} is not an AWS region name; use a name like us-east-1"));
    }
    // GovCloud and China: an encrypted replica from another region needs a presigned
    // CreateDBInstanceReadReplica request there (PreSignedUrl; the aws partition ignores it),
    // which pgdr does not build. Refused before anything is made, not when the replica fails.
    let p = partition(r);
    if p != "aws" {
        return bad(format!(
            "{what} {r} is in the {p} partition, which pgdr does not support: its encrypted cross-region replicas need a presigned request pgdr does not build; use two regions of the aws partition"
        ));
    }
    if !s.allow_unlisted_regions && !KNOWN_REGIONS.contains(&r) {
        return bad(format!(
            "{what} {r:?} is not a known AWS region; check the spelling, or set allow_unlisted_regions = true for a region newer than pgdr"
        ));
    }
    Ok(())
}

fn validate_networks(s: &Settings) -> Result<()> {
    let mut cidrs = Vec::new();
    for (what, c) in [("primary_cidr", &s.primary_cidr), ("dr_cidr", &s.dr_cidr)] {
        let Some(cidr) = Cidr::parse(c) else {
            return bad(format!("{what} {c:?} is not an IPv4 network in CIDR notation; use e.g. 10.0.0.0/16"));
        };
        if !(16..=24).contains(&cidr.prefix) {
            return bad(format!("{what} {c} must have a prefix between /16 and /24 (AWS VPC limits, two /26+ subnets)"));
        }
        cidrs.push(cidr);
    }
    if cidrs[0].overlaps(&cidrs[1]) {
        return bad(format!(
            "primary_cidr {} and dr_cidr {} overlap: VPC peering needs disjoint networks; change one of them",
            cidrs[0], cidrs[1]
        ));
    }
    Ok(())
}

fn validate_database(s: &Settings) -> Result<()> {
    if !(20..=65536).contains(&s.allocated_storage_gib) {
        return bad(format!("allocated_storage_gib {} is out of range 20..=65536", s.allocated_storage_gib));
    }
    if !(1..=35).contains(&s.backup_retention_days) {
        return bad(format!(
            "backup_retention_days {} is out of range 1..=35 (a cross-region replica needs backups on the primary)",
            s.backup_retention_days
        ));
    }
    if !s.instance_class.starts_with("db.") {
        return bad(format!("instance_class {:?} must be an RDS class such as db.t3.large", s.instance_class));
    }
    let major = s.engine_version.split('.').next().unwrap_or("");
    if major.parse::<u32>().map_or(true, |m| !(11..=30).contains(&m)) {
        return bad(format!("engine_version {:?} must be a PostgreSQL version such as 15 or 15.7", s.engine_version));
    }
    if !["none", "ddl", "mod", "all"].contains(&s.log_statement.as_str()) {
        return bad(format!("log_statement {:?} must be one of none, ddl, mod, all", s.log_statement));
    }
    let user_ok = (1..=63).contains(&s.master_username.len())
        && s.master_username.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.master_username.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !["admin", "rdsadmin", "rds_superuser"].contains(&s.master_username.as_str());
    if !user_ok {
        return bad(format!("master_username {:?} is not allowed by RDS; use letters, digits and _", s.master_username));
    }
    Ok(())
}

/// DNS, detection, waits, retries, tags and alarm addresses.
fn validate_operations(s: &Settings) -> Result<()> {
    if !(5..=86400).contains(&s.record_ttl) {
        return bad(format!("record_ttl {} is out of range 5..=86400 seconds", s.record_ttl));
    }
    if !(3..=60).contains(&s.failover_after_minutes) {
        return bad(format!(
            "failover_after_minutes {} must be 3..=60: shorter would fail over during a Multi-AZ failover (60-120 s)",
            s.failover_after_minutes
        ));
    }
    if !(5..=800).contains(&s.switchover_catchup_seconds) {
        return bad(format!(
            "switchover_catchup_seconds {} is out of range 5..=800 (the agent waits inside one Lambda invocation)",
            s.switchover_catchup_seconds
        ));
    }
    if s.primary_wait_minutes == 0 || s.replica_wait_minutes == 0 {
        return bad("primary_wait_minutes and replica_wait_minutes must be at least 1".into());
    }
    if !(1.0..=86400.0).contains(&s.max_failover_lag_seconds) {
        return bad(format!("max_failover_lag_seconds {} is out of range 1..=86400", s.max_failover_lag_seconds));
    }
    let db_ok = (1..=63).contains(&s.database_name.len())
        && s.database_name.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.database_name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !db_ok {
        return bad(format!(
            "database_name {:?} is not allowed by RDS; use 1-63 letters, digits and _, starting with a letter",
            s.database_name
        ));
    }
    if let Some(z) = &s.zone_name {
        let ok = z.len() <= 200
            && z.split('.').count() >= 2
            && z.split('.')
                .all(|l| !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        if !ok {
            return bad(format!("zone_name {z:?} is not a DNS name like db-dev.internal"));
        }
    }
    if !(1..=20).contains(&s.retry_max_attempts) {
        return bad(format!("retry_max_attempts {} is out of range 1..=20", s.retry_max_attempts));
    }
    for (k, v) in &s.tags {
        if k.starts_with("pgdr:") || k.starts_with("aws:") || k.is_empty() || k.len() > 127 || v.len() > 255 {
            return bad(format!("tag {k:?} is not allowed: keys 1-127 chars, not starting with pgdr: or aws:, values up to 255"));
        }
    }
    for e in &s.alarm_emails {
        if !e.contains('@') || e.contains(char::is_whitespace) {
            return bad(format!("alarm_emails entry {e:?} is not an email address"));
        }
    }
    Ok(())
}

impl Env {
    /// The same environment with the regions' roles exchanged.
    pub fn swap_roles(mut self) -> Env {
        let s = &mut self.settings;
        std::mem::swap(&mut s.primary_region, &mut s.dr_region);
        std::mem::swap(&mut s.primary_cidr, &mut s.dr_cidr);
        self.swapped = !self.swapped;
        self
    }

    pub fn primary_cidr(&self) -> Cidr {
        Cidr::parse(&self.settings.primary_cidr).unwrap_or(Cidr { addr: Ipv4Addr::new(10, 0, 0, 0), prefix: 16 })
    }
    pub fn dr_cidr(&self) -> Cidr {
        Cidr::parse(&self.settings.dr_cidr).unwrap_or(Cidr { addr: Ipv4Addr::new(10, 1, 0, 0), prefix: 16 })
    }
    pub fn production(&self) -> bool {
        self.settings.production.unwrap_or_else(|| self.name.starts_with("prod"))
    }

    pub fn deletion_protection(&self) -> bool {
        self.settings.deletion_protection.unwrap_or_else(|| self.name.starts_with("prod"))
    }
    pub fn zone_name(&self) -> String {
        self.settings.zone_name.clone().unwrap_or_else(|| format!("db-{}.internal", self.name))
    }
    pub fn engine_major(&self) -> &str {
        self.settings.engine_version.split('.').next().unwrap_or("15")
    }
    /// Warnings `plan` and `up` print loudly.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.settings.require_tls {
            w.push("require_tls = false: the database accepts unencrypted connections (rds.force_ssl=0)".to_owned());
        }
        if self.settings.log_statement != "none" {
            w.push(format!(
                "log_statement = {:?}: PostgreSQL writes statements, passwords in ALTER ROLE … PASSWORD among them, in clear text to CloudWatch Logs; pgdr's audit trail (pgaudit) does not need it",
                self.settings.log_statement
            ));
        }
        if self.name.starts_with("prod") && !self.deletion_protection() {
            w.push(format!("deletion protection is off for {:?}, a production environment", self.name));
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names() {
        for ok in ["dev", "prod-eu", "a1", "abcdefghijklmnopqrst"] {
            assert!(validate_env_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Dev", "1dev", "dev_1", "dev-", "a--b", "abcdefghijklmnopqrstu", "dév"] {
            assert!(validate_env_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs() {
        let a = Cidr::parse("10.0.0.0/16").unwrap();
        let b = Cidr::parse("10.1.0.0/16").unwrap();
        let c = Cidr::parse("10.0.128.0/17").unwrap();
        assert!(!a.overlaps(&b));
        assert!(a.overlaps(&c) && c.overlaps(&a));
        assert_eq!(a.subnet(24, 1).unwrap().to_string(), "10.0.1.0/24");
        assert!(a.subnet(24, 256).is_none());
        assert!(Cidr::parse("10.0.3.1/16").is_none());
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("banana").is_none());
    }

    #[test]
    fn overlapping_cidrs_refused() {
        let s = Settings { dr_cidr: "10.0.0.0/20".into(), ..Settings::default() };
        let e = validate("dev", &s).unwrap_err();
        assert!(e.to_string().contains("overlap"), "{e}");
    }

    #[test]
    fn equal_and_unknown_regions_refused() {
        let mut s = Settings { dr_region: "us-east-1".into(), ..Settings::default() };
        assert!(validate("dev", &s).unwrap_err().to_string().contains("two different regions"));
        s.dr_region = "xx-nowhere-9".into();
        assert!(validate("dev", &s).unwrap_err().to_string().contains("not a known AWS region"));
        s.allow_unlisted_regions = true;
        assert!(validate("dev", &s).is_ok());
        s.dr_region = "europe".into();
        assert!(validate("dev", &s).unwrap_err().to_string().contains("not an AWS region name"));
    }

    #[test]
    fn regions_outside_the_aws_partition_refused() {
        for (primary, dr, named) in [
            ("us-gov-west-1", "us-gov-east-1", "primary_region us-gov-west-1 is in the aws-us-gov partition"),
            ("cn-north-1", "cn-northwest-1", "primary_region cn-north-1 is in the aws-cn partition"),
            ("us-east-1", "cn-north-1", "dr_region cn-north-1 is in the aws-cn partition"),
        ] {
            let s = Settings { primary_region: primary.into(), dr_region: dr.into(), ..Settings::default() };
            let e = validate("dev", &s).unwrap_err().to_string();
            assert!(e.contains(named) && e.contains("use two regions of the aws partition"), "{e}");
        }
        let s = Settings { primary_region: "us-iso-east-1".into(), allow_unlisted_regions: true, ..Settings::default() };
        assert!(validate("dev", &s).unwrap_err().to_string().contains("aws-iso partition"));
        let s = Settings { primary_region: "ap-southeast-7".into(), dr_region: "mx-central-1".into(), ..Settings::default() };
        assert!(validate("dev", &s).is_ok());
    }

    #[test]
    fn file_overrides_per_env() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pgdr.toml");
        std::fs::write(
            &p,
            "[defaults]\ninstance_class = \"db.r6g.large\"\n[defaults.tags]\nTeam = \"data\"\n[env.prod]\ndr_region = \"eu-central-1\"\n",
        )
        .unwrap();
        let prod = load("prod", Some(&p), &Overrides::default()).unwrap();
        assert_eq!(prod.settings.dr_region, "eu-central-1");
        assert_eq!(prod.settings.instance_class, "db.r6g.large");
        assert_eq!(prod.settings.tags.get("Team").map(String::as_str), Some("data"));
        assert!(prod.deletion_protection());
        let dev = load("dev", Some(&p), &Overrides { dr_region: Some("eu-west-2".into()), ..Default::default() }).unwrap();
        assert_eq!(dev.settings.dr_region, "eu-west-2");
        assert!(!dev.deletion_protection());
    }

    #[test]
    fn malformed_config_is_a_user_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pgdr.toml");
        std::fs::write(&p, "[env.dev]\ninstance_class = \n").unwrap();
        assert!(matches!(load("dev", Some(&p), &Overrides::default()), Err(Error::User(_))));
        std::fs::write(&p, "[env.dev]\nno_such_setting = 1\n").unwrap();
        let e = load("dev", Some(&p), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("no_such_setting"), "{e}");
    }
}
