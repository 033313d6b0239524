"""Trying to break out of a berth container as the unprivileged test user, for real.

Every test runs berth as berthtest (uid 1001) with real runc, squashfuse and berth-init, and
checks the host side where that is what matters (files not written, not read).
"""

import json
import os
import shutil

import pytest

from tests.harness.fixtures_runtime import BOTH_RUNTIMES
from tests.harness.users import describe, venv_dir

pytestmark = pytest.mark.security

ZERO_CAPS = "0000000000000000"


def berth_run(env, image, options, command, **kwargs):
    return env.berth("run", *options, str(image), *command, **kwargs)


@BOTH_RUNTIMES
def test_setuid_root_binary_gives_no_privilege(runtime_env, runtime_images, user):
    result = berth_run(runtime_env, runtime_images.setuid, ["-v", "/etc:/host-etc:ro"],
                       ["sh", "-c", "ls -ln /bin/setuid-probe; /bin/setuid-probe; /opt/suid/busybox id -u"])
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("-rwsr-xr-x"), lines[0]  # the bit is really there
    assert lines[1] == f"ruid={user.uid} euid={user.uid}"
    assert lines[2] == "setuid0=-1" and lines[3] == "shadow=-1"
    assert lines[4] == str(user.uid)


@BOTH_RUNTIMES
def test_no_capabilities_at_all(runtime_env, runtime_images):
    result = berth_run(runtime_env, runtime_images.busybox, [], ["grep", "^Cap", "/proc/self/status"])
    assert result.returncode == 0, describe(result)
    caps = dict(line.split() for line in result.stdout.splitlines())
    assert caps == {"CapInh:": ZERO_CAPS, "CapPrm:": ZERO_CAPS, "CapEff:": ZERO_CAPS, "CapBnd:": ZERO_CAPS,
                    "CapAmb:": ZERO_CAPS}
    nnp = berth_run(runtime_env, runtime_images.busybox, [], ["grep", "NoNewPrivs", "/proc/self/status"])
    assert nnp.stdout.split() == ["NoNewPrivs:", "1"], describe(nnp)


@BOTH_RUNTIMES
def test_mounting_and_remounting_fail(runtime_env, runtime_images):
    result = berth_run(runtime_env, runtime_images.busybox, [], ["sh", "-c",
                       "mount -t tmpfs none /tmp 2>&1 && echo MOUNTED; mount -o remount,rw / 2>&1 && echo REMOUNTED; "
                       "mount --bind /bin /home 2>&1 && echo BOUND; touch /bin/x 2>&1 || echo still-ro"])
    assert "MOUNTED" not in result.stdout and "REMOUNTED" not in result.stdout and "BOUND" not in result.stdout
    assert "still-ro" in result.stdout, describe(result)


@BOTH_RUNTIMES
def test_ptrace_of_the_init_fails(runtime_env, runtime_images):
    result = berth_run(runtime_env, runtime_images.setuid, [], ["/bin/setuid-probe", "ptrace", "1"])
    assert result.stdout.strip() == "ptrace=-1", describe(result)


def test_host_files_the_user_cannot_read_or_write_stay_so(runtime_env, runtime_images, user):
    private = runtime_env.scratch / "root-private"
    private.mkdir(mode=0o700)
    (private / "secret").write_text("root only\n")
    os.chown(private, 0, 0)
    result = berth_run(runtime_env, runtime_images.busybox, ["-v", "/etc:/host-etc", "-v", f"{runtime_env.scratch}:/s"],
                       ["sh", "-c", "cat /host-etc/shadow 2>&1 || echo no-shadow; "
                        "cat /s/root-private/secret 2>&1 || echo no-secret; "
                        "echo pwned > /host-etc/berth-escape 2>&1 || echo no-write; "
                        "echo pwned >> /host-etc/passwd 2>&1 || echo no-append"])
    lines = result.stdout.splitlines()
    for refusal in ("no-shadow", "no-secret", "no-write", "no-append"):
        assert refusal in lines, describe(result)
    assert not os.path.exists("/etc/berth-escape")
    with open("/etc/passwd") as handle:
        assert "pwned" not in handle.read()


@BOTH_RUNTIMES
def test_only_container_processes_are_visible(runtime_env, runtime_images):
    result = berth_run(runtime_env, runtime_images.busybox, [], ["sh", "-c",
                       "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done"])
    assert result.returncode == 0, describe(result)
    visible = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(visible) <= 3, visible
    assert not any("pytest" in line or "runc" in line or "squashfuse" in line for line in visible), visible
    assert visible[0].startswith("/dev/.berth-init")


