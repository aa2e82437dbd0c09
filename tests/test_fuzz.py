"""Fuzzing the folder-level reader: mutated shard headers, shard indexes, config.json and llamapro.json of
a whole checkpoint folder, fed to `Checkpoint.open`, `describe_checkpoint`, the `inspect` renderers and a
dry-run `expand` (plan and config rewrite). And what the CLI prints: every report renderer and message fed
names full of rich markup and control characters, on a pipe and on a terminal.

The only allowed outcomes are a report or our own `LlamaproError`: no other exception, no allocation
beyond a cap (RLIMIT_AS lowered around each example, so a huge allocation is a MemoryError that fails
the test), no hang (a per-example timer). Example counts are fixed and derandomized in CI; set
`LLAMAPRO_FUZZ_EXAMPLES` for a longer, random campaign (`make fuzz` runs 20000 per test).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import io
import json
import os
import re
import resource
import shutil
import signal
import struct
import tempfile
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamapro_cli.architectures.families import FAMILIES
from llamapro_cli.architectures.layers import layer_kinds, layer_signature, pattern_warnings
from llamapro_cli.architectures.registry import config_keys, family_for, num_layers
from llamapro_cli.architectures.rewrite import rewrite_config
from llamapro_cli.card import MAX_METADATA_NODES, CardFacts, model_card
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.cli import console
from llamapro_cli.cli.inspect import render_inspect
from llamapro_cli.companions import CODE_SUFFIXES, companions
from llamapro_cli.describe import describe_checkpoint
from llamapro_cli.errors import LlamaproError
from llamapro_cli.expand import expand
from llamapro_cli.io.header import DTYPE_BITS, read_header, tensor_nbytes
from llamapro_cli.io.manifest import MANIFEST, first_foreign, remove_owned, write_manifest
from llamapro_cli.plan import plan_expansion
from llamapro_cli.relayer import relayer

CAMPAIGN = os.environ.get("LLAMAPRO_FUZZ_EXAMPLES")
EXAMPLES = int(CAMPAIGN or 100)
TIME_LIMIT_S = 10.0  # per example; a valid tiny folder takes about a millisecond
MEMORY_HEADROOM = 1 << 30  # bytes of address space an example may add
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # the per-example timer below interrupts a hang; hypothesis's deadline cannot
    derandomize=CAMPAIGN is None,  # CI: the same examples every run
    database=None if CAMPAIGN is None else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4,
    "intermediate_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 8,
    "tie_word_embeddings": False,
}
QWEN2 = {
    **LLAMA,
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "use_sliding_window": True,
    "sliding_window": 4,
    "max_window_layers": 1,
    "layer_types": ["full_attention", "sliding_attention"],
}
PROVENANCE = {
    "schema_version": 1,
    "tool": "llamapro 0.1.0",
    "source": {"path": "/base", "repo_id": None, "revision": None, "num_layers": 1},
    "plan": {"kind": "every", "every": 1, "copies": 1, "placement": "interleave"},
    "layer_prefix": "model.layers.",
    "num_layers": 2,
    "layers": [{"index": 0, "source": 0, "identity": False}, {"index": 1, "source": 0, "identity": True}],
    "zeroed": ["model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"],
    "digests": None,
    "parent": None,
}


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {
        "input_layernorm.weight": (4,),
        "self_attn.q_proj.weight": (4, 4),
        "self_attn.k_proj.weight": (2, 4),
        "self_attn.v_proj.weight": (2, 4),
        "self_attn.o_proj.weight": (4, 4),
        "post_attention_layernorm.weight": (4,),
        "mlp.gate_proj.weight": (8, 4),
        "mlp.up_proj.weight": (8, 4),
        "mlp.down_proj.weight": (4, 8),
    }
    out = {"model.embed_tokens.weight": rng.normal(size=(8, 4)).astype(np.float32)}
    for layer in range(2):
        for rel, shape in shapes.items():
            out[f"model.layers.{layer}.{rel}"] = rng.normal(size=shape).astype(np.float32)
    out["model.norm.weight"] = np.ones(4, np.float16)
    out["lm_head.weight"] = rng.normal(size=(8, 4)).astype(np.float32)
    return out


def _base_files() -> dict[str, bytes]:
    """A valid two-shard folder as {file name: bytes}; layer 0 in the first shard, the rest in the second."""
    tensors = _tensors()
    names = list(tensors)
    split = {SHARDS[0]: names[:10], SHARDS[1]: names[10:]}
    files = {
        shard: safetensors.numpy.save({n: tensors[n] for n in keys}, metadata={"format": "pt"})
        for shard, keys in split.items()
    }
    index = {"metadata": {"total_size": 0}, "weight_map": {n: s for s, keys in split.items() for n in keys}}
    files[INDEX] = json.dumps(index).encode()
    files["config.json"] = json.dumps(LLAMA).encode()
    return files


BASE = _base_files()


# --- strategies -----------------------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["BF16", "F32", "F4", "llama", "qwen2", "gptq", "fp8", "../x", "/etc/passwd", ""])
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
shard_names = st.sampled_from(
    [
        *SHARDS,
        "../" + SHARDS[0],
        "/etc/passwd",
        "",
        ".",
        "..",
        "sub/x.safetensors",
        "a\\b",
        "missing.safetensors",
    ]
) | st.text(max_size=12)


def _split_shard(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join_shard(header: Any, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@st.composite
def header_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    """A shard's bytes with its header mutated: a field, an entry, the length prefix, or raw bytes."""
    header, body = _split_shard(data)
    names = [k for k in header if k != "__metadata__"]
    kind = draw(st.sampled_from(["field", "entry", "metadata", "prefix", "flip", "cut", "append", "json"]))
    if kind == "field":
        entry = header[draw(st.sampled_from(names))]
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        near = st.lists(st.integers(min_value=-2, max_value=len(body) + 2), max_size=3)
        entry[key] = draw(
            json_values | near | st.lists(st.integers(min_value=0, max_value=2**64), max_size=6)
        )
    elif kind == "entry":
        action = draw(st.sampled_from(["delete", "add", "extra_key"]))
        if action == "delete":
            del header[draw(st.sampled_from(names))]
        elif action == "add":
            header[draw(st.text(max_size=10) | st.sampled_from(names))] = draw(json_values)
        else:
            header[draw(st.sampled_from(names))][draw(st.text(max_size=6))] = draw(json_values)
    elif kind == "metadata":
        header["__metadata__"] = draw(json_values)
    elif kind == "json":
        header = draw(json_values)
    if kind == "prefix":
        prefix = draw(st.integers(min_value=0, max_value=2**64 - 1) | st.integers(0, len(data)))
        return struct.pack("<Q", prefix) + data[8:]
    joined = _join_shard(header, body)
    if kind == "flip":
        at = draw(st.integers(min_value=0, max_value=len(joined) - 1))
        return joined[:at] + bytes([draw(st.integers(0, 255))]) + joined[at + 1 :]
    if kind == "cut":
        return joined[: draw(st.integers(min_value=0, max_value=len(joined)))]
    if kind == "append":
        return joined + draw(st.binary(min_size=1, max_size=64))
    return joined


