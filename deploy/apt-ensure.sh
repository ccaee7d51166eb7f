#!/bin/sh
# Install the Debian packages named as arguments that are not installed yet (used by
# deploy/Containerfile through a bind mount, so it is not left in the image).
#
# On a registry's debian:bookworm-slim this runs apt-get update and install. On the base that
# deploy/build-image.sh makes from Debian packages, every package is already there, so nothing
# runs and the build needs no network.
set -eu
missing=
for package in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed'; then
        missing="$missing $package"
    fi
done
if [ -z "$missing" ]; then
    echo "apt-ensure: already installed: $*" >&2
    exit 0
fi
echo "apt-ensure: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update
# shellcheck disable=SC2086 # one word per package
apt-get install -y --no-install-recommends $missing
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
