"""berth.fsutil: atomic replacement that never follows planted links and keeps old content on failure."""

import functools
import os
import stat

import pytest

from berth import fsutil
from berth.fsutil import replace_in_directory, write_atomically


def test_write_replaces_content_with_exact_mode_whatever_the_umask(tmp_path):
    target = tmp_path / "f.toml"
    target.write_text("old")
    old_umask = os.umask(0o077)
    try:
        write_atomically(target, "new ✓", mode=0o644)
    finally:
        os.umask(old_umask)
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["f.toml"]


def test_a_link_planted_at_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "d").mkdir()
    planted = tmp_path / "d" / "status"
    planted.symlink_to(victim)
    directory = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        replace_in_directory(directory, "status", b"0\n", 0o600)
    finally:
        os.close(directory)
    assert victim.read_text() == "precious"
    assert not planted.is_symlink() and planted.read_bytes() == b"0\n"


def test_failure_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "auth.json"
    target.write_text("old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError) as info:
        write_atomically(target, b"x" * 100000, mode=0o600)
    assert info.value.errno == 28
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["auth.json"]


def test_streaming_writer_publishes_only_on_success(tmp_path):
    from berth.fsutil import atomic_writer

    target = tmp_path / "archive.tar"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_writer(target, mode=0o600) as out:
            out.write(b"partial")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["archive.tar"]
    with atomic_writer(target, mode=0o640) as out:
        out.write(b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o640


@pytest.mark.parametrize("tmpfile", ["supported", "not supported"])
def test_an_unnamed_writer_has_no_name_until_it_is_renamed_and_falls_back_to_one(tmp_path, monkeypatch, tmpfile):
    """atomic_writer(unnamed=True) (staging): nothing of the file is in the directory while it
    is written (O_TMPFILE), it is named only for the rename, with its mode, and a failure at the
    rename leaves nothing; where the file system has no O_TMPFILE, the named temporary file."""
    from berth.fsutil import atomic_writer

    real_open, real_replace = os.open, os.replace
    if tmpfile == "not supported":
        def no_tmpfile(path, flags, *args, **kwargs):
            if flags & os.O_TMPFILE == os.O_TMPFILE:
                raise OSError(95, "Operation not supported")
            return real_open(path, flags, *args, **kwargs)
        monkeypatch.setattr(os, "open", no_tmpfile)
    target = tmp_path / "data.bin"
    with atomic_writer(target, mode=0o640, unnamed=True) as out:
        out.write(b"new")
        out.flush()
        during = os.listdir(tmp_path)
    assert during == ([] if tmpfile == "supported" else [during[0]]) and target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 and os.listdir(tmp_path) == ["data.bin"]

    def failing_replace(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        with atomic_writer(target, mode=0o640, unnamed=True) as out:
            out.write(b"newer")
    monkeypatch.setattr(os, "replace", real_replace)
    assert os.listdir(tmp_path) == ["data.bin"] and target.read_bytes() == b"new"


def test_only_dead_writers_temporary_files_of_this_node_are_removed(tmp_path):
    """remove_dead_temporaries (the O_TMPFILE fallback's clean-up): a named temporary file of a
    writer that died on this node goes; a live writer's, another node's, and files that are not
    berth's temporaries stay."""
    import subprocess

    from berth.fsutil import _host_tag, _temporary_name, remove_dead_temporaries

    dead = subprocess.Popen(["true"])
    dead.wait()
    mine = _temporary_name("data.bin", owned=True)
    assert f".berth-{os.getpid()}-{_host_tag()}.tmp" in mine
    writer, other_node = f"-{os.getpid()}-{_host_tag()}.", f"-{dead.pid}-{'0' * 8 if _host_tag() != '0' * 8 else '1' * 8}."
    names = {"dead": mine.replace(writer, f"-{dead.pid}-{_host_tag()}."), "live": mine,
             "other node": mine.replace(writer, other_node),
             "plain": _temporary_name("data.bin"), "data": "data.bin"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    os.mkdir(tmp_path / names["dead"].replace("data.bin", "dir.bin"))  # not a regular file
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert remove_dead_temporaries(directory) == 1
    finally:
        os.close(directory)
    kept = set(os.listdir(tmp_path))
    assert names["dead"] not in kept and kept >= {names[key] for key in ("live", "other node", "plain", "data")}


def test_mode_none_creates_as_open_would_under_the_umask(tmp_path):
    old_umask = os.umask(0o027)
    try:
        write_atomically(tmp_path / "export.tar", b"x", mode=None)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "export.tar").stat().st_mode) == 0o640


def test_staging_directory_holds_the_temporary_file(tmp_path, monkeypatch):
    staging = tmp_path / "tmp"
    staging.mkdir()
    seen = []
    real_replace = os.replace

    def spy(src, dst, **kwargs):
        seen.append(sorted(os.listdir(staging)))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    write_atomically(tmp_path / "index.json", b"{}", mode=0o644, staging_dir=staging)
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].startswith(".index.json.")
    assert os.listdir(staging) == [] and (tmp_path / "index.json").read_bytes() == b"{}"


def test_nofollow_dir_refuses_a_linked_directory(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "linked").symlink_to(real)
    with pytest.raises(OSError):
        write_atomically(tmp_path / "linked" / "state.json", b"{}", mode=0o600, nofollow_dir=True)
    assert os.listdir(real) == []


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_private_dirs_are_0700_whatever_the_umask_and_existing_parents_are_kept(tmp_path, umask):
    from berth.fsutil import ensure_private_dir

    tmp_path.chmod(0o755)
    old_umask = os.umask(umask)
    try:
        ensure_private_dir(tmp_path / "local" / "share" / "berth")
    finally:
        os.umask(old_umask)
    for path in (tmp_path / "local", tmp_path / "local" / "share", tmp_path / "local" / "share" / "berth"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a directory of someone else's")
def test_private_dir_of_someone_else_or_their_link_is_refused(tmp_path):
    from berth.fsutil import ensure_private_dir

    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    with pytest.raises(PermissionError, match="belongs to uid 65534"):
        ensure_private_dir(foreign)
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    os.lchown(link, 65534, 65534)
    with pytest.raises(PermissionError, match="symbolic link"):
        ensure_private_dir(link)


def test_open_beneath_refuses_a_link_anywhere_below_the_base_and_makes_missing_directories(tmp_path):
    from berth import fsutil

    base, outside = tmp_path / "base", tmp_path / "outside"
    (base / "real").mkdir(parents=True)
    outside.mkdir()
    (outside / "f").write_text("outside\n")
    (base / "link").symlink_to(outside)
    (base / "real" / "file-link").symlink_to(outside / "f")
    for relative, link in (("link/f", "link"), ("link/deeper/f", "link"), ("real/file-link", "real/file-link")):
        with pytest.raises(OSError) as refused:
            os.close(fsutil.open_beneath(base, relative, os.O_RDONLY, make_mode=0o755))
        assert (refused.value.strerror.startswith("is a symbolic link"), refused.value.filename) == \
            (True, str(base / link)), relative
    assert not (outside / "deeper").exists()  # nothing was made through the link
    with pytest.raises(OSError) as climbing:
        fsutil.open_beneath(base, "real/../../outside/f", os.O_RDONLY)
    assert climbing.value.strerror == "'..' leaves the directory"
    # A link in base's own path is the caller's choice: followed.
    (tmp_path / "base-link").symlink_to(base)
    fd = fsutil.open_beneath(tmp_path / "base-link", "new/dir/f", os.O_WRONLY | os.O_CREAT, 0o600, make_mode=0o755)
    os.close(fd)
    assert (base / "new" / "dir" / "f").is_file()
    directory = fsutil.open_directory_beneath(base, "new/dir")
    try:
        assert os.listdir(fsutil.descriptor_path(directory)) == ["f"]
    finally:
        os.close(directory)


def test_check_own_dir_changes_nothing(tmp_path):
    from berth import fsutil

    path = tmp_path / "d"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    assert stat.S_ISDIR(fsutil.check_own_dir(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755  # check_private_dir would close it
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError):
        fsutil.check_own_dir(tmp_path / "file")


def test_private_dir_swapped_for_a_link_after_mkdir_changes_nothing_through_it(tmp_path, monkeypatch):
    """In a shared directory without the sticky bit, another user renames the directory berth
    just made and puts a link to a directory of the caller's in its place, between the mkdir
    and the chmod: the chmod went through the link and closed the target (here 0755 -> 0700)."""
    from berth import fsutil

    target = tmp_path / "public"
    target.mkdir()
    os.chmod(target, 0o755)
    real_mkdir = os.mkdir

    def mkdir_then_swap(path, mode=0o777, *args, **kwargs):
        real_mkdir(path, mode, *args, **kwargs)
        os.rename(path, f"{path}.moved")
        os.symlink(target, path)

    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    with pytest.raises(OSError):
        fsutil.make_private_dirs(tmp_path / "store")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755


@pytest.mark.parametrize("name", ["n" * 255, "é" * 127 + "x"])
def test_a_name_as_long_as_the_file_system_allows_is_written(tmp_path, name):
    """The temporary file's name is bounded too: a final name of 238 to 255 bytes (an S3 key's
    last part, a staged file's name) failed with ENAMETOOLONG, for the temporary name only."""
    from berth.fsutil import atomic_writer

    assert len(os.fsencode(name)) == 255
    with atomic_writer(tmp_path / name, mode=None) as out:
        out.write(b"data")
    assert os.listdir(tmp_path) == [name] and (tmp_path / name).read_bytes() == b"data"
    with pytest.raises(RuntimeError):  # the temporary file of a failed write goes too
        with atomic_writer(tmp_path / name, mode=None) as out:
            out.write(b"partial")
            raise RuntimeError("stopped")
    assert os.listdir(tmp_path) == [name] and (tmp_path / name).read_bytes() == b"data"


def _as_owner_of(path, body):
    """Run ``body()`` in a child with the uid and gid that own ``path`` (root bypasses the
    modes remove_tree must open up); the child's failure fails the test."""
    info = os.stat(path)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            if os.getuid() == 0:
                os.setgroups([])
                os.setresgid(info.st_gid, info.st_gid, info.st_gid)
                os.setresuid(info.st_uid, info.st_uid, info.st_uid)
            body()
            status = 0
        finally:
            os._exit(status)
    _, raw = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(raw) == 0


def _owned_by(user, path):
    if os.getuid() == 0:
        for root, dirs, files in os.walk(path):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.lchown(name, user.uid, user.gid)


def test_remove_tree_opens_closed_and_read_only_directories_as_the_user(user_tmp, user):
    from berth.fsutil import remove_tree

    tmp_path = user_tmp

    tree = tmp_path / "tree"
    for name in ("closed/inner", "readonly", "noexec", "readable"):
        (tree / name).mkdir(parents=True)
    for name in ("closed/inner/file", "readonly/file", "noexec/file", "readable/file", "top"):
        (tree / name).write_text("x")
    _owned_by(user, tmp_path)
    (tree / "closed" / "inner").chmod(0)
    (tree / "closed").chmod(0)
    (tree / "readonly").chmod(0o500)
    (tree / "noexec").chmod(0o600)
    (tree / "readable").chmod(0o400)
    tmp_path.chmod(0o755)
    _as_owner_of(tree, lambda: remove_tree(tree))
    assert not os.path.lexists(tree)


def test_remove_tree_removes_links_never_what_they_name(user_tmp, user):
    from berth.fsutil import remove_tree

    tmp_path = user_tmp

    outside = tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "d" / "keep").write_text("precious")
    (outside / "file").write_text("precious")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "to-dir").symlink_to(outside / "d")
    (tree / "to-file").symlink_to(outside / "file")
    linked = tmp_path / "linked"
    linked.symlink_to(outside)
    _owned_by(user, tmp_path)
    (outside / "d").chmod(0o500)
    tmp_path.chmod(0o755)

    def remove():
        remove_tree(tree)
        remove_tree(linked)  # a link given as the tree: left as it is

    _as_owner_of(tree, remove)
    assert not os.path.lexists(tree)
    assert (outside / "d" / "keep").read_text() == "precious" and (outside / "file").read_text() == "precious"
    assert stat.S_IMODE((outside / "d").stat().st_mode) == 0o500
    assert linked.is_symlink() and (outside / "d").is_dir()
    (outside / "d").chmod(0o700)


def _chain(directory: int, depth: int, *, branch_every: int = 0) -> None:
    """``depth`` nested directories ``d`` under the directory open as ``directory``, a file in
    each, and every ``branch_every`` levels a second chain ``e`` of 40 levels."""
    fd = os.dup(directory)
    for level in range(depth):
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
        if branch_every and level % branch_every == 0:
            os.mkdir("e", dir_fd=fd)
            branch = os.open("e", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            _chain(branch, 40)
            os.close(branch)
        os.mkdir("d", 0o500 if level % 7 == 0 else 0o700, dir_fd=fd)  # some read-only, as images have
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)


def test_remove_tree_removes_a_tree_deeper_than_the_open_files_limit(tmp_path):
    """remove_tree held one descriptor per level: below the open-files limit (RLIMIT_NOFILE,
    1024 by default; a container can nest its /tmp deeper) every open failed with EMFILE, and
    the tree was left in place, quietly. The limit here is what the process has open plus 24."""
    import resource

    from berth.fsutil import remove_tree

    tree = tmp_path / "tree"
    tree.mkdir()
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    _chain(fd, 300, branch_every=60)
    os.close(fd)

    def remove_with_few_descriptors():
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 24, hard))
        remove_tree(tree)

    _as_owner_of(tree, remove_with_few_descriptors)
    assert not tree.exists()


