"""Gin-configurable mesh-tensorflow TransformerLayers that wire router, dispatch and experts."""
import collections
import inspect
import json
import math
import numbers

import gin
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import transformer
import tensorflow.compat.v1 as tf

from mtf_switch import dispatch as dispatch_lib
from mtf_switch import experts
from mtf_switch import losses
from mtf_switch import metrics
from mtf_switch import routing

# Variables live under `<layer>/MoE1D/...` (switch_gating, wi, wo) so that checkpoints are
# interchangeable with mesh-tensorflow's `moe.MoE1D(moe_gating="switch")`.
CHECKPOINT_SCOPE = "MoE1D"
# Graph collection of each Switch layer's effective settings as built (a JSON string, so that
# the meta graph serialises it): read by the counter and `python -m mtf_switch.effective`.
LAYERS = "mtf_switch_layers"


def is_switch_variable(name):
  """Whether a variable (or checkpoint entry) belongs to a Switch layer - its router, experts or
  multiplicative bias, everything under `.../MoE1D/` - as opposed to the dense ("non-MoE") rest."""
  return CHECKPOINT_SCOPE in name.split("/")[:-1]


# Whether capacity_factor_train/_eval may be 0 (C = min_capacity: a fixed capacity, as the
# Hugging Face import uses); False would ask for > 0. Negative factors are always refused.
CAPACITY_FACTOR_ZERO_OK = True
# SwitchFFN's numeric arguments: name -> (integer?, low, low included?, high or None, high
# included?, what it is). Booleans are checked from the signature's defaults.
_RANGES = {
    "num_experts": (True, 1, True, None, None, "experts per layer"),
    "hidden_size": (True, 1, True, None, None, "d_ff of each expert"),
    "group_size": (True, 1, True, None, None, "max tokens per routing group"),
    "capacity_factor_train": (False, 0, CAPACITY_FACTOR_ZERO_OK, None, None,
                              "C = group size * cf / num_experts; the paper trains with 1.25"),
    "capacity_factor_eval": (False, 0, CAPACITY_FACTOR_ZERO_OK, None, None,
                             "C = group size * cf / num_experts; the paper evaluates with 2.0"),
    "min_capacity": (True, 0, True, None, None, "lower bound on the expert capacity"),
    "jitter_eps": (False, 0, True, 1, False, "router input jitter U[1-eps, 1+eps]"),
    "router_dropout_rate": (False, 0, True, 1, False, "a dropout rate"),
    "expert_dropout_rate": (False, 0, True, 1, False, "a dropout rate"),
    "loss_coef": (False, 0, True, None, None, "weight of the load-balancing loss"),
    "router_z_loss_coef": (False, 0, True, None, None, "weight of the router z-loss"),
    "init_scale": (False, 0, False, None, None, "initializer std = sqrt(init_scale / fan_in)"),
    "num_selected_experts": (True, 1, True, None, None, "experts per token"),
    "second_threshold": (False, 0, False, 1, True, "gate threshold of the 2nd..k-th choices"),
    "no_token_left_behind": (True, 0, True, None, None, "0 (off) or choices a token may try"),
}


def _range_text(low, low_in, high, high_in):
  if high is None:
    return "%s %s" % (">=" if low_in else ">", low)
  return "in %s%s, %s%s" % ("[" if low_in else "(", low, high, "]" if high_in else ")")


def _check_arguments(args):
  """Raises ValueError naming the first SwitchFFN argument (in `args`, the constructor's
  locals) outside its range (_RANGES), not a bool where the default is one, or an activation
  name that experts.ACTIVATIONS (every dispatch) does not know."""
  for name, (integer, low, low_in, high, high_in, what) in _RANGES.items():
    value = args[name]
    ok = (isinstance(value, numbers.Integral if integer else numbers.Real) and
          not isinstance(value, bool) and math.isfinite(value) and
          (value >= low if low_in else value > low) and
          (high is None or (value <= high if high_in else value < high)))
    if not ok:
      raise ValueError("SwitchFFN.%s must be %s %s (%s), got %r." % (
          name, "an integer" if integer else "a number", _range_text(low, low_in, high, high_in),
          what, value))
  for name, parameter in inspect.signature(SwitchFFN.__init__).parameters.items():
    if isinstance(parameter.default, bool) and args[name] not in (True, False):
      raise ValueError("SwitchFFN.%s must be True or False, got %r." % (name, args[name]))
  activation = args["activation"]
  names = list(activation) if isinstance(activation, (list, tuple)) else [activation]
  unknown = [a for a in names if a is not None and not (isinstance(a, str) and
                                                        a in experts.ACTIVATIONS)]
  if unknown or not names:
    raise ValueError(
        "SwitchFFN.activation=%r: %s; use one of %s (mesh-tensorflow's elementwise "
        "activations, for every dispatch), or a list of them for a gated unit (the product of "
        "one dense layer per name, e.g. ['gelu', 'linear'] for GEGLU)." % (
            activation, "%r is not an activation" % unknown[0] if unknown else "no activation",
            ", ".join(sorted(experts.ACTIVATIONS))))