@st.composite
def index_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    index = json.loads(data)
    weight_map = index["weight_map"]
    kind = draw(st.sampled_from(["shard", "delete", "add", "weight_map", "metadata", "whole", "bytes"]))
    if kind == "shard":
        weight_map[draw(st.sampled_from(list(weight_map)))] = draw(shard_names)
    elif kind == "delete":
        del weight_map[draw(st.sampled_from(list(weight_map)))]
    elif kind == "add":
        weight_map[draw(st.text(max_size=20))] = draw(shard_names | json_values)
    elif kind == "weight_map":
        index["weight_map"] = draw(json_values)
    elif kind == "metadata":
        index["metadata"] = draw(json_values)
    elif kind == "whole":
        index = draw(json_values)
    else:
        return draw(st.binary(max_size=64))
    return json.dumps(index).encode()


CONFIG_KEYS = [
    "num_hidden_layers",
    "model_type",
    "architectures",
    "quantization_config",
    "layer_types",
    "max_window_layers",
    "use_sliding_window",
    "sliding_window",
    "hidden_size",
    "tie_word_embeddings",
    "text_config",
    "mlp_layer_types",
]


@st.composite
def config_mutation(draw: st.DrawFn) -> bytes:
    config = dict(draw(st.sampled_from([LLAMA, QWEN2])))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        key = draw(st.sampled_from(CONFIG_KEYS) | st.text(max_size=8))
        if draw(st.booleans()):
            config.pop(key, None)
        else:
            plausible = st.integers(min_value=-1, max_value=4) | st.sampled_from([10**18, 2**63, 1.5, True])
            config[key] = draw(json_values | plausible)
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([b"", b"[" * 100_000, b"{", b"\xff\xfe", b"1" * 5000]))
    return json.dumps(config).encode()


_CONFIG_KEYS = st.sampled_from(
    [
        "num_hidden_layers",
        "model_type",
        "layer_types",
        "max_window_layers",
        "use_sliding_window",
        "text_config",
    ]
)
# `config_replaced` entries: mostly well-formed, so that `--drop-new` puts hostile values back and
# replays the expansion on them (they must fall back with a warning, or stop with our error).
replaced_entries = st.lists(
    st.fixed_dictionaries(
        {
            "path": st.lists(st.sampled_from(["text_config", "quantization_config"]), max_size=2),
            "values": st.dictionaries(_CONFIG_KEYS, json_values, max_size=3),
            "absent": st.lists(_CONFIG_KEYS, max_size=2),
        }
    ),
    max_size=2,
)


@st.composite
def provenance_mutation(draw: st.DrawFn) -> bytes:
    record: Any = json.loads(json.dumps(PROVENANCE))
    target = draw(st.sampled_from(["record", "source", "layer", "parent", "whole", "replaced"]))
    key = draw(
        st.sampled_from(["layers", "source", "plan", "digests", "parent", "schema_version", "num_layers"])
    )
    value = draw(json_values)
    if target == "record":
        record[key] = value
    elif target == "source":
        record["source"][draw(st.sampled_from(["num_layers", "path", "repo_id"]))] = value
    elif target == "layer":
        record["layers"][draw(st.integers(0, 1))][draw(st.sampled_from(["index", "source", "identity"]))] = (
            value
        )
    elif target == "parent":
        record["parent"] = {**json.loads(json.dumps(PROVENANCE)), key: value}
    elif target == "replaced":
        record["config_replaced"] = draw(replaced_entries | json_values)
    else:
        record = value
    return json.dumps(record).encode()


