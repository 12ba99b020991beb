#!/usr/bin/env bash
# Build the Debian package: dist/voxgate_<version>_<arch>.deb (or OUTDIR/...).
#
#     packaging/build-deb.sh [OUTDIR]
#
# The package carries the application in a virtualenv at /usr/lib/voxgate made
# with Debian's /usr/bin/python3, so it depends on that python3 (same minor
# version), not on the interpreter that runs this script. Into it go the
# wheel of this project and its dependencies at the versions pyproject.toml
# pins (and, when .venv exists, at the versions the tests ran with). The venv
# is built in a staging root; the paths that name the staging root (script
# shebangs, pyvenv.cfg) are rewritten to /usr/lib/voxgate. No bytecode ships:
# postinst compiles it with py3compile and prerm removes it with py3clean, as
# dh_python3 does. Shared objects are stripped, the libraries they link are
# in Depends (dpkg-shlibdeps), and the manual pages voxgated(8) and
# voxgatectl(8) are rendered from the argparse parsers with argparse-manpage
# (pinned in pyproject.toml's "manpages" extra, removed from the venv again).
# The version is pyproject.toml's and must match packaging/debian/changelog,
# whose trailer names the Maintainer.
#
# Prerequisites (Debian 12): python3 python3-venv python3-dev gcc pkg-config
# libsystemd-dev libasound2-dev dpkg-dev binutils (systemd-python and
# pyalsaaudio build from source). When run as root (CI) the missing ones are
# installed with apt-get; otherwise the script names them and stops. Wheels
# are cached in ~/.cache/voxgate-deb/pip: only wheels built by Debian's
# python3 (a wheel built by another CPython 3.11 carries that one's RUNPATH).
set -euo pipefail
umask 022

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=$(mkdir -p "${1:-$REPO/dist}" && cd "${1:-$REPO/dist}" && pwd)
PYTHON=/usr/bin/python3
PREFIX=/usr/lib/voxgate
APT_PREREQS=(python3 python3-venv python3-dev gcc pkg-config libsystemd-dev libasound2-dev
             dpkg-dev binutils)
DEBIAN_SRC=$REPO/packaging/debian

