"""A user's-eye check: the pytest fixtures work from an installed wheel, outside this repository, on both backends.

Builds the kcons wheel, installs it (with the [postgres] and [testcontainers] extras and
pytest) into a fresh virtualenv in a temporary folder, writes the README's example
``conftest.py`` and ``test_orders.py`` there (they use ``kafka_bootstrap``, ``make_producer``,
``make_consumer``, ``redis_client`` and ``fresh_database`` as a user's suite would), and runs
pytest on them once per backend with no ``KCONS_*`` server settings, so every server is started
by the installed package itself.

The testcontainers run needs a Docker engine: ``DOCKER_HOST`` as given, else the project's
own engine (``deploy/local/docker.sh``); images as ``KCONS_TC_*_IMAGE`` say, else the local
images built by ``deploy/local/images/build.sh`` when the public ones cannot be pulled here.

Last line: ``{"name": "fixtures_from_wheel", "backends": {...}, "passed": N, "failed": N, "ok": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

INSTALLED_CHECK = '''\
"""The package under test is the installed wheel, not a checkout on the path."""

from pathlib import Path

import kcons


def test_kcons_is_the_installed_wheel():
    assert "site-packages" in Path(kcons.__file__).parts
'''


def readme_example() -> dict[str, str]:
    """The example files of the README's "Testing your application" section, by name (``# name.py`` first line)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Testing your application") :]
    section = section[: section.find("\n## ", 1)]
    files = {}
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.S):
        first = block.splitlines()[0]
        if re.fullmatch(r"# [a-z_]+\.py", first):
            files[first[2:]] = block
    if "conftest.py" not in files or not any(n.startswith("test_") for n in files):
        raise SystemExit("README.md's 'Testing your application' section lost its conftest.py/test_*.py example")
    return files


def _run(
    cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 1800
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd, env=env, timeout=timeout)


def _build_wheel(out: Path) -> Path:
    """Build from a copy of the repository's tracked files, so the checkout gets no build output."""
    src = out.parent / "src"
    listed = _run(["git", "-C", str(REPO), "ls-files", "-z"])
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    res = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)])
    if res.returncode != 0:
        raise SystemExit(f"wheel build failed:\n{res.stdout}{res.stderr}")
    return next(out.glob("kcons-*.whl"))


def _make_venv(where: Path, wheel: Path) -> Path:
    res = _run([sys.executable, "-m", "venv", str(where)])
    if res.returncode != 0:
        raise SystemExit(f"venv failed:\n{res.stderr}")
    python = where / "bin" / "python"
    res = _run([str(python), "-m", "pip", "install", "-q", f"{wheel}[postgres,testcontainers]", "pytest>=8"])
    if res.returncode != 0:
        raise SystemExit(f"installing the wheel failed:\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
    return python


def _docker_env() -> dict[str, str]:
    """Settings for the testcontainers run: the caller's, else the project's own engine and local images."""
    env: dict[str, str] = {}
    if not os.environ.get("DOCKER_HOST"):
        res = _run(["bash", str(REPO / "deploy/local/docker.sh"), "start"])
        if res.returncode != 0:
            raise SystemExit(f"no Docker engine: {res.stderr[-2000:]}")
        env.update(_exports(res.stdout))
    if not all(os.environ.get(f"KCONS_TC_{k}_IMAGE") for k in ("KAFKA", "REDIS", "POSTGRES")):
        res = _run(["bash", str(REPO / "deploy/local/images/build.sh")], env={**os.environ, **env})
        if res.returncode != 0:
            raise SystemExit(f"building local images failed: {res.stderr[-2000:]}")
        env.update({k: v for k, v in _exports(res.stdout).items() if not os.environ.get(k)})
    return env


def _exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export ") :].partition("=")
            out[key] = value
    return out


def _run_backend(python: Path, workdir: Path, backend: str, extra_env: dict[str, str]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KCONS_") and k != "PYTHONPATH"}
    env.update({k: v for k, v in os.environ.items() if k.startswith("KCONS_TC_") or k == "KCONS_CACHE_DIR"})
    env.update(extra_env)
    env["KCONS_TEST_BACKEND"] = backend
    report = workdir / f"report-{backend}.xml"
    started = time.monotonic()
    res = _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"],
               cwd=workdir, env=env, timeout=1200)  # fmt: skip
    seconds = round(time.monotonic() - started, 1)
    passed = failed = 0
    if report.is_file():
        root = ET.parse(report).getroot()
        suite = root.find("testsuite") if root.tag == "testsuites" else root
        if suite is not None:
            failed = int(suite.get("failures", "0")) + int(suite.get("errors", "0"))
            passed = int(suite.get("tests", "0")) - failed - int(suite.get("skipped", "0"))
    if res.returncode != 0:
        sys.stderr.write(f"--- {backend} ---\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}\n")
        failed = max(failed, 1)
    return {"passed": passed, "failed": failed, "seconds": seconds, "exit": res.returncode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="local,testcontainers", help="comma-separated backends to run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kcons-wheel-"))
    results: dict[str, dict[str, float]] = {}
    try:
        t0 = time.monotonic()
        wheel = _build_wheel(tmp / "dist")
        python = _make_venv(tmp / "venv", wheel)
        sys.stderr.write(f"wheel {wheel.name} installed in a fresh virtualenv in {time.monotonic() - t0:.0f}s\n")
        workdir = tmp / "user"
        workdir.mkdir()
        for name, text in {**readme_example(), "test_installed.py": INSTALLED_CHECK}.items():
            (workdir / name).write_text(text)
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            extra = _docker_env() if backend == "testcontainers" else {}
            results[backend] = _run_backend(python, workdir, backend, extra)
            sys.stderr.write(f"{backend}: {results[backend]}\n")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    passed = int(sum(r["passed"] for r in results.values()))
    failed = int(sum(r["failed"] for r in results.values()))
    ok = bool(results) and failed == 0 and all(r["exit"] == 0 and r["passed"] > 0 for r in results.values())
    summary = {"name": "fixtures_from_wheel", "backends": results, "passed": passed, "failed": failed, "ok": ok}
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
