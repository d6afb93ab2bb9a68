"""The study's measurement: text encoding, the full sampling loop (PLMS, guidance 9) and VAE decode.

One warm-up call is excluded from the timing (the study's ``--skip_first``); see
perf_tests/measure/workloads.py.
"""


def test_txt2img(benchmark, case, perf):
    perf.run(benchmark, case)
