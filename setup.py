from setuptools import find_packages, setup

setup(
    name="cdiscount-trainer",
    version="0.1.0",
    description="High-throughput training service for large product-image catalogues (Cdiscount format)",
    python_requires=">=3.10",
    packages=find_packages(include=["dali_pipes*", "models*", "train*", "tools*"]),
    package_data={"train": ["configs/*.yaml", "run.sh"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        "nvidia-dali-cuda120",
        "pymongo",
        "numpy",
        "pyyaml",
        "pillow",
        "crc32c",
        "simplejpeg",
        "safetensors",
    ],
    extras_require={
        "dev": ["pytest", "simplejpeg", "matplotlib", "tensorboard"],
        "plots": ["matplotlib"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={
        "console_scripts": [
            "cdisc-repack=tools.repack:main",
            "cdisc-synthetic=tools.make_synthetic:main",
            "cdisc-bench=tools.bench:main",
            "cdisc-predict=tools.predict:main",
        ]
    },
)
