"""Bad-input matrix: every invalid configuration fails clearly and early.

Each row is one invalid configuration, through the Python API (accounting,
optimizers, make_private, data sampling, callbacks), the CLIs
(`ewtune-accountant`, `ewtune-train`) or the TFX custom config. Each must
raise ValueError (or exit 2 for a CLI) with a message that names the
parameter and its allowed range, before any training step or file write:
CLI rows also check that the output directories stay absent or empty, and
training rows that the weights are unchanged.

Rows the library does not yet validate are kept, marked
``xfail(strict=True)`` with the reason, so they turn into failures (and get
un-marked) the moment the validation lands.
"""

import contextlib
import io
import math
import os
import warnings

import numpy as np
import pytest

N = 10  # examples in the tiny datasets below


def _opt(**kw):
    from ewtune_tf import EWTuneAdam

    base = dict(l2_norm_clip=1.0, noise_multiplier=1.0)
    base.update(kw)
    return EWTuneAdam(learning_rate=0.01, **base)


def _tiny_model():
    import keras

    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])


def _ds():
    import tensorflow as tf

    x = np.random.default_rng(0).normal(size=(N, 3)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, np.ones((N, 1), "float32")))


def _compute_eps(**kw):
    from ewtune_tf import compute_epsilon

    args = dict(sampling_probability=0.01, noise_multiplier=1.0, steps=100, delta=1e-5)
    args.update(kw)
    return compute_epsilon(**args)


def _compute_delta(**kw):
    from ewtune_tf.accounting import compute_delta

    args = dict(sampling_probability=0.01, noise_multiplier=1.0, steps=100, epsilon=1.0)
    args.update(kw)
    return compute_delta(**args)


def _calibrate(**kw):
    from ewtune_tf import calibrate_noise_multiplier

    args = dict(target_epsilon=1.0, target_delta=1e-5, sampling_probability=0.01, steps=100)
    args.update(kw)
    return calibrate_noise_multiplier(**args)


def _fit_one_step(loss=None, x=None, bn=False, **private_kw):
    """Compiles a tiny private model, fits one batch; returns (model, weights before)."""
    import keras

    import ewtune_tf

    layers = [keras.Input((3,)), keras.layers.Dense(2)]
    if bn:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(1))
    model = keras.Sequential(layers)
    model.compile(optimizer=_opt(batch_size=4.0), loss=loss or "mse")
    ewtune_tf.make_private(model, **private_kw)
    before = [w.numpy().copy() for w in model.trainable_weights]
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32") if x is None else x
    try:
        model.fit(x, np.zeros((4, 1), "float32"), batch_size=4, epochs=1, verbose=0)
    finally:
        after = [w.numpy() for w in model.trainable_weights]
        assert all(np.array_equal(a, b) for a, b in zip(before, after)), "an update ran before the error"


def reduced_mse_loss(y_true, y_pred):
    import tensorflow as tf

    return tf.reduce_mean(tf.square(y_true - y_pred))  # already reduced to a scalar


def _restore_other_privacy_config(tmp_path):
    import keras

    import ewtune_tf

    model = _tiny_model()
    model.compile(
        optimizer=ewtune_tf.EWTuneSGD(
            learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0, sampling_probability=0.5, target_delta=1e-5
        ),
        loss="mse",
    )
    ewtune_tf.make_private(model)
    model.fit(np.ones((4, 3), "float32"), np.ones((4, 1), "float32"), batch_size=4, verbose=0)
    path = str(tmp_path / "ckpt.weights.h5")
    model.save_weights(path)
    other = _tiny_model()
    other.compile(
        optimizer=ewtune_tf.EWTuneSGD(
            learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=2.0, sampling_probability=0.5, target_delta=1e-5
        ),
        loss="mse",
    )
    other.optimizer.build(other.trainable_variables)
    other.load_weights(path)
    budget = ewtune_tf.PrivacyBudget()
    budget.set_model(other)
    budget.on_train_begin()  # the check every resumed fit runs first
    del keras


def _accountant_cli(argv):
    from ewtune_tf.accounting import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse errors
            rc = e.code
    return rc, err.getvalue()


ACC = ["epsilon", "--sampling-probability", "0.01", "--noise-multiplier", "1", "--steps", "100", "--delta", "1e-5"]


def _acc(flag, value):
    argv = list(ACC)
    argv[argv.index(flag) + 1] = value
    return argv


