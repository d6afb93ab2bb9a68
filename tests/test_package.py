"""`import sd` is cheap and its names are the ones the rest of the project imports."""

from __future__ import annotations

import subprocess
import sys

import sd


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; {code}; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True,
    )
    return set(out.stdout.split())


def test_importing_the_vocabulary_does_not_import_open_clip():
    loaded = _modules_after("import sd, sd.attention, sd.compile, sd.precision, sd.capabilities; "
                            "sd.ATTENTION_BACKENDS")
    assert "sd.attention" in loaded and "sd.precision" in loaded
    assert not {"open_clip", "sd.model", "sd.text_encoder"} & loaded


def test_lazy_names_resolve_to_their_modules():
    from sd import attention, model, precision
    from sd import compile as sd_compile

    assert sd.ATTENTION_BACKENDS is attention.ATTENTION_BACKENDS
    assert sd.COMPILE_MODES is sd_compile.COMPILE_MODES
    assert sd.PRECISIONS is precision.PRECISIONS and sd.precision_dtype is precision.precision_dtype
    assert sd.load_model is model.load_model
    assert set(sd.__all__) <= set(dir(sd))


def test_unknown_name_is_an_attribute_error():
    try:
        sd.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("sd.no_such_name resolved")
