"""Running berth as the unprivileged test user, the way a real user would."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def venv_dir() -> Path:
    return Path(os.environ.get("BERTH_VENV") or REPO / ".venv")


def berth_executable() -> Path:
    return venv_dir() / "bin" / "berth"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path

    @classmethod
    def lookup(cls, name: str) -> "User":
        entry = pwd.getpwnam(name)
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))

    def base_env(self, **extra: str) -> dict[str, str]:
        """A clean login-like environment for this user (nothing of root's leaks in)."""
        env = {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": f"{venv_dir() / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
        }
        if os.environ.get("BERTH_CONFIG_DIR"):
            env["BERTH_CONFIG_DIR"] = os.environ["BERTH_CONFIG_DIR"]
        env.update(extra)
        return env

    def run(self, argv, *, env=None, check=False, timeout=300, input=None, cwd=None, **kwargs):
        """Run ``argv`` as this user (via runuser when we are root) and capture its output."""
        full_env = self.base_env(**(env or {}))
        cmd = list(argv)
        if os.getuid() == 0 and self.uid != 0:
            cmd = ["runuser", "-u", self.name, "--", "env", "-i", *[f"{k}={v}" for k, v in full_env.items()], *cmd]
            full_env = None
        return subprocess.run(
            cmd,
            env=full_env,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            cwd=cwd or "/",
            **kwargs,
        )

    def berth(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run([str(berth_executable()), *args], **kwargs)

    def tempdir(self, prefix: str = "berth-test-") -> Path:
        """A fresh directory owned by this user in a place every user can traverse."""
        path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        os.chmod(path, 0o755)
        if os.getuid() == 0:
            shutil.chown(path, self.uid, self.gid)
        return path


def describe(result: subprocess.CompletedProcess) -> str:
    """Everything about a finished command, for assertion messages."""
    return f"argv={result.args!r}\nexit={result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def python() -> str:
    return sys.executable
