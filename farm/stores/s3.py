"""The artifact store on S3 or any S3-compatible endpoint (MinIO, moto), via boto3.

Errors are sorted at this boundary: a missing bucket or refused credentials are
permanent (the job fails at once with that reason); 5xx, throttling, timeouts and
refused connections are retryable. Two layers retry those: botocore, a few times
within seconds, for a blip; then the Celery task, with backoff up to minutes, for an
outage (workers/tasks.py FarmTask). So a call here gives up quickly: a task waiting for
its retry holds no worker slot, while a call stuck in botocore does.

This is the one place boto errors are sorted. boto3 is imported only when an S3Store
is made or called, so importing this module costs nothing."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from farm.errors import FarmError, NotFound, PermanentError, RetryableError
from farm.stores.keys import check_key, check_prefix, is_key, under

T = TypeVar("T")

MULTIPART_BYTES = 8 * 1024 * 1024
# Seconds to open a connection, and to wait on a socket for each read (and write), not
# for a whole transfer. S3 answers in well under a second and streams long answers
# (CompleteMultipartUpload sends keep-alive whitespace), so a 20 s silence is an
# endpoint that hangs; botocore's default of 60 s, over 4 tries, would stall a worker
# for 4 minutes per call.
CONNECT_TIMEOUT = 5
READ_TIMEOUT = 20
# Retries after the first try, with botocore's standard mode backoff: rand * 1, 2, 4 s.
RETRIES = 3
_PERMANENT = {
    "NoSuchBucket": "the S3 bucket {bucket!r} does not exist",
    "AccessDenied": "S3 refused access to bucket {bucket!r}",
    "InvalidAccessKeyId": "S3 refused the credentials (unknown access key)",
    "SignatureDoesNotMatch": "S3 refused the credentials (bad secret key)",
    "InvalidBucketName": "{bucket!r} is not a valid S3 bucket name",
}
_MISSING = {"NoSuchKey", "404", "NotFound"}


def _code(exc: Any) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _from_client_error(store: S3Store, exc: Any, args: tuple[Any, ...]) -> FarmError:
    code = _code(exc)
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in ("403", "404"):
        # The answer to a HEAD (download_file starts with one) has no body to name the
        # cause: a missing bucket reads like a missing key, bad credentials like a
        # missing permission. The bucket's answer to a listing names it.
        problem = store.bucket_problem()
        if problem is not None:
            return problem
        if code == "403":
            return PermanentError(_PERMANENT["AccessDenied"].format(bucket=store.bucket))
    if code in _PERMANENT:
        return PermanentError(_PERMANENT[code].format(bucket=store.bucket))
    if code in _MISSING:
        return NotFound(f"artifact {args[0] if args else ''} is missing from the store")
    if status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError"):
        return RetryableError(f"S3 is failing ({code or status}); will retry")
    return PermanentError(f"S3 error {code or status}: {exc}")


def _sorted_errors(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(self: S3Store, *args: Any, **kwargs: Any) -> T:
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            NoCredentialsError,
        )

        try:
            return fn(self, *args, **kwargs)
        except ClientError as exc:
            raise _from_client_error(self, exc, args) from exc
        except S3UploadFailedError as exc:
            # upload_file re-raises any ClientError as this (not a ClientError), keeping
            # the original only as implicit context: sort by that, or a missing bucket
            # would escape unsorted.
            if isinstance(exc.__context__, ClientError):
                raise _from_client_error(self, exc.__context__, args) from exc
            raise PermanentError(f"S3 upload failed: {exc}") from exc
        except RetriesExceededError as exc:
            # download_file's own retries of a broken body stream ran out; not a
            # BotoCoreError, but as transient as the stream errors it wraps.
            raise RetryableError(f"S3 download kept failing: {exc.last_exception}") from exc
        except NoCredentialsError as exc:
            raise PermanentError("no S3 credentials found (set AWS_ACCESS_KEY_ID ...)") from exc
        except (ConnectionError, BotoCoreError) as exc:
            raise RetryableError(f"S3 endpoint unreachable: {exc}") from exc

    return wrapper


class S3Store:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        presign_seconds: int = 3600,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.presign_seconds = presign_seconds
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT,
                retries={"max_attempts": RETRIES, "mode": "standard"},
                s3={"addressing_style": "path"},
                # Without this botocore presigns with legacy SigV2 in regions that still
                # allow it (us-east-1 included); SigV4-only stores reject those URLs.
                signature_version="s3v4",
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES
        )

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @_sorted_errors
    def check(self) -> None:
        """Fail fast on a missing bucket or bad credentials."""
        # A GET, not HeadBucket: the answer to a HEAD has no body, so its bare 403 cannot
        # tell bad credentials from a missing permission. Both need only s3:ListBucket.
        self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)

    def bucket_problem(self) -> PermanentError | None:
        """Why the bucket cannot be used (missing, credentials refused), or None when
        it can, or when that cannot be told right now."""
        from botocore.exceptions import ClientError

        try:
            self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        except ClientError as exc:
            if _code(exc) in _PERMANENT:
                return PermanentError(_PERMANENT[_code(exc)].format(bucket=self.bucket))
        except Exception:  # unreachable, 5xx: the caller's own error stands
            pass
        return None

    @_sorted_errors
    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)

    @_sorted_errors
    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    @_sorted_errors
    def get_file(self, key: str, dest: Path) -> Path:
        # download_file writes a temp file beside DEST and renames it: never half an
        # artifact. A device or pipe the user named goes through write_user_file
        # (farm/stores/local.py), which stages the file elsewhere first.
        self.client.download_file(self.bucket, self._key(key), str(dest), Config=self.transfer)
        return dest

    @_sorted_errors
    def get_bytes(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    @_sorted_errors
    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as exc:
            if _code(exc) not in _MISSING:
                raise
        # A missing bucket answers a HEAD with the same bare 404 as a missing key.
        problem = self.bucket_problem()
        if problem is not None:
            raise problem
        return False

    @_sorted_errors
    def size(self, key: str) -> int:
        return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])

    @_sorted_errors
    def delete_prefix(self, prefix: str) -> int:
        full = self._key(prefix.rstrip("/"))
        count = 0
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full
        )
        for page in pages:
            keys = [
                {"Key": o["Key"]}
                for o in page.get("Contents", [])
                if o["Key"] == full or o["Key"].startswith(full + "/")
            ]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
                count += len(keys)
        return count

    @_sorted_errors
    def url(self, key: str) -> str:
        """A presigned GET URL, made when read."""
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=self.presign_seconds,
        )

    def list(self, prefix: str) -> list[str]:
        """The keys at or under `prefix` ("" for all), sorted, from as many pages of
        ListObjectsV2 as it takes. Objects under the store's prefix whose names are no
        key (folder markers ending in "/", "a//b", ".." parts) are not listed."""
        return list(self.sizes(prefix))

    @_sorted_errors
    def sizes(self, prefix: str) -> dict[str, int]:
        prefix = check_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        keys = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=root + prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"][len(root) :]
                if under(key, prefix) and is_key(key):
                    keys[key] = int(obj["Size"])
        return dict(sorted(keys.items()))