@gin.configurable
class SwitchFFN(transformer.TransformerLayer):
  """Switch feed-forward layer: y = sum_{i in top-k} g_i(x) E_i(x) (Switch paper Eq. 2; k = 1
  for Switch, k = 2 for MoE-Base / ST-MoE); with expert choice (router) the sum runs over the
  experts that took x.

  Every argument is a gin parameter (`SwitchFFN.<name>`):
    num_experts: E, experts per layer (paper Sec. 2; Switch-Base uses 128). Default 8.
    hidden_size: d_ff of each expert, dimension `expert_hidden`. Default 1024.
    activation: expert activation, a mesh-tensorflow name or list for gated units:
      "relu" (original Switch) or ["gelu", "linear"] (GEGLU, T5.1.1 / ST-MoE). Default GEGLU.
    group_size: max tokens per routing group S; groups are split over the batch mesh axis
      (mesh-tensorflow's moe_group_size). Default 1024.
    capacity_factor_train / capacity_factor_eval: cf in C = S * cf / E (paper Eq. 3 and
      Sec. 2.2; the paper trains with 1.25 and evaluates with 2.0). Defaults 1.25 / 2.0.
      With k > 1 all k choices share the capacity (first choices are placed first).
      Ignored where dropless_train / dropless_eval / dropless_predict is set; inference is
      dropless by default, so capacity_factor_eval is evaluation's, and inference's only with
      dropless_predict = False. (0 is not dropless: it leaves C = min_capacity, which the
      Hugging Face import uses for a fixed capacity.)
    min_capacity: lower bound on C per group (mesh-tensorflow's min_expert_capacity). Default 4.
    dropless_train / dropless_eval / dropless_predict: dropless routing in training (estimator
      mode TRAIN) / in evaluation (mode EVAL: perplexity_eval, a distillation teacher) / at
      inference (mode PREDICT: --mode=predict and score, export_predict and export_score, task
      evaluation's decodes, MtfModel.predict/score/eval/export; the modes "score",
      "first_part" and "incremental" that scoring and step-by-step decoding build): no
      capacity, no token is dropped, so a token's output no longer depends on the other tokens
      of its group. Not in the Switch paper, which always routes with a capacity (Sec. 2.2: a
      token over capacity is carried by the residual only); the "dropless" MoE of MegaBlocks
      (Gale et al. 2022). Cost per dispatch: "ragged" computes exactly the real tokens'
      choices, as with a capacity (no slack at all); "einsum" and "gather" use C = S slots per
      expert (an expert can receive every token of its group), so the experts compute E * S
      rows per group, E times a dense FFN, and the einsum's one-hot [groups, S, E, C = S]
      dispatch and combine tensors take 4 * S * E bytes per token each (float32): with S = 1024
      and E = 128, 512 KiB per token. Building that tensor above 1 GiB per device
      (dispatch.DROPLESS_EINSUM_MAX_BYTES) is an error naming the setting; lower group_size or
      use the gather or ragged dispatch. Top-k, batch_prioritized_routing and
      no_token_left_behind combine with it (nothing is over capacity, so BPR's order and NTLB's
      rerouting change nothing); the balance loss is unchanged (it counts first choices before
      capacity) and the summaries report dropped_fraction 0. Defaults False / False / True:
      the paper's capacity-limited routing (cf 1.25 / 2.0) in training and evaluation, and
      batch-independent inference, so that a served model's answer to one request never
      depends on the other requests of its batch (greedy decodes identical and scores equal to
      float rounding alone, padded or in any batch; 2nd..k-th choices by "random" are drawn at
      random, see second_policy_eval). dropless_predict = False routes inference with
      capacity_factor_eval as the paper and mesh-tensorflow's MoE1D do (answers then depend on
      the batch).
    router_policy: exploration during training, one of "argmax", "input_jitter",
      "input_dropout" (paper Table 11; input_jitter is the paper's choice). Default input_jitter.
    jitter_eps: eps of the multiplicative U[1-eps, 1+eps] jitter (Table 11). Default 1e-2.
    router_dropout_rate: dropout on router inputs for "input_dropout" (Table 11). Default 0.1.
    expert_dropout_rate: dropout inside the experts, separate from model dropout (paper
      Table 4 uses 0.4 when fine-tuning). Default 0.0 (T5.1.1 pretraining has no dropout).
    loss_coef: c_B of the load-balancing loss c_B * E * sum_i f_i P_i (Switch Eq. 4; Sec. 2.2:
      1e-2), with f_i counting first choices. Default 1e-2.
    router_z_loss_coef: c_z of the router z-loss c_z * mean_tokens(logsumexp(h(x))^2) (ST-MoE
      Eq. 5; 1e-3 in ST-MoE). Independent of loss_coef (mesh-tensorflow's MoE1D scales its
      z-loss by loss_coef as well). Default 0.0 (off, as in the Switch paper).
    init_scale: s in truncated normal std = sqrt(s / fan_in) for router and experts (paper
      Sec. 2.4 / Table 3: 0.1, ten times below the usual 1.0). Default 0.1.
    num_selected_experts: k, experts per token (ST-MoE "top-n"; Switch Table 1's MoE-Base: 2).
      Gates are renormalised over the k choices when k > 1. Default 1 (Switch).
    second_policy_train / second_policy_eval: which 2nd..k-th choices are used: "all", "none",
      "threshold" (gate > second_threshold) or "random" (with probability min(1, gate /
      second_threshold), GShard and mesh-tensorflow's default). Defaults "random" / "random".
      second_policy_eval also applies at inference, where "random" draws each token's use of
      its 2nd..k-th choices anew at every run and position in the batch: serve a top-k model
      with "all", "none" or "threshold" for answers that depend on the request alone.
    second_threshold: threshold of those policies (GShard / mesh-tensorflow: 0.2). Default 0.2.
    batch_prioritized_routing: within a group, tokens with a higher top-1 router probability
      take capacity first (ST-MoE App. D) instead of tokens that come first. Encoder only: it
      would let a decoder token see later tokens. Default False.
    multiplicative_bias: a learned [experts, expert_hidden] vector b, initialised to ones,
      multiplying each expert's hidden activations (ST-MoE App. C). Default False.
    no_token_left_behind: experimental (Switch paper App.; mesh-tensorflow's ntlb gating): 0
      (off) or n >= 2: a token that finds its expert full tries its next-best expert, up to its
      n-th, with the gate p_j(x) of the expert that takes it. Needs num_selected_experts = 1.
      Default 0.
    router: who chooses (routing.py): "top_k" (each token takes its k best experts, the
      options above), "switch_max" (mesh-tensorflow MoE1D's switch_max: top-1 with
      batch-prioritized routing whatever batch_prioritized_routing says, under MoE1D's
      variable name switch_max_gating; encoder only) or "expert_choice" (Zhou et al. 2022,
      MoE1D's expert_selection, variables expert_selection_gating: each expert takes the C =
      min(S, max(int(S * cf / E), min_capacity)) best tokens of its group, so no expert
      overflows and a token may get several experts or none; num_selected_experts, the
      second-expert policies, batch_prioritized_routing and no_token_left_behind do not apply;
      its balance loss replaces Switch's; encoder only, it sees every token of a group). Expert
      choice has no drops, so dropless routing does not apply: dropless_train / dropless_eval
      = True are errors, and inference routes with capacity_factor_eval whatever
      dropless_predict says (a token's output depends on the other tokens of its group).
      Its "ragged" dispatch runs "gather" (every slot holds a chosen token).
      Default "top_k".
    expert_choice_softmax: for router "expert_choice", the axis of p: "tokens" (MoE1D: softmax
      over the group's tokens for each expert, gates divided by the number of experts a token
      reaches, MoE1D's balance loss) or "experts" (the paper and flaxformer's
      ExpertsChooseMaskedRouter: softmax over experts, gates p_e(x) undivided, no balance
      loss). Default "tokens".
    dispatch: how tokens reach their experts (dispatch.py), all with the same outputs,
      gradients and checkpoints: "einsum" (one-hot einsums, mesh-tensorflow's MoE1D, the
      paper's TPU implementation), "gather" (scatter/gather of capacity slots on each device),
      "ragged" (each token times its own expert's weights; no capacity slack computed; experts
      not split over the mesh) or "auto" (einsum on TPU, else ragged where the layout allows,
      else gather). Default "auto".
    summaries: record the layer's routing metrics in training and evaluation (not when
      decoding or scoring) as scalar summaries (metrics.py: expert fractions, dropped fraction,
      router entropy, top-1 gate, balance and z-loss). Default True.
  """

  def __init__(self, num_experts=8, hidden_size=1024, activation=("gelu", "linear"),
               group_size=1024, capacity_factor_train=1.25, capacity_factor_eval=2.0,
               min_capacity=4, router_policy="input_jitter", jitter_eps=1e-2,
               router_dropout_rate=0.1, expert_dropout_rate=0.0, loss_coef=1e-2,
               router_z_loss_coef=0.0, init_scale=0.1, num_selected_experts=1,
               second_policy_train="random", second_policy_eval="random", second_threshold=0.2,
               batch_prioritized_routing=False, multiplicative_bias=False,
               no_token_left_behind=0, dispatch="auto", summaries=True, dropless_train=False,
               dropless_eval=False, dropless_predict=True, router="top_k",
               expert_choice_softmax="tokens"):
    routing.check_policy(router_policy)
    routing.check_choice(router, routing.ROUTERS, "router")
    routing.check_choice(expert_choice_softmax, routing.EXPERT_CHOICE_SOFTMAX,
                         "expert_choice_softmax")
    routing.check_second_policy(second_policy_train)
    routing.check_second_policy(second_policy_eval)
    dispatch_lib.check_implementation(dispatch)
    _check_arguments(locals())
    if num_experts < 1:
      raise ValueError("SwitchFFN.num_experts must be >= 1, got %d." % num_experts)
    if not 1 <= num_selected_experts <= num_experts:
      raise ValueError("SwitchFFN.num_selected_experts must be between 1 and num_experts=%d, "
                       "got %d." % (num_experts, num_selected_experts))
    if no_token_left_behind and not 2 <= no_token_left_behind <= num_experts:
      raise ValueError("SwitchFFN.no_token_left_behind must be 0 (off) or the number of choices "
                       "a token may try, between 2 and num_experts=%d; got %d." % (
                           num_experts, no_token_left_behind))
    if no_token_left_behind and num_selected_experts > 1:
      raise ValueError("SwitchFFN.no_token_left_behind reroutes top-1 tokens; it cannot be "
                       "combined with num_selected_experts=%d." % num_selected_experts)
    if router == "switch_max" and (num_selected_experts > 1 or no_token_left_behind):
      raise ValueError("SwitchFFN.router='switch_max' is top-1 routing (MoE1D's switch_max); "
                       "it cannot be combined with num_selected_experts=%d or "
                       "no_token_left_behind=%d." % (num_selected_experts, no_token_left_behind))
    if router == "expert_choice" and (dropless_train or dropless_eval):
      raise ValueError("SwitchFFN.router='expert_choice' drops no token (each expert takes its "
                       "C best tokens): dropless routing does not apply; unset "
                       "SwitchFFN.dropless_train / dropless_eval.")
    self.router = router
    self.expert_choice_softmax = expert_choice_softmax
    self.num_experts = num_experts
    self.hidden_size = hidden_size
    self.activation = list(activation) if isinstance(activation, (list, tuple)) else activation
    self.group_size = group_size
    self.capacity_factor_train = capacity_factor_train
    self.capacity_factor_eval = capacity_factor_eval
    self.min_capacity = min_capacity
    self.router_policy = router_policy
    self.jitter_eps = jitter_eps
    self.router_dropout_rate = router_dropout_rate
    self.expert_dropout_rate = expert_dropout_rate
    self.loss_coef = loss_coef
    self.router_z_loss_coef = router_z_loss_coef
    self.init_scale = init_scale
    self.num_selected_experts = num_selected_experts
    self.second_policy_train = second_policy_train
    self.second_policy_eval = second_policy_eval
    self.second_threshold = second_threshold
    self.batch_prioritized_routing = batch_prioritized_routing
    self.multiplicative_bias = multiplicative_bias
    self.no_token_left_behind = no_token_left_behind
    self.dispatch = dispatch
    self.summaries = summaries
    self.dropless_train = dropless_train
    self.dropless_eval = dropless_eval
    self.dropless_predict = dropless_predict

  # Whether the experts have a ragged implementation (experts.ragged_expert_ffn).
  RAGGED = True

  def _experts(self, expert_inputs, experts_dim, hidden_dim, output_dim, ffn_args):
    """The experts over capacity slots [O, E, G, C, M] -> [O, E, G, C, output_dim]."""
    return experts.expert_ffn(expert_inputs, experts_dim, hidden_dim, output_dim, *ffn_args,
                              multiplicative_bias=self.multiplicative_bias)

  def call(self, context, x):
    """Applies the layer to x [batch..., length, d_model] (length may be absent when decoding)."""
    if context.model.ensemble_dim:
      raise NotImplementedError("SwitchFFN does not support ensembles.")
    if (self.batch_prioritized_routing or self.router != "top_k") and \
        context.model.autoregressive:
      name, value = (("router", repr(self.router)) if self.router != "top_k" else
                     ("batch_prioritized_routing", "True"))
      raise ValueError(
          "SwitchFFN.%s=%s is for encoders only: in an autoregressive decoder it would let a "
          "token's routing depend on later tokens. Bind it in the encoder's scope only "
          "(encoder/SwitchFFN.%s = %s)." % (name, value, name, value))
    y, aux_loss = self.apply(
        x, context.model.model_dim, train=context.train,
        variable_dtype=context.variable_dtype, layout=context.model.layout,
        mesh_shape=context.model.mesh_shape, nonpadding=context.nonpadding,
        num_microbatches=context.num_microbatches,
        summaries=context.mode in (tf.estimator.ModeKeys.TRAIN, tf.estimator.ModeKeys.EVAL),
        predict=is_inference(context.mode))
    if context.losses is not None:
      context.losses.append(aux_loss)
    return y

  def apply(self, x, output_dim, train, variable_dtype, layout="", mesh_shape="",
            nonpadding=None, num_microbatches=None, summaries=None, predict=False):
    """The layer as a function: returns (y, c_B L_B + c_z L_z in x.dtype). With
    `self.summaries`, records the routing summaries if `summaries` (default: if training).
    predict: inference (is_inference of the context's mode), routed as dropless_predict says;
    otherwise training or evaluation, as `train` says."""
    if train and predict:
      raise ValueError("SwitchFFN.apply: train and predict are exclusive.")
    with _checkpoint_scope(type(self).__name__):
      return self._apply(x, output_dim, train, variable_dtype, layout, mesh_shape, nonpadding,
                         num_microbatches, train if summaries is None else summaries, predict)

  def _routing_mode(self, train, predict):
    """("train" | "eval" | "predict", whether that mode is dropless: never for expert
    choice)."""
    mode = "train" if train else "predict" if predict else "eval"
    return mode, getattr(self, "dropless_" + mode) and self.router != "expert_choice"

  def _apply(self, x, output_dim, train, variable_dtype, layout, mesh_shape, nonpadding,
             num_microbatches, summaries, predict):
    g = self._geometry(x, layout, mesh_shape, train, predict)
    inputs = mtf.reshape(x, g.grouped + [g.model_dim])
    nonpadding = _grouped_nonpadding(nonpadding, x, g)
    init = mtf.layers.VarianceScalingInitializer(scale=self.init_scale)
    logits = routing.router_logits(
        inputs, g.experts_unsplit, self.router_policy, self.jitter_eps,
        self.router_dropout_rate, train, variable_dtype, init,
        name=routing.router_scope(self.num_selected_experts, self.no_token_left_behind,
                                  self.router))
    route = self._expert_choice if self.router == "expert_choice" else self._token_choice
    routed, balance_loss, paths = route(logits, nonpadding, g, train, predict)
    z_loss = losses.router_z_loss(logits, nonpadding, g.experts_unsplit)
    # c_B L_B + c_z L_z  (ST-MoE Eq. 6, without the cross-entropy)
    aux_loss = self.loss_coef * balance_loss
    if self.router_z_loss_coef:
      aux_loss += self.router_z_loss_coef * z_loss
    if self.summaries and summaries:
      scope = tf.get_variable_scope().name
      metrics.record(scope.rpartition("/")[0] or scope, routed, nonpadding, g.experts_unsplit,
                     balance_loss, z_loss)
    if num_microbatches and num_microbatches > 1:
      aux_loss /= num_microbatches

    hidden_dim = mtf.Dimension("expert_hidden", self.hidden_size)
    ffn_args = (self.activation, self.expert_dropout_rate, train, variable_dtype, init)
    experts_split = any(mtf.tensor_dim_to_mesh_dim_size(layout, mesh_shape, d) > 1
                        for d in (g.experts_dim, hidden_dim))
    implementation = dispatch_lib.choose(self.dispatch, experts_split or not self.RAGGED)
    if implementation not in paths:  # expert choice: no slack for "ragged" to skip
      implementation = "gather"
    self._record(g, implementation)
    y = paths[implementation](inputs, g, hidden_dim, output_dim, ffn_args)
    return mtf.reshape(y, g.orig_dims + [output_dim]), mtf.cast(aux_loss, x.dtype)

  def _geometry(self, x, layout, mesh_shape, train, predict):
    """The layer's dimensions and routing mode for x (see Geometry)."""
    orig_dims = x.shape.dims[:-1]
    if orig_dims[0].name == "outer_batch":  # Expert replication (mesh-tensorflow convention).
      outer_dim, batch_dim = orig_dims[:2]
    else:
      outer_dim, batch_dim = mtf.Dimension("outer_batch", 1), orig_dims[0]
    experts_dim = mtf.Dimension("experts", self.num_experts)
    _check_divisible(experts_dim, layout, mesh_shape)
    num_tokens = mtf.Shape(orig_dims).size // outer_dim.size
    num_groups, group_size = dispatch_lib.split_into_groups(
        num_tokens, self.group_size, mtf.tensor_dim_to_mesh_dim_size(layout, mesh_shape,
                                                                     batch_dim))
    # The groups dimension keeps the batch's name so it is split over the batch mesh axis.
    groups_dim = mtf.Dimension(batch_dim.name, num_groups)
    cf = self.capacity_factor_train if train else self.capacity_factor_eval
    mode, dropless = self._routing_mode(train, predict)
    # Dropless: no capacity cut; the slot dispatches (einsum, gather) get C = S. Expert choice:
    # an expert cannot take more than the S tokens of its group.
    capacity = group_size if dropless else dispatch_lib.expert_capacity(
        group_size, self.num_experts, cf, self.min_capacity)
    if self.router == "expert_choice":
      capacity = min(capacity, group_size)
    return Geometry(
        orig_dims, x.shape.dims[-1],
        [outer_dim, groups_dim, mtf.Dimension("group", group_size)],
        experts_dim, mtf.Dimension("expert_unsplit", self.num_experts),
        mtf.Dimension("batch_unsplit", num_groups),
        mtf.Dimension("expert_capacity", capacity), layout, mesh_shape, mode, dropless)

  def _token_choice(self, logits, nonpadding, g, train, predict):
    """Routers "top_k" and "switch_max": (metrics.Routed, L_B, {dispatch: path}), a path
    computing y from (inputs, g, hidden_dim, output_dim, ffn_args)."""
    experts = g.experts_unsplit
    if self.no_token_left_behind:
      router = routing.top_k_router(logits, experts, self.no_token_left_behind,
                                    renormalize=False)
    else:
      router = routing.top_k_router(
          logits, experts, self.num_selected_experts,
          self.second_policy_train if train else self.second_policy_eval, self.second_threshold)
    capacity_dim = None if g.dropless else g.capacity_dim
    slots = dispatch_lib.assign_slots(
        router, nonpadding, experts, g.group_dim, capacity_dim,
        self.batch_prioritized_routing or self.router == "switch_max",
        reroute=bool(self.no_token_left_behind))
    balance_loss = losses.load_balancing_loss(router.router_probs, slots.expert_mask,
                                              nonpadding, experts, g.group_dim)
    routed = metrics.Routed(mtf.add_n([r.kept for r in slots.rounds]), slots.requests,
                            router.choices[0].gate, logits)
    choices_dim = mtf.Dimension("choices", len(slots.rounds))

    def einsum():
      if g.dropless:
        dispatch_lib.check_dropless_einsum(
            mtf.Shape(g.grouped + [experts, g.capacity_dim]), g.layout, g.mesh_shape,
            "SwitchFFN.dropless_" + g.mode, inference=predict)
      return dispatch_lib.EinsumDispatch.from_slots(slots, g.capacity_dim)

    return routed, balance_loss, {
        "einsum": lambda *args: self._through_slots(einsum(), *args),
        "gather": lambda *args: self._through_slots(
            dispatch_lib.GatherDispatch(slots, experts, g.capacity_dim), *args),
        "ragged": lambda *args: self._ragged(
            dispatch_lib.chosen_experts(router, nonpadding, experts, choices_dim)
            if g.dropless and not self.no_token_left_behind else
            dispatch_lib.kept_experts(slots, experts, choices_dim), choices_dim, *args)}

  def _expert_choice(self, logits, nonpadding, g, train, predict):
    """Router "expert_choice": as _token_choice, without a ragged path (every expert takes
    exactly C tokens: no slack for it to skip; "ragged" runs the gather)."""
    del train, predict  # no second-expert policy, no dropless routing
    choice = routing.expert_choice_router(logits, nonpadding, g.experts_unsplit, g.group_dim,
                                          g.capacity_dim, self.expert_choice_softmax)
    balance_loss = (losses.expert_choice_balance_loss(choice.router_probs, nonpadding,
                                                      g.experts_unsplit, g.group_dim)
                    if self.expert_choice_softmax == "tokens" else mtf.zeros(logits.mesh, []))
    chosen = choice.chosen
    routed = metrics.Routed(chosen, mtf.reduce_sum(chosen, reduced_dim=g.experts_unsplit),
                            mtf.reduce_max(choice.gate, reduced_dim=g.experts_unsplit), logits)
    return routed, balance_loss, {
        "einsum": lambda *args: self._through_slots(
            dispatch_lib.EinsumDispatch.from_expert_choice(choice, g.group_dim), *args),
        "gather": lambda *args: self._through_slots(
            dispatch_lib.SlotGatherDispatch(choice, g.group_dim), *args)}

  def _through_slots(self, mover, inputs, g, hidden_dim, output_dim, ffn_args):
    """inputs [O, G`, S, M] -> capacity slots -> experts -> [O, G`, S, output_dim]."""
    # [O, G`, S, M] -> [O, E, G`, C, M]: gather each expert's tokens, groups still split.
    outer_dim, groups_dim, _ = g.grouped
    expert_inputs = mover.dispatch(inputs, mtf.Shape(
        [outer_dim, g.experts_unsplit, groups_dim, g.capacity_dim, g.model_dim]))
    # Split over groups -> split over experts (an all-to-all when both map to one mesh axis).
    # The d_model_split step keeps the transfer cheap under model parallelism, as in MoE1D.
    expert_inputs = _resplit(expert_inputs, [outer_dim, g.experts_dim, g.groups_unsplit,
                                             g.capacity_dim], g.model_dim)
    expert_outputs = self._experts(expert_inputs, g.experts_dim, hidden_dim, output_dim,
                                   ffn_args)
    # Split over experts -> split over groups (the return all-to-all).
    expert_outputs = _resplit(expert_outputs, [outer_dim, g.experts_unsplit, groups_dim,
                                               g.capacity_dim], output_dim)
    # y = sum over slots of g_i(x) * E_i(x); a token with no slot gets 0 (only the residual).
    return mover.combine(expert_outputs, mtf.Shape(g.grouped + [output_dim]))

  def _ragged(self, experts_and_gates, choices_dim, inputs, g, hidden_dim, output_dim,
              ffn_args):
    """Each token times its own experts' weights (experts.ragged_expert_ffn), no slots:
    experts_and_gates [O, G, S, K] from dispatch.kept_experts or chosen_experts."""
    expert, gate = experts_and_gates
    shard_dims = [mtf.Dimension(d.name, mtf.tensor_dim_to_mesh_dim_size(g.layout, g.mesh_shape,
                                                                        d))
                  for d in g.grouped[:2]]
    y = experts.ragged_expert_ffn(inputs, expert, g.experts_dim, hidden_dim, output_dim,
                                  *ffn_args, shard_dims=shard_dims,
                                  multiplicative_bias=self.multiplicative_bias)
    return mtf.einsum([y, mtf.cast(gate, y.dtype)], mtf.Shape(g.grouped + [output_dim]))

  def _record(self, g, implementation):
    """Adds this layer's effective settings to the LAYERS collection (expert_capacity: C of the
    slot dispatches, S when dropless; experts_per_token: k, or E * C / S on average for expert
    choice)."""
    train = g.mode == "train"
    group_size, capacity = g.group_dim.size, g.capacity_dim.size
    settings = {name: getattr(self, name) for name in (
        "num_experts", "num_selected_experts", "hidden_size", "activation", "router_policy",
        "loss_coef", "router_z_loss_coef", "init_scale", "batch_prioritized_routing",
        "no_token_left_behind", "expert_dropout_rate", "router")}
    expert_choice = self.router == "expert_choice"
    settings.update(
        scope=tf.get_variable_scope().name + "/", train=train, mode=g.mode,
        dropless=bool(g.dropless), groups=g.groups_unsplit.size,
        group_size=group_size, expert_capacity=capacity, dispatch=implementation,
        capacity_factor=self.capacity_factor_train if train else self.capacity_factor_eval,
        second_policy=self.second_policy_train if train else self.second_policy_eval,
        experts_per_token=(self.num_experts * capacity / group_size if expert_choice
                           else self.num_selected_experts))
    tf.add_to_collection(LAYERS, json.dumps(settings))
    tf.logging.info("Switch layer %s (%s): %d experts, %s, %d groups x %d tokens, %s, %s "
                    "dispatch", settings["scope"], g.mode, self.num_experts,
                    "expert choice (%s)" % self.expert_choice_softmax if expert_choice else
                    "%s k=%d" % (self.router, self.num_selected_experts),
                    g.groups_unsplit.size, group_size,
                    "dropless" if g.dropless else "capacity %d per expert%s" % (
                        capacity, " (dropless does not apply to expert choice)"
                        if expert_choice and self.dropless_predict and g.mode == "predict"
                        else ""), implementation)


