"""Loads sentence-transformers-style BERT checkpoints on older KerasHub.

KerasHub 0.25's Hugging Face BERT converter (the version the TFX 1.16
environment pins) only finds weights named like the original BERT release:
``bert.``-prefixed keys with LayerNorm ``gamma`` / ``beta``. Checkpoints saved
by sentence-transformers -- including the MiniLM-L6 that is this project's
default model -- have un-prefixed keys with LayerNorm ``weight`` / ``bias``,
so ``from_preset`` fails with "File does not contain tensor
bert.embeddings.word_embeddings.weight". Newer KerasHub reads both.

``legacy_bert_checkpoint`` writes a renamed copy (same tensors, new names) that
the old converter reads; nothing else about the checkpoint changes.
No TensorFlow import here.
"""

import os
import shutil
from typing import Dict

import numpy as np

MARKER = "ewtune_legacy_bert_names"


def is_hf_checkpoint(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "vocab.txt", "model.safetensors"))


def legacy_names(tensors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Maps sentence-transformers BERT names to original-BERT names."""
    out = {}
    for key, value in tensors.items():
        new = key if key.startswith("bert.") else "bert." + key
        if new.endswith(".LayerNorm.weight"):
            new = new[: -len("weight")] + "gamma"
        elif new.endswith(".LayerNorm.bias"):
            new = new[: -len("bias")] + "beta"
        out[new] = value
    return out


def legacy_bert_checkpoint(path: str, out_dir: str) -> str:
    """Copy of the HF checkpoint at `path` with legacy tensor names; returns out_dir."""
    from safetensors.numpy import load_file, save_file

    if not is_hf_checkpoint(path):
        raise ValueError(f"{path} is not a Hugging Face BERT checkpoint (config.json, vocab.txt, model.safetensors)")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(path):
        src = os.path.join(path, name)
        if os.path.isfile(src) and name != "model.safetensors":
            shutil.copy2(src, os.path.join(out_dir, name))
    save_file(
        legacy_names(load_file(os.path.join(path, "model.safetensors"))), os.path.join(out_dir, "model.safetensors")
    )
    open(os.path.join(out_dir, MARKER), "w").close()
    return out_dir
