"""Regenerate every generated documentation page: the CLI reference and the architecture support matrix.

Run after changing a command's help text or a family record: `.venv/bin/python scripts/gen_docs.py`.
Tests fail while either page is stale.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llamapro_cli.architectures.matrix import support_matrix_markdown

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    script = ROOT / "scripts" / "gen_cli_reference.py"
    spec = importlib.util.spec_from_file_location("gen_cli_reference", script)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([])
    (ROOT / "docs" / "architectures.md").write_text(support_matrix_markdown())
    print("wrote docs/architectures.md")


if __name__ == "__main__":
    main()
