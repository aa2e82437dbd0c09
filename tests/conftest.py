"""Shared pytest plumbing: one torch thread per xdist worker, `gpu` auto-skip, and the `tiny_model`
factory (each tiny checkpoint is built once per session per worker). Markers live in pyproject.toml.

Test modules import helpers as `import tiny_models` (pytest puts this directory on sys.path)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Before torch is imported anywhere: the suite runs `-n 2` on two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# MKL rounds matrix products differently depending on memory alignment unless told to be strict;
# exact-logit comparisons need the same rounding for base and expanded (read once, at the first matmul).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        yield
        return
    torch.set_num_threads(1)
    yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_model(family, variant="default", **build_kw) -> Path`, built once per session (per worker).
    Treat the returned directory as read-only: it is shared by every test that asks for it."""
    pytest.importorskip("transformers")
    import tiny_models

    cache: dict[tuple[Any, ...], Path] = {}

    def make(family: str, variant: str = "default", **kw: Any) -> Path:
        key = (family, variant, tuple(sorted(kw.items())))
        if key not in cache:
            label = re.sub(r"[^A-Za-z0-9_-]+", "_", "-".join(map(str, (family, variant, *kw.values()))))
            dest = tmp_path_factory.mktemp(label)
            cache[key] = tiny_models.build_tiny(family, dest, variant=variant, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in 4-layer demo checkpoint (no transformers needed); read-only, shared by the session."""
    from llamapro_cli.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "demo", layers=4)


@pytest.fixture(scope="session")
def demo_one_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoint as one model.safetensors (the demo itself is sharded, and each output shard
    keeps the tensors of one input shard): for tests that read or edit a single-file expansion."""
    import tiny_models

    from llamapro_cli.demo import write_demo_checkpoint

    return tiny_models.one_file(write_demo_checkpoint(tmp_path_factory.mktemp("demo1") / "demo", layers=4))


@pytest.fixture
def src(demo: Path, tmp_path: Path) -> Path:
    """A private copy of the demo checkpoint, for tests that corrupt, lock or compare their input."""
    root = tmp_path / "in"
    shutil.copytree(demo, root)
    return root


@pytest.fixture(scope="session")
def unprivileged() -> list[str]:
    """A command prefix under which root obeys file permissions (setpriv drops the DAC capabilities);
    empty when not root. Skips where the capabilities cannot be dropped."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    drop = [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner"]
    if subprocess.run([*drop, "true"], capture_output=True).returncode != 0:
        pytest.skip("setpriv cannot drop capabilities here")
    return drop
