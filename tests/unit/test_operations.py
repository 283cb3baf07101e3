import pytest

from farm.config import Settings, mask_url
from farm.errors import InvalidInput
from farm.gpus import gpu_worker_env, select_gpus


def test_all_gpus_or_a_checked_list():
    assert select_gpus("all", ["0", "1"]) == ["0", "1"]
    assert select_gpus("1", ["0", "1"]) == ["1"]
    with pytest.raises(InvalidInput, match="no NVIDIA GPU is visible"):
        select_gpus("all", [])
    with pytest.raises(InvalidInput, match="GPU 3 is not visible"):
        select_gpus("0,3", ["0", "1"])


def test_each_gpu_worker_is_pinned_to_its_gpu():
    env = gpu_worker_env("3")
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["FARM_DEVICE"] == "cuda"


@pytest.mark.parametrize(
    "url, shown",
    [
        (
            "postgresql+psycopg://farm:s3cr3t@db:5432/farm",
            "postgresql+psycopg://farm:***@db:5432/farm",
        ),
        ("redis://:pw@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
    ],
)
def test_passwords_in_urls_are_masked(url, shown):
    assert mask_url(url) == shown


def test_describe_shows_effective_urls_without_secrets(tmp_path):
    s = Settings(home=tmp_path, database_url="postgresql://u:topsecret@h/db")
    shown = s.describe()
    assert "topsecret" not in " ".join(shown.values())
    assert shown["store_url"] == f"file://{tmp_path / 'artifacts'}"
    assert shown["broker_url"].startswith("redis+socket://")


def test_gpu_worker_names_one_or_more_processes_per_gpu():
    from farm.gpus import gpu_worker_names

    assert gpu_worker_names("render", ["0", "1"], 1) == {
        "render-gpu0@%h": "0",
        "render-gpu1@%h": "1",
    }
    assert gpu_worker_names("render", ["1"], 3) == {
        "render-gpu1-0@%h": "1",
        "render-gpu1-1@%h": "1",
        "render-gpu1-2@%h": "1",
    }
