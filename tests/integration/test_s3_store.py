"""S3Store against a real HTTP S3 endpoint: moto's server on 127.0.0.1.

Everything goes over loopback sockets through boto3, so signing, multipart uploads,
ranged downloads, presigned URLs and the error sorting at the S3Store boundary are the
real code paths. Failure modes use real servers too: a moto process that enforces
authentication, a port where nothing listens, and a tiny HTTP server that answers 503.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from farm.config import Settings
from farm.errors import InvalidInput, NotFound, PermanentError, RetryableError
from farm.stores import open_store
from tests.conftest import need_service
from tests.services import aws_test_env

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
# Error paths must answer within this many seconds: a worker that hangs on a dead
# bucket or a refused connection stalls the whole job.
FAST_S = 5.0
# botocore's standard retry mode sleeps rand(0, 1) * 2**n s before retry n, up to 1+2+4 s
# over the store's 3 retries, so transient failures get a little more room than FAST_S.
RETRY_S = 10.0


def _moto_installed() -> bool:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def aws_env() -> Iterator[None]:
    # Module-scoped, so monkeypatch's function-scoped fixture cannot be used directly.
    with pytest.MonkeyPatch.context() as mp:
        for name in (
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "MOTO_ACCOUNT_ID",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
        ):
            mp.delenv(name, raising=False)
        for name, value in aws_test_env().items():
            mp.setenv(name, value)
        _fresh_boto3_session(mp)
        yield


def _fresh_boto3_session(mp: pytest.MonkeyPatch) -> None:
    # S3Store builds its client from boto3's process-wide default session, which resolves
    # credentials once and caches them. A worker process starts with none; without this a
    # session made earlier (another test, another credentials env) would be reused.
    import boto3

    mp.setattr(boto3, "DEFAULT_SESSION", None)


@pytest.fixture(scope="module")
def endpoint(aws_env: None) -> Iterator[str]:
    """A moto S3 endpoint (no auth) on a free loopback port, for the whole module."""
    need_service(_moto_installed(), "moto[server]")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _raw_client(endpoint_url: str, **kwargs: Any) -> Any:
    """A plain boto3 client, independent of S3Store, to look behind the store's back."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        **kwargs,
    )


@pytest.fixture
def bucket(endpoint: str) -> str:
    """A fresh bucket per test, so tests cannot see each other's objects."""
    name = f"farm-test-{uuid.uuid4().hex[:12]}"
    _raw_client(endpoint).create_bucket(Bucket=name)
    return name


def _store(endpoint_url: str, bucket: str, prefix: str = "", **kwargs: Any) -> Any:
    from farm.stores import S3Store

    return S3Store(bucket=bucket, prefix=prefix, endpoint_url=endpoint_url, **kwargs)


def _listed(endpoint_url: str, bucket: str) -> set[str]:
    pages = _raw_client(endpoint_url).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


# --- round trips -------------------------------------------------------------------


def test_round_trips_under_prefix(endpoint: str, bucket: str, tmp_path: Path) -> None:
    store = _store(endpoint, bucket, prefix="/some/prefix/")  # slashes are trimmed
    store.check()

    store.put_bytes("jobs/j1/plan.json", b'{"frames": 250}')
    assert store.get_bytes("jobs/j1/plan.json") == b'{"frames": 250}'

    src = tmp_path / "audio.wav"
    src.write_bytes(os.urandom(64 * 1024))
    store.put_file("jobs/j1/audio.wav", src)
    dest = store.get_file("jobs/j1/audio.wav", tmp_path / "back.wav")
    assert dest == tmp_path / "back.wav"
    assert dest.read_bytes() == src.read_bytes()

    # Overwrite is a plain replace: re-runs of a task must not fail on existing keys.
    store.put_bytes("jobs/j1/plan.json", b"{}")
    assert store.get_bytes("jobs/j1/plan.json") == b"{}"

    # The objects really lie under the prefix in the bucket, not at its root.
    assert _listed(endpoint, bucket) == {
        "some/prefix/jobs/j1/plan.json",
        "some/prefix/jobs/j1/audio.wav",
    }


def test_bad_keys_are_refused_before_any_request(endpoint: str, bucket: str) -> None:
    store = _store(endpoint, bucket, prefix="p")
    for key in ("", "/abs", "a/../b", "a//b"):
        with pytest.raises(InvalidInput):
            store.put_bytes(key, b"x")
    assert _listed(endpoint, bucket) == set()


