"""Compiled TensorFlow ops for GatedDense and Dense at inference.

TensorFlow has no op that multiplies only some blocks of a kernel: the
engine's other paths build that from gathers, products and scatters, a graph
of tens of ops whose call alone costs more than the skipped work at batch 1.
`native/gated_dense.cc` holds CPU ops that do it in one:

- `KerasCondcompGatedDense`: a GatedDense layer with its threshold policy
  (the policy's products, its decision and the active blocks' products),
  which also returns its block mask and can leave a batch whose blocks
  nearly all run to the caller's dense product (`"auto"`'s fallback);
- `KerasCondcompBlockSparseDense`: the active blocks' products for a given
  block mask (the engine's `"native"` path);
- `KerasCondcompDense`: a Dense layer's product;
- `KerasCondcompChain`: layers of the first and third kinds one after the
  other, reading their variables (`chain_from_variables`): one eager call
  for a model's chain of layers;
- `KerasCondcompVectorLanes`: the floats in one of the kernels' vectors as
  built (`native_vector_lanes`).

Each reads only the kernel rows of an example's non-zero inputs (the blocks
an upstream gated layer skipped, ReLU's zeros) when fewer than half are
non-zero, and shares its blocks (and a large policy's examples) among
TensorFlow's intra-op threads.

The ops are compiled against the installed TensorFlow the first time they are
needed (about 25 s on a 2-core Xeon), by the C++ compiler `$CXX` (default
`c++`), into a cache directory: `$KERAS_CONDCOMP_CACHE_DIR`, else
`$XDG_CACHE_HOME/keras_condcomp`, else `~/.cache/keras_condcomp`. A file
built for another source, TensorFlow version, compiler or CPU is not reused.
`build_native_kernels()` builds them ahead of use (`make` does, after
installing the package). Where no compiler works (a slim container, say),
the newest file in the cache built for this source, TensorFlow version and
CPU by any compiler is loaded: one built by `build_native_kernels()` on a
machine of the same CPU, with the same TensorFlow, and copied there; else
one built for a portable x86-64 level the CPU runs
(`build_native_kernels(architecture="x86-64-v3")` on any machine). Where
there is none, a warning says why once and the engine runs its TensorFlow
paths instead. `KERAS_CONDCOMP_NATIVE=0` turns the ops off.
"""

import contextlib
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_condcomp._arguments import is_number

__all__ = [
    "PORTABLE_ARCHITECTURES",
    "build_native_kernels",
    "chain_from_variables",
    "load_native_kernels",
    "native_activation",
    "native_block_sparse_dense",
    "native_dense",
    "native_gated_dense",
    "native_gated_dense_or_fallback",
    "native_kernels_disabled",
    "native_kernels_error",
    "native_vector_lanes",
    "variable_handle",
]

SOURCE = pathlib.Path(__file__).parent / "native" / "gated_dense.cc"
# Tried in turn: the first that compiles is kept. `-mno-avx512fp16`: the
# Eigen headers of TensorFlow 2.21 do not compile with GCC 12's AVX512-FP16.
_ARCHITECTURE_FLAGS = (
    ("-march=native", "-mno-avx512fp16", "-mprefer-vector-width=512"),
    ("-march=native",),
    (),
)
# Portable builds (`build_native_kernels(architecture=...)`): the x86-64
# levels, each with the CPU flags (as Linux names them) it adds to the
# level below it.
PORTABLE_ARCHITECTURES = {
    "x86-64-v2": ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"),
    "x86-64-v3": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
    "x86-64-v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}
_BUILD_SECONDS = 600

_lock = threading.Lock()
_state = {"module": None, "error": None, "tried": False, "lanes": None}


def _disabled():
    setting = os.environ.get("KERAS_CONDCOMP_NATIVE", "1").strip().lower()
    return setting in ("0", "false", "no", "off")


def _cache_dir():
    configured = os.environ.get("KERAS_CONDCOMP_CACHE_DIR")
    if configured:
        return pathlib.Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "keras_condcomp"


def _compiler():
    """The C++ compiler's path, or a RuntimeError saying why there is none."""
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"no C++ compiler: {name!r} (from $CXX, default 'c++') is not on the PATH"
        )
    return path


def _cpu_flags():
    """The CPU's feature flags (Linux), so that a file built with
    `-march=native` is not loaded on another CPU sharing the cache."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@functools.cache
def _compiler_version(compiler):
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"the C++ compiler {compiler!r} does not run: {error}") from error
    return result.stdout.splitlines()[0] if result.stdout else ""


def _without_paths(flags):
    """TensorFlow's build flags less its include and library folders."""
    return [flag for flag in flags if not flag.startswith(("-I", "-L"))]