# --- harness --------------------------------------------------------------------------------------------


class Hang(Exception):
    """Raised by the per-example timer (deliberately not a LlamaproError)."""


@contextlib.contextmanager
def bounded() -> Iterator[None]:
    """Cap the address space and the wall time of one example."""
    vm = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"an example ran longer than {TIME_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_HEADROOM, hard))
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous)


def read_folder(files: dict[str, bytes]) -> str:
    """Write the folder, open and describe it, render the report; our error's text, or 'ok'."""
    root = Path(tempfile.mkdtemp(prefix="llamapro-fuzz-"))
    try:
        for name, data in files.items():
            (root / name).write_bytes(data)
        with bounded():
            try:
                ckpt = Checkpoint.open(root)
                report = describe_checkpoint(ckpt)
                json.dumps(console.to_jsonable(report), default=console.json_default)
                with contextlib.redirect_stdout(io.StringIO()):
                    render_inspect(report)
                # The plan and the config rewrite see the same config: a dry run writes nothing.
                expand(ckpt, root.with_name(root.name + "-out"), every=1, dry_run=True)
                if ckpt.provenance is not None:  # the undo reads the record's base config values
                    relayer(ckpt, root.with_name(root.name + "-undo"), drop_new=True, dry_run=True)
            except LlamaproError as e:
                assert e.message and "\n" not in e.message
                return e.message
        return "ok"
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize("valid", [LLAMA, QWEN2])
def test_base_folder_is_valid(valid: dict[str, Any]) -> None:
    # The mutations start from a folder that opens: otherwise every example would stop at the first check.
    assert read_folder({**BASE, "config.json": json.dumps(valid).encode()}) == "ok"
    assert read_folder({**BASE, "llamapro.json": json.dumps(PROVENANCE).encode()}) == "ok"


@FUZZ
@given(which=st.sampled_from(SHARDS), data=st.data())
def test_mutated_shard_headers(which: str, data: st.DataObject) -> None:
    read_folder({**BASE, which: data.draw(header_mutation(BASE[which]))})


@FUZZ
@given(data=st.data())
def test_mutated_index(data: st.DataObject) -> None:
    read_folder({**BASE, INDEX: data.draw(index_mutation(BASE[INDEX]))})


@FUZZ
@given(config=config_mutation())
def test_mutated_config(config: bytes) -> None:
    read_folder({**BASE, "config.json": config})


@FUZZ
@given(record=provenance_mutation())
def test_mutated_provenance(record: bytes) -> None:
    read_folder({**BASE, "llamapro.json": record})


@FUZZ
@given(
    data=st.data(),
    mutate=st.lists(st.sampled_from(["shard0", "shard1", "index", "config", "record"]), min_size=2),
)
def test_mutated_everything(data: st.DataObject, mutate: list[str]) -> None:
    files = dict(BASE)
    draws: dict[str, Callable[[], bytes]] = {
        "shard0": lambda: data.draw(header_mutation(BASE[SHARDS[0]])),
        "shard1": lambda: data.draw(header_mutation(BASE[SHARDS[1]])),
        "index": lambda: data.draw(index_mutation(BASE[INDEX])),
        "config": lambda: data.draw(config_mutation()),
        "record": lambda: data.draw(provenance_mutation()),
    }
    target = {"shard0": SHARDS[0], "shard1": SHARDS[1], "index": INDEX, "config": "config.json"}
    for what in mutate:
        files[target.get(what, "llamapro.json")] = draws[what]()
    read_folder(files)


@FUZZ
@given(name=st.sampled_from([SHARDS[0], INDEX, "config.json", "llamapro.json"]), junk=st.binary(max_size=256))
def test_random_bytes(name: str, junk: bytes) -> None:
    read_folder({**BASE, name: junk})


# --- what the CLI prints: data is never markup and never reaches the terminal raw -----------------------

