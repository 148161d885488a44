import numpy as np
import pytest

from keras_condcomp.speed import (
    PAIR_WARMUP, evict_caches, median_latencies, numpy_calls, paired_latencies,
)


def test_paired_latencies_time_each_function_against_the_reference_alone():
    seen = []

    def make(name):
        def call(batch):
            seen.append((name, batch))
        return call

    functions = {name: make(name) for name in ("reference", "a", "b")}
    timed = paired_latencies(functions, "reference", [1, 2], repeats=3, warmup=1)
    assert set(timed) == {"reference", "a", "b"}
    assert all(len(pair) == 2 and min(pair) >= 0 for pair in timed.values())
    # After one warm-up call each, "a" and "b" never run in one alternation,
    # and each input reaches every function.
    assert [name for name, _ in seen[:3]] == ["reference", "a", "b"]
    timed_calls = seen[3:]
    first_b = next(i for i, (name, _) in enumerate(timed_calls) if name == "b")
    assert all(name != "a" for name, _ in timed_calls[first_b:])
    assert {batch for name, batch in seen if name == "b"} == {1, 2}


def test_paired_latencies_warm_every_function_up_once_then_each_pair_briefly():
    # A graph needs about 90 calls to reach its steady speed (WARMUP_CALLS):
    # given once to each function, not again to the reference in every pair.
    seen = []
    functions = {name: (lambda batch, name=name: seen.append(name)) for name in ("ref", "a", "b")}
    paired_latencies(functions, "ref", [0], repeats=2, warmup=10)
    assert seen[:30] == ["ref", "a", "b"] * 10
    per_pair = PAIR_WARMUP + 2
    assert seen.count("a") == seen.count("b") == 10 + per_pair
    assert seen.count("ref") == 10 + 2 * per_pair
    with pytest.raises(ValueError, match="`inputs` must hold at least one input"):
        paired_latencies(functions, "ref", [], repeats=2)


def test_median_latencies_runs_consecutive_calls_and_the_untimed_hook():
    seen = []
    functions = {name: (lambda batch, name=name: seen.append((name, batch))) for name in "ab"}
    timed = median_latencies(
        functions, [0, 1, 2, 3, 4], repeats=5, warmup=0, consecutive=2,
        before_call=lambda: seen.append(("hook", None)),
    )
    assert set(timed) == {"a", "b"}
    calls = [entry for entry in seen if entry[0] != "hook"]
    # Turns of two calls, the starter rotating; the last turn has the fifth call.
    assert calls == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2), ("b", 3),
                     ("a", 2), ("a", 3), ("a", 4), ("b", 4)]
    assert [name for name, _ in seen[::2]] == ["hook"] * 10


@pytest.mark.parametrize("consecutive", [0, 1.5, True])
def test_median_latencies_rejects_a_bad_run_length(consecutive):
    with pytest.raises(ValueError, match="consecutive"):
        median_latencies({"a": abs}, [1], repeats=2, consecutive=consecutive)


def test_evict_caches_writes_its_buffer():
    evict_caches(1024)
    evict_caches(1024)  # the same buffer, written again


def test_numpy_calls_call_a_tf_function_as_its_concrete_function():
    import tensorflow as tf

    traced = []

    def double(x):
        traced.append(x)
        return 2 * x

    spec = tf.TensorSpec([None, 2], "float32")
    calls = numpy_calls({
        "graph": tf.function(double, input_signature=[spec]),
        "plain": lambda x: tf.constant(x) + 1,
    })
    assert len(traced) == 1  # its concrete function, made before any call
    for batch in (np.ones((1, 2), "float32"), np.ones((3, 2), "float64")):
        np.testing.assert_array_equal(calls["graph"](batch), 2 * batch)
        np.testing.assert_array_equal(calls["plain"](batch), batch + 1)
        assert isinstance(calls["graph"](batch), np.ndarray)
    assert len(traced) == 1


def test_speed_helpers_name_bad_arguments_instead_of_returning_nan(tmp_path):
    from keras_condcomp.speed import measure_models_speed, timed_batches

    with pytest.raises(ValueError, match="repeats=0"):
        median_latencies({"a": abs}, [1.0], repeats=0)
    with pytest.raises(ValueError, match="at least one input"):
        median_latencies({"a": abs}, [], repeats=2)
    with pytest.raises(ValueError, match="reference='a'"):
        paired_latencies({"a": abs}, "a", [1.0], repeats=2)
    for batch_size in (0, -2):
        with pytest.raises(ValueError, match=f"batch_size={batch_size}"):
            timed_batches(np.arange(4), batch_size, repeats=2)
    with pytest.raises(ValueError, match="at least one example"):
        timed_batches(np.zeros((0, 3)), 1, repeats=2)
    with pytest.raises(ValueError, match="gated_path="):
        measure_models_speed(tmp_path / "absent.keras", tmp_path / "absent.keras", np.zeros((1, 2)))
