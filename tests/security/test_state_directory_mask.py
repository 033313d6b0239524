"""berth's state directory is hidden in every container, whichever mount holds it.

The state directory (runc's and berth-launcher's state.json, the bundles of starting
containers, the container records that `berth ps`, `berth exec` and the stale clean-up read,
the shared image mounts and their holders, kept run plans, the parse cache) is what berth and
the runtime trust on the host. A `-v /tmp:/x` while it is /tmp/berth-UID (Slurm jobs have no
XDG_RUNTIME_DIR), the home mount while it lies under HOME, or a site mount holding it used to
hand it to the container, whose process could rewrite it. The container now sees an empty
read-only directory there (docs/security.md, "The state directory on shared nodes"), and the
rest of the mount works as before. The hostile process below runs as the test user with real
squashfuse and both runtimes; the test checks from the host that nothing reached the state
directory and that the ordinary write through the same mount did."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.harness.fixtures_runtime import BOTH_RUNTIMES
from tests.harness.users import describe

pytestmark = pytest.mark.security


def hostile(state_inside: str, normal_file: str) -> list[str]:
    """A container process that looks for berth's state at ``state_inside`` and tries to
    change it, and to unmount what hides it (also as root of a user namespace of its own), then
    writes ``normal_file`` through the same mount (ordinary use)."""
    script = f"""
        s={state_inside}
        echo "entries: $(ls -A "$s" 2>/dev/null | wc -l)"
        for f in "$s"/containers/*/bundle/config.json "$s"/containers/*/info.json; do
            [ -e "$f" ] && echo "SEEN $f" && [ -w "$f" ] && echo "WRITABLE $f"
        done
        (echo planted > "$s/planted") 2>/dev/null && echo WROTE-STATE
        mkdir "$s/planted-dir" 2>/dev/null && echo MADE-DIR
        umount -l "$s" 2>/dev/null && echo UNMOUNTED
        unshare -U -r -m sh -c "umount -l $s 2>/dev/null && echo UNMOUNTED"
        echo ordinary > {normal_file} && echo WROTE-NORMAL
    """
    return ["sh", "-c", script]


def assert_blocked(result, state_dir: Path, normal_file: Path) -> None:
    assert result.returncode == 0, describe(result)
    out = result.stdout
    assert "entries: 0" in out, describe(result)
    for word in ("SEEN", "WRITABLE", "WROTE-STATE", "MADE-DIR", "UNMOUNTED"):
        assert word not in out, describe(result)
    assert not (state_dir / "planted").exists() and not (state_dir / "planted-dir").exists()
    # ... and the mount itself works as it did: the ordinary file is there, the user's.
    assert "WROTE-NORMAL" in out, describe(result)
    assert normal_file.read_text() == "ordinary\n"


@pytest.fixture
def tmp_alias():
    """/tmp bound (as root) at another path, as Slurm's job_container/tmpfs binds a job's /tmp
    from its base directory: the state directory is reachable by a path no link explains."""
    alias = Path(tempfile.mkdtemp(prefix="berth-tmp-alias-", dir="/var/tmp"))
    os.chmod(alias, 0o755)
    subprocess.run(["mount", "--bind", "/tmp", str(alias)], check=True)
    yield alias
    if subprocess.run(["umount", str(alias)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(alias)], capture_output=True)
    os.rmdir(alias)


@pytest.mark.parametrize("way", ["tmp", "link", "alias"])
@BOTH_RUNTIMES
def test_a_container_given_tmp_cannot_reach_the_state_directory_in_it(runtime_env, runtime_images, user, way,
                                                                      request):
    """-v /tmp:/x with the state directory in /tmp; also through a link of the user's to /tmp
    and through a bind mount of /tmp elsewhere (judged by where the state really is)."""
    env = runtime_env
    base = env.state_dir.parent  # /tmp/berth-rt-XXXX, holding state/ and scratch/
    assert str(base).startswith("/tmp/")
    source = "/tmp"
    if way == "link":
        link = env.scratch / "up"
        link.symlink_to("/tmp")
        os.lchown(link, user.uid, user.gid)
        source = str(link)
    elif way == "alias":
        source = str(request.getfixturevalue("tmp_alias"))
    inside = "/x/" + str(env.state_dir.relative_to("/tmp"))
    normal = env.scratch / "normal.txt"
    result = env.berth("run", "-v", f"{source}:/x", str(runtime_images.busybox),
                       *hostile(inside, "/x/" + str(normal.relative_to("/tmp"))))
    assert_blocked(result, env.state_dir, normal)
    assert os.stat(normal).st_uid == user.uid


@BOTH_RUNTIMES
def test_the_home_mount_hides_a_state_directory_under_home(runtime_env, runtime_images, user, home_elsewhere):
    """BERTH_STATE_DIR under HOME (or state_dir, or an XDG_RUNTIME_DIR under it): the home is
    mounted read-write by default, the state directory in it is not."""
    env = runtime_env
    env.state_dir = home_elsewhere / ".berth-state"  # the fixture's clean-up checks this one
    normal = home_elsewhere / "normal.txt"
    result = env.berth("run", str(runtime_images.busybox),
                       *hostile(str(env.state_dir), str(normal)), env={"HOME": str(home_elsewhere)})
    assert_blocked(result, env.state_dir, normal)


@BOTH_RUNTIMES
def test_a_site_mount_holding_the_state_directory_hides_it(runtime_env, runtime_images, site_config):
    env = runtime_env
    base = env.state_dir.parent
    site_config.write(f'[[policy.mounts]]\nsource = "{base}"\ndestination = "/site"\nread_only = false\n')
    normal = env.scratch / "normal.txt"
    result = env.berth("run", str(runtime_images.busybox),
                       *hostile(f"/site/{env.state_dir.name}", f"/site/{env.scratch.name}/normal.txt"),
                       env=site_config.env)
    assert_blocked(result, env.state_dir, normal)


@pytest.mark.parametrize("inside", ["", "/containers"])
def test_a_mount_of_the_state_directory_itself_is_refused(runtime_env, runtime_images, inside):
    env = runtime_env
    result = env.berth("run", "-v", f"{env.state_dir}{inside}:/s", str(runtime_images.busybox), "true")
    assert result.returncode == 125, describe(result)
    assert f"is berth's state directory {env.state_dir} or inside it" in result.stderr, describe(result)


def test_a_mount_into_the_hidden_state_directory_is_refused(runtime_env, runtime_images):
    """A destination inside the state directory's place in the container would have the
    runtime create its mount point in the real state directory, on the host."""
    env = runtime_env
    inside = "/x/" + str(env.state_dir.relative_to("/tmp"))
    result = env.berth("run", "-v", "/tmp:/x", "-v", f"{env.scratch}:{inside}/containers/planted",
                       str(runtime_images.busybox), "true")
    assert result.returncode == 125, describe(result)
    assert f"{inside}/containers/planted" in result.stderr and "state directory" in result.stderr, \
        describe(result)
    assert not (env.state_dir / "containers" / "planted").exists()


@BOTH_RUNTIMES
def test_a_container_cannot_make_the_state_directory_a_later_berth_would_trust(runtime_env, runtime_images, user):
    """$XDG_RUNTIME_DIR/berth (where berth keeps its parse cache and plans when the environment
    has one) does not exist yet, and a read-write mount holds XDG_RUNTIME_DIR: the container
    must not make it with a parse cache or plans of its own for a later berth to trust (as it
    could make /tmp/berth-UID under -v /tmp:/x for a later Slurm job's berth). The runtime
    makes it, empty, under an empty read-only tmpfs; the rest of the mount works."""
    env = runtime_env
    runtime_dir = env.scratch / "xdg"
    runtime_dir.mkdir(mode=0o700)
    os.chown(runtime_dir, user.uid, user.gid)
    script = ("mkdir -p /s/xdg/berth/plans 2>/dev/null && echo MADE; "
              "(echo x > /s/xdg/berth/toml-cache.marshal) 2>/dev/null && echo PLANTED; "
              "echo ordinary > /s/normal.txt && echo WROTE-NORMAL")
    result = env.berth("run", "-v", f"{env.scratch}:/s", str(runtime_images.busybox), "sh", "-c", script,
                       env={"XDG_RUNTIME_DIR": str(runtime_dir)})
    assert result.returncode == 0 and result.stdout == "WROTE-NORMAL\n", describe(result)
    made = runtime_dir / "berth"
    assert not made.exists() or (list(made.iterdir()) == [] and os.stat(made).st_uid == user.uid)


@BOTH_RUNTIMES
def test_a_working_directory_in_the_hidden_state_directory_is_refused(runtime_env, runtime_images):
    """The runtime makes a missing working directory before it masks anything (runc does): it
    made it in the real state directory, on the host."""
    env = runtime_env
    inside = "/x/" + str(env.state_dir.relative_to("/tmp"))
    result = env.berth("run", "-v", "/tmp:/x", "-w", f"{inside}/containers/w", str(runtime_images.busybox), "true")
    assert result.returncode == 125 and "the working directory" in result.stderr, describe(result)
    assert not (env.state_dir / "containers" / "w").exists()


def test_a_local_job_given_tmp_cannot_reach_the_state_directory(job_site, user):
    """Jobs run through the same planning: a template whose custom options mount /tmp, the
    job's berth keeping its state in the default /tmp/berth-UID (no XDG_RUNTIME_DIR, as in a
    Slurm job). The job script finds that directory empty and read-only; its write beside it
    through the same mount lands."""
    from tests.harness.users import berth_executable
    from tests.integration.jobs_helpers import submit, wait_for

    created = subprocess.run([str(berth_executable()), "template", "create", "tmpv", f"image={job_site.image}",
                              "cpu=1", "memsz=64M", "custom=-v /tmp:/x"], env={**os.environ, **job_site.env},
                             capture_output=True, text=True, timeout=300)
    assert created.returncode == 0, created.stderr
    work = job_site.workdir(user)
    job_site.write_script(work, "hostile.sh", f"""\
        #!/bin/sh
        #BERTH -o out-%j.txt
        s=/x/berth-$(id -u)
        echo "entries: $(ls -A "$s" 2>/dev/null | wc -l)"
        (echo planted > "$s/planted-by-job") 2>/dev/null && echo WROTE-STATE
        echo ordinary > /x/{work.relative_to("/tmp")}/normal.txt && echo WROTE-NORMAL
    """, user)
    job = submit(user, job_site, work, "--template", "tmpv", "hostile.sh")
    states = wait_for(user, job_site, [job], ("completed", "failed", "cancelled", "timeout"))
    output = (work / f"out-{job}.txt").read_text()
    assert states[job]["state"] == "completed", output
    assert "entries: 0" in output and "WROTE-STATE" not in output and "WROTE-NORMAL" in output, output
    assert not os.path.exists(f"/tmp/berth-{user.uid}/planted-by-job")
    assert (work / "normal.txt").read_text() == "ordinary\n"


@BOTH_RUNTIMES
def test_berth_exec_in_a_container_given_tmp_cannot_reach_the_state_directory(runtime_env, runtime_images):
    """berth exec joins the container's mount namespace: the state directory is hidden for the
    exec'd process too (runc exec and berth-launcher exec alike)."""
    from tests.security.test_red_team import stop, wait_for_line

    env = runtime_env
    inside = "/x/" + str(env.state_dir.relative_to("/tmp"))
    process = env.popen("run", "--name", "held", "-v", "/tmp:/x", str(runtime_images.busybox), "sh", "-c",
                        "echo ready; exec sleep 60")
    try:
        wait_for_line(process, "ready")
        normal = env.scratch / "normal.txt"
        result = env.berth("exec", "held", *hostile(inside, "/x/" + str(normal.relative_to("/tmp"))))
        assert_blocked(result, env.state_dir, normal)
    finally:
        stop(process)
