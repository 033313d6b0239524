/* cuda-burn: a CUDA program that needs no CUDA toolkit (scripts/gpu-check.sh, issue 13).
 *
 * It loads the driver the way the CUDA runtime does (dlopen("libcuda.so.1")), lists the devices
 * it sees, JIT-compiles a PTX kernel through the driver (libnvidia-ptxjitcompiler) and times a
 * GPU-bound run of it: ITERS dependent FMAs per thread, 8 blocks of 256 threads per multiprocessor
 * (the FP32 units stay busy: about 64 * ITERS cycles per multiprocessor), checked against the same
 * arithmetic on the CPU (fmaf: IEEE fused multiply-add, as fma.rn.f32) for one thread. Built with gcc alone: gcc -O2 -o cuda-burn cuda-burn.c -ldl
 *
 * Usage: cuda-burn [ITERS] [REPEATS]   prints "devices=N name=... kernel_ms=X [X...]" and exits 0,
 * or a line starting "error:" and exits 1.
 */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUmodule;
typedef void *CUfunction;
typedef unsigned long long CUdeviceptr;

static const char PTX[] =
    ".version 6.0\n"
    ".target sm_50\n"
    ".address_size 64\n"
    ".visible .entry burn(.param .u64 out, .param .u32 iters)\n"
    "{\n"
    "  .reg .pred p;\n"
    "  .reg .f32 b, c;\n"
    "  .reg .b32 i, n, tid, bid, bdim, gid;\n"
    "  .reg .b64 ptr, off;\n"
    "  ld.param.u64 ptr, [out];\n"
    "  ld.param.u32 n, [iters];\n"
    "  cvta.to.global.u64 ptr, ptr;\n"
    "  mov.u32 tid, %tid.x;\n"
    "  mov.u32 bid, %ctaid.x;\n"
    "  mov.u32 bdim, %ntid.x;\n"
    "  mad.lo.u32 gid, bid, bdim, tid;\n"
    "  mov.f32 b, 0f3F7FFFF0;\n"
    "  mov.f32 c, 0f3F800000;\n"
    "  mov.u32 i, 0;\n"
    "LOOP:\n"
    "  fma.rn.f32 c, c, b, 0f3A83126F;\n"
    "  add.u32 i, i, 1;\n"
    "  setp.lt.u32 p, i, n;\n"
    "  @p bra LOOP;\n"
    "  mul.wide.u32 off, gid, 4;\n"
    "  add.u64 ptr, ptr, off;\n"
    "  st.global.f32 [ptr], c;\n"
    "  ret;\n"
    "}\n";

#define LOAD(name, sym)                                                                  \
    do {                                                                                 \
        *(void **)(&name) = dlsym(lib, sym);                                             \
        if (!name) { printf("error: %s not found in libcuda.so.1\n", sym); return 1; }  \
    } while (0)
#define CHECK(call)                                                                      \
    do {                                                                                 \
        CUresult r_ = (call);                                                            \
        if (r_ != 0) { printf("error: %s returned %d\n", #call, r_); return 1; }        \
    } while (0)

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    unsigned iters = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 10) : 20000000;
    int repeats = argc > 2 ? atoi(argv[2]) : 3;
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) { printf("error: dlopen libcuda.so.1: %s\n", dlerror()); return 1; }
    CUresult (*cuInit)(unsigned), (*cuDeviceGetCount)(int *), (*cuDeviceGet)(CUdevice *, int);
    CUresult (*cuDeviceGetName)(char *, int, CUdevice), (*cuDeviceGetAttribute)(int *, int, CUdevice);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice), (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuModuleLoadData)(CUmodule *, const void *);
    CUresult (*cuModuleGetFunction)(CUfunction *, CUmodule, const char *);
    CUresult (*cuMemAlloc)(CUdeviceptr *, size_t), (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t);
    CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                               unsigned, void *, void **, void **);
    CUresult (*cuCtxSynchronize)(void);
    LOAD(cuInit, "cuInit");
    LOAD(cuDeviceGetCount, "cuDeviceGetCount");
    LOAD(cuDeviceGet, "cuDeviceGet");
    LOAD(cuDeviceGetName, "cuDeviceGetName");
    LOAD(cuDeviceGetAttribute, "cuDeviceGetAttribute");
    LOAD(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    LOAD(cuCtxSetCurrent, "cuCtxSetCurrent");
    LOAD(cuModuleLoadData, "cuModuleLoadData");
    LOAD(cuModuleGetFunction, "cuModuleGetFunction");
    LOAD(cuMemAlloc, "cuMemAlloc_v2");
    LOAD(cuMemcpyDtoH, "cuMemcpyDtoH_v2");
    LOAD(cuLaunchKernel, "cuLaunchKernel");
    LOAD(cuCtxSynchronize, "cuCtxSynchronize");

    int count = 0, sms = 0;
    CUdevice device;
    CUcontext context;
    CUmodule module;
    CUfunction burn;
    char name[256] = "";
    CHECK(cuInit(0));
    CHECK(cuDeviceGetCount(&count));
    if (count < 1) { printf("error: no CUDA device visible\n"); return 1; }
    CHECK(cuDeviceGet(&device, 0));
    CHECK(cuDeviceGetName(name, sizeof name, device));
    CHECK(cuDeviceGetAttribute(&sms, 16 /* CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT */, device));
    CHECK(cuDevicePrimaryCtxRetain(&context, device));
    CHECK(cuCtxSetCurrent(context));
    CHECK(cuModuleLoadData(&module, PTX));
    CHECK(cuModuleGetFunction(&burn, module, "burn"));
    unsigned threads = 256, blocks = (unsigned)sms * 8;
    size_t bytes = (size_t)threads * blocks * sizeof(float);
    CUdeviceptr out;
    CHECK(cuMemAlloc(&out, bytes));
    void *params[] = {&out, &iters};
    /* Warm-up (JIT, clocks), then the timed runs. */
    CHECK(cuLaunchKernel(burn, blocks, 1, 1, threads, 1, 1, 0, NULL, params, NULL));
    CHECK(cuCtxSynchronize());
    printf("devices=%d name=%s sms=%d iters=%u kernel_ms=", count, name, sms, iters);
    for (int r = 0; r < repeats; r++) {
        double start = now_ms();
        CHECK(cuLaunchKernel(burn, blocks, 1, 1, threads, 1, 1, 0, NULL, params, NULL));
        CHECK(cuCtxSynchronize());
        printf("%s%.3f", r ? " " : "", now_ms() - start);
    }
    printf("\n");
    float first;
    CHECK(cuMemcpyDtoH(&first, out, sizeof first));
    float b, k, c = 1.0f;
    uint32_t b_bits = 0x3F7FFFF0u, k_bits = 0x3A83126Fu; /* the PTX's constants: 1 - 2^-20, 0.001 */
    memcpy(&b, &b_bits, sizeof b);
    memcpy(&k, &k_bits, sizeof k);
    for (unsigned i = 0; i < iters; i++) c = fmaf(c, b, k);
    if (fabsf(first - c) > 1e-3f * fabsf(c)) {
        printf("error: the GPU computed %g, the CPU %g\n", first, c);
        return 1;
    }
    return 0;
}
