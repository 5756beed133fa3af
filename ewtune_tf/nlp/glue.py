"""GLUE tasks (SST-2, QNLI, MNLI, QQP) as raw text + integer labels.

Two sources, in this order:

1. A GLUE-layout directory, given as ``glue_dir`` (the trainer's
   ``--glue_dir``) or the environment variable ``EWTUNE_GLUE_DIR``:
   ``SST-2/{train,dev}.tsv``, ``QNLI/{train,dev}.tsv``,
   ``MNLI/{train,dev_matched,dev_mismatched}.tsv``, ``QQP/{train,dev}.tsv``,
   exactly as the GLUE download script lays them out. Columns are found by
   their header names, never by position, because the GLUE files differ in
   column order (MNLI has eleven or more columns).
2. Otherwise TensorFlow Datasets ``glue/<task>`` (downloads where internet
   exists).

When a directory is given but lacks the file, that is an error: we never
fall back silently to another copy of the data.

The loader returns numpy arrays of Python strings and int64 labels, so the
data layer stays independent of the model: tokenization happens in the
KerasHub preprocessor (and, at serving time, inside the SavedModel).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

GLUE_DIR_ENV = "EWTUNE_GLUE_DIR"

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """Static description of one GLUE task.

    Attributes:
      name: lower-case task name used on the command line (``sst2``).
      dir_name: the task's directory in the GLUE layout (``SST-2``).
      text_keys: canonical feature names of the text inputs, in model input
        order (one for single-sentence tasks, two for pairs). These are the
        TFDS feature names, and the input names of the serving signature.
      label_names: class names; a label's integer id is its index here
        (the same ids TFDS uses).
      tsv_text_columns: header names of the same columns in the GLUE TSVs
        (default: ``text_keys``).
      tsv_label_column: header name of the label column in the GLUE TSVs.
      splits: split name -> (TSV file stem, TFDS split name); by default
        GLUE's ``train`` and ``dev`` (TFDS ``validation``).
      dev_splits: the evaluation splits, main one first.
    """

    name: str
    dir_name: str
    text_keys: Tuple[str, ...]
    label_names: Tuple[str, ...]
    tsv_text_columns: Tuple[str, ...] = ()
    tsv_label_column: str = "label"
    splits: Dict[str, Tuple[str, str]] = dataclasses.field(
        default_factory=lambda: {"train": ("train", "train"), "dev": ("dev", "validation")}
    )
    dev_splits: Tuple[str, ...] = ("dev",)

    def __post_init__(self):
        if not self.tsv_text_columns:
            object.__setattr__(self, "tsv_text_columns", self.text_keys)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.text_keys) == 2

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "text_keys": list(self.text_keys),
            "label_names": list(self.label_names),
            "num_classes": self.num_classes,
            "dev_splits": list(self.dev_splits),
        }


TASKS: Dict[str, GlueTask] = {
    "sst2": GlueTask("sst2", "SST-2", ("sentence",), ("negative", "positive")),
    "qnli": GlueTask("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment")),
    "mnli": GlueTask(
        "mnli",
        "MNLI",
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        tsv_text_columns=("sentence1", "sentence2"),
        tsv_label_column="gold_label",
        splits={
            "train": ("train", "train"),
            "dev_matched": ("dev_matched", "validation_matched"),
            "dev_mismatched": ("dev_mismatched", "validation_mismatched"),
        },
        dev_splits=("dev_matched", "dev_mismatched"),
    ),
    "qqp": GlueTask(
        "qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), tsv_label_column="is_duplicate"
    ),
}


class GlueDataError(ValueError):
    """GLUE data could not be found or parsed (names the files and flags)."""


@dataclasses.dataclass
class GlueSplit:
    """One split of a GLUE task.

    Attributes:
      task: the task description.
      split: split name (``train``, ``dev``, ``dev_matched``, ...).
      texts: one numpy object array of ``str`` per entry of
        ``task.text_keys``, all of length ``len(labels)``.
      labels: int64 class ids in ``[0, task.num_classes)``.
      source: where the data came from (a file path or ``tfds:glue/<task>``).
    """

    task: GlueTask
    split: str
    texts: Tuple[np.ndarray, ...]
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def features(self) -> Dict[str, np.ndarray]:
        """Text features keyed by ``task.text_keys``."""
        return dict(zip(self.task.text_keys, self.texts))

    def model_inputs(self):
        """Raw text in the form a KerasHub classifier's preprocessor takes:
        one array for single-sentence tasks, a tuple of two for pairs."""
        return self.texts[0] if len(self.texts) == 1 else tuple(self.texts)

    def take(self, n: Optional[int]) -> "GlueSplit":
        """The first ``n`` examples (all if ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return dataclasses.replace(self, texts=tuple(t[:n] for t in self.texts), labels=self.labels[:n])

    def to_dataset(self):
        """A ``tf.data.Dataset`` of ``({text_key: tf.string}, label)``."""
        import tensorflow as tf  # Lazy: parsing needs no TensorFlow.

        return tf.data.Dataset.from_tensor_slices((self.features(), self.labels))


def get_task(name: str) -> GlueTask:
    """The task called ``name`` (case-insensitive; ``sst-2`` also works)."""
    key = str(name).lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"--task must be one of {sorted(TASKS)}, got {name!r}.")
    return TASKS[key]


