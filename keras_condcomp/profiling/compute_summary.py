"""summary: prints a model's compute profile as a table."""

import rich.console
import rich.markup
import rich.table

from keras_condcomp.profiling.profiler import profile_macs

__all__ = ["format_profile", "summary"]

_DENSITY_HEADERS = {
    "measured": "Density (measured)",
    "given": "Density (given)",
    "targets": "Density (target)",
}


def _macs(value):
    return f"{value:,.0f}"


def format_profile(profile, line_length=None):
    """The text of `summary`'s table for a `ModelProfile`.

    The table, then notes: where the densities come from, the totals and
    ideal speedup, and the layers whose MACs are not counted (marked `*`).

    Args:
        profile: a `ModelProfile` (from `profile_macs`).
        line_length: None (default: as wide as the content) or the table's
            total width in characters.

    Returns:
        str, ending with a newline.

    Examples:
        >>> from keras_condcomp.profiling import LayerProfile, ModelProfile
        >>> profile = ModelProfile("mlp", (LayerProfile("logits", "Dense", 650, 640),))
        >>> print(format_profile(profile).splitlines()[-1])
         Dense MACs: 640   Conditional MACs: 640 (policies included)   Ideal speedup: 1.00x
    """
    names = [f"{row.name} ({row.kind}) *" for row in profile.layers]
    table = rich.table.Table(
        rich.table.Column(
            "Layer (type)", min_width=min(40, max(map(len, names), default=12))
        ),
        *(
            rich.table.Column(header, justify="right", no_wrap=True)
            for header in (
                "Params", "Blocks", "Dense MACs", "Policy MACs", "Input density",
                _DENSITY_HEADERS[profile.density_source], "Conditional MACs",
            )
        ),
        title=f'Compute of "{rich.markup.escape(profile.name)}" (MACs per example)',
        show_footer=False,
        width=line_length,
    )
    for row in profile.layers:
        name = f"{rich.markup.escape(row.name)} ({row.kind})"
        if not row.counted:
            name += " *"
        gated = row.is_gated
        table.add_row(
            name,
            f"{row.parameters:,}",
            str(row.blocks) if gated else "-",
            _macs(row.dense_macs),
            _macs(row.policy_macs) if gated else "-",
            f"{row.input_density:.3f}" if gated else "-",
            f"{row.density:.3f}" if gated else "-",
            _macs(row.conditional_macs),
        )
    table.add_section()
    table.add_row(
        "Total", f"{profile.parameters:,}", "", _macs(profile.dense_macs),
        _macs(profile.policy_macs), "", "", _macs(profile.conditional_macs),
    )
    console = rich.console.Console(
        highlight=False, force_terminal=False, color_system=None, width=line_length or 250
    )
    with console.capture() as captured:
        console.print(table)
        if profile.density_source == "measured":
            where = f"measured on {profile.examples:,} examples (training=False)"
        elif profile.density_source == "given":
            where = "given by the caller"
        else:
            where = "each layer's target_density (1 without one)"
        console.print(f" Densities: {where}")
        console.print(
            f" Dense MACs: {_macs(profile.dense_macs)}   Conditional MACs: "
            f"{_macs(profile.conditional_macs)} (policies included)   "
            f"Ideal speedup: {profile.ideal_speedup:.2f}x"
        )
        if profile.uncounted:
            console.print(
                " * MACs not known for: "
                + ", ".join(rich.markup.escape(name) for name in profile.uncounted)
                + " (counted as 0: no rule for the layer, or an input size not fixed)"
            )
    return captured.get()


def summary(model, x=None, print_fn=None, line_length=None, batch_size=256):
    """Prints a table of parameters and MACs per example of every layer.

    Columns: parameters, blocks, dense MACs, policy MACs, the density of the
    gated layer feeding it (input density), the layer's density (measured on
    `x` when given, else its `target_density`) and the conditional MACs
    `policy + dense * mean(input density * density)`; then the totals and the
    ideal speedup, dense MACs over conditional MACs. The numbers come from
    `keras_condcomp.profiling.profile_macs`, which returns them as a
    `ModelProfile`.

    Args:
        model: a built Keras model.
        x: optional inputs to measure the densities on (see `profile_macs`).
        print_fn: function called with the whole table as one string
            (default `print`), as in `keras.Model.summary`.
        line_length: total width of the table (default: as wide as its content).
        batch_size: batch size for measuring on arrays.

    Examples:
        >>> import keras
        >>> from keras_condcomp.layers import GatedDense
        >>> inputs = keras.Input((100,))
        >>> hidden = GatedDense(64, blocks=4, target_density=0.25, name="gated")(inputs)
        >>> model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(hidden))
        >>> lines = []
        >>> summary(model, print_fn=lines.append)
        >>> print(lines[0].splitlines()[-1])
         Dense MACs: 7,040   Conditional MACs: 2,640 (policies included)   Ideal speedup: 2.67x
    """
    if print_fn is not None and not callable(print_fn):
        raise ValueError(f"`print_fn` must be callable. Received: print_fn={print_fn!r}")
    text = format_profile(profile_macs(model, x=x, batch_size=batch_size), line_length)
    (print_fn or print)(text.rstrip("\n"))
