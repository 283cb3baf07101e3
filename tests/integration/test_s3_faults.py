"""The S3 endpoint fails under running jobs, for real: `farm worker` processes talk to a
moto S3 server through a fault-injecting proxy on loopback (tests/faultproxy.py).

A transient outage (503 for every request, an endpoint that accepts connections and
never answers, refused connections) is switched on while the job's chunks upload,
and again while mux downloads them; the job must ride both out and publish a whole
video. A permanent fault (the bucket deleted, a worker with the wrong secret key)
must fail the job at once, with that reason in `farm status`, not after retries.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from threading import Event

import pytest
import sqlalchemy as sa

from farm import migrate
from farm.errors import NotFound, PermanentError
from tests.conftest import need_service
from tests.faultproxy import FaultProxy
from tests.probe import probe
from tests.services import (
    Workers,
    aws_test_env,
    farm_argv,
    free_port,
    fresh_redis_db,
    moto_s3,
    redis_up,
    scheduling_env,
    submit_script,
)

pytestmark = pytest.mark.integration

SCRIPT = (
    b"The store goes away in the middle of this job. The workers wait for it, "
    b"try again, and finish the video anyway."
)
# Longer than botocore's own retries of one call (rand * (1 + 2 + 4) s at most), so the
# outage reaches the task-level retry; short enough to keep each case near a minute.
OUTAGE_S = 12
# What the proxy counts for each outage (tests/faultproxy.py): refused connects never
# reach it, but the connections open at the switch are reset.
DEALT = {"503": "503", "hang": "hang", "refuse": "reset"}
# A permanent fault must end the job within this many seconds of a worker seeing it.
PERMANENT_S = 60


def _chunk_request(methods: str, bucket: str) -> bytes:
    """The request line of a chunk's upload (PUT, by render) or download (HEAD, GET,
    by mux), as the proxy sees it."""
    return rf"({methods}) /{bucket}/jobs/[0-9a-f]+/chunks/\d{{5}}\.mp4".encode()


def _base_env(postgres_url: str, tmp_path: Path, endpoint: str, bucket: str) -> dict[str, str]:
    env = scheduling_env(
        tmp_path,
        fresh_redis_db(8),
        postgres_url,
        FARM_STORE_URL=f"s3://{bucket}",
        FARM_S3_ENDPOINT_URL=endpoint,
        FARM_S3_REGION="us-east-1",
        FARM_NULL_FRAME_MS="40",
        PYTHONUNBUFFERED="1",  # `farm submit` prints the job id before it waits
        **aws_test_env(),
    )
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(name, None)
    return env


def _moto_installed() -> bool:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def services(postgres_url: str) -> Iterator[str]:
    need_service(redis_up(), "Redis at 127.0.0.1:6379")
    need_service(_moto_installed(), "moto[server]")
    migrate.upgrade(postgres_url)
    yield postgres_url
    fresh_redis_db(8)


@pytest.fixture
def bucket() -> str:
    # moto keeps buckets in the test process from one server to the next: a fresh name.
    return f"farm-faults-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def through_proxy(
    services: str, bucket: str, tmp_path: Path
) -> Iterator[tuple[dict[str, str], str, FaultProxy]]:
    """(env, moto's own URL, the proxy in front of it that workers and CLI use)."""
    with moto_s3(bucket) as endpoint, FaultProxy(endpoint) as proxy:
        yield _base_env(services, tmp_path, proxy.url, bucket), endpoint, proxy


def _s3(endpoint: str, key_id: str = "test", secret: str = "test"):
    """A plain boto3 client straight to moto, behind the proxy's and farm's back."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def _submit(env: dict[str, str]) -> subprocess.Popen:
    return submit_script(env, SCRIPT, "--chunk-frames", "15", "--seed", "7", "--wait")


def _job_id(proc: subprocess.Popen) -> str:
    """The first line `farm submit` prints, once the job is queued."""
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line:
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"farm submit printed no job id: {err.decode()}")
    return line


def _until(event: Event, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not event.wait(0.2):
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the job ended before {what}: {err.decode()}")
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"


def _job(url: str, job_id: str) -> sa.Row:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT state, error, frame_count, chunks_total FROM jobs WHERE id = :j"),
            {"j": job_id},
        ).one()
    engine.dispose()
    return row


def _retry_lines(logs: Path) -> list[str]:
    """Celery's log lines for task-level retries ("Task farm.mux[id] retry: ...")."""
    return [
        line
        for log in logs.glob("*.log")
        for line in log.read_text(errors="replace").splitlines()
        if re.search(r"Task farm\.\w+\[[^\]]+\] retry: ", line)
    ]


def _retried(logs: Path, task: str) -> bool:
    return any(f"Task {task}[" in line for line in _retry_lines(logs))


def _workers(env: dict[str, str], logs: Path, **extra_env: str) -> Workers:
    """A cpu worker and a render worker, two processes each; not yet ready."""
    logs.mkdir(exist_ok=True)
    workers = Workers(env, logs)
    workers.start("cpu", "cpu", concurrency=2, **extra_env)
    workers.start("render", "render", concurrency=2, **extra_env)
    return workers


def _status(env: dict[str, str], job_id: str) -> str:
    proc = subprocess.run(farm_argv("status", job_id), env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


# --- transient outages: the job rides them out --------------------------------------


@pytest.mark.parametrize("mode", ["503", "hang", "refuse"])
def test_job_finishes_through_s3_outages(
    through_proxy, bucket: str, tmp_path: Path, mode: str
) -> None:
    env, endpoint, proxy = through_proxy
    logs = tmp_path / "logs"
    workers = _workers(env, logs)
    try:
        workers.wait_ready()
        # The first outage starts with the first chunk upload, the second with mux's
        # first chunk download: both directions meet it, mid-job.
        uploading = proxy.arm(_chunk_request("PUT", bucket), mode)
        proc = _submit(env)
        _until(uploading, proc, "chunk upload")
        time.sleep(OUTAGE_S)
        during_render = Counter(proxy.faults)
        # Armed before the uploads can go through, so before mux can start.
        downloading = proxy.arm(_chunk_request("HEAD|GET", bucket), mode)
        proxy.set_mode("pass")
        _until(downloading, proc, "chunk download by mux")
        time.sleep(OUTAGE_S)
        during_mux = Counter(proxy.faults) - during_render
        proxy.set_mode("pass")
        out, err = proc.communicate(timeout=240)
    finally:
        workers.stop()

    assert proc.returncode == 0, err.decode() + "\n".join(_retry_lines(logs))
    job_id = out.decode().split()[0]
    # The outage really hit each phase: the proxy failed requests in both windows.
    assert during_render[DEALT[mode]] > 0, during_render
    assert during_mux[DEALT[mode]] > 0, during_mux
    if mode != "hang":
        # Longer than botocore's own retries: the tasks themselves backed off and
        # retried, in both stages. (A hung request outlasts a 12 s outage inside
        # botocore: its read timeout fires after the endpoint is back.)
        assert _retried(logs, "farm.render") and _retried(logs, "farm.mux"), _retry_lines(logs)
        reason = "S3 is failing" if mode == "503" else "S3 endpoint unreachable"
        assert any(reason in line for line in _retry_lines(logs)), _retry_lines(logs)

    job = _job(env["FARM_DATABASE_URL"], job_id)
    assert (job.state, job.error) == ("succeeded", None)
    local = tmp_path / "final.mp4"
    _s3(endpoint).download_file(bucket, f"jobs/{job_id}/final.mp4", str(local))
    p = probe(local)
    assert (p.video_codec, p.audio_codec, p.width, p.height) == ("h264", "aac", 64, 64)
    assert job.chunks_total > 2
    assert p.frame_count == job.frame_count > 0


# --- permanent faults: the job fails at once, saying why -----------------------------


def test_missing_bucket_fails_the_job_at_once(through_proxy, bucket: str, tmp_path: Path) -> None:
    env, endpoint, _ = through_proxy
    logs = tmp_path / "logs"
    # Submitted while the bucket exists (submit checks it), then the bucket is deleted
    # before any worker takes the job.
    proc = _submit(env)
    job_id = _job_id(proc)
    s3 = _s3(endpoint)
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0  # nothing to lose
    s3.delete_bucket(Bucket=bucket)
    workers = _workers(env, logs)
    try:
        workers.wait_ready()
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=PERMANENT_S * 3)
        elapsed = time.monotonic() - t0
    finally:
        workers.stop()

    assert proc.returncode == 1, err.decode()
    assert f"the S3 bucket '{bucket}' does not exist" in err.decode()
    assert elapsed < PERMANENT_S, elapsed
    assert not _retry_lines(logs), _retry_lines(logs)  # failed at once, not retried
    status = _status(env, job_id)
    assert re.search(r"^state\s+failed", status, re.M), status
    assert re.search(rf"^error\s+tts: the S3 bucket '{bucket}' does not exist", status, re.M)


@contextmanager
def _moto_with_auth(log: Path) -> Iterator[str]:
    """A moto server process that checks every request's signature against IAM.

    moto reads INITIAL_NO_AUTH_ACTION_COUNT once, at import, for the whole process: it
    cannot be turned on for the in-process server, hence a process of its own. Its
    request log goes to a file: a pipe nobody reads would fill up and stall it."""
    port = free_port()
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env={**os.environ, **aws_test_env(), "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
                try:
                    with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1):
                        break
                except OSError:
                    assert time.monotonic() < deadline, "moto did not start within 60 s"
                    time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _auth_free_requests(url: str, count: float) -> None:
    # moto's admin endpoint, outside AWS auth; a text body, which moto reads raw.
    req = urllib.request.Request(
        f"{url}/moto-api/reset-auth",
        data=str(count).encode(),
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        json.load(resp)


def _iam_user(url: str, bucket: str) -> tuple[str, str]:
    """(key id, secret) of a user allowed s3:*, and the bucket; made with auth off."""
    import boto3

    _auth_free_requests(url, float("inf"))
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        iam.create_user(UserName="farm")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="farm", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="farm")["AccessKey"]
        _s3(url).create_bucket(Bucket=bucket)
    finally:
        _auth_free_requests(url, 0)
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="module")
def auth_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str, str]]:
    """(URL, bucket, key id, secret) on a moto server that enforces authentication."""
    need_service(_moto_installed(), "moto[server]")
    bucket = f"farm-auth-{uuid.uuid4().hex[:8]}"
    with _moto_with_auth(tmp_path_factory.mktemp("moto-auth") / "moto.log") as url:
        yield (url, bucket, *_iam_user(url, bucket))


