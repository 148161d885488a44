"""keras_condcomp: conditional computation for Keras 3 that really skips work."""

__version__ = "0.1.0"

from keras_condcomp import callbacks, export, layers, models, ops, profiling, regularizers
from keras_condcomp.layers import BernoulliPolicy, GatedConv2D, GatedDense
from keras_condcomp.models import PolicyGradientModel
from keras_condcomp.profiling import summary

__all__ = [
    "BernoulliPolicy",
    "GatedConv2D",
    "GatedDense",
    "PolicyGradientModel",
    "__version__",
    "callbacks",
    "export",
    "layers",
    "models",
    "ops",
    "profiling",
    "regularizers",
    "summary",
    "tuning",
]


def __getattr__(name):
    # KerasTuner is imported only when `keras_condcomp.tuning` is first used.
    if name == "tuning":
        import importlib

        return importlib.import_module("keras_condcomp.tuning")
    raise AttributeError(f"module 'keras_condcomp' has no attribute {name!r}")
