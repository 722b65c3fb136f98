from setuptools import find_packages, setup

# The OCR step (tools.ocr) runs the PP-OCRv4 models that rapidocr-onnxruntime 1.4.4 ships in its wheel. That
# package is installed with --no-deps (`make install-ocr`): its metadata asks for the GUI opencv-python, which
# needs libGL, and for the CPU onnxruntime, which must not sit beside onnxruntime-gpu. These extras are its
# other requirements, with the headless OpenCV and one onnxruntime: `ocr` (CPU) or `ocr-gpu` (CUDA provider).
_PY_OCR = "; python_version < '3.13'"  # rapidocr-onnxruntime 1.4.4 needs Python < 3.13
OCR_DEPS = [d + _PY_OCR for d in ("opencv-python-headless>=4.5.1.48", "pyclipper>=1.2.0", "shapely>=1.7.1,!=2.0.4",
                                  "six>=1.15.0", "tqdm", "pyyaml", "pillow", "numpy<3")]

setup(
    name="cdiscount-trainer",
    version="0.1.0",
    description="High-throughput training service for large product-image catalogues (Cdiscount format)",
    python_requires=">=3.10",
    packages=find_packages(include=["dali_pipes*", "models*", "train*", "tools*"]),
    package_data={"train": ["configs/*.yaml", "run.sh"], "dali_pipes.native": ["*.cc"]},
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
        "ocr": OCR_DEPS + ["onnxruntime>=1.7.0" + _PY_OCR],
        "ocr-gpu": OCR_DEPS + ["onnxruntime-gpu>=1.7.0" + _PY_OCR],
    },
    entry_points={
        "console_scripts": [
            "cdisc-repack=tools.repack:main",
            "cdisc-synthetic=tools.make_synthetic:main",
            "cdisc-bench=tools.bench:main",
            "cdisc-predict=tools.predict:main",
            "cdisc-ocr=tools.ocr:main",
        ]
    },
)
