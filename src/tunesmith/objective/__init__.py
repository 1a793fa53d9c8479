"""The training objective: one forward-to-loss path shared by training and evaluation.

Sits below both `train` and `eval` so neither imports the other for it:

    forward.batch_loss_sum(model, batch, rt)   model forward + fused linear cross-entropy
    loss.linear_cross_entropy / cross_entropy_sum / IGNORE_INDEX
"""

from tunesmith.objective.forward import attention_for, batch_loss_sum, head_with_bias
from tunesmith.objective.loss import IGNORE_INDEX, cross_entropy_sum, linear_cross_entropy

__all__ = ["IGNORE_INDEX", "attention_for", "batch_loss_sum", "cross_entropy_sum",
           "head_with_bias", "linear_cross_entropy"]
