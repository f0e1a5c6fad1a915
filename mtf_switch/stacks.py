"""Where the Switch layers go in a layer stack (gin: the `layers` of make_layer_stack)."""
import gin
from mesh_tensorflow.transformer import transformer_layers

from mtf_switch import layers

EXTRA_DENSE = ("none", "before", "after")


@gin.configurable
def sparse_block(decoder=False, sparse_every=2, extra_dense_ffn="none"):
  """The layers of one block of `sparse_every` transformer layers whose last feed-forward layer
  is a SwitchFFN; make_layer_stack repeats it num_layers / sparse_every times.

  Gin parameters (`sparse_block.<name>`, usually scoped encoder/ and decoder/):
    decoder: True for a decoder block (self-attention, encoder-decoder attention, FFN).
      Default False.
    sparse_every: expert layer frequency 1/sparse_every: 1 every FFN, 2 every other (Switch
      paper Table 9), 4 every fourth (ST-MoE Table 11). Default 2.
    extra_dense_ffn: "before" or "after" adds a dense FFN right before or after the sparse one
      (sparse-dense stacking, ST-MoE App. C); "none". Default "none".
  """
  if sparse_every < 1:
    raise ValueError("sparse_block.sparse_every must be >= 1, got %d." % sparse_every)
  if extra_dense_ffn not in EXTRA_DENSE:
    raise ValueError("Unknown sparse_block.extra_dense_ffn %r; choose one of %s." % (
        extra_dense_ffn, ", ".join(EXTRA_DENSE)))
  attention = [transformer_layers.SelfAttention]
  if decoder:
    attention.append(transformer_layers.EncDecAttention)
  dense, sparse = transformer_layers.DenseReluDense, layers.SwitchFFN
  block = []
  for _ in range(sparse_every - 1):
    block += attention + [dense]
  block += attention + {"none": [sparse], "before": [dense, sparse],
                        "after": [sparse, dense]}[extra_dense_ffn]
  return block