@BOTH_RUNTIMES
def test_sys_is_read_only(runtime_env, runtime_images):
    result = berth_run(runtime_env, runtime_images.busybox, [], ["sh", "-c",
                       "echo 1 > /sys/kernel/mm/ksm/run 2>&1 || echo refused"])
    assert result.stdout.strip().endswith("refused"), describe(result)


@pytest.mark.parametrize("options,message", [
    (["-v", "/etc/shadow:/x"], "/etc/shadow"),
    (["-v", "/root:/x"], "/root"),
    (["-v", "/proc:/x"], "/proc"),
    (["-v", "/tmp:/data/../etc"], "'..'"),
    (["-v", "/tmp:relative"], "absolute"),
    (["-v", "/tmp:/proc/sys"], "/proc"),
    (["-v", "/tmp:/etc/passwd"], "/etc/passwd"),
    (["-v", "/tmp:/dev/.berth-init"], "reserved"),
    (["-v", "/tmp:/"], "root directory"),
])
def test_hostile_mount_requests_are_refused(runtime_env, runtime_images, options, message):
    result = berth_run(runtime_env, runtime_images.busybox, options, ["true"])
    assert result.returncode == 125, describe(result)
    assert message in result.stderr and "error:" in result.stderr


def test_symlinked_source_to_a_forbidden_path_is_refused(runtime_env, runtime_images):
    link = runtime_env.scratch / "innocent"
    link.symlink_to("/etc/shadow")
    result = berth_run(runtime_env, runtime_images.busybox, ["-v", f"{link}:/x"], ["true"])
    assert result.returncode == 125 and "resolves to /etc/shadow" in result.stderr, describe(result)


@pytest.mark.parametrize("destination", ["/data/planted", "/escape/planted"])
@BOTH_RUNTIMES
def test_symlinks_in_the_image_keep_mounts_inside_the_container(runtime_env, runtime_images, destination):
    # /data -> /etc and /escape -> ../../../../../etc in the image: the mount lands on the
    # container's /etc, never on the host's.
    (runtime_env.scratch / "payload").write_text("planted\n")
    os.chmod(runtime_env.scratch / "payload", 0o644)
    result = berth_run(runtime_env, runtime_images.hostile_link,
                       ["-v", f"{runtime_env.scratch}/payload:{destination}"], ["cat", "/etc/planted"])
    assert result.returncode == 0 and result.stdout == "planted\n", describe(result)
    assert not os.path.exists("/etc/planted")


def test_image_link_home_to_dev_is_refused_with_a_message(runtime_env, runtime_images, user):
    """Issue 12 #8: berth's own mounts are judged where the image's links land them, as -v
    mounts are: an image whose /home is a link to /dev would carry the home's tmpfs over the
    container's /dev (and berth's init). Refused, saying so, before anything runs."""
    result = berth_run(runtime_env, runtime_images.home_to_dev, [], ["sh", "-c", "echo ran"])
    assert result.returncode == 125 and result.stdout == "", describe(result)
    assert "its links carry the home mount /home to /dev" in result.stderr, describe(result)
    assert "hint: the image is broken or hostile" in result.stderr, describe(result)
    # With no home to mount (HOME=/) the image runs: what it links is its own business.
    alone = runtime_env.berth("run", str(runtime_images.home_to_dev), "sh", "-c", "echo ran", env={"HOME": "/"})
    assert alone.returncode == 0 and alone.stdout == "ran\n", describe(alone)


def test_fifo_in_place_of_etc_group_does_not_hang_berth(runtime_env, runtime_images, user):
    result = berth_run(runtime_env, runtime_images.hostile_link, [], ["cat", "/etc/group"], timeout=60)
    assert result.returncode == 0, describe(result)
    assert result.stdout == f"{user.name}:x:{user.gid}:{user.name}\n"


def _run_with_config(runtime_env, user, image, config: dict):
    """run_container with a hostile image config (as berthtest, through the library)."""
    config_path = runtime_env.scratch / "config.json"
    config_path.write_text(json.dumps({"config": config}))
    os.chmod(config_path, 0o644)
    code = (
        "import json, sys\n"
        "from berth.config.load import load_settings\n"
        "from berth.errors import BerthError\n"
        "from berth.runtime.container import LocalImage, run_container\n"
        "from berth.runtime.options import RunOptions\n"
        "config = json.load(open(sys.argv[2]))\n"
        "try:\n"
        "    image = LocalImage(squashfs=sys.argv[1], config=config)\n"
        "    sys.exit(run_container(load_settings(), image, None, RunOptions()))\n"
        "except BerthError as error:\n"
        "    print('error:', error.message, file=sys.stderr)\n"
        "    sys.exit(125)\n"
    )
    python = str(venv_dir() / "bin" / "python")
    return user.run([python, "-c", code, str(image), str(config_path)], env=runtime_env.env())


