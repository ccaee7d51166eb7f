#!/bin/sh
# Take out of the image's venv what weavepy never runs, in deploy/Containerfile's build stage:
#
#   sh deploy/slim-venv.sh SITE_PACKAGES_DIR
#
# 1. numpy without OpenBLAS. numpy's wheel bundles OpenBLAS (with libgfortran and libquadmath,
#    28 MB) for its float linear algebra (dot/matmul of floats, numpy.linalg). weavepy uses
#    numpy only for integer work in the WireGuard path (checksums, header columns), which never
#    calls BLAS. The library is replaced by a stub that defines each BLAS/LAPACK symbol numpy's
#    extensions link against (read from them, so a new numpy needs no edit) and, if one is ever
#    called, says so on stderr and aborts: a loud failure, never a wrong result.
# 2. numpy's subpackages nothing of weavepy imports (random, fft, polynomial, ma, testing,
#    typing stubs): `import numpy` does not load them; `numpy.random` etc. raise ImportError.
# 3. Symbols: shared objects are stripped of what linking does not need (debug information,
#    static symbol tables). Files auditwheel patched (an RPATH) are left alone: strip can
#    corrupt what patchelf rewrote.
# The build stage checks the result (deploy/check-image.py in the run stage imports everything
# and runs the encrypted path's numpy and crypto work).
set -eu
site=${1:?usage: slim-venv.sh SITE_PACKAGES_DIR}
stub_name=libweavepy-noblas.so
work=$(mktemp -d)

# ---- 1. numpy without OpenBLAS ------------------------------------------------------------
libs="$site/numpy.libs"
openblas=$(find "$libs" -maxdepth 1 -name 'libscipy_openblas*.so' -printf '%f\n')
[ "$(echo "$openblas" | wc -w)" = 1 ] || { echo "slim-venv: no single OpenBLAS in $libs" >&2; exit 1; }
users=$(find "$site/numpy" -name '*.so' -exec sh -c \
  'readelf -d "$1" | grep -q "NEEDED.*\[$2\]" && echo "$1"' _ {} "$openblas" \;)
{
  echo '#include <stdio.h>'
  echo '#include <stdlib.h>'
  echo 'static void missing(const char *name) {'
  echo '  fprintf(stderr, "numpy in the weavepy image is built without BLAS/LAPACK: %s is not available\n", name);'
  echo '  abort();'
  echo '}'
  # shellcheck disable=SC2086 # one word per file
  nm -D --undefined-only $users | awk '$2 ~ /^scipy_/ {print $2}' | sort -u |
    while read -r symbol; do echo "void $symbol(void) { missing(\"$symbol\"); }"; done
} >"$work/noblas.c"
gcc -shared -fPIC -O2 -s -Wl,-soname,$stub_name -o "$libs/$stub_name" "$work/noblas.c"
for user in $users; do
  patchelf --replace-needed "$openblas" "$stub_name" "$user"
done
rm -f "$libs/$openblas" "$libs"/libgfortran-*.so* "$libs"/libquadmath-*.so*
# nothing may still need what was removed
left=$(find "$site" -name '*.so*' -type f -exec readelf -d {} + 2>/dev/null |
  grep -E 'NEEDED.*\[(libscipy_openblas|libgfortran|libquadmath)' || true)
[ -z "$left" ] || { echo "slim-venv: still needed: $left" >&2; exit 1; }

# ---- 2. numpy's subpackages weavepy never imports -----------------------------------------
rm -rf "$site"/numpy/random "$site"/numpy/fft "$site"/numpy/polynomial "$site"/numpy/ma \
  "$site"/numpy/testing "$site"/numpy/_pyinstaller "$site"/numpy/doc "$site"/numpy/typing/tests

# ---- 3. symbols ---------------------------------------------------------------------------
find "$site" -name '*.so*' -type f | while read -r object; do
  if ! readelf -d "$object" | grep -qE '\((RPATH|RUNPATH)\)'; then
    strip --strip-unneeded "$object"
  fi
done
rm -rf "$work"
