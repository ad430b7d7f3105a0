"""Installable package for vlmeval-dop (Depth-wise Operation Pruning for MLLMs, VLMEvalKit plugin)."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="vlmeval-dop",
    version="0.1.0",
    description="Depth-wise Operation Pruning (DOP) for multimodal LLMs, as a VLMEvalKit plugin",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vlmeval_dop", "vlmeval_dop.*"]),
    package_data={"vlmeval_dop": ["configs/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "torchvision",
        # The executor calls transformers' decoder layers directly; their call signature changed in 5.24
        # (`past_key_values` -> `cache`, no `cache_position`). Only the tested range is allowed; see
        # vlmeval_dop/_compat.py for the import-time check.
        "transformers>=5.24,<5.25",
        "ms-vlmeval==0.0.20",  # VLMEvalKit (module vlmeval): run.py, models/ and datasets.py use its internals
        "scipy",
        "pandas",
        "openpyxl",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "pillow",
    ],
    extras_require={
        "test": ["pytest>=7"],
        "vlmeval": ["ms-vlmeval"],
    },
    entry_points={"console_scripts": ["vlmeval-dop=vlmeval_dop.cli:main"]},
)
