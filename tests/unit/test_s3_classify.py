"""s3sink.py: how S3's answers are sorted into retryable, permanent and uncertain errors.

The table goes through `client_error` with botocore ClientError objects built as botocore builds
them from an S3 error body; the S3Sink.put tests go through a real boto3 client with botocore's
Stubber in place of the network (the integration tests in test_s3_errors.py use moto over HTTP).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator

import botocore.exceptions
import pytest
from botocore.stub import Stubber

from ingestd.config import SinkConfig
from ingestd.errors import (
    PermanentSinkError,
    RetryableSinkError,
    SinkError,
    UncertainSinkError,
)
from ingestd.s3sink import (
    PERMANENT_CODES,
    RETRYABLE_CODES,
    S3Sink,
    classify,
    client_error,
)

KEY = "pfx/dt=2025-11-28/hour=03/obj.ndjson.gz"


def s3_error(code: str, status: int, message: str = "some message") -> botocore.exceptions.ClientError:
    response = {"Error": {"Code": code, "Message": message},
                "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": "REQ1"}}
    return botocore.exceptions.ClientError(response, "PutObject")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "code, status, kind",
    [
        # credentials that expire or go stale: botocore's providers refresh them
        ("ExpiredToken", 400, RetryableSinkError),
        ("ExpiredTokenException", 400, RetryableSinkError),
        ("TokenRefreshRequired", 400, RetryableSinkError),
        ("RequestExpired", 400, RetryableSinkError),
        ("InvalidToken", 400, RetryableSinkError),
        # conflicts, timeouts, throttling, clocks, bodies damaged on the way
        ("OperationAborted", 409, RetryableSinkError),
        ("SomeOtherConflict", 409, RetryableSinkError),
        ("RequestTimeout", 400, RetryableSinkError),
        ("", 408, RetryableSinkError),
        ("SlowDown", 503, RetryableSinkError),
        ("TooManyRequests", 429, RetryableSinkError),
        ("RequestTimeTooSkewed", 403, RetryableSinkError),
        ("BadDigest", 400, RetryableSinkError),
        ("IncompleteBody", 400, RetryableSinkError),
        # 5xx, known or not
        ("InternalError", 500, RetryableSinkError),
        ("WeirdNewServerError", 502, RetryableSinkError),
        ("", 504, RetryableSinkError),
        # refusals that waiting never fixes
        ("AccessDenied", 403, PermanentSinkError),
        ("NoSuchBucket", 404, PermanentSinkError),
        ("InvalidAccessKeyId", 403, PermanentSinkError),
        ("SignatureDoesNotMatch", 403, PermanentSinkError),
        ("InvalidBucketName", 400, PermanentSinkError),
        ("EntityTooLarge", 400, PermanentSinkError),
        ("InvalidDigest", 400, PermanentSinkError),
        ("KeyTooLongError", 400, PermanentSinkError),
        # what ingestd does not know: bounded retries, then a dead letter
        ("WeirdNewError", 400, UncertainSinkError),
        ("WeirdNewError", 403, UncertainSinkError),
        ("NoSuchThing", 404, UncertainSinkError),
        ("", 400, UncertainSinkError),
        ("PermanentRedirect", 301, UncertainSinkError),
    ],
)
def test_client_errors_are_sorted_by_code_then_status(code: str, status: int, kind: type[SinkError]) -> None:
    err = client_error(s3_error(code, status), "bkt", KEY)
    assert type(err) is kind, (code, status, type(err))
    assert classify(code, status) is kind


def test_uncertain_is_a_retryable_error_so_code_that_knows_two_kinds_still_retries() -> None:
    # the directory sink and every `except RetryableSinkError` keep working: the bound lives in Delivery
    assert issubclass(UncertainSinkError, RetryableSinkError)
    assert not issubclass(UncertainSinkError, PermanentSinkError)


def test_no_code_is_both_permanent_and_retryable() -> None:
    assert PERMANENT_CODES.isdisjoint(RETRYABLE_CODES), PERMANENT_CODES & RETRYABLE_CODES


def test_the_message_keeps_the_code_the_status_and_s3s_message() -> None:
    err = client_error(s3_error("WeirdNewError", 400, "Something odd happened."), "bkt", KEY)
    assert str(err) == f"s3://bkt/{KEY}: WeirdNewError (HTTP 400) Something odd happened."
    bare = client_error(s3_error("", 400, ""), "bkt", KEY)
    assert str(bare) == f"s3://bkt/{KEY}: no code (HTTP 400)"


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[S3Sink, Stubber]]:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    sink = S3Sink(SinkConfig(kind="s3", bucket="bkt", region="us-east-1", endpoint_url="http://127.0.0.1:9"))
    with Stubber(sink._client) as stubber:
        yield sink, stubber
        stubber.assert_no_pending_responses()


def expected_put(body: bytes, encoding: str | None) -> dict[str, object]:
    params: dict[str, object] = {"Bucket": "bkt", "Key": KEY, "Body": body, "ContentType": "application/x-ndjson",
                                 "ContentMD5": base64.b64encode(hashlib.md5(body).digest()).decode()}
    if encoding:
        params["ContentEncoding"] = encoding
    return params


def test_put_sends_content_md5_of_the_body(stubbed: tuple[S3Sink, Stubber]) -> None:
    sink, stubber = stubbed
    stubber.add_response("put_object", {"ETag": '"x"'}, expected_put(b"gz-bytes", "gzip"))
    stubber.add_response("put_object", {"ETag": '"y"'}, expected_put(b"{}\n", None))
    sink.put(KEY, b"gz-bytes", "gzip")
    sink.put(KEY, b"{}\n", None)


@pytest.mark.parametrize(
    "code, status, kind",
    [("ExpiredToken", 400, RetryableSinkError), ("OperationAborted", 409, RetryableSinkError),
     ("AccessDenied", 403, PermanentSinkError), ("WeirdNewError", 400, UncertainSinkError)],
)
def test_put_raises_the_sorted_error_with_the_client_error_as_cause(
        stubbed: tuple[S3Sink, Stubber], code: str, status: int, kind: type[SinkError]) -> None:
    sink, stubber = stubbed
    stubber.add_client_error("put_object", service_error_code=code, service_message="why not",
                             http_status_code=status, expected_params=expected_put(b"data", None))
    with pytest.raises(SinkError) as exc:
        sink.put(KEY, b"data", None)
    assert type(exc.value) is kind
    assert str(exc.value) == f"s3://bkt/{KEY}: {code} (HTTP {status}) why not"
    assert isinstance(exc.value.__cause__, botocore.exceptions.ClientError)
