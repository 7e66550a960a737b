"""``kcons`` re-exports its public API lazily: every name resolves, and ``import kcons`` imports nothing else."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import kcons

INIT = Path(kcons.__file__)


def test_every_public_name_resolves_to_the_object_of_its_home_module() -> None:
    for name in kcons.__all__:
        value = getattr(kcons, name)
        if name != "__version__":
            assert value is getattr(importlib.import_module(kcons._EXPORTS[name]), name), name
    namespace: dict[str, object] = {}
    exec("from kcons import *", namespace)
    assert set(kcons.__all__) <= set(namespace)
    assert set(kcons.__all__) <= set(dir(kcons))


def test_the_export_map_the_type_checking_imports_and_all_name_the_same_things() -> None:
    tree = ast.parse(INIT.read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    seen = {
        alias.name: node.module
        for node in guarded.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert seen == kcons._EXPORTS
    assert set(kcons.__all__) == {*kcons._EXPORTS, "__version__"}


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        kcons.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("kcons.NoSuchThing resolved")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\nprint('\\n'.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return set(out.split())


def test_import_kcons_imports_no_part_and_no_client_library() -> None:
    loaded = _modules_after("import kcons")
    assert not {m for m in loaded if m.startswith("kcons.")}
    assert not {m for m in loaded if m.split(".")[0] in ("confluent_kafka", "redis", "psycopg", "click")}


def test_one_public_name_imports_only_what_its_module_needs() -> None:
    loaded = _modules_after("from kcons import Envelope")
    assert "kcons.envelope" in loaded
    assert not {m for m in loaded if m.startswith(("kcons.adapters", "kcons.consumer", "kcons.cache", "kcons.outbox"))}
    assert not {m for m in loaded if m.split(".")[0] in ("confluent_kafka", "redis", "psycopg")}
    loaded = _modules_after("from kcons import RedisDedupStore")
    assert "kcons.adapters.redis.dedup" in loaded
    assert not {m for m in loaded if m.startswith(("kcons.adapters.postgres", "kcons.adapters.sqlite"))}
    assert "psycopg" not in loaded
