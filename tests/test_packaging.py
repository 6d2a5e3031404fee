"""The wheel ships the prebuilt lab extension, so installing it needs no Node."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_contains_the_built_extension(tmp_path: Path) -> None:
    if not (ROOT / "oomnb" / "labextension" / "package.json").exists():
        pytest.fail("the lab extension is not built: run `make lab`")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("oomnb-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    share = "oomnb-0.1.0.data/data/share/jupyter/labextensions/oomnb/"
    assert share + "package.json" in names
    assert share + "install.json" in names
    assert any(n.startswith(share + "static/remoteEntry.") for n in names)
    assert "oomnb/py.typed" in names
    assert "oomnb/schema/report.schema.json" in names
