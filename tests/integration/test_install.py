"""berth as a site installs it: a wheel built from the repository, installed non-editable into a
fresh virtual environment, run by the unprivileged test user (issue 9, defects 5 and 3)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.harness.users import REPO, describe

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def built_wheel() -> Path:
    """berth's wheel, built from the repository (a directory every user can read)."""
    work = Path(tempfile.mkdtemp(prefix="berth-install-", dir="/var/tmp"))
    try:
        wheels = work / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                       check=True, capture_output=True, text=True, cwd=work)
        [wheel] = wheels.glob("berth-*.whl")
        assert wheel.name.endswith("-py3-none-linux_x86_64.whl") or "-py3-none-linux_" in wheel.name, wheel
        subprocess.run(["chmod", "-R", "a+rX", str(work)], check=True)
        yield wheel
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def installed_venv(built_wheel) -> Path:
    """A fresh venv with berth installed from a wheel (no editable link to the repository)."""
    wheel = built_wheel
    work = Path(tempfile.mkdtemp(prefix="berth-install-", dir="/var/tmp"))
    try:
        venv = work / "venv"
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], check=True,
                       capture_output=True, text=True, cwd=work)
        subprocess.run(["chmod", "-R", "a+rX", str(work)], check=True)
        yield venv
    finally:
        shutil.rmtree(work, ignore_errors=True)


def installed_init(venv: Path) -> Path:
    [site] = (venv / "lib").glob("python3*/site-packages")
    return site / "berth" / "runtime" / "init" / "berth-init"


@contextmanager
def replaced(path: Path, replacement: Path | None):
    """``path`` moved aside (and ``replacement`` put there) for the block, restored after."""
    aside = path.with_name(path.name + ".aside")
    os.rename(path, aside)
    try:
        if replacement is not None:
            shutil.copy2(replacement, path)
        yield
    finally:
        if path.exists():
            path.unlink()
        os.rename(aside, path)


def run_in(venv: Path, runtime_env, image: Path, *command: str) -> subprocess.CompletedProcess:
    return runtime_env.user.run([str(venv / "bin" / "berth"), "run", str(image), *command], env=runtime_env.env())


def test_a_wheel_installed_berth_runs_containers_as_a_user(installed_venv, runtime_env, runtime_images):
    init = installed_init(installed_venv)
    assert init.is_file() and os.access(init, os.X_OK), "the wheel has no berth-init"
    with open(init, "rb") as handle:
        assert b"/lib64/ld-linux" not in handle.read(4096)  # static: no dynamic loader named
    launcher = init.with_name("berth-launcher")
    assert launcher.is_file() and os.access(launcher, os.X_OK), "the wheel has no berth-launcher"
    with open(launcher, "rb") as handle:
        assert b"/lib64/ld-linux" not in handle.read(4096)
    result = run_in(installed_venv, runtime_env, runtime_images.busybox, "sh", "-c", "echo installed; id -u")
    assert result.returncode == 0, describe(result)
    assert result.stdout.split() == ["installed", str(runtime_env.user.uid)]


def test_the_command_berth_is_the_compiled_front_end_and_runs_kept_plans(installed_venv, runtime_env,
                                                                        runtime_images):
    """pip installs the wheel's compiled front end as the command `berth` (a static program:
    pip copies a binary script as it is) beside the console script berth-py it execs; a repeated
    run of a kept plan is then the front end's own (issue 10, target 3)."""
    import time

    front, python_entry = installed_venv / "bin" / "berth", installed_venv / "bin" / "berth-py"
    with open(front, "rb") as handle:
        head = handle.read(4096)
    assert head.startswith(b"\x7fELF") and b"/lib64/ld-linux" not in head, "bin/berth is not the static front end"
    assert python_entry.read_text().startswith(f"#!{installed_venv}/bin/python"), python_entry.read_text()[:80]
    version = runtime_env.user.run([str(front), "--version"], env=runtime_env.env())
    assert version.returncode == 0 and version.stdout.startswith("berth "), describe(version)
    argv = [str(front), "run", "--debug", str(runtime_images.busybox), "sh", "-c", "echo hit; exit 6"]
    env = runtime_env.env(BERTH_IMAGE_MOUNT_LINGER="60")  # plan_cache on by default: the front end reads it so
    try:
        deadline = time.monotonic() + 60
        while True:
            result = runtime_env.user.run(argv, env=env)
            assert (result.returncode, result.stdout) == (6, "hit\n"), describe(result)
            if "front end: hit" in result.stderr:
                break
            assert time.monotonic() < deadline, describe(result)
            time.sleep(0.2)
        assert "plan cache:" not in result.stderr, describe(result)  # no Python ran
    finally:
        runtime_env.user.run([str(front), "doctor", "--cleanup"], env=env)


