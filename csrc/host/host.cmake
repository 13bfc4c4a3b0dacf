# fused_adamw._host (${CMAKE_CURRENT_LIST_DIR}/host_module.cpp), included by CMakeLists.txt.
#
# The one module built against torch: it reads at::Tensor to do the plan's
# per-step checks in C++. Built when the Python that runs the build imports
# torch (`pip install --no-build-isolation`, or FUSED_ADAMW_HOST=ON to fail
# without it); an isolated build has no torch and skips it, and the plan then
# does the same work in Python. FUSED_ADAMW_HOST=OFF skips it.
set(FUSED_ADAMW_HOST "AUTO" CACHE STRING "Build the torch-linked host module _host: AUTO, ON or OFF")
if(NOT FUSED_ADAMW_HOST STREQUAL "OFF")
  execute_process(
    COMMAND ${Python_EXECUTABLE} -c
      "import os, torch; print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.__version__)"
    OUTPUT_VARIABLE FA_TORCH_INFO RESULT_VARIABLE FA_TORCH_RC ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(FA_TORCH_RC EQUAL 0)
    string(REPLACE "\n" ";" FA_TORCH_INFO "${FA_TORCH_INFO}")
    list(GET FA_TORCH_INFO 0 FA_TORCH_DIR)
    list(GET FA_TORCH_INFO 1 FA_TORCH_CXX11_ABI)
    list(GET FA_TORCH_INFO 2 FA_TORCH_VERSION)
    Python_add_library(_host MODULE WITH_SOABI ${CMAKE_CURRENT_LIST_DIR}/host_module.cpp)
    target_include_directories(_host SYSTEM PRIVATE ${FA_TORCH_DIR}/include ${FA_TORCH_DIR}/include/torch/csrc/api/include)
    target_compile_definitions(_host PRIVATE _GLIBCXX_USE_CXX11_ABI=${FA_TORCH_CXX11_ABI}
      FUSED_ADAMW_TORCH_VERSION="${FA_TORCH_VERSION}")
    target_compile_options(_host PRIVATE -O2)
    find_library(FA_TORCH_PYTHON torch_python PATHS ${FA_TORCH_DIR}/lib NO_DEFAULT_PATH REQUIRED)
    find_library(FA_C10 c10 PATHS ${FA_TORCH_DIR}/lib NO_DEFAULT_PATH REQUIRED)
    target_link_libraries(_host PRIVATE ${FA_TORCH_PYTHON} ${FA_C10})
    # torch is imported before fused_adamw, so its libraries are loaded; the
    # rpath finds them when a tool loads the module alone.
    set_target_properties(_host PROPERTIES
      LIBRARY_OUTPUT_DIRECTORY ${FUSED_ADAMW_OUTPUT_DIR}
      BUILD_RPATH "${FA_TORCH_DIR}/lib" INSTALL_RPATH "${FA_TORCH_DIR}/lib")
    if(COMMAND fa_sanitize)
      fa_sanitize(_host)
    endif()
    list(APPEND FA_BUILT "_host (torch ${FA_TORCH_VERSION})")
  elseif(FUSED_ADAMW_HOST STREQUAL "ON")
    message(FATAL_ERROR "FUSED_ADAMW_HOST=ON but ${Python_EXECUTABLE} cannot import torch "
                        "(build with pip install --no-build-isolation)")
  else()
    message(STATUS "fused_adamw: torch is not importable by the build's Python, _host is not built "
                   "(pip install --no-build-isolation builds it)")
  endif()
endif()
