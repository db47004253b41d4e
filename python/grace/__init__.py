"""GRACE from Python.

The compiled core (``grace._grace``, built by CMake with ``-DGRACE_BUILD_PYTHON=ON``) gives the same
functions as the ``grace`` CLI on NumPy arrays: trace I/O, ``profile``, ``plan``, ``evaluate``, ``export``,
plan JSON and the replica router. Pure-Python parts need only NumPy: ``grace.tracefile`` (trace/stats files),
``grace.converters`` (SGLang / vLLM dumps -> traces and statistics) and, with PyTorch + transformers,
``grace.recorder`` (routing traces of Hugging Face MoE models).

Install: ``python3 -m pip install --no-build-isolation .`` (builds the extension with the project's CMake);
developers: ``PYTHONPATH=build/python /usr/bin/python3 -c 'import grace'`` (see docs/python.md).
"""

try:
    from ._grace import *  # noqa: F401,F403
    from ._grace import GraceError, __version__  # noqa: F401
    _EXT_ERROR = None
except ImportError as _e:  # the pure-Python parts stay usable without the extension
    _EXT_ERROR = _e

    class GraceError(ValueError):
        """Raised by the GRACE core for bad input (ValueError subclass)."""

    __version__ = "0.1.0"

    def __getattr__(name):
        raise AttributeError(
            f"grace.{name} needs the compiled extension grace._grace, which could not be imported ({_EXT_ERROR}); "
            "install it with `python3 -m pip install --no-build-isolation .`, or build it with "
            "`cmake -S . -B build -DGRACE_BUILD_PYTHON=ON && cmake --build build` and put build/python on PYTHONPATH")
