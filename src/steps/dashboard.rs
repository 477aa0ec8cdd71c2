//! The dashboard over both regions (part of the alarms step).

use serde_json::{json, Value};

use super::alarms::{dashboard_key, dashboard_name, DASHBOARD};
use super::instance;
use super::Res;
use crate::aws::Call;
use crate::cx::{Cx, Side};
use crate::error::Result;
use crate::exec::{Action, Change, Recorder};
use crate::read;

/// The dashboard: each metric names its region, so one widget shows both.
fn dashboard_body(cx: &Cx) -> Value {
    let (p, d) = (cx.region(Side::Primary), cx.region(Side::Dr));
    let (pid, did) = (instance::instance_id(cx, Side::Primary), instance::instance_id(cx, Side::Dr));
    let rds = |metric: &str, id: &str, region: &str, label: &str| json!(["AWS/RDS", metric, "DBInstanceIdentifier", id, {"region": region, "label": label}]);
    let both = |metric: &str| vec![rds(metric, &pid, p, &format!("primary ({p})")), rds(metric, &did, d, &format!("replica ({d})"))];
    let probe = format!("pgdr-{}-probe", cx.name());
    let lambda = |metric: &str| json!(["AWS/Lambda", metric, "FunctionName", probe, {"region": d, "label": metric}]);
    let widgets: Vec<(String, &str, &str, Vec<Value>)> = vec![
        ("Replica lag (s)".into(), d, "Maximum", vec![rds("ReplicaLag", &did, d, &format!("replica ({d})"))]),
        ("CPU utilization (%)".into(), p, "Average", both("CPUUtilization")),
        ("Database connections".into(), p, "Average", both("DatabaseConnections")),
        ("Free storage (bytes)".into(), p, "Minimum", both("FreeStorageSpace")),
        ("Read IOPS".into(), p, "Average", both("ReadIOPS")),
        ("Write IOPS".into(), p, "Average", both("WriteIOPS")),
        (format!("Health probe {probe} ({d})"), d, "Sum", vec![lambda("Invocations"), lambda("Errors")]),
    ];
    let widgets: Vec<Value> = widgets
        .into_iter()
        .enumerate()
        .map(|(i, (title, region, stat, metrics))| {
            json!({
                "type": "metric",
                "x": (i % 2) * 12,
                "y": (i / 2) * 6,
                "width": 12,
                "height": 6,
                "properties": {"title": title, "region": region, "view": "timeSeries", "stat": stat, "period": 60, "metrics": metrics},
            })
        })
        .collect();
    json!({ "widgets": widgets })
}

/// The dashboard's body, if it exists (`Value::Null` when it is not JSON).
pub(super) async fn get_dashboard(cx: &Cx) -> Result<Option<Value>> {
    let reg = cx.regional(Side::Primary);
    match read!(reg.reads, &reg.region, reg.cloudwatch.get_dashboard().dashboard_name(dashboard_name(cx))) {
        Ok(o) => Ok(Some(o.dashboard_body().and_then(|b| serde_json::from_str(b).ok()).unwrap_or(Value::Null))),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn ensure_dashboard(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    let reg = cx.regional(Side::Primary);
    let region = reg.region.as_str();
    let name = dashboard_name(cx);
    let want = dashboard_body(cx);
    let put = async || -> Result<()> {
        reg.cloudwatch.put_dashboard().dashboard_name(&name).dashboard_body(want.to_string()).send().aws(region).await?;
        Ok(())
    };
    let have = get_dashboard(cx).await?;
    let r = Res::new(dashboard_key(cx), DASHBOARD, name.clone(), region);
    super::ensure(
        cx,
        rec,
        &r,
        async |_| Ok(have.as_ref().map(|_| name.clone())),
        async |_| {
            put().await?;
            Ok(name.clone())
        },
    )
    .await?;
    if have.as_ref().is_some_and(|h| *h != want) {
        let change = Change::new(Action::Change, DASHBOARD, &name, region).id(&name).detail("widgets differ from pgdr's");
        rec.apply(change, async |_| put().await).await?;
    }
    Ok(())
}
