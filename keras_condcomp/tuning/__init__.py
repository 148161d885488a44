"""KerasTuner search of gated models, with a compute-aware objective.

Imported on first use (`keras_condcomp.tuning`), since it imports KerasTuner.

The score any tuner can maximise (`compute_aware_objective()`, the logged
`val_compute_aware_score`):

`val_accuracy - macs_weight * log2(val_conditional_macs / reference_macs)`

Examples:
    >>> from keras_condcomp import tuning
    >>> objective = tuning.compute_aware_objective()  # for any KerasTuner tuner
    >>> objective.name, objective.direction
    ('val_compute_aware_score', 'max')
"""
from keras_condcomp.tuning.compute_aware_score import (
    ComputeAwareScore,
    compute_aware_objective,
    compute_aware_score,
)
from keras_condcomp.tuning.gated_cnn_hypermodel import GatedCNNHyperModel
from keras_condcomp.tuning.gated_mlp_hypermodel import GatedMLPHyperModel
from keras_condcomp.tuning.pareto import (
    TrialResult,
    pareto_front,
    print_pareto_front,
    trial_results,
)

__all__ = [
    "ComputeAwareScore",
    "GatedCNNHyperModel",
    "GatedMLPHyperModel",
    "TrialResult",
    "compute_aware_objective",
    "compute_aware_score",
    "pareto_front",
    "print_pareto_front",
    "trial_results",
]
