"""`berth run` start-up is a product feature: its import path stays free of heavy modules."""

import subprocess
import sys

HEAVY = ("urllib3", "tarfile", "ssl", "http.client", "ctypes", "email.message", "concurrent.futures",
         "zipfile", "xml.etree.ElementTree")


def test_run_path_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from berth.cli.main import build_parser\n"
        "args = build_parser().parse_args(['run', '--cpus', '1', '-v', '/a:/b', 'x:1', 'true'])\n"
        "import berth.cli.run, berth.runtime.container, berth.image.api, berth.config.load\n"
        "from berth.runtime.options import options_from_namespace\n"
        "options_from_namespace(args)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
