"""Experimental: Switch for attention (Switch paper App. A).

The query, key and value projections of self-attention become Switch layers: each has its own
router and E expert matrices [d_model, heads * d_kv], and each token is projected by the expert
it is routed to, times its gate. The output projection stays dense. The paper reports quality
gains but instability with bfloat16; it is not part of any Switch model in the paper's zoo.
"""
import gin
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import attention
from mesh_tensorflow.transformer import transformer_layers
import tensorflow.compat.v1 as tf

from mtf_switch import layers


class _SwitchLinear(layers.SwitchFFN):
  """A Switch layer whose experts are single matrices `w` [experts, d_model, output]."""
  RAGGED = False

  def _experts(self, expert_inputs, experts_dim, hidden_dim, output_dim, ffn_args):
    del hidden_dim
    _, _, _, variable_dtype, init = ffn_args
    return mtf.layers.dense(expert_inputs, output_dim, reduced_dims=expert_inputs.shape.dims[-1:],
                            expert_dims=[experts_dim], use_bias=False,
                            variable_dtype=variable_dtype, kernel_initializer=init, name="w")


@gin.configurable
class SwitchSelfAttention(transformer_layers.SelfAttention):
  """Experimental self-attention with Switch query/key/value projections (Switch paper App. A).

  Gin parameters (`SwitchSelfAttention.<name>`), besides SelfAttention's (num_heads,
  key_value_size, ...; shared_kv and num_memory_heads are not supported):
    num_experts: E per projection. Default 4.
    group_size, capacity_factor_train, capacity_factor_eval, loss_coef, router_policy,
      init_scale: as for SwitchFFN (defaults 1024, 1.25, 2.0, 1e-2, "input_jitter", 1.0).
      init_scale 1.0 keeps the dense projections' fan-in scale. At inference (decoding,
      scoring, exports) the projections route without capacity, as SwitchFFN's default
      dropless_predict = True.
  """

  def __init__(self, num_experts=4, group_size=1024, capacity_factor_train=1.25,
               capacity_factor_eval=2.0, loss_coef=1e-2, router_policy="input_jitter",
               init_scale=1.0, **kwargs):
    super().__init__(**kwargs)
    if self.shared_kv or self.num_memory_heads or not self.combine_dims:
      raise ValueError("SwitchSelfAttention needs shared_kv=False, num_memory_heads=0 and "
                       "combine_dims=True.")
    # Every SwitchFFN argument explicit, so that no SwitchFFN.* gin binding applies here.
    self.projection = _SwitchLinear(
        num_experts=num_experts, hidden_size=1, activation="linear", group_size=group_size,
        capacity_factor_train=capacity_factor_train, capacity_factor_eval=capacity_factor_eval,
        min_capacity=4, router_policy=router_policy, jitter_eps=1e-2, router_dropout_rate=0.1,
        expert_dropout_rate=0.0, loss_coef=loss_coef, router_z_loss_coef=0.0,
        init_scale=init_scale, num_selected_experts=1, second_policy_train="all",
        second_policy_eval="all", second_threshold=0.2, batch_prioritized_routing=False,
        multiplicative_bias=False, no_token_left_behind=0, dispatch="auto", summaries=False,
        dropless_train=False, dropless_eval=False, dropless_predict=True, router="top_k",
        expert_choice_softmax="tokens")

  def make_params(self, context):
    heads = [mtf.Dimension("heads", self.num_heads)]
    params = attention.AttentionParams(
        context.mesh, query_input_dim=context.model.model_dim,
        memory_input_dim=context.model.model_dim, output_dim=context.model.model_dim,
        key_dim=self.kv_dim, value_dim=self.kv_dim, query_heads_dims=heads,
        memory_heads_dims=heads, variable_dtype=context.variable_dtype,
        ensemble_dim=context.model.ensemble_dim, combine_dims=True,
        fold_scaling_into_initializer=self.fold_scaling_into_initializer,
        make_attention_vars=False)  # only the dense output projection `o`
    return _SwitchProjections(params, self.projection, context)


class _SwitchProjections(object):
  """AttentionParams whose compute_q/k/v route each token through a Switch projection."""

  def __init__(self, params, projection, context):
    self._params, self._projection, self._context = params, projection, context

  def __getattr__(self, name):
    return getattr(self._params, name)

  def compute_q(self, x):
    q = self._project("q", x, self._params.q_dims)
    # the 1/sqrt(d_kv) that dense attention folds into the q initializer
    return q * self._params.key_dim.size ** -0.5

  def compute_k(self, m):
    return self._project("k", m, self._params.k_dims)

  def compute_v(self, m):
    return self._project("v", m, self._params.v_dims)

  def _project(self, name, x, dims):
    context = self._context
    nonpadding = context.nonpadding
    if isinstance(nonpadding, mtf.Tensor) and context.length_dim in nonpadding.shape.dims:
      sequence = [d for d in x.shape.dims if d.name.endswith("length")]
      if sequence and sequence[0] != context.length_dim:  # keys/values: memory_length
        nonpadding = mtf.replace_dimensions(nonpadding, context.length_dim, sequence[0])
    with tf.variable_scope(name):
      y, loss = self._projection.apply(
          x, mtf.Dimension(dims[0].name, mtf.Shape(dims).size), train=context.train,
          variable_dtype=context.variable_dtype, layout=context.model.layout,
          mesh_shape=context.model.mesh_shape, nonpadding=nonpadding,
          num_microbatches=context.num_microbatches,
          predict=layers.is_inference(context.mode))
    if context.losses is not None:
      context.losses.append(loss)
    return mtf.replace_dimensions(y, y.shape.dims[-1], dims)
