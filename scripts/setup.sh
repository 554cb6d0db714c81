#!/usr/bin/env bash
# Install monai-gradicon into the current Python environment.
#   bash scripts/setup.sh        -> the package and its runtime dependencies
#   bash scripts/setup.sh test   -> plus pytest, jsonschema, tensorboard and the reference
#                                   implementation (icon_registration 1.1.9) used by the parity tests
# torch is pinned through constraints.txt on every path: an unpinned torch pulls GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q -c constraints.txt"
$PIP torch==2.13.0
if [ "${1:-}" = "test" ]; then
    $PIP -e ".[test]"
    # The reference's declared dependencies (itk, torchvision, girder_client) are not needed by the modules
    # the parity tests import, and torchvision has no CPU build here: install it without them.
    $PIP matplotlib tqdm
    python -m pip install --disable-pip-version-check -q --no-deps icon_registration==1.1.9
else
    $PIP -e .
fi
python -c "import torch, monai, monai_gradicon; print('monai-gradicon ready: torch', torch.__version__, 'monai', monai.__version__)"
