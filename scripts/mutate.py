"""`make mutate`: plant one bug at a time in the verifiers and check that the tests notice.

verify-identity and verify-frozen are what users trust instead of reading bytes, so a bug in them is a
false IDENTICAL or a false PASS. Each mutation below is a file, an exact snippet (it must occur exactly
once, so a stale mutation is reported, never silently skipped) and its replacement: a plausible bug,
most of them a false verdict. The repository is copied once to a temporary folder; each mutation is
applied there alone, the tests that reach that code run (`-x`: the first failure kills it), and the file
is restored. A mutation the tests do not kill *survives*; `expected` documents why a survivor is
acceptable, or whose tests will kill it. Exit 1 when a mutation survives unexpectedly or is stale.

Usage: python scripts/mutate.py [--only ID ...] [--list] [--workers N]   (opt-in: not part of `make test`)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERIFY = ("tests/test_verify_sensitivity.py", "tests/test_verify.py")
NATIVE = ("tests/test_reference.py",)
FREEZE = ("tests/test_freeze.py",)
SAFETY = ("tests/test_verify_safety.py",)


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    snippet: str
    replacement: str
    tests: tuple[str, ...]  # pytest arguments: node ids (run first, on their own), then files
    expected: str = ""  # why surviving is acceptable (or whose tests will kill it); empty: must be killed


M = Mutation
MUTATIONS = (
    # --- the structural check (verify/structural.py) ---------------------------------------------------
    M(
        "structural-skips-non-block-bytes",
        "llamapro_cli/verify/structural.py",
        "            where = layer.index if layer else None\n",
        "            if layer is None:\n                continue\n            where = layer.index\n",
        VERIFY,
    ),
    M(
        "structural-ignores-shared-config-keys",
        "llamapro_cli/verify/structural.py",
        'if key.rsplit(".", 1)[-1] not in skip and old[key] != new[key]:',
        "if False:",
        ("tests/test_verify_sensitivity.py::test_shared_config_key_with_another_value_is_named", *VERIFY),
    ),
    M(
        "structural-ignores-one-sided-config-keys",
        "llamapro_cli/verify/structural.py",
        "    if old is None or new is None:\n        return  # the configs cannot",
        "    if True:\n        return  # the configs cannot",
        ("tests/test_verify.py::test_key_added_to_the_expanded_config_only_is_named",),
    ),
    M(
        "structural-ignores-per-layer-fields",
        "llamapro_cli/verify/structural.py",
        "        if new[layer.index] != old[layer.source]:",
        "        if False:",
        ("tests/test_verify.py::test_flipped_layer_type_is_named", *VERIFY),
    ),
    M(
        "structural-compares-lengths-only",
        "llamapro_cli/verify/structural.py",
        "return all(mine.tobytes() == theirs.tobytes() for mine, theirs in pairs)",
        "return all(len(mine) == len(theirs) for mine, theirs in pairs)",
        VERIFY,
    ),
    M(
        "structural-compares-first-chunk-only",
        "llamapro_cli/verify/structural.py",
        "return all(mine.tobytes() == theirs.tobytes() for mine, theirs in pairs)",
        "return all(mine.tobytes() == theirs.tobytes() for mine, theirs in [next(pairs)])",
        ("tests/test_verify.py::test_altered_original_is_named", *VERIFY),
    ),
    M(
        "structural-accepts-nonzero-copies",
        "llamapro_cli/verify/structural.py",
        "                if not tensor_is_zero(self.expanded, name):",
        "                if False:",
        VERIFY,
    ),
    # --- zeros and the layer mapping (lineage.py) -------------------------------------------------------
    M(
        "zero-test-reads-first-chunk-only",
        "llamapro_cli/lineage.py",
        "for chunk in ckpt.read_chunks(name, step=step)",
        "for chunk in [next(ckpt.read_chunks(name, step=step))]",
        ("tests/test_verify_sensitivity.py::test_last_element_of_a_multi_chunk_copy_is_checked", *VERIFY),
    ),
    M(
        "zero-test-counts-minus-zero-as-nonzero",
        "llamapro_cli/lineage.py",
        '"BF16": (2, 0x7FFF),',
        '"BF16": (2, 0xFFFF),',
        VERIFY,
    ),
    M(
        "generations-not-composed",
        "llamapro_cli/lineage.py",
        "            for older in chain[1:]:\n",
        "            for older in chain[1:1]:\n",
        ("tests/test_verify.py::test_model_expanded_twice_verifies_against_its_grandparent",),
    ),
    M(
        "composed-copy-of-a-copy-taken-for-an-original",
        "llamapro_cli/lineage.py",
        "layer.identity or was.identity",
        "layer.identity",
        ("tests/test_verify.py::test_model_expanded_twice_verifies_against_its_grandparent",),
    ),
    M(
        "inferred-copy-source-always-previous-layer",
        "llamapro_cli/lineage.py",
        "source = source if source is not None and source <= seen else seen",
        "source = seen",
        ("tests/test_verify.py::test_inferred_mapping_finds_copies_of_earlier_layers", *VERIFY),
    ),
    # --- the numerical verdict (verify/numerics.py, verify/report.py, verify/identity.py) ----------------
    M(
        "identical-ignores-cached-decoding",
        "llamapro_cli/verify/numerics.py",
        "            and cached <= atol\n",
        "",
        VERIFY,
    ),
    M(
        "identical-ignores-greedy-tokens",
        "llamapro_cli/verify/numerics.py",
        "            and self.tokens_equal\n",
        "",
        VERIFY,
    ),
    M(
        "one-sided-nan-counts-as-equal",
        "llamapro_cli/verify/numerics.py",
        "same = (x == y) | (x.isnan() & y.isnan())",
        "same = (x == y) | x.isnan() | y.isnan()",
        VERIFY,
    ),
    M(
        "comparison-with-a-tolerance",
        "llamapro_cli/verify/numerics.py",
        "    pos_full, pos_cached = _first_above(full_rows, atol), _first_above(cached_rows, atol)",
        "    atol = max(atol, 1e-3)\n"
        "    pos_full, pos_cached = _first_above(full_rows, atol), _first_above(cached_rows, atol)",
        VERIFY,
    ),
    M(
        "verdict-ignores-the-numbers",
        "llamapro_cli/verify/identity.py",
        "(numbers is None or numbers.identical(atol))",
        "True",
        VERIFY,
    ),
    M(
        "expanded-loading-problems-ignored",
        "llamapro_cli/verify/hf_engine.py",
        '    if problems:\n        problem = f"loading the expanded checkpoint',
        '    if False:\n        problem = f"loading the expanded checkpoint',
        ("tests/test_verify.py::test_missing_key_in_the_expanded_model_is_named",),
    ),
    M(
        "window-not-passed-by-the-prefill",
        "llamapro_cli/verify/inputs.py",
        "    return max((v for v in sizes if 0 < v < limit), default=0)",
        "    return 0",
        VERIFY,
    ),
    # --- no checkpoint code (verify/hf_engine.py, verify/inputs.py) ---------------------------------------
    M(
        "model-loaded-trusting-checkpoint-code",
        "llamapro_cli/verify/hf_engine.py",
        '"trust_remote_code": False,',
        '"trust_remote_code": True,',
        SAFETY,
    ),
    M(
        "tokenizer-loaded-trusting-checkpoint-code",
        "llamapro_cli/verify/inputs.py",
        "AutoTokenizer.from_pretrained(source.root, trust_remote_code=False)",
        "AutoTokenizer.from_pretrained(source.root, trust_remote_code=True)",
        SAFETY,
    ),
    M(
        "tokenizer-auto-map-not-refused",
        "llamapro_cli/verify/hf_engine.py",
        'if "auto_map" in doc or (tokenizer and "AutoTokenizer" in from_config):',
        "if False:",
        SAFETY,
    ),
    M(
        "transformers-may-read-stdin",
        "llamapro_cli/verify/hf_engine.py",
        "        sys.stdin = nothing\n",
        "",
        SAFETY,
    ),
    # --- the native engine (verify/model.py, verify/lockstep.py) -----------------------------------------
    M(
        "rms-norm-rounds-differently",
        "llamapro_cli/verify/model.py",
        "y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)",
        "y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + eps)",
        NATIVE,
    ),
    M(
        "sliding-window-one-key-wider",
        "llamapro_cli/verify/model.py",
        "(kv > q - window)",
        "(kv >= q - window)",
        NATIVE,
    ),
    M(
        "lockstep-skips-inserted-layer-check",
        "llamapro_cli/verify/lockstep.py",
        "found, h_e = found or _check(out, h_e, atol, j, start, what), out",
        "h_e = out",
        (*NATIVE, *VERIFY),
    ),
    M(
        "lockstep-skips-cached-decoding",
        "llamapro_cli/verify/lockstep.py",
        "        for s in range(decode_steps):",
        "        for s in range(0):",
        (*NATIVE, *VERIFY),
    ),
    # --- the oracle the tests trust (tests/tiny_models.py) --------------------------------------------
    M(
        "oracle-compares-with-allclose",
        "tests/tiny_models.py",
        "elif ref.is_floating_point() and not torch.equal(ref, got):",
        "elif ref.is_floating_point() and not torch.allclose(ref, got, atol=1e-3):",
        ("tests/test_tiny_models.py",),
    ),
    M(
        "oracle-skips-cached-decoding",
        "tests/tiny_models.py",
        "        if not cached:\n",
        "        if True:\n",
        ("tests/test_tiny_models.py",),
    ),
    # --- verify-frozen (freeze/audit.py): the freeze engineer's tests kill these -------------------------
    M(
        "audit-skips-every-k-proj",
        "llamapro_cli/freeze/audit.py",
        "    for name in fm.tensors:\n        audit.check(name, tensors.get(name))",
        "    for name in fm.tensors:\n"
        '        if name.endswith("self_attn.k_proj.weight"):\n'
        "            continue\n"
        "        audit.check(name, tensors.get(name))",
        FREEZE,
    ),
    M(
        "audit-compares-first-chunk-only",
        "llamapro_cli/freeze/audit.py",
        "            done += len(chunk)\n",
        "            done += len(chunk)\n            break\n",
        FREEZE,
    ),
    M(
        "audit-passes-missing-frozen-tensors",
        "llamapro_cli/freeze/audit.py",
        "ok=not self.changed and not self.missing,",
        "ok=not self.changed,",
        FREEZE,
    ),
    M(
        "audit-accepts-inexact-dtype-round-trip",
        "llamapro_cli/freeze/audit.py",
        "        if not conversion.exact:",
        "        if False:",
        FREEZE,
    ),
)


def _copy_repo(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files: the working tree as the tests see it."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in filter(None, names):
        source = ROOT / os.fsdecode(raw)
        if source.is_file():
            target = dest / os.fsdecode(raw)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _run(mutation: Mutation, repo: Path, workers: int) -> tuple[str, float, str]:
    """(outcome, seconds, the test that failed first)."""
    path = repo / mutation.file
    original = path.read_text()
    if original.count(mutation.snippet) != 1:
        return "stale", 0.0, ""  # the code moved on: the mutation must be rewritten, not skipped silently
    path.write_text(original.replace(mutation.snippet, mutation.replacement))
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT"}
    args = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
    if workers > 1:
        args += ["-n", str(workers)]
    # pytest merges a node id into its file's order, so the targeted tests run first, on their own.
    targeted = [t for t in mutation.tests if "::" in t]
    broad = [t for t in mutation.tests if "::" not in t]
    started = time.monotonic()
    try:
        for tests in (targeted, broad):
            if not tests:
                continue
            proc = subprocess.run([*args, *tests], cwd=repo, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                break
    finally:
        path.write_text(original)
    seconds = time.monotonic() - started
    # pytest: 0 all passed (survived), 1 a test failed (killed); anything else is no verdict.
    outcome = {0: "survived", 1: "killed"}.get(proc.returncode, f"error (pytest exit {proc.returncode})")
    if outcome.startswith("error"):
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-2000:])
    failed = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    return outcome, seconds, failed[0] if failed else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="run only these mutation ids")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--workers", type=int, default=1, help="pytest-xdist workers per run (default 1)")
    opts = parser.parse_args()
    chosen = [m for m in MUTATIONS if opts.only is None or m.id in opts.only]
    if opts.list:
        for m in chosen:
            print(f"{m.id:48} {m.file}")
        return 0
    unexpected = 0
    with tempfile.TemporaryDirectory(prefix="llamapro-mutate-") as tmp:
        repo = Path(tmp)
        _copy_repo(repo)
        for m in chosen:
            outcome, seconds, by = _run(m, repo, opts.workers)
            bad = outcome != "killed" and not (outcome == "survived" and m.expected)
            unexpected += bad
            note = f"  by {by}" if by else ""
            note += f"  (expected: {m.expected})" if outcome == "survived" and m.expected else ""
            print(f"{outcome:9} {seconds:6.1f} s  {m.id}{note}", flush=True)
    print(f"{len(chosen)} mutations, {unexpected} unexpected (survived without a reason, stale or errors)")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
