#!/usr/bin/env bash
# Repeat `python -m shiva_export check --out /tmp/a06 --seed 0` with Polygraphy and trtexec.
# Written by shiva_export 0.1.0. Inputs: a 28-step sampling trajectory (seed 0, CFG scale 7) captured with the PyTorch static-mode model;
# reference outputs: runner 'torch-static'. Gate (fp16): cosine >= 0.9999, psnr dB >= 45, agreement % >= 99.9.
# Polygraphy compares the outputs both runs have: the debug graphs also return indices_layer{l} (exact).
set -euo pipefail
cd "$(dirname "$0")/.."
# the polygraphy of the Python that wrote this script (no venv on PATH needed); POLYGRAPHY=... overrides
PY=/opt/torch/.venv/bin/python3
POLYGRAPHY=${POLYGRAPHY:-"$(dirname "$PY")/polygraphy"}
[ -x "$POLYGRAPHY" ] || { echo "polygraphy not found at $POLYGRAPHY; set POLYGRAPHY=/path/to/polygraphy" >&2; exit 2; }

# bucket 0: steps 0-27, k=[4096, 2483, 2483, 2483, 2483, 2483, 2483, 2483, 2483, 2483, 2483, 2483, 2483, 2483, 2483, 2483, 2483, 2483, 2483, 2483, 2483, 2483, 2483, 2483]
"$POLYGRAPHY" run onnx/b0.debug.onnx --onnxrt --load-inputs check/bucket0/inputs.json --load-outputs check/bucket0/reference.json --atol 0.02 --rtol 0.02 --check-error-stat max
# with TensorRT (precision comes from the graph's dtypes):
# "$POLYGRAPHY" run onnx/b0.onnx --trt --strongly-typed --load-inputs check/bucket0/inputs.json --load-outputs check/bucket0/reference.json --atol 0.02 --rtol 0.02 --check-error-stat max
# trtexec, one run per step (raw inputs in the layout of polygraphy --save-input-blob; compare its exported 'sample' with check/bucket0/reference/<step>/sample.bin):
# for d in check/bucket0/inputs/*/; do trtexec --onnx=onnx/b0.onnx --stronglyTyped \
#     --loadInputs='hidden_states':"${d}hidden_states.bin",'encoder_hidden_states':"${d}encoder_hidden_states.bin",'pooled_projections':"${d}pooled_projections.bin",'timestep':"${d}timestep.bin" --exportOutput="${d%/}.trtexec.json"; done

# engine sets checked by shiva_export: ort