# Names a hostile checkpoint can carry: rich markup, terminal escape sequences, CR/BEL/DEL, C1 controls,
# Unicode line separators and bidi overrides, emoji codes, and ordinary text.
hostile_text = (
    st.sampled_from(
        [
            "[/]",
            "[/x]",
            "[bold red]x[/bold red]",
            "[link=https://example.com]y",
            "\x1b[2J",
            "\x1b]0;title\x07",
            "x\rerror: forged",
            "\x9b31m",
            ":smile:",
            "\u202eevil",
            "a\u2028b",
            "tab\there",
            "line\nbreak",
        ]
    )
    | st.text(
        alphabet=st.sampled_from(list("[]/\\=:ab \x1b\x07\r\n\t\x00\x7f\x85\x9b\u2028\u202eé中")), max_size=16
    )
    | st.text(max_size=12)
).filter(lambda text: not set(text) & set(TWIN_BRACKETS.values()))
TWIN_BRACKETS = {"[": "\u27e6", "]": "\u27e7"}  # same display width, never markup, never drawn
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _build(hint: Any, draw: st.DrawFn) -> Any:
    """A value of the type `hint` (a report dataclass and everything nested), every string hostile.
    Tuples have two items, so the renderers' paired fields (new layers and their sources) line up."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return hint(**{f.name: _build(hints[f.name], draw) for f in dataclasses.fields(hint)})
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return draw(st.sampled_from(list(hint)))
    if origin in (types.UnionType, typing.Union):
        options = [a for a in args if a is not type(None)]
        return None if len(options) < len(args) and draw(st.booleans()) else _build(options[0], draw)
    if origin is tuple:
        items = [args[0], args[0]] if len(args) == 2 and args[1] is Ellipsis else list(args)
        return tuple(_build(a, draw) for a in items)
    if origin is dict:
        return {draw(hostile_text): _build(args[1], draw) for _ in range(2)}
    strategies: dict[Any, st.SearchStrategy[Any]] = {
        str: hostile_text,
        Any: hostile_text,
        bool: st.booleans(),
        int: st.integers(min_value=0, max_value=10**15),
        float: st.floats(min_value=0, max_value=1e6),
    }
    return draw(strategies[hint])


def _twin(value: Any) -> Any:
    """The same value with every bracket of every string replaced by a look-alike rich ignores."""
    if isinstance(value, str):
        return value.translate(str.maketrans(TWIN_BRACKETS))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: _twin(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        )
    if isinstance(value, tuple):
        return tuple(_twin(v) for v in value)
    if isinstance(value, dict):
        return {_twin(k): _twin(v) for k, v in value.items()}
    return value


def _renderers() -> dict[str, tuple[type, Callable[[Any], None]]]:
    from llamapro_cli.cli import expand as cli_expand
    from llamapro_cli.cli import freeze, hub, verify
    from llamapro_cli.describe import InspectReport
    from llamapro_cli.expand import ExpandReport
    from llamapro_cli.freeze.audit import FrozenReport
    from llamapro_cli.freeze.map import FreezeMap
    from llamapro_cli.freeze.trainers import Format, Snippet
    from llamapro_cli.hub import PushReport
    from llamapro_cli.verify.identity import IdentityReport

    return {
        "inspect": (InspectReport, render_inspect),
        "expand": (ExpandReport, cli_expand.render_expand),
        "verify-identity": (IdentityReport, verify.render_identity),
        "freeze-map": (FreezeMap, lambda fm: freeze.render_freeze_map(fm, (Format.AXOLOTL, Format.HF))),
        "snippet": (Snippet, freeze.render_snippet),
        "verify-frozen": (FrozenReport, freeze.render_frozen),
        "push": (PushReport, hub.render_push),
    }


def _shown(render: Callable[[], None], *, terminal: bool, no_color: bool) -> str:
    out, err = io.StringIO(), io.StringIO()
    env = {"NO_COLOR": "1" if no_color else "", "COLUMNS": "100"}
    with (
        mock.patch.dict(os.environ, env),
        mock.patch.object(console, "stdout_is_terminal", lambda: terminal),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        render()
    return out.getvalue() + err.getvalue()


@FUZZ
@given(
    which=st.sampled_from(sorted(_renderers())),
    terminal=st.booleans(),
    no_color=st.booleans(),
    data=st.data(),
)
def test_renderers_show_hostile_names_as_text(
    which: str, terminal: bool, no_color: bool, data: st.DataObject
) -> None:
    cls, render = _renderers()[which]
    report = _build(cls, data.draw)
    shown = _shown(lambda: render(report), terminal=terminal, no_color=no_color)
    assert not RAW_CONTROL.search(shown), shown
    if which != "snippet":  # a snippet keeps its own line breaks and tabs; every other value is one line
        assert "\t" not in shown
    # Markup would consume brackets: the report and its bracket-free twin must print the same text.
    twin = _shown(lambda: render(_twin(report)), terminal=terminal, no_color=no_color)
    assert _twin(shown) == twin
    as_json = _shown(lambda: console.print_json(report), terminal=terminal, no_color=no_color)
    assert as_json.isascii() and json.loads(as_json) == json.loads(
        json.dumps(console.to_jsonable(report), default=console.json_default)
    )


@FUZZ
@given(message=hostile_text, hint=st.none() | hostile_text)
def test_messages_are_one_line_each(message: str, hint: str | None) -> None:
    emits: list[tuple[Callable[[], None], int]] = [
        (lambda: console.error(message, hint), 2 if hint else 1),
        (lambda: console.warn(message), 1),
        (lambda: console.note(message), 1),
    ]
    for emit, lines in emits:
        shown = _shown(emit, terminal=False, no_color=False)
        assert not RAW_CONTROL.search(shown) and shown.count("\n") == lines, shown


_dims = (
    st.sampled_from([0, 1, 2, 3, 7, 8])
    | st.sampled_from([2**k + d for k in (31, 32, 40, 61, 62, 63, 64, 65) for d in (-1, 0, 1)])
    | st.integers(min_value=0, max_value=2**66)
)


def _one_tensor_file(root: Path, dtype: str, shape: list[int], span: int) -> Path:
    text = json.dumps({"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, span]}}).encode()
    path = root / "one.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * span)
    return path


@FUZZ
@given(dtype=st.sampled_from(sorted(DTYPE_BITS)), shape=st.lists(_dims, max_size=5), span=st.integers(0, 64))
def test_shapes_are_accepted_exactly_as_safetensors_accepts_them(
    dtype: str, shape: list[int], span: int
) -> None:
    # The class "accepts what the library refuses" (an unloadable output): checked dimension by dimension
    # in 64-bit arithmetic, as the library's checked_mul does, even past a zero dimension.
    from safetensors import safe_open

    with contextlib.suppress(ValueError):
        span = tensor_nbytes(dtype, shape) if span % 2 else span  # half the examples: the matching span
    if span > 64:
        span = 0
    root = Path(tempfile.mkdtemp(prefix="llamapro-fuzz-"))
    try:
        path = _one_tensor_file(root, dtype, shape, span)
        try:
            with safe_open(str(path), "np"):
                library = True
        except Exception:  # SafetensorError (and serde's errors) for every refusal
            library = False
        with bounded():
            try:
                read_header(path)
                ours = True
            except LlamaproError:
                ours = False
        assert ours == library, (dtype, shape, span)
    finally:
        shutil.rmtree(root)


@FUZZ
@given(
    digits=st.integers(min_value=20, max_value=4000),
    count=st.integers(min_value=1, max_value=400),
    tail=st.sampled_from([[0], [], [1]]),
)
def test_shape_bombs_are_refused_in_linear_time(digits: int, count: int, tail: list[int]) -> None:
    # Hundreds of thousand-digit dimensions: refused at the first one, never multiplied (the timer and
    # the memory cap of `read_folder` fail the test otherwise).
    header, body = _split_shard(BASE[SHARDS[1]])
    header["model.norm.weight"]["shape"] = [10**digits - 1] * count + tail
    message = read_folder({**BASE, SHARDS[1]: _join_shard(header, body)})
    assert "does not fit 64 bits" in message


@st.composite
def alias_cards(draw: st.DrawFn) -> str:
    """YAML metadata built of anchors whose values reference earlier anchors many times over."""
    lines = [f"a0: &a0 {json.dumps(draw(st.lists(st.text(max_size=4), max_size=9)))}"]
    for i in range(1, draw(st.integers(min_value=1, max_value=12))):
        refs = draw(st.lists(st.integers(min_value=0, max_value=i - 1), min_size=1, max_size=12))
        if draw(st.booleans()):
            lines.append(f"a{i}: &a{i} [" + ", ".join(f"*a{r}" for r in refs) + "]")
        else:
            lines.append(f"a{i}: &a{i} {{" + ", ".join(f"k{j}: *a{r}" for j, r in enumerate(refs)) + "}")
    extra = draw(st.sampled_from(["", "license: mit\n", "self: &s [*s]\n", "tags: [x, y]\n"]))
    return "---\n" + extra + "\n".join(lines) + "\n---\n# Card\n"


@FUZZ
@given(text=alias_cards())
def test_card_metadata_never_expands_past_its_budget(text: str) -> None:
    facts = CardFacts(
        name="x",
        model_ref="./x",
        source="/in",
        base_model=None,
        revision=None,
        architecture="llama",
        command=None,
        plan=plan_expansion(2, every=1),
        parameters_in=1,
        parameters_out=2,
        digests=False,
        original=text,
    )
    with bounded():
        card = str(model_card(facts))
    assert len(card) < 2 * MAX_METADATA_NODES * 64 + len(text) + 10_000


_RECORDED = {"llamapro.json": b"{}", "config.json": b'{"a": 1}', "model.safetensors": b"\0" * 4096}


@st.composite
def output_mutations(draw: st.DrawFn) -> list[tuple[str, str]]:
    kinds = st.sampled_from(["add-file", "add-folder", "add-link", "rewrite", "resize", "touch", "record"])
    names = st.sampled_from([*_RECORDED, "notes.txt", "checkpoint-1000"])
    return draw(st.lists(st.tuples(kinds, names), max_size=3))


def _mutate(folder: Path, kind: str, name: str) -> None:
    path = folder / name
    if kind == "add-file" and not path.exists():
        path.write_text("user data")
    elif kind == "add-folder" and not path.exists():
        path.mkdir()
        (path / "optimizer.pt").write_text("user data")
    elif kind == "add-link" and not path.exists():
        path.symlink_to("/etc/hostname")
    elif kind == "rewrite" and path.is_file() and not path.is_symlink():
        stat = path.stat()
        path.write_bytes(bytes(b ^ 1 for b in path.read_bytes()))  # same size
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime: only the hash tells
    elif kind == "resize" and path.is_file() and not path.is_symlink():
        path.write_bytes(path.read_bytes() + b"user data")
    elif kind == "touch" and path.is_file() and not path.is_symlink():
        os.utime(path, ns=(0, path.stat().st_mtime_ns + 1))
    elif kind == "record":
        (folder / MANIFEST).write_text(draw_record(name))


def draw_record(name: str) -> str:
    return {
        "llamapro.json": "not json",
        "config.json": "[]",
        "model.safetensors": '{"llamapro_files": 1}',
    }.get(name, '{"llamapro_files": 1, "files": {"llamapro.json": {"size": 2, "mtime_ns": 0}}}')


@FUZZ
@given(mutations=output_mutations())
def test_force_removes_only_recorded_files(mutations: list[tuple[str, str]]) -> None:
    root = Path(tempfile.mkdtemp(prefix="llamapro-fuzz-"))
    try:
        folder = root / "out"
        folder.mkdir()
        for name, data in _RECORDED.items():
            (folder / name).write_bytes(data)
        write_manifest(folder)
        for kind, name in mutations:
            _mutate(folder, kind, name)
        before = sorted(str(p) for p in folder.rglob("*"))
        foreign = first_foreign(folder)
        left = remove_owned(folder)
        if not mutations:  # exactly what was recorded: ours, all of it removed
            assert foreign is None and left is None
        if foreign is not None:  # anything foreign: nothing at all is removed
            assert left is not None and sorted(str(p) for p in folder.rglob("*")) == before
        else:
            assert not folder.exists()
    finally:
        shutil.rmtree(root)


# --- verify-frozen: the trained folder's layout and the manifest -----------------------------------------
#
# The same tiny Llama, expanded --every 1 with digests (new layers 1 and 3 of 4). A "trained" folder is
# built from files that each hold either a clean training result (only new layers moved) or one in which
# original layer 0 changed, under a random wrapper prefix, in a random layout (single file, index and
# shards, a stale index, extra files, config.json's transformers_weights). Whatever the layout, the only
# outcomes are our error or a report, and a report may pass only when every file transformers would load
# (or, for a bare state dict, every file) is clean.

FROZEN_CHANGED = "model.layers.0.mlp.up_proj.weight"
PREFIXES = ["", "base_model.model.", "module.", "_orig_mod."]


@functools.cache
def _expanded() -> tuple[Path, dict[str, np.ndarray]]:
    root = Path(tempfile.mkdtemp(prefix="llamapro-fuzz-frozen-"))
    for name, data in BASE.items():
        (root / "base").mkdir(exist_ok=True)
        (root / "base" / name).write_bytes(data)
    expand(root / "base", root / "pro", every=1, digests=True)
    state = {}
    for shard in sorted((root / "pro").glob("*.safetensors")):
        state.update(safetensors.numpy.load_file(shard))
    return root / "pro", state


def _trained_state(clean: bool, prefix: str) -> dict[str, np.ndarray]:
    _, state = _expanded()
    out = {}
    for name, value in state.items():
        if name.startswith(("model.layers.1.", "model.layers.3.")) or (not clean and name == FROZEN_CHANGED):
            value = value + np.asarray(0.5, dtype=value.dtype)
        out[prefix + name] = value
    return out


@st.composite
def trained_folder(draw: st.DrawFn) -> tuple[dict[str, bytes], set[str]]:
    """(files, names of the files holding a changed frozen tensor)."""
    files: dict[str, bytes] = {}
    dirty: set[str] = set()

    def weights(name: str, keys: slice = slice(None)) -> None:
        clean = draw(st.booleans())
        state = _trained_state(clean, draw(st.sampled_from(PREFIXES)))
        names = list(state)[keys]
        files[name] = safetensors.numpy.save({n: state[n] for n in names})
        if not clean and any(n.endswith(FROZEN_CHANGED) for n in names):
            dirty.add(name)

    if draw(st.booleans()):
        weights("model.safetensors")
    if draw(st.booleans()):
        shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        weights(shards[0], slice(None, 10))
        weights(shards[1], slice(10, None))
        weight_map = draw(st.sampled_from(["full", "stale", "junk"]))
        index: Any = {"weight_map": {f"t{i}": s for i, s in enumerate(shards)}}
        if weight_map == "stale":
            index = {"weight_map": {"t": shards[0]}}
        elif weight_map == "junk":
            index = draw(json_values)
        files[INDEX] = json.dumps(index).encode()
    for extra in draw(st.lists(st.sampled_from(["adapter_model.safetensors", "x.safetensors"]), max_size=2)):
        weights(extra)
    if draw(st.booleans()):
        named = draw(st.sampled_from([*files, "missing.safetensors", "../x.safetensors"]) | json_values)
        files["config.json"] = json.dumps({**LLAMA, "transformers_weights": named}).encode()
    if draw(st.integers(0, 9)) == 0:
        files["adapter_config.json"] = b"{}"
    return files, dirty


def _loaded_by_transformers(files: dict[str, bytes]) -> list[str]:
    """The weight files transformers 5.x would load (modeling_utils._get_resolved_checkpoint_files), or,
    for a folder it cannot load (a bare state dict), every safetensors file."""
    config = json.loads(files.get("config.json", b"{}"))
    explicit = config.get("transformers_weights") if isinstance(config, dict) else None
    if isinstance(explicit, str) and explicit in files:
        return [explicit]
    if "model.safetensors" in files:
        return ["model.safetensors"]
    if INDEX in files:
        return [n for n in files if n.startswith("model-")]
    return [n for n in files if n.endswith(".safetensors")]


def audit_folder(files: dict[str, bytes], reference: Any) -> Any:
    """Write the trained folder, audit it against `reference` (a map or a manifest path): the report, or
    our error's text; any other exception fails the example."""
    import torch  # noqa: F401  (a mutated dtype converts through torch: import it outside the memory cap)

    from llamapro_cli.freeze.audit import verify_frozen

    root = Path(tempfile.mkdtemp(prefix="llamapro-fuzz-trained-"))
    try:
        for name, data in files.items():
            (root / name).write_bytes(data)
        with bounded():
            try:
                return verify_frozen(reference, root)
            except LlamaproError as e:
                assert e.message and "\n" not in e.message
                return e.message
    finally:
        shutil.rmtree(root)


