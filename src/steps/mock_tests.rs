//! Step-level tests against mocked SDK clients (`aws-smithy-mocks`): what a step does with the
//! answers the emulator rarely gives — not found, already exists, throttled, in use, and IAM's
//! propagation delay. Each client that a test does not mock answers nothing (an unreachable
//! endpoint), so an unexpected call fails the test.

use std::sync::Arc;

use aws_smithy_mocks::{mock, mock_client, Rule, RuleMode};
use aws_smithy_types::error::ErrorMetadata;
use aws_smithy_types::retry::RetryConfig;

use crate::clients::{Clients, Regional};
use crate::config::{self, Overrides};
use crate::cx::{Cx, Options, Side};
use crate::exec::{Action, Cancel, Mode, NoProgress, Recorder};
use crate::reads::Reads;
use crate::state::Store;

/// Clients of one region: EC2, RDS and Lambda from the given mocks, the others unreachable.
struct Mocks {
    ec2: aws_sdk_ec2::Client,
    rds: aws_sdk_rds::Client,
    lambda: aws_sdk_lambda::Client,
}

impl Default for Mocks {
    fn default() -> Self {
        Mocks { ec2: ec2(&[]), rds: rds(&[]), lambda: lambda(&[]) }
    }
}

fn ec2(rules: &[&Rule]) -> aws_sdk_ec2::Client {
    mock_client!(aws_sdk_ec2, RuleMode::MatchAny, rules.iter().copied(), |c| c.retry_config(RetryConfig::disabled()))
}
fn rds(rules: &[&Rule]) -> aws_sdk_rds::Client {
    mock_client!(aws_sdk_rds, RuleMode::MatchAny, rules.iter().copied(), |c| c.retry_config(RetryConfig::disabled()))
}
fn lambda(rules: &[&Rule]) -> aws_sdk_lambda::Client {
    mock_client!(aws_sdk_lambda, RuleMode::MatchAny, rules.iter().copied(), |c| c.retry_config(RetryConfig::disabled()))
}

/// A config whose calls go nowhere: a test that reaches an unmocked client fails.
fn nowhere(region: &str) -> aws_types::SdkConfig {
    aws_types::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_types::region::Region::new(region.to_owned()))
        .endpoint_url("http://127.0.0.1:9")
        .retry_config(RetryConfig::disabled())
        .build()
}

fn regional(region: &str, m: Mocks, reads: &Arc<Reads>) -> Regional {
    let conf = nowhere(region);
    Regional {
        region: region.to_owned(),
        ec2: m.ec2,
        rds: m.rds,
        secrets: aws_sdk_secretsmanager::Client::new(&conf),
        cloudwatch: aws_sdk_cloudwatch::Client::new(&conf),
        logs: aws_sdk_cloudwatchlogs::Client::new(&conf),
        lambda: m.lambda,
        sns: aws_sdk_sns::Client::new(&conf),
        events: aws_sdk_eventbridge::Client::new(&conf),
        reads: reads.clone(),
    }
}

fn cx(dir: &tempfile::TempDir, primary: Mocks, dr: Mocks) -> Cx {
    let env = config::load("dev", None, &Overrides::default()).unwrap();
    let reads = Reads::new();
    let global = nowhere("us-east-1");
    let clients = Clients {
        primary: Arc::new(regional("us-east-1", primary, &reads)),
        dr: Arc::new(regional("eu-west-1", dr, &reads)),
        route53: aws_sdk_route53::Client::new(&global),
        iam: aws_sdk_iam::Client::new(&global),
        sts: aws_sdk_sts::Client::new(&global),
        endpoint: None,
        reads,
        caller_arn: None,
    };
    let store = Store::local(dir.path(), "dev", Mode::Apply);
    Cx { env, clients, store, mode: Mode::Apply, opts: Options::default(), cancel: Cancel::default(), fresh: Default::default() }
}

fn meta(code: &str, message: &str) -> ErrorMetadata {
    ErrorMetadata::builder().code(code).message(message).build()
}

