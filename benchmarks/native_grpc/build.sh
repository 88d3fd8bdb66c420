#!/bin/sh
# Builds benchmarks/native_grpc/build/echo_server from protos/ against the OS's grpc++ and
# protobuf (Debian/Ubuntu: apt-get install -y g++ pkg-config libgrpc++-dev libprotobuf-dev
# protobuf-compiler protobuf-compiler-grpc). Prints the build's wall time; not part of `make test`.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out="$here/build"
mkdir -p "$out/gen"
for tool in protoc grpc_cpp_plugin pkg-config g++; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool missing (see the comment above)" >&2; exit 1; }
done
started=$(date +%s.%N)
protoc -I "$root/protos" --cpp_out="$out/gen" --grpc_out="$out/gen" \
    --plugin=protoc-gen-grpc="$(command -v grpc_cpp_plugin)" \
    "$root/protos/inference/grpc_service.proto" "$root/protos/inference/model_config.proto"
# shellcheck disable=SC2046  # pkg-config prints several flags on purpose
g++ -O2 -std=c++17 -pthread -I "$out/gen" -o "$out/echo_server" "$here/echo_server.cc" \
    "$out/gen/inference/grpc_service.pb.cc" "$out/gen/inference/grpc_service.grpc.pb.cc" \
    "$out/gen/inference/model_config.pb.cc" $(pkg-config --cflags --libs grpc++ protobuf)
finished=$(date +%s.%N)
awk -v a="$started" -v b="$finished" -v f="$out/echo_server" 'BEGIN { printf "built %s in %.1f s\n", f, b - a }' >&2
