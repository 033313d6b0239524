"""The container plan (berth.runtime.plan) is pure: made from a request and an image directory,
it is pinned by golden files like config.json (tests/golden/plan-*.json).

Regenerate after an intended change with BERTH_UPDATE_GOLDEN=1 and review the diff.
"""

import json
import os
from pathlib import Path

import pytest

from berth.config.settings import Settings, SitePolicy
from berth.errors import PolicyError, RuntimeFailure
from berth.config.settings import home_directory
from berth.runtime.identity import Caller
from berth.runtime.options import MountRequest, RunOptions
from berth.runtime.plan import HomeMounts, RunRequest, home_covers, plan_container, plan_home, request_for
from berth.runtime.rootfs import MountPoint
from berth.runtime.spec import MASKED_PATHS, BindMount
from berth.runtime.state import ContainerLayout

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
LAYOUT = ContainerLayout("c0", Path("/run/user/1001/berth/containers/c0"))
ALICE = Caller("alice", 1001, 1001, "alice", "/home/alice", "/bin/bash", "Alice")


def make_image(root: Path, *, etc_link: bool = False, lacks: tuple[str, ...] = ()) -> Path:
    """A small image tree: /bin/sh, /etc/passwd and /etc/group, /home, /work, /data -> /srv."""
    for directory in ("bin", "home", "work", "srv", "proc", "dev", "sys", "tmp"):
        if directory not in lacks:
            (root / directory).mkdir(parents=True)
    (root / "bin" / "sh").write_text("")
    etc = root / ("real-etc" if etc_link else "etc")
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nalice:x:5:5::/nowhere:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\n")
    if etc_link:
        (root / "etc").symlink_to("/real-etc")
    (root / "data").symlink_to("srv")
    return root


def request(**changes) -> RunRequest:
    values = dict(
        image_name="registry.example/app:1",
        argv=("/bin/sh", "-c", "echo hi"),
        env=("PATH=/usr/bin:/bin", "HOME=/home/alice"),
        caller=ALICE,
        workdir="/work",
        hostname="node1",
        network="host",
        init_path="/opt/berth/libexec/berth/berth-init",
        home=HomeMounts("/home/alice", binds=(BindMount("/home/alice", "/home/alice", read_only=False),),
                        tmpfs=("/home",), mount_points=(MountPoint("/home", True), MountPoint("/home/alice", True)),
                        creatable=("/home",)),
        deny_destinations=("/etc",),
    )
    values.update(changes)
    return RunRequest(**values)


def host_dirs(tmp_path: Path) -> dict:
    """Mount sources that exist on the host (their kind decides the mount point's)."""
    (tmp_path / "host" / "scratch").mkdir(parents=True)
    (tmp_path / "host" / "data").write_text("")
    return {"site_mounts": (BindMount(str(tmp_path / "host" / "scratch"), "/scratch", read_only=False),),
            "user_mounts": (BindMount(str(tmp_path / "host" / "data"), "/data/in", identity=(42, 7)),)}


