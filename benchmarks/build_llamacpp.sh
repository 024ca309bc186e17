#!/usr/bin/env bash
# Build llama.cpp's CPU tools (perplexity, imatrix, quantize, bench, completion) from the C++ source
# vendored in the llama-cpp-python sdist, into $CLOQ_CACHE_DIR/llama.cpp/<version>/bin.
# Not part of the default set-up: `cloq bench gguf` needs it and says to run this when the tools are absent.
#
#   bash benchmarks/build_llamacpp.sh            # idempotent: a finished build is reused
#   LLAMACPP_VERSION=0.3.36 JOBS=2 bash benchmarks/build_llamacpp.sh
#   LLAMACPP_SDIST=/path/llama_cpp_python-0.3.36.tar.gz bash ...   # use an sdist already downloaded
#
# Only these targets are built (a full `pip wheel llama-cpp-python` took 9.4 min on 2 cores); the build
# runs under `nice -n 10` so it does not starve other work on a shared machine.
set -euo pipefail

VERSION="${LLAMACPP_VERSION:-0.3.36}"
CACHE="${CLOQ_CACHE_DIR:-$HOME/.cache/cloq_engine}"
ROOT="$CACHE/llama.cpp/$VERSION"
JOBS="${JOBS:-2}"
PIP="${PIP:-python3 -m pip}"
TARGETS=(llama-perplexity llama-imatrix llama-quantize llama-bench llama-completion llama-tokenize)

have_all() {
    for t in "${TARGETS[@]}"; do [ -x "$ROOT/bin/$t" ] || return 1; done
}
if have_all; then
    echo "llama.cpp $VERSION tools already built in $ROOT/bin"
    exit 0
fi

for tool in cmake c++; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install cmake g++)" >&2; exit 2; }
done
mkdir -p "$ROOT"

# 1. the sdist (pip fetches it from the configured index; no binaries)
SDIST="${LLAMACPP_SDIST:-}"
if [ -z "$SDIST" ]; then
    SDIST="$(ls "$ROOT"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)"
fi
if [ -z "$SDIST" ]; then
    $PIP download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$ROOT.partial-dl"
    mv "$ROOT.partial-dl"/llama_cpp_python-"$VERSION".tar.gz "$ROOT"/
    rmdir "$ROOT.partial-dl"
    SDIST="$ROOT/llama_cpp_python-$VERSION.tar.gz"
fi

# 2. its vendored llama.cpp source
SRC="$ROOT/src"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    rm -rf "$ROOT/src.partial"
    mkdir -p "$ROOT/src.partial"
    tar xzf "$SDIST" -C "$ROOT/src.partial" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp"
    mv "$ROOT/src.partial" "$SRC"
fi

# 3. configure and build only the tools (a re-run resumes an interrupted build)
BUILD="$ROOT/build"
cmake -S "$SRC" -B "$BUILD" -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF >"$ROOT/configure.log"
nice -n 10 cmake --build "$BUILD" -j "$JOBS" --target "${TARGETS[@]}"

mkdir -p "$ROOT/bin"
for t in "${TARGETS[@]}"; do
    cp "$BUILD/bin/$t" "$ROOT/bin/$t.partial" && mv "$ROOT/bin/$t.partial" "$ROOT/bin/$t"
done
echo "llama.cpp $VERSION tools built in $ROOT/bin: ${TARGETS[*]}"