def test_large_file_goes_multipart_and_downloads_identical(
    endpoint: str, bucket: str, tmp_path: Path
) -> None:
    from farm.stores.s3 import MULTIPART_BYTES

    size = 20 * 1024 * 1024
    assert size > 2 * MULTIPART_BYTES  # so the upload needs three parts
    src = tmp_path / "final.mp4"
    src.write_bytes(os.urandom(size))
    store = _store(endpoint, bucket, prefix="big")

    store.put_file("jobs/j1/final.mp4", src)

    head = _raw_client(endpoint).head_object(Bucket=bucket, Key="big/jobs/j1/final.mp4")
    assert head["ContentLength"] == size
    # A multipart object's ETag is md5-of-part-md5s followed by "-<number of parts>";
    # a single PUT has a bare md5. 20 MiB in 8 MiB parts is 3 parts.
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]

    dest = store.get_file("jobs/j1/final.mp4", tmp_path / "back.mp4")
    assert dest.stat().st_size == size
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


def test_exists_and_missing_keys(endpoint: str, bucket: str, tmp_path: Path) -> None:
    store = _store(endpoint, bucket, prefix="p")
    store.put_bytes("jobs/j1/a.txt", b"a")
    assert store.exists("jobs/j1/a.txt") is True
    assert store.exists("jobs/j1/b.txt") is False
    assert store.exists("jobs/j1") is False  # a "directory" is not an artifact

    with pytest.raises(NotFound, match="jobs/j1/b.txt"):
        store.get_bytes("jobs/j1/b.txt")
    with pytest.raises(NotFound, match="jobs/j1/b.txt"):
        store.get_file("jobs/j1/b.txt", tmp_path / "b.txt")


def test_delete_prefix_removes_exactly_that_prefix(endpoint: str, bucket: str) -> None:
    store = _store(endpoint, bucket, prefix="root")
    doomed = ["jobs/abc/plan.json", "jobs/abc/chunks/00000.mp4", "jobs/abc/chunks/00001.mp4"]
    kept = ["jobs/abc2/plan.json", "jobs/abcd", "jobs/ab/c", "avatars/abc/photo.png"]
    for key in doomed + kept:
        store.put_bytes(key, key.encode())
    # The same relative key outside the store's prefix must be untouched too.
    _raw_client(endpoint).put_object(Bucket=bucket, Key="jobs/abc/plan.json", Body=b"outside")

    assert store.delete_prefix("jobs/abc/") == len(doomed)

    assert _listed(endpoint, bucket) == {f"root/{k}" for k in kept} | {"jobs/abc/plan.json"}
    assert store.delete_prefix("jobs/abc") == 0  # idempotent: nothing left to delete
    # A prefix that names a single object deletes just that object.
    assert store.delete_prefix("jobs/abcd") == 1
    assert not store.exists("jobs/abcd")
    assert store.exists("jobs/abc2/plan.json")


def test_delete_prefix_pages_past_one_listing(endpoint: str, bucket: str) -> None:
    # list_objects_v2 returns at most 1000 keys a page and delete_objects takes at most
    # 1000: a job with more chunks than that must still be deleted completely.
    # Seeded straight into moto's in-process backend: 1100 PUTs over HTTP take ~10 s,
    # and the upload path is covered above; only the listing and deleting are under test.
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    keys = [f"p/jobs/many/chunks/{i:05d}.mp4" for i in range(1100)]
    for key in keys:
        backend.put_object(bucket, key, b"x")
    backend.put_object(bucket, "p/jobs/many2/keep", b"x")
    assert len(_listed(endpoint, bucket)) == len(keys) + 1  # the seeding went where meant

    store = _store(endpoint, bucket, prefix="p")
    assert store.delete_prefix("jobs/many") == len(keys)
    assert _listed(endpoint, bucket) == {"p/jobs/many2/keep"}


# --- listing -----------------------------------------------------------------------


