"""The identity wing: `verify_identity()` orchestration, the structural check (config and bytes, no
torch), the numerical check (transformers engine and the native streaming engine), and the inputs both
models are fed.

Must not: choose exit codes or print (the CLI does both from the returned report)."""
