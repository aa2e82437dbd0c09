"""Model families as data, in layers that import one way: `record` (the types: `Family`, `LayerField`,
`Formula`, `ConfigKey`, the layer-name parser) → `formulas` (the per-layer formulas ported from
transformers) → `families` (one record per family) → `registry` (lookup, config checks, refusals,
quantization policy, layer counts) → `layers` (per-layer values, kinds, signatures, pattern warnings)
→ `rewrite` (the expanded config.json) and `matrix` (the generated support matrix).

Must not: branch per family outside a record (a new family is a new record); read tensor data.
"""
