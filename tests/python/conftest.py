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
