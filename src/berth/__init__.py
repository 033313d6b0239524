"""berth: containers for HPC batch jobs.

Images come from OCI registries into one verified SquashFS file each; containers run
unprivileged (user namespaces, FUSE, rootless runc) as the submitting user; admins publish
container templates and site policy; jobs run through a scheduler backend (local or Slurm).
"""

import sys

__version__ = "0.1.0"


class _PathlibWithoutUrllibParse:
    """An import hook (first in ``sys.meta_path``, once) that lets pathlib be imported without
    the urllib.parse it imports for ``PurePath.as_uri`` alone.

    pathlib binds ``urllib.parse.quote_from_bytes`` when it is imported, and urllib.parse
    imports ipaddress: ~2.2 ms of the start of every berth command that uses pathlib, `berth
    run`'s included (issue 10, target 3), for a method berth never calls. While pathlib's code
    runs, a stand-in module offers a ``quote_from_bytes`` that imports the real urllib.parse on
    its first call; the stand-in leaves ``sys.modules`` as soon as pathlib is loaded, so
    whatever imports urllib.parse later gets the real module. Nothing changes where pathlib or
    urllib.parse is imported already (tests), and nothing is imported before pathlib is."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "pathlib":
            return None
        sys.meta_path.remove(cls)  # itself: after a reload of berth the module's name is another class
        if "urllib.parse" in sys.modules:
            return None
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        loader, stand_in = spec.loader, type(sys)("urllib.parse", "berth's stand-in while pathlib is imported")
        exec_module = loader.exec_module

        def quote_from_bytes(bs, safe="/"):
            from urllib.parse import quote_from_bytes as real

            return real(bs, safe)

        def exec_with_stand_in(module):
            # Once: the loader is pathlib's own for good (a reload or an exec_module through
            # this spec again runs pathlib as Python would), and a real urllib.parse imported
            # meanwhile is never replaced (it was, and then dropped from sys.modules).
            del loader.exec_module
            if "urllib.parse" in sys.modules:
                return exec_module(module)
            sys.modules["urllib.parse"] = stand_in
            try:
                exec_module(module)
            finally:
                if sys.modules.get("urllib.parse") is stand_in:
                    del sys.modules["urllib.parse"]

        stand_in.quote_from_bytes = quote_from_bytes
        loader.exec_module = exec_with_stand_in
        return spec


if "pathlib" not in sys.modules and not any(getattr(finder, "__qualname__", "") == "_PathlibWithoutUrllibParse"
                                           for finder in sys.meta_path):  # once, a reload of berth too
    sys.meta_path.insert(0, _PathlibWithoutUrllibParse)
