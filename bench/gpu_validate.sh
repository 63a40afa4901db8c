#!/usr/bin/env bash
# Run bench/gpu_validate.py on a GPU machine without network: install the wheels carried in .whl/
# (bitsandbytes, cupti-python, pytest; see docs/gpu-validation.md) into $SITE, then run every part.
# Arguments go to gpu_validate.py (--parts b,c  --budget-scale 0.5  --plan).
set -u
cd "$(dirname "$0")/.."
SITE=${SITE:-/tmp/site}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || echo "gpu_validate.sh: installing the carried wheels failed; running with what is installed" >&2
else
    echo "gpu_validate.sh: no wheels in .whl/; running with what is installed" >&2
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec python3 bench/gpu_validate.py "$@"