# (id, thunk, expected message regex); thunks take tmp_path.
PYTHON_ROWS = [
    # --- accounting API
    ("acct_q_zero", lambda t: _compute_eps(sampling_probability=0.0), r"sampling_probability.*\(0, 1\]"),
    ("acct_q_above_one", lambda t: _compute_eps(sampling_probability=1.5), r"sampling_probability.*\(0, 1\]"),
    ("acct_sigma_negative", lambda t: _compute_eps(noise_multiplier=-1.0), r"noise_multiplier.*> 0"),
    ("acct_steps_zero", lambda t: _compute_eps(steps=0), r"steps.*>= 1"),
    ("acct_delta_one", lambda t: _compute_eps(delta=1.0), r"delta.*\(0, 1\)"),
    ("acct_delta_zero", lambda t: _compute_eps(delta=0.0), r"delta.*\(0, 1\)"),
    ("acct_epsilon_negative", lambda t: _compute_delta(epsilon=-0.5), r"epsilon.*>= 0"),
    ("calib_epsilon_zero", lambda t: _calibrate(target_epsilon=0.0), r"target_epsilon.*> 0"),
    ("calib_epsilon_nan", lambda t: _calibrate(target_epsilon=math.nan), r"target_epsilon.*> 0"),
    # --- optimizers
    ("opt_clip_zero", lambda t: _opt(l2_norm_clip=0.0), r"l2_norm_clip.*\(0, inf\]"),
    ("opt_clip_negative", lambda t: _opt(l2_norm_clip=-1.0), r"l2_norm_clip.*\(0, inf\]"),
    ("opt_sigma_negative", lambda t: _opt(noise_multiplier=-0.5), r"noise_multiplier.*>= 0"),
    ("opt_q_zero", lambda t: _opt(sampling_probability=0.0), r"sampling_probability must be in \(0, 1\]"),
    ("opt_q_above_one", lambda t: _opt(sampling_probability=2.0), r"sampling_probability must be in \(0, 1\]"),
    (
        "opt_batch_larger_than_dataset",
        lambda t: _opt(num_examples=100, batch_size=200),
        r"batch_size must be in \(0, 100\]",
    ),
    (
        "opt_target_epsilon_negative",
        lambda t: _opt(
            noise_multiplier=None, target_epsilon=-1.0, target_delta=1e-5, num_examples=100, batch_size=10, epochs=1
        ),
        r"target_epsilon must be a finite number > 0",
    ),
    ("opt_target_delta_one", lambda t: _opt(target_delta=1.0), r"target_delta must be in \(0, 1\)"),
    (
        "opt_target_epsilon_missing_inputs",
        lambda t: _opt(noise_multiplier=None, target_epsilon=1.0),
        r"target_delta.*num_examples",
    ),
    ("opt_microbatches_zero", lambda t: _opt(num_microbatches=0), r"num_microbatches.*integer >= 1"),
    ("opt_microbatches_without_batch_size", lambda t: _opt(num_microbatches=4, clipping="vectorized"), r"batch_size"),
    ("opt_microbatches_with_ghost", lambda t: _opt(num_microbatches=4, batch_size=8.0), r"num_microbatches.*ghost"),
    ("opt_unknown_clipping", lambda t: _opt(clipping="bogus"), r"clipping.*one of"),
    ("opt_unknown_sampling", lambda t: _opt(sampling="uniform"), r"sampling must be one of"),
    ("opt_gradient_accumulation", lambda t: _opt(gradient_accumulation_steps=2), r"gradient_accumulation_steps"),
    # --- make_private and the private step
    ("private_not_a_model", lambda t: __import__("ewtune_tf").make_private("model"), r"model must be a keras\.Model"),
    (
        "private_physical_batch_zero",
        lambda t: __import__("ewtune_tf").make_private(_tiny_model(), physical_batch_size=0),
        r"physical_batch_size.*>= 1",
    ),
    (
        "private_microbatches_not_on_the_optimizer",
        lambda t: __import__("ewtune_tf").make_private(_tiny_model(), physical_batch_size=8, num_microbatches=3),
        r"num_microbatches=3: give it to the EWTune optimizer",
    ),
    ("private_loss_already_reduced", lambda t: _fit_one_step(loss=reduced_mse_loss), r"per-example losses"),
    ("private_trainable_batchnorm", lambda t: _fit_one_step(bn=True), r"BatchNormalization"),
    (
        "private_checkpoint_other_privacy_config",
        _restore_other_privacy_config,
        r"noise_multiplier.*different privacy configuration",
    ),
    # --- data sampling and callbacks
    (
        "poisson_q_zero",
        lambda t: __import__("ewtune_tf.data", fromlist=["x"]).poisson_batches(_ds(), 0.0),
        r"sampling_probability.*\(0, 1\]",
    ),
    (
        "poisson_expected_batch_larger_than_dataset",
        lambda t: __import__("ewtune_tf.data", fromlist=["x"]).poisson_batches(_ds(), expected_batch_size=1000),
        rf"expected_batch_size.*\(0, {N}\]",
    ),
    (
        "poisson_max_batch_zero",
        lambda t: __import__("ewtune_tf.data", fromlist=["x"]).poisson_batches(_ds(), 0.5, max_batch_size=0),
        rf"max_batch_size.*\[1, {N}\]",
    ),
    (
        "budget_target_epsilon_zero",
        lambda t: __import__("ewtune_tf").PrivacyBudget(target_epsilon=0.0),
        r"target_epsilon.*> 0",
    ),
    # --- TFX custom config
    ("tfx_epsilon_zero", lambda t: _tfx({"epsilon": 0.0}), r"epsilon"),
    ("tfx_delta_one", lambda t: _tfx({"delta": 1.0}), r"delta"),
    ("tfx_shuffle_sampling", lambda t: _tfx({"sampling": "shuffle"}), r"unknown custom_config key\(s\) \['sampling'\]"),
    ("tfx_unknown_key", lambda t: _tfx({"epsilom": 1.0}), r"unknown custom_config key"),
    ("tfx_clip_zero", lambda t: _tfx({"l2_norm_clip": 0.0}), r"l2_norm_clip"),
]


