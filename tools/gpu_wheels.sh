#!/usr/bin/env bash
# Download the wheels that tools/gpu_check.sh installs on the offline GPU machine (Python 3.12, x86-64) into
# wheelhouse/ (git-ignored; name it in the device tool's `carry`). Run it here, where PyPI is reachable:
#
#   bash tools/gpu_wheels.sh [DEST]        # DEST defaults to wheelhouse; PYTHON=... picks the pip (python3)
#
# On the GPU machine gpu_check.sh installs only the wheels whose distributions are missing there, so a wheel of a
# package it already has costs nothing but space. The versions are the ones this project's .venv tests against.
# Pure-Python wheels first; the few compiled ones (Pillow, PyYAML, regex: normally there already, beside torchvision
# and transformers) for CPython 3.12 manylinux x86-64. Not carried: huggingface-hub (transformers' own dependency,
# so it is there; diffusers 0.42 needs >= 1.32) and deepspeed (builds kernels; the zero tests skip without it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST=${1:-wheelhouse}
PY=${PYTHON:-python3}

PURE=(
    # the tests
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0 pytest-timeout==2.4.0
    # the data pipeline (the loader reads latent shards through webdataset)
    webdataset==1.0.2 braceexpand==0.1.7
    # bench_train --compare diffusers, and what `import diffusers` checks or imports beside transformers' packages
    diffusers==0.42.1 importlib-metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0 requests==2.34.2
    charset-normalizer==3.5.3 idna==3.20 urllib3==2.8.0 certifi==2026.10.19.post1 filelock==4.3.1 tqdm==4.70.1
)
COMPILED=(pillow==13.0.0 pyyaml==6.0.4 regex==2026.11.19)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two of one package stop the install there
"$PY" -m pip download -q --no-deps --only-binary=:all: --implementation py --abi none --platform any \
    --python-version 3.12 -d "$DEST" "${PURE[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp --abi cp312 --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${COMPILED[@]}"
ls -1 "$DEST"
size_kib=$(du -sk "$DEST" | cut -f1)
whls=("$DEST"/*.whl)
echo "${#whls[@]} wheels, $((size_kib / 1024)) MiB in $DEST"
if ((size_kib > 40 * 1024)); then
    echo "gpu_wheels.sh: $DEST is over 40 MiB; the working tree that travels to the GPU machine is 64 MiB in all" >&2
    exit 1
fi
