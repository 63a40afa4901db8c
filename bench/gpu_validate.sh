#!/usr/bin/env bash
# Run bench/gpu_validate.py on a GPU machine without network: install the wheels carried in .whl/
# (bitsandbytes, cupti-python; see docs/gpu-validation.md) into $SITE once, then run the parts asked for.
# Arguments go to gpu_validate.py (--parts a-e  --deadline-s 260  --plan  --dry-run). With OUT set,
# the summary and an archive of the raw files are written there. --dry-run installs nothing.
set -u
export GPU_VALIDATE_T0=${GPU_VALIDATE_T0:-$(date +%s)}  # the call's deadline counts from here
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
case " $* " in
*" --dry-run "* | *" --plan "*) ;;
*)
    if compgen -G ".whl/*.whl" >/dev/null; then
        wheels=$(cd .whl && ls -1 ./*.whl | sort | tr '\n' ' ')
        if [ "$(cat "$SITE/.carried-wheels" 2>/dev/null)" != "$wheels" ]; then
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
                && echo "$wheels" >"$SITE/.carried-wheels" \
                || echo "gpu_validate.sh: installing the carried wheels failed; running with what is installed" >&2
        fi
    else
        echo "gpu_validate.sh: no wheels in .whl/; running with what is installed" >&2
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    ;;
esac
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_validate.py "$@"