def test_trained_folder_base_cases_pass_and_fail() -> None:
    from llamapro_cli.freeze.map import freeze_map

    fm = freeze_map(_expanded()[0])
    clean = audit_folder({"model.safetensors": safetensors.numpy.save(_trained_state(True, ""))}, fm)
    dirty = audit_folder({"model.safetensors": safetensors.numpy.save(_trained_state(False, "module."))}, fm)
    assert clean.ok and not dirty.ok and [c.name for c in dirty.changed] == [FROZEN_CHANGED]


@FUZZ
@given(folder=trained_folder())
def test_trained_folder_layouts_never_pass_a_changed_frozen_tensor(
    folder: tuple[dict[str, bytes], set[str]],
) -> None:
    from llamapro_cli.freeze.map import freeze_map

    files, dirty = folder
    report = audit_folder(files, freeze_map(_expanded()[0]))
    if not isinstance(report, str) and report.ok:
        assert not dirty & set(_loaded_by_transformers(files)), "a changed frozen tensor passed"


def _manifest_path(digests: bool) -> dict[str, Any]:
    from llamapro_cli.freeze.map import freeze_map

    doc = console.to_jsonable(freeze_map(_expanded()[0]))
    if not digests:
        doc["digest_algorithm"] = None
        doc["tensors"] = {k: {**v, "sha256": None} for k, v in doc["tensors"].items()}
    return json.loads(json.dumps(doc, default=console.json_default))


