"""The S3 sink: the one module that imports boto3.

Retries are ingestd's own (the uploader's backoff, bounded by the drain deadline), so botocore
makes one attempt per call. Errors are sorted once here (`classify`) into retryable (retried
until the drain deadline), permanent (dead-lettered at once) and uncertain (an unknown code:
retried `delivery.UNCERTAIN_ATTEMPTS` times for the object, then dead-lettered).
"""

from __future__ import annotations

import base64
import hashlib

import boto3
import botocore.config
import botocore.exceptions

from .config import SinkConfig
from .errors import (
    PermanentSinkError,
    RetryableSinkError,
    SinkError,
    UncertainSinkError,
)

# Error codes that no amount of waiting fixes: the object goes to the dead-letter spool at once.
PERMANENT_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "NoSuchBucket",
        "SignatureDoesNotMatch",
        "InvalidRequest",
        "InvalidArgument",
        "EntityTooLarge",
        "KMS.DisabledException",
        "AuthorizationHeaderMalformed",
        "InvalidDigest",
        "KeyTooLongError",
        "MetadataTooLarge",
        "MissingContentLength",
        "InvalidStorageClass",
        "NotSignedUp",
        "MethodNotAllowed",
    }
)

# Codes that heal by waiting: throttling and timeouts, a body damaged on the way (BadDigest,
# IncompleteBody), clocks, a conflicting operation in progress, and expired or invalid session
# credentials (botocore's credential providers refresh them)
RETRYABLE_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestTimeTooSkewed",
        "BadDigest",
        "IncompleteBody",
        "OperationAborted",
        "ConditionalRequestConflict",
        "ExpiredToken",
        "ExpiredTokenException",
        "TokenRefreshRequired",
        "RequestExpired",
        "InvalidToken",
        "InternalError",
        "ServiceUnavailable",
    }
)

# HTTP statuses that heal whatever the code: request timeout, conflict, too many requests
RETRYABLE_STATUSES = frozenset({408, 409, 429})


def classify(code: str, status: int) -> type[SinkError]:
    """The error class of an S3 answer: a known code first, then the status. Anything else (a
    4xx code ingestd does not know, an unexpected status) is uncertain: retried a bounded
    number of times for the object, then dead-lettered with its reason."""
    if code in PERMANENT_CODES:
        return PermanentSinkError
    if code in RETRYABLE_CODES or status in RETRYABLE_STATUSES or status >= 500:
        return RetryableSinkError
    return UncertainSinkError


def client_error(e: botocore.exceptions.ClientError, bucket: str, key: str) -> SinkError:
    """The SinkError of a refused request; its message keeps S3's code, status and message."""
    err = e.response.get("Error", {})
    code = str(err.get("Code", "") or "")
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    message = f"s3://{bucket}/{key}: {code or 'no code'} (HTTP {status}) {err.get('Message', '') or ''}".rstrip()
    return classify(code, status)(message)


class S3Sink:
    def __init__(self, config: SinkConfig) -> None:
        self.bucket = config.bucket
        self.endpoint = config.endpoint_url or "aws"
        self._client = boto3.session.Session().client(
            "s3",
            region_name=config.region or None,
            endpoint_url=config.endpoint_url or None,
            config=botocore.config.Config(
                retries={"total_max_attempts": 1, "mode": "standard"},  # ours are the only retries
                connect_timeout=config.connect_timeout_s,
                read_timeout=config.read_timeout_s,
                max_pool_connections=2,
                # botocore >= 1.36 adds a CRC32 trailer (aws-chunked) to every PutObject by default:
                # CPU per object, and S3-compatible stores that do not speak aws-chunked refuse it
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def describe(self) -> str:
        return f"s3 bucket {self.bucket} at {self.endpoint}"

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
            return True
        except botocore.exceptions.ClientError as e:
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if status == 404:
                return False
            raise RetryableSinkError(f"s3://{self.bucket}/{key}: HEAD answered {status}") from e
        except (botocore.exceptions.BotoCoreError, OSError) as e:
            raise RetryableSinkError(f"s3://{self.bucket}/{key}: {e}") from e

    def put(self, key: str, body: bytes, content_encoding: str | None) -> None:
        extra = {"ContentEncoding": content_encoding} if content_encoding else {}
        # S3 verifies Content-MD5 against what it received and refuses the PUT (BadDigest) on a mismatch
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/x-ndjson",
                                    ContentMD5=md5, **extra)
        except botocore.exceptions.ClientError as e:
            raise client_error(e, self.bucket, key) from e
        except botocore.exceptions.NoCredentialsError as e:
            raise PermanentSinkError(f"s3://{self.bucket}/{key}: no AWS credentials found") from e
        except (botocore.exceptions.BotoCoreError, OSError) as e:
            # connection refused or reset, timeouts, DNS: the store may come back
            raise RetryableSinkError(f"s3://{self.bucket}/{key}: {e}") from e
