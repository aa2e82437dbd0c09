"""llamapro: exact LLaMA Pro block expansion for Hugging Face safetensors checkpoints.

The public API is the CLI's verbs: `describe_checkpoint`, `plan_expansion`, `expand`, `verify_identity`,
`freeze_map`, `apply_freeze_map`, `verify_frozen`. Those that may need torch are re-exported lazily
(PEP 562), so `import llamapro_cli` and `llamapro --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Light verbs (no torch) are imported eagerly: `expand` must shadow the submodule of the same name.
from .describe import describe_checkpoint
from .expand import expand
from .plan import plan_expansion

# Verbs that may pull in torch load on first use.
_API = {
    "verify_identity": "verify",
    "freeze_map": "freeze",
    "apply_freeze_map": "freeze",
    "verify_frozen": "frozen",
}
__all__ = ["__version__", "describe_checkpoint", "expand", "plan_expansion", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
