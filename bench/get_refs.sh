#!/usr/bin/env bash
# Lays out the reference trainers and the wheels the GPU machine lacks under bench/refs/ (ignored by
# git: their code is never committed). Needs the two repositories already mirrored on this machine
# (the search tool's `fetch github:huggingface/diffusers` and `fetch github:kohya-ss/sd-scripts`)
# and PyPI. See docs/benchmarks.md.
#
#   bash bench/get_refs.sh            code + wheels for the GPU machine (Python 3.12, x86-64)
#   bash bench/get_refs.sh --cpu      also the two local venvs that run the references on this CPU
set -euo pipefail
cd "$(dirname "$0")/.."
REFS=bench/refs
MIRRORS=${MIRRORS:-/work/.mirror}
DIFFUSERS_GIT=$MIRRORS/huggingface+diffusers/repo
KOHYA_GIT=$MIRRORS/kohya-ss+sd-scripts/repo
mkdir -p "$REFS/code" "$REFS/wheels/common" "$REFS/wheels/kohya"

# ---- code: the programs as their users get them, at the mirrored commit ----
export_tree() {  # repo dest [pathspec…]: every blob the mirror holds (a few large binaries are absent)
  local repo=$1 dest=$2
  shift 2
  rm -rf "$dest" && mkdir -p "$dest"
  git -C "$repo" ls-tree -r HEAD -- "$@" | while read -r _ _ hash path; do
    if git -C "$repo" cat-file -e "$hash" 2>/dev/null; then
      mkdir -p "$dest/$(dirname "$path")"
      git -C "$repo" cat-file blob "$hash" >"$dest/$path"
    fi
  done
  git -C "$repo" rev-parse HEAD >"$dest/COMMIT"
}
export_tree "$DIFFUSERS_GIT" "$REFS/code/diffusers" examples/text_to_image
export_tree "$KOHYA_GIT" "$REFS/code/sd-scripts" library networks train_network.py sdxl_train_network.py \
  requirements.txt setup.py

# ---- wheels for the GPU machine (its image: Python 3.12, torch, transformers 5, accelerate, peft,
# einops, opencv, tqdm …; no diffusers, pydantic or datasets; see ../.library/device/KINDS.md) ----
download() {  # dest name==version…
  local dest=$1
  shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$dest" "$@"
}
# loracord itself and diffusers' example.
download "$REFS/wheels/common" diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 imagehash==4.3.2 pywavelets==1.9.0 torchsde==0.2.6 trampoline==0.1.2 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 ftfy==6.3.1 wcwidth==0.9.4
# kohya pins older libraries than loracord uses; they go on a PYTHONPATH of their own for kohya alone.
download "$REFS/wheels/kohya" transformers==4.54.1 tokenizers==0.21.4 huggingface-hub==0.34.3 diffusers==0.32.1 \
  toml==0.10.2 voluptuous==0.15.2 imagesize==1.4.1 ftfy==6.3.1 wcwidth==0.9.4
du -sh "$REFS/code" "$REFS/wheels"

[[ ${1:-} == --cpu ]] || exit 0
# ---- local CPU venvs: PyPI's torchvision needs the matching torch build, which the project venv lacks ----
if [[ ! -x $REFS/venv/bin/python ]]; then
  python3 -m venv "$REFS/venv"
  "$REFS/venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
  "$REFS/venv/bin/pip" install -q diffusers==0.42.1 transformers==5.24.0 peft==0.21.2 accelerate==1.15.0 \
    datasets ftfy safetensors tensorboard Jinja2
fi
if [[ ! -x $REFS/venv-kohya/bin/python ]]; then
  python3 -m venv "$REFS/venv-kohya"
  # torch comes from the first venv (a .pth line after kohya's own site-packages, which win).
  site=$("$REFS/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  ksite=$("$REFS/venv-kohya/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$site" >"$ksite/zz_torch_from_refs_venv.pth"
  "$REFS/venv-kohya/bin/pip" install -q --no-deps accelerate==1.6.0 transformers==4.54.1 tokenizers==0.21.4 \
    huggingface-hub==0.34.3 diffusers==0.32.1 toml==0.10.2 voluptuous==0.15.2 imagesize==1.4.1 ftfy==6.3.1 \
    wcwidth==0.9.4 einops==0.7.0 safetensors==0.4.5 opencv-python-headless
fi
