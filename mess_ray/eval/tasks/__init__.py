"""Benchmark tasks beyond style retrieval: each a protocol (pure) plus a scorer over embeddings.

* :mod:`.passage`: task 2, cross-performance passage retrieval (beats);
* :mod:`.agreement`: task 3, expressive agreement with MIDI descriptors across pieces.
"""
