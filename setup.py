"""Build pyguard._C with CMake (CMakeLists.txt) and install kernels/ as pyguard.kernels.

Environment: PYGUARD_SANITIZE=1 builds with AddressSanitizer + UBSan; PYGUARD_OPENMP=0 disables OpenMP.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        flag = lambda env, default: "ON" if os.environ.get(env, default) not in ("0", "", "OFF") else "OFF"
        cfg = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYGUARD_SANITIZE={flag('PYGUARD_SANITIZE', '0')}",
            f"-DPYGUARD_OPENMP={flag('PYGUARD_OPENMP', '1')}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *cfg], check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    packages=["pyguard", "pyguard.llama", "pyguard.torch", "pyguard.calibrate", "pyguard.kernels"],
    package_dir={"pyguard": "pyguard", "pyguard.kernels": "kernels"},
    package_data={"pyguard": ["data/*.jsonl", "data/*.safetensors", "data/anchors/*"]},  # prompts, CASA, anchors
    ext_modules=[CMakeExtension("pyguard._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
