# Shared steps of the set-up scripts: idempotent, quiet when there is nothing to do.
# Every Python package they install comes from a file with hashes: uv from scripts/uv.txt,
# everything else from uv.lock (requirements.txt is its export for pip on the nodes).

# Never a Python that uv would download: the machine's own python3, as on the nodes.
export UV_PYTHON_DOWNLOADS=never
export UV_PYTHON=${UV_PYTHON:-python3}

ensure_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        missing+=(python3-venv)
    fi
    if ((${#missing[@]})); then
        echo "==> installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

uv_pin() {
    sed -n 's/^uv==\([^ ]*\).*/\1/p' scripts/uv.txt
}

# uv itself, the release scripts/uv.txt names, in a virtualenv of its own (.tools).
ensure_uv() {
    local pin
    pin=$(uv_pin)
    case "$(.tools/bin/uv --version 2>/dev/null)" in
    "uv $pin" | "uv $pin "*) ;;
    *)
        echo "==> installing uv $pin into .tools"
        rm -rf .tools
        python3 -m venv .tools
        .tools/bin/pip install -q --disable-pip-version-check --require-hashes --no-deps \
            -r scripts/uv.txt
        ;;
    esac
    export PATH="$PWD/.tools/bin:$PATH"
}

# The runtime dependencies of uv.lock, with hashes, as pip reads them.
export_requirements() {
    echo "# The runtime dependencies of uv.lock with their hashes, for pip on the nodes:"
    echo "#   pip install --require-hashes -r requirements.txt"
    echo "# Written by scripts/lock; do not edit."
    uv export -q --locked --format requirements-txt --no-dev --no-emit-project \
        --no-header --no-annotate
}

# pyproject.toml, uv.lock and requirements.txt agree, or the run stops and says what to do.
check_lock() {
    if ! uv lock --check -q 2>/dev/null; then
        echo "uv.lock does not match pyproject.toml: run scripts/lock, then commit both" >&2
        exit 1
    fi
    if ! export_requirements | cmp -s - requirements.txt; then
        echo "requirements.txt is not the export of uv.lock: run scripts/lock, then commit it" >&2
        exit 1
    fi
}

# .venv holds exactly what uv.lock says (extra arguments: uv sync's, e.g. --group test).
ensure_venv() {
    ensure_uv
    check_lock
    # Left in the checkout by the setuptools builds of earlier releases, it would shadow
    # the installed version's metadata (importlib finds it first on sys.path).
    rm -rf deploy_agent.egg-info
    echo "==> installing the locked dependencies into .venv"
    uv sync -q --locked "$@"
}
