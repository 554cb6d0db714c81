#!/usr/bin/env bash
# Prepare what bench/gpu_check.sh needs on the lent GPU machine, which has Python 3.12 with torch, numpy, scipy,
# matplotlib, tqdm, tensorboard and pytest, but can download nothing:
#
#   .whl/       wheels of the packages it lacks (Python 3.12, manylinux x86_64; all of these are pure Python)
#   .gpu_data/  a small real CT pair for the end-to-end `register` case (lung1 -> fixed, lung2 -> moving, from
#               ../shared/data/lung_ct_pyradiomics, in-plane every 2nd voxel, as NIfTI)
#
# Both folders are added to the repository's local ignore file (.git/info/exclude, never committed), so they travel
# only when the device call names them in `carry` (see bench/README.md, "GPU check").
#
#   bash bench/gpu_wheels.sh            # from the repository root, with the project's Python environment active
#
# Idempotent: existing wheels of the pinned versions are kept; the data are rewritten.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=.whl
DATA=.gpu_data
SHARED=${SHARED_DATA:-../shared/data}

# name==version of every package the GPU image lacks (checked against KINDS.md's package list). The versions are the
# ones this project is tested with here; their Requires-Dist are listed below and are all on the image except these.
PACKAGES=(
  monai==1.6.1              # Requires-Dist: torch, numpy (on the image)
  nibabel==5.4.2            # numpy, packaging; typing-extensions for Python < 3.13 (on the image)
  pytorch-ignite==0.5.5     # torch, packaging (on the image)
  fire==0.7.1               # termcolor (below)
  termcolor==3.3.0          # none
  icon_registration==1.1.9  # the reference, for the training comparison; installed without its dependencies as
                            # everywhere in this project (its import needs torch, numpy, matplotlib, tqdm only)
)

git_exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || echo .git/info/exclude)
mkdir -p "$(dirname "$git_exclude")"
for line in "/$WHEELS/" "/$DATA/"; do
  grep -qxF "$line" "$git_exclude" 2>/dev/null || echo "$line" >>"$git_exclude"
done

mkdir -p "$WHEELS"
for spec in "${PACKAGES[@]}"; do
  name=${spec%%==*}
  version=${spec##*==}
  stem=$(echo "$name" | tr '-' '_')
  if compgen -G "$WHEELS/${stem}-${version}-*.whl" >/dev/null; then
    continue
  fi
  # one version of each package: an older wheel of the same name would stop the whole install there
  rm -f "$WHEELS/${stem}"-*.whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --constraint /dev/null -d "$WHEELS" "$spec" \
    2> >(grep -v "is neither a file nor a directory" >&2)
done

echo "Requires-Dist of the carried wheels (besides extras; the GPU image must hold each one, or it is carried):"
for whl in "$WHEELS"/*.whl; do
  deps=$(unzip -p "$whl" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^Requires-Dist: //' |
    tr '\n' ';' || true)
  echo "  $(basename "$whl"): ${deps:-none}"
done

# the real CT pair: lung1 (fixed) and lung2 (moving), every 2nd voxel in-plane (256 x 256 x Z, ~1.5 x 1.5 x 2.5 mm)
if [ -f "$SHARED/lung_ct_pyradiomics/lung1_image.nrrd" ]; then
  rm -rf "$DATA"
  mkdir -p "$DATA"
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$SHARED/lung_ct_pyradiomics" "$DATA" <<'EOF'
import sys

import numpy as np

from monai_gradicon.io import read_image, write_nifti

src, dst = sys.argv[1], sys.argv[2]
for name, out in (("lung1_image.nrrd", "fixed.nii.gz"), ("lung2_image.nrrd", "moving.nii.gz")):
    img = read_image(f"{src}/{name}")
    step = 2
    arr = np.ascontiguousarray(img.array[::step, ::step, :]).astype(np.int16)
    aff = img.affine.copy()
    aff[:3, :3] = img.affine[:3, :3] @ np.diag([step, step, 1])
    write_nifti(f"{dst}/{out}", arr, aff)
    print(f"  {dst}/{out}: {arr.shape} from {name}, voxel {np.round(np.linalg.norm(aff[:3, :3], axis=0), 2)} mm")
EOF
else
  echo "No $SHARED/lung_ct_pyradiomics: $DATA not written (gpu_check.py then registers a synthetic phantom pair)." >&2
fi

du -sh "$WHEELS" "$DATA" 2>/dev/null || true
