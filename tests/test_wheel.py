"""The built wheel, installed in a fresh virtualenv, runs from outside the checkout.

What users install is the wheel, not this tree: a file read from the source tree (the event
schema once was), a module left out of the package list, or a dependency only the dev extra
brings makes `cmsync` fail there while every other test passes. This test builds the wheel
from a copy of the tree (the checkout gets no build/ or egg-info), installs it with its
dependencies and the ``demo`` extra into a clean virtualenv (no system site-packages, pip's
configured index and cache), and from a directory outside the checkout runs ``cmsync --help``,
``--version``, ``run --help``, ``check-config`` on a sample destinations file, and a small
``cmsync demo``. About 40 s, most of it the demo and the install.

It runs in `make test` and in CI. Skip it only on purpose: ``CMSYNC_TEST_SKIP_WHEEL=1``
(ignored when ``CMSYNC_REQUIRE_TOOLS=1``, as in CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import consumer

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "cm-api-key-wheel-0f1e2d3c"
LIST_ID = "0123456789abcdef0123456789abcdef"
DEMO_EVENTS = "2000"  # about 12 s of demo: enough to sync and verify every list

pytestmark = pytest.mark.skipif(
    os.environ.get("CMSYNC_TEST_SKIP_WHEEL") == "1"
    and os.environ.get("CMSYNC_REQUIRE_TOOLS") != "1",
    reason="CMSYNC_TEST_SKIP_WHEEL=1 asked to skip the installed-wheel test",
)


def run(args: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> str:
    """Run a command to completion; its stdout and stderr together, failing on a non-zero exit."""
    # S603: fixed arguments built by this test, no untrusted input
    done = subprocess.run(  # noqa: S603
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{output}"
    return output


def source_packages() -> set[str]:
    """The packages the tree defines: consumer/ and its subpackages, and the schemas folder."""
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "consumer").rglob("__init__.py")
    }
    return found | {"consumer.schemas"}


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*_cache", ".hypothesis", "build", "dist", "*.egg-info"
        ),
    )
    dist = tmp_path / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)],
        cwd=tmp_path,
        env=dict(os.environ),
        timeout=180,
    )
    (wheel,) = dist.glob("cmsync-*.whl")
    return wheel


def test_the_wheel_installed_in_a_fresh_venv_runs_from_outside_the_checkout(
    tmp_path: Path,
) -> None:
    wheel = build_wheel(tmp_path)
    assert wheel.name.startswith(f"cmsync-{consumer.__version__}-")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    packaged = {
        ".".join(Path(name).parent.parts) for name in names if name.endswith("/__init__.py")
    }
    missing = source_packages() - packaged
    assert not missing, f"packages missing from pyproject's [tool.setuptools] packages: {missing}"
    assert "consumer/schemas/segment-membership.v1.json" in names
    assert not any(name.startswith("consumer/schemas/examples/") for name in names)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=dict(os.environ), timeout=120)
    bin_dir = venv / "bin"
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("CMSYNC_") and name not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", f"{wheel}[demo]"],
        cwd=tmp_path,
        env=env,
        timeout=600,
    )

    elsewhere = tmp_path / "elsewhere"  # outside the checkout: nothing can be read from it
    elsewhere.mkdir()
    cmsync = str(bin_dir / "cmsync")

    def cli(*args: str, extra: dict[str, str] | None = None, timeout: float = 60) -> str:
        return run([cmsync, *args], cwd=elsewhere, env=env | (extra or {}), timeout=timeout)

    where = run(
        [
            str(bin_dir / "python"),
            "-c",
            "import importlib.metadata, consumer, consumer.events; "
            "print(importlib.metadata.version('cmsync'), consumer.__file__)",
        ],
        cwd=elsewhere,
        env=env,
        timeout=60,
    )
    version, module_file = where.split()
    assert version == consumer.__version__
    assert Path(module_file).is_relative_to(venv), "consumer must come from the installed wheel"

    assert "check-config" in cli("--help")
    assert cli("--version").strip() == f"cmsync {consumer.__version__}"
    assert cli("run", "--help").startswith("usage: cmsync run")  # it once ended in a traceback

    destinations = elsewhere / "destinations.toml"
    destinations.write_text(
        f'[[destination]]\nname = "vip-newsletter"\nsegment_id = "vip-customers"\n'
        f'list_id = "{LIST_ID}"\nemail_field = "email"\n',
        encoding="utf-8",
    )
    key_file = elsewhere / "api-key"
    key_file.write_text(API_KEY + "\n", encoding="utf-8")
    checked = cli(
        "check-config",
        extra={
            "CMSYNC_KAFKA_BOOTSTRAP_SERVERS": "kafka-0:9092",
            "CMSYNC_DESTINATIONS_FILE": str(destinations),
            "CMSYNC_CM_API_KEY_FILE": str(key_file),
        },
    )
    assert '[destination "vip-newsletter"]' in checked
    assert "*** (set)" in checked
    assert API_KEY not in checked

    demo = cli("demo", "--events", DEMO_EVENTS, timeout=180)
    assert "every list matches" in demo