def _tfx(config):
    from ewtune_tf.tfx.config import parse_custom_config

    return parse_custom_config(config)


@pytest.mark.parametrize(
    "row_id, thunk, pattern", PYTHON_ROWS, ids=[r.values[0] if hasattr(r, "values") else r[0] for r in PYTHON_ROWS]
)
def test_python_api_rejects(row_id, thunk, pattern, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=pattern):
            thunk(tmp_path)


def test_non_finite_examples_are_dropped_not_an_abort():
    # An abort at the step that sampled an example would reveal that it was
    # sampled: non-finite records contribute 0 and are counted, unlogged
    # (tests/training/test_nonfinite.py checks the other records are intact).
    import keras

    import ewtune_tf

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=_opt(batch_size=4.0), loss="mse")
    ewtune_tf.make_private(model)
    model.fit(np.full((4, 3), np.nan, "float32"), np.zeros((4, 1), "float32"), batch_size=4, verbose=0)
    assert all(np.isfinite(w.numpy()).all() for w in model.trainable_weights)
    assert int(model.optimizer.dp_nonfinite_records.numpy()) == 4


def test_delta_at_least_one_over_n_is_warned():
    with pytest.warns(UserWarning, match=r"target_delta.*1/num_examples"):
        _opt(target_delta=0.05, num_examples=100, batch_size=10)


# ------------------------------------------------------------------ CLIs

ACCOUNTANT_ROWS = [
    ("q_above_one", _acc("--sampling-probability", "1.5"), "--sampling-probability"),
    ("q_zero", _acc("--sampling-probability", "0"), "--sampling-probability"),
    ("sigma_zero", _acc("--noise-multiplier", "0"), "--noise-multiplier"),
    ("steps_zero", _acc("--steps", "0"), "--steps"),
    ("delta_one", _acc("--delta", "1"), "--delta"),
    (
        "epsilon_negative",
        ["delta", "--sampling-probability", "0.01", "--noise-multiplier", "1", "--steps", "10", "--epsilon", "-1"],
        "--epsilon",
    ),
]


@pytest.mark.parametrize("row_id, argv, flag", ACCOUNTANT_ROWS, ids=[r[0] for r in ACCOUNTANT_ROWS])
def test_accountant_cli_exits_2(row_id, argv, flag):
    rc, err = _accountant_cli(argv)
    assert rc == 2
    assert flag in err, err


TRAIN_ROWS = [
    ("epsilon_zero", ["--epsilon", "0"], "--epsilon"),
    ("delta_one", ["--delta", "1.0"], "--delta"),
    ("unknown_task", ["--task", "cola9"], "--task"),
    ("clip_zero", ["--l2_norm_clip", "0"], "--l2_norm_clip"),
    ("physical_batch_zero", ["--physical_batch_size", "0"], "--physical_batch_size"),
    ("unknown_accountant", ["--accountant", "rdp2"], "--accountant"),
    ("unknown_strategy", ["--strategy", "gpu_cluster"], "--strategy"),
    ("missing_glue_dir", ["--glue_dir", "/nonexistent/glue"], "--glue_dir"),
    ("unknown_model_preset", ["--model", "no_such_preset_xyz"], "model"),
    # No TPU here: the CLI must refuse before writing. (The static-shape check
    # itself can only be exercised on a TPU host.)
    ("tpu_unreachable", ["--strategy", "tpu", "--batch_size", "4"], "--strategy tpu"),
    ("batch_larger_than_dataset", ["--batch_size", "100000", "--max_train_examples", "50"], "--batch_size"),
]


@pytest.mark.parametrize(
    "row_id, extra, flag", TRAIN_ROWS, ids=[r.values[0] if hasattr(r, "values") else r[0] for r in TRAIN_ROWS]
)
def test_train_cli_exits_2_before_writing(row_id, extra, flag, tmp_path):
    from trainers import glue

    out, export = tmp_path / "out", tmp_path / "export"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = [
        "--glue_dir",
        os.path.join(root, "tests", "fixtures", "glue"),
        "--output_dir",
        str(out),
        "--export_dir",
        str(export),
        "--max_steps",
        "1",
        "--max_train_examples",
        "8",
        "--max_eval_examples",
        "8",
        "--sequence_length",
        "16",
    ] + extra
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = glue.main(argv)
        except SystemExit as e:
            rc = e.code
    for d in (out, export):
        assert not d.exists() or not any(d.iterdir()), f"{d} was written before the error"
    assert rc == 2, err.getvalue()[-2000:]
    assert flag in err.getvalue(), err.getvalue()[-2000:]
