"""llamapro: exact LLaMA Pro block expansion for Hugging Face safetensors checkpoints.

The public API is the CLI's verbs: `describe_checkpoint`, `plan_expansion`, `expand`, `relayer`,
`verify_identity`, `freeze_map`, `apply_freeze_map`, `verify_frozen`, `learning_report`,
`check_trainer_config`, `merge_adapter`. Those that may need torch are re-exported lazily
(PEP 562), so `import llamapro_cli` and `llamapro --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

# Light verbs (no torch) are imported eagerly: `expand` and `relayer` must shadow their submodules' names.
from llamapro_cli.describe import describe_checkpoint
from llamapro_cli.expand import expand
from llamapro_cli.plan import plan_expansion
from llamapro_cli.relayer import relayer
from llamapro_cli.version import __version__

# Verbs that may pull in torch load on first use.
_API = {
    "verify_identity": "verify.identity",
    "freeze_map": "freeze.map",
    "apply_freeze_map": "freeze.apply",
    "verify_frozen": "freeze.audit",
    "learning_report": "freeze.learning",
    "check_trainer_config": "freeze.check",
    "merge_adapter": "merge",
}
__all__ = ["__version__", "describe_checkpoint", "expand", "plan_expansion", "relayer", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
