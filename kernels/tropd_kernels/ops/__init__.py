"""The public ops, one file each: `teacher_topk` and `token_terms` (each with its `_from_hidden` variant).

Import them from `tropd_kernels`; this package deliberately re-exports nothing, so that each module
keeps its own name (a function named like its module would otherwise hide it)."""
