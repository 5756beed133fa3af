"""Ghost rules for LoRA factors (Keras ``enable_lora``) of linear and
embedding layers.

Keras adds ``scale * (x A) B`` to a LoRA-enabled layer's output, with
``scale = lora_alpha / lora_rank``. Both factors are tapped as einsum (or
gather) uses; the scale is folded into the input of B's tap, so that
``dL/dB = (scale * u)^T dL/dv``.
"""

from __future__ import annotations

import tensorflow as tf

from ewtune_tf.mechanism.ghost_layers import Recorder
from ewtune_tf.mechanism.ghost_taps import unused_letters


def enabled(layer) -> bool:
    return bool(getattr(layer, "lora_enabled", False))


def _scale(layer) -> float:
    return layer.lora_alpha / layer.lora_rank


def linear_supported(layer, equation: str) -> bool:
    """LoRA of a linear layer needs the kernel's last axis to be an output axis."""
    if not enabled(layer):
        return True
    lhs, out = equation.split("->")
    inp, ker = lhs.split(",")
    return ker[-1] not in inp and ker[-1] in out


def linear_delta(layer, rec: Recorder, x: tf.Tensor, equation: str) -> tf.Tensor:
    """``scale * einsum(x, A) B``: the LoRA term of ``einsum(equation, x, kernel)``."""
    lhs, out = equation.split("->")
    inp, ker = lhs.split(",")
    last = ker[-1]
    r = unused_letters(equation, 1)
    mid = out.replace(last, r)
    u = rec.einsum(f"{inp},{ker[:-1]}{r}->{mid}", x, layer.lora_kernel_a)
    return rec.einsum(f"{mid},{r}{last}->{out}", u, layer.lora_kernel_b, scale=_scale(layer))


def embedding_delta(layer, rec: Recorder, ids: tf.Tensor, dtype) -> tf.Tensor:
    """``scale * take(A, ids) B``: the LoRA term of an embedding lookup."""
    u = rec.gather(layer.lora_embeddings_a, ids, dtype)
    rank = ids.shape.rank
    letters = unused_letters("", rank + 2)
    eq = f"{letters[: rank + 1]},{letters[rank]}{letters[rank + 1]}->{letters[:rank]}{letters[rank + 1]}"
    return rec.einsum(eq, u, layer.lora_embeddings_b, scale=_scale(layer))
