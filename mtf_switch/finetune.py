"""Fine-tuning a subset of the parameters (ST-MoE Sec. 4.2).

`gin/runs/finetune.gin` binds `MtfModel.variable_filter = @mtf_switch.finetune.train_variables`;
`train_variables.subset` picks what is updated. Variables that are not updated keep their
pretrained values bit for bit (Adafactor has no weight decay here).
"""
import gin

from mtf_switch import layers

SUBSETS = ("all", "non_moe", "moe")


@gin.configurable
def train_variables(variable, subset="all"):
  """Whether fine-tuning updates `variable` (a mesh-tensorflow Variable or a name).

  Args:
    variable: the variable, from mesh-tensorflow's training step (tpu_estimator_model_fn).
    subset: "all" (default: every trainable variable), "non_moe" (everything but the Switch
      layers' routers, experts and biases; ST-MoE Sec. 4.2 finds this as good as "all") or
      "moe" (only those, which ST-MoE finds slightly worse). Which variables are Switch variables:
      `mtf_switch.layers.is_switch_variable`.
  """
  if subset not in SUBSETS:
    raise ValueError("train_variables.subset=%r: use one of %s" % (subset, ", ".join(SUBSETS)))
  if subset == "all":
    return True
  name = variable if isinstance(variable, str) else variable.name
  return layers.is_switch_variable(name) == (subset == "moe")
