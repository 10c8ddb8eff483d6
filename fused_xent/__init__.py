"""fused_xent: cross-entropy on top of a linear layer without the logit matrix.

``linear_cross_entropy(input, linear_weight, target, ...)`` equals
``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` and extends it
with a logit scale, softcapping, z-loss, mixup targets and the per-row log-sum-exp.
"""

from fused_xent.functional import linear_cross_entropy, set_memory_budget
from fused_xent.modules import LinearCrossEntropyLoss

__all__ = ["linear_cross_entropy", "set_memory_budget", "LinearCrossEntropyLoss"]
__version__ = "0.1.0"
