// DTRAIN_HOST_DEVICE: marks the plain C++ functions that the CUDA kernels call and the CPU tests run too
// (window_index.h, reduce_index.h, philox.h): __host__ __device__ under nvcc, nothing for the host compiler.
// No CUDA header is needed to include it.
#pragma once

#if defined(__CUDACC__)
#define DTRAIN_HOST_DEVICE __host__ __device__
#else
#define DTRAIN_HOST_DEVICE
#endif
