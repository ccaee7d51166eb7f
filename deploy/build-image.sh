#!/usr/bin/env bash
# `make image`: build weavepy's OCI image from this repository alone, with no container
# registry: the base is made from Debian packages, Python packages come from PyPI pinned by
# deploy/requirements.lock, and deploy/Containerfile builds the image with no network.
#
#   bash deploy/build-image.sh [--force] [--refresh-base] [--print-tag]
#
# Root, Debian 12. What it does:
#   1. installs what is missing of podman, buildah, debootstrap, python3-venv and git (apt);
#   2. makes two bases with debootstrap --variant=minbase from the machine's Debian mirror (the
#      one in /etc/apt/sources.list[.d]), with the security updates: the run base has the
#      packages the image needs, the build base adds python3-venv, patchelf and binutils
#      (strip, for the venv's shared objects). Docs, manual
#      pages, locales and apt's lists are left out. Cached by what goes into them (the package
#      lists, the mirrors, this script's base recipe); --refresh-base rebuilds them;
#   3. downloads the wheels pinned in deploy/requirements*.lock (hash-checked) into a directory;
#   4. builds deploy/Containerfile from the committed tree (`git archive`; with uncommitted
#      changes, `git stash create`'s snapshot of them, tagged ...-dirty-TREEHASH) with
#      --network none, the bases as DEBIAN and DEBIAN_BUILD, and the wheels as its only index;
#   5. tags it localhost/weavepy:VERSION-COMMIT, prints its size, and saves an OCI archive for
#      airgapped nodes: build/image/weavepy-VERSION-COMMIT.oci.tar (`podman load -i` it, or
#      `ctr -n k8s.io images import` it; docs/kubernetes.md).
# An image that already has the tag is not built again (--force does).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${WEAVEPY_IMAGE_OUT:-$REPO/build/image}
SUITE=bookworm
RUN_PACKAGES=(python3 python3-nftables iproute2 nftables kmod procps)
BUILD_PACKAGES=(python3-venv patchelf binutils)
# What minbase brings that the image never runs, purged from the run base (step 2)
RUN_PURGE=(apt libapt-pkg6.0 gpgv debian-archive-keyring libgnutls30 libp11-kit0 libtasn1-6
  libunistring2 libidn2-0 libnettle8 libhogweed6 libseccomp2 libxxhash0 adduser e2fsprogs
  libext2fs2 logsave libss2 tzdata login passwd libsemanage2 libsemanage-common libsepol2)
HOST_PACKAGES=(podman buildah debootstrap python3 python3-venv git ca-certificates)
# podman's default nofile/nproc limits need CAP_SYS_RESOURCE, which a sandboxed root may lack
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

force=0 refresh_base=0 print_tag=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --refresh-base) refresh_base=1 ;;
    --print-tag) print_tag=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image: unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

log() { printf '[image] %s\n' "$*" >&2; }
die() { printf 'build-image: %s\n' "$*" >&2; exit 1; }

# ---- the tag: VERSION-COMMIT --------------------------------------------------------------
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n1)
[ -n "$version" ] || die "no version in pyproject.toml"
if git rev-parse --git-dir >/dev/null 2>&1; then
  commit=$(git rev-parse HEAD)
  tree=$commit
  suffix=
  if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    tree=$(git stash create)  # a commit of the worktree's tracked changes; HEAD is untouched
    suffix=-dirty-$(git rev-parse --short=8 "$tree^{tree}")  # names the changed content
  fi
  tag="localhost/weavepy:$version-$(git rev-parse --short=12 "$commit")$suffix"
else
  die "not a git checkout: the image tag is derived from the commit"
fi
if [ "$print_tag" = 1 ]; then echo "$tag"; exit 0; fi
[ "$(id -u)" = 0 ] || die "run as root (debootstrap and podman need it)"

# ---- 1. host packages ---------------------------------------------------------------------
missing=()
for pkg in "${HOST_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

archive="$OUT/weavepy-${tag#localhost/weavepy:}.oci.tar"
save_archive() {
  if [ ! -s "$archive" ]; then
    log "saving $archive"
    rm -f "$archive.partial"
    podman save --format oci-archive -o "$archive.partial" "$tag"
    mv "$archive.partial" "$archive"
  fi
}
report() {
  local bytes
  bytes=$(podman image inspect --format '{{.Size}}' "$tag")
  log "$tag: $((bytes / 1000000)) MB ($bytes bytes); archive $archive"
  if ((bytes >= 150000000)); then log "warning: the image is over its 150 MB goal"; fi
  echo "$tag"
}
mkdir -p "$OUT"
if [ "$force" = 0 ] && podman image exists "$tag"; then
  log "$tag is already built (--force builds it again)"
  save_archive
  report
  exit 0