def resolve_glue_dir(glue_dir: Optional[str] = None) -> Optional[str]:
    """``glue_dir`` if given, else ``$EWTUNE_GLUE_DIR`` if set, else None."""
    if glue_dir:
        return os.fspath(glue_dir)
    env = os.environ.get(GLUE_DIR_ENV)
    return env or None


def load_glue(
    task: str,
    split: str = "train",
    *,
    glue_dir: Optional[str] = None,
    max_examples: Optional[int] = None,
) -> GlueSplit:
    """Loads one split of a GLUE task as raw text and integer labels.

    Args:
      task: ``sst2``, ``qnli``, ``mnli`` or ``qqp``.
      split: ``train``, or a dev split: ``dev`` (``dev_matched`` /
        ``dev_mismatched`` for MNLI; ``validation`` is accepted as an alias
        of ``dev``, and ``dev`` for MNLI means matched).
      glue_dir: GLUE-layout directory; defaults to ``$EWTUNE_GLUE_DIR``;
        when neither is set, TFDS ``glue/<task>`` is used.
      max_examples: keep only the first ``max_examples`` rows (for quick runs).

    Raises:
      ValueError: unknown task or split, or ``max_examples`` < 1.
      GlueDataError: the data is missing or malformed; the message names the
        expected files and the ``--glue_dir`` / ``EWTUNE_GLUE_DIR`` options.
    """
    spec = get_task(task)
    split = _canonical_split(spec, split)
    if max_examples is not None and int(max_examples) < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}.")
    directory = resolve_glue_dir(glue_dir)
    if directory is not None:
        data = _load_tsv_split(spec, split, directory)
    else:
        data = _load_tfds_split(spec, split)
    return data.take(max_examples)


def _canonical_split(spec: GlueTask, split: str) -> str:
    split = str(split).lower()
    if split == "validation":
        split = "dev"
    if spec.name == "mnli" and split in ("dev", "validation_matched"):
        split = "dev_matched"
    if spec.name == "mnli" and split == "validation_mismatched":
        split = "dev_mismatched"
    if split not in spec.splits:
        raise ValueError(f"split for task {spec.name!r} must be one of {sorted(spec.splits)}, got {split!r}.")
    return split


def expected_files(spec: GlueTask, directory: str = "<glue_dir>") -> Sequence[str]:
    """The TSV paths a GLUE-layout directory must hold for ``spec``."""
    return [os.path.join(directory, spec.dir_name, f"{stem}.tsv") for stem, _ in spec.splits.values()]