def test_list_gives_keys_under_the_stores_prefix_sorted(endpoint: str, bucket: str) -> None:
    store = _store(endpoint, bucket, prefix="root")
    keys = [
        "jobs/abc/plan.json",
        "jobs/abc/chunks/00001.mp4",
        "jobs/abc/chunks/00000.mp4",
        "jobs/abcd",
        "jobs/abc2/deep/er/x.bin",
        "avatars/demo/photo.png",
    ]
    for key in keys:
        store.put_bytes(key, b"x")
    raw = _raw_client(endpoint)
    # Around the store's prefix: a sibling prefix, the bucket's root, a folder marker
    # and a name no key could have. None of them is one of this store's keys.
    for other in ("root2/jobs/abc/plan.json", "jobs/abc/plan.json", "root/jobs/dir/", "root/a//b"):
        raw.put_object(Bucket=bucket, Key=other, Body=b"y")

    assert store.list("") == sorted(keys)
    assert store.list("jobs/abc") == [
        "jobs/abc/chunks/00000.mp4",
        "jobs/abc/chunks/00001.mp4",
        "jobs/abc/plan.json",
    ]
    assert store.list("jobs/abc/") == store.list("jobs/abc")
    assert store.list("jobs/abcd") == ["jobs/abcd"]  # a key lists itself, as delete_prefix
    assert store.list("jobs/ab") == []  # whole segments only
    assert store.list("avatars") == ["avatars/demo/photo.png"]
    assert store.list("nothing/here") == []
    # Every listed key is one the other verbs take.
    assert [store.get_bytes(k) for k in store.list("jobs/abc2")] == [b"x"]


def test_list_of_an_empty_bucket_and_of_a_store_without_prefix(endpoint: str, bucket: str) -> None:
    bare = _store(endpoint, bucket)
    assert bare.list("") == []
    assert _store(endpoint, bucket, prefix="p").list("") == []
    bare.put_bytes("p/jobs/j/x", b"x")
    bare.put_bytes("top", b"x")
    assert bare.list("") == ["p/jobs/j/x", "top"]
    assert _store(endpoint, bucket, prefix="p").list("") == ["jobs/j/x"]
    with pytest.raises(InvalidInput):
        bare.list("../up")
    with pytest.raises(InvalidInput):
        bare.delete_prefix("")  # listing everything is fine; deleting it is refused


def test_list_pages_past_one_listing(endpoint: str, bucket: str) -> None:
    # ListObjectsV2 answers at most 1000 keys a page: 2500 need three pages. Seeded
    # straight into moto's backend, as in test_delete_prefix_pages_past_one_listing.
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    keys = [f"jobs/many/chunks/{i:05d}.mp4" for i in range(2500)]
    for key in reversed(keys):
        backend.put_object(bucket, f"p/{key}", b"x")
    backend.put_object(bucket, "p/jobs/many2/keep", b"x")

    store = _store(endpoint, bucket, prefix="p")
    assert store.list("jobs/many") == keys
    assert len(store.list("")) == len(keys) + 1


def test_size(endpoint: str, bucket: str) -> None:
    store = _store(endpoint, bucket, prefix="p")
    store.put_bytes("jobs/j/x", b"12345")
    assert store.size("jobs/j/x") == 5
    with pytest.raises(NotFound, match="jobs/j/y"):
        store.size("jobs/j/y")


def _sigv4_query_signature(url: str, secret: str) -> str:
    """The SigV4 query-string signature for a presigned GET, computed from the spec
    (docs.aws.amazon.com/AmazonS3/latest/API/sigv4-query-string-auth.html) with hashlib,
    independently of botocore: moto checks no signatures on presigned URLs (its auth
    check reads only the Authorization header), so this is what shows a URL would pass
    on real S3."""
    import hmac
    from urllib.parse import quote

    parsed = urlparse(url)
    params = parse_qs(parsed.query, keep_blank_values=True)
    params.pop("X-Amz-Signature")
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v[0], safe='-_.~')}" for k, v in sorted(params.items())
    )
    canonical_request = "\n".join(
        [
            "GET",
            parsed.path,
            canonical_query,
            f"host:{parsed.netloc}",
            "",
            "host",
            "UNSIGNED-PAYLOAD",
        ]
    )
    scope = params["X-Amz-Credential"][0].split("/", 1)[1]
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            params["X-Amz-Date"][0],
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = ("AWS4" + secret).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def test_presigned_url_fetches_bytes_over_loopback(endpoint: str, bucket: str) -> None:
    store = _store(endpoint, bucket, prefix="pub", presign_seconds=600)
    payload = os.urandom(4096)
    store.put_bytes("jobs/j1/final.mp4", payload)

    url = store.url("jobs/j1/final.mp4")

    parsed = urlparse(url)
    assert f"{parsed.scheme}://{parsed.netloc}" == endpoint
    assert parsed.path == f"/{bucket}/pub/jobs/j1/final.mp4"
    query = parse_qs(parsed.query)
    # SigV4 query signing: the only kind newer AWS regions and most S3-compatible stores
    # (R2, recent MinIO setups) accept, with a relative expiry of presign_seconds.
    assert query.get("X-Amz-Algorithm") == ["AWS4-HMAC-SHA256"], url
    assert query.get("X-Amz-Expires") == ["600"], url
    assert query["X-Amz-Credential"][0].startswith("testing/")
    assert query["X-Amz-Credential"][0].endswith("/us-east-1/s3/aws4_request")
    assert query.get("X-Amz-SignedHeaders") == ["host"], url
    assert query["X-Amz-Signature"] == [_sigv4_query_signature(url, "testing")]
    assert query["X-Amz-Signature"] != [_sigv4_query_signature(url, "other-secret")]

    # urllib sends no AWS headers at all: the URL alone is enough.
    with urllib.request.urlopen(url, timeout=FAST_S) as resp:
        assert resp.status == 200
        assert resp.read() == payload