@st.composite
def manifest_mutation(draw: st.DrawFn) -> bytes:
    """A manifest with a field, a tensor entry or a list element replaced, deleted or added to."""
    doc = _manifest_path(draw(st.booleans()))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        key = draw(st.sampled_from(sorted(doc)))
        target = doc[key]
        if isinstance(target, dict) and target and draw(st.booleans()):
            inner = draw(st.sampled_from(sorted(target)))
            if isinstance(target[inner], dict) and draw(st.booleans()):
                target[inner][draw(st.sampled_from(["dtype", "shape", "parameter", "sha256"]))] = draw(
                    json_values
                )
            else:
                target[inner] = draw(json_values)
        elif isinstance(target, list) and target and draw(st.booleans()):
            action = draw(st.sampled_from(["drop", "add", "set"]))
            at = draw(st.integers(0, len(target) - 1))
            if action == "drop":
                del target[at]
            elif action == "add":
                target.append(draw(json_values | st.sampled_from(list(doc["tensors"]))))
            else:
                target[at] = draw(json_values | st.integers(-2, 6))
        elif draw(st.booleans()):
            del doc[key]
        else:
            doc[key] = draw(json_values | st.integers(-2, 6))
    return json.dumps(doc).encode()


@FUZZ
@given(manifest=manifest_mutation())
def test_mutated_manifests_never_pass_a_changed_original_layer(manifest: bytes) -> None:
    """Original layer 0 changed: no manifest, however mutated, may make that pass."""
    root = Path(tempfile.mkdtemp(prefix="llamapro-fuzz-manifest-"))
    try:
        (root / "map.json").write_bytes(manifest)
        files = {"model.safetensors": safetensors.numpy.save(_trained_state(False, ""))}
        report = audit_folder(files, root / "map.json")
        assert isinstance(report, str) or not report.ok, "a changed frozen tensor passed"
    finally:
        shutil.rmtree(root)


