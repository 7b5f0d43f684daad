# Shared by scripts/serve and scripts/test: create a virtualenv and install into it, again only
# when the install inputs changed (a stamp holds their hash).
PYTHON=${PYTHON:-python3}

require_python() {
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "error: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
        exit 2
    fi
}

# The stamp of an install: its pip arguments and the project files that decide what it installs.
stamp_of() {
    { echo "$*"; cat pyproject.toml; if [ -f middleware/pyproject.toml ]; then cat middleware/pyproject.toml; fi; } | sha256sum | cut -d' ' -f1
}

# ensure_venv DIR PIP_ARGS...
ensure_venv() {
    local dir=$1
    shift
    require_python
    [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
    local stamp="$dir/.install-stamp"
    local want
    want=$(stamp_of "$@")
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "installing into $dir ..." >&2
        "$dir/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
        "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@" >&2
        echo "$want" > "$stamp"
    fi
}

# The development venv of scripts/test and scripts/check: the service with its test extras (the
# gate's pinned ruff and mypy among them) and the client middleware with MCP 2.x.
DEV_INSTALL=(-e ".[test]" -e "./middleware[asgi,mcp,proxy]" "mcp>=2.3,<3")
ensure_dev_venv() {
    ensure_venv .venv "${DEV_INSTALL[@]}"
}

# The venv of scripts/serve: the service installed editable, so that a `git pull` takes effect
# at the next start (only a change of pyproject.toml reinstalls). A development venv already has
# it, and is used as it is.
ensure_serve_venv() {
    if [ -f .venv/.install-stamp ] && [ "$(cat .venv/.install-stamp)" = "$(stamp_of "${DEV_INSTALL[@]}")" ]; then
        return
    fi
    ensure_venv .venv -e "."
}
