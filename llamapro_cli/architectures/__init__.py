"""Model families as data: the `Family` record type, one record per family, the registry (lookup,
refusals, quantization policy), the per-layer engine (values, kinds, signatures, pattern warnings), the
ported per-layer formulas and the config rewrite.

Must not: branch per family outside a record (a new family is a new record); read tensor data."""
