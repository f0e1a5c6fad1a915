"""Distillation (mtf_switch/distill.py): the student-init tool copies exactly the teacher's
non-expert weights, and the loss is (1 - a) L_hard + a T^2 L_soft."""
import gin
import mesh_tensorflow as mtf
import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from mtf_switch import config
from mtf_switch import distill
from mtf_switch import finetune

VOCAB = 4224  # the default corpus' vocabulary, padded to a multiple of 128


def variables_of(model_gin):
  config.parse([model_gin])
  shapes = distill.model_variables(VOCAB)
  with gin.unlock_config():
    gin.clear_config()
  return shapes


@pytest.fixture(scope="module")
def teacher_student():
  return variables_of("gin/models/switch_tiny.gin"), variables_of("gin/models/t5_tiny.gin")


def test_init_map_copies_exactly_the_non_expert_variables(teacher_student):
  teacher, student = teacher_student
  copy = distill.student_init_map(teacher, student)
  # switch_tiny's Switch layers are the 2nd and 4th FFN of each stack: t5_tiny's FFN sublayers
  # there (encoder layer_001, decoder layer_002 of blocks 1 and 3) start from initialisers.
  fresh = {"%s/block_%03d/layer_%03d/DenseReluDense/%s/kernel" % (stack, block, layer, w)
           for stack, layer in (("encoder", 1), ("decoder", 2)) for block in (1, 3)
           for w in ("wi_0", "wi_1", "wo")}
  assert set(student) - set(copy) == fresh
  experts = {"%s/block_%03d/layer_%03d/MoE1D/%s/kernel" % (stack, block, layer, w)
             for stack, layer in (("encoder", 3), ("decoder", 5)) for block in (0, 1)
             for w in ("switch_gating", "wi_0", "wi_1", "wo")}
  assert set(teacher) - set(copy.values()) == experts
  assert len(set(copy.values())) == len(copy)  # each teacher variable at most once
  # sublayers match by position: the teacher's 3rd encoder sublayer is block 0's layer 2
  assert copy["encoder/block_001/layer_000/SelfAttention/q"] == (
      "encoder/block_000/layer_002/SelfAttention/q")
  # the Switch sublayer's pre-norm is a non-expert weight
  assert copy["decoder/block_003/layer_002/rms_norm/scale"] == (
      "decoder/block_001/layer_005/rms_norm/scale")
  for s, t in copy.items():
    assert student[s] == list(teacher[t])


def test_init_map_needs_the_teachers_layers(teacher_student):
  teacher, student = teacher_student
  fewer = {k: v for k, v in student.items() if "block_003" not in k}
  with pytest.raises(ValueError, match="stack 'encoder' has 8 sublayers in the teacher and 6"):
    distill.student_init_map(teacher, fewer)


def test_init_tool_writes_the_teachers_values(teacher_student, tmp_path):
  teacher, _ = teacher_student
  rng = np.random.RandomState(0)
  teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
  values = {n: rng.randn(*s).astype(np.float32) for n, s in teacher.items()}
  values["encoder/block_000/layer_000/SelfAttention/q_slot_vc"] = np.ones(128, np.float32)
  with tf.Graph().as_default(), tf.Session() as sess:
    variables = [tf.Variable(v, name=n) for n, v in values.items()]
    step = tf.train.get_or_create_global_step()
    sess.run(tf.global_variables_initializer())
    tf.train.Saver(variables + [step]).save(sess, str(teacher_dir / "model.ckpt"),
                                            global_step=1000)
  distill.main(["--teacher_model_dir", str(teacher_dir), "--gin_file",
                "gin/models/t5_tiny.gin", "--model_dir", str(student_dir)])
  copy = distill.student_init_map(teacher, variables_of("gin/models/t5_tiny.gin"))
  reader = tf.train.load_checkpoint(str(student_dir / "model.ckpt-0"))
  assert set(reader.get_variable_to_shape_map()) == set(copy) | {"global_step"}
  assert reader.get_tensor("global_step") == 0
  for s, t in copy.items():
    np.testing.assert_array_equal(reader.get_tensor(s), values[t])
  listing = (student_dir / "init_variables.txt").read_text()
  assert "encoder/block_001/layer_001/DenseReluDense/wo/kernel\n" in listing
  assert "_slot_vc" not in listing
  assert "d_ff = 256" in (student_dir / "operative_config.gin").read_text()


@pytest.mark.parametrize("fraction_soft,temperature", [(0.25, 1.0), (0.5, 2.0)])
def test_loss_is_the_papers_mixture(fraction_soft, temperature):
  rng = np.random.RandomState(1)
  student, teacher = rng.randn(2, 1, 4, 5).astype(np.float32)
  targets = np.array([[3, 1, 4, 0]])  # the last position is padding
  hard = 2.5
  with tf.Graph().as_default():
    mesh = mtf.Mesh(mtf.Graph(), "mesh")
    batch, length, vocab = (mtf.Dimension("batch", 1), mtf.Dimension("length", 4),
                            mtf.Dimension("vocab", 5))
    logits = lambda x: mtf.import_tf_tensor(mesh, tf.constant(x), [batch, length, vocab])
    loss = distill.distillation_loss(
        mtf.constant(mesh, hard, dtype=tf.float32), logits(student), logits(teacher),
        mtf.import_tf_tensor(mesh, tf.constant(targets), [batch, length]), vocab, 3.0,
        fraction_soft, temperature)
    impl = mtf.placement_mesh_impl.PlacementMeshImpl("", "", [""])
    lowering = mtf.Lowering(mesh.graph, {mesh: impl})
    with tf.Session() as sess:
      got = sess.run(lowering.export_to_tf_tensor(loss))
  softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(
      x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
  p_teacher, q_student = softmax(teacher[0] / temperature), softmax(student[0] / temperature)
  soft = -(p_teacher[:3] * np.log(q_student[:3])).sum() / 3.0  # 3 real tokens
  want = (1 - fraction_soft) * hard + fraction_soft * temperature ** 2 * soft
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bad_settings_are_explained(tmp_path):
  with pytest.raises(ValueError, match="0 <= fraction_soft <= 1"):
    distill.Distillation(None, None, teacher_model_dir=str(tmp_path), fraction_soft=1.5)
  with pytest.raises(FileNotFoundError, match="operative_config.gin does not exist"):
    with distill._gin_config_of(str(tmp_path)):  # pylint: disable=protected-access
      pass
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    distill.init_student(str(tmp_path), str(tmp_path / "student"))


def test_gin_config_of_restores_the_current_config(tmp_path):
  (tmp_path / "operative_config.gin").write_text("import mtf_switch.finetune\n"
                                                 "train_variables.subset = 'moe'\n")
  gin.bind_parameter("train_variables.subset", "non_moe")
  with distill._gin_config_of(str(tmp_path)):  # pylint: disable=protected-access
    assert gin.query_parameter("train_variables.subset") == "moe"
  assert gin.query_parameter("train_variables.subset") == "non_moe"


def test_finetune_subsets_partition_the_variables(teacher_student):
  teacher, _ = teacher_student
  moe = {n for n in teacher if finetune.train_variables(n, "moe")}
  non_moe = {n for n in teacher if finetune.train_variables(n, "non_moe")}
  assert moe == {n for n in teacher if "/MoE1D/" in n} and len(moe) == 16
  assert non_moe == set(teacher) - moe
  assert all(finetune.train_variables(n) for n in teacher)
  with pytest.raises(ValueError, match="train_variables.subset='experts'"):
    finetune.train_variables("x", "experts")
