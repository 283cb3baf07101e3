"""Production mode against the real services of this machine: Redis as broker and
result backend, Postgres as the database, an S3 endpoint (moto, real HTTP on
loopback) as the only thing workers share, and separate `farm worker` processes:
one for the cpu queue and two render workers. Real TTS and the portrait renderer."""

from __future__ import annotations

import math
import subprocess
import urllib.request
from pathlib import Path

import boto3
import pytest
import sqlalchemy as sa

from tests.conftest import need_service
from tests.probe import probe
from tests.services import Workers, farm_argv, fresh_redis_db, moto_s3, redis_up

BUCKET = "farm-it"


@pytest.fixture
def production(postgres_url, tmp_path, monkeypatch):
    need_service(redis_up(), "Redis at 127.0.0.1:6379")
    with moto_s3(BUCKET) as endpoint:
        env = {
            "FARM_HOME": str(tmp_path / "home"),
            "FARM_BROKER_URL": fresh_redis_db(11),
            "FARM_DATABASE_URL": postgres_url,
            "FARM_STORE_URL": f"s3://{BUCKET}/artifacts",
            "FARM_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        import os

        full_env = {**os.environ}
        up = subprocess.run(farm_argv("db", "upgrade"), env=full_env, capture_output=True)
        assert up.returncode == 0, up.stderr.decode()
        workers = Workers(full_env, tmp_path)
        try:
            yield full_env, workers, endpoint
        finally:
            workers.stop()


def _chunk_workers(url: str, job_id: str) -> list[str]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT worker FROM chunks WHERE job_id = :j AND state = 'done'"),
            {"j": job_id},
        ).all()
    engine.dispose()
    return [r[0] for r in rows]


def test_two_render_workers_share_a_job_through_s3(production, tmp_path):
    env, workers, endpoint = production
    workers.start("cpu", "cpu", concurrency=2)
    workers.start("render1", "render")
    workers.start("render2", "render")
    workers.wait_ready()

    proc = subprocess.run(
        farm_argv("submit", "-", "--chunk-frames", "15", "--size", "256", "--seed", "3", "--wait"),
        input=b"Two workers render this, chunk by chunk. Both of them should get some.",
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    job_id = proc.stdout.decode().split()[0]
    url = proc.stdout.decode().split()[-1]
    assert url.startswith(f"{endpoint}/{BUCKET}/artifacts/jobs/{job_id}/final.mp4?")

    done_by = _chunk_workers(env["FARM_DATABASE_URL"], job_id)
    assert {w.split("@")[0] for w in done_by} == {"render1", "render2"}

    local = tmp_path / "from-bucket.mp4"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.download_file(BUCKET, f"artifacts/jobs/{job_id}/final.mp4", str(local))
    p = probe(local)
    assert p.video_codec == "h264" and p.audio_codec == "aac"
    assert (p.width, p.height) == (256, 256)
    assert abs(p.frame_count - math.ceil(p.audio_seconds * 25)) <= 1
    assert len(done_by) == math.ceil(p.frame_count / 15)

    # `farm status` shows a presigned URL that fetches the same bytes.
    status = subprocess.run(farm_argv("status", job_id), env=env, capture_output=True)
    line = next(ln for ln in status.stdout.decode().splitlines() if ln.startswith("output"))
    presigned = line.split()[-1]
    with urllib.request.urlopen(presigned, timeout=10) as resp:
        assert resp.read() == local.read_bytes()
    # Artifacts lived in the bucket, not on a local disk the workers happen to share.
    assert not (Path(env["FARM_HOME"]) / "artifacts").exists()
