"""The `gcs` store against a real GCS JSON API server: gcp-storage-emulator (servers_storage)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import math
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import google_crc32c
import pytest

import sinks.stores.gcs as gcsmod
from router.config import ComponentConfig
from router.delivery import DeliveryResult, PermanentError, TransientError
from sinks.registry import KNOWN_UNAVAILABLE, check_component, create_sink
from sinks.stores.gcs import CHUNK_UNIT, GCSStore, GCSStoreSettings, MiB
from tests.servers_storage import (
    GcsEmulator,
    flip_last_byte,
    gcs_emulator,
    gcs_emulator_private,
    make_item,
    undeliverable_items,
    write_file,
    write_settled,
)

__all__ = ["gcs_emulator", "gcs_emulator_private"]  # fixtures used by this module

THRESHOLD = MiB
CHUNK = CHUNK_UNIT  # 256 KiB, the smallest chunk GCS accepts


def store_for(server: GcsEmulator, **overrides: Any) -> GCSStore:
    values: dict[str, Any] = {"resumable_threshold": THRESHOLD, "chunk_size": CHUNK}
    values.update(overrides)
    return GCSStore("test.artifact_store", GCSStoreSettings(**server.settings(**values)))


@pytest.fixture
async def store(gcs_emulator: GcsEmulator) -> AsyncIterator[GCSStore]:
    sink = store_for(gcs_emulator)
    yield sink
    await sink.close()


@pytest.fixture
async def storage(gcs_emulator: GcsEmulator) -> AsyncIterator[Any]:
    """A plain gcloud-aio-storage client, to look at what the sink stored."""
    from gcloud.aio.storage import Storage

    client = Storage(api_root=gcs_emulator.url)
    yield client
    await client.close()


async def remote(storage: Any, bucket: str, key: str) -> tuple[str, dict[str, Any]]:
    """(sha256 of the object's bytes, its metadata)."""
    data = await storage.download(bucket, key)
    metadata = await storage.download_metadata(bucket, key)
    return hashlib.sha256(data).hexdigest(), metadata


async def exists(storage: Any, bucket: str, key: str) -> bool:
    import aiohttp

    try:
        await storage.download_metadata(bucket, key)
    except aiohttp.ClientResponseError as exc:
        if exc.status == 404:
            return False
        raise
    return True


def spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(GCSStore, name)

    async def wrapper(self: GCSStore, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(GCSStore, name, wrapper)
    return calls


def record_chunk_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(offset, length) of every chunk the sink reads from disk to send."""
    reads: list[tuple[int, int]] = []
    original = gcsmod._read_chunk

    def reading(fd: int, offset: int, view: memoryview) -> None:
        reads.append((offset, len(view)))
        original(fd, offset, view)

    monkeypatch.setattr(gcsmod, "_read_chunk", reading)
    return reads


# -- round trips --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "resumable"),
    [
        (0, False),
        (1234, False),
        (THRESHOLD - 1, False),
        (THRESHOLD, True),
        (THRESHOLD + 1, True),
        (3 * THRESHOLD + 12345, True),
    ],
    ids=["empty", "small", "just-under", "at-threshold", "just-over", "several-chunks"],
)
async def test_round_trip_simple_and_resumable(
    size: int,
    resumable: bool,
    tmp_path: Path,
    store: GCSStore,
    storage: Any,
    gcs_emulator: GcsEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    simple, chunked = spy(monkeypatch, "_upload_simple"), spy(monkeypatch, "_upload_resumable")
    reads = record_chunk_reads(monkeypatch)
    staged = write_file(tmp_path / "model.bin", size, seed=size)
    target = f"sizes/{size}"

    result = await store.deliver(make_item(staged, target=target))

    key = f"{target}/model.bin"
    assert result.uri == f"gs://{gcs_emulator.bucket}/{key}"
    assert not result.skipped
    [obj] = result.objects
    assert (obj.size, obj.sha256) == (size, staged.sha256)
    assert obj.version_id  # the object's generation
    assert (len(simple), len(chunked)) == ((0, 1) if resumable else (1, 0))
    if resumable:  # streamed from disk one chunk at a time, in order
        assert len(reads) == math.ceil(size / CHUNK)
        assert [offset for offset, _ in reads] == list(range(0, size, CHUNK))
        assert max(length for _, length in reads) <= CHUNK
    sha, metadata = await remote(storage, gcs_emulator.bucket, key)
    assert sha == staged.sha256
    assert metadata["metadata"]["sha256"] == staged.sha256
    assert int(metadata["size"]) == size


async def test_emulator_found_through_storage_emulator_host(
    tmp_path: Path, gcs_emulator: GcsEmulator, storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    sink = GCSStore(
        "test.gcs",
        GCSStoreSettings(bucket_name=gcs_emulator.bucket, prefix="env", chunk_size=CHUNK),
    )
    staged = write_file(tmp_path / "model.bin", 500, seed=1)
    try:
        assert await sink.health()
        result = await sink.deliver(make_item(staged, target="via-env"))
    finally:
        await sink.close()
    assert result.uri == f"gs://{gcs_emulator.bucket}/env/via-env/model.bin"
    sha, _ = await remote(storage, gcs_emulator.bucket, "env/via-env/model.bin")
    assert sha == staged.sha256


async def test_several_files(tmp_path: Path, store: GCSStore, storage: Any) -> None:
    a = write_file(tmp_path / "model.pkl", 100, seed=1)
    b = write_file(tmp_path / "weights.bin", 2 * THRESHOLD, seed=2)
    result = await store.deliver(make_item(a, b, target="multi/{file}"))
    assert [o.uri for o in result.objects] == [
        "gs://artifacts/multi/model.pkl",
        "gs://artifacts/multi/weights.bin",
    ]
    for staged in (a, b):
        sha, _ = await remote(storage, "artifacts", f"multi/{staged.name}")
        assert sha == staged.sha256


# -- idempotency and conflicts ------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 2 * THRESHOLD + 1], ids=["simple", "resumable"])
async def test_replay_is_a_no_op(
    size: int, tmp_path: Path, store: GCSStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged = write_file(tmp_path / "model.bin", size, seed=3)
    item = make_item(staged, target=f"replay/{size}")
    first = await store.deliver(item)
    uploads = spy(monkeypatch, "_upload_simple"), spy(monkeypatch, "_upload_resumable")

    again = await store.deliver(item)

    assert again.skipped
    assert again.objects[0].uri == first.objects[0].uri
    assert again.objects[0].version_id == first.objects[0].version_id  # same generation
    assert uploads == ([], [])


async def test_conflict_fails_permanently_naming_both_checksums(
    tmp_path: Path, store: GCSStore, storage: Any
) -> None:
    old = write_file(tmp_path / "a" / "model.bin", 1000, seed=1)
    new = write_file(tmp_path / "b" / "model.bin", 1000, seed=2)
    await store.deliver(make_item(old, target="conflict"))

    with pytest.raises(PermanentError) as err:
        await store.deliver(make_item(new, target="conflict"))

    message = str(err.value)
    assert "gs://artifacts/conflict/model.bin" in message
    assert old.sha256 in message and new.sha256 in message
    sha, _ = await remote(storage, "artifacts", "conflict/model.bin")
    assert sha == old.sha256


@pytest.mark.parametrize("size", [200_000, THRESHOLD + 10], ids=["simple", "resumable"])
async def test_two_deliveries_of_one_key_at_once_never_both_win(
    size: int, tmp_path: Path, store: GCSStore, storage: Any
) -> None:
    """Two different artifacts rendering to one key, delivered at once: both used to find
    the key free and both uploads succeeded, the second silently replacing the first.
    Now the second waits for the first and then sees a conflict; a third delivery with
    a's content is a no-op (or a conflict if b came first)."""
    a = write_file(tmp_path / "a" / "model.bin", size, seed=1)
    b = write_file(tmp_path / "b" / "model.bin", size, seed=2)
    target = f"race/{size}"

    outcomes = await asyncio.gather(
        store.deliver(make_item(a, target=target)), store.deliver(make_item(b, target=target)),
        store.deliver(make_item(a, target=target)), return_exceptions=True)

    conflicts = [isinstance(o, PermanentError) and "conflict" in str(o) for o in outcomes]
    assert conflicts[:2] in ([False, True], [True, False]), outcomes  # whichever came first
    winner = a if conflicts[1] else b
    assert conflicts[2] == (winner is b), "a's content again: a no-op unless b won"
    results = [o for o in outcomes if isinstance(o, DeliveryResult)]
    assert sorted(r.skipped for r in results) == ([False, True] if winner is a else [False])
    sha, _ = await remote(storage, "artifacts", f"{target}/model.bin")
    assert sha == winner.sha256


@pytest.mark.parametrize(("size", "same"), [(1000, False), (1000, True), (THRESHOLD + 10, False)],
                         ids=["simple", "simple-same-content", "resumable"])
async def test_an_object_created_between_the_look_and_the_upload_is_not_replaced(
    size: int, same: bool, tmp_path: Path, store: GCSStore, storage: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another writer (another daemon) creates the key after this sink found it free.
    Uploads of a key found free carry ifGenerationMatch=0, which GCS refuses with 412
    when the object exists. gcp-storage-emulator ignores preconditions (its source has
    no ifGenerationMatch), so this test answers 412 itself where GCS would: when the
    upload carries the precondition and the object exists on the emulator. The sink
    then looks: different content is a conflict, the same content a no-op."""
    import aiohttp
    from gcloud.aio.storage import Storage
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    ours = write_file(tmp_path / "ours" / "model.bin", size, seed=1)
    theirs = ours if same else write_file(tmp_path / "theirs" / "model.bin", size, seed=2)
    assert theirs.path is not None
    body, key = theirs.path.read_bytes(), f"late/{size}/{same}/model.bin"
    upload, request = Storage.upload, GCSStore._request
    sent: list[str | None] = []

    async def other_writer_then_precondition(params: dict[str, Any]) -> bool:
        await upload(storage, "artifacts", key, body,
                     metadata={"metadata": {"sha256": theirs.sha256}})
        sent.append(params.get("ifGenerationMatch"))
        return params.get("ifGenerationMatch") == "0" and await exists(storage, "artifacts", key)

    async def gcs_upload(self: Storage, bucket: str, name: str, data: Any, **kw: Any) -> Any:
        if name == key and await other_writer_then_precondition(kw.get("parameters") or {}):
            url = URL(f"{store._api_root}/upload/storage/v1/b/{bucket}/o")
            raise aiohttp.ClientResponseError(
                aiohttp.RequestInfo(url, "POST", CIMultiDictProxy(CIMultiDict()), url), (),
                status=412, message="conditionNotMet")
        return await upload(self, bucket, name, data, **kw)

    async def gcs_request(self: GCSStore, method: str, url: str, action: str, name: str,
                          **kw: Any) -> Any:
        if method == "POST" and name == key and await other_writer_then_precondition(
                kw.get("params") or {}):
            return 412, {}, b'{"error": {"message": "conditionNotMet"}}'
        return await request(self, method, url, action, name, **kw)

    monkeypatch.setattr(Storage, "upload", gcs_upload)
    monkeypatch.setattr(GCSStore, "_request", gcs_request)

    if same:
        result = await store.deliver(make_item(ours, target=f"late/{size}/{same}"))
        assert result.skipped
    else:
        with pytest.raises(PermanentError, match="conflict"):
            await store.deliver(make_item(ours, target=f"late/{size}/{same}"))
    assert sent == ["0"]
    sha, _ = await remote(storage, "artifacts", key)
    assert sha == theirs.sha256


@pytest.mark.parametrize("size", [1000, THRESHOLD + 10], ids=["simple", "resumable"])
async def test_conflict_overwrite_replaces(
    size: int, tmp_path: Path, store: GCSStore, storage: Any
) -> None:
    old = write_file(tmp_path / "a" / "model.bin", size, seed=1)
    new = write_file(tmp_path / "b" / "model.bin", size, seed=2)
    target = f"overwrite/{size}"
    await store.deliver(make_item(old, target=target, on_conflict="overwrite"))

    result = await store.deliver(make_item(new, target=target, on_conflict="overwrite"))

    assert not result.skipped
    sha, metadata = await remote(storage, "artifacts", f"{target}/model.bin")
    assert sha == new.sha256
    assert metadata["metadata"]["sha256"] == new.sha256


async def test_conflict_version_keeps_both(tmp_path: Path, store: GCSStore, storage: Any) -> None:
    v1 = write_file(tmp_path / "a" / "model.pkl", 1000, seed=1)
    v2 = write_file(tmp_path / "b" / "model.pkl", 1000, seed=2)
    r1 = await store.deliver(make_item(v1, target="ver", version="1", on_conflict="version"))
    r2 = await store.deliver(make_item(v2, target="ver", version="2", on_conflict="version"))
    replay = await store.deliver(make_item(v2, target="ver", version="2", on_conflict="version"))

    assert r1.uri == "gs://artifacts/ver/model.v1.pkl"
    assert r2.uri == "gs://artifacts/ver/model.v2.pkl"
    assert replay.skipped
    assert (await remote(storage, "artifacts", "ver/model.v1.pkl"))[0] == v1.sha256
    assert (await remote(storage, "artifacts", "ver/model.v2.pkl"))[0] == v2.sha256


async def test_object_without_sha256_metadata_is_compared_by_md5(
    tmp_path: Path, store: GCSStore, storage: Any
) -> None:
    staged = write_file(tmp_path / "model.bin", 3000, seed=9)
    other = write_file(tmp_path / "other.bin", 3000, seed=10)
    assert staged.path is not None and other.path is not None
    await storage.upload("artifacts", "foreign/model.bin", staged.path.read_bytes())
    await storage.upload("artifacts", "foreign2/model.bin", other.path.read_bytes())

    assert (await store.deliver(make_item(staged, target="foreign"))).skipped
    with pytest.raises(PermanentError, match="conflict"):
        await store.deliver(make_item(staged, target="foreign2"))


# -- verification ---------------------------------------------------------------------


async def test_corrupted_chunk_is_rejected_by_the_crc32c_check(
    tmp_path: Path, store: GCSStore, storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes sent that differ from the file: GCS refuses the object, nothing is stored."""
    staged = write_file(tmp_path / "model.bin", 2 * THRESHOLD + 7, seed=11)
    original = gcsmod._read_chunk
    calls = {"n": 0}

    def corrupting(fd: int, offset: int, view: memoryview) -> None:
        calls["n"] += 1
        original(fd, offset, view)
        if calls["n"] == 2:  # one bit flipped between the disk and the wire
            view[0] ^= 0xFF

    monkeypatch.setattr(gcsmod, "_read_chunk", corrupting)
    item = make_item(staged, target="corrupt")

    with pytest.raises(TransientError) as err:
        await store.deliver(item)

    assert "gs://artifacts/corrupt/model.bin" in str(err.value)
    assert "CRC32C" in str(err.value)
    assert not await exists(storage, "artifacts", "corrupt/model.bin")

    monkeypatch.undo()
    result = await store.deliver(item)  # the retry starts a fresh session and succeeds
    assert result.objects[0].sha256 == staged.sha256
    assert (await remote(storage, "artifacts", "corrupt/model.bin"))[0] == staged.sha256


@pytest.mark.parametrize(
    ("size", "settled"),
    [(1000, False), (2 * THRESHOLD + 3, False), (2 * THRESHOLD + 3, True)],
    ids=["simple", "resumable", "resumable-with-identity"],
)
async def test_file_changed_after_intake_fails_permanently(
    size: int, settled: bool, tmp_path: Path, store: GCSStore, storage: Any
) -> None:
    path = tmp_path / "model.bin"
    staged = write_settled(path, size, 13) if settled else write_file(path, size, seed=13)
    assert staged.path is not None
    flip_last_byte(staged.path)
    target = f"changed/{size}-{settled}"
    with pytest.raises(PermanentError, match="changed after it was accepted"):
        await store.deliver(make_item(staged, target=target))
    assert not await exists(storage, "artifacts", f"{target}/model.bin")


@pytest.mark.parametrize("field", ["crc32c", "md5Hash"])
@pytest.mark.parametrize("size", [1000, 2 * THRESHOLD + 1], ids=["simple", "resumable"])
async def test_the_declared_checksum_is_what_gcs_checks_the_object_against(
    field: str, size: int, tmp_path: Path, store: GCSStore, storage: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On both upload paths, with the CRC32C or (where google-crc32c has no C build) the
    MD5: a right one is stored as the object's, a wrong one (the bytes sent are not what
    was checksummed) leaves no object."""
    monkeypatch.setattr(gcsmod, "CHECKSUM_FIELD", field)
    staged = write_file(tmp_path / "model.bin", size, seed=31)
    assert staged.path is not None
    data = staged.path.read_bytes()
    digest = (google_crc32c.Checksum(data) if field == "crc32c" else hashlib.md5(data)).digest()
    target = f"{field}/{size}"

    await store.deliver(make_item(staged, target=target))
    _, metadata = await remote(storage, "artifacts", f"{target}/model.bin")
    assert metadata[field] == base64.b64encode(digest).decode("ascii")

    original = gcsmod._declared
    monkeypatch.setattr(gcsmod, "_declared", lambda where, what: dataclasses.replace(
        original(where, what), value="AAAAAA=="))
    with pytest.raises(TransientError, match=r"(?i)crc32c|md5"):
        await store.deliver(make_item(staged, target=f"wrong-{target}"))
    assert not await exists(storage, "artifacts", f"wrong-{target}/model.bin")


async def test_a_settled_file_changed_after_its_crc32c_was_taken_is_not_stored(
    tmp_path: Path, store: GCSStore, storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trusting the identity skips the sha256, not the proof: the CRC32C taken when the
    identity still held is what GCS checks the object against."""
    staged = write_settled(tmp_path / "model.bin", 2 * THRESHOLD + 5, seed=17)
    assert staged.path is not None
    path = staged.path
    original = gcsmod._declared

    def then_written(where: Path, what: Any) -> Any:
        digests = original(where, what)
        flip_last_byte(path)
        return digests

    monkeypatch.setattr(gcsmod, "_declared", then_written)

    item = make_item(staged, target="moved")
    with pytest.raises(TransientError, match="CRC32C"):
        await store.deliver(item)
    assert not await exists(storage, "artifacts", "moved/model.bin")
    monkeypatch.undo()  # the retry: the stat has moved, so the file is hashed and refused
    with pytest.raises(PermanentError, match="changed after it was accepted"):
        await store.deliver(item)
    assert not await exists(storage, "artifacts", "moved/model.bin")


# -- failures -------------------------------------------------------------------------


async def test_server_down_mid_upload_resumes_after_restart(
    tmp_path: Path, gcs_emulator_private: GcsEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = gcs_emulator_private
    sink = store_for(server, connect_timeout=2)
    size = 3 * THRESHOLD + 99
    staged = write_file(tmp_path / "model.bin", size, seed=15)
    item = make_item(staged, target="restart")
    reads = record_chunk_reads(monkeypatch)
    original = gcsmod._read_chunk
    crashed: list[bool] = []

    def crash_before_fifth(fd: int, offset: int, view: memoryview) -> None:
        if len(reads) == 4 and not crashed:  # about to read the fifth chunk
            crashed.append(True)
            server.kill()  # SIGKILL: chunks 1-4 are on the server's disk
        original(fd, offset, view)

    monkeypatch.setattr(gcsmod, "_read_chunk", crash_before_fifth)
    try:
        with pytest.raises(TransientError) as err:
            await sink.deliver(item)
        assert "gs://artifacts/restart/model.bin" in str(err.value)
        with pytest.raises(TransientError):  # still down: keep retrying
            await sink.deliver(item)
        assert not await sink.health()

        server.start()
        reads.clear()
        result = await sink.deliver(item)
        assert result.objects[0].sha256 == staged.sha256
        # The same session resumed where the server's persisted bytes ended.
        assert reads and reads[0][0] == 4 * CHUNK
        assert sum(length for _, length in reads) == size - 4 * CHUNK
    finally:
        await sink.close()

    from gcloud.aio.storage import Storage

    async with Storage(api_root=server.url) as client:
        sha, metadata = await remote(client, server.bucket, "restart/model.bin")
    assert sha == staged.sha256
    assert metadata["metadata"]["sha256"] == staged.sha256


@pytest.mark.parametrize("size", [100, THRESHOLD], ids=["simple", "resumable"])
async def test_missing_bucket_is_permanent(
    size: int, tmp_path: Path, gcs_emulator: GcsEmulator
) -> None:
    sink = store_for(gcs_emulator, bucket_name="no-such-bucket")
    staged = write_file(tmp_path / "model.bin", size)
    try:
        with pytest.raises(PermanentError) as err:
            await sink.deliver(make_item(staged, target="x"))
        assert not await sink.health()
    finally:
        await sink.close()
    assert "'no-such-bucket' does not exist" in str(err.value)
    assert "gs://no-such-bucket/x/model.bin" in str(err.value)


async def test_unusable_service_file_is_permanent(
    tmp_path: Path, gcs_emulator: GcsEmulator
) -> None:
    """A credential problem is reported as such, not retried forever."""
    staged = write_file(tmp_path / "model.bin", 100)
    bad_json = tmp_path / "sa.json"
    bad_json.write_text("{not json")
    not_a_key = tmp_path / "other.json"
    not_a_key.write_text(json.dumps({"hello": "world"}))
    cases = [
        (tmp_path / "missing.json", "does not exist"),
        (bad_json, "not readable JSON"),
        (not_a_key, "not a Google credentials file"),
    ]
    for service_file, reason in cases:
        sink = store_for(gcs_emulator, service_file=service_file, emulator=False)
        try:
            with pytest.raises(PermanentError, match=reason) as err:
                await sink.deliver(make_item(staged, target="creds"))
        finally:
            await sink.close()
        assert str(service_file) in str(err.value)


async def test_unreachable_endpoint_is_transient(tmp_path: Path) -> None:
    from tests.servers_storage import free_port

    settings = GCSStoreSettings(
        bucket_name="artifacts", api_root=f"http://127.0.0.1:{free_port()}", connect_timeout=2
    )
    sink = GCSStore("test.gcs", settings)
    staged = write_file(tmp_path / "model.bin", 100)
    try:
        with pytest.raises(TransientError):
            await sink.deliver(make_item(staged))
    finally:
        await sink.close()


@pytest.mark.parametrize(
    ("status", "message", "kind", "words"),
    [
        (403, "does not have storage.objects.create access", PermanentError, "permission"),
        (401, "Invalid Credentials", PermanentError, "permission"),
        (404, "The specified bucket does not exist.", PermanentError, "does not exist"),
        (429, "rateLimitExceeded", TransientError, "throttled"),
        (503, "Backend Error", TransientError, "failed"),
        (400, "Provided MD5 hash doesn't match", TransientError, "corrupted"),
        (400, "Invalid argument", PermanentError, "failed"),
    ],
)
def test_http_status_classification(
    status: int, message: str, kind: type[Exception], words: str
) -> None:
    """How answers the emulator never gives (403, 429, 503) are classified."""
    sink = GCSStore("test.gcs", GCSStoreSettings(bucket_name="artifacts"))
    error = sink._status_error(status, message, "upload", "a/b.bin")
    assert isinstance(error, kind)
    assert words in str(error) and "gs://artifacts/a/b.bin" in str(error)


# -- bounded memory --------------------------------------------------------------------


async def test_memory_stays_bounded_on_a_large_resumable_upload(
    tmp_path: Path, gcs_emulator: GcsEmulator, storage: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # The emulator rewrites its whole upload file on each chunk, so keep this modest.
    size, chunk = 48 * MiB, 4 * MiB
    staged = write_file(tmp_path / "big.bin", size, seed=16)
    sink = store_for(gcs_emulator, chunk_size=chunk)
    try:
        await sink._get_storage()
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
            f"\n[gcs {size // MiB} MiB resumable, chunks {chunk // MiB} MiB] "
            f"{size / MiB / elapsed:.0f} MiB/s to the emulator; traced peak {peak / MiB:.1f} MiB"
        )
    assert peak < 2 * chunk + 4 * MiB, f"traced peak {peak / MiB:.1f} MiB"
    metadata = await storage.download_metadata("artifacts", "big/big.bin")
    assert metadata["metadata"]["sha256"] == staged.sha256
    assert int(metadata["size"]) == size


# -- settings and registry ---------------------------------------------------------


def test_registered_and_configurable_with_flowyml_keys() -> None:
    assert "gcs" not in KNOWN_UNAVAILABLE
    component = ComponentConfig.model_validate(
        {
            "type": "gcs",
            "bucket": "ml-artifacts",
            "project": "my-project",
            "resumable_threshold": "16MiB",
            "chunk_size": "4MiB",
        }
    )
    assert check_component("artifact_store", "stacks.prod.artifact_store", component) == []
    sink = create_sink("prod.artifact_store", component)
    assert isinstance(sink, GCSStore)
    assert sink.settings.project_id == "my-project"
    assert sink.settings.chunk_size == 4 * MiB


def test_a_user_and_password_in_api_root_is_a_config_error_that_hides_the_password() -> None:
    component = ComponentConfig.model_validate(
        {"type": "gcs", "bucket": "abc", "api_root": "http://u:Hunter2Secret@127.0.0.1:9023"})
    problems = check_component("artifact_store", "stacks.p.artifact_store", component)
    assert [p.field for p in problems] == ["stacks.p.artifact_store.api_root"]
    shown = problems[0].render()
    assert "Hunter2Secret" not in shown and "u:" not in shown
    assert "http://127.0.0.1:9023" in shown and "service_file" in shown


def test_chunk_size_must_be_a_multiple_of_256_kib() -> None:
    component = ComponentConfig.model_validate(
        {"type": "gcs", "bucket": "abc", "chunk_size": 1_000_000}
    )
    problems = check_component("artifact_store", "stacks.p.artifact_store", component)
    assert [p.field for p in problems] == ["stacks.p.artifact_store.chunk_size"]
    assert "256 KiB" in problems[0].message


async def test_an_item_that_cannot_be_delivered_as_given_fails_permanently_saying_why(
    tmp_path: Path, store: GCSStore, storage: Any
) -> None:
    for item, message in undeliverable_items(tmp_path):
        with pytest.raises(PermanentError) as raised:
            await store.deliver(item)
        assert message in str(raised.value)
    for name in ("gone/gone.bin", "typo/kept.bin", "nopath/kept.bin"):
        assert not await exists(storage, "artifacts", f"undeliverable/{name}")
