"""What the S3 stager decides without a server: which failures are transient, what each object is sent with."""

from __future__ import annotations

from pathlib import Path

import pytest
from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

from sinks.s3 import S3Stager
from trawl.errors import StagingError, StagingUnavailable
from trawl.retry import is_transient
from trawl.settings import Settings


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Put"
    )


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (_client_error("SlowDown", 503), True),
        (_client_error("Throttling", 400), True),
        (_client_error("RequestTimeout", 400), True),
        (_client_error("InternalError", 500), True),
        (_client_error("Whatever", 502), True),
        (_client_error("TooManyRequests", 429), True),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
        (ConnectionResetError(), True),
        (StagingUnavailable("down"), True),
        (_client_error("AccessDenied", 403), False),
        (_client_error("NoSuchBucket", 404), False),
        (_client_error("InvalidArgument", 400), False),
        (ValueError("bug"), False),
    ],
)
def test_transient_s3_errors(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_transient_staging_error_is_retried_by_class() -> None:
    assert StagingUnavailable("x").transient and not StagingError("x").transient


def _stager(**kw: object) -> S3Stager:
    settings = Settings(**kw)  # type: ignore[arg-type]
    return S3Stager.from_url("s3://bucket/pre", settings, part_max_records=10, part_max_bytes=1024)


def test_objects_are_sent_with_encryption_storage_class_and_tags() -> None:
    stager = _stager(s3_sse="aws:kms", s3_sse_kms_key_id="arn:aws:kms:eu-west-1:1:key/k", s3_storage_class="GLACIER_IR")
    key = "pre/raw/source=shop/dt=2026-03-14/run=R1/part-00001.jsonl.gz"
    assert stager._object_args(key) == {
        "ServerSideEncryption": "aws:kms",
        "SSEKMSKeyId": "arn:aws:kms:eu-west-1:1:key/k",
        "StorageClass": "GLACIER_IR",
        "Tagging": "source=shop&run_id=R1",
    }
    assert _stager(s3_tagging=False)._object_args(key) == {}
    assert _stager(s3_sse="AES256")._object_args(key)["ServerSideEncryption"] == "AES256"


def test_spool_mirrors_the_bucket_layout(tmp_path: Path) -> None:
    stager = _stager(s3_spool_dir=tmp_path / "spool")
    assert stager.spool_root == (tmp_path / "spool" / "bucket").resolve()
    with pytest.raises(StagingError, match="not inside the staging target"):
        stager._key("s3://bucket/other/raw/x")
    with pytest.raises(StagingError, match="not inside the staging target"):
        stager._key("s3://bucket/pre/../x")
    assert stager._key("s3://bucket/pre/raw/x") == "pre/raw/x"