def _architecture_flags(architecture):
    """The compiler flags tried in turn for `architecture`."""
    if architecture == "native":
        return _ARCHITECTURE_FLAGS
    return ((f"-march={architecture}", "-mtune=generic"),)


def _supported_architectures():
    """The portable architectures this CPU runs, the widest first."""
    flags = set(_cpu_flags().split())
    supported, needed = [], set()
    for architecture, added in PORTABLE_ARCHITECTURES.items():
        needed.update(added)
        if needed <= flags:
            supported.insert(0, architecture)
    return supported


def _platform_key(architecture="native"):
    """What a built file must match to load here: this source, TensorFlow's
    version and flags, the machine, and the CPU's flags (`"native"`) or a
    portable architecture. Not where TensorFlow is installed, nor the
    compiler: a file built elsewhere loads."""
    cpu = _cpu_flags() if architecture == "native" else architecture
    key = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(), tf.__version__.encode(),
        repr(_without_paths(tf.sysconfig.get_compile_flags())).encode(),
        repr(_without_paths(tf.sysconfig.get_link_flags())).encode(),
        platform.machine().encode(), cpu.encode(),
        repr(_architecture_flags(architecture)).encode(),
    ):
        key.update(part)
        key.update(b"\0")
    return key.hexdigest()[:20]


def _library_path(compiler, architecture="native"):
    """Where the ops built by `compiler` for `architecture` live."""
    built_by = hashlib.sha256(f"{compiler}\0{_compiler_version(compiler)}".encode())
    return (_cache_dir()
            / f"gated_dense-{_platform_key(architecture)}-{built_by.hexdigest()[:12]}.so")


def _prebuilt_library():
    """A file in the cache built by any compiler for this CPU, else for the
    widest portable architecture it runs (the newest of them), or None."""
    for architecture in ("native", *_supported_architectures()):
        built = sorted(_cache_dir().glob(f"gated_dense-{_platform_key(architecture)}-*.so"),
                       key=lambda path: path.stat().st_mtime)
        if built:
            return built[-1]
    return None


def _compile(compiler, target, architecture):
    """Compiles the ops into `target` (written whole or not at all)."""
    errors = []
    for flags in _architecture_flags(architecture):
        handle, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(handle)
        command = [
            compiler, "-shared", "-fPIC", "-O3", "-w", *flags, str(SOURCE),
            "-o", temporary, *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags(),
        ]
        try:
            result = subprocess.run(command, capture_output=True, text=True,
                                    timeout=_BUILD_SECONDS)
        except (OSError, subprocess.SubprocessError) as error:
            result = None
            errors.append(f"{' '.join(flags) or 'no -march'}: {error}")
        if result is not None and result.returncode == 0:
            os.replace(temporary, target)
            return
        os.unlink(temporary)
        if result is not None:
            tail = "\n".join(result.stderr.strip().splitlines()[-5:])
            errors.append(f"{' '.join(flags) or 'no -march'}: {tail}")
    raise RuntimeError("compiling {} failed:\n{}".format(SOURCE.name, "\n".join(errors)))


def build_native_kernels(force=False, architecture="native"):
    """Compiles the ops (unless already built for this setting) and returns
    the file's path.

    Args:
        force: compile again even when a built file exists.
        architecture: `"native"` (default): for this CPU (`-march=native`),
            the build that runs here. Or a portable x86-64 level of
            `PORTABLE_ARCHITECTURES` (`"x86-64-v3"`: AVX2), for machines
            without a compiler whose CPU is not this one: slower than a
            native build where the CPU has more (AVX-512).

    Returns:
        The `pathlib.Path` of the shared library. Copied into the cache of
        a machine without a compiler, with the same TensorFlow version and
        the same CPU (`"native"`) or one that runs `architecture`, it is
        loaded there.

    Raises:
        ValueError: an unknown `architecture`.
        RuntimeError: no C++ compiler, or the compiler failed (its last
            lines of errors are in the message); nothing is left in the
            cache then.

    Examples:
        >>> build_native_kernels(architecture="arm64")
        Traceback (most recent call last):
            ...
        ValueError: `architecture` must be 'native' or one of ['x86-64-v2', 'x86-64-v3', 'x86-64-v4']. Received: architecture='arm64'
    """
    if architecture != "native" and architecture not in PORTABLE_ARCHITECTURES:
        raise ValueError(
            f"`architecture` must be 'native' or one of {sorted(PORTABLE_ARCHITECTURES)}. "
            f"Received: architecture={architecture!r}"
        )
    compiler = _compiler()
    target = _library_path(compiler, architecture)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.with_suffix(".lock")):
        # Another process may have built it while this one waited.
        if force or not target.exists():
            print(f"keras_condcomp: compiling the native kernels into {target} "
                  "(once; about 25 s)", file=sys.stderr)
            _compile(compiler, target, architecture)
    return target


