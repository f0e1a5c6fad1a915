"""The experts: one feed-forward network per expert, weights carry an `experts` dimension."""
import mesh_tensorflow as mtf


def expert_ffn(expert_inputs, experts_dim, hidden_dim, output_dim, activation, dropout_rate,
               train, variable_dtype, kernel_initializer):
  """y = wo . act(wi . x) per expert; GEGLU when activation=["gelu", "linear"].

  Variable names follow mesh-tensorflow's MoE1D: wi (or wi_0, wi_1 for gated), wo.
  """
  h = mtf.layers.dense_product(
      expert_inputs, reduced_dims=expert_inputs.shape.dims[-1:], new_dims=[hidden_dim],
      expert_dims=[experts_dim], activation_functions=activation, use_bias=False,
      variable_dtype=variable_dtype, kernel_initializer=kernel_initializer, name="wi")
  if train and dropout_rate > 0.0:
    h = mtf.dropout(h, is_training=True, keep_prob=1.0 - dropout_rate)
  return mtf.layers.dense(
      h, output_dim, reduced_dims=[hidden_dim], expert_dims=[experts_dim], use_bias=False,
      variable_dtype=variable_dtype, kernel_initializer=kernel_initializer, name="wo")
