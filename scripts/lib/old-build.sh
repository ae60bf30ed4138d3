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
