"""Result, journal and baseline files: the case vocabulary, the readers and validators, the baseline store.
No torch, no ``sd``.
"""
