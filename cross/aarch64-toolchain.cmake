# CMake toolchain for llama.cpp's aarch64 cross build (used by cross/build-aarch64.sh).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# Default: Armv8.2-A with the int8 dot product and fp16 arithmetic: Cortex-A76 (Raspberry Pi 5)
# and Cortex-A78AE (Jetson Orin). `SCENECAST_ARM_ARCH=armv8-a` (cross/build-aarch64.sh --armv8)
# builds the plain Armv8.0-A kernels a Cortex-A72 (Raspberry Pi 4) runs. ggml picks its matching
# kernels from these compiler defines.
if(DEFINED ENV{SCENECAST_ARM_ARCH})
  set(GGML_CPU_ARM_ARCH "$ENV{SCENECAST_ARM_ARCH}" CACHE STRING "ggml CPU architecture" FORCE)
else()
  set(GGML_CPU_ARM_ARCH "armv8.2-a+dotprod+fp16" CACHE STRING "ggml CPU architecture" FORCE)
endif()
