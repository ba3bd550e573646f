#pragma once
// One header compiles on host (g++) and device (nvcc): kernel math marked
// PNEWTON_HD is shared unchanged by the CPU loops and the CUDA kernels.
#if defined(__CUDACC__)
#define PNEWTON_HD __host__ __device__ __forceinline__
#else
#define PNEWTON_HD inline
#endif

// Unroll a loop with a compile-time trip count in device code (register arrays stay in
// registers only when every index is a constant); nothing on the host.
#if defined(__CUDACC__)
#define PNEWTON_UNROLL _Pragma("unroll")
#else
#define PNEWTON_UNROLL
#endif