def test_remove_tree_removes_a_tree_deeper_than_the_recursion_limit(tmp_path):
    # A container can nest directories in its /tmp deeper than Python's recursion limit;
    # teardown must still remove them (a RecursionError escaped the recursive walk, and every
    # later run's clean-up walked into it again).
    import sys

    from berth.fsutil import remove_tree

    tree = tmp_path / "tree"
    tree.mkdir()
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(400):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(150)
    try:
        remove_tree(tree)
    finally:
        sys.setrecursionlimit(limit)
    assert not tree.exists()



def test_mountinfo_path_reads_every_octal_escape_the_kernel_writes():
    from berth import fsutil

    assert fsutil.mountinfo_path("/plain/path") == "/plain/path"
    assert fsutil.mountinfo_path(r"/a\040b\011c\012d\134e") == "/a b\tc\nd\\e"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs in a new mount namespace needs root here")
def test_a_mount_point_with_a_tab_or_a_newline_is_seen_mounted(tmp_path):
    """fuse.mounted_paths read only the space's escape: a state directory path with a tab, a
    newline or a backslash never matched, so a stale image mount there was never seen (review
    of 4 December). Real tmpfs mounts in a mount namespace of the test's own."""
    import subprocess
    import sys

    paths = [tmp_path / "tab\there", tmp_path / "new\nline", tmp_path / "back\\slash", tmp_path / "sp ace"]
    for path in paths:
        path.mkdir()
    code = ("import sys\nfrom berth.runtime import fuse\n"
            "print([fuse.is_mounted(path) for path in sys.argv[1:]])\n")
    shell = ('for path in "$@"; do mount -t tmpfs none "$path" || exit 1; done; '
             f'exec {sys.executable} -c "$CODE" "$@"')
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", shell, "sh",
                             *map(str, paths)], env={**os.environ, "CODE": code},
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str([True] * len(paths)), result.stderr


