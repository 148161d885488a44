"""keras_condcomp: conditional computation for Keras 3 that really skips work."""

__version__ = "0.1.0"

from keras_condcomp import callbacks, layers, models, ops, profiling, regularizers
from keras_condcomp.layers import BernoulliPolicy, GatedDense
from keras_condcomp.models import PolicyGradientModel
from keras_condcomp.profiling import summary

__all__ = [
    "BernoulliPolicy",
    "GatedDense",
    "PolicyGradientModel",
    "__version__",
    "callbacks",
    "layers",
    "models",
    "ops",
    "profiling",
    "regularizers",
    "summary",
]
