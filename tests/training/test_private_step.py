"""make_private: private fit for Keras models, equivalences and the guard."""

import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from ewtune_tf.data import KeyedSampleWeight
from ewtune_tf.optimizers import EWTuneAdam, EWTuneSGD, NonPrivateStepError
from ewtune_tf.training import make_private

pytestmark = [
    pytest.mark.filterwarnings("ignore:noise_multiplier=0"),
    pytest.mark.filterwarnings("ignore:noise_seed is set"),
]


def _data(n=16, seed=0):
    rs = np.random.RandomState(seed)
    return rs.randn(n, 4).astype("float32"), rs.randint(0, 3, n)


def _sequential(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3)])


def _functional(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4,))
    h = keras.layers.Dense(6, activation="tanh")(inp)
    return keras.Model(inp, keras.layers.Dense(3)(h))


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SUM_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def _layer_pattern(model, i):
    """Regex matching exactly the variables of ``model.layers[i]``."""
    return "^" + model.layers[i].kernel.path.rsplit("/", 1)[0] + "/"


def _weights(m):
    return [w.numpy().copy() for w in m.trainable_weights]


def test_guard_without_make_private_raises_before_any_update():
    x, y = _data()
    m = _sequential()
    m.compile(EWTuneSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=8), LOSS)
    before = _weights(m)
    with pytest.raises(NonPrivateStepError, match="make_private"):
        m.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for a, b in zip(before, _weights(m)):
        np.testing.assert_array_equal(a, b)
    assert int(m.optimizer.dp_steps.numpy()) == 0


def test_make_private_requires_ewtune_optimizer():
    x, y = _data()
    m = _sequential()
    m.compile(keras.optimizers.SGD(0.1), LOSS)
    make_private(m)
    with pytest.raises(ValueError, match="EWTune optimizer"):
        m.fit(x, y, batch_size=8, epochs=1, verbose=0)