def golden(name: str, produced: dict, tmp_path: Path) -> None:
    text = json.dumps(produced, indent=2, sort_keys=True).replace(str(tmp_path), "/TMP") + "\n"
    path = GOLDEN / name
    if os.environ.get("BERTH_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"the plan changed; if intended, regenerate {path}"


def test_plan_of_a_complete_image_needs_no_overlay(tmp_path):
    root = make_image(tmp_path / "img")
    (root / "scratch").mkdir()
    (root / "srv" / "in").write_text("")
    plan = plan_container(request(**host_dirs(tmp_path)), str(root), LAYOUT)
    assert plan.overlay is False and plan.mount_points == ()
    # The -v destination /data/in lands through the image's link /data -> /srv.
    assert [b.destination for b in plan.spec.binds][-1] == "/srv/in"
    # The image's own entry for the caller's name is replaced by the caller's.
    assert plan.identity_files[0].text.splitlines()[-1] == "alice:x:1001:1001:Alice:/home/alice:/bin/sh"
    golden("plan-default.json", plan.to_dict(), tmp_path)


def test_plan_of_an_image_lacking_mount_points_adds_an_overlay(tmp_path):
    root = make_image(tmp_path / "img", etc_link=True, lacks=("home", "work", "tmp"))
    plan = plan_container(request(**host_dirs(tmp_path)), str(root), LAYOUT)
    assert plan.overlay is True and plan.spec.rootfs == str(LAYOUT.rootfs)
    # Mount points that runc cannot create in a read-only root (the identity files land in
    # /real-etc through the image link /etc -> /real-etc, where they exist).
    assert [p.path for p in plan.mount_points] == ["/tmp", "/home", "/scratch", "/srv/in", "/work"]
    golden("plan-overlay-etc-link.json", plan.to_dict(), tmp_path)


def test_plan_refuses_a_user_mount_that_lands_on_a_denied_path_through_a_link(tmp_path):
    root = make_image(tmp_path / "img")
    (root / "cfg").symlink_to("/etc")
    with pytest.raises(PolicyError, match="through the image's links: /etc/x"):
        plan_container(request(user_mounts=(BindMount("/host/x", "/cfg/x"),)), str(root), LAYOUT)


def test_plan_refuses_identity_files_in_dev(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    (root / "etc").symlink_to("/dev/shm")
    with pytest.raises(RuntimeFailure, match="the image's /etc is a link to /dev/shm"):
        plan_container(request(), str(root), LAYOUT)


def test_plan_writes_nothing_into_the_image_or_the_layout(tmp_path):
    root = make_image(tmp_path / "img", lacks=("home",))
    before = sorted(str(p) for p in root.rglob("*"))
    layout = ContainerLayout("c1", tmp_path / "state" / "c1")
    plan_container(request(writable=True), str(root), layout)
    assert sorted(str(p) for p in root.rglob("*")) == before
    assert not layout.path.exists()


def quiet(*args, **kwargs):
    del args, kwargs


def test_home_missing_on_the_host_is_an_empty_tmpfs(tmp_path):
    caller = ALICE._replace(home=str(tmp_path / "gone" / "alice"))
    home = plan_home(caller, RunOptions(), SitePolicy(), quiet)
    assert home.binds == () and home.tmpfs == (caller.home,)


@pytest.mark.parametrize("environ,passwd_home,expected", [
    ({"HOME": "/scratch/proj//alice/"}, "/home/alice", "/scratch/proj/alice"),
    ({"HOME": "//x"}, "/home/alice", "/x"),
    ({"HOME": "relative"}, "/home/alice", "/home/alice"),
    ({}, "/home/alice", "/home/alice"),
    ({}, None, "/"),
])
def test_home_is_HOME_when_absolute_else_the_passwd_entrys(environ, passwd_home, expected):
    assert str(home_directory(environ, passwd_home)) == expected


def test_home_under_tmp_gets_no_tmpfs_over_the_private_tmp(tmp_path):
    caller = ALICE._replace(home=str(tmp_path))
    home = plan_home(caller, RunOptions(), SitePolicy(), quiet)
    assert home.tmpfs == () and [b.destination for b in home.binds] == [str(tmp_path)]


@pytest.mark.parametrize("home,message", [("/etc", "would cover /etc/passwd"), ("/dev/shm", "over /dev")])
def test_a_HOME_that_cannot_be_a_mount_destination_is_refused(home, message):
    caller = ALICE._replace(home=home)
    with pytest.raises(PolicyError, match=f"home directory {home} \\(\\$HOME\\).*{message}") as refused:
        plan_home(caller, RunOptions(), SitePolicy(), quiet)
    assert "set HOME" in refused.value.hint


def test_a_HOME_under_a_denied_source_is_refused_but_the_passwd_home_is_the_sites_word(tmp_path):
    site = SitePolicy(mount_deny_sources=(str(tmp_path),))
    with pytest.raises(PolicyError, match="is under"):
        plan_home(ALICE._replace(home=str(tmp_path)), RunOptions(), site, quiet)
    home = plan_home(ALICE._replace(home=str(tmp_path), passwd_home=str(tmp_path)), RunOptions(), site, quiet)
    assert [b.source for b in home.binds] == [str(tmp_path)]


def test_home_covers_only_what_the_home_mount_shows(tmp_path):
    caller = ALICE._replace(home=str(tmp_path / "home"))
    (tmp_path / "home" / "proj").mkdir(parents=True)
    assert home_covers(str(tmp_path / "home" / "proj"), caller, RunOptions(), SitePolicy())
    assert not home_covers(str(tmp_path / "homework"), caller, RunOptions(), SitePolicy())
    assert not home_covers(str(tmp_path / "home" / "proj"), caller, RunOptions(mount_home=False), SitePolicy())


def test_request_composes_environment_and_judges_mounts(tmp_path):
    settings = Settings(policy=SitePolicy(mount_deny_destinations=("/etc",)))
    image = type("Image", (), {"config": {"config": {"Env": ["A=1"], "Cmd": ["/bin/true"]}},
                               "reference": "x:1", "digest": None, "squashfs": "/x.sqfs"})()
    caller = ALICE._replace(home=str(tmp_path))
    made = request_for(settings, image, None, RunOptions(env=("B=2",)), init_path="/init", caller=caller,
                       environ={"PATH": "/host"})
    assert made.argv == ("/bin/true",)
    assert dict(e.split("=", 1) for e in made.env)["HOME"] == str(tmp_path)
    assert ("A=1" in made.env, "B=2" in made.env) == (True, True)
    with pytest.raises(PolicyError, match="mounting over /etc"):
        request_for(settings, image, None, RunOptions(mounts=(MountRequest(str(tmp_path), "/etc/x"),)),
                    init_path="/init", caller=caller, environ={})


@pytest.mark.parametrize("link,target,message", [
    ("home", "/dev", "its links carry the home mount /home to /dev, .*container's own /dev"),
    ("home", "/etc", "carry the home mount /home to /etc, .*not allowed by site policy"),
    ("tmp", "/sys/fs", "its links carry the container's /tmp to /sys/fs"),
    ("proc", "/srv", "its /proc is a link to /srv"),
])
def test_berths_own_mounts_are_judged_where_the_images_links_land_them(tmp_path, link, target, message):
    """Issue 12 #8: an image link must not carry berth's home, /tmp or /proc mounts elsewhere."""
    root = make_image(tmp_path / "img", lacks=(link,))
    (root / link).symlink_to(target)
    with pytest.raises(RuntimeFailure, match=message) as refused:
        plan_container(request(), str(root), LAYOUT)
    assert "image registry.example/app:1" in refused.value.message and "hostile" in refused.value.hint


def test_a_home_behind_an_innocent_image_link_lands_where_the_link_points(tmp_path):
    root = make_image(tmp_path / "img", lacks=("home",))
    (root / "var" / "home").mkdir(parents=True)
    (root / "home").symlink_to("var/home")
    plan = plan_container(request(), str(root), LAYOUT)
    assert plan.spec.tmpfs == ("/var/home",)
    assert plan.spec.binds[0].destination == "/var/home/alice" and plan.overlay is False


def test_plan_with_gpu_and_cdi_edits(tmp_path):
    """Device edits (issue 13) as the plan takes them: device nodes bound with 'dev', driver
    files read-only under /dev/.berth-gpu (runc creates those mount points in its /dev tmpfs: no
    overlay), a CDI mount whose mount point the image has, and a CDI hook in config.json."""
    from berth.runtime.spec import Hook

    root = make_image(tmp_path / "img")
    (root / "opt" / "ve").mkdir(parents=True)
    (tmp_path / "host" / "ve").mkdir(parents=True)
    edits = {
        "devices": (BindMount("/dev/nvidia1", "/dev/nvidia1", read_only=False, device=True),
                    BindMount("/dev/nvidiactl", "/dev/nvidiactl", read_only=False, device=True)),
        "device_mounts": (BindMount("/usr/lib/libcuda.so.550.54.14", "/dev/.berth-gpu/lib/libcuda.so.1",
                                    identity=(8, 1)),
                          BindMount("/usr/bin/nvidia-smi", "/dev/.berth-gpu/bin/nvidia-smi", identity=(8, 2)),
                          BindMount(str(tmp_path / "host" / "ve"), "/opt/ve", identity=(8, 3))),
        "hooks": (Hook("createContainer", "/usr/bin/ve-hook", ("ve-hook", "setup"), ("A=1",), 5),),
    }
    plan = plan_container(request(**edits), str(root), LAYOUT)
    assert plan.overlay is False and plan.mount_points == ()
    golden("plan-gpu-cdi.json", plan.to_dict(), tmp_path)


# ------------------------------------------------- berth's own directories are hidden

def _state_world(tmp_path: Path):
    """An image, a state directory (the caller's) in tmp_path/tmp, and the layout in it."""
    root = make_image(tmp_path / "img")
    state = tmp_path / "tmp" / "berth-state"
    (state / "containers").mkdir(parents=True, mode=0o700)
    return root, state, ContainerLayout("c1", state / "containers" / "c1")


def test_a_mount_holding_the_state_directory_hides_it_and_keeps_the_rest(tmp_path):
    root, state, layout = _state_world(tmp_path)
    user = BindMount(str(tmp_path / "tmp"), "/x", read_only=False)
    plan = plan_container(request(user_mounts=(user,)), str(root), layout)
    masked = plan.config()["linux"]["maskedPaths"]
    assert masked[-1] == "/x/berth-state" and masked.count("/x/berth-state") == 1
    assert [b.destination for b in plan.spec.binds][-1] == "/x"  # the mount itself stays


def test_every_mount_holding_it_hides_it_the_home_and_a_site_mount_too(tmp_path):
    root, state, layout = _state_world(tmp_path)
    (tmp_path / "home").mkdir()
    home_bind = BindMount(str(tmp_path / "tmp"), "/home/alice", read_only=False)
    home = request().home._replace(binds=(home_bind,))
    site = BindMount(str(tmp_path), "/site", read_only=True)
    plan = plan_container(request(home=home, site_mounts=(site,)), str(root), layout)
    assert plan.config()["linux"]["maskedPaths"][-2:] == ["/home/alice/berth-state", "/site/tmp/berth-state"]


def test_a_link_to_the_directory_holding_it_does_not_dodge_the_rule(tmp_path):
    root, state, layout = _state_world(tmp_path)
    (tmp_path / "up").symlink_to(tmp_path / "tmp")
    plan = plan_container(request(user_mounts=(BindMount(str(tmp_path / "up"), "/x"),)), str(root), layout)
    assert plan.config()["linux"]["maskedPaths"][-1] == "/x/berth-state"


def test_no_mask_without_a_mount_holding_it_and_none_for_another_users_directory(tmp_path):
    root, state, layout = _state_world(tmp_path)
    plan = plan_container(request(**host_dirs(tmp_path)), str(root), layout)
    assert plan.config()["linux"]["maskedPaths"] == list(MASKED_PATHS)
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, 4242, 4242)
    plan = plan_container(request(user_mounts=(BindMount(str(tmp_path), "/x"),), private_dirs=(str(other),)),
                          str(root), ContainerLayout("c1", tmp_path / "missing" / "containers" / "c1"))
    assert plan.config()["linux"]["maskedPaths"] == list(MASKED_PATHS)


@pytest.mark.parametrize("source", ["tmp/berth-state", "tmp/berth-state/containers"])
def test_a_mount_of_the_state_directory_or_inside_it_is_refused(tmp_path, source):
    root, state, layout = _state_world(tmp_path)
    with pytest.raises(PolicyError, match=f"is berth's state directory {state} or inside it"):
        plan_container(request(user_mounts=(BindMount(str(tmp_path / source), "/s"),)), str(root), layout)


def test_a_destination_inside_the_hidden_place_is_refused(tmp_path):
    root, state, layout = _state_world(tmp_path)
    (tmp_path / "data").mkdir()
    mounts = (BindMount(str(tmp_path / "tmp"), "/x"), BindMount(str(tmp_path / "data"), "/x/berth-state/in"))
    with pytest.raises(PolicyError, match="/x/berth-state/in is inside /x/berth-state, where berth's state"):
        plan_container(request(user_mounts=mounts), str(root), layout)


def test_private_dirs_name_the_default_state_directories_too(tmp_path):
    from berth.config.settings import fallback_state_dir
    from berth.runtime.plan import berth_directories

    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    settings = Settings(state_dir=tmp_path / "configured")
    found = berth_directories(settings, {"XDG_RUNTIME_DIR": str(runtime)}, tmp_path / "used")
    assert found == (str(tmp_path / "used"), str(tmp_path / "configured"), str(runtime / "berth"),
                     str(fallback_state_dir()))


def test_host_views_find_the_directory_through_another_mount_of_its_file_system(tmp_path):
    """A bind mount of /tmp elsewhere (Slurm's job_container/tmpfs) shows the state directory
    at a second path: the mount table says where; each place is confirmed by its inode."""
    from berth.runtime.policy import host_views

    state = tmp_path / "fs" / "tmp" / "berth-1"
    state.mkdir(parents=True)
    alias = tmp_path / "alias"
    alias.symlink_to(tmp_path / "fs" / "tmp")  # stands for the bind mount (stat sees the same inode)
    info = os.stat(state)
    device = f"{os.major(info.st_dev)}:{os.minor(info.st_dev)}"
    table = tmp_path / "mountinfo"
    table.write_text(f"1 0 {device} / / rw - ext4 /dev/x rw\n"
                     f"2 1 {device} {tmp_path}/fs/tmp {alias} rw - ext4 /dev/x rw\n"
                     f"3 1 {device} {tmp_path}/fs/elsewhere {tmp_path}/no\\040such rw - ext4 /dev/x rw\n"
                     f"4 1 0:99 / {tmp_path}/other rw - tmpfs tmpfs rw\n")
    assert host_views(str(state), table=str(table)) == (str(state), str(alias / "berth-1"))
    assert host_views(str(tmp_path / "missing"), table=str(table)) == ()


def test_a_missing_berth_directory_under_a_writable_mount_is_made_under_a_tmpfs(tmp_path):
    """The container must not make it (with plans or a parse cache planted for a later berth):
    the runtime makes its mount point, an empty read-only tmpfs covers it; a read-only mount
    cannot make it anyway and gets nothing (its runtime could not create a mount point)."""
    root, state, layout = _state_world(tmp_path)
    (tmp_path / "run").mkdir()
    later = str(tmp_path / "run" / "berth")
    rw = BindMount(str(tmp_path / "run"), "/r", read_only=False)
    plan = plan_container(request(user_mounts=(rw,), private_dirs=(later,)), str(root), layout)
    tmpfs = [m for m in plan.config()["mounts"] if m["destination"] == "/r/berth"]
    assert tmpfs == [{"destination": "/r/berth", "type": "tmpfs", "source": "tmpfs",
                      "options": ["ro", "nosuid", "nodev", "noexec", "mode=0700"]}]
    assert plan.config()["mounts"][-1] == tmpfs[0]  # after every bind
    plan = plan_container(request(user_mounts=(rw._replace(read_only=True),), private_dirs=(later,)), str(root),
                          layout)
    assert not [m for m in plan.config()["mounts"] if m["destination"] == "/r/berth"]


def test_a_working_directory_inside_the_hidden_place_is_refused(tmp_path):
    """runc makes a missing working directory before it masks: it would make it in the real
    state directory, on the host (an image's WorkingDir chooses it as well as -w)."""
    root, state, layout = _state_world(tmp_path)
    user = BindMount(str(tmp_path / "tmp"), "/x", read_only=False)
    with pytest.raises(PolicyError, match="the working directory /x/berth-state/containers/w is inside "
                                          "/x/berth-state"):
        plan_container(request(user_mounts=(user,), workdir="/x/berth-state/containers/w"), str(root), layout)
    plan_container(request(user_mounts=(user,), workdir="/x"), str(root), layout)  # beside it: fine