def _use_credentials(mp: pytest.MonkeyPatch, key_id: str, secret: str) -> None:
    """For an S3Store in this process: boto3's usual chain, read afresh."""
    import boto3

    for name, value in aws_test_env(key_id, secret).items():
        mp.setenv(name, value)
    mp.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the credentials it found


def test_wrong_secret_on_the_workers_fails_the_job_at_once(
    services: str, auth_s3: tuple[str, str, str, str], tmp_path: Path
) -> None:
    url, bucket, key_id, secret = auth_s3
    env = {**_base_env(services, tmp_path, url, bucket), **aws_test_env(key_id, secret)}
    # The workers were deployed with a stale secret; the CLI's is right, so the submit
    # goes through and the workers are the first to meet the refusal.
    logs = tmp_path / "logs"
    workers = _workers(env, logs, AWS_SECRET_ACCESS_KEY=secret[::-1])
    try:
        workers.wait_ready()
        t0 = time.monotonic()
        proc = _submit(env)
        out, err = proc.communicate(timeout=PERMANENT_S * 3)
        elapsed = time.monotonic() - t0
    finally:
        workers.stop()

    assert proc.returncode == 1, err.decode()
    assert "S3 refused the credentials (bad secret key)" in err.decode()
    assert elapsed < PERMANENT_S, elapsed
    assert not _retry_lines(logs), _retry_lines(logs)
    status = _status(env, out.decode().split()[0])
    assert re.search(r"^state\s+failed", status, re.M), status
    assert re.search(r"^error\s+tts: S3 refused the credentials \(bad secret key\)", status, re.M)