@contextlib.contextmanager
def _exclusive(path):
    """Holds an exclusive lock on `path` (POSIX), so that processes starting
    together (pytest's workers) compile once, not each."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent builds each replace the file whole
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load():
    try:
        target = build_native_kernels()
    except RuntimeError as failure:
        # No compiler here (a slim container, say): a file built elsewhere
        # for this platform and copied into the cache.
        target = _prebuilt_library()
        if target is None:
            others = len(list(_cache_dir().glob("gated_dense-*.so")))
            raise RuntimeError(
                f"{failure}; nor does {_cache_dir()} hold native kernels built for this "
                f"TensorFlow version, CPU and keras_condcomp version (it holds {others} "
                "built for others). Build them with build_native_kernels() on a machine "
                "of this CPU that has a compiler and this TensorFlow (or with "
                "build_native_kernels(architecture='x86-64-v3') on another), and copy the "
                "file into that folder ($KERAS_CONDCOMP_CACHE_DIR)"
            ) from failure
        return tf.load_op_library(str(target))
    try:
        return tf.load_op_library(str(target))
    except tf.errors.NotFoundError:
        # A file that does not load (cut short, or built against another
        # TensorFlow's symbols): built once more.
        target = build_native_kernels(force=True)
        return tf.load_op_library(str(target))


def load_native_kernels():
    """The module of compiled ops, built on first use; None when they are
    turned off (`KERAS_CONDCOMP_NATIVE=0`), when a GPU is visible (the ops
    run on CPU) or when they cannot be built (warned once, with the reason:
    `native_kernels_error()`).

    Examples:
        >>> ops = load_native_kernels()
        >>> ops is None or hasattr(ops, "keras_condcomp_gated_dense")
        True
    """
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if not _state["tried"]:
            module, error = None, None
            if _disabled():
                error = "turned off by KERAS_CONDCOMP_NATIVE=0"
            elif tf.config.list_logical_devices("GPU"):
                error = "a GPU is visible: the native kernels run on CPU only"
            else:
                try:
                    module = _load()
                except (RuntimeError, OSError, tf.errors.OpError) as failure:
                    error = str(failure)
                    warnings.warn(
                        "keras_condcomp's native kernels could not be built, so gated "
                        "layers run on TensorFlow ops (slower at small batches). "
                        f"Reason: {error}. Set KERAS_CONDCOMP_NATIVE=0 to silence this.",
                        stacklevel=2,
                    )
            _state.update(module=module, error=error, tried=True)
    return _state["module"]


def native_kernels_error():
    """Why the compiled ops are not in use (a string), or None when they are
    loaded; they are loaded (or tried) first."""
    load_native_kernels()
    return _state["error"]


@contextlib.contextmanager
def native_kernels_disabled(reason="turned off by native_kernels_disabled()"):
    """Runs its block without the native ops, in this process: `"auto"`
    then runs the engine's TensorFlow paths in every graph traced inside
    (e.g. to export a SavedModel with `model.export`, which would otherwise
    hold the ops and need them built to load; keras_condcomp's ONNX and
    LiteRT exports never use them). Graphs traced outside are kept apart.

    Examples:
        >>> with native_kernels_disabled():
        ...     load_native_kernels() is None
        True
    """
    load_native_kernels()
    with _lock:
        saved = dict(_state)
        _state.update(module=None, error=reason)
    try:
        yield
    finally:
        with _lock:
            _state.update(saved)


def native_activation(activation):
    """`"relu"` or `"linear"` where the ops apply `activation` themselves, or
    None where it must be applied to their output (None and `"linear"` are
    linear). `activation` is a callable or a name, as Keras layers take it.

    Examples:
        >>> native_activation("relu"), native_activation(None), native_activation("tanh")
        ('relu', 'linear', None)
    """
    if isinstance(activation, str):
        try:
            activation = keras.activations.get(activation)
        except ValueError:  # not a Keras activation's name
            return None
    if activation is None or activation is keras.activations.linear:
        return "linear"
    if activation is keras.activations.relu:
        return "relu"
    return None


def _op_activation(activation):
    """The ops' `activation` attribute for `activation`; a ValueError for one
    they cannot apply (which the op would otherwise take as linear)."""
    name = native_activation(activation)
    if name is None:
        raise ValueError(
            "The native ops apply only `None`, `keras.activations.linear` or "
            "`keras.activations.relu` (or their names; apply any other to their "
            "linear output). "
            f"Received: activation={activation!r}"
        )
    return name


def native_vector_lanes():
    """The floats in one vector of the native kernels as built: 16 where
    they were compiled for AVX-512, else 8; None when they are not in use.

    Examples:
        >>> native_vector_lanes() in (None, 8, 16)
        True
    """
    ops = load_native_kernels()
    if ops is None:
        return None
    if _state["lanes"] is None:
        with tf.init_scope():  # a value, also while a graph is traced
            _state["lanes"] = int(ops.keras_condcomp_vector_lanes().numpy())
    return _state["lanes"]


def _ops():
    ops = load_native_kernels()
    if ops is None:
        raise RuntimeError(
            f"keras_condcomp's native kernels are not available: {native_kernels_error()}"
        )
    return ops


def _bias(bias):
    return _no_bias() if bias is None else bias


def native_gated_dense(inputs, policy_kernel, policy_bias, block_kernel, bias, activation=None):
    """A GatedDense layer's inference with its threshold policy, in one op.

    Block `b` of example `e` is computed where `(inputs @ policy_kernel +
    policy_bias)[e, b] > 0`, as `activation(inputs[e] @ block_kernel[b] +
    bias[b])`; every other block is 0. The policy's sums run in another
    order than TensorFlow's product, so a logit within float rounding of 0
    may be decided the other way.

    Args:
        inputs: `(batch, input_dim)` float32.
        policy_kernel: `(input_dim, blocks)`; policy_bias: `(blocks,)`.
        block_kernel: `(blocks, input_dim, block_size)` float32.
        bias: `(blocks * block_size,)` or None.
        activation: a callable or name for which `native_activation` is
            not None (None, linear or ReLU).

    Returns:
        `(batch, blocks * block_size)` float32.

    Raises:
        RuntimeError: the ops are not available (`native_kernels_error()`).
        ValueError: an activation other than None, linear or ReLU.
    """
    return native_gated_dense_or_fallback(
        inputs, policy_kernel, policy_bias, block_kernel, bias, activation
    )[0]


def native_gated_dense_or_fallback(
    inputs, policy_kernel, policy_bias, block_kernel, bias, activation=None,
    fallback_fraction=0.0,
):
    """`native_gated_dense` that also returns its block mask, and leaves the
    products to the caller where nearly every block runs.

    Above batch 1, when at least `fallback_fraction` (in [0, 1]; 0: never)
    of the (example, block) pairs are active, the op computes no product:
    its outputs are 0 and `computed` is False, so that the caller runs the
    dense product (`"auto"`'s dense fallback) with `block_mask`.

    Returns:
        `(outputs, block_mask, computed)`: `(batch, units)` float32,
        `(batch, blocks)` float32 of 0 and 1, and a bool scalar.

    Raises:
        ValueError: `fallback_fraction` outside [0, 1], or an activation
            other than None, linear or ReLU.
    """
    if not is_number(fallback_fraction) or not 0.0 <= fallback_fraction <= 1.0:
        raise ValueError(
            "`fallback_fraction` must be a number in [0, 1]. "
            f"Received: fallback_fraction={fallback_fraction!r}"
        )
    return _ops().keras_condcomp_gated_dense(
        inputs, policy_kernel, policy_bias, block_kernel, _bias(bias),
        activation=_op_activation(activation), fallback_fraction=float(fallback_fraction),
    )


def native_block_sparse_dense(inputs, block_kernel, bias, block_mask, activation=None):
    """`masked_block_dense` computing only the blocks where `block_mask` is
    not 0, in one op; arguments as `keras_condcomp.ops.block_sparse_dense`'s
    (float32; `activation` as in `native_gated_dense`)."""
    return _ops().keras_condcomp_block_sparse_dense(
        inputs, block_kernel, _bias(bias), block_mask, activation=_op_activation(activation)
    )


def variable_handle(variable):
    """The resource handle of a Keras (or TensorFlow) float32 variable, for
    the ops that read their weights from variables."""
    value = getattr(variable, "value", variable)
    if not isinstance(value, tf.Variable) or value.dtype != tf.float32:
        raise ValueError(
            f"`variable` must be a float32 variable. Received: variable={variable!r}"
        )
    return value.handle


def _bias_handle(bias):
    """A bias variable's handle, or for None the empty tensor (no bias)."""
    return _no_bias() if bias is None else variable_handle(bias)


@functools.cache
def _no_bias():
    # A constant made eagerly, captured as such by the graphs that use it.
    with tf.init_scope():
        return tf.constant(np.zeros(0, np.float32))


def _runs_in_chain(layer):
    """Whether the chain op runs `layer`: a GatedDense whose threshold
    inference fuses natively, or a float32 Dense (not quantized, no LoRA:
    its kernel is then computed, not a variable)."""
    from keras_condcomp.layers import GatedDense

    if isinstance(layer, GatedDense):
        return layer._fuses_policy_natively()
    return (type(layer) is keras.layers.Dense and not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None
            and layer.compute_dtype == "float32")


def _chain_layer(layer, last):
    """`(kind, handles, activation)` of `layer` in the chain op."""
    from keras_condcomp.layers import GatedDense
    from keras_condcomp.ops.block_sparse_dense import forced_execution_path

    gated = isinstance(layer, GatedDense)
    if not _runs_in_chain(layer):
        if gated:
            raise ValueError(
                "A GatedDense layer of the chain must have a threshold policy, a ReLU or "
                f"linear activation and path 'auto' or 'native'. Received: "
                f"layer={layer.name!r} with inference={layer.inference!r}, activation "
                f"{getattr(layer.activation, '__name__', layer.activation)!r}, "
                f"execution={forced_execution_path() or layer.execution!r}"
            )
        raise ValueError(
            "The chain takes GatedDense and float32 Dense layers (not quantized, no LoRA). "
            f"Received: layer={layer.name!r} of type {type(layer).__name__}"
        )
    activation = native_activation(layer.activation)
    if gated:
        weights = (layer.policy.kernel, layer.policy.bias, layer.block_kernel)
        return "gated_dense", [variable_handle(w) for w in weights], activation
    if activation is None and not last:
        raise ValueError(
            "Only the last Dense layer of the chain may have another activation than "
            f"ReLU or linear. Received: layer={layer.name!r} with activation "
            f"{layer.activation.__name__!r}"
        )
    return "dense", [variable_handle(layer.kernel)], activation or "linear"


def chain_from_variables(layers):
    """`x -> outputs` of consecutive `layers` at inference, one op call
    (`KerasCondcompChain`) reading their variables where they are, so new
    weights reach the next call.

    Args:
        layers: GatedDense layers (threshold policy, ReLU or linear, path
            `"auto"` or `"native"`) and float32 `keras.layers.Dense` layers
            (ReLU or linear; the last one any activation, applied to the
            op's output).

    Returns:
        A function of a `(batch, input_dim)` float32 tensor.

    Raises:
        ValueError: a layer the op does not run (named).
        RuntimeError: the ops are not available (`native_kernels_error()`).

    Example:

    >>> import keras, numpy as np
    >>> from keras_condcomp.layers import GatedDense
    >>> hidden, head = GatedDense(64, blocks=4, activation="relu"), keras.layers.Dense(3)
    >>> model = keras.Sequential([keras.Input((8,)), hidden, head])
    >>> x = np.ones((1, 8), "float32")
    >>> if load_native_kernels() is not None:  # else: native_kernels_error()
    ...     outputs = chain_from_variables([hidden, head])(x)
    ... else:
    ...     outputs = model(x, training=False)
    >>> outputs.shape
    TensorShape([1, 3])
    """
    layers = list(layers)
    if not layers:
        raise ValueError("`layers` must hold at least one layer. Received: layers=[]")
    call = _ops().keras_condcomp_chain
    kinds, weights, activations = [], [], []
    for i, layer in enumerate(layers):
        kind, handles, activation = _chain_layer(layer, last=i == len(layers) - 1)
        kinds.append(kind)
        activations.append(activation)
        weights += handles + [_bias_handle(layer.bias)]
    last = layers[-1]
    if native_activation(last.activation) is not None:
        return lambda x: call(x, weights, layers=kinds, activations=activations)
    function = last.activation
    return lambda x: function(call(x, weights, layers=kinds, activations=activations))


def native_dense(inputs, kernel, bias, activation=None):
    """`activation(inputs @ kernel + bias)` in one op, reading only the
    kernel rows of each example's non-zero inputs where few are (float32;
    `activation` as in `native_gated_dense`)."""
    return _ops().keras_condcomp_dense(
        inputs, kernel, _bias(bias), activation=_op_activation(activation)
    )