def test_an_installation_without_berth_init_says_what_is_missing_and_how_to_fix_it(
        installed_venv, runtime_env, runtime_images):
    init = installed_init(installed_venv)
    with replaced(init, None):
        result = run_in(installed_venv, runtime_env, runtime_images.busybox, "true")
    assert result.returncode == 125, describe(result)
    assert f"berth: error: berth-init, the init every container starts with, is missing from this berth " \
           f"installation: no executable {init}\n" in result.stderr, describe(result)
    assert "libc6-dev" in result.stderr and "pip install --force-reinstall" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_installation_with_a_broken_init_does_not_poison_the_working_one(
        installed_venv, runtime_env, runtime_images, tmp_path):
    # The user's working berth (the test venv) and a second installation whose berth-init was
    # built without -static: it cannot start in an image without its libc. Before issue 9 the
    # second one's failed probe was cached as "runc does not work" and every later `berth run`
    # of the working installation was refused until `berth doctor`.
    dynamic = tmp_path / "berth-init-dynamic"
    subprocess.run(["gcc", "-Os", "-o", str(dynamic), str(REPO / "src/berth/runtime/init/berth-init.c")],
                   check=True, capture_output=True)
    with replaced(installed_init(installed_venv), dynamic):
        broken = run_in(installed_venv, runtime_env, runtime_images.busybox, "true")
    working = runtime_env.berth("run", str(runtime_images.busybox), "echo", "still works")
    assert working.returncode == 0, describe(working)
    assert working.stdout == "still works\n"
    # and the broken one was told that its berth-init, not runc, is the problem
    assert broken.returncode == 125, describe(broken)
    assert f"berth-init ({installed_init(installed_venv)}) did not start" in broken.stderr, describe(broken)
    assert "must be a static executable" in broken.stderr and "libc6-dev" in broken.stderr, describe(broken)


def test_a_berth_installed_with_pip_user_runs_a_jobs_host_steps(built_wheel, user):
    """The step agent ran the host's berth as `python -I -m berth`: -I drops the user site,
    where `pip install --user` puts berth, and every `berth run` or `berth srun` a job asked
    the host for failed with "No module named berth". Installed for real here, as the user,
    into a home of its own (a HOME that is not the passwd one)."""
    home = user.tempdir("berth-user-site-")
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"}
    # --no-deps: berth --version needs none of them, and no package index is at hand.
    installed = user.run(["/usr/bin/python3", "-m", "pip", "install", "-q", "--user", "--no-deps",
                          "--break-system-packages", str(built_wheel)], env=env, cwd=str(home))
    assert installed.returncode == 0, describe(installed)
    try:
        # The command in ~/.local/bin is the compiled front end, which finds berth-py beside it.
        front = user.run([str(home / ".local" / "bin" / "berth"), "--version"], env=env, cwd="/")
        assert front.returncode == 0 and front.stdout.startswith("berth "), describe(front)
        assert (home / ".local" / "bin" / "berth-py").is_file()
        step = user.run(["/usr/bin/python3", "-c",
                         "import subprocess, sys; from berth.jobs.agent import host_command; "
                         "sys.exit(subprocess.call(host_command('berth', ['--version'])))"], env=env, cwd="/")
        assert step.returncode == 0 and step.stdout.startswith("berth "), describe(step)
        assert "/.local/lib/" in user.run(["/usr/bin/python3", "-c", "import berth; print(berth.__file__)"],
                                          env=env, cwd="/").stdout  # the user site's, not the test venv's
    finally:
        shutil.rmtree(home, ignore_errors=True)
