"""Setup of the local backend: the pom ships in the package, jars go to a user cache, apt runs only when asked."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from kcons.errors import ServiceStartError
from kcons.testing import install


def test_the_kafka_pom_and_its_jar_checksums_are_package_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KCONS_KAFKA_POM", raising=False)
    pom = install.find_kafka_pom()
    assert pom.parent == Path(install.__file__).resolve().parent / "kafka"
    assert "<kafka.version>4.1.1</kafka.version>" in pom.read_text()
    assert "kafka_2.13-4.1.1.jar" in install._checksums(pom)


def test_jars_are_cached_per_user_never_in_a_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KCONS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert install.cache_dir() == tmp_path / "xdg" / "kcons"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert install.cache_dir() == Path.home() / ".cache" / "kcons"
    monkeypatch.setenv("KCONS_CACHE_DIR", str(tmp_path / "mine"))
    assert install.cache_dir() == tmp_path / "mine"


def test_a_jar_that_differs_from_its_checksum_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.jar").write_bytes(b"original")
    expected = {"a.jar": hashlib.sha256(b"original").hexdigest()}
    install._verify_jars(tmp_path, expected)
    (tmp_path / "a.jar").write_bytes(b"tampered")
    with pytest.raises(ServiceStartError, match=r"a\.jar has SHA-256"):
        install._verify_jars(tmp_path, expected)
    (tmp_path / "a.jar").write_bytes(b"original")
    (tmp_path / "b.jar").write_bytes(b"extra")
    with pytest.raises(ServiceStartError, match="unexpected"):
        install._verify_jars(tmp_path, expected)


def test_missing_packages_are_not_installed_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(install, "missing_packages", lambda **_: ["redis-server", "maven"])
    monkeypatch.setattr(install.subprocess, "run", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(install.sys.stdin, "isatty", lambda: False, raising=False)
    with pytest.raises(ServiceStartError) as info:
        install.ensure_debian_packages()
    assert "apt-get install -y -qq --no-install-recommends redis-server maven" in str(info.value)
    assert "--install-system-packages" in str(info.value)
    with pytest.raises(ServiceStartError):
        install.ensure_debian_packages(install=False)
    assert calls == []


def test_asked_to_install_runs_apt_get_for_the_missing_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = [["postgresql"], []]
    commands: list[list[str]] = []

    class Done:
        returncode = 0
        stdout = stderr = ""

    monkeypatch.setattr(install, "missing_packages", lambda **_: missing.pop(0))
    monkeypatch.setattr(install.subprocess, "run", lambda cmd, **k: commands.append(cmd) or Done())
    assert install.ensure_debian_packages(install=True) == ["postgresql"]
    assert commands[-1][-1] == "postgresql" and "install" in commands[-1]


def test_rabbitmq_server_is_needed_only_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KCONS_RABBITMQ_BIN", str(tmp_path / "absent"))
    monkeypatch.setattr(install.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(install, "postgres_bin_dir", lambda: tmp_path)
    assert "rabbitmq-server" not in install.missing_packages()
    assert install.missing_packages(rabbitmq=True) == ["rabbitmq-server"]