# --- permanent failures ------------------------------------------------------------


def test_missing_bucket_is_permanent_and_fast(endpoint: str, tmp_path: Path) -> None:
    name = f"farm-absent-{uuid.uuid4().hex[:8]}"
    store = _store(endpoint, name, prefix="p")
    src = tmp_path / "x.bin"
    src.write_bytes(b"x")
    calls = {
        "check": store.check,
        "put_bytes": lambda: store.put_bytes("jobs/j/x", b"x"),
        "put_file": lambda: store.put_file("jobs/j/x", src),
        "get_bytes": lambda: store.get_bytes("jobs/j/x"),
        "size": lambda: store.size("jobs/j/x"),
        "list": lambda: store.list(""),
    }
    for what, call in calls.items():
        t0 = time.monotonic()
        with pytest.raises(PermanentError, match=name) as err:
            call()
        assert time.monotonic() - t0 < FAST_S, what
        # Not a missing artifact and not a retry: the job must fail with this reason.
        assert not isinstance(err.value, NotFound), what
        assert "does not exist" in str(err.value), (what, str(err.value))


@pytest.fixture(scope="module")
def auth_endpoint(aws_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A separate moto server process that checks every request's signature and IAM.

    moto reads INITIAL_NO_AUTH_ACTION_COUNT once at import (moto/settings.py); it counts
    that many requests free of auth. It is process-global, so it cannot be turned on for
    the in-process ThreadedMotoServer without affecting the whole module."""
    need_service(_moto_installed(), "moto[server]")
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    # A file, not a pipe: werkzeug logs every request to stderr, and a pipe nobody
    # drains would fill up and stall the server.
    log = tmp_path_factory.mktemp("moto-auth") / "server.log"
    log_file = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log_file,
    )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                err = log.read_text(errors="replace")[-2000:]
                pytest.fail(f"moto server exited with {proc.returncode}: {err}")
            try:
                with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("moto server did not start within 30 s")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()


def _set_auth_free_requests(url: str, count: float) -> None:
    # moto's own admin endpoint, outside AWS auth: resets the free-request counter.
    # Not urllib's default form content type: moto reads the raw body, which werkzeug
    # leaves empty once it has parsed a form.
    req = urllib.request.Request(
        f"{url}/moto-api/reset-auth",
        data=str(count).encode(),
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=FAST_S) as resp:
        json.load(resp)


@pytest.fixture(scope="module")
def auth_user(auth_endpoint: str) -> Iterator[tuple[str, str, str]]:
    """(bucket, key id, secret) of a real IAM user allowed s3:* on the auth server.

    Set up with auth briefly off, then back on, so the tests below have a control:
    the same server accepts good credentials, and refuses only the bad ones."""
    import boto3

    _set_auth_free_requests(auth_endpoint, float("inf"))
    try:
        iam = boto3.client("iam", endpoint_url=auth_endpoint, region_name="us-east-1")
        iam.create_user(UserName="farm")
        iam.put_user_policy(
            UserName="farm",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="farm")["AccessKey"]
        bucket = "farm-auth"
        _raw_client(auth_endpoint).create_bucket(Bucket=bucket)
    finally:
        _set_auth_free_requests(auth_endpoint, 0)
    yield bucket, key["AccessKeyId"], key["SecretAccessKey"]


def _with_credentials(mp: pytest.MonkeyPatch, key_id: str, secret: str) -> None:
    # S3Store takes credentials from boto3's usual chain, as in production.
    mp.setenv("AWS_ACCESS_KEY_ID", key_id)
    mp.setenv("AWS_SECRET_ACCESS_KEY", secret)
    _fresh_boto3_session(mp)


def test_unknown_access_key_is_permanent_credentials_error(
    auth_endpoint: str, auth_user: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, _, _ = auth_user
    _with_credentials(monkeypatch, "AKIAUNKNOWNFARMTEST0", "not-a-secret")
    store = _store(auth_endpoint, bucket)
    for what, call in {
        "check": store.check,
        "put_bytes": lambda: store.put_bytes("jobs/j/x", b"x"),
        "get_bytes": lambda: store.get_bytes("jobs/j/x"),
        "list": lambda: store.list("jobs"),
    }.items():
        t0 = time.monotonic()
        with pytest.raises(PermanentError, match=r"credentials \(unknown access key\)") as err:
            call()
        assert time.monotonic() - t0 < FAST_S, what
        assert not isinstance(err.value, NotFound), what


def test_wrong_secret_is_permanent_credentials_error(
    auth_endpoint: str, auth_user: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, key_id, secret = auth_user
    _with_credentials(monkeypatch, key_id, secret[::-1])
    store = _store(auth_endpoint, bucket)
    with pytest.raises(PermanentError, match=r"credentials \(bad secret key\)"):
        store.check()
    with pytest.raises(PermanentError, match=r"credentials \(bad secret key\)"):
        store.put_bytes("jobs/j/x", b"x")


def test_good_credentials_work_on_the_auth_server(
    auth_endpoint: str, auth_user: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The control for the two tests above: enforcement is on, and it is the keys that
    # decide, not something else about that server.
    bucket, key_id, secret = auth_user
    _with_credentials(monkeypatch, key_id, secret)
    store = _store(auth_endpoint, bucket, prefix="ok")
    store.check()
    store.put_bytes("jobs/j/x", b"signed")
    assert store.get_bytes("jobs/j/x") == b"signed"


# --- transient failures ------------------------------------------------------------


def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Zero botocore's sleep between retries (up to 1+2+4 s of jitter for the store's 3
    retries): the sweeps below check how each verb's failure is sorted, and the real
    backoff is timed once, in test_5xx_is_retryable_after_bounded_retries. The retries
    themselves still happen, against the real socket."""
    from botocore.retries.standard import ExponentialBackoff

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)


