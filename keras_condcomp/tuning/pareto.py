"""The accuracy-versus-compute Pareto front of a finished search."""

import dataclasses
import math
import os

import rich.console
import rich.table

__all__ = ["TrialResult", "pareto_front", "print_pareto_front", "trial_results"]


@dataclasses.dataclass(frozen=True)
class TrialResult:
    """Accuracy and MACs per example of one completed trial.

    Both are taken from the same epoch: the trial's best epoch for the
    tuner's objective, as KerasTuner records it. Made by `trial_results`.

    Args:
        trial_id: KerasTuner's trial id.
        accuracy: the trial's accuracy metric (e.g. `val_accuracy`).
        conditional_macs: its MACs per example (e.g. `val_conditional_macs`).
        hyperparameters: `{name: value}` of the trial (not part of the hash).

    Examples:
        >>> result = TrialResult("0001", 0.95, 3000.0, {"units": 128})
        >>> result.accuracy, result.hyperparameters["units"]
        (0.95, 128)
    """

    trial_id: str
    accuracy: float
    conditional_macs: float
    hyperparameters: dict = dataclasses.field(hash=False)

    def dominates(self, other):
        """At least as accurate and as cheap as `other`, and better in one.

        Args:
            other: another `TrialResult`.

        Returns:
            bool.

        Examples:
            >>> cheap = TrialResult("a", 0.90, 1000.0, {})
            >>> cheap.dominates(TrialResult("b", 0.90, 2000.0, {}))
            True
            >>> cheap.dominates(TrialResult("c", 0.95, 2000.0, {}))
            False
        """
        return (
            self.accuracy >= other.accuracy
            and self.conditional_macs <= other.conditional_macs
            and (self.accuracy > other.accuracy or self.conditional_macs < other.conditional_macs)
        )


def pareto_front(results):
    """The results no other result dominates, from cheapest to dearest.

    Args:
        results: an iterable of `TrialResult` (e.g. `trial_results(tuner)`).

    Returns:
        A list of `TrialResult`, sorted by MACs (ties: most accurate first).

    Raises:
        ValueError: a result with an accuracy or MACs that is not finite.

    Examples:
        >>> points = [TrialResult("a", 0.90, 1000.0, {}), TrialResult("b", 0.95, 3000.0, {}),
        ...           TrialResult("c", 0.89, 2000.0, {}), TrialResult("d", 0.97, 9000.0, {})]
        >>> print(*(point.trial_id for point in pareto_front(points)))
        a b d
    """
    results = list(results)
    for r in results:
        if not (math.isfinite(r.accuracy) and math.isfinite(r.conditional_macs)):
            raise ValueError(
                "Every result must have a finite accuracy and MACs. Received: trial "
                f"{r.trial_id!r} with accuracy={r.accuracy}, "
                f"conditional_macs={r.conditional_macs}"
            )
    front = [r for r in results if not any(other.dominates(r) for other in results)]
    return sorted(front, key=lambda r: (r.conditional_macs, -r.accuracy))


def _oracle(tuner):
    oracle = getattr(tuner, "oracle", tuner)
    if type(oracle).__name__ == "OracleClient":
        raise ValueError(
            "`tuner` is a worker of a distributed search: only the chief's tuner "
            "holds the trials. Read the front from the chief."
        )
    if not hasattr(oracle, "trials"):
        raise ValueError(
            "`tuner` must be a KerasTuner tuner or oracle. "
            f"Received: tuner={type(tuner).__name__}"
        )
    return oracle


def trial_results(tuner, accuracy="val_accuracy", macs="val_conditional_macs"):
    """A `TrialResult` for every completed trial of `tuner` (or its oracle).

    A trial whose accuracy or MACs is not finite (a diverged one) is left out.
    Each value is the last KerasTuner recorded for the trial, which is that
    of its best epoch for the objective.

    Args:
        tuner: a KerasTuner tuner or oracle; in a distributed search, the
            chief's.
        accuracy: name of the accuracy metric in the trials (default
            `"val_accuracy"`).
        macs: name of the MACs metric in the trials (default
            `"val_conditional_macs"`).

    Returns:
        A list of `TrialResult`, in the oracle's order of trials.

    Raises:
        ValueError: `tuner` is neither a tuner nor an oracle, or is a
            distributed search's worker; or a completed trial recorded no
            `accuracy` or no `macs`.

    Examples:
        A search whose trials return their metrics directly (a stand-in for
        a search of `GatedMLPHyperModel`, which logs both):

        >>> import tempfile, keras_tuner
        >>> class Search(keras_tuner.GridSearch):
        ...     def run_trial(self, trial, *args, **kwargs):
        ...         units = trial.hyperparameters.Choice("units", [64, 128])
        ...         return {"val_accuracy": 0.8 + units / 1000, "val_conditional_macs": 100.0 * units}
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     tuner = Search(objective=keras_tuner.Objective("val_accuracy", "max"), directory=tmp)
        ...     tuner.search(verbose=0)
        ...     results = trial_results(tuner)
        >>> [(r.hyperparameters["units"], round(r.accuracy, 3), r.conditional_macs) for r in results]
        [(64, 0.864, 6400.0), (128, 0.928, 12800.0)]
    """
    results = []
    for trial in _oracle(tuner).trials.values():
        if trial.status != "COMPLETED":
            continue
        for name in (accuracy, macs):
            if not trial.metrics.exists(name):
                raise ValueError(
                    f"Trial {trial.trial_id} recorded no {name!r}. Recorded: "
                    f"{sorted(trial.metrics.metrics)}"
                )
        result = TrialResult(
            trial.trial_id,
            float(trial.metrics.get_last_value(accuracy)),
            float(trial.metrics.get_last_value(macs)),
            dict(trial.hyperparameters.values),
        )
        if math.isfinite(result.accuracy) and math.isfinite(result.conditional_macs):
            results.append(result)
    return results


