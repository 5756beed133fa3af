"""Writes the surrogate's inputs to OUT_DIR (default runs/surrogate): SST-2 token ids
from ewtune_tf's own preprocessor (so both stacks see identical tokens), MiniLM-L6
weights as float16 (to fit the device transfer limit), the TF backbone's masked-mean
embeddings of four dev sentences (fidelity check), and the certified sigma of each
(B, epochs) plan from ewtune_tf.accounting (tilted + PLD certification, eps 8, delta 1e-5).

Run from the repository root: ``.venv/bin/python tools/dp_surrogate/prepare.py``.
"""

import json
import math
import os
import sys

import numpy as np
from safetensors.numpy import load_file

from ewtune_tf import accounting
from ewtune_tf.data.poisson import steps_per_epoch
from ewtune_tf.nlp.glue import load_glue
from ewtune_tf.nlp.models import build_classifier, minilm_dir, sequence_lengths, tokenize

PLANS = [(2048, 2), (2048, 3), (2048, 4), (2048, 5), (2048, 6), (1024, 2), (1024, 3), (1024, 4)]
PLANS += [(4096, 3), (4096, 4), (4096, 5), (4096, 6), (4096, 8), (8192, 6), (8192, 8)]


def main(out_dir: str = "runs/surrogate", glue_dir: str = "../shared/data/glue") -> None:
    os.makedirs(out_dir, exist_ok=True)
    clf = build_classifier("minilm", num_classes=2, sequence_length=64, lora_rank=0, dropout=0.0)
    out = {}
    for split in ("train", "dev"):
        data = load_glue("sst2", split, glue_dir=glue_dir)
        tokens = tokenize(clf.preprocessor, data.texts)
        lengths = sequence_lengths(tokens)
        out[split + "_ids"] = tokens["token_ids"][:, : int(lengths.max())].astype(np.int16)
        out[split + "_len"] = lengths.astype(np.int16)
        out[split + "_y"] = np.asarray(data.labels).astype(np.int8)
        if split == "dev":
            x = {k: v[:4] for k, v in tokens.items()}
            seq = np.asarray(clf.backbone(x)["sequence_output"])
            mask = x["padding_mask"][..., None].astype(np.float32)
            out["ref_mean"] = (seq * mask).sum(1) / mask.sum(1)
    np.savez_compressed(os.path.join(out_dir, "sst2.npz"), **out)
    weights = load_file(os.path.join(minilm_dir(), "model.safetensors"))
    keep = {
        k: v.astype(np.float16) for k, v in weights.items() if not k.startswith(("pooler", "embeddings.position_ids"))
    }
    np.savez(os.path.join(out_dir, "weights_fp16.npz"), **keep)
    n = len(out["train_y"])
    sigmas = {}
    for b, e in PLANS:
        q = b / n
        steps = int(math.ceil(e * steps_per_epoch(q) - 1e-9))
        cal = accounting.calibrate_noise_multiplier(8.0, 1e-5, sampling_probability=q, steps=steps, certify=True)
        sigmas[f"{b}_{e}"] = {"B": b, "E": e, "q": q, "T": steps, "sigma": float(cal.noise_multiplier)}
    with open(os.path.join(out_dir, "sigmas.json"), "w") as f:
        json.dump(sigmas, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
