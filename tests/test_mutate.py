"""The curated mutations of `make mutate` (scripts/mutate.py) still apply: each snippet occurs exactly once
in its file and its tests exist, so a refactoring that moves the code makes the list fail here instead of
going quietly stale."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _mutations() -> list[Any]:
    spec = importlib.util.spec_from_file_location("llamapro_mutate", ROOT / "scripts" / "mutate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return list(module.MUTATIONS)


MUTATIONS = _mutations()


def test_mutation_ids_are_unique() -> None:
    ids = [m.id for m in MUTATIONS]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.id for m in MUTATIONS])
def test_mutation_still_applies(mutation: Any) -> None:
    text = (ROOT / mutation.file).read_text()
    assert text.count(mutation.snippet) == 1, f"{mutation.id}: rewrite it for the current code"
    assert mutation.replacement != mutation.snippet
    for test in mutation.tests:
        path, _, name = test.partition("::")
        assert (ROOT / path).is_file(), test
        assert not name or f"def {name}(" in (ROOT / path).read_text(), test
