from setuptools import setup

setup(
    name="selagg_fast",
    version="0.1.0",
    description="Fused Triton kernels for Selective Aggregation probing and streaming attention statistics of ViTs",
    python_requires=">=3.10",
    packages=[
        "selagg_fast",
        "selagg_fast.ops",
        "selagg_fast.probe",
        "selagg_fast.analysis",
        "selagg_fast.kernels",
        "selagg_fast.bench",
    ],
    # kernels/ and bench/ live at the top level of the repository but install as
    # subpackages, so no global package named `kernels` or `bench` is created.
    package_dir={"selagg_fast.kernels": "kernels", "selagg_fast.bench": "bench"},
    package_data={"selagg_fast.bench": ["*.sh", "*.md"]},
    install_requires=["torch>=2.4", "triton", "timm", "numpy", "tqdm", "matplotlib", "pillow", "safetensors", "scipy", "torchvision"],
    extras_require={"test": ["pytest"], "nvtx": ["nvtx"]},
    entry_points={"console_scripts": ["selagg-fast=selagg_fast.cli:main"]},
)
