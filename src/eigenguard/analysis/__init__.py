"""Spectral analysis of stored runs (``eigenguard analyze``): where a trigger lives in each stage's
singular spectrum, and what EigenGuard's filter does to it.

- :mod:`.spectrum`: the math on feature tensors (effective rank, spectra, shares, shift alignment,
  t-SNE);
- :mod:`.figures`: the PNGs;
- :mod:`.samples` and :mod:`.capture`: the images a run is analysed on and its features;
- :mod:`.analyze`: one run's analyses, written beside it and recorded in the store.
"""
