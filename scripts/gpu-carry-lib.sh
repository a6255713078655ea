# Sourced by gpu-carry-vllm.sh and gpu-carry-ray.sh: fetch wheels built for the GPU image's Python
# (CPython 3.12, x86_64 manylinux), unpack them into one site directory, pack it in parts that fit
# one 64 MiB device transfer each.

# A scratch directory for the wheels and the site, removed when the calling script exits.
CARRY_WORK=$(mktemp -d)
trap 'rm -rf "$CARRY_WORK"' EXIT

# carry_unpack SITE SPEC...: download SPEC... (no dependencies resolved: the callers list them),
# unzip every wheel into SITE keeping executable bits (`zipfile -e` drops them; Ray's gcs_server
# and raylet need theirs), then remove the caller's DROP paths (relative to SITE).
carry_unpack() {
  local site=$1 whl
  shift
  whl=$(mktemp -d)
  local platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64 manylinux_2_31_x86_64 \
           manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
    platforms+=(--platform "$p")
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$whl" "$@"
  mkdir -p "$site"
  python3 - "$site" "$whl"/*.whl <<'PY'
import os, sys, zipfile
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            path = z.extract(info, sys.argv[1])
            mode = (info.external_attr >> 16) & 0o777
            if mode & 0o111:
                os.chmod(path, mode)
PY
  rm -rf "$whl"
  for d in "${DROP[@]}"; do rm -rf "${site:?}/$d"; done
}

# carry_pack SITE OUT NAME: strip shared objects and executables, drop bytecode caches, write
# OUT/NAME.tar.xz.part-aa, -ab, ... of $PART_SIZE (default 41M: with the repository, ~12 MB, and
# a tokenizer a call stays under 64 MiB).
carry_pack() {
  local site=$1 out=$2 name=$3
  find "$site" -type f \( -name '*.so' -o -perm -u+x \) -exec strip --strip-unneeded {} + \
    2>/dev/null || true
  find "$site" -name __pycache__ -prune -exec rm -rf {} +
  mkdir -p "$out"
  rm -f "$out/$name".tar.xz.part-*
  tar -cf - -C "$site" . | xz -T0 -8 | split -b "${PART_SIZE:-41M}" -a 2 - "$out/$name.tar.xz.part-"
  echo "$name: $(du -sh "$site" | cut -f1) unpacked, parts:"
  ls -la "$out/$name".tar.xz.part-*
}
