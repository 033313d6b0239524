"""Site policy: the TOML mapping onto SitePolicy, accumulation across drop-ins, and its checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from berth.config.settings import EnvOp, GroupPolicy, Mount, RegistryPolicy
from berth.errors import ConfigError
from tests.unit.test_config import Site

SITE_FILE = """\
runtime = "runc"
site_store = "/srv/berth/store"
stage_to_local = true

[policy]
devices = ["/dev/fuse"]
mount_allow = ["/home", "/scratch/"]
mount_deny_sources = ["/etc/shadow"]
trusted_registries = ["registry.site.example", "127.0.0.1:5000"]
passthrough_env = ["SLURM_*", "LANG"]

[policy.namespaces]
network = "none"
pid = "private"

[[policy.mounts]]
source = "/scratch"
optional = true
read_only = false

[[policy.mounts]]
source = "/apps/site"
destination = "/opt/site"

[[policy.env]]
op = "prepend"
name = "PATH"
value = "/opt/site/bin"

[[policy.env]]
op = "unset"
name = "LD_PRELOAD"

[[policy.groups]]
group = "gpu"
devices = ["/dev/nvidia0", "/dev/nvidiactl"]
env = [{op = "set", name = "GPU_SITE", value = "1"}]

[[policy.groups.mounts]]
source = "/usr/lib/nvidia"