# --- who may change a file: writers_problem and private groups --------------------------------

class _Accounts:
    """Users and groups made for one test with the system's own tools (so that the user and
    group databases answer as on a site), all removed afterwards."""

    def __init__(self) -> None:
        import secrets

        self.prefix = "bw" + secrets.token_hex(3)
        self.users: list[str] = []
        self.groups: list[str] = []

    def _name(self, suffix: str) -> str:
        return f"{self.prefix}{suffix}"

    def group(self, suffix: str) -> str:
        import subprocess

        name = self._name(suffix)
        subprocess.run(["groupadd", "--system", name], check=True)
        self.groups.append(name)
        return name

    def user(self, suffix: str, primary: str | None = None) -> tuple[int, int, str]:
        """A user whose primary group is its private group of the same name (useradd's
        --user-group, RHEL's and Debian's default), or ``primary``; (uid, gid, name)."""
        import pwd
        import subprocess

        name = self._name(suffix)
        group = ["--user-group"] if primary is None else ["--no-user-group", "--gid", primary]
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", *group, name],
                       check=True)
        self.users.append(name)
        if primary is None:
            self.groups.append(name)
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid, name

    def add_member(self, group: str, user: str) -> None:
        import subprocess

        subprocess.run(["gpasswd", "--add", user, group], check=True, capture_output=True)

    def remove(self) -> None:
        import subprocess

        for name in reversed(self.users):
            subprocess.run(["userdel", name], capture_output=True)
        for name in reversed(self.groups):
            subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture
