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


def test_a_broken_probe_path_never_routes_writes_to_a_read_only_server(built):
    env = built()
    f, bad = dr_scenarios.probe_path_broken(env)
    assert bad == [], f
    assert f["notified"], "a notification says what is wrong"
