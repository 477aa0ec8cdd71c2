//! Alerting: an SNS topic `pgdr-<env>-alarms` in each region with the operators' email
//! subscriptions; CloudWatch alarms on the primary, the replica and the failover function, each
//! in its own region (alarms can only watch their region's metrics) and notifying that region's
//! topic on ALARM and on OK; one dashboard over both regions.

use std::collections::BTreeMap;

use aws_sdk_cloudwatch::types::{ComparisonOperator, Dimension, MetricAlarm, Statistic};
use futures::future::LocalBoxFuture;

use super::dashboard::{ensure_dashboard, get_dashboard};
use super::instance;
use super::{Res, StepId};
use crate::aws::Call;
use crate::clients::Regional;
use crate::cx::{Cx, Side};
use crate::error::{Error, Result};
use crate::exec::{Action, Change, Recorder, Step, StepResult};
use crate::read;
use crate::state::{Attr, Key};

pub struct Topics;
pub struct Alarms;

/// Resource kinds, as state and the reports show them.
const ALARM: &str = "cloudwatch-alarm";
pub(super) const DASHBOARD: &str = "cloudwatch-dashboard";

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// WAL a replication slot may hold back before we warn: 10 GiB is hours of a busy database's
/// WAL, well before the transaction-log disk alarm (20% of storage) and a full disk.
const SLOT_LAG_BYTES: f64 = 10.0 * GIB;

pub fn topic_name(cx: &Cx) -> String {
    format!("pgdr-{}-alarms", cx.name())
}

fn topic_key(cx: &Cx, side: Side) -> Key {
    Key::new("topics", cx.region(side), "topic")
}

/// The ARN of a region's alarm topic, as state knows it.
pub fn topic_arn(cx: &Cx, side: Side) -> Option<String> {
    cx.store.id(&topic_key(cx, side))
}

pub fn alarm_name(cx: &Cx, what: &str) -> String {
    format!("pgdr-{}-{what}", cx.name())
}

fn alarm_key(region: &str, name: &str) -> Key {
    Key::new("alarms", region, name)
}

pub fn dashboard_name(cx: &Cx) -> String {
    format!("pgdr-{}", cx.name())
}

pub(super) fn dashboard_key(cx: &Cx) -> Key {
    Key::new("alarms", cx.region(Side::Primary), "dashboard")
}

/// The topic's record of an email pgdr subscribed (its subscription ARN, or "pending
/// confirmation"), kept beside the topic so that a removed address can be unsubscribed.
fn subscription_attr(email: &str) -> String {
    format!("subscription:{email}")
}

impl Step<Cx, StepId> for Topics {
    fn id(&self) -> StepId {
        StepId::Topics
    }
    fn deps(&self) -> Vec<StepId> {
        vec![]
    }
    fn up<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(topics_up(cx, rec))
    }
    fn down<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(topics_down(cx, rec))
    }
    fn reads<'a>(&'a self, cx: &'a Cx) -> LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            let side = async |side: Side| {
                let known = topic_arn(cx, side);
                let _ = find_topic(cx, side, known.clone()).await;
                if let Some(topic) = known.filter(|_| !cx.env.settings.alarm_emails.is_empty() || !dropped_emails(cx, side).is_empty()) {
                    let _ = subscriptions(cx, side, &topic).await;
                }
            };
            futures::join!(side(Side::Primary), side(Side::Dr));
        })
    }
}

impl Step<Cx, StepId> for Alarms {
    fn id(&self) -> StepId {
        StepId::Alarms
    }
    fn deps(&self) -> Vec<StepId> {
        // Alarms name instances by identifier: no need to wait for the replica to be available.
        vec![StepId::Topics, StepId::Primary]
    }
    fn up<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(alarms_up(cx, rec))
    }
    fn down<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(alarms_down(cx, rec))
    }
    fn reads<'a>(&'a self, cx: &'a Cx) -> LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = futures::join!(alarms_of(cx, Side::Primary), alarms_of(cx, Side::Dr), get_dashboard(cx));
        })
    }
}