def accounts():
    from berth import fsutil

    if os.getuid() != 0:
        pytest.skip("needs root to make users and groups (groupadd, useradd)")
    made = _Accounts()
    fsutil.private_group_problem.cache_clear()  # a uid or gid freed by another test may be handed out again
    try:
        yield made
    finally:
        made.remove()
        fsutil.private_group_problem.cache_clear()


def _judge(path, uid, gid, mode):
    from berth.fsutil import writers_problem

    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return writers_problem(os.stat(path), uid)


def test_a_file_of_the_owner_s_private_group_is_not_writable_by_anyone_else(accounts, tmp_path):
    """RHEL-family sites give every user a group of their own (its primary group, named after
    it, no other member) and a umask of 002, so everything a user makes is 0664/0775 with that
    group. Nobody else can write through it, as OpenSSH's secure_permissions judges; berth
    refused every such file (a hand-written ~/.docker/config.json failed every pull)."""
    uid, gid, name = accounts.user("a")
    assert grp_name(gid) == name
    file, directory = tmp_path / "file", tmp_path / "dir"
    file.write_text("x")
    directory.mkdir()
    assert _judge(file, uid, gid, 0o664) is None
    assert _judge(directory, uid, gid, 0o775) is None
    assert _judge(file, uid, gid, 0o666) == "writable by others (mode 0666)"  # others: still refused
    assert _judge(directory, uid, gid, 0o777) == "writable by others (mode 0777)"
    accounts.add_member(name, name)  # listed as a member of its own group too: still private
    from berth import fsutil

    fsutil.private_group_problem.cache_clear()
    assert _judge(file, uid, gid, 0o664) is None


