"""An independent numpy reference of the routed expert layer, token by token: Switch (paper Eq.
1-4), top-k (GShard / Switch Table 1 MoE-Base / ST-MoE top-n), batch-prioritized routing (ST-MoE
App. D), no-token-left-behind (Switch App.), z-loss (ST-MoE Eq. 5), the multiplicative bias, and
expert-choice routing (Zhou et al. 2022; mesh-tensorflow MoE1D's expert_selection)."""
import numpy as np


def gelu(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def relu(x):
  return np.maximum(x, 0.0)


def router_weights(weights):
  """The router kernel [d_model, E], whatever its scope name (switch_gating, top_2_gating...)."""
  (name,) = [k for k in weights if k.endswith("_gating")]
  return weights[name]


def _expert_fn(weights, geglu):
  bias = weights.get("multiplicative_bias")

  def expert(e, t):
    if geglu:
      h = gelu(t @ weights["wi_0"][e]) * (t @ weights["wi_1"][e])
    else:
      h = relu(t @ weights["wi"][e])
    if bias is not None:
      h = h * bias[e]
    return h @ weights["wo"][e]

  return expert


def _softmax(z, axis):
  z = np.exp(z - z.max(axis, keepdims=True))
  return z / z.sum(axis, keepdims=True)


def expert_choice_reference(x, nonpadding, weights, num_groups, capacity, loss_coef,
                            softmax="tokens", geglu=True, z_coef=0.0):
  """Expert choice, expert by expert: each expert takes the `capacity` real tokens of the group
  with the highest p (ties: earlier token), never padding. softmax "tokens" (MoE1D): p over the
  group's real tokens, gate p / (experts the token reached), balance loss mean over groups of
  S' sum_s (mean_e p)^2; "experts" (Zhou et al., flaxformer): p over experts, gate p, no
  balance loss. Returns (y, aux loss, reached [batch, length] experts per token)."""
  b, l, d = x.shape
  tokens = x.reshape(num_groups, -1, d).astype(np.float64)
  pad = (np.ones((b, l)) if nonpadding is None else nonpadding).reshape(num_groups, -1)
  w_r = router_weights(weights)
  expert = _expert_fn(weights, geglu)
  y = np.zeros_like(tokens)
  reached = np.zeros(pad.shape, int)
  group_losses, z_terms = [], []
  for g in range(num_groups):
    real = np.flatnonzero(pad[g] > 0)
    logits = tokens[g] @ w_r
    p = np.zeros_like(logits)
    if real.size:
      p[real] = _softmax(logits[real], 0 if softmax == "tokens" else 1)
    takes = [real[np.argsort(-p[real, e], kind="stable")[:capacity]]
             for e in range(w_r.shape[1])]
    for e, chosen in enumerate(takes):
      reached[g, chosen] += 1
    for e, chosen in enumerate(takes):
      for s in chosen:
        gate = p[s, e] / reached[g, s] if softmax == "tokens" else p[s, e]
        y[g, s] += gate * expert(e, tokens[g, s])
    group_losses.append(real.size * np.sum(p.mean(1) ** 2) if softmax == "tokens" else 0.0)
    z_terms.extend(np.log(np.exp(logits[real]).sum(-1)) ** 2)
  loss = loss_coef * np.mean(group_losses) + z_coef * (np.mean(z_terms) if z_terms else 0.0)
  return y.reshape(b, l, d), loss, reached.reshape(b, l)


def switch_reference(x, nonpadding, weights, num_groups, capacity, loss_coef, geglu=True, k=1,
                     second_threshold=None, bpr=False, ntlb=0, z_coef=0.0):
  """x [batch, length, d]; weights from run_switch. Tokens are grouped in row-major order.

  capacity: slots per expert and group, or None for dropless routing (no capacity: every used
  choice reaches its expert).

  k: experts per token, gates renormalised over them when k > 1; second_threshold: a choice
  after the first is used only if its renormalised gate exceeds it (None: always); bpr: queue
  tokens by decreasing top-1 probability; ntlb: number of ranked choices a token may try, each
  only if the previous ones found no slot (gate p_j(x)). Returns (y, aux loss, dropped) where
  dropped counts real tokens that got no expert at all."""
  b, l, d = x.shape
  tokens = x.reshape(num_groups, -1, d).astype(np.float64)
  pad = np.ones((b, l)) if nonpadding is None else nonpadding
  pad = pad.reshape(num_groups, -1)
  w_r = router_weights(weights)
  num_experts = w_r.shape[1]
  expert = _expert_fn(weights, geglu)

  y = np.zeros_like(tokens)
  group_losses, z_terms = [], []
  dropped = 0
  for g in range(num_groups):
    logits = tokens[g] @ w_r
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ranked = np.argsort(-probs, axis=-1, kind="stable")
    rounds = ntlb or k
    gates = np.take_along_axis(probs, ranked[:, :rounds], -1)
    if k > 1:
      gates = gates / gates.sum(-1, keepdims=True)
    order = np.arange(tokens.shape[1])
    if bpr:
      order = np.argsort(-probs.max(-1), kind="stable")
    used = np.zeros(num_experts, int)
    placed = np.zeros(tokens.shape[1], bool)
    for j in range(rounds):
      for s in order:
        if not pad[g, s] or (ntlb and placed[s]):
          continue
        if j > 0 and not ntlb and second_threshold is not None and \
            gates[s, j] <= second_threshold:
          continue
        e = ranked[s, j]
        if capacity is None or used[e] < capacity:
          used[e] += 1
          placed[s] = True
          y[g, s] += gates[s, j] * expert(e, tokens[g, s])
    real = pad[g] > 0
    dropped += int(np.sum(real & ~placed))
    if real.any():
      f = np.bincount(ranked[real, 0], minlength=num_experts) / real.sum()
      p = probs[real].mean(0)
      group_losses.append(num_experts * np.sum(f * p))
      log_z = np.log(np.exp(logits[real]).sum(-1))
      z_terms.extend(log_z ** 2)
  loss = loss_coef * (np.mean(group_losses) if group_losses else 0.0)
  loss += z_coef * (np.mean(z_terms) if z_terms else 0.0)
  return y.reshape(b, l, d), loss, dropped
