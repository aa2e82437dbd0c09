"""What a user sees must not change by accident: the golden transcript (every `--help`, `inspect`,
`expand --dry-run`, `expand` with the written files' hashes, `freeze-map` in every format, `verify-identity`
and `verify-frozen` on the demo checkpoint) equals the stored one, apart from times, paths and memory.
After an intended change: `.venv/bin/python tests/golden_run.py --update`, then review
`git diff tests/golden`."""

from __future__ import annotations

import difflib

import golden_run
import pytest


@pytest.mark.hf
def test_user_visible_behaviour_matches_the_golden_transcript() -> None:
    pytest.importorskip("transformers")
    expected = golden_run.GOLDEN.read_text()
    actual = golden_run.transcript()
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                "golden/transcript.txt",
                "this run",
                n=2,
            )
        )
        pytest.fail("user-visible output changed:\n" + diff[:20000])
