#pragma once
// One header compiles on host (g++) and device (nvcc): kernel math marked
// PNEWTON_HD is shared unchanged by the CPU loops and the CUDA kernels.
#if defined(__CUDACC__)
#define PNEWTON_HD __host__ __device__ __forceinline__
#else
#define PNEWTON_HD inline
#endif
