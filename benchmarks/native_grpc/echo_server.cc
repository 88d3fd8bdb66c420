// A KServe v2 ModelInfer echo server on grpc++'s synchronous API: each call is answered with
// its own first input tensor (name, datatype, shape, raw bytes); no model, no batching. It
// measures what a native gRPC frontend costs per call (benchmarks/native_grpc/compare.py), to
// set against grpc.aio doing the same (benchmarks/prototype_grpc.py echo).
//
//   benchmarks/native_grpc/build.sh && benchmarks/native_grpc/build/echo_server [--threads N]
//
// Prints {"grpc": "127.0.0.1:PORT"} once bound; serves until SIGTERM.
#include <pthread.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>
#include <grpcpp/resource_quota.h>

#include "inference/grpc_service.grpc.pb.h"

namespace {

class EchoService final : public inference::GRPCInferenceService::Service {
  grpc::Status ModelInfer(grpc::ServerContext*, const inference::ModelInferRequest* request,
                          inference::ModelInferResponse* reply) override {
    if (request->inputs_size() < 1 || request->raw_input_contents_size() < 1) {
      return {grpc::StatusCode::INVALID_ARGUMENT, "echo needs one input in raw_input_contents"};
    }
    const auto& in = request->inputs(0);
    reply->set_model_name(request->model_name());
    reply->set_model_version("1");
    reply->set_id(request->id());
    auto* out = reply->add_outputs();
    out->set_name(in.name());
    out->set_datatype(in.datatype());
    *out->mutable_shape() = in.shape();
    *reply->add_raw_output_contents() = request->raw_input_contents(0);
    return grpc::Status::OK;
  }
};

std::unique_ptr<grpc::Server> g_server;

}  // namespace

int main(int argc, char** argv) {
  int threads = 0;  // 0: grpc++'s default sync-server thread pool
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--threads") == 0) threads = std::atoi(argv[i + 1]);
  }
  // SIGTERM/SIGINT blocked before grpc++ starts its threads (they inherit the mask), then
  // taken by sigwait below for an orderly Shutdown().
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  EchoService service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  if (threads > 0) {
    grpc::ResourceQuota quota("echo");
    quota.SetMaxThreads(threads + 1);
    builder.SetResourceQuota(quota);
    builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS, threads);
  }
  g_server = builder.BuildAndStart();
  if (!g_server || port == 0) {
    std::fprintf(stderr, "echo_server: could not bind 127.0.0.1:0\n");
    return 1;
  }
  std::printf("{\"grpc\": \"127.0.0.1:%d\"}\n", port);
  std::fflush(stdout);
  int sig = 0;
  sigwait(&set, &sig);
  g_server->Shutdown();
  return 0;
}
