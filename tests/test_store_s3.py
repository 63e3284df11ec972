"""The `s3` store against a real S3 server: `rclone serve s3` (tests/servers_storage.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from pydantic import SecretStr

import sinks.stores.s3 as s3mod
from router import block_digests
from router.block_digests import BlockDigester
from router.config import ComponentConfig
from router.delivery import DeliveryResult, PermanentError, StagedFile, TransientError
from sinks.registry import KNOWN_UNAVAILABLE, check_component, create_sink
from sinks.stores.files import FileChanged, verified_digests
from sinks.stores.s3 import MiB, S3Store, S3StoreSettings
from tests.servers_storage import (
    MotoS3,
    RcloneS3,
    flip_last_byte,
    make_item,
    moto_s3,
    rclone_s3,
    rclone_s3_private,
    undeliverable_items,
    write_file,
    write_settled,
)

__all__ = ["moto_s3", "rclone_s3", "rclone_s3_private"]  # fixtures used by this module

PART = 5 * MiB


def store_for(server: RcloneS3, **overrides: Any) -> S3Store:
    defaults: dict[str, Any] = {
        "multipart_threshold": PART,
        "part_size": PART,
        "max_concurrency": 4,
    }
    defaults.update(overrides)
    return S3Store("test.artifact_store", S3StoreSettings(**server.settings(**defaults)))


@pytest.fixture
async def s3_client(rclone_s3: RcloneS3) -> AsyncIterator[Any]:
    """A plain aiobotocore client, to look at what the sink stored."""
    async with client_for(rclone_s3) as client:
        yield client


def client_for(server: RcloneS3) -> Any:
    return get_session().create_client(
        "s3",
        endpoint_url=server.url,
        region_name="us-east-1",
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=AioConfig(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


@pytest.fixture
async def store(rclone_s3: RcloneS3) -> AsyncIterator[S3Store]:
    sink = store_for(rclone_s3)
    yield sink
    await sink.close()


async def remote_sha256(client: Any, bucket: str, key: str) -> str:
    response = await client.get_object(Bucket=bucket, Key=key)
    digest = hashlib.sha256()
    body = response["Body"]  # not `async with`: some aiobotocore releases yield aiohttp's
    try:
        async for chunk in body.iter_chunks(MiB):
            digest.update(chunk)
    finally:
        body.close()
    return digest.hexdigest()


async def pending_uploads(client: Any, bucket: str) -> list[dict[str, Any]]:
    """In-progress multipart uploads (rclone answers NoSuchUpload when it has none)."""
    from botocore.exceptions import ClientError

    try:
        page = await client.list_multipart_uploads(Bucket=bucket)
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "NoSuchUpload":
            return []
        raise
    uploads: list[dict[str, Any]] = page.get("Uploads") or []
    return uploads


def spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count calls of one of S3Store's upload paths (the real method still runs)."""
    calls: list[int] = []
    original = getattr(S3Store, name)

    async def wrapper(self: S3Store, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(S3Store, name, wrapper)
    return calls


# -- round trips --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "multipart"),
    [
        (0, False),
        (1234, False),
        (PART - 1, False),
        (PART, True),
        (PART + 1, True),
        (3 * PART + 12345, True),
    ],
    ids=["empty", "small", "just-under", "at-threshold", "just-over", "four-parts"],
)
async def test_round_trip_single_and_multipart(
    size: int,
    multipart: bool,
    tmp_path: Path,
    store: S3Store,
    s3_client: Any,
    rclone_s3: RcloneS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    singles, multis = spy(monkeypatch, "_put_single"), spy(monkeypatch, "_put_multipart")
    staged = write_file(tmp_path / "model.bin", size, seed=size)
    target = f"sizes/{size}"

    result = await store.deliver(make_item(staged, target=target))

    key = f"{target}/model.bin"
    assert result.uri == f"s3://{rclone_s3.bucket}/{key}"
    assert not result.skipped
    [obj] = result.objects
    assert (obj.size, obj.sha256) == (size, staged.sha256)
    assert (len(singles), len(multis)) == ((0, 1) if multipart else (1, 0))
    head = await s3_client.head_object(Bucket=rclone_s3.bucket, Key=key)
    assert head["ContentLength"] == size
    assert head["Metadata"]["sha256"] == staged.sha256
    assert await remote_sha256(s3_client, rclone_s3.bucket, key) == staged.sha256
    assert await pending_uploads(s3_client, rclone_s3.bucket) == []


async def test_prefix_and_several_files(
    tmp_path: Path, rclone_s3: RcloneS3, s3_client: Any
) -> None:
    sink = store_for(rclone_s3, prefix="/team-a/")
    a = write_file(tmp_path / "model.pkl", 100, seed=1)
    b = write_file(tmp_path / "config.json", 200, seed=2)
    try:
        result = await sink.deliver(make_item(a, b, target="multi/run-1/{file}"))
    finally:
        await sink.close()
    assert [o.uri for o in result.objects] == [
        f"s3://{rclone_s3.bucket}/team-a/multi/run-1/model.pkl",
        f"s3://{rclone_s3.bucket}/team-a/multi/run-1/config.json",
    ]
    assert result.uri == f"s3://{rclone_s3.bucket}/team-a/multi/run-1"
    for staged in (a, b):
        key = f"team-a/multi/run-1/{staged.name}"
        assert await remote_sha256(s3_client, rclone_s3.bucket, key) == staged.sha256


async def test_sse_and_storage_class_are_sent(tmp_path: Path, rclone_s3: RcloneS3) -> None:
    sink = store_for(rclone_s3, sse="AES256", storage_class="STANDARD")
    staged = write_file(tmp_path / "m.bin", 2 * PART, seed=7)
    try:
        result = await sink.deliver(make_item(staged, target="sse"))
    finally:
        await sink.close()
    assert result.objects[0].sha256 == staged.sha256


# -- idempotency and conflicts ------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 2 * PART + 1], ids=["single", "multipart"])
async def test_replay_is_a_no_op(
    size: int, tmp_path: Path, store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged = write_file(tmp_path / "model.bin", size, seed=3)
    item = make_item(staged, target=f"replay/{size}")
    first = await store.deliver(item)
    puts = spy(monkeypatch, "_put_single"), spy(monkeypatch, "_put_multipart")

    again = await store.deliver(item)

    assert again.skipped
    assert again.objects[0].uri == first.objects[0].uri
    assert again.objects[0].version_id == "unchanged"
    assert puts == ([], [])


async def test_conflict_fails_permanently_naming_both_checksums(
    tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3
) -> None:
    old = write_file(tmp_path / "a" / "model.bin", 1000, seed=1)
    new = write_file(tmp_path / "b" / "model.bin", 1000, seed=2)
    await store.deliver(make_item(old, target="conflict"))

    with pytest.raises(PermanentError) as err:
        await store.deliver(make_item(new, target="conflict"))

    message = str(err.value)
    assert f"s3://{rclone_s3.bucket}/conflict/model.bin" in message
    assert old.sha256 in message and new.sha256 in message
    assert "on_conflict" in message
    key = "conflict/model.bin"
    assert await remote_sha256(s3_client, rclone_s3.bucket, key) == old.sha256


async def test_a_partial_object_left_by_our_own_cut_off_attempt_is_replaced(
    tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3
) -> None:
    """Servers like rclone can expose a torn object when stopped mid-PUT (AWS never
    does): no sha256 metadata, and the file's first bytes. Found while retrying our own
    delivery, it is our partial write; on a first attempt it is foreign."""
    staged = write_file(tmp_path / "model.bin", 1000, seed=3)
    key = "torn/model.bin"
    assert staged.path is not None
    await s3_client.put_object(
        Bucket=rclone_s3.bucket, Key=key, Body=staged.path.read_bytes()[:300])
    with pytest.raises(PermanentError, match="conflict"):
        await store.deliver(make_item(staged, target="torn"))
    retry = make_item(staged, target="torn").model_copy(update={"attempt": 2})
    await store.deliver(retry)
    assert await remote_sha256(s3_client, rclone_s3.bucket, key) == staged.sha256


@pytest.mark.parametrize(
    "body", [b"someone else's model" * 100, b"short", "longer"],
    ids=["foreign-same-size-class", "not-a-prefix", "longer-than-the-file"],
)
async def test_a_retry_never_replaces_an_object_that_is_not_its_own_partial_write(
    body: bytes | str, tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3
) -> None:
    """A foreign object (no sha256 metadata) at the key after a transient first attempt:
    unless it is shorter than the file and equal to its first bytes, it is a conflict,
    on a retry as on a first attempt, and it is left alone."""
    staged = write_file(tmp_path / "model.bin", 1000, seed=3)
    assert staged.path is not None
    if body == "longer":  # the file's bytes and then some: not a cut-off write of it
        body = staged.path.read_bytes() + b"more"
    assert isinstance(body, bytes)
    target = f"notours/{len(body)}"
    await s3_client.put_object(Bucket=rclone_s3.bucket, Key=f"{target}/model.bin", Body=body)
    retry = make_item(staged, target=target).model_copy(update={"attempt": 2})

    with pytest.raises(PermanentError, match="conflict"):
        await store.deliver(retry)

    assert await remote_sha256(s3_client, rclone_s3.bucket, f"{target}/model.bin") == (
        hashlib.sha256(body).hexdigest())


@pytest.mark.parametrize("size", [1000, PART + 10], ids=["single", "multipart"])
async def test_conflict_overwrite_replaces(
    size: int, tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3
) -> None:
    old = write_file(tmp_path / "a" / "model.bin", size, seed=1)
    new = write_file(tmp_path / "b" / "model.bin", size, seed=2)
    target = f"overwrite/{size}"
    await store.deliver(make_item(old, target=target, on_conflict="overwrite"))

    result = await store.deliver(make_item(new, target=target, on_conflict="overwrite"))

    assert not result.skipped
    key = f"{target}/model.bin"
    assert await remote_sha256(s3_client, rclone_s3.bucket, key) == new.sha256
    head = await s3_client.head_object(Bucket=rclone_s3.bucket, Key=key)
    assert head["Metadata"]["sha256"] == new.sha256


async def test_overwrite_puts_without_looking_first_and_a_retry_is_still_a_no_op(
    tmp_path: Path, store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """on_conflict: overwrite needs one request on a first attempt; a retry (which may
    follow a PUT that landed before a crash) looks first, and finds nothing to do."""
    staged = write_file(tmp_path / "model.bin", 1000, seed=5)
    heads, puts = spy(monkeypatch, "_head"), spy(monkeypatch, "_put_single")
    await store.deliver(make_item(staged, target="blind", on_conflict="overwrite"))
    assert (heads, puts) == ([], [1])
    retry = make_item(staged, target="blind", on_conflict="overwrite").model_copy(
        update={"attempt": 2})
    again = await store.deliver(retry)
    assert again.skipped and heads == [1] and puts == [1]


async def test_conflict_version_keeps_both(
    tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3
) -> None:
    v1 = write_file(tmp_path / "a" / "model.pkl", 1000, seed=1)
    v2 = write_file(tmp_path / "b" / "model.pkl", 1000, seed=2)
    r1 = await store.deliver(make_item(v1, target="ver", version="1", on_conflict="version"))
    r2 = await store.deliver(make_item(v2, target="ver", version="2", on_conflict="version"))
    replay = await store.deliver(make_item(v2, target="ver", version="2", on_conflict="version"))

    assert r1.uri == f"s3://{rclone_s3.bucket}/ver/model.v1.pkl"
    assert r2.uri == f"s3://{rclone_s3.bucket}/ver/model.v2.pkl"
    assert replay.skipped
    assert await remote_sha256(s3_client, rclone_s3.bucket, "ver/model.v1.pkl") == v1.sha256
    assert await remote_sha256(s3_client, rclone_s3.bucket, "ver/model.v2.pkl") == v2.sha256


async def test_object_without_sha256_metadata_is_compared_by_md5(
    tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3
) -> None:
    """Objects written by others (no sha256 metadata): same bytes is still a no-op."""
    staged = write_file(tmp_path / "model.bin", 3000, seed=9)
    other = write_file(tmp_path / "other.bin", 3000, seed=10)
    assert staged.path is not None and other.path is not None
    await s3_client.put_object(
        Bucket=rclone_s3.bucket, Key="foreign/model.bin", Body=staged.path.read_bytes()
    )
    await s3_client.put_object(
        Bucket=rclone_s3.bucket, Key="foreign2/model.bin", Body=other.path.read_bytes()
    )

    result = await store.deliver(make_item(staged, target="foreign"))
    assert result.skipped
    with pytest.raises(PermanentError, match="conflict"):
        await store.deliver(make_item(staged, target="foreign2"))


@pytest.mark.parametrize("size", [1000, 2 * PART + 1], ids=["single", "multipart"])
async def test_version_id_recorded_on_a_versioned_bucket(
    size: int, tmp_path: Path, moto_s3: MotoS3
) -> None:
    """rclone has no versioning, so this one runs against moto's S3."""
    bucket = f"versioned-{size}"
    sink = S3Store(
        "test.s3",
        S3StoreSettings(
            **moto_s3.settings(bucket_name=bucket, multipart_threshold=PART, part_size=PART)
        ),
    )
    v1 = write_file(tmp_path / "a" / "model.bin", size, seed=1)
    v2 = write_file(tmp_path / "b" / "model.bin", size, seed=2)
    try:
        client = await sink._get_client()
        await client.create_bucket(Bucket=bucket)
        await client.put_bucket_versioning(
            Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
        )
        first = await sink.deliver(make_item(v1, target="m"))
        replay = await sink.deliver(make_item(v1, target="m"))
        second = await sink.deliver(make_item(v2, target="m", on_conflict="overwrite"))
        versions = await client.list_object_versions(Bucket=bucket, Prefix="m/model.bin")
    finally:
        await sink.close()
    first_id, second_id = first.objects[0].version_id, second.objects[0].version_id
    assert first_id and second_id and first_id != second_id
    assert replay.skipped and replay.objects[0].version_id == first_id
    assert {v["VersionId"] for v in versions["Versions"]} == {first_id, second_id}


# -- conditional writes (If-None-Match) -----------------------------------------------


async def test_conditional_puts_on_a_server_that_honours_them(
    tmp_path: Path, moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto refuses a second If-None-Match: * put, like AWS S3: a new object costs one
    request, and replays, conflicts and overwrites still behave as with HEAD first."""
    bucket = "conditional"
    sink = S3Store("test.s3", S3StoreSettings(**moto_s3.settings(bucket_name=bucket)))
    old = write_file(tmp_path / "a" / "model.bin", 1000, seed=1)
    new = write_file(tmp_path / "b" / "model.bin", 1000, seed=2)
    try:
        client = await sink._get_client()
        await client.create_bucket(Bucket=bucket)
        heads = spy(monkeypatch, "_head")

        first = await sink.deliver(make_item(old, target="c"))
        assert heads == [], "a new object needs no HEAD where puts can be conditional"
        assert sink._conditional is True

        replay = await sink.deliver(make_item(old, target="c"))
        assert replay.skipped
        with pytest.raises(PermanentError, match="conflict") as err:
            await sink.deliver(make_item(new, target="c"))
        assert old.sha256 in str(err.value) and new.sha256 in str(err.value)
        assert await remote_sha256(client, bucket, "c/model.bin") == old.sha256

        replaced = await sink.deliver(make_item(new, target="c", on_conflict="overwrite"))
        assert not replaced.skipped
        assert await remote_sha256(client, bucket, "c/model.bin") == new.sha256
        listed = await client.list_objects_v2(Bucket=bucket)
        assert [o["Key"] for o in listed["Contents"]] == ["c/model.bin"], "probe left behind"
    finally:
        await sink.close()
    assert first.objects[0].sha256 == old.sha256


async def test_a_server_that_ignores_the_condition_gets_a_head_first(
    tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """rclone accepts If-None-Match and overwrites anyway: the probe notices, and the
    sink falls back to HEAD before PUT so that a conflict is still caught."""
    heads = spy(monkeypatch, "_head")
    old = write_file(tmp_path / "a" / "model.bin", 1000, seed=1)
    new = write_file(tmp_path / "b" / "model.bin", 1000, seed=2)
    await store.deliver(make_item(old, target="probe"))
    assert store._conditional is False
    assert heads == [1]
    with pytest.raises(PermanentError, match="conflict"):
        await store.deliver(make_item(new, target="probe"))
    assert await remote_sha256(s3_client, rclone_s3.bucket, "probe/model.bin") == old.sha256
    listed = await s3_client.list_objects_v2(Bucket=rclone_s3.bucket, Prefix=".artifact-router")
    assert not listed.get("Contents"), "probe objects are removed"


async def test_a_batch_lists_its_key_range_once_and_heads_only_the_taken_keys(
    tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the server ignores If-None-Match, one listing tells a batch which keys are
    free (a PUT each, no HEAD); taken keys get a HEAD and the usual verdict (a replay is
    a no-op, other bytes a conflict); every item has its own outcome."""
    files = [write_file(tmp_path / f"f{i}" / "model.bin", 1000, seed=i) for i in range(6)]
    await store.deliver(make_item(files[1], target="batch/r1"))  # delivered before: a replay
    await s3_client.put_object(Bucket=rclone_s3.bucket, Key="batch/r2/model.bin", Body=b"x")
    heads, listings = spy(monkeypatch, "_head"), spy(monkeypatch, "_free_keys")
    items = [make_item(f, target=f"batch/r{i}") for i, f in enumerate(files)]
    items.append(make_item(files[0], target="batch/bad", on_conflict="sometimes"))

    outcomes = await store.deliver_batch(items)

    assert listings == [1] and heads == [1, 1], "one listing; a HEAD for each taken key"
    assert isinstance(outcomes[1], DeliveryResult) and outcomes[1].skipped
    assert isinstance(outcomes[2], PermanentError) and "conflict" in str(outcomes[2])
    assert isinstance(outcomes[6], PermanentError) and "sometimes" in str(outcomes[6])
    for i in (0, 3, 4, 5):
        outcome = outcomes[i]
        assert isinstance(outcome, DeliveryResult) and not outcome.skipped
        key = f"batch/r{i}/model.bin"
        assert await remote_sha256(s3_client, rclone_s3.bucket, key) == files[i].sha256
    assert await remote_sha256(s3_client, rclone_s3.bucket, "batch/r2/model.bin") == (
        hashlib.sha256(b"x").hexdigest()
    ), "the conflicting object is left alone"


@pytest.mark.parametrize(("calls", "heads_expected"), [(1, 4), (2, 1)])
async def test_keys_past_what_the_listings_covered_are_looked_at_one_by_one(
    calls: int, heads_expected: int, tmp_path: Path, store: S3Store, s3_client: Any,
    rclone_s3: RcloneS3, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key range crowded with other objects: a page covers the keys up to the last
    one it shows, the next listing skips ahead past the crowd, and keys no listing
    covered (LIST_CALLS) get a HEAD each; a conflict among them is still caught."""
    monkeypatch.setattr(s3mod, "LIST_PAGE_KEYS", 2)
    monkeypatch.setattr(s3mod, "LIST_CALLS", calls)
    crowd = f"crowd{calls}"  # the server outlives the test
    for name in ("r0x", "r0y", "r0z"):  # sort between r0/model.bin and r1/model.bin
        await s3_client.put_object(Bucket=rclone_s3.bucket, Key=f"{crowd}/{name}", Body=b"o")
    await s3_client.put_object(Bucket=rclone_s3.bucket, Key=f"{crowd}/r4/model.bin", Body=b"x")
    files = [write_file(tmp_path / f"f{i}" / "model.bin", 500, seed=i) for i in range(5)]
    heads = spy(monkeypatch, "_head")

    outcomes = await store.deliver_batch(
        [make_item(f, target=f"{crowd}/r{i}") for i, f in enumerate(files)])

    # One page (r0x, r0y) covers only crowd/r0; a second one, from r1 on, all but the
    # taken crowd/r4.
    assert heads == [1] * heads_expected
    assert isinstance(outcomes[4], PermanentError) and "conflict" in str(outcomes[4])
    for i in range(4):
        key = f"{crowd}/r{i}/model.bin"
        assert await remote_sha256(s3_client, rclone_s3.bucket, key) == files[i].sha256


# -- one key, two writers at once ---------------------------------------------------


@pytest.mark.parametrize("listed", [False, True], ids=["heads", "listing"])
async def test_two_items_of_one_batch_aiming_at_one_key_never_both_win(
    listed: bool, tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3
) -> None:
    """rclone ignores If-None-Match: two different artifacts rendering to one key in one
    batch (found free by a HEAD each at once, or by one listing) must not both be
    stored: the second waits for the first's write and then sees a conflict. With the
    listing, a third item with a's content is a no-op (or a conflict if b won)."""
    base = f"dupkey-{listed}"
    a, b = (write_file(tmp_path / n / "model.bin", 1000, seed=i) for i, n in ((1, "a"), (2, "b")))
    items = [make_item(a, target=f"{base}/same"), make_item(b, target=f"{base}/same")]
    if listed:  # three keys or more to look at: one listing for the batch
        items.append(make_item(a, target=f"{base}/same"))
        items += [make_item(write_file(tmp_path / f"o{i}" / "model.bin", 700, seed=10 + i),
                            target=f"{base}/o{i}") for i in range(2)]

    outcomes = await store.deliver_batch(items)

    conflicts = [isinstance(o, PermanentError) and "conflict" in str(o) for o in outcomes]
    assert conflicts[:2] in ([False, True], [True, False]), outcomes  # whichever came first
    winner = a if conflicts[1] else b
    if listed:
        assert conflicts[2] == (winner is b), "a's content again: a no-op unless b won"
        assert not any(conflicts[3:])
    same = [o for o in outcomes[:3] if isinstance(o, DeliveryResult)]
    assert sum(not o.skipped for o in same) == 1, "one write; the rest are no-ops"
    key = f"{base}/same/model.bin"
    assert await remote_sha256(s3_client, rclone_s3.bucket, key) == winner.sha256


async def test_two_batches_at_once_with_one_key_never_both_win(
    tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3
) -> None:
    """Two batches list their key ranges before either writes (both find the shared key
    free); the listing of the one that writes second no longer vouches for that key."""
    files = [write_file(tmp_path / f"f{i}" / "model.bin", 800, seed=20 + i) for i in range(6)]
    first = [make_item(files[0], target="twob/same")] + [
        make_item(f, target=f"twob/a{i}") for i, f in enumerate(files[2:4])]
    second = [make_item(files[1], target="twob/same")] + [
        make_item(f, target=f"twob/b{i}") for i, f in enumerate(files[4:6])]

    out1, out2 = await asyncio.gather(store.deliver_batch(first), store.deliver_batch(second))

    shared = [out1[0], out2[0]]
    assert sum(isinstance(o, PermanentError) and "conflict" in str(o) for o in shared) == 1
    assert all(isinstance(o, DeliveryResult) for o in out1[1:] + out2[1:])
    winner = files[0] if isinstance(out1[0], DeliveryResult) else files[1]
    assert await remote_sha256(s3_client, rclone_s3.bucket, "twob/same/model.bin") == (
        winner.sha256)


async def test_two_processes_writing_one_big_file_at_once_on_a_conditional_server(
    tmp_path: Path, moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sinks (as in two daemons: no shared claims) both find the key free with a
    HEAD, then both upload in parts: If-None-Match on CompleteMultipartUpload (moto
    honours it, as AWS does) lets one win and the other sees a conflict. A barrier
    holds both uploads until both looked, then they go one after the other (moto's own
    check is not atomic under truly simultaneous requests; AWS's is), so the race is
    the same every run."""
    size, bucket = 2 * PART + 1, "race-multipart"
    sinks = [S3Store(f"p{i}.s3", S3StoreSettings(**moto_s3.settings(
        bucket_name=bucket, multipart_threshold=PART, part_size=PART,
        conditional_writes="always"))) for i in range(2)]
    barrier, one_by_one = asyncio.Barrier(2), asyncio.Lock()
    for name in ("_put_single", "_put_multipart"):
        original = getattr(S3Store, name)

        async def held(self: S3Store, *args: Any, _original: Any = original, **kw: Any) -> Any:
            await barrier.wait()
            async with one_by_one:
                return await _original(self, *args, **kw)

        monkeypatch.setattr(S3Store, name, held)
    a = write_file(tmp_path / "a" / "model.bin", size, seed=1)
    b = write_file(tmp_path / "b" / "model.bin", size, seed=2)
    try:
        client = await sinks[0]._get_client()
        await client.create_bucket(Bucket=bucket)
        outcomes = await asyncio.gather(
            sinks[0].deliver(make_item(a, target="k")), sinks[1].deliver(make_item(b, target="k")),
            return_exceptions=True)
        assert sum(isinstance(o, PermanentError) and "conflict" in str(o)
                   for o in outcomes) == 1, outcomes
        winner = a if isinstance(outcomes[0], DeliveryResult) else b
        assert await remote_sha256(client, bucket, "k/model.bin") == winner.sha256
        assert await pending_uploads(client, bucket) == [], "the losing upload is aborted"
    finally:
        for sink in sinks:
            await sink.close()


# -- verification -------------------------------------------------------------------


def corrupt_md5_on_call(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Send a wrong Content-MD5 on the n-th header the sink computes (a part or a put)."""
    original = s3mod.content_md5
    count = {"n": 0}

    def wrong(digest: bytes) -> str:
        count["n"] += 1
        if count["n"] == call:
            digest = hashlib.md5(b"not the bytes sent").digest()
        return original(digest)

    monkeypatch.setattr(s3mod, "content_md5", wrong)


async def test_corrupted_part_is_rejected_and_the_upload_aborted(
    tmp_path: Path,
    store: S3Store,
    s3_client: Any,
    rclone_s3: RcloneS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    staged = write_file(tmp_path / "model.bin", 3 * PART + 5, seed=11)
    item = make_item(staged, target="corrupt-part")
    corrupt_md5_on_call(monkeypatch, call=2)

    with pytest.raises(TransientError) as err:
        await store.deliver(item)

    assert "s3://artifacts/corrupt-part/model.bin" in str(err.value)
    assert "UploadPart" in str(err.value)
    missing = await s3_client.list_objects_v2(Bucket=rclone_s3.bucket, Prefix="corrupt-part/")
    assert missing.get("KeyCount", 0) == 0
    assert await pending_uploads(s3_client, rclone_s3.bucket) == []
    assert rclone_s3.temp_objects() == []

    monkeypatch.undo()
    result = await store.deliver(item)  # the retry goes through
    assert result.objects[0].sha256 == staged.sha256
    key = "corrupt-part/model.bin"
    assert await remote_sha256(s3_client, rclone_s3.bucket, key) == staged.sha256


async def test_corrupted_single_put_is_rejected(
    tmp_path: Path,
    store: S3Store,
    s3_client: Any,
    rclone_s3: RcloneS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    staged = write_file(tmp_path / "model.bin", 4000, seed=12)
    corrupt_md5_on_call(monkeypatch, call=1)

    with pytest.raises(TransientError, match="BadDigest"):
        await store.deliver(make_item(staged, target="corrupt-put"))

    listing = await s3_client.list_objects_v2(Bucket=rclone_s3.bucket, Prefix="corrupt-put/")
    assert listing.get("KeyCount", 0) == 0


async def test_bodies_with_a_content_md5_are_sent_unsigned_and_the_rest_signed(
    tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over plain http SigV4 would hash every body again, on the event loop. Parts and
    puts carry a Content-MD5, which is signed and checked by the server, so they go as
    UNSIGNED-PAYLOAD (as botocore does over https); other bodies keep their hash. Small
    puts go past botocore (s3_signed.py): their requests are read off its session."""
    client = await store._get_client()
    sent: list[tuple[str, str, str]] = []

    def capture(operation: str, url: str, headers: dict[str, Any]) -> None:
        headers = {k: v if isinstance(v, str) else v.decode() for k, v in headers.items()}
        signed = headers["Authorization"].split("SignedHeaders=")[1].split(",")[0]
        if "/signing/" in url:  # not the sink's probe of conditional writes
            sent.append((operation, headers["X-Amz-Content-SHA256"], signed))

    client.meta.events.register("before-send.s3", lambda request, event_name, **_: capture(
        event_name.rsplit(".", 1)[1], request.url, request.headers))
    assert store._signed is not None
    http = store._signed._http
    send = http.request
    monkeypatch.setattr(http, "request", lambda method, url, **kw: (
        capture("PutObject" if method == "PUT" else method, str(url), kw["headers"]),
        send(method, url, **kw))[1])
    big = write_file(tmp_path / "big" / "model.bin", 2 * PART + 9, seed=21)
    small = write_file(tmp_path / "small" / "model.bin", 3000, seed=22)
    await store.deliver(make_item(big, target="signing/big"))
    await store.deliver(make_item(small, target="signing/small"))

    by_operation: dict[str, list[tuple[str, str]]] = {}
    for operation, payload, signed in sent:
        by_operation.setdefault(operation, []).append((payload, signed))
    assert len(by_operation["UploadPart"]) == 3
    for payload, signed in by_operation["UploadPart"] + by_operation["PutObject"]:
        assert payload == "UNSIGNED-PAYLOAD"
        assert "content-md5" in signed.split(";")
    (complete,) = by_operation["CompleteMultipartUpload"]
    assert len(complete[0]) == 64 and complete[0] != "UNSIGNED-PAYLOAD"
    for key, staged in (("signing/big/model.bin", big), ("signing/small/model.bin", small)):
        assert await remote_sha256(s3_client, rclone_s3.bucket, key) == staged.sha256


# -- small puts past botocore (s3_signed.py) -------------------------------------------


async def test_small_puts_go_past_botocore_with_their_key_metadata_and_headers(
    tmp_path: Path, s3_client: Any, rclone_s3: RcloneS3
) -> None:
    """The signed path builds the URL itself: a key with spaces, a plus, a percent sign
    and non-ASCII letters must land under exactly that key, with the sha256 metadata
    and the rule's storage class, and botocore must not have sent the put."""
    sink = store_for(rclone_s3, storage_class="STANDARD")
    client = await sink._get_client()
    botocore_puts: list[str] = []
    client.meta.events.register(
        "before-call.s3.PutObject", lambda params, **_: botocore_puts.append(params["url_path"]))
    target = "odd/a b+c%20d=é~"
    staged = write_file(tmp_path / "m ü.bin", 5000, seed=31)
    try:
        result = await sink.deliver(make_item(staged, target=target))
    finally:
        await sink.close()
    key = f"{target}/m ü.bin"
    assert result.objects[0].uri == f"s3://{rclone_s3.bucket}/{key}"
    head = await s3_client.head_object(Bucket=rclone_s3.bucket, Key=key)
    assert head["Metadata"] == {"sha256": staged.sha256}
    assert head["ContentLength"] == 5000
    assert await remote_sha256(s3_client, rclone_s3.bucket, key) == staged.sha256
    assert not [p for p in botocore_puts if "odd" in p]


async def test_a_batch_listing_past_botocore_reads_awkward_keys_back_exactly(
    tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keys come back URL-encoded from the listing: one with a space, a plus, a percent
    sign and non-ASCII letters, already stored, must be found taken (a HEAD, then a
    replay), not mistaken for a free key and written blind."""
    client = await store._get_client()
    botocore_lists: list[int] = []
    client.meta.events.register("before-call.s3.ListObjectsV2",
                                lambda **_: botocore_lists.append(1))
    files = [write_file(tmp_path / f"f{i}" / "m ü.bin", 700, seed=40 + i) for i in range(4)]
    targets = [f"awk/r{i} a+b%20c=é" for i in range(4)]
    await store.deliver(make_item(files[2], target=targets[2]))
    heads = spy(monkeypatch, "_head")

    outcomes = await store.deliver_batch(
        [make_item(f, target=t) for f, t in zip(files, targets, strict=True)])

    assert heads == [1], "the stored key was listed as taken, the others as free"
    assert not botocore_lists
    for i, outcome in enumerate(outcomes):
        assert isinstance(outcome, DeliveryResult) and outcome.skipped == (i == 2)
        key = f"{targets[i]}/m ü.bin"
        assert await remote_sha256(s3_client, rclone_s3.bucket, key) == files[i].sha256


@pytest.mark.parametrize("token", [None, "session-token-1"], ids=["keys", "keys-and-token"])
async def test_keys_from_the_aws_credential_chain_sign_the_direct_requests(
    tmp_path: Path, s3_client: Any, rclone_s3: RcloneS3, monkeypatch: pytest.MonkeyPatch,
    token: str | None,
) -> None:
    """No keys in the config: the signed path takes botocore's own credential chain
    (here the environment), as botocore's client does."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", rclone_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", rclone_s3.secret_key)
    if token:
        monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    settings = rclone_s3.settings(aws_access_key_id=None, aws_secret_access_key=None)
    sink = S3Store("test.s3", S3StoreSettings(**settings))
    staged = write_file(tmp_path / "m.bin", 2000, seed=51)
    try:
        await sink._get_client()
        assert sink._signed is not None
        await sink.deliver(make_item(staged, target=f"chain-{bool(token)}"))
    finally:
        await sink.close()
    key = f"chain-{bool(token)}/m.bin"
    assert await remote_sha256(s3_client, rclone_s3.bucket, key) == staged.sha256


async def test_signed_put_answers_read_as_botocore_errors(
    tmp_path: Path, rclone_s3: RcloneS3
) -> None:
    """A refused signed put is the ClientError botocore would raise, so the store words
    it the same: a wrong secret is permanent and names the setting to fix."""
    from botocore.exceptions import ClientError

    sink = store_for(rclone_s3, aws_secret_access_key="not-the-secret")
    await sink._get_client()
    assert sink._signed is not None
    staged = write_file(tmp_path / "model.bin", 100)
    try:
        with pytest.raises(ClientError) as raw:
            await sink._signed.put_object(Bucket=rclone_s3.bucket, Key="x/y", Body=b"abc")
        with pytest.raises(PermanentError) as err:
            await sink.deliver(make_item(staged, target="creds", on_conflict="overwrite"))
    finally:
        await sink.close()
    assert raw.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert raw.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "SignatureDoesNotMatch" in str(err.value)
    assert "aws_secret_access_key" in str(err.value)


async def test_signed_put_retries_throttling_as_botocore_and_then_gives_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Standard retry mode: a SlowDown is retried up to max_attempts, then raised. The
    server is a stand-in answering canned S3 replies (rclone never throttles)."""
    import aiohttp
    from aiohttp import web
    from botocore.credentials import Credentials
    from botocore.exceptions import ClientError

    from sinks.stores import s3_signed
    from tests.servers_common import serve_app

    monkeypatch.setattr(s3_signed, "_MAX_BACKOFF", 0.0)
    slow_down = (b"<?xml version='1.0'?><Error><Code>SlowDown</Code>"
                 b"<Message>Reduce your request rate.</Message></Error>")
    seen: list[str] = []
    throttle = {"times": 2}

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers["Authorization"])
        assert await request.read() == b"body"
        if len(seen) <= throttle["times"]:
            return web.Response(status=503, body=slow_down)
        return web.Response(status=200, headers={"ETag": '"e"', "x-amz-version-id": "v1"})

    app = web.Application()
    app.router.add_put("/{tail:.*}", answer)
    async with serve_app(app) as base, aiohttp.ClientSession() as http:
        put = s3_signed.SignedS3(http, base, "us-east-1", Credentials("abc", "secret"),
                                  max_attempts=3)
        answered = await put.put_object(Bucket="b", Key="k", Body=b"body")
        assert answered == {"ETag": '"e"', "VersionId": "v1"}
        assert len(seen) == 3
        seen.clear()
        throttle["times"] = 99
        with pytest.raises(ClientError) as err:
            await put.put_object(Bucket="b", Key="k", Body=b"body")
    assert len(seen) == 3
    assert err.value.response["Error"]["Code"] == "SlowDown"
    assert s3mod.S3Store("t.s3", S3StoreSettings(bucket_name="bbb"))._map_error(
        err.value, "PutObject", "k").__class__ is TransientError


async def test_an_endpoint_behind_a_proxy_keeps_every_put_in_botocore(
    rclone_s3: RcloneS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore honours HTTP(S)_PROXY; the signed path does not, so it steps aside."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    proxied = store_for(rclone_s3)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    bypassed = store_for(rclone_s3)
    try:
        monkeypatch.delenv("NO_PROXY")
        await proxied._get_client()
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        await bypassed._get_client()
        assert proxied._signed is None
        assert bypassed._signed is not None
    finally:
        await proxied.close()
        await bypassed.close()


def test_verified_digests_trusts_a_matching_identity_and_hashes_the_rest(
    tmp_path: Path,
) -> None:
    """The stores' shared check that a file is still the one journaled, before its MD5
    goes to the server: the identity stands in for the sha256, and only while it holds."""
    staged = write_settled(tmp_path / "model.bin", 2 * MiB, seed=5)
    assert staged.path is not None
    md5 = hashlib.md5(staged.path.read_bytes()).digest()
    # A wrong journaled sha256 shows which proof was used: the identity's, not a hash.
    claimed = staged.model_copy(update={"sha256": "0" * 64})
    assert verified_digests(staged.path, claimed).md5 == md5
    with pytest.raises(FileChanged, match="journaled 000000000000"):
        verified_digests(staged.path, claimed.model_copy(update={"identity": None}))
    assert verified_digests(staged.path, staged.model_copy(update={"identity": None})).md5 == md5
    flip_last_byte(staged.path)  # written to: the stat no longer matches, so it is hashed
    for changed in (staged, staged.model_copy(update={"identity": None})):
        with pytest.raises(FileChanged, match="sha256 now"):
            verified_digests(staged.path, changed)


def watch_part_hashing(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """For each multipart part read, whether the whole file's sha256 was fed with it."""
    hashed: list[bool] = []
    original = s3mod._load_part

    def load(fd: int, offset: int, view: memoryview, whole: Any, md5: bytes | None) -> bytes:
        hashed.append(whole is not None)
        return original(fd, offset, view, whole, md5)

    monkeypatch.setattr(s3mod, "_load_part", load)
    return hashed


@pytest.mark.parametrize("settled", [True, False], ids=["identity", "no-identity"])
async def test_a_settled_file_is_not_hashed_again_and_one_without_an_identity_is(
    settled: bool, tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The intake already took the sha256; re-hashing a large file costs a pass over
    every byte, needed only where the stat cannot prove the file is the one hashed."""
    path = tmp_path / "model.bin"
    staged = write_settled(path, 3 * PART + 7, seed=21) if settled else write_file(
        path, 3 * PART + 7, seed=21)
    hashed = watch_part_hashing(monkeypatch)

    target = f"settled-{settled}"
    await store.deliver(make_item(staged, target=target))

    assert hashed == [not settled] * 4
    key = f"{target}/model.bin"
    assert await remote_sha256(s3_client, rclone_s3.bucket, key) == staged.sha256


def taken_at_intake(staged: StagedFile) -> list[bytes]:
    """The part MD5s intake's companion would have taken of the file, all of them."""
    assert staged.path is not None and staged.identity is not None
    fd = os.open(staged.path, os.O_RDONLY)
    try:
        digester = BlockDigester(fd, staged.size, (PART,))
    finally:
        os.close(fd)
    deadline = time.monotonic() + 30
    while len(digester.digests[PART]) < -(-staged.size // PART):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    digester.stop(staged.identity)
    return digester.digests[PART]


async def test_an_open_store_asks_intake_for_its_part_md5s_and_a_closed_one_stops(
    rclone_s3: RcloneS3,
) -> None:
    """Only for files it uploads in parts of `part_size`: from its multipart threshold to
    10,000 parts."""
    sink = store_for(rclone_s3, part_size=6 * MiB, multipart_threshold=20 * MiB)
    await sink.open()  # (other tests' stores may be open: only 6 MiB is this one's)
    try:
        assert 6 * MiB in block_digests.wanted(20 * MiB)
        assert 6 * MiB not in block_digests.wanted(20 * MiB - 1)
        assert 6 * MiB not in block_digests.wanted(60_000 * MiB + 1)
    finally:
        await sink.close()
    assert 6 * MiB not in block_digests.wanted(20 * MiB)


async def test_part_md5s_taken_at_intake_are_sent_and_wrong_ones_are_caught_then_dropped(
    tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The MD5s come from a pass before the upload, so only the server's check of each
    part's Content-MD5 ties them to the bytes sent: a wrong one fails that part, and the
    retry hashes the parts itself instead of sending the same wrong digest again."""
    staged = write_settled(tmp_path / "model.bin", 3 * PART + 7, seed=23)
    taken = taken_at_intake(staged)
    assert staged.identity is not None
    given: list[bytes | None] = []
    original = s3mod._load_part

    def load(fd: int, offset: int, view: memoryview, whole: Any, md5: bytes | None) -> bytes:
        given.append(md5)
        return original(fd, offset, view, whole, md5)

    monkeypatch.setattr(s3mod, "_load_part", load)

    await store.deliver(make_item(staged, target="taken"))
    assert given == taken, "every part's MD5 came from intake"
    assert await remote_sha256(s3_client, rclone_s3.bucket, "taken/model.bin") == staged.sha256

    taken[1] = hashlib.md5(b"not part 2").digest()
    given.clear()
    with pytest.raises(TransientError, match="UploadPart"):
        await store.deliver(make_item(staged, target="wrong"))
    assert block_digests.lookup(staged.identity, PART) == ()
    assert await pending_uploads(s3_client, rclone_s3.bucket) == []

    given.clear()
    await store.deliver(make_item(staged, target="wrong"))
    assert given == [None] * 4, "the retry took its own MD5s"
    assert await remote_sha256(s3_client, rclone_s3.bucket, "wrong/model.bin") == staged.sha256


async def test_a_settled_file_changed_while_it_uploads_is_refused(
    tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Written to after the first part was read: every part still matches its own MD5,
    so only the stat taken after the last read can tell that the object would not hold
    the bytes whose sha256 was journaled."""
    staged = write_settled(tmp_path / "model.bin", 2 * PART + 3, seed=22)
    assert staged.path is not None
    original = s3mod._load_part
    path = staged.path

    def load_then_write(
        fd: int, offset: int, view: memoryview, whole: Any, known: bytes | None
    ) -> bytes:
        md5 = original(fd, offset, view, whole, known)
        if offset == 0:
            flip_last_byte(path)
        return md5

    monkeypatch.setattr(s3mod, "_load_part", load_then_write)

    with pytest.raises(PermanentError, match="changed while it was uploaded"):
        await store.deliver(make_item(staged, target="moving"))

    listing = await s3_client.list_objects_v2(Bucket=rclone_s3.bucket, Prefix="moving/")
    assert listing.get("KeyCount", 0) == 0
    assert await pending_uploads(s3_client, rclone_s3.bucket) == []


@pytest.mark.parametrize(
    ("size", "settled"),
    [(1000, False), (2 * MiB, True), (2 * PART + 3, False), (2 * PART + 3, True)],
    ids=["single", "single-with-identity", "multipart", "multipart-with-identity"],
)
async def test_file_changed_after_intake_fails_permanently(
    size: int, settled: bool, tmp_path: Path, store: S3Store, s3_client: Any,
    rclone_s3: RcloneS3,
) -> None:
    path = tmp_path / "model.bin"
    staged = write_settled(path, size, 13) if settled else write_file(path, size, seed=13)
    assert staged.path is not None
    flip_last_byte(staged.path)  # same size, different bytes
    target = f"changed/{size}-{settled}"

    with pytest.raises(PermanentError, match="changed after it was accepted"):
        await store.deliver(make_item(staged, target=target))

    listing = await s3_client.list_objects_v2(Bucket=rclone_s3.bucket, Prefix=f"{target}/")
    assert listing.get("KeyCount", 0) == 0
    assert await pending_uploads(s3_client, rclone_s3.bucket) == []


async def test_an_item_that_cannot_be_delivered_as_given_fails_permanently_saying_why(
    tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3
) -> None:
    cases = undeliverable_items(tmp_path)
    # In one batch, as the dispatcher sends them: each gets its own error.
    outcomes = await store.deliver_batch([item for item, _ in cases])
    for (_, message), outcome in zip(cases, outcomes, strict=True):
        assert isinstance(outcome, PermanentError) and message in str(outcome)
    listing = await s3_client.list_objects_v2(Bucket=rclone_s3.bucket, Prefix="undeliverable/")
    assert listing.get("KeyCount", 0) == 0


async def test_stale_multipart_upload_of_the_key_is_aborted(
    tmp_path: Path, store: S3Store, s3_client: Any, rclone_s3: RcloneS3
) -> None:
    """An upload a crashed process left behind is aborted by the next delivery."""
    key = "stale/model.bin"
    created = await s3_client.create_multipart_upload(Bucket=rclone_s3.bucket, Key=key)
    await s3_client.upload_part(
        Bucket=rclone_s3.bucket,
        Key=key,
        UploadId=created["UploadId"],
        PartNumber=1,
        Body=b"x" * PART,
    )
    assert [u["Key"] for u in await pending_uploads(s3_client, rclone_s3.bucket)] == [key]
    staged = write_file(tmp_path / "model.bin", 2 * PART, seed=14)

    await store.deliver(make_item(staged, target="stale"))

    assert await pending_uploads(s3_client, rclone_s3.bucket) == []
    assert await remote_sha256(s3_client, rclone_s3.bucket, key) == staged.sha256


# -- failures -------------------------------------------------------------------------


async def test_server_down_mid_upload_then_back(
    tmp_path: Path, rclone_s3_private: RcloneS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = rclone_s3_private
    sink = store_for(server, max_attempts=1, max_concurrency=2, connect_timeout=2)
    staged = write_file(tmp_path / "model.bin", 6 * PART + 77, seed=15)
    item = make_item(staged, target="restart")

    original = s3mod._load_part
    reads = {"n": 0}

    def load_and_crash(*args: Any) -> Any:
        reads["n"] += 1
        if reads["n"] == 3:
            server.kill()  # SIGKILL the server while parts are in flight
        return original(*args)

    monkeypatch.setattr(s3mod, "_load_part", load_and_crash)
    try:
        with pytest.raises(TransientError) as err:
            await sink.deliver(item)
        assert "s3://artifacts/restart/model.bin" in str(err.value)
        monkeypatch.undo()
        # The killed server's own spool file for the upload it lost (rclone documents
        # that a SIGKILL can leave one; no S3 call can see or remove it).
        left_by_kill = server.temp_objects()
        assert len(left_by_kill) <= 1

        # Still down: every attempt is transient, so the dispatcher keeps retrying.
        with pytest.raises(TransientError):
            await sink.deliver(item)
        assert not await sink.health()

        server.start()
        result = await sink.deliver(item)
        assert result.objects[0].sha256 == staged.sha256
        assert await sink.health()

        async with client_for(server) as client:
            key = "restart/model.bin"
            assert await remote_sha256(client, server.bucket, key) == staged.sha256
            assert await pending_uploads(client, server.bucket) == []
        assert server.temp_objects() == left_by_kill  # the retry left nothing behind

        # rclone keeps object metadata in memory only: after another restart the
        # replay is still recognised (by the MD5 ETag) as the same content.
        server.restart()
        replay = await sink.deliver(item)
        assert replay.skipped
    finally:
        await sink.close()


async def test_wrong_secret_is_permanent(tmp_path: Path, rclone_s3: RcloneS3) -> None:
    sink = store_for(rclone_s3, aws_secret_access_key="not-the-secret")
    staged = write_file(tmp_path / "model.bin", 100)
    try:
        with pytest.raises(PermanentError) as err:
            await sink.deliver(make_item(staged, target="creds"))
        assert not await sink.health()
    finally:
        await sink.close()
    assert "SignatureDoesNotMatch" in str(err.value)
    assert "aws_secret_access_key" in str(err.value)
    assert "s3://artifacts/creds/model.bin" in str(err.value)


async def test_unknown_access_key_is_permanent(tmp_path: Path, rclone_s3: RcloneS3) -> None:
    sink = store_for(rclone_s3, aws_access_key_id="nobody9")
    staged = write_file(tmp_path / "model.bin", 100)
    try:
        with pytest.raises(PermanentError, match="InvalidAccessKeyId"):
            await sink.deliver(make_item(staged, target="creds"))
    finally:
        await sink.close()


@pytest.mark.parametrize("size", [100, PART], ids=["single", "multipart"])
async def test_missing_bucket_is_permanent(size: int, tmp_path: Path, rclone_s3: RcloneS3) -> None:
    sink = store_for(rclone_s3, bucket_name="no-such-bucket")
    staged = write_file(tmp_path / "model.bin", size)
    try:
        with pytest.raises(PermanentError) as err:
            await sink.deliver(make_item(staged, target="x"))
        assert not await sink.health()
    finally:
        await sink.close()
    assert "'no-such-bucket' does not exist" in str(err.value)


async def test_unreachable_endpoint_is_transient(tmp_path: Path) -> None:
    from tests.servers_storage import free_port

    settings = S3StoreSettings(
        bucket_name="artifacts",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region="us-east-1",
        aws_access_key_id="abc123",
        aws_secret_access_key="secret123",
        max_attempts=1,
    )
    sink = S3Store("test.s3", settings)
    staged = write_file(tmp_path / "model.bin", 100)
    try:
        with pytest.raises(TransientError):
            await sink.deliver(make_item(staged))
    finally:
        await sink.close()


async def test_a_skewed_clock_is_transient(
    tmp_path: Path, rclone_s3: RcloneS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This host's clock an hour behind: rclone answers AccessDenied saying so. The
    clock can be fixed (NTP), so the delivery is retried, not dead-lettered."""
    import datetime as dt

    import botocore.auth

    real = botocore.auth.get_current_datetime
    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda: real() - dt.timedelta(hours=1))
    sink = store_for(rclone_s3, max_attempts=1)
    staged = write_file(tmp_path / "model.bin", 100, seed=1)
    try:
        with pytest.raises(TransientError, match="clock"):
            await sink.deliver(make_item(staged, target="skew", on_conflict="overwrite"))
    finally:
        await sink.close()


def test_aws_clock_skew_403_is_transient_and_access_denied_stays_permanent() -> None:
    """AWS answers a skewed clock with 403 RequestTimeTooSkewed, which rclone cannot
    produce (it says AccessDenied, tested above): the ClientError is built by hand from
    AWS's documented answer. The code is retryable although the status is a 403."""
    from botocore.exceptions import ClientError

    sink = S3Store("t.s", S3StoreSettings(bucket_name="abc"))

    def mapped(code: str) -> Exception:
        exc = ClientError({"Error": {"Code": code, "Message": "m"},
                           "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject")
        return sink._map_error(exc, "PutObject", "k")

    assert isinstance(mapped("RequestTimeTooSkewed"), TransientError)
    assert isinstance(mapped("AccessDenied"), PermanentError)


async def test_credentials_in_an_endpoint_url_are_kept_out_of_messages(tmp_path: Path) -> None:
    """Settings refuse them (below); a URL that got past validation anyway is still
    shown without its user:password in error text."""
    from tests.servers_storage import free_port

    settings = S3StoreSettings.model_construct(
        bucket_name="artifacts", region="us-east-1", max_attempts=1, connect_timeout=1,
        endpoint_url=f"http://proxyuser:Hunter2Secret@127.0.0.1:{free_port()}",
        aws_access_key_id="abc123", aws_secret_access_key=SecretStr("secret123"))
    sink = S3Store("test.s3", settings)
    staged = write_file(tmp_path / "model.bin", 100)
    try:
        with pytest.raises((TransientError, PermanentError)) as err:
            await sink.deliver(make_item(staged))
    finally:
        await sink.close()
    assert "Hunter2Secret" not in str(err.value) and "proxyuser" not in str(err.value)
    assert "127.0.0.1" in str(err.value)


# -- bounded memory --------------------------------------------------------------------


async def test_memory_stays_bounded_on_a_200_mib_upload(
    tmp_path: Path, rclone_s3: RcloneS3, s3_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    size = 200 * MiB
    part, concurrency = 8 * MiB, 4
    staged = write_file(tmp_path / "big.bin", size, seed=16)
    sink = store_for(rclone_s3, part_size=part, max_concurrency=concurrency)
    try:
        await sink._get_client()  # client set-up is not part of the upload
        tracemalloc.start()
        try:
            started = time.perf_counter()
            await sink.deliver(make_item(staged, target="big"))
            elapsed = time.perf_counter() - started
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        await sink.close()

    with capsys.disabled():
        print(
            f"\n[s3 200 MiB multipart, parts {part // MiB} MiB x {concurrency}] "
            f"{size / MiB / elapsed:.0f} MiB/s ({elapsed:.2f} s, under tracemalloc); "
            f"traced peak {peak / MiB:.1f} MiB of Python allocations"
        )
    bound = part * (concurrency + 1)
    assert peak < bound + 8 * MiB, f"traced peak {peak / MiB:.1f} MiB over the part buffers"
    assert peak < size / 4
    head = await s3_client.head_object(Bucket=rclone_s3.bucket, Key="big/big.bin")
    assert head["ContentLength"] == size
    assert head["Metadata"]["sha256"] == staged.sha256
    on_disk = rclone_s3.root / rclone_s3.bucket / "big" / "big.bin"
    assert _sha256_file(on_disk) == staged.sha256


_RSS_PROBE = """
import asyncio, json, sys, time
from pathlib import Path
from sinks.stores.s3 import S3Store, S3StoreSettings
from tests.servers_storage import make_item, write_file

def status(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

async def main(settings, path, size):
    staged = write_file(Path(path), size, seed=17)
    sink = S3Store("bench.s3", S3StoreSettings(**settings))
    await sink._get_client()
    with open("/proc/self/clear_refs", "w") as fh:  # restart the peak-RSS counter (VmHWM)
        fh.write("5")
    before = status("VmRSS")
    started = time.perf_counter()
    await sink.deliver(make_item(staged, target="rss-probe", on_conflict="overwrite"))
    elapsed = time.perf_counter() - started
    peak = status("VmHWM")
    await sink.close()
    print(json.dumps({"seconds": elapsed, "rss_growth": peak - before, "rss_before": before}))

asyncio.run(main(json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
"""


def test_rss_growth_and_throughput_in_a_fresh_process(
    tmp_path: Path, rclone_s3: RcloneS3, capsys: pytest.CaptureFixture[str]
) -> None:
    """Peak RSS growth of a process uploading 200 MiB, measured from a reset VmHWM (Linux)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    size, part, concurrency = 200 * MiB, 8 * MiB, 4
    settings = rclone_s3.settings(
        multipart_threshold=PART, part_size=part, max_concurrency=concurrency
    )
    # The file is written before the baseline is taken (write_file works in 8 MiB chunks).
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _RSS_PROBE,
            json.dumps(settings),
            str(tmp_path / "big.bin"),
            str(size),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    growth, seconds = numbers["rss_growth"], numbers["seconds"]
    with capsys.disabled():
        print(
            f"\n[s3 200 MiB multipart, fresh process, parts {part // MiB} MiB x {concurrency}] "
            f"{size / MiB / seconds:.0f} MiB/s ({seconds:.2f} s); peak RSS growth "
            f"{growth / MiB:.1f} MiB (baseline {numbers['rss_before'] / MiB:.0f} MiB)"
        )
    assert growth < 3 * part * concurrency, f"peak RSS grew {growth / MiB:.1f} MiB"
    assert growth < size / 2


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


# -- settings and registry ---------------------------------------------------------


def test_registered_and_configurable_with_flowyml_keys() -> None:
    assert "s3" not in KNOWN_UNAVAILABLE
    component = ComponentConfig.model_validate(
        {
            "type": "s3",
            "bucket": "ml-artifacts",
            "prefix": "prod",
            "region": "eu-west-1",
            "multipart_threshold": "32MiB",
            "part_size": "8MiB",
        }
    )
    assert check_component("artifact_store", "stacks.prod.artifact_store", component) == []
    sink = create_sink("prod.artifact_store", component)
    assert isinstance(sink, S3Store)
    assert sink.settings.bucket_name == "ml-artifacts"
    assert sink.settings.multipart_threshold == 32 * MiB


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"part_size": "1MiB"}, "part_size"),
        ({"aws_access_key_id": "only-the-id"}, ""),
        ({"kms_key_id": "k"}, ""),
        ({"prefix": "a/../b"}, "prefix"),
        ({"bucket_nam": "typo"}, "bucket_nam"),
    ],
)
def test_bad_settings_are_config_errors(settings: dict[str, Any], field: str) -> None:
    component = ComponentConfig.model_validate({"type": "s3", "bucket": "abc", **settings})
    problems = check_component("artifact_store", "stacks.p.artifact_store", component)
    assert problems, settings
    assert any(field in p.field for p in problems)


def test_a_user_and_password_in_endpoint_url_is_a_config_error_that_hides_the_password(
) -> None:
    """aiohttp refuses such a URL, so every delivery would fail (and be retried); the
    config loader says why, naming the field and the fix, without echoing the secret."""
    component = ComponentConfig.model_validate({
        "type": "s3", "bucket": "abc",
        "endpoint_url": "https://proxyuser:Hunter2Secret@s3.example.com:9000"})
    problems = check_component("artifact_store", "stacks.p.artifact_store", component)
    assert [p.field for p in problems] == ["stacks.p.artifact_store.endpoint_url"]
    shown = problems[0].render()
    assert "Hunter2Secret" not in shown and "proxyuser" not in shown
    assert "https://s3.example.com:9000" in shown
    assert "user name or password" in shown and "aws_secret_access_key" in shown
