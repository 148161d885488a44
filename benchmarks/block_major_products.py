"""The dense product over GatedDense's block-major kernel, in TensorFlow ops.

Without the native kernels (no C++ compiler), `"auto"`'s dense fallback
(`"masked"`) multiplies the `(blocks, input_dim, block_size)` kernel in
TensorFlow ops. No 2-D view of that layout is the `(input_dim, units)`
kernel of `keras.layers.Dense`, so no single product reads it in place.
This times every form of the product tried against `x @ kernel` on the
Dense layout (the same weights), each alternating with it call by call
after a warm-up (`keras_condcomp.speed.paired_latencies`), median of
`--repeats` calls, after checking that each gives the same outputs:

- `copied`: the kernel copied to the Dense layout, one product (the engine
  above batch 1 for blocks of up to 16 units);
- `batched`: one batched product over the blocks, the output transposed
  (the engine at batch 1);
- `per_block`: one 2-D product a block on the unstacked kernel, the outputs
  concatenated (the engine above batch 1 for wider blocks);
- `transposed_batched`: the batched product with the kernel's blocks as the
  left operand, `block^T @ x^T`;
- `einsum`: `tf.einsum("bi,kio->bko", ...)`;
- `batch_halves`: `per_block` on each half of the batch (more independent
  products for two threads);
- `block_pairs`: two blocks copied side by side, one product a pair.

Threads are pinned before TensorFlow runs an op, as in `gated_dense.py`:
`--threads N` sets intra-op parallelism to N and inter-op to 1, `--threads
0` leaves TensorFlow's defaults (all cores). Prints the speedups over
`x @ kernel` (below 1: slower) and writes
`block_major_products_threads{N}.json` to `--out`.
"""

import argparse
import importlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from run_options import (  # noqa: E402
    HelpFormatter, check_run_options, cpu_description, fill_defaults, listed,
)

# (input_dim, blocks, block_size): the benchmark shapes' layers and wider
# and narrower blocks.
SHAPES = (
    (784, 16, 16),
    (1024, 32, 32),
    (1024, 16, 64),
    (1536, 24, 64),
    (3072, 24, 64),
    (1024, 8, 128),
)
BATCH_SIZES = (1, 50, 256)
QUICK_BATCH_SIZES = (50,)
REPEATS, QUICK_REPEATS = 40, 5