def grp_name(gid: int) -> str:
    import grp

    return grp.getgrgid(gid).gr_name


def test_a_group_others_belong_to_or_may_have_as_primary_group_is_refused_naming_it(accounts, tmp_path):
    """Every other way a group may hold someone else is refused, with the group, the mode and
    the reason named: a group with another member, a group named like the owner that is not
    its primary group, the owner's private group given to another user through its member
    list, a group with no member at all, and a primary group not named after its user (the
    'users' group every account of some sites has: who else has it as primary group only a
    walk of the whole user database could tell)."""
    file = tmp_path / "file"
    file.write_text("x")
    owner_uid, owner_gid, owner = accounts.user("o")
    other_uid, _, other = accounts.user("p")

    team = accounts.group("team")
    accounts.add_member(team, owner)
    accounts.add_member(team, other)
    assert _judge(file, owner_uid, grp_gid(team), 0o664) == \
        f"writable by group {team} (mode 0664), which has members other than you"

    named_like = accounts.group("n")
    named_uid, _, named = accounts.user("n", primary=team)  # a group of its name, but not its primary one
    assert named == named_like
    assert _judge(file, named_uid, grp_gid(named_like), 0o664) == \
        f"writable by group {named_like} (mode 0664), which is not your primary group"

    accounts.add_member(owner, other)  # the owner's private group, shared through its member list
    assert _judge(file, owner_uid, owner_gid, 0o664) == \
        f"writable by group {owner} (mode 0664), which has members other than you"

    empty = accounts.group("empty")
    assert _judge(file, other_uid, grp_gid(empty), 0o660) == \
        f"writable by group {empty} (mode 0660), which is not your primary group"

    shared = accounts.group("users")
    member_uid, _, _ = accounts.user("q", primary=shared)
    assert _judge(file, member_uid, grp_gid(shared), 0o664) == (
        f"writable by group {shared} (mode 0664), which is your primary group but not named after you as a "
        "private group is, so other users may have it as theirs too")

    unknown_gid = 4321
    import grp

    with pytest.raises(KeyError):
        grp.getgrgid(unknown_gid)
    assert _judge(file, other_uid, unknown_gid, 0o620) == \
        "writable by group 4321 (mode 0620), which has no entry in the group database"


