/*
 * A *simulated* Edge TPU delegate for edged's tests: a shared library that implements
 * LiteRT's external delegate ABI (tensorflow/lite/delegates/external/
 * external_delegate_interface.h) the way libedgetpu.so.1 does, without any hardware.
 *
 *   SIM_EDGETPU_DEVICES  comma-separated devices that "exist", e.g. "usb:0,pci:0";
 *                        unset or empty: none, so every open is refused (as libedgetpu
 *                        refuses when no TPU is plugged in).
 *   SIM_EDGETPU_LOG      a file to append one line per call to: create / prepare / destroy.
 *
 * The "device" option selects a device like libedgetpu's: "" (the first), "usb", "pci",
 * "usb:N", "pci:N" or ":N" (the Nth of any type). When the device exists the delegate
 * attaches: its Prepare is called by the interpreter and claims no node, so the CPU runs
 * the whole graph. When it does not, tflite_plugin_create_delegate reports an error through
 * the callback and returns NULL, and load_delegate raises ValueError.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct TfLiteContext TfLiteContext;
typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;

/* tensorflow/lite/core/c/common.h: the C ABI is stable. */
typedef struct TfLiteDelegate {
  void* data_;
  TfLiteStatus (*Prepare)(TfLiteContext* context, struct TfLiteDelegate* delegate);
  void* CopyFromBufferHandle;
  void* CopyToBufferHandle;
  void* FreeBufferHandle;
  int64_t flags;
  void* opaque_delegate_builder;
} TfLiteDelegate;

typedef struct {
  char device[64];
} SimState;

static void log_line(const char* fmt, const char* arg) {
  const char* path = getenv("SIM_EDGETPU_LOG");
  if (path == NULL || *path == '\0') return;
  FILE* f = fopen(path, "a");
  if (f == NULL) return;
  fprintf(f, fmt, arg);
  fputc('\n', f);
  fclose(f);
}

static TfLiteStatus prepare(TfLiteContext* context, TfLiteDelegate* delegate) {
  (void)context;
  log_line("prepare %s", ((SimState*)delegate->data_)->device);
  return kTfLiteOk; /* claims no node: the CPU kernels run the graph */
}

/* The device `wanted` selects among SIM_EDGETPU_DEVICES, copied into `out`; 0 if none. */
static int select_device(const char* wanted, char* out, size_t size) {
  const char* env = getenv("SIM_EDGETPU_DEVICES");
  if (env == NULL || *env == '\0') return 0;
  char list[512];
  strncpy(list, env, sizeof(list) - 1);
  list[sizeof(list) - 1] = '\0';
  const char* colon = strchr(wanted, ':');
  size_t type_len = colon ? (size_t)(colon - wanted) : strlen(wanted);
  long index = colon ? strtol(colon + 1, NULL, 10) : 0;
  long seen = 0;
  char* save = NULL;
  for (char* item = strtok_r(list, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
    if (type_len > 0 && strncmp(item, wanted, type_len) != 0) continue;
    if (type_len > 0 && item[type_len] != ':') continue;
    if (seen++ == index) {
      strncpy(out, item, size - 1);
      out[size - 1] = '\0';
      return 1;
    }
  }
  return 0;
}

TfLiteDelegate* tflite_plugin_create_delegate(char** keys, char** values, size_t n,
                                              void (*report_error)(const char*)) {
  const char* wanted = "";
  for (size_t i = 0; i < n; i++) {
    if (strcmp(keys[i], "device") == 0) wanted = values[i];
  }
  log_line("create %s", *wanted ? wanted : "(first)");
  char device[64];
  if (!select_device(wanted, device, sizeof(device))) {
    char message[160];
    snprintf(message, sizeof(message),
             "simulated Edge TPU: failed to open device '%s': no such device",
             *wanted ? wanted : "(first)");
    if (report_error) report_error(message);
    return NULL;
  }
  SimState* state = calloc(1, sizeof(SimState));
  TfLiteDelegate* delegate = calloc(1, sizeof(TfLiteDelegate));
  if (state == NULL || delegate == NULL) {
    free(state);
    free(delegate);
    if (report_error) report_error("simulated Edge TPU: out of memory");
    return NULL;
  }
  strncpy(state->device, device, sizeof(state->device) - 1);
  delegate->data_ = state;
  delegate->Prepare = prepare;
  return delegate;
}

void tflite_plugin_destroy_delegate(TfLiteDelegate* delegate) {
  if (delegate == NULL) return;
  log_line("destroy %s", ((SimState*)delegate->data_)->device);
  free(delegate->data_);
  free(delegate);
}
