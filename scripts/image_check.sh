#!/usr/bin/env bash
# The image, built and run, on a machine with neither a Docker daemon nor a container registry:
#   1. a stand-in for the base image that the Bento's Dockerfile starts FROM (python:3.11-slim-bookworm,
#      see bentofile.yaml): Debian bookworm with Python 3.11, made with debootstrap and imported into the
#      local container store under that name; kept for later runs;
#   2. `bentoml build` (the default Bento: no model inside), then `bentoml containerize --backend buildah`,
#      with the image user's uid and gid set to 10001 (the manifests' runAsUser);
#   3. the cpu-smoke overlay's pod, run with podman the way Kubernetes runs it (deploy/image/pod_to_podman.py
#      reads the rendered manifest: user 10001, read-only root file system, only the pod's volumes writable,
#      no capabilities, no privilege escalation, the same env and limits): the init container builds the
#      tiny random model into the model volume with no network, then the server serves it from there.
#      It runs once first with a writable root file system, to list what it writes outside its volumes;
#   4. a completion with curl (and a request without the API key: 401), /metrics, then SIGTERM with a
#      stream in flight: the drain lets it finish, and deploy/image/drain_check.py sees its whole reply
#      (every token, the finish chunk and the usage, no error event, then [DONE]).
# Usage (as root; installs buildah, podman, runc, debootstrap and curl with apt when they are missing):
#   scripts/image_check.sh
# IMAGE_CHECK_DIR (default /var/tmp/falcon-image-check) holds the work; KEEP_IMAGE=1 keeps the image
# (localhost/falcon-service:check, 5.4 GB: torch's CUDA wheels), which is removed otherwise.
# The heavy steps run under `nice -n 19 ionice -c 3`: others may be using the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh  # .venv (bentoml) and the checks' tools (kubectl renders the pod's overlay)
WORK=${IMAGE_CHECK_DIR:-/var/tmp/falcon-image-check}
IMAGE=localhost/falcon-service:check
UID_GID=10001
LOW=(nice -n 19 ionice -c 3)
START=$SECONDS
CONTAINERS=()