def grp_gid(name: str) -> int:
    import grp

    return grp.getgrnam(name).gr_gid


def test_root_s_files_keep_group_root_and_are_judged_as_root_s(tmp_path):
    """Group root is root's own group; another group of a root-owned file is judged as the
    owner's (root's) private group would be, and the message says whose."""
    from berth.fsutil import writers_problem

    if os.getuid() != 0:
        pytest.skip("needs root to give a file to root and another group")
    file = tmp_path / "file"
    file.write_text("x")
    os.chown(file, 0, 0)
    os.chmod(file, 0o664)
    assert writers_problem(os.stat(file), 4242) is None
    os.chown(file, 0, 65534)
    import grp

    assert writers_problem(os.stat(file), 4242) == \
        f"writable by group {grp.getgrgid(65534).gr_name} (mode 0664), which is not root's primary group"


def _statvfs(free_bytes: int, free_inodes: int, *, total_inodes: int = 1 << 20):
    """A statvfs result for room_shortage (1 KiB fragments, as ext4 with 1 KiB blocks)."""
    return os.statvfs_result((1024, 1024, 1 << 30, free_bytes // 1024 + 50, free_bytes // 1024,
                              total_inodes, free_inodes + 7, free_inodes, 0, 255))


def test_room_shortage_counts_bytes_and_inodes_with_the_margin(tmp_path, monkeypatch):
    from berth.config.units import human_size

    seen = []
    monkeypatch.setattr(fsutil.os, "statvfs", lambda path: seen.append(path) or _statvfs(100 << 20, 1000))
    shortage = functools.partial(fsutil.room_shortage, tmp_path, show_size=human_size)
    assert shortage(100 << 20, 1000) is None  # exactly what is free fits
    assert shortage((100 << 20) + 1) == "it needs 100.0 MiB, 100.0 MiB free"
    assert shortage(60 << 20, 1001) == "it needs 1001 inodes, 1000 free"
    # The margin: a fraction of bytes and inodes, and bytes beyond (localcopy's 5% and 16 MiB).
    assert shortage(80 << 20, 900, margin=(0.05, 16 << 20)) is None  # 84 MiB + 16 MiB
    assert shortage(82 << 20, 900, margin=(0.05, 16 << 20)) == "it needs 102.1 MiB, 100.0 MiB free"
    assert shortage(50 << 20, 960, margin=(0.05, 0)) == "it needs 1008 inodes, 1000 free"
    # Bytes are said first when both are short.
    assert shortage(1 << 40, 1 << 30) == "it needs 1.0 TiB, 100.0 MiB free"
    assert seen and set(seen) == {tmp_path}


