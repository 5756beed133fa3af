"""Packaging for the ``ewtune-tf`` distribution (import name ``ewtune_tf``).

Version ranges here are what the library supports; the exact, tested versions
are pinned in the lock files under requirements/ (main: Python 3.11, TF 2.21;
TFX: Python 3.10, TF 2.16), which is what `make install` uses.
"""

import os

from setuptools import find_packages, setup

_HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    scope: dict = {}
    with open(os.path.join(_HERE, "ewtune_tf", "version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _long_description() -> str:
    with open(os.path.join(_HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


setup(
    name="ewtune-tf",
    version=_version(),
    description=(
        "Differentially private fine-tuning of BERT-family models in "
        "TensorFlow/Keras 3 with the Edgeworth accountant (EW-Tune)."
    ),
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.12",
    packages=find_packages(include=["ewtune_tf", "ewtune_tf.*", "trainers", "trainers.*"]),
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "keras>=3.0,<4",
        # keras-nlp is now only an alias of keras-hub; we import keras_hub.
        "keras-hub>=0.25",
        "keras-nlp>=0.25",
        "tensorflow-text>=2.16,<2.22",
        "tensorflow-privacy==0.9.0",
        "tensorflow-datasets",
        # TF Privacy 0.9.0 pins dp-accounting to 0.4.x.
        "dp-accounting>=0.4,<0.5",
        "numpy>=1.23,<2",
        "scipy",
        "safetensors",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "dev": ["pytest", "hypothesis", "ruff"],
        "tfx": ["tfx==1.16.0"],
        # Only for comparisons in benchmarks/ (not needed by the library).
        "bench": ["psutil"],
    },
    entry_points={
        "console_scripts": [
            "ewtune-accountant=ewtune_tf.accounting.cli:main",
            "ewtune-train=trainers.glue:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Security",
    ],
)
