"""Build script: setuptools hands the native modules to CMake + Ninja.

In the shape of pybind11's cmake_example: one CMakeExtension, one build_ext
that runs CMake into the package folder. Environment knobs, forwarded to
CMakeLists.txt (which documents them):

    FUSED_ADAMW_CUDA=AUTO|ON|OFF     build fused_adamw._cuda (default AUTO)
    FUSED_ADAMW_CUDA_ARCHS="80-real;90"
    FUSED_ADAMW_CUDA_EMU=AUTO|ON|OFF build fused_adamw._cuda_emu, the CUDA kernels
                                     compiled for the host (default AUTO: where CUDA's
                                     headers are found)
    FUSED_ADAMW_SANITIZE=OFF|ON      _cpu, _cuda_emu and _host with ASan + UBSan (no _cuda)
    FUSED_ADAMW_HOST=AUTO|ON|OFF     build fused_adamw._host, the plan's per-step check in
                                     C++, against the torch this Python imports (AUTO:
                                     where it imports one, i.e. --no-build-isolation)
    FUSED_ADAMW_BUILD_JOBS=N         parallel compile jobs (default: all cores)

`pip install .` or `pip install -e .`; the build prints its progress and what
it built (pip shows it with `pip install -v`).
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def say(message: str) -> None:
    """A progress line; pip shows the build's output with `pip install -v`."""
    print(f"fused_adamw: {message}", flush=True)


def stale_cache_reason(build_dir: Path, use_ninja: bool) -> Optional[str]:
    """Why the CMake cache in build_dir cannot be reused, or None.

    `pip install .` builds in an isolated environment whose cmake and ninja
    live under /tmp/pip-build-env-*/ and are deleted when pip finishes, but
    the build folder (build/temp.*/cmake) stays in the checkout with a
    CMakeCache.txt that names them (CMAKE_MAKE_PROGRAM, CMAKE_COMMAND,
    pybind11's include folder ...). The next `pip install .` gets a new
    environment, and CMake, reusing the cache, fails with "CMake was unable
    to find a build program corresponding to Ninja". So a cache that names a
    path that no longer exists, or another generator, is not reused.
    """
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return None
    for line in cache.read_text(errors="replace").splitlines():
        if not line or line.startswith(("#", "//")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.split(":", 1)[0]
        if key == "CMAKE_GENERATOR" and (value == "Ninja") != use_ninja:
            return f"it was made for the {value} generator"
        for item in value.split(";"):
            if os.path.isabs(item) and not os.path.exists(item):
                return f"its {key} names {item}, which no longer exists (a finished pip build's environment)"
    return None


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        # The package folder the modules land in (site-packages, or python/
        # for an editable install).
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        cmake = shutil.which("cmake") or "cmake"
        ninja = shutil.which("ninja")
        why = stale_cache_reason(build_dir, ninja is not None)
        if why:
            say(f"not reusing the CMake cache in {build_dir}: {why}; configuring afresh")
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)

        import pybind11

        args = [
            f"-DFUSED_ADAMW_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if ninja:
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        # Knobs are passed (or unset) every time: a reused cache would keep the
        # value of the previous build otherwise.
        cuda_mode = os.environ.get("FUSED_ADAMW_CUDA", "AUTO").upper()
        args.append(f"-DFUSED_ADAMW_CUDA={cuda_mode}")
        args.append(f"-DFUSED_ADAMW_CUDA_EMU={os.environ.get('FUSED_ADAMW_CUDA_EMU', 'AUTO').upper()}")
        args.append(f"-DFUSED_ADAMW_SANITIZE={os.environ.get('FUSED_ADAMW_SANITIZE', 'OFF').upper()}")
        args.append(f"-DFUSED_ADAMW_HOST={os.environ.get('FUSED_ADAMW_HOST', 'AUTO').upper()}")
        archs = os.environ.get("FUSED_ADAMW_CUDA_ARCHS")
        args.append(f"-DFUSED_ADAMW_CUDA_ARCHS={archs}" if archs else "-UFUSED_ADAMW_CUDA_ARCHS")
        nvcc = os.environ.get("CUDACXX")
        if cuda_mode != "OFF" and nvcc is None:
            nvcc = shutil.which("nvcc")
            if nvcc is None and Path("/usr/local/cuda/bin/nvcc").exists():
                nvcc = "/usr/local/cuda/bin/nvcc"
            if nvcc:
                args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if cuda_mode == "OFF":
            say("FUSED_ADAMW_CUDA=OFF: building _cpu (and _cuda_emu where CUDA's headers are found; "
                "FUSED_ADAMW_CUDA_EMU=OFF skips it)")
        elif nvcc:
            # Measured on the project's 2-core machine: _cpu alone 20 s, with _cuda 65 s.
            say(f"FUSED_ADAMW_CUDA={cuda_mode} and nvcc at {nvcc}: building _cpu, _cuda and _cuda_emu (the "
                "CUDA kernels compiled for the host), which triples the build time (FUSED_ADAMW_CUDA=OFF skips "
                "_cuda on a machine without a GPU)")

        jobs = os.environ.get("FUSED_ADAMW_BUILD_JOBS", str(os.cpu_count() or 2))
        t0 = time.perf_counter()
        say(f"configuring with {cmake} in {build_dir}")
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        t1 = time.perf_counter()
        say(f"compiling with {jobs} jobs (each line [i/n] is one compile step)")
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        t2 = time.perf_counter()
        say(f"built {', '.join(p.name for p in self._built(out_dir)) or 'nothing'} into {out_dir} "
            f"in {t2 - t0:.0f} s (configure {t1 - t0:.0f} s, compile {t2 - t1:.0f} s)")

    @staticmethod
    def _built(folder: Path) -> list[Path]:
        return sorted(p for pattern in ("_c*.so", "_c*.pyd", "_host*.so", "_host*.pyd") for p in folder.glob(pattern))

    def copy_extensions_to_source(self) -> None:
        """Editable installs copy the declared extension (_cpu) into the source
        tree; _cuda, _cuda_emu and _host come from the same CMake run but are
        declared nowhere (each exists only where its compiler, headers or
        torch were found), so they are copied here too."""
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
