"""DR in motion: `pgdr up` in a private emulator, real PostgreSQL behind both instances, AWS's
control loop played over what pgdr deployed (tests/python/drloop.py), a writer committing rows
through `postgres.<zone>`. Figures are emulated seconds; scripts/drill prints them."""
import pytest

import dr_scenarios
from dr_scenarios import DrEnv, region_loss, region_loss_verdict


@pytest.fixture
def built(pg_bindir):
    if not dr_scenarios.pgdr_bin().exists():
        pytest.fail(f"{dr_scenarios.pgdr_bin()} is missing: build pgdr first (scripts/test does)")
    made = []

    def build(**kw):
        env = DrEnv(bindir_=pg_bindir, **kw)
        made.append(env)
        return env

    yield build
    for env in made:
        env.close()


def test_region_loss_fails_over_with_no_pgdr_command(built):
    env = built()
    f = region_loss(env)
    assert region_loss_verdict(f) == [], f
    assert f["rpo_rows"] == 0, f  # asynchronous replication of a loopback pair: nothing in flight
    assert f["rows_written"] > 50, f
    # The promotion went through the deployed failover function, invoked by the primary-down alarm.
    assert any(i["function"].endswith("-failover") and i["why"].startswith("alarm") for i in env.loop.invocations)


def test_the_deployed_alarm_sets_the_detection_time(built):
    """Detection follows what pgdr deployed: five minutes of failed probes instead of three."""
    env = built(config="[defaults]\nfailover_after_minutes = 5\n")
    f = region_loss(env)
    assert f["bounds"]["detection_window_s"] == 300, f
    assert 240 <= f["detection_s"] <= 420, f
    assert region_loss_verdict(f) == [], f


def test_a_multi_az_blip_does_not_fail_over(built):
    env = built()
    f, bad = dr_scenarios.multi_az_blip(env)
    assert bad == [], f
    assert env.writer.errors_of("timeout"), "the blip reached the writer's open connection"


def test_a_broken_probe_path_never_routes_writes_to_a_read_only_server(built):
    env = built()
    f, bad = dr_scenarios.probe_path_broken(env)
    assert bad == [], f
    assert f["notified"], "a notification says what is wrong"


def test_maintenance_is_not_a_disaster(built):
    """An engine upgrade restarting the database long enough to set off the alarm: the function
    reads `upgrading` and promotes nothing."""
    env = built()
    f, bad = dr_scenarios.maintenance(env)
    assert bad == [], f
    assert f["detection_s"] is not None and f["notified"], f


def test_a_throttled_promotion_is_finished_by_the_resume_schedule(built):
    env = built()
    f, bad = dr_scenarios.stalled_promotion(env)
    assert bad == [], (bad, f["failover_invocations"])
    assert f["throttled_invocation"]["why"].startswith("alarm"), f


def test_manual_failover_while_the_primary_region_is_down(built):
    env = built()
    f, bad = dr_scenarios.manual_failover_region_down(env)
    assert bad == [], f
    assert f["failover_exit"] == 3, f"the fence is pending, so failover says partial: {f['failover_output']}"
    assert f["rpo_rows"] == 0, f


def test_the_way_back_fails_over_the_other_way(built):
    env = built()
    f, bad = dr_scenarios.way_back(env)
    assert bad == [], f
    assert (f["first"]["from"], f["first"]["to"]) == ("us-east-1", "eu-west-1"), f
    assert (f["from"], f["to"]) == ("eu-west-1", "us-east-1"), f