fi
started=$(date +%s)

# ---- 2. the Debian bases ------------------------------------------------------------------
# The machine's Debian mirrors: the first URI serving SUITE, and the one serving SUITE-security.
mirror_for() {  # mirror_for SUITE -> URI (deb822 .sources and one-line .list files)
  /usr/bin/python3 - "$1" /etc/apt/sources.list /etc/apt/sources.list.d/* <<'EOF'
import sys
suite, files = sys.argv[1], sys.argv[2:]
for name in files:
    try:
        text = open(name).read()
    except OSError:
        continue
    if name.endswith(".sources"):
        for stanza in text.split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines()
                          if ":" in line and not line.startswith(("#", " ")))
            if ("deb" in fields.get("Types", "").split() and
                    suite in fields.get("Suites", "").split() and
                    fields.get("Enabled", "yes").strip() != "no"):
                print(fields["URIs"].split()[0])
                sys.exit(0)
    elif name.endswith(".list"):
        for line in text.splitlines():
            words = [w for w in line.split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                print(words[1])
                sys.exit(0)
sys.exit(1)
EOF
}
mirror=$(mirror_for "$SUITE") || die "no Debian mirror for $SUITE in /etc/apt/sources.list[.d]"
security=$(mirror_for "$SUITE-security") || security=http://deb.debian.org/debian-security
recipe=$(sed -n '/^# ---- 2\./,/^# ---- 3\./p' "$0")
base_id=$(printf '%s\n' "$SUITE" "$mirror" "$security" "${RUN_PACKAGES[*]}" \
  "${BUILD_PACKAGES[*]}" "$recipe" | sha256sum | cut -c1-12)
run_base="localhost/weavepy-base:$SUITE-run-$base_id"
build_base="localhost/weavepy-base:$SUITE-build-$base_id"

slim_rootfs() {  # what neither base needs: docs (but copyrights), manuals, locales, caches
  local root=$1
  [ -d "$root/usr/lib" ] && [ "$(realpath "$root")" != / ] || die "not a rootfs: '$root'"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/var/log/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/usr/share/lintian "$root"/usr/share/groff \
    "$root"/usr/share/common-licenses "$root"/debootstrap "$root"/var/lib/dpkg/*-old
  find "$root"/usr/share/doc -mindepth 2 ! -name copyright ! -type d -delete
  find "$root"/usr/share/doc -mindepth 1 -type d -empty -delete
  : >"$root"/etc/machine-id
  rm -f "$root"/etc/hostname "$root"/etc/resolv.conf
}
import_rootfs() {  # import_rootfs DIR TAG
  tar --numeric-owner --xattrs --sort=name -C "$1" -c . |
    podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["/bin/bash"]' - "$2" >/dev/null
}
in_root() {  # in_root DIR CMD...: run in the rootfs, with /proc, no daemons started
  local root=$1
  shift
  [ -d "$root/usr/lib" ] && [ "$(realpath "$root")" != / ] || die "not a rootfs: '$root'"
  mount -t proc proc "$root/proc"
  local rc=0
  chroot "$root" env DEBIAN_FRONTEND=noninteractive "$@" || rc=$?
  umount "$root/proc"
  return $rc
}
if [ "$refresh_base" = 1 ] || ! podman image exists "$run_base" || ! podman image exists "$build_base"
then
  rootfs="$OUT/rootfs"
  log "debootstrap --variant=minbase $SUITE from $mirror (security: $security)"
  rm -rf "$rootfs"
  mkdir -p "$rootfs"
  debootstrap --variant=minbase --include="$(IFS=,; echo "${RUN_PACKAGES[*]}")" \
    "$SUITE" "$rootfs" "$mirror" >"$OUT/debootstrap.log" 2>&1 ||
    die "debootstrap failed; see $OUT/debootstrap.log"
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror $SUITE main
deb $mirror $SUITE-updates main
deb $security $SUITE-security main
EOF
  # what debian:bookworm-slim leaves out of every later dpkg install too
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/weavepy-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/groff/*
EOF
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
  chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  log "security updates and the build base's packages"
  in_root "$rootfs" sh -c 'apt-get update -qq && apt-get upgrade -y -qq' \
    >>"$OUT/debootstrap.log" 2>&1 || die "apt-get upgrade failed; see $OUT/debootstrap.log"
  run_set=$(chroot "$rootfs" dpkg-query -W -f='${Package}\n' | sort)
  in_root "$rootfs" apt-get install -y -qq --no-install-recommends "${BUILD_PACKAGES[@]}" \
    >>"$OUT/debootstrap.log" 2>&1 || die "apt-get install failed; see $OUT/debootstrap.log"
  mapfile -t build_added < <(comm -13 <(echo "$run_set") \
    <(chroot "$rootfs" dpkg-query -W -f='${Package}\n' | sort))
  rm -f "$rootfs/usr/sbin/policy-rc.d"
  slim_rootfs "$rootfs"
  import_rootfs "$rootfs" "$build_base"
  # The run base: no package manager (the image is replaced, never upgraded in place; dpkg
  # stays, so the Containerfile can see what is installed), no build tools, nothing else the
  # image does not run (logins, filesystem tools, time zones, perl, glibc's iconv modules, the
  # interpreter's test and documentation modules and test extensions), and no bytecode (the
  # Containerfile compiles what the agent loads).
  in_root "$rootfs" apt-get purge -y -qq --allow-remove-essential "${build_added[@]}" \
    "${RUN_PURGE[@]}" >>"$OUT/debootstrap.log" 2>&1 ||
    die "purging the run base failed; see $OUT/debootstrap.log"
  # perl last, once no maintainer script (debconf's are perl) is left to run
  in_root "$rootfs" dpkg --purge --force-remove-essential perl-base \
    >>"$OUT/debootstrap.log" 2>&1 || die "purging perl-base failed; see $OUT/debootstrap.log"
  for pkg in "${RUN_PACKAGES[@]}"; do
    chroot "$rootfs" dpkg-query -W -f='${Status}' "$pkg" | grep -q 'ok installed' ||
      die "purging the run base removed $pkg"
  done
  rm -rf "$rootfs/usr/lib/x86_64-linux-gnu/gconv" "$rootfs/usr/share/bash-completion" \
    "$rootfs/usr/lib/python3.11/test" "$rootfs/usr/lib/python3.11/pydoc_data" \
    "$rootfs/usr/lib/python3.11/lib2to3" "$rootfs/usr/lib/python3.11/idlelib" \
    "$rootfs"/usr/lib/python3.11/lib-dynload/_test*.so \
    "$rootfs"/usr/lib/python3.11/lib-dynload/_ctypes_test.*.so \
    "$rootfs"/usr/lib/python3.11/lib-dynload/_xxtestfuzz.*.so \
    "$rootfs"/usr/lib/python3.11/lib-dynload/xxlimited*.so
  find "$rootfs/usr/lib/python3.11" "$rootfs/usr/lib/python3" -depth -name __pycache__ \
    -type d -exec rm -rf {} +
  slim_rootfs "$rootfs"
  import_rootfs "$rootfs" "$run_base"
  rm -rf "$rootfs"
  log "bases: $run_base, $build_base"
fi

# ---- 3. the pinned wheels -----------------------------------------------------------------
# Fetched with Debian's python3 (the image's interpreter, so pip picks the same files) from PyPI
# alone, each checked against its hash in the locks.
tools="$OUT/tools"
[ -x "$tools/bin/pip" ] || /usr/bin/python3 -m venv "$tools"
wheels="$OUT/wheels"
mkdir -p "$wheels"
log "fetching the wheels pinned in deploy/requirements.lock and requirements-build.lock"
"$tools/bin/pip" --isolated download --quiet --no-deps --only-binary :all: --require-hashes \
  -r deploy/requirements.lock -r deploy/requirements-build.lock -d "$wheels"

# ---- 4. the image -------------------------------------------------------------------------
context="$OUT/context"
rm -rf "$context"
mkdir -p "$context"
git archive "$tree" | tar -x -C "$context"
log "building $tag from ${tree:0:12} (no network: bases $run_base, wheels $wheels)"
podman build --network none "${ULIMITS[@]}" --pull=never \
  --volume "$wheels:/wheels:ro" \
  --build-arg DEBIAN="$run_base" --build-arg DEBIAN_BUILD="$build_base" \
  --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.revision="$commit${suffix}" \
  -f deploy/Containerfile -t "$tag" "$context" >"$OUT/build.log" 2>&1 ||
  { tail -n 30 "$OUT/build.log" >&2; die "podman build failed; see $OUT/build.log"; }
rm -rf "$context"
log "built in $(($(date +%s) - started)) s"

# ---- 5. the archive for airgapped nodes ---------------------------------------------------
rm -f "$archive"
save_archive
report
