"""The pepper: generated (0600, beside the database) for embedded SQLite, required for PostgreSQL,
and rotatable: keys found under an old pepper move to the current one on first use."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from gateway.keys.digest import Pepper
from gateway.keys.peppers import PepperMissing
from gateway.services import Services
from tests.helpers.configs import write_config
from tests.helpers.gateway import start_gateway
from tests.helpers.upstream import RecordingUpstream

from .conftest import Start
from .support import (
    bearer,
    call,
    cli,
    config_data,
    count_store_calls,
    new_key,
    problem,
    validate,
)


async def test_sqlite_without_pepper_generates_one_and_reuses_it(
    tmp_path: Path, up: RecordingUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    db = tmp_path / "data" / "gw.db"
    data = config_data(f"sqlite:///{db}", up.url, keys={"pepper": ""})
    gw = await start_gateway(validate(data))
    pepper_file = tmp_path / "data" / "gw.db.pepper"
    try:
        assert pepper_file.exists()
        assert stat.S_IMODE(pepper_file.stat().st_mode) == 0o600
        assert any("pepper" in r.getMessage() and str(pepper_file) in r.getMessage() for r in caplog.records)
        secret = pepper_file.read_text()
        assert len(secret.strip()) >= 32
        rec, key = await new_key(gw)
        assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
        stored = await gw.services.store.get_key(rec.id)
        assert stored is not None
        assert stored.digest == Pepper(secret.strip().encode(), 1).digest(key.encode())
    finally:
        await gw.close()
    caplog.clear()
    gw = await start_gateway(validate(data))
    try:
        assert pepper_file.read_text() == secret
        assert not any("generated" in r.getMessage() for r in caplog.records)
        assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    finally:
        await gw.close()


async def test_sqlite_with_a_configured_pepper_writes_no_file(tmp_path: Path, up: RecordingUpstream) -> None:
    db = tmp_path / "gw.db"
    gw = await start_gateway(validate(config_data(f"sqlite:///{db}", up.url)))
    await gw.close()
    assert not (tmp_path / "gw.db.pepper").exists()


async def test_postgres_without_pepper_refuses_to_start(pg_url: str) -> None:
    config = validate(config_data(pg_url, "http://127.0.0.1:9", keys={"pepper": ""}))
    with pytest.raises(PepperMissing, match=r"keys\.pepper"):
        await Services.open(config)


async def test_gateway_run_on_postgres_without_pepper_exits_with_a_message(pg_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.yaml", config_data(pg_url, "http://127.0.0.1:9", keys={"pepper": ""}))
    run = await cli(config, "run")
    assert run.code != 0
    assert "keys.pepper" in run.err and "PostgreSQL" in run.err
    assert "Traceback" not in run.err
    for args in (("keys", "list"),):
        run = await cli(config, *args)
        assert run.code != 0, args
        assert "keys.pepper" in run.err, (args, run.err)
        assert "Traceback" not in run.err, (args, run.err)


async def test_pepper_rotation(start: Start) -> None:
    v1 = {"pepper": "first-pepper-0123456789abcdef", "pepper_version": 1}
    gw = await start(keys=v1)
    rec, key = await new_key(gw)
    _, other = await new_key(gw)
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    await gw.close()

    v2 = {"pepper": "second-pepper-0123456789abcdef", "pepper_version": 2,
          "old_peppers": [{"version": 1, "secret": v1["pepper"]}]}
    gw = await start(keys=v2)
    calls = count_store_calls(gw.services.store)
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    assert calls["set_digest"] == 1
    stored = await gw.services.store.get_key(rec.id)
    assert stored is not None
    assert stored.pepper_version == 2
    assert stored.digest == Pepper(v2["pepper"].encode(), 2).digest(key.encode())  # type: ignore[union-attr]
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    assert calls["set_digest"] == 1 and calls["find_by_digests"] == 1
    # new keys are made under the current pepper
    new, _ = await new_key(gw)
    assert new.pepper_version == 2
    await gw.close()

    # the old pepper retired: the moved key still works, the one never used since does not
    gw = await start(keys={"pepper": v2["pepper"], "pepper_version": 2})
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    problem(await call(gw, "GET", "/any/x", bearer(other)), 401, "invalid_api_key")
