"""The one build step pyproject.toml cannot declare: compile berth-init and berth-launcher into
the package, and the command ``berth`` itself (berth-front, BuildFrontEnd) into its scripts.

berth-init (src/berth/runtime/init/berth-init.c) is PID 1 of every container and must be a static
executable, so that it runs in images with any libc or none. berth-launcher (berth-launcher.c
beside it) runs the containers' config.json without runc (issue 10); static too, so that a
node's libc does not matter. Both are compiled here, as part of every package build -- ``pip
install .``, a wheel, ``pip install -e .`` -- into ``berth/runtime/init/`` next to their sources,
where ``berth.runtime.ocirt.init_path`` and ``launcher_path`` find them (issue 9: a ``pip
install`` used to give a berth without berth-init, which could run nothing).

Needs a C compiler and a static C library: Debian and Ubuntu ``gcc libc6-dev``, RHEL and Fedora
``gcc glibc-static``. ``CC`` names another compiler. Without them the build stops and says so:
an installed berth that cannot start containers would only fail later, on a compute node.
The metadata stays in pyproject.toml.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py
from distutils.command.build_scripts import build_scripts  # setuptools provides distutils (no setuptools.command.build_scripts)
from distutils.command.install_scripts import install_scripts as copy_scripts
from setuptools.command.install_scripts import install_scripts
from setuptools.errors import CompileError

HERE = Path(__file__).resolve().parent
#: The programs, each compiled from NAME.c; where each goes, relative to the directory that
#: holds the ``berth`` package.
PROGRAMS = ("berth-init", "berth-launcher")
SOURCES = HERE / "src" / "berth" / "runtime" / "init"
TARGETS = Path("berth") / "runtime" / "init"
FIX = ("install a C compiler and a static C library (Debian/Ubuntu: apt-get install gcc libc6-dev; "
       "RHEL/Fedora: dnf install gcc glibc-static) and install berth again")


def compile_program(name: str, output: Path) -> None:
    """Compile ``name`` statically into ``output`` (written under a temporary name, then
    renamed, so an interrupted build leaves no half-written executable)."""
    compiler = shlex.split(os.environ.get("CC") or "gcc")
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    argv = [*compiler, "-static", "-Os", "-Wall", "-Wextra", "-o", str(temporary), str(SOURCES / f"{name}.c")]
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except OSError as error:
        raise CompileError(f"cannot build {name}: {compiler[0]}: {error.strerror}; {FIX}") from None
    if result.returncode != 0:
        temporary.unlink(missing_ok=True)
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise CompileError(f"cannot build {name} ({shlex.join(argv)} failed):\n{tail}\n{FIX}")
    os.chmod(temporary, 0o755)
    os.replace(temporary, output)


class BuildPyWithInit(build_py):
    """build_py, then berth-init and berth-launcher: into the build tree for a wheel, into the
    source tree for an editable install (whose ``berth`` package is imported from src/)."""

    def run(self) -> None:
        super().run()
        for name in PROGRAMS:
            compile_program(name, self._output(name))

    def _output(self, name: str) -> Path:
        root = HERE / "src" if self.editable_mode else Path(self.build_lib)
        return root / TARGETS / name

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs += [str(self._output(name)) for name in PROGRAMS]
        return outputs


class BuildFrontEnd(build_scripts):
    """The ``berth`` command is berth-front (src/berth/runtime/init/berth-front.c, static like
    the others): a script of the wheel, installed by pip into the same directory as the console
    script ``berth-py`` it execs for everything it does not run itself (a binary script is copied
    as it is: pip rewrites only a ``#!python`` first line). Found there through /proc/self/exe,
    so a venv, ``pip install --user`` and an editable install all work alike."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.scripts = self.scripts or []  # none of Python's: only the compiled one

    def get_source_files(self) -> list[str]:
        return [str((SOURCES / "berth-front.c").relative_to(HERE))]

    def run(self) -> None:
        super().run()
        compile_program("berth-front", Path(self.build_dir) / "berth")

    def get_outputs(self) -> list[str]:
        return [str(Path(self.build_dir) / "berth")]


class InstallFrontEnd(install_scripts):
    """setuptools' install_scripts writes the console scripts but copies the built scripts only
    when setup() names some (Python ones): copy the front end too (into the wheel's
    ``.data/scripts``, which pip installs beside the console scripts)."""

    def run(self) -> None:
        super().run()
        if not self.distribution.scripts:
            copy_scripts.run(self)


class BinaryDistribution(Distribution):
    """The package holds a Linux executable: it is not pure Python (platlib, platform wheel);
    and a script, the compiled front end ``berth`` (BuildFrontEnd)."""

    def has_ext_modules(self) -> bool:
        return True

    def has_scripts(self) -> bool:
        return True


class PlatformWheel(bdist_wheel):
    """Tag the wheel for the platform its executable runs on (py3-none-linux_x86_64), but for any
    Python 3: no extension module ties it to one interpreter."""

    def get_tag(self) -> tuple[str, str, str]:
        _python, _abi, platform = super().get_tag()
        return "py3", "none", platform


setup(distclass=BinaryDistribution,
      cmdclass={"build_py": BuildPyWithInit, "build_scripts": BuildFrontEnd, "install_scripts": InstallFrontEnd,
                "bdist_wheel": PlatformWheel})
