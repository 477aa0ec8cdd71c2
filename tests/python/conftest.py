"""Shared fixtures for the Lambda handler tests (src/lambda/*.py, run in-process)."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "src" / "lambda"))


@pytest.fixture
def aws_env(monkeypatch):
    """Fake credentials and no endpoint override, so boto3 only ever talks to moto."""
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_RDS", "AWS_ENDPOINT_URL_ROUTE_53",
                "AWS_ENDPOINT_URL_SNS", "AWS_ENDPOINT_URL_SQS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "eu-west-1",
                       "AWS_REGION": "eu-west-1"}.items():
        monkeypatch.setenv(key, value)


# -- real PostgreSQL (tests/python/pgpair.py) ------------------------------------------------
# The clusters need PostgreSQL's server binaries; scripts/setup-postgres installs them when
# missing. Only when that is impossible (no root, no apt, no network) do these tests skip.

@pytest.fixture(scope="session")
def pg_bindir():
    import pgpair
    try:
        return pgpair.bindir()
    except pgpair.PgUnavailable as e:
        pytest.skip(f"PostgreSQL is not installed and could not be installed: {e}")


@pytest.fixture(scope="session")
def pg_pair(pg_bindir):
    """A primary + streaming standby shared by the tests that leave it as they found it."""
    import pgpair
    with pgpair.PgPair(user="pgdr", password="shared-Secret-1", bindir_=pg_bindir) as pair:
        yield pair


@pytest.fixture
def make_pair(pg_bindir):
    """A factory of fresh pairs (or single clusters) for tests that promote, stop or break them;
    each is closed at the end of the test, failed or not."""
    import pgpair
    made = []

    def make(**kw):
        kw.setdefault("bindir_", pg_bindir)
        pair = pgpair.PgPair(**kw)
        made.append(pair)
        return pair

    yield make
    for pair in made:
        pair.close()
