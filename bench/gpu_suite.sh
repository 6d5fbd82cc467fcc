#!/usr/bin/env bash
# Every GPU measurement of bench/RESULTS.md in one run, JSON under OUT:
#   bash bench/gpu_suite.sh OUT [SHAPES]
# Needs mamba_ssm importable, and the server's packages for the HTTP step (on a machine without them, install
# the wheels that bench/server_wheels.sh downloads). Runs the GPU tests first; each step is independent and the
# run goes on if one fails. SHAPES are Mamba1 shapes; decode and prefill also run the Mamba2 ones, and the HTTP
# streams run with the decode overlap on and off, with SSM states in float32 (not the model's dtype), over four HTTP
# processes, four decode steps a launch, and (on a machine with several GPUs) over one engine per GPU.
set -uo pipefail
out=${1:?usage: bash bench/gpu_suite.sh OUT [SHAPES]} shapes=${2:-130m,1.4b}
mkdir -p "$out"
python3 -c "import torch, mamba_ssm; print(torch.__version__, torch.cuda.get_device_name(), mamba_ssm.__version__)"
timeout 480 python3 -m pytest -q tests/gpu tests/runtime/test_triton_decode.py tests/runtime/test_triton_channels.py \
  tests/runtime/test_triton_int8.py tests/runtime/test_triton_mamba2.py tests/runtime/test_triton_scan_state.py \
  tests/runtime/test_triton_short_scan.py tests/runtime/test_triton_short_conv.py \
  tests/runtime/test_state_dtype.py tests/server/test_overlap_decode.py tests/server/test_engine_on_device.py \
  > "$out/tests.txt" 2>&1; grep -E "FAILED|passed|failed" "$out/tests.txt" | tail -15
python3 -m bench.gpu_decode --shapes "$shapes,mamba2-780m,mamba2-2.7b" --batch 64 --json "$out/decode.json" 2>&1 \
  | grep -v Warning | tail -8
python3 -m bench.gpu_kernels --shapes "$shapes" --json "$out/kernels.json" 2>&1 | tail -7
python3 -m bench.gpu_short_scan --shapes "$shapes,mamba2-780m,mamba2-2.7b" --json "$out/short_scan.json" 2>&1 | tail -24
python3 -m bench.gpu_profile --shape 130m --tokens 8192 --json "$out/profile.json" 2>&1 | grep -v -e Warning -e USDT | tail -90
python3 -m bench.gpu_prefill --shapes "$shapes,mamba2-780m,mamba2-2.7b" --lengths 2048,8192,32768,65536 --rounds 9 \
  --json "$out/prefill.json" | tail -18
python3 -m bench.gpu_prefill --shapes "$shapes" --lengths 61440 --chunks 2048,8192,16384 --rounds 3 \
  --json "$out/prefill_chunks.json" | tail -4
python3 -m bench.quant_decode --shapes "$shapes" --device cuda --json "$out/quant.json" | tail -8
for temperature in 0 0.8; do  # the engine alone against its runner: what its books add to a step
  python3 -m bench.engine_steps --shape 130m --device cuda --batch 1,64,256 --temperature $temperature --profile \
    --json "$out/engine_steps_t$temperature.json" -- --max-batch-size 256 --max-queue 256 2>&1 | grep -v " INFO " | tail -40
done
for lengths in 32-96 100-1000; do  # a burst of prompts of different lengths: padded rows against one length
  python3 -m bench.prefill_burst --shape 130m --device cuda --requests 64 --prompt-tokens $lengths \
    --json "$out/prefill_burst_$lengths.json" -- --max-batch-size 256 2>&1 | grep -v " INFO " | tail -6
done
for shape in ${shapes//,/ }; do  # a served prefill step of B short prompts, graph and eager, by B
  python3 -m bench.prefill_steps --shape "$shape" --json "$out/prefill_steps_$shape.json" 2>&1 | tail -16
done
for shape in ${shapes//,/ }; do  # short prefill steps replayed as CUDA graphs against launched one by one
  python3 -m bench.prefill_burst --shape "$shape" --device cuda --compare graphs --requests 64 --prompt-tokens 32-96 \
    --json "$out/prefill_graphs_$shape.json" -- --max-batch-size 256 2>&1 | grep -v " INFO " | tail -6
done
python3 -m bench.http_ttft --shape 130m --device cuda --tokens 60000 --race --json "$out/http_ttft.json" 2>&1 \
  | grep -v " INFO " | tail -2
for shape in ${shapes//,/ }; do
  for setting in "overlap-decode on" "overlap-decode off" "mamba-ssm-cache-dtype float32" "api-server-count 4"; do
    python3 -m bench.http_throughput --shape "$shape" --device cuda --prompt-tokens 1000 --streams 1,8,32,64,256 \
      --json "$out/http_${shape}_${setting// /_}.json" -- --max-batch-size 256 --max-queue 256 \
      --${setting% *} "${setting#* }" 2>&1 | grep -v " INFO " | tail -8
  done
  # issue 22's bars: 64-token prompts, with and without the prefill graphs, a burst's requests taken in by two
  # HTTP processes, and one decode step a launch (against the default's adapted count)
  for setting in "" --eager-prefill "--api-server-count 2" "--num-scheduler-steps 1"; do
    python3 -m bench.http_throughput --shape "$shape" --device cuda --prompt-tokens 64 --streams 1,64,256 --rounds 2 \
      --json "$out/http_${shape}_64${setting// /_}.json" -- --max-batch-size 256 --max-queue 256 $setting 2>&1 \
      | grep -v " INFO " | tail -8
  done
done
# Several GPUs (a multi-GPU machine only): the same streams over --data-parallel-size engines, one per GPU; the
# bench's engine peer is one engine, so its ratio reads as how many engines' worth HTTP delivers
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -gt 1 ]; then
  for shape in ${shapes//,/ }; do
    python3 -m bench.http_throughput --shape "$shape" --device cuda --prompt-tokens 1000 --streams 64,256,512 \
      --json "$out/http_${shape}_dp${gpus}.json" -- --max-batch-size 256 --max-queue 512 \
      --data-parallel-size "$gpus" 2>&1 | grep -v " INFO " | tail -6
  done
fi
