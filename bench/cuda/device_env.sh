# Sourced by the device scripts before CMake. The device image sets CXX=/opt/gcc/bin/g++, whose link step puts a
# static copy of libstdc++ into the grace Python module (ldd shows no libstdc++.so); imported next to pip torch
# (which uses the system's shared libstdc++) the module segfaulted in its first C++ call (session 4,
# bench/results/gpu-run-session4/diag.log). The system g++ links the shared libstdc++, and the same test passes
# (diag2.log). So build everything there with the system compilers, CUDA's host compiler included.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
    export CXX=/usr/bin/g++ CC=/usr/bin/gcc CUDAHOSTCXX=/usr/bin/g++
fi
# Leave NVLink multicast off (the device's rule; it is preset there, kept for programs that reset the environment).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