def test_a_file_system_that_counts_no_inodes_never_runs_short_of_them(tmp_path, monkeypatch):
    # btrfs says f_files 0 (and f_favail 0): no inode limit, not a full one.
    monkeypatch.setattr(fsutil.os, "statvfs", lambda path: _statvfs(1 << 30, 0, total_inodes=0))
    assert fsutil.free_room(tmp_path) == fsutil.Room(1 << 30, None)
    assert fsutil.room_shortage(tmp_path, 1 << 20, 10 ** 9, show_size=str) is None


def test_room_shortage_reads_the_real_file_system(tmp_path):
    fs = os.statvfs(tmp_path)
    free = fs.f_bavail * fs.f_frsize
    assert fsutil.free_room(tmp_path).free_bytes == free
    assert fsutil.room_shortage(tmp_path, 0, show_size=str) is None
    assert fsutil.room_shortage(tmp_path, free + (1 << 40), show_size=str).startswith(f"it needs {free + (1 << 40)}, ")


def test_room_shortage_lets_the_caller_decide_when_the_file_system_cannot_be_read(tmp_path, monkeypatch):
    def refuse(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fsutil.os, "statvfs", refuse)
    with pytest.raises(PermissionError):
        fsutil.room_shortage(tmp_path, 1, show_size=str)


def _set_acl(path, entries):
    """An access ACL (system.posix_acl_access, version 2) of (tag, perm, id) entries."""
    import struct

    os.setxattr(path, "system.posix_acl_access",
                struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries))


def test_a_file_of_the_owner_s_private_group_writable_through_an_acl_is_refused(accounts):
    """Where a file has an access ACL its group bits are the ACL's mask: a 0664 file of the
    owner's private group with ``user:bob:rw-`` is writable by bob, and the private-group rule
    accepted it (review 11; a named entry with write is refused now, naming it; one without
    write, or a mask without write, is fine)."""
    import shutil
    import tempfile
    from pathlib import Path

    uid, gid, _ = accounts.user("a")
    bob, _, bob_name = accounts.user("b")
    reachable = Path(tempfile.mkdtemp(prefix="berth-acl-", dir="/tmp"))  # pytest's is below a 0700 directory
    os.chmod(reachable, 0o755)
    try:
        _judge_acl(reachable / "config.json", uid, gid, bob, bob_name)
    finally:
        shutil.rmtree(reachable)


def _judge_acl(path, uid, gid, bob, bob_name):
    import subprocess

    from berth.fsutil import writers_problem

    path.write_text("{}\n")
    os.chown(path, uid, gid)
    os.chmod(path, 0o664)
    no_id = 0xFFFFFFFF
    _set_acl(path, [(0x01, 6, no_id), (0x02, 6, bob), (0x04, 6, no_id), (0x10, 6, no_id), (0x20, 4, no_id)])
    assert subprocess.run(["runuser", "-u", bob_name, "--", "sh", "-c", f": >> {path}"]).returncode == 0  # he can
    assert writers_problem(os.stat(path), uid, acl=str(path)) == \
        f"writable through its access ACL by user {bob} (mode 0664 shows the ACL's mask)"
    fd = os.open(path, os.O_RDONLY)
    try:
        assert writers_problem(os.fstat(fd), uid, acl=fd) is not None
    finally:
        os.close(fd)
    _set_acl(path, [(0x01, 6, no_id), (0x02, 4, bob), (0x04, 6, no_id), (0x10, 6, no_id), (0x20, 4, no_id)])
    assert writers_problem(os.stat(path), uid, acl=str(path)) is None  # bob may read only
    os.removexattr(path, "system.posix_acl_access")
    os.chmod(path, 0o664)
    assert writers_problem(os.stat(path), uid, acl=str(path)) is None  # no ACL: the private group alone
