//! What AWS says now about an environment's databases, DNS and alarms: the truth `status` and
//! `failover` act on (an automatic failover may have happened while nobody was looking).

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::aws::Call;
use crate::cx::{Cx, Side};
use crate::error::Result;
use crate::steps::{dns, failover, instance};

#[derive(Clone, Debug, Serialize)]
pub struct Instance {
    pub region: String,
    pub id: String,
    /// `primary` (accepts writes), `replica`, `fenced` (old primary after a failover) or `missing`.
    pub role: String,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(skip)]
    pub arn: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct WeightedRecord {
    pub set_id: String,
    pub weight: i64,
    pub value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Alarm {
    pub name: String,
    pub region: String,
    pub state: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Health {
    /// Region whose instance accepts writes, from AWS.
    pub writer_region: Option<String>,
    pub instances: Vec<Instance>,
    /// Latest `ReplicaLag` of the replica, in seconds (`None`: no datapoint in 10 minutes).
    pub replica_lag_seconds: Option<f64>,
    pub dns_record: String,
    pub dns: Vec<WeightedRecord>,
    /// Region of the instance DNS sends writers to.
    pub dns_writer_region: Option<String>,
    pub alarms: Vec<Alarm>,
    pub failover_function: bool,
    /// Where a call failed (a region that does not answer is a fact, not an error).
    pub unreachable: Vec<String>,
}

/// Whether the DR-side instance has been promoted (the emulator keeps the source field after
/// promotion, hence the tag that pgdr and the failover function set).
/// Promoted means no longer a replica: RDS drops `ReadReplicaSourceDBInstanceIdentifier` when
/// the promotion has finished.
pub fn promoted(db: &instance::Db) -> bool {
    db.source.is_none()
}

pub async fn instance(cx: &Cx, side: Side) -> std::result::Result<Option<instance::Db>, crate::error::AwsError> {
    instance::lookup(cx.regional(side), &instance::instance_id(cx, side)).await
}

/// Latest `ReplicaLag` datapoint of the DR-side instance (read once per run: the request's
/// time window differs on every call, so it is kept under a key of its own).
/// The replica's lag as it counts: the lowest of the last five minutes (on an idle primary
/// ReplicaLag rises between RDS's 5-minute heartbeats without data being behind), and how old
/// the newest datapoint is (none arrives once the source region is lost).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lag {
    pub seconds: f64,
    pub age_s: u64,
}

pub async fn replica_lag(cx: &Cx) -> Result<Option<Lag>> {
    let key = format!("{}/replica-lag/{}", cx.region(Side::Dr), instance::instance_id(cx, Side::Dr));
    cx.clients.reads.read(key, latest_lag(cx)).await.map_err(Into::into)
}

async fn latest_lag(cx: &Cx) -> std::result::Result<Option<Lag>, crate::error::AwsError> {
    let reg = cx.regional(Side::Dr);
    let now = SystemTime::now();
    let out = reg
        .cloudwatch
        .get_metric_statistics()
        .namespace("AWS/RDS")
        .metric_name("ReplicaLag")
        .dimensions(
            aws_sdk_cloudwatch::types::Dimension::builder().name("DBInstanceIdentifier").value(instance::instance_id(cx, Side::Dr)).build(),
        )
        .start_time((now - Duration::from_secs(600)).into())
        .end_time((now + Duration::from_secs(60)).into())
        .period(60)
        .statistics(aws_sdk_cloudwatch::types::Statistic::Minimum)
        .send()
        .aws(&reg.region)
        .await?;
    let points: Vec<(i64, f64)> =
        out.datapoints.unwrap_or_default().into_iter().filter_map(|d| Some((d.timestamp?.secs(), d.minimum?))).collect();
    Ok(lag_of(&points, aws_smithy_types::DateTime::from(now).secs()))
}

/// The lag that counts among `(time, minimum)` datapoints, at `now` (seconds since the epoch).
fn lag_of(points: &[(i64, f64)], now: i64) -> Option<Lag> {
    let newest = points.iter().map(|p| p.0).max()?;
    let seconds = points.iter().filter(|p| p.0 > newest - 300).map(|p| p.1).fold(f64::INFINITY, f64::min);
    Some(Lag { seconds, age_s: u64::try_from(now - newest).unwrap_or(0) })
}

/// The reads of [`gather`] that no step makes, for the read phase.
pub async fn reads(cx: &Cx) {
    let _ = replica_lag(cx).await;
}

pub async fn gather(cx: &Cx) -> Health {
    let mut unreachable = Vec::new();
    let (p, d, lag, records, alarms_p, alarms_d, func) = tokio::join!(
        instance(cx, Side::Primary),
        instance(cx, Side::Dr),
        replica_lag(cx),
        records(cx),
        alarms(cx, Side::Primary),
        alarms(cx, Side::Dr),
        function_exists(cx),
    );
    let mut note = |what: &str, e: &dyn std::fmt::Display| unreachable.push(format!("{what}: {e}"));
    let p = p.unwrap_or_else(|e| {
        note(&format!("instance in {}", cx.region(Side::Primary)), &e);
        None
    });
    let d = d.unwrap_or_else(|e| {
        note(&format!("instance in {}", cx.region(Side::Dr)), &e);
        None
    });
    let dr_promoted = d.as_ref().is_some_and(promoted);
    let mut instances = Vec::new();
    for (side, db) in [(Side::Primary, &p), (Side::Dr, &d)] {
        let role = match (side, db) {
            (_, None) => "missing",
            (Side::Primary, Some(db)) if db.tag("pgdr:role") == Some("fenced") => "fenced",
            // Promoted elsewhere (the automatic failover), not fenced yet: it may still take writes.
            (Side::Primary, Some(_)) if dr_promoted => "old-primary",
            (Side::Primary, Some(_)) => "primary",
            (Side::Dr, Some(_)) if dr_promoted => "primary",
            (Side::Dr, Some(_)) => "replica",
        };
        instances.push(Instance {
            region: cx.region(side).to_owned(),
            id: db.as_ref().map(|d| d.id.clone()).unwrap_or_else(|| instance::instance_id(cx, side)),
            role: role.into(),
            status: db.as_ref().map(|d| d.status.clone()).unwrap_or_else(|| "-".into()),
            endpoint: db.as_ref().and_then(|d| d.endpoint.clone()),
            arn: db.as_ref().map(|d| d.arn.clone()).unwrap_or_default(),
        });
    }
    let writer_region = instances.iter().find(|i| i.role == "primary").map(|i| i.region.clone());
    let replica_lag_seconds = lag
        .unwrap_or_else(|e| {
            note("replica lag", &e);
            None
        })
        .map(|l| l.seconds);
    let dns = records.unwrap_or_else(|e| {
        note("DNS records", &e);
        vec![]
    });
    let dns_writer_region = dns.iter().filter(|r| r.weight > 0).max_by_key(|r| r.weight).map(|r| r.set_id.clone());
    let mut alarms = Vec::new();
    for (side, a) in [(Side::Primary, alarms_p), (Side::Dr, alarms_d)] {
        match a {
            Ok(a) => alarms.extend(a),
            Err(e) => note(&format!("alarms in {}", cx.region(side)), &e),
        }
    }
    let failover_function = func.unwrap_or_else(|e| {
        note("failover function", &e);
        false
    });
    Health {
        writer_region,
        instances,
        replica_lag_seconds,
        dns_record: dns::writer_record(cx).trim_end_matches('.').to_owned(),
        dns,
        dns_writer_region,
        alarms,
        failover_function,
        unreachable,
    }
}

async fn records(cx: &Cx) -> Result<Vec<WeightedRecord>> {
    let Some(zone) = cx.store.id(&dns::zone_key()) else { return Ok(vec![]) };
    let writer = dns::writer_record(cx);
    Ok(dns::current_records(cx, &zone)
        .await?
        .into_iter()
        .filter(|r| r.name.trim_end_matches('.') == writer.trim_end_matches('.'))
        .map(|r| WeightedRecord {
            set_id: r.set_identifier.clone().unwrap_or_default(),
            weight: r.weight.unwrap_or(0),
            value: r.resource_records().first().map(|v| v.value().to_owned()).unwrap_or_default(),
            health_check: r.health_check_id.clone(),
        })
        .collect())
}

/// pgdr's alarms in a region, read as the steps read them (so `status` reads each once).
async fn alarms(cx: &Cx, side: Side) -> Result<Vec<Alarm>> {
    let region = cx.region(side).to_owned();
    let mut found: Vec<aws_sdk_cloudwatch::types::MetricAlarm> = crate::steps::alarms::alarms_of(cx, side).await?.into_values().collect();
    if side == Side::Dr {
        found.extend(failover::describe_alarm(cx).await?.metric_alarms.unwrap_or_default());
    }
    Ok(found
        .into_iter()
        .map(|a| Alarm {
            name: a.alarm_name.unwrap_or_default(),
            region: region.clone(),
            state: a.state_value.map(|s| s.as_str().to_owned()).unwrap_or_default(),
        })
        .collect())
}

async fn function_exists(cx: &Cx) -> Result<bool> {
    let reg = cx.regional(Side::Dr);
    match crate::steps::lambda::get_function(reg, &failover::failover_name(cx)).await {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lag_that_counts_is_the_lowest_of_the_last_five_minutes() {
        // An idle primary: the lag climbs between heartbeats and falls back.
        let idle = [(0, 30.0), (60, 90.0), (120, 150.0), (180, 210.0), (240, 2.0), (300, 62.0)];
        assert_eq!(lag_of(&idle, 330), Some(Lag { seconds: 2.0, age_s: 30 }));
        // Really behind: every minute.
        let behind = [(0, 600.0), (60, 660.0), (120, 720.0)];
        assert_eq!(lag_of(&behind, 900).map(|l| (l.seconds, l.age_s)), Some((600.0, 780)));
        assert_eq!(lag_of(&[], 0), None);
    }
}
