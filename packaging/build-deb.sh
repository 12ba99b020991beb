#!/usr/bin/env bash
# Build the Debian package: dist/voxgate_<version>_<arch>.deb (or OUTDIR/...).
#
#     packaging/build-deb.sh [OUTDIR]
#
# The package carries the application in a virtualenv at /opt/voxgate made
# with Debian's /usr/bin/python3, so it depends on that python3 (same minor
# version), not on the interpreter that runs this script. Into it go the
# wheel of this project and its dependencies at the versions pyproject.toml
# pins (and, when .venv exists, at the versions the tests ran with). The venv
# is built in a staging root; the paths that name the staging root (script
# shebangs, pyvenv.cfg) are rewritten to /opt/voxgate, and the bytecode is
# compiled with /opt/voxgate file names.
#
# Prerequisites (Debian 12): python3 python3-venv python3-dev gcc pkg-config
# libsystemd-dev dpkg-dev (systemd-python builds from source). When run as
# root (CI) the missing ones are installed with apt-get; otherwise the script
# names them and stops. pip's cache (~/.cache/pip) is reused.
set -euo pipefail
umask 022

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=$(mkdir -p "${1:-$REPO/dist}" && cd "${1:-$REPO/dist}" && pwd)
PYTHON=/usr/bin/python3
PREFIX=/opt/voxgate
APT_PREREQS=(python3 python3-venv python3-dev gcc pkg-config libsystemd-dev dpkg-dev)

log() { printf 'build-deb: %s\n' "$*" >&2; }

install_prereqs() {
    local missing=() pkg
    for pkg in "${APT_PREREQS[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ]; then
        log "missing Debian packages: ${missing[*]} (apt-get install them as root)"
        exit 1
    fi
    log "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

install_prereqs

VERSION=$("$PYTHON" -c 'import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$REPO/pyproject.toml")
ARCH=$(dpkg --print-architecture)
PY_MINOR=$("$PYTHON" -c 'import sys; print(sys.version_info[1])')
PY_MAJOR=$("$PYTHON" -c 'import sys; print(sys.version_info[0])')
PYTHON_DEPENDS="python3 (>= $PY_MAJOR.$PY_MINOR), python3 (<< $PY_MAJOR.$((PY_MINOR + 1)))"
DEB="$OUTDIR/voxgate_${VERSION}_${ARCH}.deb"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/voxgate-deb.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
VENV=$ROOT$PREFIX
log "voxgate $VERSION ($ARCH) with $("$PYTHON" --version) in $WORK"

# --- the application ---------------------------------------------------------
# Build from a copy so the work tree gets no build/ or *.egg-info.
mkdir -p "$WORK/src" "$WORK/wheels"
cp "$REPO/pyproject.toml" "$WORK/src/"
tar -C "$REPO" --exclude=__pycache__ --exclude='*.egg-info' -cf - daemon | tar -C "$WORK/src" -xf -

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input -q)
constraints=()
if [ -x "$REPO/.venv/bin/pip" ]; then
    "$REPO/.venv/bin/pip" freeze --exclude-editable --disable-pip-version-check \
        | grep -v '^voxgate[= ]' > "$WORK/constraints.txt" || true
    constraints=(-c "$WORK/constraints.txt")
fi
"${PIP[@]}" wheel --no-deps -w "$WORK/wheels" "$WORK/src"
"${PIP[@]}" install --no-compile "${constraints[@]}" "$WORK"/wheels/voxgate-*.whl
# pip and setuptools are not needed at run time.
"${PIP[@]}" uninstall -y pip setuptools
rm -f "$VENV"/lib/python3*/site-packages/*.dist-info/direct_url.json
find "$VENV" -name __pycache__ -prune -exec rm -rf {} +

# Name /opt/voxgate instead of the staging root (text files only).
{ grep -rlIF "$VENV" "$VENV" || true; } | while read -r f; do sed -i "s#$VENV#$PREFIX#g" "$f"; done
if grep -rlF "$WORK" "$VENV"; then
    log "files above still name the staging dir $WORK"
    exit 1
fi
"$PYTHON" -m compileall -q -j 0 --invalidation-mode checked-hash -s "$ROOT" -p / "$VENV/lib"

# --- commands, configuration, units, docs --------------------------------------
mkdir -p "$ROOT/usr/bin"
for script in $("$VENV/bin/python" - <<'EOF'
from importlib.metadata import distribution
print(" ".join(ep.name for ep in distribution("voxgate").entry_points
               if ep.group == "console_scripts"))
EOF
); do
    ln -s "$PREFIX/bin/$script" "$ROOT/usr/bin/$script"
done

install -D -m 0640 "$REPO/config/voxgate.toml" "$ROOT/etc/voxgate/voxgate.toml"
chmod 0750 "$ROOT/etc/voxgate"
install -d -m 0750 "$ROOT/var/lib/voxgate"
install -D -m 0644 -t "$ROOT/lib/systemd/system" \
    "$REPO/systemd/voxgate.service" "$REPO/systemd/voxgate@.service"
install -D -m 0644 "$REPO/packaging/debian/voxgate.sysusers" \
    "$ROOT/usr/lib/sysusers.d/voxgate.conf"
DOC=$ROOT/usr/share/doc/voxgate
install -D -m 0644 -t "$DOC" "$REPO/README.md"
install -D -m 0644 -t "$DOC/examples" "$REPO/systemd/dropins/alsa.conf"
install -D -m 0644 -t "$DOC/examples/kamailio" \
    "$REPO/packaging/kamailio/dispatcher.list" "$REPO/packaging/kamailio/kamailio-dispatcher.cfg"

# --- DEBIAN/ -----------------------------------------------------------------
mkdir -p "$ROOT/DEBIAN"
(cd "$ROOT" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
    | xargs -0 md5sum) > "$ROOT/DEBIAN/md5sums"
INSTALLED_SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" \
    -e "s/@INSTALLED_SIZE@/$INSTALLED_SIZE/" -e "s/@PYTHON_DEPENDS@/$PYTHON_DEPENDS/" \
    "$REPO/packaging/debian/control.in" > "$ROOT/DEBIAN/control"
echo /etc/voxgate/voxgate.toml > "$ROOT/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "$REPO/packaging/debian/$script" "$ROOT/DEBIAN/$script"
done

dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >/dev/null
log "built $DEB"
echo "$DEB"
