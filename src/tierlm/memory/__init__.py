"""Conditional memory (Engram): hashed N-gram embedding tables addressed by token ids alone, so they can live in
cheap memory and be gathered ahead of the layer that reads them.

    hashing.py   tokenizer compression (normalized ids) and multi-head N-gram hashing into prime-sized tables
    storage.py   one table of rows across backends: a device tensor, host memory, a memory-mapped file
    prefetch.py  deterministic prefetch: rows gathered on a worker thread as soon as a step's token ids are known
"""
