from keras_condcomp.speed import paired_latencies


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
    # "a" and "b" never run in one alternation, and each input reaches every function.
    first_b = next(i for i, (name, _) in enumerate(seen) if name == "b")
    assert all(name != "a" for name, _ in seen[first_b:])
    assert {batch for name, batch in seen if name == "b"} == {1, 2}