@FUZZ
@given(
    stem=st.sampled_from(["tokenizer", "tokenizer_x", "chat_template", "LICENSE", "vocab", "NOTICE"]),
    suffixes=st.lists(st.sampled_from(["json", "txt", "model", "jinja", *sorted(CODE_SUFFIXES)]), max_size=3),
    head=st.sampled_from([b"", b"{}", b"#!/bin/sh\n", b"\x7fELF\x02", b"MZ\x90", b"\xa7\r\r\n", b"\x80\x04"])
    | st.binary(max_size=8),
)
def test_only_data_is_ever_carried(stem: str, suffixes: list[str], head: bytes) -> None:
    name = ".".join([stem, *suffixes])
    root = Path(tempfile.mkdtemp(prefix="llamapro-fuzz-"))
    try:
        (root / name).write_bytes(head + b"data")
        with bounded():
            found = companions(root)
        code = any(part.lower() in CODE_SUFFIXES for part in suffixes) or (
            head.startswith((b"#!", b"\x7fELF", b"MZ", b"PK\x03\x04", b"\x80\x04", b"\xa7\r\r\n"))
        )
        if code:
            assert name not in found.carried and name in found.not_copied
    finally:
        shutil.rmtree(root)


FAMILY_NAMES = [f.name for f in FAMILIES if not f.refuse]


_KIND_WORDS = ["full_attention", "sliding_attention", "linear_attention", "conv", "moe", "mamba", "attention"]


family_values = (
    json_values
    | st.integers(min_value=-2, max_value=8)
    | st.sampled_from([0, 10**18, 2**63, True, False, "", "M*-E", [[1]], [0, 0], {}])
    | st.lists(st.integers(min_value=-1, max_value=4) | st.booleans(), max_size=4)
    | st.lists(st.sampled_from(_KIND_WORDS) | st.integers(0, 1), max_size=4)
)


