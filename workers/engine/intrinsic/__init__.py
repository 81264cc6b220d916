"""Intrinsic-dimension compression: subspace training, projections, the d_int90 search."""
