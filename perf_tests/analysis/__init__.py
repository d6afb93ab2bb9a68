"""The comparator: its statistical model and its verdicts, as data. No torch, no ``sd``.
"""