# --- downloads name the cause too ---------------------------------------------------
# A download starts with a HEAD, whose answer has no body: a bare 404 or 403. Sorted
# as they come, a deleted bucket would read "artifact missing" and a bad secret
# "S3 error 403"; the store asks the bucket why.


def test_downloads_from_a_deleted_bucket_say_so(
    services: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from farm.stores import S3Store

    _use_credentials(monkeypatch, "test", "test")
    with moto_s3(bucket) as endpoint:
        store = S3Store(bucket, endpoint_url=endpoint, region="us-east-1")
        store.put_bytes("jobs/j/chunks/00000.mp4", b"x")
        # The control: with the bucket there, a missing key is just that.
        assert store.exists("jobs/j/chunks/00000.mp4")
        assert not store.exists("jobs/j/chunks/00001.mp4")
        with pytest.raises(NotFound):
            store.get_file("jobs/j/chunks/00001.mp4", tmp_path / "1.mp4")

        s3 = _s3(endpoint)
        s3.delete_object(Bucket=bucket, Key="jobs/j/chunks/00000.mp4")
        s3.delete_bucket(Bucket=bucket)
        for call in (
            lambda: store.get_file("jobs/j/chunks/00000.mp4", tmp_path / "0.mp4"),
            lambda: store.exists("jobs/j/chunks/00000.mp4"),
        ):
            with pytest.raises(PermanentError, match=f"bucket '{bucket}' does not exist") as err:
                call()
            assert not isinstance(err.value, NotFound)


def test_downloads_with_a_wrong_secret_say_so(
    auth_s3: tuple[str, str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from farm.stores import S3Store

    url, bucket, key_id, secret = auth_s3
    _use_credentials(monkeypatch, key_id, secret)
    S3Store(bucket, endpoint_url=url, region="us-east-1").put_bytes("jobs/j/final.mp4", b"x")

    _use_credentials(monkeypatch, key_id, secret[::-1])
    store = S3Store(bucket, endpoint_url=url, region="us-east-1")
    for call in (
        lambda: store.get_file("jobs/j/final.mp4", tmp_path / "final.mp4"),
        lambda: store.exists("jobs/j/final.mp4"),
    ):
        with pytest.raises(PermanentError, match=r"credentials \(bad secret key\)"):
            call()
