"""Build script: setuptools hands the native modules to CMake + Ninja.

In the shape of pybind11's cmake_example: one CMakeExtension, one build_ext
that runs CMake into the package folder. Environment knobs, forwarded to
CMakeLists.txt (which documents them):

    FUSED_ADAMW_CUDA=AUTO|ON|OFF     build fused_adamw._cuda (default AUTO)
    FUSED_ADAMW_CUDA_ARCHS="80-real;90"
    FUSED_ADAMW_BUILD_JOBS=N         parallel compile jobs (default: all cores)

`pip install .` or `pip install -e .`; the build prints what it built.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        # The package folder the modules land in (site-packages, or python/
        # for an editable install).
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)

        import pybind11

        cmake = shutil.which("cmake") or "cmake"
        args = [
            f"-DFUSED_ADAMW_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        for knob in ("FUSED_ADAMW_CUDA", "FUSED_ADAMW_CUDA_ARCHS"):
            if os.environ.get(knob):
                args.append(f"-D{knob}={os.environ[knob]}")
        if os.environ.get("FUSED_ADAMW_CUDA", "AUTO").upper() != "OFF" and "CUDACXX" not in os.environ:
            nvcc = shutil.which("nvcc")
            if nvcc is None and Path("/usr/local/cuda/bin/nvcc").exists():
                nvcc = "/usr/local/cuda/bin/nvcc"
            if nvcc:
                args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")

        jobs = os.environ.get("FUSED_ADAMW_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        print(f"fused_adamw: built {', '.join(p.name for p in self._built(out_dir)) or 'nothing'} into {out_dir}",
              flush=True)

    @staticmethod
    def _built(folder: Path) -> list[Path]:
        return sorted(p for pattern in ("_c*.so", "_c*.pyd") for p in folder.glob(pattern))

    def copy_extensions_to_source(self) -> None:
        """Editable installs copy the declared extension (_cpu) into the source
        tree; _cuda comes from the same CMake run but is declared nowhere (it
        exists only where nvcc does), so it is copied here too."""
        super().copy_extensions_to_source()
        built_dir = Path(self.build_lib) / "fused_adamw"
        package_dir = Path(self.get_finalized_command("build_py").get_package_dir("fused_adamw"))
        for module in self._built(built_dir):
            shutil.copy2(module, package_dir / module.name)


setup(
    packages=["fused_adamw", "fused_adamw.triton_kernels"],
    package_dir={"fused_adamw": "python/fused_adamw", "fused_adamw.triton_kernels": "triton_kernels"},
    ext_modules=[CMakeExtension("fused_adamw._cpu")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
