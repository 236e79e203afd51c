#!/usr/bin/env bash
# The throughput benchmark (bench_throughput.py) on a GPU machine, in under 8 minutes.
#
#   bash benchmarks/gpu.sh          # from the repo root, with the wheels below in .whl/
#
# Writes throughput_gpu.json and throughput_gpu.txt to $OUT if it is set, else to benchmarks/.
# The machine is expected to have Python 3.12, a CUDA build of jax with flax, optax,
# orbax-checkpoint, numpy, absl-py, etils, protobuf and (optional) torch, and no internet. What
# `import scaling.training.train` needs beyond that comes as wheels in .whl/ (not committed), fetched on a
# machine with PyPI by:
#   for w in ml_collections==1.1.0 tensorboardX==2.6.5 tensorflow-datasets==4.9.10 \
#            tensorflow-metadata==1.21.0 toml==0.10.2 wrapt==2.1.2 immutabledict==4.3.1 \
#            tqdm==4.70.1 six==1.17.0 protobuf==7.36.2; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl "$w"; done
#   python3 -m pip wheel --no-deps -w .whl promise==2.3      # sdist only: a pure-Python wheel
# (protobuf is pinned to the version tensorflow-metadata's generated code was checked with; TFDS's
# array_record, importlib_resources, pyarrow, ... are not imported: the benchmark makes its data.)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
DEST=${OUT:-benchmarks}
mkdir -p "$DEST"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
# Which float32 precision XLA uses by default (TF32 on recent GPUs?): a matmul at both settings.
python3 - <<'EOF' 2>&1 | tee "$DEST/matmul_gpu.txt"
import time, jax, jax.numpy as jnp
x = jnp.ones((8192, 8192), jnp.float32)
for precision in ("default", "highest"):
  f = jax.jit(lambda a: jnp.matmul(a, a, precision=None if precision == "default" else precision))
  f(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(10):
    y = f(x)
  y.block_until_ready()
  print(f"f32 matmul 8192^3, precision={precision}: "
        f"{10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12:.1f} TFLOP/s")
EOF
# H200 peaks (dense): fp32 ~67, TF32 ~495, bf16 ~990 TFLOP/s. The models hold float32, but XLA's
# default precision runs their matmuls and convolutions in TF32 there (the check above measured
# 442 TFLOP/s at the default precision, 52 at 'highest'): the MFU printed is against TF32's peak;
# the JSON keeps TFLOP/s for any other.
timeout 420 python3 benchmarks/bench_throughput.py --peak_tflops=495 --segment_examples=60000 \
    --out="$DEST/throughput_gpu.json" "$@" 2>&1 | grep -v '^WARNING:absl' \
    | tee "$DEST/throughput_gpu.txt"