@pytest.mark.parametrize("build", [_sequential, _functional])
@pytest.mark.parametrize("physical", [None, 3])
def test_zero_noise_infinite_clip_equals_non_private_update(build, physical):
    x, y = _data(8)
    ref = build()
    ref.compile(keras.optimizers.SGD(0.5), LOSS)
    ref.train_on_batch(x, y)
    m = build()
    m.compile(EWTuneSGD(0.5, l2_norm_clip=math.inf, noise_multiplier=0.0, batch_size=8), LOSS)
    make_private(m, physical_batch_size=physical)
    m.train_on_batch(x, y)
    for a, b in zip(_weights(ref), _weights(m)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert int(m.optimizer.dp_steps.numpy()) == 1


@pytest.mark.parametrize(
    "opts",
    [
        dict(physical_batch_size=4),
        dict(physical_batch_size=5),
        dict(clipping="microbatch"),
    ],
)
def test_chunking_and_impls_match_single_chunk_vectorized(opts):
    x, y = _data(10)
    w = np.array([1.0] * 7 + [0.0] * 3, np.float32)  # padded logical batch
    results = []
    for o in (dict(), opts):
        m = _sequential()
        m.compile(EWTuneSGD(1.0, l2_norm_clip=0.1, noise_multiplier=0.0, batch_size=7), LOSS)
        make_private(m, **o)
        m.train_on_batch(x, y, sample_weight=w)
        results.append(_weights(m))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("physical", [None, 3])
def test_clip_groups_update_equals_group_clipped_reference(physical):
    """Group-wise clipping through fit: with sigma = 0 and SGD(lr=1) the
    update is minus the group-clipped sum over the expected batch size."""
    from ewtune_tf.mechanism import clipping, per_example

    x, y = _data(6)
    m = _sequential()
    variables = m.trainable_variables
    head = _layer_pattern(m, 1)  # the second Dense layer
    before = _weights(m)
    grads = per_example.per_example_gradients(
        lambda: keras.losses.sparse_categorical_crossentropy(y, m(x), from_logits=True), variables
    )
    groups = clipping.ClipGroups((1, 1, 0, 0), (0.25, 0.75))
    ref = clipping.clip_and_sum(grads, 0.2, groups).grad_sum
    m.compile(EWTuneSGD(1.0, l2_norm_clip=0.2, noise_multiplier=0.0, batch_size=6, clip_groups=[(head, 0.25)]), LOSS)
    make_private(m, physical_batch_size=physical)
    m.train_on_batch(x, y)
    for b, a, r in zip(before, _weights(m), ref):
        np.testing.assert_allclose(b - a, r.numpy() / 6, atol=1e-6)


@pytest.mark.parametrize(
    "groups, needle",
    [
        ([("no_such_layer", 0.5)], "matches no trainable variable"),
        ([("dense", 1.0), ("no", 0.0001)], "clip_groups share|sum to"),
        ([(".*", 0.5)], "remaining share 0.5 of the clip budget would be unused"),
    ],
)
def test_unusable_clip_groups_fail_before_any_update(groups, needle):
    x, y = _data(6)
    m = _sequential()
    before = _weights(m)
    with pytest.raises(ValueError, match=needle):
        m.compile(EWTuneSGD(1.0, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=6, clip_groups=groups), LOSS)
        make_private(m)
        m.train_on_batch(x, y)
    for a, b in zip(before, _weights(m)):
        np.testing.assert_array_equal(a, b)
    opt = getattr(m, "optimizer", None)  # unset when the optimizer itself refused the groups
    assert opt is None or int(opt.dp_steps.numpy()) == 0


def test_all_variables_matched_with_shares_summing_to_one_is_fine():
    x, y = _data(6)
    m = _sequential()
    m.compile(
        EWTuneSGD(
            1.0,
            l2_norm_clip=1.0,
            noise_multiplier=0.0,
            batch_size=6,
            clip_groups=[(_layer_pattern(m, 0), 0.5), (".*", 0.5)],
        ),
        LOSS,
    )
    make_private(m)
    m.train_on_batch(x, y)
    assert int(m.optimizer.dp_steps.numpy()) == 1


def test_unmatched_variables_without_a_share_fail():
    x, y = _data(6)
    m = _sequential()
    m.compile(
        EWTuneSGD(1.0, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=6, clip_groups=[(_layer_pattern(m, 0), 1.0)]),
        LOSS,
    )
    make_private(m)
    with pytest.raises(ValueError, match="match no pattern"):
        m.train_on_batch(x, y)
    assert int(m.optimizer.dp_steps.numpy()) == 0


def test_padding_rows_do_not_change_the_update():
    x, y = _data(10)
    results = []
    for xs, ys, w in [
        (x[:7], y[:7], None),
        (np.concatenate([x[:7], 100 * np.ones((3, 4), np.float32)]), y, np.array([1.0] * 7 + [0.0] * 3)),
    ]:
        m = _sequential()
        m.compile(EWTuneSGD(1.0, l2_norm_clip=0.1, noise_multiplier=0.0, batch_size=7), LOSS)
        make_private(m)
        m.train_on_batch(xs, ys, sample_weight=w)
        results.append(_weights(m))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_microbatch_semantics():
    # 2 keyed records over 8 rows (keys mod 2): each record's loss is its
    # members' sum over the expected group size 8 / 2 = 4, its gradient is
    # clipped as a whole, and the clipped sum is divided by 2 records.
    x, y = _data(8)
    keys = np.array([3, 0, 5, 2, 2, 7, 1, 4])  # groups 1, 0, 1, 0, 0, 1, 1, 0
    c = 1e-3  # every record is clipped
    m = _sequential()
    m.compile(
        EWTuneSGD(1.0, l2_norm_clip=c, noise_multiplier=0.0, batch_size=8, num_microbatches=2, clipping="vectorized"),
        LOSS,
    )
    make_private(m)
    before = _weights(m)
    ref_model = _sequential()
    recs = []
    for g in range(2):
        rows = np.flatnonzero(keys % 2 == g)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(SUM_LOSS(y[rows], ref_model(x[rows]))) / 4.0
        grads = tape.gradient(loss, ref_model.trainable_weights)
        norm = math.sqrt(sum(float(tf.reduce_sum(t**2)) for t in grads))
        recs.append([t.numpy() * min(1.0, c / norm) for t in grads])
    m.train_on_batch(x, y, sample_weight=KeyedSampleWeight(np.ones(8, np.float32), keys))
    for i, (b, a) in enumerate(zip(before, _weights(m))):
        expected = b - (recs[0][i] + recs[1][i]) / 2.0
        np.testing.assert_allclose(a, expected, atol=1e-7)


def test_fit_with_noise_runs_and_counts_steps():
    x, y = _data(32)
    m = _functional()
    opt = EWTuneAdam(1e-2, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=8, num_examples=32, target_delta=1e-5)
    m.compile(opt, LOSS, metrics=["accuracy"])
    make_private(m, report_train_metrics=True)  # Opt-in: loss/accuracy of the private batches.
    h = m.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert int(opt.dp_steps.numpy()) == 8
    assert "loss" in h.history and np.all(np.isfinite(h.history["loss"]))


def test_bad_make_private_arguments():
    m = _sequential()
    with pytest.raises(ValueError, match="physical_batch_size"):
        make_private(m, physical_batch_size=0)
    with pytest.raises(ValueError, match="Unknown clipping"):
        make_private(m, clipping="nope")
    with pytest.raises(ValueError, match="num_microbatches=3: give it to the EWTune optimizer"):
        make_private(m, physical_batch_size=4, num_microbatches=3)
    with pytest.raises(ValueError, match="model must be a keras.Model"):
        make_private("model")


def test_trainable_batchnorm_rejected():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="BatchNormalization"):
        make_private(m)
    m.layers[0].trainable = False
    make_private(m)


