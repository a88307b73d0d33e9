"""The pure core: model graphs, numpy kernels, codes, plans and fault models (no MPI, no files)."""