def _forms(tf, engine):
    """`{name: product(x, block_kernel)}`, each `(batch, units)` in the Dense
    kernel's unit order: the engine's three (`engine`, the module
    `keras_condcomp.ops.block_sparse_dense`), then the others."""
    def units(products):  # (blocks, batch, block_size) -> (batch, units)
        blocks, _, size = products.shape
        return tf.reshape(tf.transpose(products, (1, 0, 2)), (-1, blocks * size))

    per_block = engine.per_block_product

    def transposed_batched(x, block_kernel):
        x_t = tf.broadcast_to(tf.transpose(x)[None], (block_kernel.shape[0], *x.shape[::-1]))
        return units(tf.transpose(tf.matmul(block_kernel, x_t, adjoint_a=True), (0, 2, 1)))

    def batch_halves(x, block_kernel):
        half = x.shape[0] // 2
        if not half:
            return per_block(x, block_kernel)
        return tf.concat([per_block(x[:half], block_kernel), per_block(x[half:], block_kernel)], 0)

    def block_pairs(x, block_kernel):
        blocks, input_dim, size = block_kernel.shape
        pairs = tf.reshape(block_kernel, (blocks // 2, 2, input_dim, size))
        pairs = tf.reshape(tf.transpose(pairs, (0, 2, 1, 3)), (blocks // 2, input_dim, 2 * size))
        return per_block(x, pairs)

    return {
        "copied": engine.copied_product,
        "batched": lambda x, block_kernel: tf.reshape(
            engine.batched_products(x, block_kernel), (x.shape[0], -1)
        ),
        "per_block": per_block,
        "transposed_batched": transposed_batched,
        "einsum": lambda x, block_kernel: tf.reshape(
            tf.einsum("bi,kio->bko", x, block_kernel), (x.shape[0], -1)
        ),
        "batch_halves": batch_halves,
        "block_pairs": block_pairs,
    }


def run(shapes, batch_sizes, repeats, forms=None):
    """Rows `{input_dim, blocks, block_size, batch, form, seconds,
    dense_seconds, speedup}` for every shape, batch and form.

    Raises:
        AssertionError: a form's outputs differ from `x @ kernel`.
    """
    import tensorflow as tf

    from keras_condcomp.ops import to_block_kernel
    from keras_condcomp.speed import paired_latencies

    engine = importlib.import_module("keras_condcomp.ops.block_sparse_dense")
    all_forms = _forms(tf, engine)
    forms = all_forms if forms is None else {name: all_forms[name] for name in forms}
    rng = np.random.default_rng(0)
    rows = []
    for input_dim, blocks, block_size in shapes:
        kernel = tf.constant(rng.standard_normal((input_dim, blocks * block_size), "float32"))
        block_kernel = tf.constant(to_block_kernel(kernel, blocks))
        for batch in batch_sizes:
            x = tf.constant(rng.standard_normal((batch, input_dim), "float32"))
            spec = [tf.TensorSpec(x.shape, tf.float32)]
            functions = {"dense": tf.function(
                lambda x: tf.matmul(x, kernel), input_signature=spec, autograph=False
            )}
            expected = functions["dense"](x).numpy()
            for name, form in forms.items():
                function = tf.function(
                    lambda x, form=form: form(x, block_kernel), input_signature=spec, autograph=False
                )
                np.testing.assert_allclose(
                    function(x).numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(),
                    err_msg=f"form {name!r}, shape {(input_dim, blocks, block_size)}, batch {batch}",
                )
                functions[name] = function
            calls = {name: (lambda x, f=f: f(x).numpy()) for name, f in functions.items()}
            timed = paired_latencies(calls, "dense", [x], repeats=repeats)
            for name in forms:
                seconds, dense_seconds = timed[name]
                rows.append({
                    "input_dim": input_dim, "blocks": blocks, "block_size": block_size,
                    "batch": batch, "form": name, "seconds": seconds,
                    "dense_seconds": dense_seconds, "speedup": dense_seconds / seconds,
                })
    return rows


def table(rows):
    """The speedups over `x @ kernel`, a line per shape and batch."""
    forms = list(dict.fromkeys(row["form"] for row in rows))
    lines = [f"{'shape':>16} {'batch':>5} {'dense ms':>8} " + " ".join(f"{f:>18}" for f in forms)]
    cells = {}
    for row in rows:
        key = (row["input_dim"], row["blocks"], row["block_size"], row["batch"])
        cells.setdefault(key, {"dense": row["dense_seconds"]})[row["form"]] = row["speedup"]
    for (input_dim, blocks, size, batch), speedups in cells.items():
        shape = f"{input_dim}->{blocks}x{size}"
        lines.append(
            f"{shape:>16} {batch:>5} {speedups['dense'] * 1e3:>8.3f} "
            + " ".join(f"{speedups[f]:>17.2f}x" for f in forms)
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--batch-sizes", nargs="+", type=int,
                        help=f"default: {listed(BATCH_SIZES)}; --quick: {listed(QUICK_BATCH_SIZES)}")
    parser.add_argument("--threads", type=int, nargs=1, default=[1],
                        help="intra-op threads, inter-op 1 (0: TensorFlow's defaults, all cores)")
    parser.add_argument("--repeats", type=int,
                        help=f"timed calls per form; default: {REPEATS}; --quick: {QUICK_REPEATS}")
    parser.add_argument("--quick", action="store_true",
                        help="the first two shapes, fewer batches and calls: a check that it runs")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="folder for the JSON results")
    args = parser.parse_args(argv)
    fill_defaults(args, {"batch_sizes": BATCH_SIZES}, {"batch_sizes": QUICK_BATCH_SIZES})
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else REPEATS
    check_run_options(parser, args)
    (threads,) = args.threads
    shapes = SHAPES[:2] if args.quick else SHAPES

    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    started = time.time()
    rows = run(shapes, args.batch_sizes, args.repeats)
    print(table(rows))
    result = {"cpu": cpu_description(), "threads": threads or "all", "repeats": args.repeats,
              "seconds": round(time.time() - started, 1), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"block_major_products_threads{threads}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
