#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU, the project's dependencies and ../shared/datasets:
#   bash bench/gpu_run.sh OUT_DIR STEP...
# Steps, in the order given, each with its log in OUT_DIR/<step>.log:
#   info     the GPU, the driver and the Python packages that matter
#   tests    the service's tests (tests/app, tests/contract): the service picks the GPU itself (DEVICE=auto)
#   photos   bench.photos_bench (12 Mpx photos, the decompression flood)
#   service  bench.service_bench
#   peers    bench.peers (siamcam against LitServe on the same model)
#   compiled issue 23: bench.compiled_bench on the GPU (the default model's backbone compiled for this GPU's
#            architecture into a temporary cache, then its model work against TorchScript's, and the package's
#            features run directly against replayed from a CUDA graph: whether the service should capture one)
#   precision issue 22: bench.precision_bench on the GPU (the default model's test split scored in fp32, bf16 and
#            fp16: each one's score differences from fp32, flipped decisions and pairs/s at batches of 64)
#   decode   issue 22: bench.decode_device_bench on the GPU (DECODE_DEVICE=cuda: 12 Mpx JPEGs decoded by nvJPEG
#            against Pillow's draft decoding on one core, the pictures' differences, and the default model's test
#            split scored from each)
#   lite2    issue 9's GPU run: EfficientNet-Lite2 fine-tuned at 260 px on flowers with the default model's
#            recipe, exported to a temporary folder (its manifest copied to OUT_DIR/lite2_manifest.json)
#   lite1    the same recipe with EfficientNet-Lite1 at 240 px (the largest step a 2-core CPU could afford)
#   fronts   issue 22: bench.fronts_bench --scaling --gpu: the nearly free model with 1, 2, 4, 8 front processes,
#            wrk on two cores of its own and the service on the others (8 fronts >= 4x 1 front); the default model
#            on CUDA with HTTP_WORKERS=min(CPUs-1, 8), /similarity and /explain at 64 connections beside the raw
#            model at the batch they formed (>= 1,000 and >= 400 pairs/s); about 4 minutes
#   fronts-cpu  bench.fronts_bench --light --default on this machine's cores: siamcam's HTTP_WORKERS against
#            LitServe's layouts (nearly free model), and the default model at 1, 8, 32 connections; about 8 minutes
# The fronts steps need `wrk` (Debian's package). Where it is not installed, carry it in an ignored folder:
#   mkdir -p .wrk && cp /usr/bin/wrk /lib/x86_64-linux-gnu/libluajit-5.1.so.2 .wrk/ && echo /.wrk/ >>.git/info/exclude
# and run with WRK=.wrk/wrk LD_LIBRARY_PATH=.wrk bash bench/gpu_run.sh OUT fronts.
# Figures measured with it, and how, are in bench/RESULTS.md ("On a GPU") and model_store/README.md.
set -uo pipefail
out=$(realpath "$1")
shift
python=${PYTHON:-python3}
flowers=${FLOWERS:-../shared/datasets/flowers}
work=$(mktemp -d)
TIMEFORMAT="wall %R s"

train() {  # name backbone input_size: the default model's recipe (bench/paper_table.py), with this backbone and size
    local model_dir="$work/$1-model" recipe
    recipe=$("$python" -c 'from bench.paper_table import DEFAULT_RECIPE, RECIPES; print(*RECIPES[DEFAULT_RECIPE])') || return
    # shellcheck disable=SC2086  # the recipe is words without spaces; the later --backbone and --input-size win
    time "$python" -m training train --data "$flowers" --name "flowers-$1" $recipe --backbone "$2" --input-size "$3" \
        --device cuda --output "$model_dir" --checkpoint-dir "$work/$1-runs" \
        && cp "$model_dir/manifest.json" "$out/$1_manifest.json"
}

status=0
for step in "$@"; do
    started=$(date +%s)
    case "$step" in
        info) { nvidia-smi; "$python" -c 'import sys, torch, torchvision, PIL, cv2, numpy; print(sys.version);
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name());
print("torchvision", torchvision.__version__, "pillow", PIL.__version__, "opencv", cv2.__version__,
      "numpy", numpy.__version__)'; nproc; } ;;
        tests) # the schema fuzz test needs schemathesis (test extra), which a bare GPU image may lack
               "$python" -m pytest tests/app tests/contract -q -p no:cacheprovider -rs --durations=10 \
                   $("$python" -c 'import schemathesis' 2>/dev/null || echo --ignore tests/app/test_schema_fuzz.py) ;;
        photos) "$python" -m bench.photos_bench ;;
        service) "$python" -m bench.service_bench ;;
        peers) "$python" -m bench.peers ;;
        compiled) XDG_CACHE_HOME="$work/cache" "$python" -m bench.compiled_bench --device cuda --skip-service ;;
        precision) "$python" -m bench.precision_bench --device cuda --data "$flowers" ;;
        decode) "$python" -m bench.decode_device_bench --device cuda --data "$flowers" ;;
        lite2) train lite2 efficientnet_lite2 260 ;;
        lite1) train lite1 efficientnet_lite1 240 ;;
        fronts) "$python" -m bench.fronts_bench --scaling --gpu ;;
        fronts-cpu) "$python" -m bench.fronts_bench --light --default ;;
        *) echo "unknown step $step"; false ;;
    esac > "$out/$step.log" 2>&1
    code=$?
    echo "step $step: exit $code in $(( $(date +%s) - started )) s" | tee -a "$out/$step.log"
    [ "$code" = 0 ] || status=$code
done
exit $status
