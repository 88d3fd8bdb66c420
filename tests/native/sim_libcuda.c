/*
 * A *simulated* NVIDIA driver library (the part of libcuda.so.1's driver API that
 * hal.probe calls), for testing the CUDA probe on hosts without a GPU.
 *
 *   SIM_CUDA_INIT_RESULT  the CUresult cuInit returns (default 0, CUDA_SUCCESS)
 *   SIM_CUDA_DEVICES      how many devices the driver reports (default 1)
 *
 * Every simulated device is "Simulated GPU", 8 GiB, compute capability 8.6.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;

static int env_int(const char* name, int fallback) {
  const char* v = getenv(name);
  return (v && *v) ? atoi(v) : fallback;
}

CUresult cuInit(unsigned int flags) { (void)flags; return env_int("SIM_CUDA_INIT_RESULT", 0); }

CUresult cuDriverGetVersion(int* version) { *version = 12040; return 0; }

CUresult cuGetErrorName(CUresult error, const char** name) {
  switch (error) {
    case 0: *name = "CUDA_SUCCESS"; return 0;
    case 100: *name = "CUDA_ERROR_NO_DEVICE"; return 0;
    case 999: *name = "CUDA_ERROR_UNKNOWN"; return 0;
    default: *name = NULL; return 1; /* CUDA_ERROR_INVALID_VALUE */
  }
}

CUresult cuDeviceGetCount(int* count) { *count = env_int("SIM_CUDA_DEVICES", 1); return 0; }

CUresult cuDeviceGet(CUdevice* device, int ordinal) {
  if (ordinal < 0 || ordinal >= env_int("SIM_CUDA_DEVICES", 1)) return 101;
  *device = ordinal;
  return 0;
}

CUresult cuDeviceGetName(char* name, int len, CUdevice device) {
  (void)device;
  strncpy(name, "Simulated GPU", (size_t)len - 1);
  name[len - 1] = '\0';
  return 0;
}

CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice device) {
  (void)device;
  *bytes = (size_t)8 << 30;
  return 0;
}

CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice device) {
  (void)device;
  if (attribute == 75) { *value = 8; return 0; }
  if (attribute == 76) { *value = 6; return 0; }
  return 1;
}
