"""Shared steps of the reliability scenarios: a fresh store per trial, the verdict of
`berth store verify`, and telling a clean failure from an unclean one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.harness.storetest import Stores
from tests.harness.users import describe


def fresh_stores(stores: Stores, name: str, **env: str) -> Stores:
    """A new empty user store (and site store) for one trial, next to the fixture's."""
    base = stores.user_store.parent / name
    if base.exists():
        shutil.rmtree(base)
    base.mkdir()
    for path in (base, base / "user", base / "site"):
        path.mkdir(exist_ok=True)
        if os.getuid() == 0:
            shutil.chown(path, stores.user.uid, stores.user.gid)
    return Stores(stores.user, base / "user", base / "site", {**stores.extra_env, **env})


def drop(trial: Stores) -> None:
    shutil.rmtree(trial.user_store.parent, ignore_errors=True)


def verify(trial: Stores, *, site: bool = False) -> tuple[bool, str]:
    """(no damage, details) from `berth store verify --json` as the user."""
    result = trial.berth("store", "verify", "--json", *(["--site"] if site else []))
    try:
        report = json.loads(result.stdout)
    except ValueError:
        return False, describe(result)
    damage = [p for p in report["problems"] if p["damage"]]
    return result.returncode == 0 and not damage, json.dumps(damage)[:1500] or describe(result)


def clean_failure(result: subprocess.CompletedProcess) -> bool:
    """A failure as berth promises it: an `error:` line (with its hint), no traceback."""
    return (result.returncode not in (0,) and "berth: error:" in result.stderr
            and "Traceback" not in result.stderr and result.returncode > 0)


def blob_name(path: str) -> str:
    return path.rsplit("/", 1)[1]


def stored_blobs(trial: Stores) -> set[str]:
    return trial.blobs()


def image_ok(trial: Stores, digest: str) -> bool:
    image = trial.user_store / "images" / digest.replace(":", "-")
    return (image / "image.json").is_file() and (image / "image.sqfs").is_file()


def cleanup_dirs(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
