"""The benchmark process: cases, workloads, timing, the canary, the machine. The only layer besides ``sd``
that imports torch.
"""