def test_connection_refused_is_retryable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_backoff(monkeypatch)
    port = _free_port()  # bound and released: nothing listens there now
    store = _store(f"http://{HOST}:{port}", "farm-bucket", prefix="p")
    src = tmp_path / "x.bin"
    src.write_bytes(b"x")
    for what, call in {
        "check": store.check,
        "put_bytes": lambda: store.put_bytes("jobs/j/x", b"x"),
        "put_file": lambda: store.put_file("jobs/j/x", src),
        "get_bytes": lambda: store.get_bytes("jobs/j/x"),
        "get_file": lambda: store.get_file("jobs/j/x", tmp_path / "out"),
        "exists": lambda: store.exists("jobs/j/x"),
        "delete_prefix": lambda: store.delete_prefix("jobs/j"),
        "size": lambda: store.size("jobs/j/x"),
        "list": lambda: store.list(""),
    }.items():
        t0 = time.monotonic()
        with pytest.raises(RetryableError, match="unreachable"):
            call()
        assert time.monotonic() - t0 < FAST_S, what


class _FakeS3(http.server.BaseHTTPRequestHandler):
    """A misbehaving S3 endpoint; subclasses decide how. Records each request's method."""

    protocol_version = "HTTP/1.1"
    seen: list[str]

    def _answer(self) -> None:
        # Drain the body, so the client sees our answer and not a reset mid-upload.
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.seen.append(self.command)
        self.respond()

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

    def respond(self) -> None:
        raise NotImplementedError

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # keep pytest output clean


