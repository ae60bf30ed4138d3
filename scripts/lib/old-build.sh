# Sourced by scripts that compare this build's gateway with an older one's:
# old_gateway REV builds the `dualpath` binary of revision REV (a throw-away
# worktree, several minutes on two cores) unless target/compat/ has it from
# an earlier run, and prints its path. Called as `bin=$(old_gateway REV)`,
# where `set -e` does not reach: each step returns on failure itself.
old_gateway() {
    local rev binary source_dir
    rev=$(git rev-parse --short "$1") || return
    binary="target/compat/dualpath-$rev"
    if [ ! -x "$binary" ]; then
        source_dir="target/compat/src-$rev"
        rm -rf "$source_dir"
        git worktree add --detach --force "$source_dir" "$rev" >/dev/null || return
        echo "building the gateway at $rev (several minutes)" >&2
        cargo build --quiet --release -p gateway --bin dualpath \
            --manifest-path "$source_dir/Cargo.toml" --target-dir target/compat/build >&2 || return
        cp target/compat/build/release/dualpath "$binary" || return
        git worktree remove --force "$source_dir"
        rm -rf target/compat/build
    fi
    echo "$binary"
}

# old_python REV installs the Python binding (`import dualpath`) of revision
# REV into target/compat/python-REV unless it is there, and prints that
# directory (for PYTHONPATH).
old_python() {
    local rev directory source_dir
    rev=$(git rev-parse --short "$1") || return
    directory="target/compat/python-$rev"
    if [ ! -d "$directory/dualpath" ]; then
        source_dir="target/compat/src-python-$rev"
        rm -rf "$source_dir" "$directory"
        git worktree add --detach --force "$source_dir" "$rev" >/dev/null || return
        echo "building the Python binding at $rev (a few minutes)" >&2
        python3 -m pip install --quiet --disable-pip-version-check --target "$directory" \
            "$source_dir/client-py" >&2 || return
        git worktree remove --force "$source_dir"
    fi
    echo "$directory"
}
