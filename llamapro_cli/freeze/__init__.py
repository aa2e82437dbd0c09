"""The training wing: the freeze map (which tensors to train), the trainer renderers each checked by
that trainer's own matching rule, the trained-folder reader and the audit of a trained checkpoint.

Must not: print; modify any checkpoint."""
