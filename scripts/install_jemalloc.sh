#!/bin/sh
# Put libjemalloc.so.2 into the venv (VENV/lib/jemalloc/), for hardware.cpu_allocator (hf_optcore/allocator.py).
# From Debian's libjemalloc2 package, downloaded and unpacked without installing (no root needed).
# Optional: without apt/dpkg or a reachable Debian mirror, CPU runs use the C library's malloc, said in one line.
set -u
venv=${1:?usage: install_jemalloc.sh VENV}
dest="$venv/lib/jemalloc"
for sys_lib in /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2; do
  if [ -f "$sys_lib" ]; then echo "jemalloc: the system's $sys_lib"; exit 0; fi
done
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  echo "note: no apt-get/dpkg-deb here: CPU runs use the C library's malloc (install jemalloc for lower peak memory)"
  exit 0
fi
tmp=$(mktemp -d) || exit 0
trap 'rm -rf "$tmp"' EXIT
if (cd "$tmp" && apt-get download libjemalloc2 >/dev/null 2>&1) && dpkg-deb -x "$tmp"/libjemalloc2_*.deb "$tmp/x" 2>/dev/null; then
  lib=$(find "$tmp/x" -name libjemalloc.so.2 | head -n 1)
  if [ -n "$lib" ]; then
    mkdir -p "$dest" && cp "$lib" "$dest/" && echo "jemalloc: $dest/libjemalloc.so.2 (Debian libjemalloc2)" && exit 0
  fi
fi
echo "note: could not fetch Debian's libjemalloc2: CPU runs use the C library's malloc (apt install libjemalloc2 for lower peak memory)"
exit 0
