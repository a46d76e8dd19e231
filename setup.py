from setuptools import find_packages, setup

# kernels/ is installed as `relsum_kernels`: a top-level `kernels` module would shadow
# Hugging Face's `kernels` package, which transformers probes for.
setup(
    name="relsum",
    version="0.1.0",
    description="Relevance-trained product summaries: cross-encoder ranker, GRPO/DPO summarizer "
    "training and fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["relsum_core", "relsum_core.*"]) + ["relsum_kernels"],
    package_dir={"relsum_kernels": "kernels"},
    package_data={"relsum_core": ["bundled/esci_150q/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "triton>=3.6",
        "numpy>=1.24",
        "transformers>=4.50",
        "safetensors>=0.4",
        "tqdm>=4.60",
        # BM25 baseline (stemmed, as in the committed numbers)
        "bm25s>=0.2",
        "PyStemmer>=2.2",
        "scipy>=1.10",
    ],
    extras_require={
        # setuptools and wheel: tests/test_packaging.py builds the wheel users install;
        # pytest-timeout: a test that hangs fails (pyproject's timeout) instead of holding CI
        "test": ["pytest>=7", "pytest-timeout>=2", "ruff>=0.5", "setuptools>=64", "wheel"],
        "bench": ["pytest-benchmark>=4"],
        # reading the packaged SmolLM2 GGUF once (then cached as safetensors)
        "policy": ["gguf>=0.10", "accelerate>=1.0"],
        "gpu": ["flash-attn"],
        "plot": ["matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["relsum=relsum_core.cli:main"]},
)