class Geometry(collections.namedtuple("Geometry", [
    "orig_dims", "model_dim", "grouped", "experts_dim", "experts_unsplit", "groups_unsplit",
    "capacity_dim", "layout", "mesh_shape", "mode", "dropless"])):
  """A Switch layer's dimensions for one input (SwitchFFN._geometry).

  orig_dims: x's dimensions but the last; model_dim: M; grouped: [O, G, S] (G keeps the batch's
  name, so that groups are split over the batch mesh axis); experts_dim: E as the layout splits
  it, experts_unsplit: E within a group; groups_unsplit: G where experts are split;
  capacity_dim: C; mode: "train" | "eval" | "predict"; dropless: whether that mode is dropless.
  """
  __slots__ = ()

  @property
  def group_dim(self):
    return self.grouped[2]


def _grouped_nonpadding(nonpadding, x, g):
  """float32 [O, G, S]: 1 for real tokens (None or 1 when the context knows there is no padding,
  e.g. decoding)."""
  if isinstance(nonpadding, mtf.Tensor):
    return mtf.reshape(mtf.zeros(x.mesh, g.orig_dims, tf.float32) + mtf.to_float(nonpadding),
                       g.grouped)
  return mtf.ones(x.mesh, mtf.Shape(g.grouped), tf.float32)