def family_config(name: str) -> dict[str, Any]:
    """A valid 2-layer config of a family: LLAMA's values, in `text_config` where the record says."""
    family = next(f for f in FAMILIES if f.name == name)
    values = {k: v for k, v in LLAMA.items() if k not in ("model_type", "architectures")}
    if family.count_key != "num_hidden_layers":
        values[family.count_key] = values.pop("num_hidden_layers")
    config: dict[str, Any] = {"model_type": family.model_types[0]}
    target = config
    for key in family.config_path:
        target = target.setdefault(key, {})
    target.update(values)
    return config


@st.composite
def family_config_mutation(draw: st.DrawFn) -> dict[str, Any]:
    """A family's config with 1-3 of the keys its record reads (or the sub-config itself) set or removed."""
    name = draw(st.sampled_from(FAMILY_NAMES))
    family = next(f for f in FAMILIES if f.name == name)
    config = family_config(name)
    sub = config
    for key in family.config_path:
        sub = sub[key]
    keys = [k.key for k in config_keys(family)]
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        if family.config_path and draw(st.integers(0, 9)) == 0:
            config[family.config_path[0]] = draw(family_values)
            return config
        key = draw(st.sampled_from(keys))
        if draw(st.integers(0, 4)) == 0:
            sub.pop(key, None)
        else:
            sub[key] = draw(family_values)
    if draw(st.booleans()):
        names = [
            "model.layers.1.mlp",
            "model.layers.01.mlp",
            "model.layers." + "7" * 30,
            "re:model\\.layers\\.1\\.",
        ]
        config["quantization_config"] = {
            "quant_method": "fp8",
            "ignore": draw(st.lists(st.sampled_from(names))),
        }
    return config


layer_indices = st.sampled_from(
    ["01", "00", "\u0661", "\uff11", "1\n", "1 ", " 1", "+1", "-1", "1_0", "9" * 5000, "1" * 7, "0", "1"]
) | st.text(alphabet=st.sampled_from("0123456789\u0661\u0967 .\n_-"), max_size=8)


def renamed_files(old: str, new: str) -> dict[str, bytes]:
    """BASE with one tensor renamed in its shard header and in the index."""
    files = dict(BASE)
    index = json.loads(files[INDEX])
    shard = index["weight_map"].pop(old)
    index["weight_map"][new] = shard
    header, body = _split_shard(files[shard])
    header[new] = header.pop(old)
    files[shard], files[INDEX] = _join_shard(header, body), json.dumps(index).encode()
    return files


def apply_family(config: dict[str, Any]) -> str:
    """Every use of a config's per-layer values: resolve, kinds, signature, warnings, the rewrite for a
    plan. Only our own error may come out (the weights are not involved: every family is reachable)."""
    with bounded():
        try:
            family = family_for(config)
            n = num_layers(family, config)
            if n is None or not 0 < n <= 64:  # Checkpoint.open compares the count with the weights first
                return "no usable layer count"
            layer_kinds(family, config)
            layer_signature(family, config)
            pattern_warnings(family, config)
            rewrite_config(family, config, plan_expansion(n, every=1))
        except LlamaproError as e:
            assert e.message and "\n" not in e.message
            return e.message
    return "ok"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_base_configs_are_valid(name: str) -> None:
    # The family mutations start from configs every record accepts. Jamba derives each layer's kind from
    # index arithmetic, so a copy after every layer is refused (exit 2) before any mutation.
    outcome = apply_family(family_config(name))
    assert outcome == "ok" or (name == "jamba" and "cannot be expressed for jamba" in outcome), outcome


@FUZZ
@given(config=family_config_mutation())
def test_mutated_family_config_values(config: dict[str, Any]) -> None:
    apply_family(config)
    read_folder({**BASE, "config.json": json.dumps(config).encode()})


@FUZZ
@given(
    layer=st.sampled_from(["0", "1"]), index=layer_indices, rest=st.sampled_from(["mlp.down_proj.weight", ""])
)
def test_mutated_layer_names(layer: str, index: str, rest: str) -> None:
    old = f"model.layers.{layer}.mlp.down_proj.weight"
    new = f"model.layers.{index}." + rest if rest else f"model.layers.{index}"
    outcome = read_folder(renamed_files(old, new))
    canonical = len(index) <= 6 and index.isascii() and index.isdigit() and str(int(index)) == index
    if not canonical:  # one spelling per index: anything else is refused, never read as another layer
        assert outcome != "ok", new


HOSTILE_VALUES: list[Any] = [0, -1, 10**18, True, 1.5, "x", "", [], [[1]], [-1], [1, "a"], {}, {"a": 1}]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_declared_config_key_with_hostile_values(name: str) -> None:
    """Each key a record reads, and its sub-config, set to each hostile value: our error or a result."""
    family = next(f for f in FAMILIES if f.name == name)
    targets = [(k.key, False) for k in config_keys(family)] + [(k, True) for k in family.config_path[:1]]
    for key, top in targets:
        for value in HOSTILE_VALUES:
            config = family_config(name)
            sub = config
            for step in () if top else family.config_path:
                sub = sub[step]
            sub[key] = value
            apply_family(config)