mod network {
    use super::*;
    use aws_sdk_ec2::operation::delete_security_group::{DeleteSecurityGroupError, DeleteSecurityGroupOutput};
    use aws_sdk_ec2::operation::describe_vpcs::{DescribeVpcsError, DescribeVpcsOutput};

    #[tokio::test]
    async fn a_vpc_gone_from_aws_is_not_found_not_an_error() {
        let by_tags = mock!(aws_sdk_ec2::Client::describe_vpcs)
            .match_requests(|r| r.vpc_ids().is_empty())
            .then_output(|| DescribeVpcsOutput::builder().build());
        let by_id = mock!(aws_sdk_ec2::Client::describe_vpcs)
            .match_requests(|r| !r.vpc_ids().is_empty())
            .then_error(|| DescribeVpcsError::generic(meta("InvalidVpcID.NotFound", "The vpc ID 'vpc-1' does not exist")));
        let dir = tempfile::tempdir().unwrap();
        let cx = cx(&dir, Mocks { ec2: ec2(&[&by_tags, &by_id]), ..Default::default() }, Mocks::default());
        let found = crate::steps::network::find_vpc(&cx, Side::Primary, Some("vpc-1".into())).await.unwrap();
        assert_eq!(found, None);
        assert_eq!((by_tags.num_calls(), by_id.num_calls()), (1, 1));
    }

    #[tokio::test]
    async fn a_create_refused_as_a_duplicate_adopts_what_an_earlier_run_made() {
        // The killed run's CreateSecurityGroup completed after it died: the rerun's first look
        // missed it, its create is refused as a duplicate, and the group is taken over.
        let dir = tempfile::tempdir().unwrap();
        let c = cx(&dir, Mocks::default(), Mocks::default());
        let rec = Recorder::new("network:primary", Mode::Apply, &NoProgress, Cancel::default());
        let r = crate::steps::Res::new(
            crate::state::Key::new("network", "us-east-1", "db-sg"),
            "security-group",
            "pgdr-dev-db".into(),
            "us-east-1",
        );
        let looks = std::cell::Cell::new(0);
        let id = crate::steps::ensure(
            &c,
            &rec,
            &r,
            async |_| {
                looks.set(looks.get() + 1);
                Ok((looks.get() > 1).then(|| "sg-1".to_owned()))
            },
            async |_| {
                Err(crate::error::AwsError {
                    service: "ec2",
                    operation: "CreateSecurityGroup",
                    region: "us-east-1".into(),
                    code: Some("InvalidGroup.Duplicate".into()),
                    message: Some("The security group 'pgdr-dev-db' already exists".into()),
                    request_id: None,
                    transport: crate::error::Transport::Service,
                }
                .into())
            },
        )
        .await
        .unwrap();
        assert_eq!(id.as_deref(), Some("sg-1"));
        let kept = c.store.get(&r.key).unwrap();
        assert_eq!((kept.id.as_deref(), kept.status), (Some("sg-1"), crate::state::Status::Adopted));
    }

    #[tokio::test]
    async fn a_throttled_lookup_is_an_error_that_says_so() {
        let throttled = mock!(aws_sdk_ec2::Client::describe_vpcs)
            .then_error(|| DescribeVpcsError::generic(meta("RequestLimitExceeded", "Request limit exceeded.")));
        let dir = tempfile::tempdir().unwrap();
        let cx = cx(&dir, Mocks { ec2: ec2(&[&throttled]), ..Default::default() }, Mocks::default());
        let e = crate::steps::network::find_vpc(&cx, Side::Primary, None).await.unwrap_err();
        let aws = e.aws().expect("an AWS error");
        assert!(aws.is_transient(), "{e}");
        assert_eq!((aws.service, aws.operation), ("ec2", "DescribeVpcs"));
        assert!(e.to_string().contains("RequestLimitExceeded"), "{e}");
    }

