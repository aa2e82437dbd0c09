"""A few steps of training on an expanded checkpoint's new layers, for `make demo` and the tests.

    python scripts/demo_train.py EXPANDED OUT [--steps 3] [--lr 0.05] [--layers 4,9]

Loads EXPANDED with transformers in float32, freezes it with llamapro's own freeze map (`freeze_map` +
`apply_freeze_map`; `--layers` trains only those of the new layers, so a demo can show one that did not
change), runs plain SGD on random token ids (a language-model loss) and saves the trained model with
`save_pretrained` into OUT (fp32 copies of a bf16 checkpoint, as trainers that upcast write them).
Random tokens teach nothing: the point is that the new layers move and nothing else does.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def train(
    expanded: Path, out: Path, *, steps: int = 3, lr: float = 0.05, layers: list[int] | None = None
) -> None:
    import torch
    import transformers

    from llamapro_cli.freeze.apply import apply_freeze_map
    from llamapro_cli.freeze.map import freeze_map

    fm = freeze_map(expanded)
    model = transformers.AutoModelForCausalLM.from_pretrained(expanded, dtype=torch.float32)
    apply_freeze_map(model, fm)
    if layers is not None:  # leave the other new layers frozen too
        keep = tuple(f"{fm.memory_prefix}{i}." for i in layers)
        for name, param in model.named_parameters():
            param.requires_grad_(param.requires_grad and name.startswith(keep))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("expanded", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--layers", help="comma-separated new layers to train (default: all of them)")
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    train(args.expanded, args.out, steps=args.steps, lr=args.lr, layers=layers)


if __name__ == "__main__":
    main()
