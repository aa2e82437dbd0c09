"""The bytes wing: the safetensors format (strict header reader, header layout), the shard writers
(buffered and direct-I/O engines), the output folder's safety (disjoint paths, lock, temporary sibling,
atomic rename, `--force` rules), bounded file reads and the checkpoint folder's file names.

Must not: import torch, or anything above it in the package (`architectures/`, `checkpoint`, …)."""
