"""The tokens `compare` feeds both models, and how they are cut into chunks.

Three sources, one of them: `--text FILE` or `--prompt TEXT` through A's tokenizer (else B's), refused
when both checkpoints have a tokenizer and they tokenize the text differently; `--tokens N` seeded random
ids (`inputs.random_ids`, the generator verify-identity uses); by default verify-identity's own default
sequence (32 ids, seed 0, or past the longest active sliding window). At most `max_tokens` tokens are used
(the rest is cut, with a warning). The sequence is cut into consecutive chunks no longer than the shorter
of the two models' `max_position_embeddings`; each chunk is one forward pass starting at position 0, so a
chunk's first token sees nothing of the chunk before it.

Invariant: the text is read bounded (`io.files`, 100 MB) and must be UTF-8; tokenizers run without remote
code (`inputs.tokenize_with`).
Must not: run a model; import torch at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError, UsageError
from llamapro_cli.io.files import read_bytes_bounded
from llamapro_cli.verify.inputs import (
    active_window,
    default_length,
    has_tokenizer,
    random_ids,
    tokenize_with,
    vocab_size,
)

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_TOKENS = 2048
MAX_TOKENS_LIMIT = 1 << 20  # --max-tokens: more is a usage error, not an allocation that fails later
RANDOM = "random token ids"
VERIFY_DECODE_STEPS = 8  # verify-identity's default: its default sequence is long enough to decode 8 steps


@dataclass(frozen=True)
class Tokens:
    """The token ids (1, n) on the CPU, where they came from, and the chunks they are run in."""

    ids: torch.Tensor
    kind: str  # "random token ids", "prompt" or "text"
    chunk_tokens: int  # the longest chunk

    @property
    def chunks(self) -> list[torch.Tensor]:
        return [
            self.ids[:, s : s + self.chunk_tokens] for s in range(0, self.ids.shape[1], self.chunk_tokens)
        ]


def make_tokens(
    a: Checkpoint,
    b: Checkpoint,
    *,
    text: Path | None,
    prompt: str | None,
    tokens: int | None,
    seed: int,
    max_tokens: int,
    warnings: list[str],
) -> Tokens:
    """The ids for `compare`: the text's or the prompt's, else seeded random ids; capped and chunked."""
    vocab = vocab_size(a)
    if text is not None or prompt is not None:
        option, kind = ("--text", "text") if text is not None else ("--prompt", "prompt")
        content = _read_text(text) if text is not None else str(prompt)
        ids = tokenize_both(a, b, content, option, warnings)
        if ids.shape[1] == 0:
            if text is not None:
                raise InputError(f"{text}: the text gives no tokens")
            raise UsageError("--prompt gives no tokens", hint="use a longer prompt")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise InputError(f"the tokenizer gives ids beyond the models' vocabulary of {vocab} tokens")
        if ids.shape[1] > max_tokens:
            warnings.append(f"{kind} cut to its first {max_tokens} tokens (of {ids.shape[1]}): --max-tokens")
            ids = ids[:, :max_tokens]
    else:
        window = max(active_window(a), active_window(b))
        length = tokens if tokens is not None else default_length(window, VERIFY_DECODE_STEPS)
        if length > max_tokens:
            warnings.append(f"random token ids capped at {max_tokens} (asked for {length}): --max-tokens")
            length = max_tokens
        ids, kind = random_ids(vocab, length, seed), RANDOM
    return Tokens(ids=ids, kind=kind, chunk_tokens=min(ids.shape[1], context(a, b) or ids.shape[1]))


def context(a: Checkpoint, b: Checkpoint) -> int | None:
    """The shorter of the two position tables (None when neither config gives one)."""
    sizes = []
    for ckpt in (a, b):
        value = ckpt.family.sub_config(ckpt.config).get("max_position_embeddings")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            sizes.append(value)
    return min(sizes, default=None)


def tokenize_both(
    a: Checkpoint, b: Checkpoint, content: str, option: str, warnings: list[str]
) -> torch.Tensor:
    """`content` through A's tokenizer (else B's); when both have one, they must agree on it."""
    import torch

    sources = [c for c in (a, b) if has_tokenizer(c)]
    if not sources:
        raise InputError(
            f"neither {a.root} nor {b.root} has tokenizer files, so {option} cannot be tokenized",
            hint="use --tokens N (seeded random token ids) instead",
        )
    ids = tokenize_with(sources[0], content, option)
    if len(sources) == 1:
        warnings.append(f"only {sources[0].root} has a tokenizer: its tokens are fed to both models")
        return ids
    other = tokenize_with(sources[1], content, option)
    if not torch.equal(ids, other):
        raise InputError(
            f"the tokenizers of {a.root} and {b.root} tokenize the {option[2:]} differently "
            f"({_first_difference(ids[0].tolist(), other[0].tolist())})",
            hint="compare needs two models that share a tokenizer; --tokens N compares them on token ids",
        )
    return ids


def _first_difference(x: list[int], y: list[int]) -> str:
    for k, (i, j) in enumerate(zip(x, y, strict=False)):
        if i != j:
            return f"token {k} is {i} in A and {j} in B"
    return f"{len(x)} tokens in A, {len(y)} in B"


def _read_text(path: Path) -> str:
    data = read_bytes_bounded(path, "the --text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: --text needs UTF-8 text (byte {e.start} is not)") from None
