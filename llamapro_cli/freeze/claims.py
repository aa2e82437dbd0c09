"""Which layers a record or a manifest says are new, checked against the weights before anyone trusts it.

A LLaMA Pro new layer is an identity copy: its branch-final tensors (the family's zero list) are all
zero. `llamapro.json` and a freeze-map manifest only *say* which layers those are. A wrong claim (an
edited record, one copied from another expansion, a buggy writer) would make freeze-map train an
original layer and verify-frozen approve it. `check_new_layers()` checks every claimed new layer: by
value (`lineage.tensor_is_zero`, chunked reads), or, where the folder may already hold trained weights,
by the recorded sha256 digests (each must be the digest of that many zero bytes).

Invariant: a claimed new layer passes only when it has branch-final tensors and every one of them is zero.
Must not: print; read anything but the claimed layers' branch-final tensors.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence

from llamapro_cli.architectures.record import Family, split_layer_name
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError
from llamapro_cli.io.ranges import CHUNK
from llamapro_cli.lineage import tensor_is_zero

IsZero = Callable[[str], bool]
TRAINED_HINT = (
    "the record does not describe these weights (edited, copied from another expansion, or the folder "
    "was trained in place); for a trained checkpoint pass the expanded folder or its manifest with --map"
)


def check_new_layers(
    family: Family,
    layer_prefix: str,
    names: Iterable[str],
    new_layers: Sequence[int],
    is_zero: IsZero,
    *,
    where: str,
    hint: str = TRAINED_HINT,
) -> None:
    """InputError (exit 3) naming the first claimed new layer that is not an identity copy."""
    finals: dict[int, list[str]] = {j: [] for j in new_layers}
    for name in names:
        parts = split_layer_name(name, layer_prefix)  # the one parser of layer-indexed names
        if parts is not None and parts[0] in finals and family.is_zeroed(parts[1]):
            finals[parts[0]].append(name)
    for j in new_layers:
        if not finals[j]:
            raise InputError(
                f"{where}: says layer {j} is a new layer, but it has no branch-final tensor", hint=hint
            )
        bad = next((n for n in finals[j] if not is_zero(n)), None)
        if bad is not None:
            raise InputError(
                f"{where}: says layer {j} is a new (zero-initialised) layer, but {bad} is not zero", hint=hint
            )


def zero_by_value(ckpt: Checkpoint) -> IsZero:
    """Zero by value in the checkpoint's bytes (+0.0 or -0.0)."""
    return functools.partial(tensor_is_zero, ckpt)


def zero_by_digest(digests: Mapping[str, str | None], nbytes: Callable[[str], int]) -> IsZero:
    """Zero by the recorded digest: the sha256 of `nbytes(name)` zero bytes (expand writes +0.0)."""
    return lambda name: digests.get(name) == zero_digest(nbytes(name))


@functools.lru_cache(maxsize=64)
def zero_digest(nbytes: int) -> str:
    """sha256 of `nbytes` zero bytes; a model has a handful of distinct sizes, each hashed once."""
    digest, zeros = hashlib.sha256(), bytes(min(nbytes, CHUNK))
    done = 0
    while done < nbytes:
        step = min(len(zeros), nbytes - done)
        digest.update(memoryview(zeros)[:step])
        done += step
    return digest.hexdigest()
