"""The token ids `verify-identity` feeds both models, and how long the sequence must be.

A sliding window or attention chunk only shows its effect on positions past it, and a cache-layer
mismatch only shows in cached decoding past the window, so the prefill must be longer than every
*active* window: one that some layer uses and that is shorter than the position table (Qwen2 with
`use_sliding_window: false` has a `sliding_window` value that no layer uses). The sequence is capped by
the position table (greedy decoding appends `decode_steps` tokens after it) and, on CPU, by cost;
every cap that leaves a window unexercised is reported as a warning, never silently.

Must not: import torch or transformers at module level.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import TYPE_CHECKING

from llamapro_cli.architectures.layers import layer_kinds
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError, UsageError
from llamapro_cli.verify.numerics import Inputs

if TYPE_CHECKING:
    import torch

DEFAULT_TOKENS = 32
# On CPU, sequences are capped so parameters x tokens stays below this (a 7B model: ~280 tokens).
CPU_PARAM_TOKENS = 2e12
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def make_inputs(
    base: Checkpoint,
    expanded: Checkpoint,
    *,
    device: str,
    tokens: int | None,
    seed: int,
    prompt: str | None,
    decode_steps: int,
    warnings: list[str],
) -> Inputs:
    """Seeded random ids (or the prompt's); the last `decode_steps` of them are decoded one at a time."""

    window = max(active_window(base), active_window(expanded))
    limit, why = length_limit(expanded, device, decode_steps)
    if prompt is not None:
        ids, kind = tokenize(expanded, base, prompt), "prompt"
    else:
        length = tokens if tokens is not None else default_length(window, decode_steps)
        ids = random_ids(vocab_size(expanded), min(length, limit), seed)
        kind = "random token ids"
        if length > limit:
            warnings.append(f"sequence capped at {limit} tokens (asked for {length}): {why}")
    if ids.shape[1] > limit:
        warnings.append(f"prompt cut to its first {limit} tokens (of {ids.shape[1]}): {why}")
        ids = ids[:, :limit]
    steps = min(decode_steps, ids.shape[1] - 1)
    prefill = ids.shape[1] - steps
    if window and prefill <= window:
        warnings.append(
            f"the prefill ({prefill} tokens) does not exceed the sliding window ({window} tokens): "
            "attention past the window is not exercised"
        )
    return Inputs(ids=ids, kind=kind, prefill=prefill, decode_steps=steps)


def default_length(window: int, decode_steps: int) -> int:
    """The default sequence: `DEFAULT_TOKENS`, or longer so the prefill passes the active window."""
    return max(DEFAULT_TOKENS, window + 1 + decode_steps)


def random_ids(vocab: int, length: int, seed: int) -> torch.Tensor:
    """`length` seeded token ids in [0, vocab), shape (1, length): the same ids for the same seed."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=gen)


def active_window(ckpt: Checkpoint) -> int:
    """The largest sliding window or attention chunk some layer actually uses (0 when none)."""
    config = ckpt.family.sub_config(ckpt.config)
    sizes = [v for k in ("sliding_window", "attention_chunk_size") if isinstance(v := config.get(k), int)]
    kinds = layer_kinds(ckpt.family, ckpt.config)
    # A kind is one word per per-layer field ("rope moe chunked_attention"): look at the words.
    words = {w for k in kinds or () for w in k.split()}
    if kinds is not None and not words & {"sliding_attention", "chunked_attention"}:
        return 0  # every layer is full attention (qwen2 with use_sliding_window: false)
    positions = config.get("max_position_embeddings")
    limit = positions if isinstance(positions, int) else sys.maxsize
    return max((v for v in sizes if 0 < v < limit), default=0)


def length_limit(ckpt: Checkpoint, device: str, decode_steps: int) -> tuple[int, str]:
    """The longest sequence worth running, and why it is not longer."""
    positions = ckpt.family.sub_config(ckpt.config).get("max_position_embeddings")
    limit, why = sys.maxsize, ""
    if isinstance(positions, int) and positions > decode_steps + 1:
        limit, why = positions - decode_steps, f"max_position_embeddings is {positions}"
    if device == "cpu":
        affordable = max(decode_steps + 1, int(CPU_PARAM_TOKENS // max(1, ckpt.parameter_count())))
        if affordable < limit:
            limit, why = affordable, "longer sequences are too slow on CPU for this model (use a GPU)"
    return limit, why


def vocab_size(ckpt: Checkpoint) -> int:
    vocab = ckpt.family.sub_config(ckpt.config).get("vocab_size")
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    embed = ckpt.family.roles.embeddings[0]
    if embed in ckpt.weight_map:
        return ckpt.info(embed).shape[0]
    raise InputError(f"{ckpt.root / 'config.json'}: no vocab_size", hint="use --prompt instead")


def has_tokenizer(ckpt: Checkpoint) -> bool:
    return any((ckpt.root / f).is_file() for f in TOKENIZER_FILES)


def tokenizer_checkpoint(expanded: Checkpoint, base: Checkpoint) -> Checkpoint | None:
    """Whose tokenizer `--prompt` goes through: the expanded checkpoint's, else the base's."""
    return next((c for c in (expanded, base) if has_tokenizer(c)), None)


def tokenize(expanded: Checkpoint, base: Checkpoint, prompt: str) -> torch.Tensor:
    """The prompt through the expanded checkpoint's tokenizer (else the base's): ids of shape (1, n)."""
    source = tokenizer_checkpoint(expanded, base)
    if source is None:
        raise InputError(
            f"{expanded.root}: no tokenizer files, so --prompt cannot be tokenized",
            hint="use --tokens N (seeded random token ids) instead",
        )
    ids = tokenize_with(source, prompt, "--prompt")
    if ids.shape[1] == 0:
        raise UsageError("--prompt gives no tokens", hint="use a longer prompt")
    if int(ids.max()) >= vocab_size(expanded):
        raise InputError(f"{source.root}: the tokenizer gives ids beyond the model's vocabulary")
    return ids


def tokenize_with(source: Checkpoint, text: str, option: str) -> torch.Tensor:
    """`text` through `source`'s tokenizer, special tokens as the tokenizer adds them: ids (1, n).

    transformers is told `trust_remote_code=False` and cannot read stdin, and a tokenizer that only the
    checkpoint's own code could build is refused first (`hf_engine.refuse_remote_code`)."""
    if importlib.util.find_spec("transformers") is None:
        raise InputError(
            f"{option} needs the transformers package for the tokenizer",
            hint="pip install 'llamapro-cli[hf]', or use --tokens N",
        )
    from transformers import AutoTokenizer

    from llamapro_cli.verify.hf_engine import refuse_remote_code, sealed

    refuse_remote_code(source, model=False, tokenizer=True)
    try:
        with sealed():
            tokenizer = AutoTokenizer.from_pretrained(source.root, trust_remote_code=False)
        ids: torch.Tensor = tokenizer(text, return_tensors="pt")["input_ids"].long()
    except (OSError, ValueError, KeyError) as e:
        raise InputError(
            f"{source.root}: cannot use the tokenizer: {e}", hint="use --tokens N instead"
        ) from e
    return ids