def _missing_data_message(spec: GlueTask, detail: str) -> str:
    files = ", ".join(expected_files(spec))
    return (
        f"GLUE data for task {spec.name!r} not found: {detail}. Provide a "
        f"GLUE-layout directory with --glue_dir DIR (or the environment "
        f"variable {GLUE_DIR_ENV}=DIR) holding {files}; or, with internet "
        f"access and no --glue_dir, let TensorFlow Datasets download "
        f"'glue/{spec.name}'."
    )


def _load_tsv_split(spec: GlueTask, split: str, directory: str) -> GlueSplit:
    stem, _ = spec.splits[split]
    path = os.path.join(directory, spec.dir_name, f"{stem}.tsv")
    if not os.path.isfile(path):
        raise GlueDataError(_missing_data_message(spec, f"no file {path}"))
    texts, labels = read_glue_tsv(path, spec)
    return GlueSplit(spec, split, texts, labels, source=os.path.abspath(path))


def read_glue_tsv(path: str, spec: GlueTask) -> Tuple[Tuple[np.ndarray, ...], np.ndarray]:
    """Parses a GLUE TSV by its header names.

    GLUE TSVs are not CSV-quoted: a sentence may start with a double quote
    (SST-2 has many), so the file is read with ``QUOTE_NONE``. Rows with the
    wrong field count (a handful exist in the published QQP train.tsv) or
    with an unknown label (MNLI rows whose gold label is ``-``) are skipped
    and counted in a log message.
    """
    label_ids = {name: i for i, name in enumerate(spec.label_names)}
    # Raise the field size limit: some MNLI/QNLI passages are long.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = next(reader)
        except StopIteration:
            raise GlueDataError(f"{path} is empty; expected a GLUE TSV with a header row.") from None
        header = [h.strip() for h in header]
        wanted = list(spec.tsv_text_columns) + [spec.tsv_label_column]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise GlueDataError(
                f"{path} lacks the column(s) {missing} of the GLUE {spec.dir_name} layout (header is {header})."
            )
        text_idx = [header.index(c) for c in spec.tsv_text_columns]
        label_idx = header.index(spec.tsv_label_column)
        columns = [[] for _ in text_idx]
        labels = []
        skipped = 0
        for row in reader:
            if len(row) != len(header):
                skipped += 1
                continue
            label = _parse_label(row[label_idx].strip(), label_ids)
            if label is None:
                skipped += 1
                continue
            for col, i in zip(columns, text_idx):
                col.append(row[i].strip())
            labels.append(label)
    if skipped:
        _log.warning("%s: skipped %d malformed or unlabeled rows.", path, skipped)
    if not labels:
        raise GlueDataError(f"{path} holds no labeled rows.")
    texts = tuple(np.array(c, dtype=object) for c in columns)
    return texts, np.asarray(labels, dtype=np.int64)


def _parse_label(value: str, label_ids: Dict[str, int]) -> Optional[int]:
    if value in label_ids:
        return label_ids[value]
    try:
        label = int(value)
    except ValueError:
        return None
    return label if 0 <= label < len(label_ids) else None


def _load_tfds_split(spec: GlueTask, split: str) -> GlueSplit:
    _, tfds_split = spec.splits[split]
    name = f"glue/{spec.name}"
    try:
        import tensorflow_datasets as tfds

        ds = tfds.load(name, split=tfds_split, shuffle_files=False)
        columns = [[] for _ in spec.text_keys]
        labels = []
        for ex in tfds.as_numpy(ds):
            for col, key in zip(columns, spec.text_keys):
                col.append(ex[key].decode("utf-8"))
            labels.append(int(ex["label"]))
    except Exception as e:  # Offline, missing package, corrupt cache, ...
        raise GlueDataError(
            _missing_data_message(spec, f"TFDS {name!r} split {tfds_split!r} failed ({type(e).__name__}: {e})")
        ) from e
    texts = tuple(np.array(c, dtype=object) for c in columns)
    return GlueSplit(spec, split, texts, np.asarray(labels, dtype=np.int64), source=f"tfds:{name}")
