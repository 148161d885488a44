"""Side-by-side latency measurement, used by the `train` job and the benchmarks.

Timings compare callables in one process, alternating them call by call after
a warm-up, and report medians, so that machine noise hits all of them alike.
Thread counts must be pinned before TensorFlow starts: `measure_models_speed`
therefore runs in a fresh process (`python -m keras_condcomp.speed`).
"""

import functools
import json
import os
import subprocess
import sys
import time

import numpy as np

from keras_condcomp._arguments import check_non_negative_int, check_positive_int

__all__ = [
    "PAIR_WARMUP", "WARMUP_CALLS", "evict_caches", "median_latencies", "measure_models_speed",
    "numpy_calls", "paired_latencies", "timed_batches", "tuned_inference",
]

# Untimed calls of each function before timing (the default `warmup`): what
# a graph needs to reach its steady speed. TensorFlow's executor hands every
# op of a graph to its inter-op threads (a thread hop each) until the op's
# cost estimate falls below 8000 cycles; the estimate starts at 100M cycles
# and each call's cycles weigh a tenth, so an op of a few microseconds (a
# variable's read) is run in line only from about its 90th call. A graph of
# more ops pays more hops until then: 784 -> 16 x 16 GatedDense at density
# 3/4, batch 50, two threads, ran at 0.85x of Dense in calls 20-100 and 1.2x
# from call 100 on (session 49; with 3 warm-up calls before, the benchmarks
# timed that phase).
WARMUP_CALLS = 100
# Untimed calls of both functions at the start of each of
# `paired_latencies`' pairs, once every function is warm.
PAIR_WARMUP = 3


def median_latencies(
    functions, inputs, repeats=50, warmup=WARMUP_CALLS, consecutive=1, before_call=None
):
    """Median seconds per call of each function, called in alternation.

    Args:
        functions: `{name: callable(batch)}`.
        inputs: a list of batches; call `r` of every function gets
            `inputs[r % len(inputs)]`, so all see the same data.
        repeats: timed calls per function.
        warmup: untimed calls per function first (`WARMUP_CALLS`: a graph's
            steady speed).
        consecutive: calls of a function in a row before the next one's
            turn: 1 alternates call by call (each function finds the caches
            as the others left them); more times each in its own steady
            state, like a model serving a stream alone.
        before_call: None, or a callable run untimed before every timed
            call (`evict_caches`: every call reads its weights from memory).

    Returns:
        `{name: median seconds}`.

    Examples:
        >>> timed = median_latencies({"a": abs, "b": round}, [-1.5], repeats=4, consecutive=2)
        >>> sorted(timed)
        ['a', 'b']
    """
    for name, value in (("repeats", repeats), ("consecutive", consecutive)):
        check_positive_int(name, value)
    names = list(functions)
    _warm_up(functions.values(), inputs, warmup)
    times = {name: [] for name in names}
    for turn, first in enumerate(range(0, repeats, consecutive)):
        calls = range(first, min(first + consecutive, repeats))
        # Rotate who goes first so cache warmth favours nobody.
        for k in range(len(names)):
            name = names[(turn + k) % len(names)]
            for r in calls:
                batch = inputs[r % len(inputs)]
                if before_call is not None:
                    before_call()
                start = time.perf_counter()
                functions[name](batch)
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def _warm_up(functions, inputs, warmup):
    """Calls each of `functions` `warmup` times, in turn, on `inputs` in turn."""
    check_non_negative_int("warmup", warmup)
    if not len(inputs):
        raise ValueError("`inputs` must hold at least one input. Received: 0")
    for r in range(warmup):
        for function in functions:
            function(inputs[r % len(inputs)])


