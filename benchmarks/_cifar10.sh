# Sourced by benchmarks/*_table1.sh: `cifar10_archive [PATH]` prints the CIFAR-10 archive's
# absolute path: PATH (relative to the caller's directory), else shared/data/cifar10-jpeg.tar.gz
# in the repository, else ../shared/data/cifar10-jpeg.tar.gz beside it; exit 2 if missing.
cifar10_archive() {
    local repo path
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    if [[ -n ${1:-} ]]; then
        path=$(realpath -m -- "$1")
    elif [[ -e $repo/shared/data/cifar10-jpeg.tar.gz ]]; then
        path=$repo/shared/data/cifar10-jpeg.tar.gz
    else
        path=$(realpath -m -- "$repo/../shared/data/cifar10-jpeg.tar.gz")
    fi
    [[ -e $path ]] || { echo "no CIFAR-10 archive at $path; pass its path" >&2; return 2; }
    echo "$path"
}