class _Unavailable(_FakeS3):
    """Answers every request with 503, as S3 does when it sheds load."""

    def respond(self) -> None:
        body = b"" if self.command == "HEAD" else b"<Error><Code>ServiceUnavailable</Code></Error>"
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Truncating(_FakeS3):
    """Promises 1000 bytes of object, then drops the connection after 100: a download
    cut off mid-stream (a reset, a proxy timeout)."""

    SIZE = 1000

    def respond(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "binary/octet-stream")
        self.send_header("Content-Length", str(self.SIZE))
        self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
        self.send_header("Last-Modified", "Mon, 02 Jan 2023 00:00:00 GMT")
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(b"x" * (self.SIZE // 10))
            self.wfile.flush()
            self.close_connection = True


@contextlib.contextmanager
def _serve(handler: type[_FakeS3]) -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []
    server = http.server.ThreadingHTTPServer((HOST, 0), type("H", (handler,), {"seen": seen}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_5xx_is_retryable_after_bounded_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "x.bin"
    src.write_bytes(b"x")
    with _serve(_Unavailable) as (url, seen):
        store = _store(url, "farm-bucket", prefix="p")

        # Once with botocore's real backoff: the store's retry budget is bounded.
        t0 = time.monotonic()
        with pytest.raises(RetryableError, match="S3 is failing"):
            store.check()
        assert time.monotonic() - t0 < RETRY_S
        # The server really was asked, and botocore gave up after the store's
        # max_attempts=3, which botocore counts as retries after the first request.
        assert len(seen) == 4, seen

        _no_backoff(monkeypatch)
        for what, call in {
            "get_bytes": lambda: store.get_bytes("jobs/j/x"),
            "get_file": lambda: store.get_file("jobs/j/x", tmp_path / "out"),
            "put_bytes": lambda: store.put_bytes("jobs/j/x", b"x"),
            "put_file": lambda: store.put_file("jobs/j/x", src),
            "exists": lambda: store.exists("jobs/j/x"),
            "delete_prefix": lambda: store.delete_prefix("jobs/j"),
            "size": lambda: store.size("jobs/j/x"),
            "list": lambda: store.list("jobs"),
        }.items():
            seen.clear()
            with pytest.raises(RetryableError, match="S3 is failing"):
                call()
            assert len(seen) == 4, (what, seen)


def test_download_cut_off_mid_stream_is_retryable(tmp_path: Path) -> None:
    with _serve(_Truncating) as (url, seen):
        store = _store(url, "farm-bucket", prefix="p")

        t0 = time.monotonic()
        with pytest.raises(RetryableError):
            store.get_bytes("jobs/j/x")
        assert time.monotonic() - t0 < RETRY_S

        seen.clear()
        t0 = time.monotonic()
        with pytest.raises(RetryableError, match="download kept failing"):
            store.get_file("jobs/j/x", tmp_path / "out.mp4")
        assert time.monotonic() - t0 < RETRY_S
        # s3transfer re-requested the broken stream before giving up.
        assert seen.count("GET") > 1, seen
        assert not (tmp_path / "out.mp4").exists()  # no half-written artifact left behind


def test_copying_to_a_users_path_from_s3(endpoint: str, bucket: str, tmp_path: Path) -> None:
    """`farm fetch` and `submit --output` on S3: folders are made, a full device is one
    error and stays a device (a download's temp-file rename would have replaced it)."""
    from farm.errors import InvalidInput
    from farm.stores import write_user_file

    store = _store(endpoint, bucket)
    store.put_bytes("jobs/j/final.mp4", b"v" * 300_000)
    dest = tmp_path / "new" / "dir" / "x.mp4"
    write_user_file(dest, lambda p: store.get_file("jobs/j/final.mp4", p))
    assert dest.read_bytes() == b"v" * 300_000
    if Path("/dev/full").exists():
        with pytest.raises(InvalidInput, match="cannot write /dev/full: No space left"):
            write_user_file(Path("/dev/full"), lambda p: store.get_file("jobs/j/final.mp4", p))
        assert Path("/dev/full").is_char_device()
        assert not list(Path("/dev").glob("full.*"))


# --- open_store --------------------------------------------------------------------


def test_open_store_builds_s3_store(endpoint: str, bucket: str) -> None:
    from farm.stores import S3Store

    store = open_store(
        Settings(
            store_url=f"s3://{bucket}/jobs-root/v1/",
            s3_endpoint_url=endpoint,
            s3_region="us-east-1",
            presign_seconds=123,
        )
    )
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.presign_seconds) == (bucket, "jobs-root/v1", 123)
    # And it talks to the endpoint it was given.
    store.put_bytes("k", b"v")
    assert _listed(endpoint, bucket) == {"jobs-root/v1/k"}

    bare = open_store(Settings(store_url=f"s3://{bucket}", s3_endpoint_url=endpoint))
    assert isinstance(bare, S3Store)
    assert (bare.bucket, bare.prefix) == (bucket, "")


@pytest.mark.parametrize("url", ["s3://", "s3:///only/a/path"])
def test_open_store_without_bucket_is_invalid(url: str) -> None:
    with pytest.raises(InvalidInput, match="bucket"):
        open_store(Settings(store_url=url))


# --- the nightly inbox -------------------------------------------------------------


def _inbox_settings(endpoint_url: str) -> Settings:
    return Settings(s3_endpoint_url=endpoint_url, s3_region="us-east-1")


def test_nightly_copies_an_s3_inbox_through_the_store(
    endpoint: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from farm import nightly

    monkeypatch.setattr(nightly, "MAX_INBOX_FILE_BYTES", 100)
    raw = _raw_client(endpoint)
    objects = {
        "inbox/night.csv": b"script,output\nscripts/one.txt,one.mp4\n",
        "inbox/loose.txt": b"Hello there.",
        "inbox/scripts/one.txt": b"One script.",
        "inbox/dir/": b"",  # a console's folder marker
        "inbox/huge.txt": b"x" * 101,  # over the limit: left in the bucket
        "inbox2/other.txt": b"not this inbox",
        "elsewhere.txt": b"not this inbox",
    }
    for key, body in objects.items():
        raw.put_object(Bucket=bucket, Key=key, Body=body)

    dest = tmp_path / "copy"
    dest.mkdir()
    count = nightly.download_s3(_inbox_settings(endpoint), f"s3://{bucket}/inbox/", dest)

    copied = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert copied == {"night.csv", "loose.txt", "scripts/one.txt"}
    assert count == 3
    assert (dest / "scripts" / "one.txt").read_bytes() == b"One script."

    # And the scan of that copy, as the nightly run does it.
    with nightly.local_inbox(_inbox_settings(endpoint), f"s3://{bucket}/inbox") as root:
        rows, problems = nightly.scan(root)
    assert problems == []
    assert sorted(r.values.get("script") or r.where for r in rows) == [
        "loose.txt",
        "scripts/one.txt",
    ]


def test_nightly_stops_at_the_inbox_file_limit(
    endpoint: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from farm import nightly

    monkeypatch.setattr(nightly, "MAX_INBOX_FILES", 2)
    for i in range(4):
        _raw_client(endpoint).put_object(Bucket=bucket, Key=f"in/{i}.txt", Body=b"x")
    nightly.download_s3(_inbox_settings(endpoint), f"s3://{bucket}/in", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.txt", "1.txt"]


def test_nightly_inbox_in_a_missing_bucket_is_permanent(endpoint: str, tmp_path: Path) -> None:
    from farm import nightly

    inbox = f"s3://farm-absent-{uuid.uuid4().hex[:8]}/inbox"
    t0 = time.monotonic()
    with pytest.raises(PermanentError, match=f"cannot list the nightly inbox {inbox}: ") as err:
        nightly.download_s3(_inbox_settings(endpoint), inbox, tmp_path)
    assert time.monotonic() - t0 < FAST_S
    assert "does not exist" in str(err.value)
    assert not isinstance(err.value, NotFound)


def test_nightly_inbox_outages_are_retryable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from farm import nightly

    _no_backoff(monkeypatch)
    refused = f"http://{HOST}:{_free_port()}"
    with pytest.raises(RetryableError, match="cannot list the nightly inbox s3://b/in: .*unreach"):
        nightly.download_s3(_inbox_settings(refused), "s3://b/in", tmp_path)
    with _serve(_Unavailable) as (url, seen):
        with pytest.raises(RetryableError, match="cannot list the nightly inbox s3://b/in: S3 is"):
            nightly.download_s3(_inbox_settings(url), "s3://b/in", tmp_path)
        assert len(seen) == 4, seen  # botocore's retries, then the store's sorting