def is_inference(mode):
  """Whether a transformer.Context mode is inference: estimator mode PREDICT and the modes it
  builds (t5's "score" for --mode=score and export_score, "first_part" and "incremental" for
  step-by-step decoding); TRAIN and EVAL are training and evaluation."""
  return mode not in (tf.estimator.ModeKeys.TRAIN, tf.estimator.ModeKeys.EVAL)


def _resplit(t, leading_dims, last_dim):
  split = mtf.Dimension("d_model_split", last_dim.size)
  t = mtf.reshape(t, mtf.Shape(leading_dims + [split]))
  return mtf.reshape(t, mtf.Shape(leading_dims + [last_dim]))


def _check_divisible(experts_dim, layout, mesh_shape):
  ways = mtf.tensor_dim_to_mesh_dim_size(layout, mesh_shape, experts_dim)
  if experts_dim.size % ways:
    raise ValueError(
        "SwitchFFN.num_experts=%d is not divisible by the %d-way mesh axis that the layout "
        "rules split `experts` over (layout=%r, mesh_shape=%r): change SwitchFFN.num_experts, "
        "mesh_shape or the `experts:` layout rule." % (experts_dim.size, ways, layout,
                                                        mesh_shape))


def _checkpoint_scope(class_name):
  """`<layer>/<class_name>` (the scope LayerStack opens) becomes `<layer>/MoE1D`; any other
  scope gets `/MoE1D` appended (see CHECKPOINT_SCOPE)."""
  scope = tf.get_variable_scope()
  parent, _, last = scope.name.rpartition("/")
  base = parent if last == class_name else scope.name
  name = base + "/" + CHECKPOINT_SCOPE if base else CHECKPOINT_SCOPE
  return tf.variable_scope(tf.VariableScope(scope.reuse, name=name),
                           auxiliary_name_scope=False)
