"""The S3 sink: the one module that imports boto3.

Retries are ingestd's own (the uploader's backoff, bounded by the drain deadline), so botocore
makes one attempt per call. Errors are sorted once here into retryable and permanent.
"""

from __future__ import annotations

import base64
import hashlib

import boto3
import botocore.config
import botocore.exceptions

from .config import SinkConfig
from .errors import PermanentSinkError, RetryableSinkError

# Error codes that no amount of waiting fixes: the object goes to the dead-letter spool.
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
    }
)


# 4xx codes that heal: a body damaged on the way (BadDigest), clocks, throttling, credentials that
# botocore refreshes
RETRYABLE_CODES = frozenset({"RequestTimeout", "SlowDown", "Throttling", "RequestTimeTooSkewed", "BadDigest",
                             "ExpiredToken", "TokenRefreshRequired"})


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
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            message = f"s3://{self.bucket}/{key}: {code or status} {err.get('Message', '')}".rstrip()
            if code in PERMANENT_CODES or (400 <= status < 500 and status not in (408, 429) and code not in RETRYABLE_CODES):
                raise PermanentSinkError(message) from e
            raise RetryableSinkError(message) from e
        except botocore.exceptions.NoCredentialsError as e:
            raise PermanentSinkError(f"s3://{self.bucket}/{key}: no AWS credentials found") from e
        except (botocore.exceptions.BotoCoreError, OSError) as e:
            # connection refused or reset, timeouts, DNS: the store may come back
            raise RetryableSinkError(f"s3://{self.bucket}/{key}: {e}") from e
