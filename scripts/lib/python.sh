# Sourced by scripts: find_python VERSION (e.g. 3.10) prints the path of a
# working CPython of that version (on PATH, or installed by pyenv but not the
# selected one), or nothing.
find_python() {
    local version=$1 candidate root
    root=$(pyenv root 2>/dev/null || true)
    for candidate in "python$version" ${root:+"$root"/versions/"$version".*/bin/python"$version"}; do
        if "$candidate" -c "" 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
}