def test_microbatches_without_keys_refused_before_any_update():
    x, y = _data(8)
    m = _sequential()
    m.compile(
        EWTuneSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=8, num_microbatches=3, clipping="microbatch"),
        LOSS,
    )
    make_private(m)
    before = _weights(m)
    with pytest.raises(ValueError, match="num_microbatches=3 needs a per-example key.*KeyedSampleWeight"):
        m.train_on_batch(x, y)
    for a, b in zip(before, _weights(m)):
        np.testing.assert_array_equal(a, b)
    assert int(m.optimizer.dp_steps.numpy()) == 0


def test_keras_save_and_load_with_optimizer(tmp_path):
    x, y = _data(16)
    m = _functional()
    opt = EWTuneAdam(1e-2, l2_norm_clip=1.0, noise_multiplier=1.2, batch_size=8, num_examples=16, target_delta=1e-4)
    m.compile(opt, LOSS)
    make_private(m)
    m.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "m.keras")
    m.save(path)
    loaded = keras.models.load_model(path)
    lopt = loaded.optimizer
    assert type(lopt) is EWTuneAdam
    assert lopt.privacy_config == opt.privacy_config
    assert lopt.privacy_state() == opt.privacy_state()
    assert int(lopt.dp_steps.numpy()) == 2
    for a, b in zip(_weights(m), _weights(loaded)):
        np.testing.assert_array_equal(a, b)
    # A loaded model is not private until make_private is called again.
    with pytest.raises(NonPrivateStepError):
        loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
    make_private(loaded)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(lopt.dp_steps.numpy()) == 4


def test_resume_after_crash_continues_step_count(tmp_path):
    x, y = _data(16)

    def build():
        m = _functional()
        m.compile(
            EWTuneSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=8, num_examples=16, target_delta=1e-4),
            LOSS,
        )
        return make_private(m)

    m = build()
    ckpt = tf.train.Checkpoint(model=m, optimizer=m.optimizer)
    m.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 2 steps
    path = ckpt.write(os.path.join(tmp_path, "ckpt"))
    m.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 2 more steps, then "crash" (not saved)
    del m, ckpt
    m2 = build()
    m2.optimizer.build(m2.trainable_variables)
    tf.train.Checkpoint(model=m2, optimizer=m2.optimizer).read(path).assert_existing_objects_matched()
    assert int(m2.optimizer.dp_steps.numpy()) == 2
    m2.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(m2.optimizer.dp_steps.numpy()) == 4


def test_checkpoint_from_other_privacy_config_rejected(tmp_path):
    x, y = _data(16)
    m = _functional()
    m.compile(EWTuneSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=8), LOSS)
    make_private(m).fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tf.train.Checkpoint(optimizer=m.optimizer).write(os.path.join(tmp_path, "c"))
    m2 = _functional()
    m2.compile(EWTuneSGD(0.1, l2_norm_clip=1.0, noise_multiplier=2.0, batch_size=8), LOSS)
    make_private(m2)
    m2.optimizer.build(m2.trainable_variables)
    tf.train.Checkpoint(optimizer=m2.optimizer).read(path)
    before = _weights(m2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="different privacy configuration"):
        m2.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for a, b in zip(before, _weights(m2)):
        np.testing.assert_array_equal(a, b)