@BOTH_RUNTIMES
def test_hostile_image_configs_are_contained_or_refused(runtime_env, runtime_images, user):
    image = runtime_images.busybox
    huge = _run_with_config(runtime_env, user, image, {"Env": [f"V{i}=" + "x" * 100_000 for i in range(20)],
                                                        "Cmd": ["true"]})
    assert huge.returncode == 125 and "Env totals" in huge.stderr, describe(huge)
    nul = _run_with_config(runtime_env, user, image, {"Env": ["A=1\u0000B=2"], "Cmd": ["true"]})
    assert nul.returncode == 125 and "not KEY=VALUE" in nul.stderr, describe(nul)
    workdir = _run_with_config(runtime_env, user, image, {"WorkingDir": "../../../../", "Cmd": ["pwd"]})
    assert workdir.returncode == 0 and workdir.stdout == "/\n", describe(workdir)
    missing = _run_with_config(runtime_env, user, image, {"Entrypoint": ["/no/such/entrypoint"]})
    assert missing.returncode == 127 and "cannot run '/no/such/entrypoint'" in missing.stderr, describe(missing)
    wrong = _run_with_config(runtime_env, user, image, {"Entrypoint": {"not": "a list"}})
    assert wrong.returncode == 125 and "Entrypoint" in wrong.stderr, describe(wrong)
    not_object = _run_with_config(runtime_env, user, image, ["not", "an", "object"])
    assert not_object.returncode == 125 and "not a JSON object" in not_object.stderr, describe(not_object)
    user_field = _run_with_config(runtime_env, user, image, {"User": "0:0", "Cmd": ["id", "-u"]})
    assert user_field.stdout.strip() == str(user.uid), describe(user_field)


@BOTH_RUNTIMES
def test_exec_gets_no_more_privilege_than_run(runtime_env, runtime_images, user):
    import signal

    from tests.integration.test_run_lifecycle import wait_for_line

    process = runtime_env.popen("run", "--name", "target", str(runtime_images.busybox), "sh", "-c",
                                "echo ready; sleep 60")
    try:
        wait_for_line(process, "ready")
        result = runtime_env.berth("exec", "target", "sh", "-c", "id -u; grep -E '^Cap(Eff|Bnd)' /proc/self/status")
        assert result.returncode == 0, describe(result)
        lines = result.stdout.splitlines()
        assert lines[0] == str(user.uid)
        assert [line.split()[1] for line in lines[1:]] == [ZERO_CAPS, ZERO_CAPS]
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)


def test_state_directory_is_private(runtime_env, runtime_images):
    result = berth_run(runtime_env, runtime_images.busybox, [], ["true"])
    assert result.returncode == 0, describe(result)
    info = os.stat(runtime_env.state_dir)
    assert info.st_uid == runtime_env.user.uid and info.st_mode & 0o777 == 0o700


def test_state_directory_owned_by_someone_else_is_refused(runtime_env, runtime_images):
    foreign = runtime_env.scratch / "foreign-state"
    foreign.mkdir(mode=0o777)
    os.chown(foreign, 0, 0)
    os.chmod(foreign, 0o777)
    result = runtime_env.berth("run", str(runtime_images.busybox), "true", env={"BERTH_STATE_DIR": str(foreign)})
    assert result.returncode == 125 and "belongs to uid 0" in result.stderr, describe(result)
    shutil.rmtree(foreign, ignore_errors=True)


def test_state_directory_planted_as_a_symlink_is_refused(runtime_env, runtime_images):
    target = runtime_env.scratch / "elsewhere"
    target.mkdir()
    os.chmod(target, 0o777)
    planted = runtime_env.scratch / "planted-state"
    planted.symlink_to(target)
    os.lchown(planted, 0, 0)
    result = runtime_env.berth("run", str(runtime_images.busybox), "true", env={"BERTH_STATE_DIR": str(planted)})
    assert result.returncode == 125 and "state directory" in result.stderr, describe(result)
    assert os.listdir(target) == []  # nothing was created through the link