/// The alarms of one region's instance that exist, by name.
pub async fn alarms_of(cx: &Cx, side: Side) -> Result<BTreeMap<String, MetricAlarm>> {
    let names: Vec<String> = alarm_defs(cx).iter().filter(|a| a.side == side).map(|a| alarm_name(cx, a.what)).collect();
    describe_alarms(cx.regional(side), &names).await
}

// ---- SNS topics ----

/// The topic by the ARN state knows, else by name among the region's topics (the ARN holds the
/// account ID, which pgdr does not ask for).
async fn find_topic(cx: &Cx, side: Side, known: Option<String>) -> Result<Option<String>> {
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    if let Some(arn) = known {
        match read!(reg.reads, region, reg.sns.get_topic_attributes().topic_arn(&arn)) {
            Ok(_) => return Ok(Some(arn)),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    let suffix = format!(":{}", topic_name(cx));
    let mut next = None;
    loop {
        let out = reg.sns.list_topics().set_next_token(next).send().aws(region).await?;
        if let Some(arn) = out.topics().iter().filter_map(|t| t.topic_arn()).find(|a| a.ends_with(&suffix)) {
            return Ok(Some(arn.to_owned()));
        }
        next = out.next_token;
        if next.is_none() {
            return Ok(None);
        }
    }
}

async fn topics_up(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    for side in [Side::Primary, Side::Dr] {
        let reg = cx.regional(side);
        let region = reg.region.as_str();
        let r = Res::new(topic_key(cx, side), "sns-topic", topic_name(cx), region);
        let arn = super::ensure(
            cx,
            rec,
            &r,
            async |known| find_topic(cx, side, known).await,
            async |_| {
                // Tagged at creation. CreateTopic is idempotent by name (with the same tags).
                let tags =
                    cx.tags("alarms").into_iter().filter_map(|(k, v)| aws_sdk_sns::types::Tag::builder().key(k).value(v).build().ok());
                let out = reg.sns.create_topic().name(topic_name(cx)).set_tags(Some(tags.collect())).send().aws(region).await?;
                out.topic_arn.ok_or_else(|| Error::Other(format!("SNS CreateTopic in {region} returned no topic ARN")))
            },
        )
        .await?;
        subscribe_emails(cx, rec, side, arn.as_deref()).await?;
    }
    Ok(())
}

/// One email subscription per configured address. A new one stays "pending confirmation"
/// until its recipient clicks the link AWS mails: that is expected, not a failure.
async fn subscribe_emails(cx: &Cx, rec: &Recorder<'_>, side: Side, topic: Option<&str>) -> Result<()> {
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    let emails = &cx.env.settings.alarm_emails;
    let dropped = dropped_emails(cx, side);
    if emails.is_empty() && dropped.is_empty() {
        return Ok(());
    }
    // (endpoint, subscription ARN or "PendingConfirmation") of the topic's email subscriptions.
    let mut have: Vec<(String, String)> = Vec::new();
    if let Some(topic) = topic {
        have = subscriptions(cx, side, topic).await?;
    }
    // Addresses pgdr subscribed that the settings no longer list. Others' subscriptions to the
    // topic are left alone.
    for email in dropped {
        match have.iter().find(|(e, _)| e.eq_ignore_ascii_case(&email)) {
            Some((_, sub)) if sub.starts_with("arn:") => {
                let change = Change::new(Action::Delete, "sns-subscription", &email, region).id(sub);
                rec.apply(change, async |_| Ok(crate::error::gone(reg.sns.unsubscribe().subscription_arn(sub).send().aws(region).await)?))
                    .await?;
            }
            // Unconfirmed: AWS gives it no ARN to remove it by and drops it after three days.
            Some(_) => rec.record(
                Change::new(Action::Keep, "sns-subscription", &email, region)
                    .detail("no longer configured; unconfirmed, AWS drops it after 3 days"),
            ),
            None => {}
        }
        if !rec.planning() {
            cx.store.update(|st| {
                if let Some(res) = st.resources.get_mut(&topic_key(cx, side)) {
                    res.attrs.remove(&subscription_attr(&email));
                }
            })?;
        }
    }
    for email in emails {
        let (action, sub) = match have.iter().find(|(e, _)| e.eq_ignore_ascii_case(email)) {
            Some((_, sub)) => (Action::Keep, sub.clone()),
            None => {
                let subscribe = async |_: &mut Change| {
                    let topic = topic.unwrap_or_default();
                    Ok(reg.sns.subscribe().topic_arn(topic).protocol("email").endpoint(email).send().aws(region).await?)
                };
                // Recorded below, with the subscription's ARN or its pending state.
                match topic.is_some().then_some(()) {
                    Some(()) => match rec.apply_part(None, subscribe).await? {
                        Some(out) => (Action::Create, out.subscription_arn.unwrap_or_default()),
                        None => {
                            rec.record(Change::new(Action::Create, "sns-subscription", email, region));
                            continue;
                        }
                    },
                    None => {
                        rec.record(Change::new(Action::Create, "sns-subscription", email, region));
                        continue;
                    }
                }
            }
        };
        let pending = !sub.starts_with("arn:");
        let shown = if pending { "pending confirmation".to_owned() } else { sub };
        if !rec.planning() {
            cx.store.update(|st| {
                if let Some(res) = st.resources.get_mut(&topic_key(cx, side)) {
                    res.attrs.insert(subscription_attr(email), shown.clone());
                }
            })?;
        }
        let detail = pending.then(|| "pending confirmation: the recipient must follow the link in AWS's email".to_owned());
        rec.record(
            Change::new(action, "sns-subscription", email, region).maybe_id((!pending).then_some(shown.as_str())).maybe_detail(detail),
        );
    }
    Ok(())
}

async fn topics_down(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    for side in [Side::Dr, Side::Primary] {
        let reg = cx.regional(side);
        let region = reg.region.as_str();
        let r = Res::new(topic_key(cx, side), "sns-topic", topic_name(cx), region);
        // Deleting a topic deletes its subscriptions.
        super::remove(
            cx,
            rec,
            &r,
            async |known| find_topic(cx, side, known).await,
            async |arn| match reg.sns.delete_topic().topic_arn(arn).send().aws(region).await {
                Ok(_) => Ok(()),
                Err(e) if e.is_not_found() => Ok(()),
                Err(e) => Err(e.into()),
            },
        )
        .await?;
    }
    Ok(())
}

// ---- CloudWatch alarms ----

/// One alarm pgdr keeps: a single metric with a single dimension, compared with a threshold.
struct AlarmDef {
    what: &'static str,
    /// The region it lives in (the one whose metric it watches).
    side: Side,
    namespace: &'static str,
    metric: &'static str,
    dimension: (&'static str, String),
    stat: Statistic,
    period: i32,
    /// Evaluation periods; all of them must breach (DatapointsToAlarm = the same).
    periods: i32,
    cmp: ComparisonOperator,
    threshold: f64,
    missing: &'static str,
    about: String,
}

/// The alarms, in one table that drives both creation and comparison.
#[rustfmt::skip] // One alarm a line: a table.
fn alarm_defs(cx: &Cx) -> Vec<AlarmDef> {
    use ComparisonOperator::{GreaterThanOrEqualToThreshold as Ge, GreaterThanThreshold as Gt, LessThanThreshold as Lt};
    use Side::{Dr, Primary};
    use Statistic::{Average, Maximum, Minimum, Sum};
    let s = &cx.env.settings;
    // The primary's real size when it is larger than the setting (RDS cannot shrink a volume).
    let real = instance::recorded(cx, Side::Primary, Attr::StorageGib).and_then(|v| v.parse::<i32>().ok());
    let storage = f64::from(real.map_or(s.allocated_storage_gib, |r| r.max(s.allocated_storage_gib))) * GIB;
    let db = |side| ("DBInstanceIdentifier", instance::instance_id(cx, side));
    let lag = s.max_failover_lag_seconds;
    let def = |what, side, metric, stat, period, periods, cmp, threshold, missing, about: String| AlarmDef {
        what,
        side,
        namespace: "AWS/RDS",
        metric,
        dimension: db(side),
        stat,
        period,
        periods,
        cmp,
        threshold,
        missing,
        about,
    };
    vec![
        // ReplicaLag is published for the replica only. On an idle primary it rises between RDS's
        // heartbeats (every 5 minutes) without any data being behind: the lowest lag of each 5
        // minutes is what counts, two windows in a row. No datapoint (the replica being created,
        // or its source region gone) is not lag: primary-down and replication-slot-lag watch that.
        def("replica-lag", Dr, "ReplicaLag", Minimum, 300, 2, Gt, lag, "notBreaching", format!("The DR replica has stayed more than {lag} s behind the primary for 10 minutes: a failover now would lose data.")),
        // CPU: an idle or stopped instance reports nothing; other alarms cover that (missing).
        def("cpu-primary", Primary, "CPUUtilization", Average, 300, 2, Gt, 80.0, "missing", "The primary's CPU is above 80% for 10 minutes.".into()),
        def("cpu-replica", Dr, "CPUUtilization", Average, 300, 2, Gt, 80.0, "missing", "The DR replica's CPU is above 80% for 10 minutes: it may fall behind.".into()),
        // No slot reports no slot lag, and then no slot holds WAL back (notBreaching); a replica
        // that is gone is the replica-lag alarm's business.
        def("replication-slot-lag", Primary, "OldestReplicationSlotLag", Maximum, 300, 2, Gt, SLOT_LAG_BYTES, "notBreaching", "A replication slot on the primary holds more than 10 GiB of WAL: the DR replica is about to be lost.".into()),
        // WAL on disk above 20% of the allocated storage: a slot or archiving is stuck.
        def("transaction-logs-disk", Primary, "TransactionLogsDiskUsage", Maximum, 300, 2, Gt, storage * 0.2, "missing", "WAL uses more than 20% of the primary's storage: a replication slot or archiving is stuck.".into()),
        def("free-storage-primary", Primary, "FreeStorageSpace", Minimum, 300, 1, Lt, storage * 0.1, "missing", "The primary has less than 10% of its storage free.".into()),
        def("free-storage-replica", Dr, "FreeStorageSpace", Minimum, 300, 1, Lt, storage * 0.1, "missing", "The DR replica has less than 10% of its storage free.".into()),
        // No invocation means no error: missing = notBreaching.
        AlarmDef {
            namespace: "AWS/Lambda",
            dimension: ("FunctionName", format!("pgdr-{}-failover", cx.name())),
            ..def("failover-errors", Dr, "Errors", Sum, 60, 1, Ge, 1.0, "notBreaching", "The failover function failed: check its logs, a failover may be half done.".into())
        },
    ]
}

impl AlarmDef {
    /// The alarm as it should be: what PutMetricAlarm sends and DescribeAlarms must show.
    fn wanted(&self, cx: &Cx, topic: &str) -> MetricAlarm {
        let (k, v) = &self.dimension;
        MetricAlarm::builder()
            .alarm_name(alarm_name(cx, self.what))
            .alarm_description(&self.about)
            .namespace(self.namespace)
            .metric_name(self.metric)
            .dimensions(Dimension::builder().name(*k).value(v).build())
            .statistic(self.stat.clone())
            .period(self.period)
            .evaluation_periods(self.periods)
            .datapoints_to_alarm(self.periods)
            .threshold(self.threshold)
            .comparison_operator(self.cmp.clone())
            .treat_missing_data(self.missing)
            .actions_enabled(true)
            .alarm_actions(topic)
            .ok_actions(topic)
            .build()
    }
}

/// The fields pgdr sets, as comparable text: lists sorted, the threshold rounded to 1/1000
/// (it travels as decimal text), AWS's defaults filled in where it omits a field.
fn fields(a: &MetricAlarm) -> [(&'static str, String); 14] {
    let list = |v: Vec<String>| {
        let mut v = v;
        v.sort();
        v.join(",")
    };
    let dims = a.dimensions().iter().map(|d| format!("{}={}", d.name().unwrap_or(""), d.value().unwrap_or(""))).collect();
    let periods = a.evaluation_periods().unwrap_or(0);
    [
        ("namespace", a.namespace().unwrap_or("").into()),
        ("metric", a.metric_name().unwrap_or("").into()),
        ("dimensions", list(dims)),
        ("statistic", a.statistic().map(|s| s.as_str()).unwrap_or("").into()),
        ("period", a.period().unwrap_or(0).to_string()),
        ("evaluation periods", periods.to_string()),
        ("datapoints to alarm", a.datapoints_to_alarm().unwrap_or(periods).to_string()),
        ("threshold", a.threshold().map(|t| ((t * 1000.0).round() / 1000.0).to_string()).unwrap_or_default()),
        ("comparison", a.comparison_operator().map(|c| c.as_str()).unwrap_or("").into()),
        ("treat missing data", a.treat_missing_data().unwrap_or("missing").into()),
        ("alarm actions", list(a.alarm_actions().to_vec())),
        ("OK actions", list(a.ok_actions().to_vec())),
        ("actions enabled", a.actions_enabled().unwrap_or(true).to_string()),
        ("description", a.alarm_description().unwrap_or("").into()),
    ]
}

/// Emails pgdr subscribed (recorded in state) that the settings no longer list.
fn dropped_emails(cx: &Cx, side: Side) -> Vec<String> {
    let wanted = &cx.env.settings.alarm_emails;
    cx.store
        .get(&topic_key(cx, side))
        .map(|r| r.attrs.into_keys().filter_map(|k| k.strip_prefix(&subscription_attr("")).map(str::to_owned)).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|e| !wanted.iter().any(|w| w.eq_ignore_ascii_case(e)))
        .collect()
}

/// (endpoint, subscription ARN or "PendingConfirmation") of a topic's email subscriptions.
async fn subscriptions(cx: &Cx, side: Side, topic: &str) -> Result<Vec<(String, String)>> {
    let reg = cx.regional(side);
    let mut have = Vec::new();
    let mut next = None;
    loop {
        let out = read!(reg.reads, &reg.region, reg.sns.list_subscriptions_by_topic().topic_arn(topic).set_next_token(next))?;
        have.extend(
            out.subscriptions()
                .iter()
                .filter(|s| s.protocol() == Some("email"))
                .filter_map(|s| Some((s.endpoint()?.to_owned(), s.subscription_arn().unwrap_or("PendingConfirmation").to_owned()))),
        );
        next = out.next_token;
        if next.is_none() {
            return Ok(have);
        }
    }
}

/// `field have -> want` for each field that differs.
pub(super) fn diff(have: &MetricAlarm, want: &MetricAlarm) -> Vec<String> {
    let none = |s: &str| if s.is_empty() { "(none)".to_owned() } else { s.to_owned() };
    fields(have)
        .into_iter()
        .zip(fields(want))
        .filter(|((_, h), (_, w))| h != w)
        .map(|((k, h), (_, w))| format!("{k} {} -> {}", none(&h), none(&w)))
        .collect()
}

/// The named alarms that exist in a region, in one call.
async fn describe_alarms(reg: &Regional, names: &[String]) -> Result<BTreeMap<String, MetricAlarm>> {
    if names.is_empty() {
        return Ok(BTreeMap::new());
    }
    let req = reg.cloudwatch.describe_alarms().set_alarm_names(Some(names.to_vec())).max_records(100);
    let out = read!(reg.reads, &reg.region, req)?;
    Ok(out.metric_alarms.unwrap_or_default().into_iter().filter_map(|a| Some((a.alarm_name.clone()?, a))).collect())
}

/// Creates or updates an alarm as `w` says.
pub(super) async fn put_alarm(cx: &Cx, reg: &Regional, what: &str, w: &MetricAlarm) -> Result<()> {
    let tags = cx.tags(what).into_iter().map(|(k, v)| aws_sdk_cloudwatch::types::Tag::builder().key(k).value(v).build());
    let req = reg
        .cloudwatch
        .put_metric_alarm()
        .set_alarm_name(w.alarm_name.clone())
        .set_alarm_description(w.alarm_description.clone())
        .set_namespace(w.namespace.clone())
        .set_metric_name(w.metric_name.clone())
        .set_dimensions(w.dimensions.clone())
        .set_statistic(w.statistic.clone())
        .set_period(w.period)
        .set_evaluation_periods(w.evaluation_periods)
        .set_datapoints_to_alarm(w.datapoints_to_alarm)
        .set_threshold(w.threshold)
        .set_comparison_operator(w.comparison_operator.clone())
        .set_treat_missing_data(w.treat_missing_data.clone())
        .set_actions_enabled(w.actions_enabled)
        .set_alarm_actions(w.alarm_actions.clone())
        .set_ok_actions(w.ok_actions.clone())
        // Applied at creation only; AWS ignores tags when an alarm is updated.
        .set_tags(Some(tags.collect()));
    req.send().aws(&reg.region).await?;
    Ok(())
}

async fn alarms_up(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    let defs = alarm_defs(cx);
    for side in [Side::Primary, Side::Dr] {
        let reg = cx.regional(side);
        let region = reg.region.as_str();
        // In plan mode on a new environment the topic does not exist yet.
        let topic = match topic_arn(cx, side) {
            Some(t) => t,
            None if rec.planning() => "(new topic)".to_owned(),
            None => return Err(Error::failed(format!("the alarm topic in {region} is not known yet; rerun `pgdr up`"))),
        };
        let mine: Vec<&AlarmDef> = defs.iter().filter(|a| a.side == side).collect();
        let names: Vec<String> = mine.iter().map(|a| alarm_name(cx, a.what)).collect();
        let found = alarms_of(cx, side).await?;
        for (a, name) in mine.into_iter().zip(names) {
            let r = Res::new(alarm_key(region, &name), ALARM, name.clone(), region);
            let have = found.get(&name);
            let want = a.wanted(cx, &topic);
            super::ensure(
                cx,
                rec,
                &r,
                async |_| Ok(have.map(|_| name.clone())),
                async |_| {
                    put_alarm(cx, reg, a.what, &want).await?;
                    Ok(name.clone())
                },
            )
            .await?;
            let Some(have) = have else { continue };
            let changes = diff(have, &want);
            if !changes.is_empty() {
                let change = Change::new(Action::Change, ALARM, &name, region).id(&name).detail(changes.join(", "));
                rec.apply(change, async |_| put_alarm(cx, reg, a.what, &want).await).await?;
            }
        }
    }
    ensure_dashboard(cx, rec).await
}

async fn alarms_down(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    let reg = cx.regional(Side::Primary);
    let region = reg.region.as_str();
    let r = Res::new(dashboard_key(cx), DASHBOARD, dashboard_name(cx), region);
    super::remove(
        cx,
        rec,
        &r,
        async |_| Ok(get_dashboard(cx).await?.map(|_| dashboard_name(cx))),
        async |name| match reg.cloudwatch.delete_dashboards().dashboard_names(name).send().aws(region).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        },
    )
    .await?;

    let defs = alarm_defs(cx);
    let state = cx.store.snapshot();
    for side in [Side::Dr, Side::Primary] {
        let reg = cx.regional(side);
        let region = reg.region.as_str();
        // The table's alarms and any other alarm state knows of in this region.
        let mut names: Vec<String> = defs.iter().filter(|a| a.side == side).map(|a| alarm_name(cx, a.what)).collect();
        for (key, res) in &state.resources {
            if let (true, ALARM) = (key.owner() == "alarms" && key.region() == region, res.kind.as_str()) {
                let name = key.what();
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_owned());
                }
            }
        }
        let found = describe_alarms(reg, &names).await?;
        let existing: Vec<String> = found.into_keys().collect();
        if !existing.is_empty() {
            // One call deletes them all; each is recorded below.
            rec.apply_part(None, async |_| {
                rec.status(&format!("deleting {} alarms in {region}", existing.len()));
                Ok(crate::error::gone(reg.cloudwatch.delete_alarms().set_alarm_names(Some(existing.clone())).send().aws(region).await)?)
            })
            .await?;
        }
        for name in &names {
            let key = alarm_key(region, name);
            if !rec.planning() {
                cx.store.remove(&key)?;
            }
            if existing.contains(name) {
                rec.record(Change::new(Action::Delete, ALARM, name, region).id(name));
            } else {
                rec.record(Change::new(Action::Absent, ALARM, name, region));
            }
        }
    }
    Ok(())
}

// ---- The dashboard ----
