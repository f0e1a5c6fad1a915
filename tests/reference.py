"""An independent numpy reference of the Switch layer (paper Eq. 1-4), token by token."""
import numpy as np


def gelu(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def relu(x):
  return np.maximum(x, 0.0)


def switch_reference(x, nonpadding, weights, num_groups, capacity, loss_coef, geglu=True):
  """x [batch, length, d]; weights from run_switch. Tokens are grouped in row-major order."""
  b, l, d = x.shape
  tokens = x.reshape(num_groups, -1, d).astype(np.float64)
  pad = np.ones((b, l)) if nonpadding is None else nonpadding
  pad = pad.reshape(num_groups, -1)
  w_r = weights["switch_gating"]
  num_experts = w_r.shape[1]
  y = np.zeros_like(tokens)
  group_losses = []
  for g in range(num_groups):
    logits = tokens[g] @ w_r
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    choice = probs.argmax(-1)
    used = np.zeros(num_experts, int)
    for s in range(tokens.shape[1]):
      if not pad[g, s]:
        continue
      e = choice[s]
      if used[e] < capacity:
        used[e] += 1
        t = tokens[g, s]
        if geglu:
          h = gelu(t @ weights["wi_0"][e]) * (t @ weights["wi_1"][e])
        else:
          h = relu(t @ weights["wi"][e])
        y[g, s] = probs[s, e] * (h @ weights["wo"][e])
    real = pad[g] > 0
    if real.any():
      f = np.bincount(choice[real], minlength=num_experts) / real.sum()
      p = probs[real].mean(0)
      group_losses.append(num_experts * np.sum(f * p))
  loss = loss_coef * (np.mean(group_losses) if group_losses else 0.0)
  return y.reshape(b, l, d), loss
