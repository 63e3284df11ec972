"""Bad query and path parameters of the read API (router.http_api): a 400 whose JSON body
names the parameter, its value and the fix, whatever the value; never a 500, never an
answer that looks right but ignored the parameter.  A real aiohttp app (`add_routes`)
over a real SQLite catalog filled by the real daemon."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from router.db import Database
from router.http_api import add_routes
from tests.conftest import DaemonProcess, Workspace, model_manifest, write_bundle

API = "/api/v1"
MAX_LIMIT = 10_000  # the documented cap
RUNS = ("run-1", "run-2", "run-3")  # one model artifact each, pipeline "fraud"


@pytest.fixture(scope="module")
def journal_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A catalog of three runs written by the daemon, which is then stopped."""
    workspace = Workspace(tmp_path_factory.mktemp("catalog"))
    daemon = DaemonProcess(workspace)
    try:
        daemon.wait_started()
        for run_id in RUNS:
            write_bundle(workspace.spool, run_id, model_manifest(f"m-{run_id}", run_id=run_id),
                         {"model.pkl": run_id.encode()})
        assert workspace.wait_settled(len(RUNS))["events"] == {"done": len(RUNS)}
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
    yield workspace.journal_url


@pytest.fixture
async def api(journal_url: str, tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    db = Database(journal_url)
    app = web.Application()
    add_routes(app, db, spool=tmp_path)
    try:
        async with TestClient(TestServer(app)) as client:
            yield client
    finally:
        await db.dispose()


async def get(api: TestClient[Any, Any], path: str, **params: str) -> tuple[int, Any]:
    """Status and parsed JSON body (a body that is not JSON fails the test)."""
    async with api.get(f"{API}{path}", params=params or None) as resp:
        text = await resp.text()
        assert resp.content_type == "application/json", (resp.status, text)
        try:
            return resp.status, json.loads(text)
        except ValueError:
            pytest.fail(f"{path} {params}: {resp.status} body is not JSON: {text!r}")


async def bad_request(api: TestClient[Any, Any], path: str, field: str, value: str,
                      **params: str) -> dict[str, Any]:
    """Assert a 400 naming `field` and `value` with a fix; returns the body."""
    status, body = await get(api, path, **params)
    assert status == 400, (path, params, status, body)
    assert set(body) == {"error", "field", "value", "fix"}, body
    assert (body["field"], body["value"]) == (field, value), body
    assert body["fix"] and body["fix"] in body["error"] and field in body["error"], body
    return body


async def artifact_ids(api: TestClient[Any, Any]) -> list[int]:
    status, body = await get(api, "/artifacts")
    assert status == 200
    return [a["id"] for a in body["artifacts"]]


# --- 1. error bodies are JSON built from a dict, whatever the value holds ------------------

INJECTIONS = ('1"x', '1", "error": "forged', '\\"}', "x\n\ty", "é\u2028€", "</script>'")


async def test_error_bodies_are_valid_json_whatever_the_value(
    api: TestClient[Any, Any],
) -> None:
    """Quotes, backslashes, control and non-ASCII characters in a value come back as that
    exact value inside valid JSON, never as extra keys or a body that does not parse."""
    (some_id, *_) = await artifact_ids(api)
    for value in INJECTIONS:
        await bad_request(api, "/runs", "limit", value, limit=value)
        await bad_request(api, "/artifacts", "limit", value, limit=value, name="m-run-1")
        await bad_request(api, "/artifacts", "kind", value, kind=value)
        await bad_request(api, f"/artifacts/{some_id}", value, "1", **{value: "1"})


# --- 2. ids and limits out of range: 400 naming them, never a database overflow --------------


@pytest.mark.parametrize("raw", [str(10**30), str(2**63), str(2**31), "0", "-1", "1.5",
                                 "abc", "+1", "1_0", "\u0661"])
@pytest.mark.parametrize("suffix", ["", "/lineage", "/files/model.pkl"])
async def test_an_artifact_id_that_cannot_be_one_is_a_400_naming_id(
    api: TestClient[Any, Any], raw: str, suffix: str,
) -> None:
    """A huge id used to reach the database and overflow it (a 500); a non-integer was a
    404 as if the artifact were missing.  Both are the caller's typo: 400."""
    body = await bad_request(api, f"/artifacts/{raw}{suffix}", "id", raw)
    assert "2147483647" in body["fix"]


async def test_ids_up_to_the_postgresql_integer_reach_the_catalog_and_no_further(
    api: TestClient[Any, Any],
) -> None:
    """`artifacts.id` is INTEGER: 2**31 - 1 is a missing artifact (404), 2**31 a bad id on
    SQLite too, so both journals answer alike."""
    status, body = await get(api, f"/artifacts/{2**31 - 1}")
    assert (status, body) == (404, {"error": f"no artifact {2**31 - 1} in the catalog"})
    assert (await get(api, f"/artifacts/{max(await artifact_ids(api))}"))[0] == 200
    await bad_request(api, f"/artifacts/{2**31}", "id", str(2**31))


@pytest.mark.parametrize("raw", [str(10**30), "1" * 5000, str(MAX_LIMIT + 1), "100000", "0",
                                 "-5", "1.5", "1e3", "", " 5", "+5", "1_0", "\u0661", "ten"])
@pytest.mark.parametrize("path", ["/runs", "/artifacts"])
async def test_a_limit_outside_1_to_the_maximum_is_a_400_naming_limit(
    api: TestClient[Any, Any], path: str, raw: str,
) -> None:
    """The fix names the maximum; limit=100000 (what the cap was) blocked the loop ~4 s."""
    body = await bad_request(api, path, "limit", raw, limit=raw)
    assert f"1 to {MAX_LIMIT}" in body["fix"], body


@pytest.mark.parametrize("path", ["/runs", "/artifacts"])
async def test_the_maximum_limit_is_accepted_and_a_cut_list_says_truncated(
    api: TestClient[Any, Any], path: str,
) -> None:
    """Existing keys unchanged; `truncated` says whether more rows matched than `limit`."""
    key = path.lstrip("/")
    for limit, rows, truncated in ((MAX_LIMIT, 3, False), ("3", 3, False), ("2", 2, True),
                                   ("1", 1, True), ("007", 3, False)):
        status, body = await get(api, path, pipeline="fraud", limit=str(limit))
        assert status == 200 and set(body) == {key, "truncated"}, body
        assert (len(body[key]), body["truncated"]) == (rows, truncated), (limit, body)
    status, body = await get(api, "/runs/fraud/run-1")
    assert status == 200 and set(body) == {"run", "artifacts", "truncated"}, body
    assert (len(body["artifacts"]), body["truncated"]) == (1, False)


# --- 3. unknown and repeated parameters are refused, not ignored ------------------------------


async def test_an_unknown_query_parameter_is_refused_with_the_accepted_ones(
    api: TestClient[Any, Any],
) -> None:
    """`?pipline=x` used to be ignored and return every pipeline's runs."""
    body = await bad_request(api, "/runs", "pipline", "nope", pipline="nope")
    assert "did you mean 'pipeline'" in body["error"]
    assert body["fix"] == "use pipeline, limit", body
    body = await bad_request(api, "/artifacts", "knd", "model", knd="model", pipeline="fraud")
    assert "did you mean 'kind'" in body["error"]
    for accepted in ("pipeline", "run_id", "step_name", "name", "kind", "cache_key", "limit"):
        assert accepted in body["fix"]
    (some_id, *_) = await artifact_ids(api)
    for path in ("/runs/fraud/run-1", f"/artifacts/{some_id}", f"/artifacts/{some_id}/lineage",
                 f"/artifacts/{some_id}/files/model.pkl"):
        body = await bad_request(api, path, "limit", "1", limit="1")
        assert "takes no query parameters" in body["fix"], body


async def test_a_repeated_query_parameter_is_refused(api: TestClient[Any, Any]) -> None:
    """`?pipeline=a&pipeline=b` answered for `a` only, silently."""
    async with api.get(f"{API}/artifacts?pipeline=fraud&pipeline=other") as resp:
        assert resp.status == 400
        body = await resp.json()
    assert (body["field"], body["value"]) == ("pipeline", "other"), body
    assert "more than once" in body["error"]


# --- 4. kind: any case, the manifest's aliases; an unknown one is refused -----------------------


@pytest.mark.parametrize("kind", ["Model", "MODEL", " model "])
async def test_kind_matches_whatever_its_case(api: TestClient[Any, Any], kind: str) -> None:
    status, body = await get(api, "/artifacts", kind=kind)
    assert status == 200 and len(body["artifacts"]) == len(RUNS), body


async def test_kind_data_is_the_dataset_alias_and_an_unknown_kind_is_refused(
    api: TestClient[Any, Any],
) -> None:
    status, body = await get(api, "/artifacts", kind="DATA")
    assert (status, body) == (200, {"artifacts": [], "truncated": False})
    body = await bad_request(api, "/artifacts", "kind", "modle", kind="modle")
    assert "did you mean 'model'" in body["error"]
    for valid in ("model", "dataset", "metrics", "parameters", "report", "artifact"):
        assert valid in body["fix"]


# --- paging: a list cut at its limit goes on at `offset` ------------------------------------


async def test_offset_pages_through_a_list_that_says_truncated(
    api: TestClient[Any, Any],
) -> None:
    everything = await artifact_ids(api)
    assert len(everything) == len(RUNS)
    seen: list[int] = []
    for offset in range(len(RUNS)):
        status, body = await get(api, "/artifacts", limit="1", offset=str(offset))
        assert status == 200, body
        assert body["truncated"] is (offset < len(RUNS) - 1)
        seen += [a["id"] for a in body["artifacts"]]
    assert seen == everything
    status, body = await get(api, "/artifacts", offset="0")
    assert status == 200 and [a["id"] for a in body["artifacts"]] == everything
    for raw in ("-1", "x", "1.5", str(10**30)):
        body = await bad_request(api, "/artifacts", "offset", raw, offset=raw)
        assert "truncated" in body["fix"]


async def test_the_http_client_reads_every_page_of_a_run(
    api: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client (ROUTER_URL) asks page after page while the API says `truncated`: a
    run past the API's limit is read whole, not cut at 10,000 (here pages of one)."""
    import asyncio

    from router import client as client_module

    monkeypatch.setattr(client_module, "_PAGE", 1)
    backend = client_module._HttpBackend(str(api.make_url("")).rstrip("/"))
    rows = await asyncio.to_thread(backend.artifacts, pipeline="fraud")
    assert [r.id for r in rows] == await artifact_ids(api)
