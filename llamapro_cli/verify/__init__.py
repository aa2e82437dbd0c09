"""The identity wing: `verify_identity()` orchestration (`identity`), its options and report (`options`,
`report`), the structural check (`structural`: config and bytes, no torch), the numerical check's one result
type and comparison (`numerics`), its two engines (`hf_engine`: transformers; `model` + `lockstep`: the
native streaming engine, with `spec` reading the config as transformers would), the inputs both models
are fed (`inputs`), and what a run shares with `compare` (`runtime`). `compare_checkpoints()` (`compare`, with
`compare_inputs`, `compare_engines`, `compare_metrics`) measures how far apart any two checkpoints with the
same vocabulary are, on the same loading code and engines.

Must not: choose exit codes or print (the CLI does both from the returned report)."""