    #[tokio::test]
    async fn a_group_in_use_is_retried_until_its_user_is_gone() {
        let delete = mock!(aws_sdk_ec2::Client::delete_security_group)
            .sequence()
            .error(|| DeleteSecurityGroupError::generic(meta("DependencyViolation", "resource sg-1 has a dependent object")))
            .times(2)
            .output(|| DeleteSecurityGroupOutput::builder().build())
            .build();
        let dir = tempfile::tempdir().unwrap();
        let cx = cx(&dir, Mocks { ec2: ec2(&[&delete]), ..Default::default() }, Mocks::default());
        let rec = Recorder::new("network:primary", Mode::Apply, &NoProgress, Cancel::default());
        let ec2 = cx.regional(Side::Primary).ec2.clone();
        crate::steps::network::retry_dependency(&cx, &rec, "security group sg-1", async || {
            crate::error::gone(crate::aws::Call::aws(ec2.delete_security_group().group_id("sg-1").send(), "us-east-1").await)?;
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(delete.num_calls(), 3);
    }
}

mod database {
    use super::*;
    use aws_sdk_rds::operation::describe_db_instances::{DescribeDBInstancesError, DescribeDbInstancesOutput};
    use aws_sdk_rds::types::DbInstance;

    #[tokio::test]
    async fn an_instance_not_found_is_none_and_one_of_another_owner_is_refused() {
        let missing = mock!(aws_sdk_rds::Client::describe_db_instances)
            .then_error(|| DescribeDBInstancesError::generic(meta("DBInstanceNotFound", "DBInstance pgdr-dev-us-east-1 not found.")));
        let dir = tempfile::tempdir().unwrap();
        let c = cx(&dir, Mocks { rds: rds(&[&missing]), ..Default::default() }, Mocks::default());
        let found = crate::steps::instance::lookup(c.regional(Side::Primary), "pgdr-dev-us-east-1").await.unwrap();
        assert!(found.is_none());

        // An instance with pgdr's name that is not this environment's: `up` must not take it.
        let foreign = mock!(aws_sdk_rds::Client::describe_db_instances).then_output(|| {
            DescribeDbInstancesOutput::builder()
                .db_instances(DbInstance::builder().db_instance_identifier("pgdr-dev-us-east-1").db_instance_status("available").build())
                .build()
        });
        let dir = tempfile::tempdir().unwrap();
        let c = cx(&dir, Mocks { rds: rds(&[&foreign]), ..Default::default() }, Mocks::default());
        let rec = Recorder::new("primary", Mode::Apply, &NoProgress, Cancel::default());
        let step = crate::steps::database::Primary;
        let e = crate::exec::Step::up(&step, &c, &rec).await.unwrap_err();
        assert!(e.to_string().contains("already exists") && e.to_string().contains("not tagged pgdr:env=dev"), "{e}");
        assert!(rec.changes().iter().all(|ch| ch.action != Action::Create), "{:?}", rec.changes());
    }

    #[tokio::test]
    async fn an_instance_already_being_created_is_waited_for() {
        // A create whose answer was lost: the next look finds it creating, then available.
        let looks = mock!(aws_sdk_rds::Client::describe_db_instances)
            .sequence()
            .output(|| one("creating"))
            .output(|| one("backing-up"))
            .output(|| one("available"))
            .repeatedly()
            .build();
        let dir = tempfile::tempdir().unwrap();
        let c = cx(&dir, Mocks { rds: rds(&[&looks]), ..Default::default() }, Mocks::default());
        let rec = Recorder::new("primary", Mode::Apply, &NoProgress, Cancel::default());
        let db = crate::steps::database::wait_available(&c, &rec, Side::Primary, "pgdr-dev-us-east-1", std::time::Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(db.status, "available");
        assert_eq!(looks.num_calls(), 3);
    }

    fn one(status: &str) -> DescribeDbInstancesOutput {
        let tag = aws_sdk_rds::types::Tag::builder().key("pgdr:env").value("dev").build();
        DescribeDbInstancesOutput::builder()
            .db_instances(
                DbInstance::builder().db_instance_identifier("pgdr-dev-us-east-1").db_instance_status(status).tag_list(tag).build(),
            )
            .build()
    }
}

mod lambda {
    use super::*;
    use aws_sdk_lambda::operation::create_function::{CreateFunctionError, CreateFunctionOutput};
    use aws_sdk_lambda::operation::get_function::GetFunctionError;
    use aws_sdk_lambda::types::error::{InvalidParameterValueException, TooManyRequestsException};

    fn spec() -> crate::steps::lambda::FunctionSpec<'static> {
        crate::steps::lambda::FunctionSpec {
            name: "pgdr-dev-probe".into(),
            file: "probe.py",
            source: crate::steps::lambda::PROBE_SOURCE,
            handler: "probe.handler",
            role_arn: "arn:aws:iam::123456789012:role/pgdr-dev-probe".into(),
            timeout_s: 10,
            env: vec![],
            vpc: Some((vec!["subnet-1".into()], vec!["sg-1".into()])),
        }
    }

    fn not_there() -> aws_smithy_mocks::Rule {
        mock!(aws_sdk_lambda::Client::get_function).then_error(|| {
            GetFunctionError::ResourceNotFoundException(
                aws_sdk_lambda::types::error::ResourceNotFoundException::builder()
                    .meta(meta("ResourceNotFoundException", "Function not found"))
                    .build(),
            )
        })
    }

    fn refused(message: &'static str) -> impl Fn() -> CreateFunctionError + Send + Sync + 'static {
        move || {
            CreateFunctionError::InvalidParameterValueException(
                InvalidParameterValueException::builder().meta(meta("InvalidParameterValueException", message)).message(message).build(),
            )
        }
    }

    async fn create(rules: &[&Rule]) -> (crate::error::Result<Option<String>>, Vec<crate::exec::Change>) {
        let dir = tempfile::tempdir().unwrap();
        let c = cx(&dir, Mocks::default(), Mocks { lambda: lambda(rules), ..Default::default() });
        let rec = Recorder::new("detection", Mode::Apply, &NoProgress, Cancel::default());
        let key = crate::state::Key::new("detection", "eu-west-1", "function");
        let r = crate::steps::lambda::ensure_function(&c, &rec, c.regional(Side::Dr), &key, &spec()).await;
        (r, rec.changes())
    }

    #[tokio::test]
    async fn a_role_not_yet_propagated_is_waited_for_in_both_of_its_forms() {
        let get = not_there();
        let create_fn = mock!(aws_sdk_lambda::Client::create_function)
            .sequence()
            .error(refused("The role defined for the function cannot be assumed by Lambda."))
            .error(refused("The provided execution role does not have permissions to call CreateNetworkInterface on EC2"))
            .output(|| {
                CreateFunctionOutput::builder().function_arn("arn:aws:lambda:eu-west-1:123456789012:function:pgdr-dev-probe").build()
            })
            .build();
        let (r, changes) = create(&[&get, &create_fn]).await;
        assert_eq!(r.unwrap().as_deref(), Some("arn:aws:lambda:eu-west-1:123456789012:function:pgdr-dev-probe"));
        assert_eq!(create_fn.num_calls(), 3);
        assert!(changes.iter().any(|c| c.action == Action::Create && c.kind == "lambda-function"), "{changes:?}");
    }

    #[tokio::test]
    async fn a_throttled_create_is_tried_again_and_another_refusal_is_not() {
        let get = not_there();
        let create_fn = mock!(aws_sdk_lambda::Client::create_function)
            .sequence()
            .error(|| {
                CreateFunctionError::TooManyRequestsException(
                    TooManyRequestsException::builder().meta(meta("TooManyRequestsException", "Rate exceeded")).build(),
                )
            })
            .output(|| {
                CreateFunctionOutput::builder().function_arn("arn:aws:lambda:eu-west-1:123456789012:function:pgdr-dev-probe").build()
            })
            .build();
        let (r, _) = create(&[&get, &create_fn]).await;
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(create_fn.num_calls(), 2);

        let get = not_there();
        let too_big =
            mock!(aws_sdk_lambda::Client::create_function).then_error(refused("Unzipped size must be smaller than 262144000 bytes"));
        let (r, _) = create(&[&get, &too_big]).await;
        let e = r.unwrap_err().to_string();
        assert!(e.contains("InvalidParameterValueException") && e.contains("Unzipped size"), "{e}");
        assert_eq!(too_big.num_calls(), 1);
    }
}
