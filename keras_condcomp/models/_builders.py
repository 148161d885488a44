"""Checks the model builders share (private)."""

from keras_condcomp._arguments import is_integer


def check_num_classes(num_classes):
    """`num_classes` as an int (numpy integers taken), at least 2."""
    if not is_integer(num_classes) or num_classes < 2:
        raise ValueError(
            f"`num_classes` must be an integer >= 2. Received: num_classes={num_classes!r}"
        )
    return int(num_classes)


def check_builder_keywords(gate_kwargs, reserved, what):
    """A ValueError naming the keyword arguments the builder sets itself for
    every `what` (such as "gated convolution"), and a bad `seed`."""
    taken = sorted(set(gate_kwargs or ()) & set(reserved))
    if taken:
        raise ValueError(
            f"The builder sets {taken} of every {what} itself. "
            f"Received: {', '.join(f'{k}={gate_kwargs[k]!r}' for k in taken)}"
        )
    seed = (gate_kwargs or {}).get("seed")
    if seed is not None and not is_integer(seed):
        raise ValueError(f"`seed` must be None or an integer. Received: seed={seed!r}")