log() { printf 'build-deb: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

install_prereqs() {
    local missing=() pkg
    for pkg in "${APT_PREREQS[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" -eq 0 ] || die "missing Debian packages: ${missing[*]} (apt-get install them as root)"
    log "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

install_prereqs

VERSION=$("$PYTHON" -c 'import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$REPO/pyproject.toml")
changelog() { dpkg-parsechangelog -l "$DEBIAN_SRC/changelog" -S "$1"; }
[ "$(changelog Version)" = "$VERSION" ] \
    || die "packaging/debian/changelog is at $(changelog Version), pyproject.toml at $VERSION: add an entry (dch -v $VERSION)"
MAINTAINER=$(changelog Maintainer)
# Dates in the package (manual pages) are the changelog entry's.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(changelog Timestamp)}
ARCH=$(dpkg --print-architecture)
PY_MINOR=$("$PYTHON" -c 'import sys; print(sys.version_info[1])')
PY_MAJOR=$("$PYTHON" -c 'import sys; print(sys.version_info[0])')
PYTHON_DEPENDS="python3 (>= $PY_MAJOR.$PY_MINOR), python3 (<< $PY_MAJOR.$((PY_MINOR + 1)))"
DEB="$OUTDIR/voxgate_${VERSION}_${ARCH}.deb"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/voxgate-deb.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# debian/<package>/ with DEBIAN/ inside is the layout dpkg-shlibdeps expects.
ROOT=$WORK/debian/voxgate
VENV=$ROOT$PREFIX
mkdir -p "$ROOT/DEBIAN"
log "voxgate $VERSION ($ARCH) with $("$PYTHON" --version) in $WORK"

# --- the application ---------------------------------------------------------
# Build from a copy so the work tree gets no build/ or *.egg-info.
mkdir -p "$WORK/src" "$WORK/wheels"
cp "$REPO/pyproject.toml" "$REPO/setup.py" "$WORK/src/"
tar -C "$REPO" --exclude=__pycache__ --exclude='*.egg-info' --exclude='*.so' -cf - daemon | tar -C "$WORK/src" -xf -

"$PYTHON" -m venv "$VENV"
export PIP_CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/voxgate-deb/pip
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input -q)
constraints=()
if [ -x "$REPO/.venv/bin/pip" ]; then
    "$REPO/.venv/bin/pip" freeze --exclude-editable --disable-pip-version-check \
        | grep -v '^voxgate[= ]' > "$WORK/constraints.txt" || true
    constraints=(-c "$WORK/constraints.txt")
fi
# setup.py compiles the media cores with mypyc: their debug info names the sources
# relative to the build directory, not under the staging dir.
CFLAGS="${CFLAGS:-} -ffile-prefix-map=$WORK/src=." \
    "${PIP[@]}" wheel --no-deps -w "$WORK/wheels" "$WORK/src"
wheel=$(echo "$WORK"/wheels/voxgate-*.whl)
"${PIP[@]}" install --no-compile --use-pep517 "${constraints[@]}" "$wheel[manpages]"

# --- manual pages, from the parsers of the installed code ----------------------
MAN=$ROOT/usr/share/man/man8
mkdir -p "$MAN"
manpage() {  # PROGRAM DESCRIPTION
    "$VENV/bin/argparse-manpage" --pyfile "$REPO/packaging/man/parsers.py" --function "$1" \
        --description "$2" --project-name voxgate --version "$VERSION" \
        --manual-section 8 --manual-title "voxgate manual" \
        --include "$REPO/packaging/man/$1.8.inc" --output "$MAN/$1.8"
    gzip -9n "$MAN/$1.8"
}
manpage voxgated "telephony daemon that runs a voice agent on each call"
manpage voxgatectl "control a running voxgated"

# argparse-manpage, pip and setuptools are not needed at run time.
"${PIP[@]}" uninstall -y argparse-manpage pip setuptools
rm -f "$VENV"/lib/python3*/site-packages/*.dist-info/direct_url.json
find "$VENV" -name __pycache__ -prune -exec rm -rf {} +
# Left empty: include/python3.11 (no package installs C headers), share/man.
find "$VENV" -depth -type d -empty -delete

# Name /usr/lib/voxgate instead of the staging root (text files only).
{ grep -rlIF "$VENV" "$VENV" || true; } | while read -r f; do sed -i "s#$VENV#$PREFIX#g" "$f"; done
if grep -rlF "$WORK" "$VENV"; then
    die "files above still name the staging dir $WORK"
fi

# Shared objects: not executable, stripped as dh_strip does, no search path
# outside the package (bundled wheels use $ORIGIN). The libraries auditwheel
# vendored into a wheel's <name>.libs/ stay as they are: patchelf renamed them,
# and strip rewrites such a file into one the loader rejects ("ELF load command
# address/offset not page-aligned").
mapfile -d '' ELF < <(find "$VENV" -type f \( -name '*.so' -o -name '*.so.*' \) -print0 | sort -z)
for so in "${ELF[@]}"; do
    chmod 0644 "$so"
    case $so in
        */site-packages/*.libs/*) ;;
        *) strip --strip-unneeded --remove-section=.comment --remove-section=.note "$so" ;;
    esac
    runpath=$(readelf -d "$so" | sed -n 's/.*(R\(UN\)\?PATH).*\[\(.*\)\]/\2/p')
    for dir in ${runpath//:/ }; do
        case $dir in
            '$ORIGIN'*) ;;
            *) die "$so: RUNPATH $dir points outside the package (a wheel built by another python?)" ;;
        esac
    done
done

# --- commands, configuration, units, docs --------------------------------------
mkdir -p "$ROOT/usr/bin"
scripts=$("$VENV/bin/python" - <<'EOF'
from importlib.metadata import distribution
print(" ".join(ep.name for ep in distribution("voxgate").entry_points
               if ep.group == "console_scripts"))
EOF
)
for script in $scripts; do
    ln -s "../lib/voxgate/bin/$script" "$ROOT/usr/bin/$script"
done

install -D -m 0640 "$REPO/config/voxgate.toml" "$ROOT/etc/voxgate/voxgate.toml"
chmod 0750 "$ROOT/etc/voxgate"
install -d -m 0750 "$ROOT/var/lib/voxgate"
install -D -m 0644 -t "$ROOT/lib/systemd/system" \
    "$REPO/systemd/voxgate.service" "$REPO/systemd/voxgate@.service"
install -D -m 0644 "$DEBIAN_SRC/voxgate.sysusers" "$ROOT/usr/lib/sysusers.d/voxgate.conf"
install -D -m 0644 "$DEBIAN_SRC/lintian-overrides" "$ROOT/usr/share/lintian/overrides/voxgate"
DOC=$ROOT/usr/share/doc/voxgate
install -D -m 0644 -t "$DOC" "$REPO/README.md"
install -D -m 0644 -t "$DOC/examples" "$REPO/systemd/dropins/alsa.conf"
install -D -m 0644 -t "$DOC/examples/kamailio" \
    "$REPO/packaging/kamailio/dispatcher.list" "$REPO/packaging/kamailio/kamailio-dispatcher.cfg"
# Alert rules (with their promtool tests) and the Grafana dashboard, outside
# /usr/share/doc (often left out of minimal systems): prometheus.yml points at them.
install -D -m 0644 -t "$ROOT/usr/share/voxgate/prometheus" \
    "$REPO/packaging/prometheus/voxgate-rules.yml" "$REPO/packaging/prometheus/voxgate-rules.test.yml"
install -D -m 0644 -t "$ROOT/usr/share/voxgate/grafana" "$REPO/packaging/grafana/voxgate-dashboard.json"
gzip -9n < "$DEBIAN_SRC/changelog" > "$DOC/changelog.gz"
"$VENV/bin/python" -I "$REPO/packaging/debian_copyright.py" \
    "$ROOT" "$PREFIX" "$REPO/pyproject.toml" "$MAINTAINER" > "$DOC/copyright"
chmod 0644 "$DOC/changelog.gz" "$DOC/copyright"

# Last, as it breaks the staged interpreter: its links, relative (inside /usr).
for link in "$VENV"/bin/python*; do
    if [ "$(readlink "$link")" = "$PYTHON" ]; then
        ln -sfn "../../../bin/$(basename "$PYTHON")" "$link"
    fi
done

# --- DEBIAN/ -----------------------------------------------------------------
# The libraries the shared objects link (libc6, libsystemd0, libasound2, ...).
printf 'Source: voxgate\n\nPackage: voxgate\nArchitecture: any\n' > "$WORK/debian/control"
SHLIBS_DEPENDS=$(cd "$WORK" && dpkg-shlibdeps -O "${ELF[@]/#/-e}" 2>"$WORK/shlibdeps.log") \
    || { cat "$WORK/shlibdeps.log" >&2; die "dpkg-shlibdeps failed"; }
SHLIBS_DEPENDS=${SHLIBS_DEPENDS#shlibs:Depends=}
rm "$WORK/debian/control"

(cd "$ROOT" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
    | xargs -0 md5sum) > "$ROOT/DEBIAN/md5sums"
INSTALLED_SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@MAINTAINER@/$MAINTAINER/" \
    -e "s/@INSTALLED_SIZE@/$INSTALLED_SIZE/" -e "s/@PYTHON_DEPENDS@/$PYTHON_DEPENDS/" \
    -e "s/@SHLIBS_DEPENDS@/$SHLIBS_DEPENDS/" \
    "$DEBIAN_SRC/control.in" > "$ROOT/DEBIAN/control"
echo /etc/voxgate/voxgate.toml > "$ROOT/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "$DEBIAN_SRC/$script" "$ROOT/DEBIAN/$script"
done

dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >/dev/null
log "built $DEB"
echo "$DEB"
