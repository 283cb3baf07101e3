"""The artifact store package on the local disk: LocalStore.list and size, the key
namespace, open_store, and that a local store never loads boto3. S3Store's own tests
run against moto in tests/integration/test_s3_store.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from farm.config import Settings
from farm.errors import InvalidInput, NotFound
from farm.stores import LocalStore, S3Store, Store, chunk_key, job_key, open_store


def _filled(root: Path, keys: list[str]) -> LocalStore:
    store = LocalStore(root)
    for key in keys:
        store.put_bytes(key, key.encode())
    return store


def test_list_of_an_empty_or_absent_store_is_empty(tmp_path: Path) -> None:
    assert LocalStore(tmp_path / "never-made").list("") == []
    store = LocalStore(tmp_path / "store")
    store.check()  # the root exists now, with nothing in it
    assert store.list("") == []
    assert store.list("jobs") == []
    assert store.list("jobs/none/") == []


def test_list_gives_nested_keys_sorted(tmp_path: Path) -> None:
    keys = [
        chunk_key("j1", 10),
        job_key("j1", "plan.json"),
        chunk_key("j1", 2),
        "avatars/demo/photo.png",
        job_key("j2", "deep", "er", "still", "final.mp4"),
        "top",
    ]
    store = _filled(tmp_path, keys)

    assert store.list("") == sorted(keys)
    assert store.list("jobs/j1") == [
        "jobs/j1/chunks/00002.mp4",
        "jobs/j1/chunks/00010.mp4",
        "jobs/j1/plan.json",
    ]
    assert store.list("jobs/j1/chunks/") == store.list("jobs/j1/chunks")  # trailing slash
    assert store.list("jobs/j2") == ["jobs/j2/deep/er/still/final.mp4"]
    assert store.list("avatars") == ["avatars/demo/photo.png"]


def test_list_takes_whole_segments_and_a_key_lists_itself(tmp_path: Path) -> None:
    store = _filled(tmp_path, ["jobs/abc/plan.json", "jobs/abcd", "jobs/abc2/plan.json"])
    assert store.list("jobs/abc") == ["jobs/abc/plan.json"]
    assert store.list("jobs/ab") == []  # a prefix of a name is not a folder
    assert store.list("jobs/abcd") == ["jobs/abcd"]  # as delete_prefix takes one object
    assert store.list("jobs/abc/plan.json/x") == []


def test_list_keys_round_trip_through_the_other_verbs(tmp_path: Path) -> None:
    keys = ["jobs/j/a b.txt", "jobs/j/ünï/cødé", "jobs/j/.hidden"]
    store = _filled(tmp_path, keys)
    listed = store.list("jobs/j")
    assert listed == sorted(keys)
    assert [store.get_bytes(k) for k in listed] == [k.encode() for k in listed]


def test_list_leaves_out_writes_in_progress(tmp_path: Path) -> None:
    store = _filled(tmp_path, ["jobs/j/plan.json"])
    (tmp_path / "jobs" / "j" / ".tmp-abc123").write_bytes(b"half an artifact")
    assert store.list("") == ["jobs/j/plan.json"]


def test_list_follows_no_folder_link_out_of_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"x")
    store = _filled(tmp_path / "store", ["jobs/j/plan.json"])
    os.symlink(outside, tmp_path / "store" / "jobs" / "link")
    assert store.list("") == ["jobs/j/plan.json"]


@pytest.mark.parametrize("prefix", ["/abs", "../up", "jobs/../..", "a//b", "nul\0"])
def test_list_refuses_a_prefix_that_is_no_key(tmp_path: Path, prefix: str) -> None:
    with pytest.raises(InvalidInput, match="invalid artifact key"):
        LocalStore(tmp_path).list(prefix)


def test_size(tmp_path: Path) -> None:
    store = _filled(tmp_path, [])
    store.put_bytes("jobs/j/x", b"12345")
    assert store.size("jobs/j/x") == 5
    with pytest.raises(NotFound, match="jobs/j/y"):
        store.size("jobs/j/y")
    with pytest.raises(NotFound):
        store.size("jobs/j")  # a folder is not an artifact


def test_delete_prefix_still_refuses_the_whole_store(tmp_path: Path) -> None:
    # list("") is the whole store; delete_prefix("") must not be.
    store = _filled(tmp_path, ["jobs/j/x"])
    for prefix in ("", "/"):
        with pytest.raises(InvalidInput):
            store.delete_prefix(prefix)
    assert store.list("") == ["jobs/j/x"]


def test_open_store_gives_a_local_store(tmp_path: Path) -> None:
    store: Store = open_store(Settings(store_url=f"file://{tmp_path}/a"))
    assert isinstance(store, LocalStore) and store.root == tmp_path / "a"
    with pytest.raises(InvalidInput, match="unsupported"):
        open_store(Settings(store_url="ftp://host/x"))


def test_both_stores_have_every_verb_of_the_protocol() -> None:
    verbs = {n for n in vars(Store) if not n.startswith("_")} - {"mro"}
    assert "list" in verbs and "size" in verbs
    for cls in (LocalStore, S3Store):
        assert verbs <= set(vars(cls)), (cls, verbs - set(vars(cls)))


def test_a_local_store_never_loads_boto3(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import farm.cli, farm.stores\n"
        "from farm.config import Settings\n"
        f"s = farm.stores.open_store(Settings(store_url='file://{tmp_path}'))\n"
        "s.put_bytes('k', b'v'); assert s.list('') == ['k']\n"
        "print(','.join(m for m in ('boto3', 'botocore') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
