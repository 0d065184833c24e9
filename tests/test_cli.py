from __future__ import annotations

from click.testing import CliRunner

import afpx
from afpx.cli import main


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert afpx.__version__ in result.output


def test_import_afpx_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, afpx, afpx.schema, afpx.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