@functools.lru_cache(maxsize=1)
def _eviction_buffer(size_bytes):
    return np.zeros(size_bytes // 4, np.float32)


def evict_caches(size_bytes=64 * 2**20):
    """Writes a `size_bytes` buffer, pushing other data out of the CPU caches.

    Run before a timed call (`median_latencies(..., before_call=evict_caches)`),
    the call then reads its weights from memory, as a model larger than the
    caches, or one called rarely, does on any machine. The default, 64 MiB,
    is twice the largest last-level cache of the machines we measure on.
    The buffer is allocated once and kept for the next call of the same
    size.

    Args:
        size_bytes: bytes to write (default 64 MiB).

    Examples:
        >>> evict_caches(2**20)  # 1 MiB
    """
    buffer = _eviction_buffer(int(size_bytes))
    np.add(buffer, 1.0, out=buffer)


def timed_batches(x, batch_size, repeats):
    """Consecutive batches of `x` for `repeats` timed calls cycling through them.

    One batch per call, up to all of `x`: the timings then cover as many
    examples as the calls reach. (A few batches reused time a few examples'
    masks: in `benchmarks/gated_conv2d.py`, eight examples at batch 1 had
    masks of 0.30-0.42 density where the calibrated density was 1/4.) When
    `x` has fewer than `batch_size` examples, one batch of them repeated.

    Args:
        x: an array of at least one example, `(n, ...)`.
        batch_size: positive int, examples per batch.
        repeats: positive int, the number of timed calls: at most that many
            batches are returned.

    Returns:
        A list of `min(n // batch_size, repeats)` consecutive batches of `x`
        (slices), or one batch `np.resize`d from `x` when `n < batch_size`.

    Raises:
        ValueError: `batch_size` or `repeats` not a positive int, or `x`
            empty.

    Examples:
        >>> [b.tolist() for b in timed_batches(np.arange(5), 2, repeats=10)]
        [[0, 1], [2, 3]]
        >>> [b.tolist() for b in timed_batches(np.arange(5), 1, repeats=2)]
        [[0], [1]]
        >>> [b.tolist() for b in timed_batches(np.arange(3), 4, repeats=10)]
        [[0, 1, 2, 0]]
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("repeats", repeats)
    if not len(x):
        raise ValueError("`x` must hold at least one example. Received: 0")
    count = min(len(x) // batch_size, repeats)
    if count == 0:
        return [np.resize(x, (batch_size, *np.shape(x)[1:]))]
    return [x[i * batch_size:(i + 1) * batch_size] for i in range(count)]


def paired_latencies(functions, reference, inputs, repeats=50, warmup=WARMUP_CALLS, **options):
    """Median seconds of each function timed against `reference` alone.

    Each function alternates with `functions[reference]` only
    (`median_latencies` of the pair): functions that read the same weights
    are never timed in one alternation, where a later one would find in
    cache what an earlier one read for the same input.

    Args:
        functions: `{name: callable(batch)}`, holding `reference` and at
            least one other function.
        reference: the name of the function every other one is timed
            against.
        inputs: a list of batches, as for `median_latencies`.
        repeats: timed calls per function and pair.
        warmup: untimed calls of each function before the first pair (a
            graph's steady speed, `WARMUP_CALLS`); each pair then starts
            with `PAIR_WARMUP` untimed calls of both, for the caches.
        **options: `consecutive` and `before_call`, passed to
            `median_latencies`.

    Returns:
        `{name: (seconds, reference seconds in its pair)}` for every function
        but the reference, and for the reference the median of its pairs
        (twice).

    Raises:
        ValueError: `reference` not in `functions`, or no other function;
            and what `median_latencies` raises.

    Examples:
        >>> timed = paired_latencies({"ref": abs, "b": round}, "ref", [-1.5], repeats=4)
        >>> sorted(timed), len(timed["b"])
        (['b', 'ref'], 2)
    """
    if reference not in functions or len(functions) < 2:
        raise ValueError(
            "`functions` must hold `reference` and at least one other function. "
            f"Received: reference={reference!r}, functions {sorted(functions)}"
        )
    _warm_up(functions.values(), inputs, warmup)  # each once, not again in every pair
    results, reference_seconds = {}, []
    for name, function in functions.items():
        if name == reference:
            continue
        pair = median_latencies(
            {reference: functions[reference], name: function}, inputs, repeats,
            min(warmup, PAIR_WARMUP), **options,
        )
        results[name] = (pair[name], pair[reference])
        reference_seconds.append(pair[reference])
    middle = float(np.median(reference_seconds))
    return {reference: (middle, middle), **results}


def numpy_calls(functions):
    """`{name: f}` -> `{name: x -> f(x).numpy()}`, each `tf.function` (with
    an input signature) called as its concrete function.

    A concrete function skips the `tf.function`'s dispatch, about 0.1 ms a
    call on a 2-core Xeon, as `keras_condcomp.models.compact_inference`'s
    callables do: every graph timed side by side is then called the same
    way.

    Args:
        functions: `{name: callable}`, each returning a tensor; a
            `tf.function` (anything with `get_concrete_function`) must have
            an input signature, since its concrete function is taken with
            no arguments.

    Returns:
        `{name: callable(x) -> numpy array}`.

    Examples:
        >>> import numpy as np, tensorflow as tf
        >>> double = tf.function(lambda x: 2 * x, input_signature=[tf.TensorSpec([None], "float32")])
        >>> numpy_calls({"double": double})["double"](np.ones(2, "float32")).tolist()
        [2.0, 2.0]
    """
    return {name: _numpy_call(function) for name, function in functions.items()}


def _numpy_call(function):
    if hasattr(function, "get_concrete_function"):
        function = function.get_concrete_function()
    return lambda x: function(x).numpy()


def _compiled_inference(model):
    """`model`'s inference as one graph, traced now: a numpy batch -> numpy
    (called as a concrete function, see `numpy_calls`)."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], "float32")
    run = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    return _numpy_call(run)


def tuned_inference(model, x, batch_size, repeats):
    """`model`'s inference with each gated layer's path chosen by timing.

    Runs `keras_condcomp.models.tune_execution(model, x, batch_size,
    repeats)`, traces the model's inference as one graph with those paths,
    then gives each layer back the path it had: the graph keeps the tuned
    ones, the model is left as it was (also when tuning fails).

    Args:
        model: a built functional or Sequential model with gated layers and
            one input, as `tune_execution` takes it.
        x: representative inputs, at least `batch_size` examples.
        batch_size: the batch size to tune for (positive int).
        repeats: timed calls per path (positive int).

    Returns:
        `(call, report)`: a callable from a numpy batch to numpy outputs
        (its graph accepts any batch size), and `tune_execution`'s report.

    Raises:
        ValueError: what `tune_execution` raises.

    Examples:
        >>> import numpy as np, keras
        >>> from keras_condcomp.layers import GatedDense
        >>> inputs = keras.Input((16,))
        >>> model = keras.Model(inputs, GatedDense(32, blocks=4, name="g")(inputs))
        >>> x = np.random.rand(8, 16).astype("float32")
        >>> call, report = tuned_inference(model, x, batch_size=4, repeats=2)
        >>> call(x[:4]).shape, sorted(report), model.get_layer("g").execution
        ((4, 32), ['g'], 'auto')
    """
    from keras_condcomp.models import tune_execution
    from keras_condcomp.models.policy_gradient_model import gated_layers

    before = {layer.name: layer.execution for layer in gated_layers(model)}
    try:
        report = tune_execution(model, x, batch_size=batch_size, repeats=repeats)
        call = _compiled_inference(model)
    finally:
        for layer in gated_layers(model):
            layer.execution = before[layer.name]
    return call, report


def _measure(gated_path, dense_path, data_path, batch_sizes, repeats):
    import keras

    import keras_condcomp  # noqa: F401  (registers the layers)

    gated = keras.models.load_model(gated_path, compile=False)
    dense = keras.models.load_model(dense_path, compile=False)
    x = np.load(data_path)
    gated_call, dense_call = _compiled_inference(gated), _compiled_inference(dense)
    compact_call = _compact_call(gated)
    results = {}
    for batch_size in batch_sizes:
        batches = timed_batches(x, batch_size, repeats)
        # Paths chosen by timing for this batch size.
        tuned_call, report = tuned_inference(
            gated, np.concatenate(batches), batch_size, repeats=max(3, repeats // 4)
        )
        functions = {"gated": gated_call, "tuned": tuned_call, "dense": dense_call}
        if compact_call is not None:
            functions["compact"] = compact_call
        medians = median_latencies(functions, batches, repeats=repeats)
        results[str(batch_size)] = {
            "gated_seconds": medians["gated"],
            "dense_seconds": medians["dense"],
            "speedup": medians["dense"] / medians["gated"],
            "tuned_seconds": medians["tuned"],
            "tuned_speedup": medians["dense"] / medians["tuned"],
            "tuned_execution": {name: r["execution"] for name, r in report.items()},
        }
        if "compact" in medians:
            results[str(batch_size)].update(
                compact_seconds=medians["compact"],
                compact_speedup=medians["dense"] / medians["compact"],
            )
    return results


def _compact_call(model):
    """`keras_condcomp.models.compact_inference(model)`, a numpy batch ->
    numpy; None when the model is not a single chain of layers."""
    from keras_condcomp.models import compact_inference

    try:
        predict = compact_inference(model)
    except ValueError:
        return None
    return lambda x: predict(x).numpy()


def measure_models_speed(gated_path, dense_path, x, batch_sizes=(1, 256), threads=1, repeats=100):
    """Speedup of a saved gated model over a saved dense one, in a fresh process.

    The gated model runs as saved (`execution="auto"` by default), as
    `tuned`, with each layer's path chosen by
    `keras_condcomp.models.tune_execution` for that batch size, and as
    `compact`, through `keras_condcomp.models.compact_inference` when the
    gated model is a single chain of layers. Every model is called as
    one compiled graph; at each batch size they alternate call by call
    (`median_latencies`) over the batches of `timed_batches(x, batch_size,
    repeats)`.

    Args:
        gated_path: the gated model's `.keras` file.
        dense_path: the dense model's `.keras` file.
        x: example inputs `(n, ...)`, cycled through (sent as float32).
        batch_sizes: non-empty sequence of positive ints, the batch sizes to
            time (default `(1, 256)`).
        threads: positive int, TensorFlow intra-op threads (inter-op pinned
            to 1; default 1).
        repeats: positive int, timed calls per model and batch size
            (medians reported; default 100).

    Returns:
        `{str(batch_size): {"gated_seconds", "dense_seconds", "speedup",
        "tuned_seconds", "tuned_speedup", "tuned_execution"}}`, plus
        `"compact_seconds"` and `"compact_speedup"` for a chain.

    Raises:
        ValueError: a path that is not a file, or a bad `batch_sizes`,
            `threads` or `repeats`.
        RuntimeError: the measuring process failed (the message ends with
            its stderr).

    Examples:
        >>> import os, tempfile, numpy as np
        >>> from keras_condcomp.models import build_dense_mlp, build_gated_mlp
        >>> with tempfile.TemporaryDirectory() as tmp:  # doctest: +SKIP
        ...     gated, dense = os.path.join(tmp, "g.keras"), os.path.join(tmp, "d.keras")
        ...     build_gated_mlp(64, 10, units=256, blocks=16).save(gated)
        ...     build_dense_mlp(64, 10, units=256).save(dense)
        ...     x = np.random.rand(64, 64).astype("float32")
        ...     results = measure_models_speed(gated, dense, x, batch_sizes=(1,), repeats=5)
        >>> sorted(results["1"])  # doctest: +SKIP
        ['compact_seconds', 'compact_speedup', 'dense_seconds', 'gated_seconds', 'speedup', 'tuned_execution', 'tuned_seconds', 'tuned_speedup']
    """
    import tempfile

    for name, path in (("gated_path", gated_path), ("dense_path", dense_path)):
        if not os.path.isfile(path):
            raise ValueError(f"`{name}` must be a .keras file. Received: {name}={path!r}")
    if not batch_sizes:
        raise ValueError(f"`batch_sizes` must not be empty. Received: batch_sizes={batch_sizes!r}")
    for batch_size in batch_sizes:
        check_positive_int("batch_sizes", batch_size)
    check_positive_int("threads", threads)
    check_positive_int("repeats", repeats)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "x.npy")
        np.save(data_path, np.asarray(x, "float32"))
        command = [
            sys.executable, "-m", "keras_condcomp.speed", gated_path, dense_path,
            data_path, ",".join(map(str, batch_sizes)), str(threads), str(repeats),
        ]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"Speed measurement failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    gated_path, dense_path, data_path, sizes, threads, repeats = sys.argv[1:7]
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(int(threads))
    tf.config.threading.set_inter_op_parallelism_threads(1)
    sizes = [int(s) for s in sizes.split(",")]
    print(json.dumps(_measure(gated_path, dense_path, data_path, sizes, int(repeats))))
