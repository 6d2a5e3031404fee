"""Packaging from a clean clone: the sdist carries the built lab extension, and a wheel
built from that sdist (without Node) installs an extension JupyterLab lists as enabled and OK.

This is what ``pip install`` of an sdist, ``pip install git+...`` and Binder
do; before, they exited 0 with no extension at all.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _clean_clone(into: Path) -> Path:
    """The files a fresh clone of this tree has (tracked, or new and not ignored); nothing built."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        source = ROOT / raw.decode()
        if source.is_file():
            target = into / raw.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    assert not (into / "oomnb" / "labextension").exists()
    return into


def _run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)  # type: ignore[call-overload]
    if done.returncode:
        pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


@pytest.mark.slow
def test_sdist_from_a_clean_clone_then_wheel_without_node_installs_an_ok_extension(tmp_path: Path) -> None:
    if shutil.which("node") is None:
        pytest.fail("building an sdist from source needs Node (the lab extension is built then)")
    source = _clean_clone(tmp_path / "clone")
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path / "dist"), str(source)])
    (sdist,) = (tmp_path / "dist").glob("oomnb-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    root = names[0].split("/")[0]
    version = root.removeprefix("oomnb-")
    assert f"{root}/oomnb/labextension/package.json" in names
    assert any(n.startswith(f"{root}/oomnb/labextension/static/remoteEntry.") for n in names)
    assert not [n for n in names if any(part in n for part in (".hypothesis", "__pycache__", "node_modules"))]

    # A wheel from the sdist with no Node on PATH: the built extension is used as it is.
    no_node = tmp_path / "bin"
    no_node.mkdir()
    env = {**os.environ, "PATH": str(no_node)}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheel"), str(sdist)], env=env)
    (wheel,) = (tmp_path / "wheel").glob("oomnb-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    share = f"oomnb-{version}.data/data/share/jupyter/labextensions/oomnb/"
    assert share + "package.json" in names and share + "install.json" in names
    assert any(n.startswith(share + "static/remoteEntry.") for n in names)
    assert "oomnb/py.typed" in names and "oomnb/schema/report.schema.json" in names
    assert "oomnb/_version.py" in names

    # A fresh environment with the wheel and the JupyterLab this project is tested with.
    import jupyterlab

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    _run([*pip, "--no-deps", str(wheel)])
    _run([*pip, f"jupyterlab=={jupyterlab.__version__}"])
    listed = _run([str(venv / "bin" / "jupyter"), "labextension", "list"])
    text = re.sub(r"\x1b\[[0-9;]*m", "", listed.stdout + listed.stderr)  # no colours
    assert f"oomnb v{version} enabled OK (python, oomnb)" in " ".join(text.split()), text
    print(f"\n{sdist.name} -> {wheel.name}: " + next(line.strip() for line in text.splitlines() if "oomnb v" in line))