phase() { printf '\n== [%4ds] %s\n' $((SECONDS - START)) "$*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

cleanup() {
    local c
    for c in "${CONTAINERS[@]}"; do podman rm -f -t 0 "$c" >/dev/null 2>&1 || true; done
    if [[ "${KEEP_IMAGE:-0}" != 1 ]]; then podman rmi -f "$IMAGE" >/dev/null 2>&1 || true; fi
    rm -rf "$WORK/volumes-rw" "$WORK/volumes" "$WORK/rootfs"
}
trap cleanup EXIT

[[ $(id -u) == 0 ]] || fail "run as root (rootful buildah and podman)"
missing=()
for tool in buildah podman runc debootstrap curl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
    phase "installing ${missing[*]} (apt)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q buildah podman runc debootstrap curl >/dev/null
fi
mkdir -p "$WORK"
# runc rather than crun (crun refuses hybrid cgroup v1/v2 hosts) and ulimits no higher than the host's
# (podman's default asks for more, which needs CAP_SYS_RESOURCE): harmless where neither is a problem.
cat > "$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=4096:20000", "nproc=4096:8192"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
export BENTOML_HOME=$WORK/bentoml_home BENTOML_DO_NOT_TRACK=True

phase "bentoml build"
tag=$(.venv/bin/bentoml build --output tag | tail -n 1)
tag=${tag#__tag__:}
bento=$BENTOML_HOME/bentos/${tag%%:*}/${tag##*:}
base=$(awk '$1 == "FROM" {print $2; exit}' "$bento/env/docker/Dockerfile")
echo "Bento $tag; its Dockerfile starts FROM $base"

if podman image exists "localhost/$base"; then
    phase "base stand-in localhost/$base: already there"
else
    phase "base stand-in localhost/$base: debootstrap Debian bookworm with Python 3.11"
    rootfs=$WORK/rootfs
    rm -rf "$rootfs"
    "${LOW[@]}" debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    printf '%s\n' "deb http://deb.debian.org/debian bookworm main" \
        "deb http://deb.debian.org/debian bookworm-updates main" \
        "deb http://deb.debian.org/debian-security bookworm-security main" > "$rootfs/etc/apt/sources.list"
    # as in the python:3.11-slim images: `python` exists and pip may install into the system Python
    ln -sf python3 "$rootfs/usr/bin/python"
    rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED
    # CA certificates this host adds to the system's (a TLS-inspecting proxy's): the build downloads
    # from PyPI and Debian through the same network. The stand-in only; never the real base image.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null
    fi
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | podman import \
        --change "ENV=LANG=C.UTF-8" \
        --change "ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "ENV=SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
        --change "ENV=UV_NATIVE_TLS=1" \
        --change 'CMD=["python3"]' --quiet - "localhost/$base" >/dev/null
    rm -rf "$rootfs"
fi

phase "bentoml containerize --backend buildah -> $IMAGE"
build_start=$SECONDS
"${LOW[@]}" .venv/bin/bentoml containerize --backend buildah "$tag" -t "$IMAGE" \
    --opt build-arg=BENTO_USER_UID=$UID_GID --opt build-arg=BENTO_USER_GID=$UID_GID \
    --opt runtime=runc --opt ulimit=nofile=4096:20000 --opt ulimit=nproc=4096:8192 \
    >"$WORK/containerize.log" 2>&1 || { tail -40 "$WORK/containerize.log"; fail "containerize"; }
echo "built in $((SECONDS - build_start)) s; size $(podman image inspect --format '{{.Size}}' "$IMAGE" \
    | awk '{printf "%.1f GB", $1 / 1e9}'); log: $WORK/containerize.log"
podman run --rm --entrypoint /bin/bash "$IMAGE" -c '
    id; for t in gcc cc make git gpg uv; do command -v "$t" >/dev/null && echo "build tool left: $t"; done
    ls /var/lib/apt/lists | grep -qv "^partial$\|^lock$" && echo "apt lists left"
    python -c "import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda)"'

phase "render the cpu-smoke overlay"
rendered=$WORK/cpu-smoke.yaml
.venv/bin/python tests/packaging/check_tools.py kubectl kustomize deploy/kubernetes/overlays/cpu-smoke > "$rendered"
key=smoke-test-key  # overlays/cpu-smoke's secretGenerator

# run_pod NAME CONTAINER VOLUMES [podman options...]: the rendered pod's CONTAINER, by pod_to_podman.py
run_pod() {
    local name=$1 container=$2 volumes=$3 arg
    shift 3
    local -a spec=() argv=()
    local -a flags=()
    read -r -a flags <<<"${POD_FLAGS:-}"
    mapfile -t spec < <(.venv/bin/python deploy/image/pod_to_podman.py "$rendered" "$container" \
        --volumes "$volumes" "${flags[@]}")
    for arg in "${spec[@]}"; do [[ $arg == IMAGE ]] && arg=$IMAGE; argv+=("$arg"); done
    CONTAINERS+=("$name")
    podman run --name "$name" "$@" "${argv[@]}"
}

wait_ready() {  # PORT: until /readyz is 200 (at most 5 minutes)
    local _
    for _ in $(seq 300); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/readyz") == 200 ]] && return 0
        sleep 1
    done
    return 1
}

completion() {  # PORT
    curl -sS --max-time 60 "http://127.0.0.1:$1/v1/completions" -H "Authorization: Bearer $key" \
        -H 'Content-Type: application/json' \
        -d '{"model": "falcon-tiny-random", "prompt": "Falcons are", "max_tokens": 12, "temperature": 0}'
}

port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

phase "what the pod writes outside its volumes (writable root file system, podman diff)"
POD_FLAGS=--read-write run_pod falcon-check-init-rw import-model "$WORK/volumes-rw" --network none \
    >"$WORK/init-rw.log" 2>&1 || { tail -20 "$WORK/init-rw.log"; fail "init container (writable root)"; }
echo "init container:"; podman diff falcon-check-init-rw | sed 's/^/  /'
POD_FLAGS="--read-write --publish $port" run_pod falcon-check-rw falcon-service "$WORK/volumes-rw" -d >/dev/null
wait_ready "$port" || { podman logs falcon-check-rw | tail -30; fail "server (writable root) never ready"; }
completion "$port" >/dev/null
echo "server:"; podman diff falcon-check-rw | sed 's/^/  /'
podman rm -f -t 0 falcon-check-rw falcon-check-init-rw >/dev/null

phase "init container: user $UID_GID, read-only root file system, no network: import_model.py --tiny"
run_pod falcon-check-init import-model "$WORK/volumes" --network none >"$WORK/init.log" 2>&1 \
    || { tail -20 "$WORK/init.log"; fail "init container"; }
tail -n 2 "$WORK/init.log" | sed 's/^/  /'
echo "model volume:"; (cd "$WORK/volumes/model-store" && find . -maxdepth 4 -not -path "*/huggingface*" | sort \
    | sed 's/^/  /')

phase "server: user $UID_GID, read-only root file system, the pod's volumes, port $port"
POD_FLAGS="--publish $port" run_pod falcon-check falcon-service "$WORK/volumes" -d >/dev/null
ready_start=$SECONDS
wait_ready "$port" || { podman logs falcon-check | tail -40; fail "server never ready"; }
echo "ready after $((SECONDS - ready_start)) s; /livez $(curl -s -o /dev/null -w '%{http_code}' \
    "http://127.0.0.1:$port/livez")"
echo "POST /v1/completions:"
reply=$(completion "$port")
echo "  $reply"
grep -q '"object":"text_completion"' <<<"$reply" || fail "no completion"
echo "without the API key: HTTP $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v1/models")"
echo "/metrics: $(curl -s "http://127.0.0.1:$port/metrics" | grep '^falcon_requests_waiting' | head -1)"
echo "written into the volumes:"
(cd "$WORK/volumes" && find . -mindepth 1 -maxdepth 2 -not -path "./model-store/*" | sort | sed 's/^/  /')

phase "SIGTERM with a stream in flight (drain)"
# 256 tokens: a sixth of the 1,500 that outlived cpu-smoke's 30 s FALCON_DRAIN_TIMEOUT here; a stream cut at
# that cap ends with an error event before [DONE], which drain_check.py fails (tests/packaging/test_image.py)
stop_start=$SECONDS
.venv/bin/python deploy/image/drain_check.py "http://127.0.0.1:$port" --model falcon-tiny-random --max-tokens 256 \
    --api-key "$key" -- podman stop -t 70 falcon-check || { podman logs falcon-check 2>&1 | tail -20; \
    fail "the stream in flight did not get its whole reply"; }
echo "stopped after $((SECONDS - stop_start)) s, exit code $(podman inspect --format '{{.State.ExitCode}}' falcon-check)"
podman logs falcon-check 2>&1 | grep -E "SIGTERM|drain|shutting down" | sed 's/^/  /' || true

phase "done in $((SECONDS - START)) s"