[[registries]]
host = "127.0.0.1:5000"
insecure = true
"""


@pytest.fixture
def site(tmp_path) -> Site:
    return Site(tmp_path)


def test_full_policy_maps_onto_the_model(site):
    site.write("berth.toml", SITE_FILE)
    site.write("conf.d/50-more.toml", '[[policy.mounts]]\nsource = "/project"\n\n'
                                      '[[policy.env]]\nop = "append"\nname = "MANPATH"\nvalue = "/opt/man"\n'
                                      'separator = ";"\n')
    settings = site.load()
    policy = settings.policy
    assert policy.mounts == (
        Mount("/scratch", "/scratch", read_only=False, optional=True),
        Mount("/apps/site", "/opt/site", read_only=True, optional=False),
        Mount("/project", "/project"),
    )
    assert policy.env == (EnvOp("prepend", "PATH", "/opt/site/bin"), EnvOp("unset", "LD_PRELOAD"),
                          EnvOp("append", "MANPATH", "/opt/man", ";"))
    assert policy.groups == (GroupPolicy("gpu", mounts=(Mount("/usr/lib/nvidia", "/usr/lib/nvidia"),),
                                         devices=("/dev/nvidia0", "/dev/nvidiactl"),
                                         env=(EnvOp("set", "GPU_SITE", "1"),)),)
    assert policy.devices == ("/dev/fuse",)
    assert policy.mount_allow == ("/home", "/scratch")  # normalized: no trailing slash
    assert policy.mount_deny_sources == ("/etc/shadow",)  # replaced, not appended
    assert policy.trusted_registries == ("registry.site.example", "127.0.0.1:5000")
    assert policy.forced_namespaces == (("network", "none"), ("pid", "private"))
    assert policy.passthrough_env == ("SLURM_*", "LANG")
    assert settings.registries == (RegistryPolicy("127.0.0.1:5000", insecure=True, trusted=True),)
    assert settings.registry("127.0.0.1:5000").insecure is True
    assert settings.registry("other.example") == RegistryPolicy("other.example")
    assert settings.stage_to_local is True and str(settings.site_store) == "/srv/berth/store"
    assert settings.sources["policy.mounts[2]"] == f"{site.config_dir}/conf.d/50-more.toml:1"
    group_line = SITE_FILE.splitlines().index("[[policy.groups]]") + 1
    assert settings.sources["policy.groups[0]"] == f"{site.config_dir}/berth.toml:{group_line}"


@pytest.mark.parametrize("text, message", [
    ('[[policy.mounts]]\nsource = "scratch"\n', ":2: policy.mounts[0].source: must be an absolute path, not 'scratch'"),
    ('[[policy.mounts]]\ndestination = "/x"\n', ":1: policy.mounts[0]: missing required key 'source'"),
    ('[[policy.mounts]]\nsource = "/a"\ndestination = "/"\n',
     ":3: policy.mounts[0].destination: cannot mount over the container's root directory '/'"),
    ('[[policy.mounts]]\nsource = "/a"\n\n[[policy.mounts]]\nsource = "/b"\nreadonly = true\n',
     ":6: policy.mounts[1].readonly: unknown key"),
    ('[[policy.env]]\nop = "replace"\nname = "A"\nvalue = "1"\n', ":2: policy.env[0].op: 'replace' is not one of: set, prepend, append, unset"),
    ('[[policy.env]]\nop = "set"\nname = "1A"\nvalue = "1"\n', ":3: policy.env[0].name: '1A' is not a variable name"),
    ('[[policy.env]]\nop = "set"\nname = "A"\n', ":1: policy.env[0]: op 'set' needs a 'value'"),
    ('[[policy.env]]\nop = "unset"\nname = "A"\nvalue = "x"\n', ":4: policy.env[0].value: op 'unset' takes no 'value'"),
    ('[[policy.env]]\nop = "set"\nname = "A"\nvalue = "1"\nseparator = ","\n',
     ":5: policy.env[0].separator: op 'set' takes no 'separator'"),
    ('[policy]\ndevices = ["/tmp/x"]\n', ":2: policy.devices[0]: '/tmp/x' is not a device path under /dev/"),
    ('[policy.namespaces]\nnetwork = "private"\n', ":2: policy.namespaces.network: 'private' is not one of: none, host"),
    ('[policy.namespaces]\nuser = "host"\n', ":2: policy.namespaces.user: unknown key"),
    ('[policy]\ntrusted_registries = ["https://x.example"]\n',
     ":2: policy.trusted_registries[0]: 'https://x.example' is not a registry host"),
    ('[policy]\npassthrough_env = ["A B"]\n', ":2: policy.passthrough_env[0]: 'A B' is not a variable name or glob"),
    ('[[policy.groups]]\ngroup = "gpu users"\n', ":2: policy.groups[0].group: 'gpu users' is not a Unix group name"),
    ('[[policy.groups]]\ngroup = "gpu"\n[[policy.groups.mounts]]\nsource = "rel"\n',
     ":4: policy.groups[0].mounts[0].source: must be an absolute path"),
    ('[[registries]]\nhost = "a.example"\n[[registries]]\nhost = "a.example"\n',
     ":3: registries: host 'a.example' is already configured at"),
    ('policy = "strict"\n', ":1: policy: must be a table ([policy])"),
    ('[[registries]]\nhost = "a.example"\ninsecure = "yes"\n', ":3: registries[0].insecure: must be a boolean"),
])
def test_policy_errors_name_file_line_and_key(site, text, message):
    path = site.write("berth.toml", text)
    with pytest.raises(ConfigError) as caught:
        site.load()
    assert caught.value.message.startswith(str(path) + message), caught.value.message


def test_nested_group_tables_get_their_own_lines(site):
    path = site.write("berth.toml", '[[policy.groups]]\ngroup = "a"\n\n[[policy.groups]]\ngroup = "b"\n'
                                    '[[policy.groups.env]]\nop = "set"\nname = "X"\nvalue = 1\n')
    with pytest.raises(ConfigError) as caught:
        site.load()
    assert caught.value.message == f"{path}:9: policy.groups[1].env[0].value: must be a string, not an integer (1)"


def _doc_blocks() -> list[str]:
    text = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    return re.findall(r"```toml\n(.*?)```", text, flags=re.S)


def test_documented_examples_load(site):
    """docs/configuration.md's example site file, drop-in and user file are valid as written."""
    site_text, dropin_text, user_text = _doc_blocks()[:3]
    site.write("berth.toml", site_text)
    site.write("conf.d/50-mpi.toml", dropin_text)
    site.write_user(user_text)
    settings = site.load()
    assert settings.runtime == "runc" and settings.pinned == ("runtime",)
    assert [m.destination for m in settings.policy.mounts] == ["/scratch", "/opt/site", "/opt/openmpi-host"]
    assert settings.policy.groups[0].group == "rdma" and len(settings.policy.groups[0].mounts) == 1
    assert settings.devices.groups == (("rdma", ("/dev/infiniband/*",)),)
    assert settings.user_store == site.home / "scratch/berth-images" and settings.backend == "local"
    assert settings.pull_parallel == 8
