"""setup.py's guard against a stale CMake cache (README: the two commands run
in either order in one checkout).

setup.py calls setup() when imported, so the function under test is taken
from its source alone.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Optional

SETUP = Path(__file__).resolve().parent.parent / "setup.py"


def _stale_cache_reason():
    tree = ast.parse(SETUP.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "stale_cache_reason")
    scope = {"os": os, "Path": Path, "Optional": Optional}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(SETUP), "exec"), scope)
    return scope["stale_cache_reason"]


def _cache(tmp_path: Path, lines: list[str]) -> Path:
    (tmp_path / "CMakeCache.txt").write_text("# CMake cache\n//comment\n" + "\n".join(lines) + "\n")
    return tmp_path


def test_no_cache_is_not_stale(tmp_path):
    assert _stale_cache_reason()(tmp_path, True) is None


def test_a_cache_naming_existing_tools_is_reused(tmp_path):
    tool = tmp_path / "ninja"
    tool.write_text("")
    d = _cache(tmp_path, ["CMAKE_GENERATOR:INTERNAL=Ninja", f"CMAKE_MAKE_PROGRAM:FILEPATH={tool}",
                          "CMAKE_BUILD_TYPE:STRING=Release"])
    assert _stale_cache_reason()(d, True) is None


def test_a_cache_naming_a_deleted_pip_tool_is_stale(tmp_path):
    gone = "/tmp/pip-build-env-deleted-for-this-test/overlay/bin/ninja"
    d = _cache(tmp_path, ["CMAKE_GENERATOR:INTERNAL=Ninja", f"CMAKE_MAKE_PROGRAM:FILEPATH={gone}"])
    why = _stale_cache_reason()(d, True)
    assert why is not None and "CMAKE_MAKE_PROGRAM" in why and gone in why


def test_a_cache_of_another_generator_is_stale(tmp_path):
    d = _cache(tmp_path, ["CMAKE_GENERATOR:INTERNAL=Unix Makefiles"])
    assert "Unix Makefiles" in _stale_cache_reason()(d, True)
    assert _stale_cache_reason()(d, False) is None


CMAKE = SETUP.parent / "CMakeLists.txt"
KNOBS = ("FUSED_ADAMW_CUDA", "FUSED_ADAMW_CUDA_ARCHS", "FUSED_ADAMW_CUDA_EMU", "FUSED_ADAMW_SANITIZE")


def test_every_build_knob_is_declared_documented_and_forwarded():
    cmake, setup = CMAKE.read_text(), SETUP.read_text()
    for knob in KNOBS:
        assert f"#   {knob} " in cmake, f"{knob} is not documented at the top of CMakeLists.txt"
        assert f"set({knob} " in cmake or f"option({knob} " in cmake, f"{knob} is not a CMake cache entry"
        assert f"-D{knob}=" in setup, f"setup.py does not forward {knob}"


def test_emulated_module_compiles_the_same_kernel_sources():
    """_cuda and _cuda_emu glob the same csrc/cuda/*.cu: no second copy of a kernel."""
    cmake = CMAKE.read_text()
    assert cmake.count("file(GLOB FA_CUDA_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu)") == 1
    assert cmake.count("file(GLOB FA_EMU_CU CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu)") == 1
    assert "FUSED_ADAMW_CUDA_EMULATION=1" in cmake and "csrc/bindings/cuda_module.cu" in cmake
