#!/bin/sh
# bentofile.yaml's docker.setup_script: runs as root at the end of the image build, after the Python
# packages are installed, to take out what only the build needed. BentoML's Dockerfile installs
# build-essential, git and gnupg2 in every image and leaves the apt lists behind; nothing in the
# service compiles, clones or verifies signatures at run time (no torch.compile: Triton would need a C
# compiler). buildah (`--backend buildah`) commits the whole build as one layer, so they leave the image;
# a builder that keeps a layer per RUN keeps their bytes in an earlier layer (`--opt squash` drops them).
set -eu
export DEBIAN_FRONTEND=noninteractive
# Recommends do not keep packages: otherwise gcc, make and gpg stay, recommended by what else is there
apt-get purge -y -q --auto-remove -o APT::AutoRemove::RecommendsImportant=false \
    -o APT::AutoRemove::SuggestsImportant=false build-essential git gnupg2
apt-get clean
rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log /root/.cache
# uv installed the packages; the server never runs it
if command -v pip3 >/dev/null 2>&1 && pip3 show -q uv >/dev/null 2>&1; then
    pip3 uninstall -y -q uv
fi
