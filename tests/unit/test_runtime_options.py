"""berth run options: parsing, validation, template custom strings, command composition."""

import pytest

from berth.errors import RuntimeFailure, UsageError
from berth.runtime.options import MountRequest, parse_custom, parse_mount, parse_run_options
from berth.runtime.plan import compose_command


def test_mount_syntax():
    assert parse_mount("/a:/b") == MountRequest("/a", "/b", read_only=False)
    assert parse_mount("/a:/b:ro") == MountRequest("/a", "/b", read_only=True)
    for bad in ("/a", "/a:", ":/b", "/a:/b:rx", "/a:/b:ro:x"):
        with pytest.raises(UsageError, match="--mount"):
            parse_mount(bad)


def test_run_options_parse_every_option():
    options = parse_run_options([
        "-v", "/data:/data:ro", "--mount", "/s:/s", "-w", "/work", "-e", "A=1", "-e", "B", "--env-file", "/f",
        "--network", "none", "--device", "/dev/fuse", "--cpus", "2.5", "--memory", "1G", "--stop-timeout", "3",
        "-t", "--name", "job-1", "--pull", "never", "--debug", "--writable", "--remap-root", "--no-mount-home",
        "--entrypoint", "/bin/sh", "--hostname", "box",
    ])
    assert options.mounts == (MountRequest("/data", "/data", True), MountRequest("/s", "/s", False))
    assert (options.workdir, options.env, options.env_files) == ("/work", ("A=1", "B"), ("/f",))
    assert (options.network, options.devices) == ("none", ("/dev/fuse",))
    assert (options.cpus, options.memory_bytes) == (2.5, 1 << 30)
    assert (options.stop_timeout_s, options.tty, options.name, options.pull) == (3.0, True, "job-1", "never")
    assert options.debug and options.writable and options.remap_root and not options.mount_home
    assert (options.entrypoint, options.hostname) == ("/bin/sh", "box")


def test_docker_habits_rm_and_it_are_accepted():
    """Issue 11: `berth run --rm -it IMAGE` as with docker (berth always removes its containers)."""
    for argv in (["--rm", "-it"], ["-it", "--rm"], ["-ti"], ["--rm", "-i", "-t"]):
        options = parse_run_options(argv)
        assert options.tty is True, argv
    assert parse_run_options(["--rm"]).tty is False


def test_defaults():
    options = parse_run_options([])
    assert options.mount_home and not options.writable and options.stop_timeout_s == 10.0
    assert options.network is None and options.pull == "missing"


@pytest.mark.parametrize("argv,message", [
    (["-w", "relative"], "--workdir"),
    (["-e", "1BAD=x"], "-e"),
    (["--cpus", "0"], "--cpus"),
    (["--stop-timeout", "-1"], "--stop-timeout"),
    (["--name", "bad name"], "--name"),
    (["--network", "bridge"], "invalid choice"),
    (["image"], "unexpected argument"),
])
def test_bad_options_are_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_run_options(argv)


def test_custom_strings_are_shell_split():
    options = parse_custom("--cpus 2 -e 'GREETING=hello world' -v /scratch:/scratch")
    assert options.cpus == 2 and options.env == ("GREETING=hello world",)
    with pytest.raises(UsageError, match="custom options"):
        parse_custom("-e 'unterminated")


def test_command_composition_follows_docker():
    config = {"Entrypoint": ["/entry"], "Cmd": ["default"]}
    assert compose_command(config, None, None, "img") == ["/entry", "default"]
    assert compose_command(config, ["mine", "x"], None, "img") == ["/entry", "mine", "x"]
    assert compose_command(config, ["x"], "/other", "img") == ["/other", "x"]
    assert compose_command(config, None, "/other", "img") == ["/other"]
    assert compose_command({"Cmd": "echo hi"}, None, None, "img") == ["/bin/sh", "-c", "echo hi"]
    with pytest.raises(UsageError, match="no entrypoint or command"):
        compose_command({}, None, None, "img")
    with pytest.raises(RuntimeFailure, match="Entrypoint"):
        compose_command({"Entrypoint": [1, 2]}, None, None, "img")