def _plot(results, front, path, accuracy, macs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter(
        [r.conditional_macs for r in results], [r.accuracy for r in results],
        color="0.6", label="trials",
    )
    axes.plot(
        [r.conditional_macs for r in front], [r.accuracy for r in front],
        "o-", color="tab:red", drawstyle="steps-post", label="Pareto front",
    )
    for r in front:
        axes.annotate(r.trial_id, (r.conditional_macs, r.accuracy), fontsize=7,
                      xytext=(3, 3), textcoords="offset points")
    axes.set_xscale("log")
    axes.set_xlabel(f"{macs} (MACs per example, log scale)")
    axes.set_ylabel(accuracy)
    axes.set_title("Accuracy versus compute")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def print_pareto_front(
    tuner, plot_path=None, accuracy="val_accuracy", macs="val_conditional_macs",
    print_fn=None,
):
    """Prints the Pareto front (accuracy vs MACs) of a search, optionally plots it.

    Args:
        tuner: a KerasTuner tuner (or its oracle) whose trials logged
            `accuracy` and `macs`, e.g. a search of `GatedMLPHyperModel`.
        plot_path: None (default), or where to write a PNG of all trials
            and the front (its folder must exist).
        accuracy: name of the accuracy metric in the trials.
        macs: name of the MACs metric in the trials.
        print_fn: called with the table as one string (default `print`).

    Returns:
        the front, a list of `TrialResult` from cheapest to dearest.

    Raises:
        ValueError: `print_fn` not callable, no completed trial, or what
            `trial_results` raises.
        OSError: the plot could not be written (after the table is printed).

    Examples:
        >>> import tempfile, keras_tuner
        >>> class Search(keras_tuner.GridSearch):
        ...     def run_trial(self, trial, *args, **kwargs):
        ...         units = trial.hyperparameters.Choice("units", [64, 128, 256])
        ...         accuracy = {64: 0.85, 128: 0.80, 256: 0.90}[units]
        ...         return {"val_accuracy": accuracy, "val_conditional_macs": 100.0 * units}
        >>> lines = []
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     tuner = Search(objective=keras_tuner.Objective("val_accuracy", "max"), directory=tmp)
        ...     tuner.search(verbose=0)
        ...     front = print_pareto_front(tuner, print_fn=lines.append)
        >>> print(lines[0].splitlines()[0].strip())
        Pareto front: 2 of 3 completed trials
        >>> [r.hyperparameters["units"] for r in front]
        [64, 256]
    """
    if print_fn is not None and not callable(print_fn):
        raise ValueError(f"`print_fn` must be callable. Received: print_fn={print_fn!r}")
    if plot_path is not None and not isinstance(plot_path, (str, os.PathLike)):
        raise ValueError(f"`plot_path` must be a path or None. Received: plot_path={plot_path!r}")
    results = trial_results(tuner, accuracy, macs)
    if not results:
        raise ValueError("The search has no completed trial: there is no front to show.")
    front = pareto_front(results)
    # Hyperband's bookkeeping entries (`tuner/epochs`, ...) are not choices.
    names = sorted({
        name for r in front for name in r.hyperparameters if not name.startswith("tuner/")
    })
    table = rich.table.Table(
        "Trial", rich.table.Column(accuracy, justify="right"),
        rich.table.Column(macs, justify="right"), *names,
        title=f"Pareto front: {len(front)} of {len(results)} completed trials",
    )
    for r in front:
        values = [r.hyperparameters.get(name, "") for name in names]
        table.add_row(
            r.trial_id, f"{r.accuracy:.4f}", f"{r.conditional_macs:,.0f}",
            *(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values),
        )
    console = rich.console.Console(highlight=False, force_terminal=False, color_system=None,
                                   width=160)
    with console.capture() as captured:
        console.print(table)
    (print_fn or print)(captured.get().rstrip("\n"))
    # After the table, which a plot that cannot be written would otherwise lose.
    if plot_path is not None:
        _plot(results, front, plot_path, accuracy, macs)
        (print_fn or print)(f" Plot written to {plot_path}")
    return front
