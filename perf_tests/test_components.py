"""Component cases: one UNet step (cond+uncond batch), VAE decode, text encoding, and one attention call
at SD 2.1's real shapes (self-attention over 4096 and 1024 tokens, cross-attention to 77 tokens)."""


def test_unet_step(benchmark, case, perf):
    perf.run(benchmark, case)


def test_vae_decode(benchmark, case, perf):
    perf.run(benchmark, case)


def test_text_encode(benchmark, case, perf):
    perf.run(benchmark, case)


def test_attention_self_4096(benchmark, case, perf):
    perf.run(benchmark, case)


def test_attention_self_1024(benchmark, case, perf):
    perf.run(benchmark, case)


def test_attention_cross_77(benchmark, case, perf):
    perf.run(benchmark, case)
