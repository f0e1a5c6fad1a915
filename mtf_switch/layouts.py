"""Checks that a layout (mesh shape + layout rules) can be realised for a model's tensors."""
import mesh_tensorflow as mtf


def error_message(dim, mesh_dim, where):
  """Why `dim` cannot be split over `mesh_dim`, and what to change."""
  return (
      "The layout splits dimension `%s` (size %d, in %s) over mesh axis `%s` of size %d, which "
      "does not divide it. Change the `%s:%s` rule of utils.run.layout_rules (or the model "
      "size that sets `%s`), or the size of `%s` in utils.run.mesh_shape."
      % (dim.name, dim.size, where, mesh_dim.name, mesh_dim.size, dim.name, mesh_dim.name,
         dim.name, mesh_dim.name))


def undivided(shape, mesh_shape, layout_rules):
  """(tensor dimension, mesh dimension) of the first split that does not divide, else None."""
  layout_rules = mtf.convert_to_layout_rules(layout_rules)
  mesh_shape = mtf.convert_to_shape(mesh_shape)
  for dim in shape.dims:
    axis = layout_rules.tensor_dimension_to_mesh_axis(dim, mesh_shape)
    if axis is not None and dim.size % mesh_shape.dims[axis].size:
      return dim, mesh_shape.dims[axis]
  return None


def check(graph, mesh_shape, layout_rules):
  """Raises ValueError naming the first variable or tensor of `graph` the layout cannot split."""
  for op in graph.operations:
    for tensor in op.outputs:
      bad = undivided(tensor.shape, mesh_shape, layout_rules)
      if bad:
        raise ValueError(error_message(*bad, where="%s %s" % (tensor.name, tensor.shape)))
