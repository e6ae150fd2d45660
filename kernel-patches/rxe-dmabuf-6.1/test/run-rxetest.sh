#!/usr/bin/env bash
# Boots a kernel with rxe-dmabuf-6.1 on the rig's PCIe wiring (nvme-cmb behind one switch
# with a virtio-net NIC) and runs rxetest.c as /init: vfio-pci noiommu export of BAR slices
# (seed uAPI, feature 9), rxe0 on eth0, RDMA WRITE/READ/atomics between two RC QPs on rxe0
# looped back to each other, revoke by memory-decode off, VFIO_DEVICE_RESET, device close.
#
#   run-rxetest.sh <bzImage> <out-dir> [v1]
#
# "v1" skips the CMB checks (B2 maps BAR0 for a BAR2 dma-buf). Needs what `p2prig build all`
# leaves in the cache: QEMU with vfio-user, rdma-core with the librxe reg_dmabuf_mr patch,
# and target/release/nvme-cmb. Prints the RXETEST lines; the rest is in <out-dir>
# (console.log, nvme-cmb's trace.jsonl with every BAR access).
set -euo pipefail
kernel=$(readlink -f "$1")
out=$(mkdir -p "$2" && cd "$2" && pwd)
mode=${3:-full}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
cache=${P2PRIG_CACHE:-$HOME/.cache/p2prig}
rdma=$(ls -d "$cache"/rdma-core/*/rootfs | head -n1)
rdma=${rdma%/rootfs}
qemu=$(ls "$cache"/qemu/*/bin/qemu-system-x86_64 | head -n1)
nvme=$root/target/release/nvme-cmb
for f in "$rdma/include/infiniband/verbs.h" "$qemu" "$nvme"; do
  [ -e "$f" ] || { echo "missing $f: run p2prig build all (and cargo build --release)" >&2; exit 1; }
done

rm -rf "${out:?}"/*
img=$out/initramfs
mkdir -p "$img"/{proc,sys,dev,tmp,lib64,lib/x86_64-linux-gnu,usr/lib/x86_64-linux-gnu,etc}
gcc -O2 -Wall -Wno-format-truncation -o "$img/init" "$here/rxetest.c" -I"$rdma/include" \
  "$rdma/rootfs/usr/lib/x86_64-linux-gnu/libibverbs.so.1"
cp -a "$rdma/rootfs/etc/libibverbs.d" "$img/etc/"
cp -a "$rdma/rootfs/usr/lib/x86_64-linux-gnu/." "$img/usr/lib/x86_64-linux-gnu/"
cp -L /lib64/ld-linux-x86-64.so.2 "$img/lib64/"
for lib in libc.so.6 libnl-3.so.200 libnl-route-3.so.200; do
  cp -L "/lib/x86_64-linux-gnu/$lib" "$img/lib/x86_64-linux-gnu/"
done
(cd "$img" && find . | cpio -o -H newc 2>/dev/null | gzip -1) >"$out/initramfs.cpio.gz"

"$nvme" --socket "$out/nvme.sock" --control "$out/ctl.sock" --trace "$out/trace.jsonl" \
  >"$out/nvme-cmb.log" 2>&1 &
nvme_pid=$!
trap 'kill $nvme_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -S "$out/nvme.sock" ] && break; sleep 0.1; done

append="console=ttyS0 panic=-1 vfio.enable_unsafe_noiommu_mode=1 rdinit=/init"
[ "$mode" = v1 ] && append="$append rxetest=v1"
rc=0
timeout 300 "$qemu" -nodefaults -no-user-config -display none -no-reboot \
  -machine q35,accel=tcg,memory-backend=mem -cpu max -smp 2 -m 1024M \
  -object memory-backend-memfd,id=mem,size=1024M,share=on \
  -bios /usr/share/qemu/qboot.rom -L /usr/share/seabios -L /usr/share/qemu \
  -kernel "$kernel" -append "$append" -serial "file:$out/console.log" \
  -device pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1 \
  -device x3130-upstream,id=sw0,bus=rp0 \
  -device xio3130-downstream,id=dp0,bus=sw0,chassis=2,slot=0 \
  -device xio3130-downstream,id=dp1,bus=sw0,chassis=3,slot=0 \
  -device "{\"driver\":\"vfio-user-pci\",\"id\":\"nvme0\",\"bus\":\"dp0\",\"addr\":\"0\",\"socket\":{\"path\":\"$out/nvme.sock\",\"type\":\"unix\"}}" \
  -netdev hubport,id=n0,hubid=0 -device virtio-net-pci,netdev=n0,bus=dp1,addr=0,romfile= \
  -initrd "$out/initramfs.cpio.gz" >"$out/qemu.log" 2>&1 || rc=$?
[ $rc -eq 0 ] || echo "qemu exited with $rc (124: timeout; see $out/console.log)"
grep RXETEST "$out/console.log" || true
reports="BUG:|Oops|WARNING:|KASAN|circular locking|inconsistent lock|recursive locking|suspicious RCU|suspected memory leak|INFO: task"
if grep -v RXETEST "$out/console.log" | grep -qE "$reports"; then
  echo "kernel reports in $out/console.log:"
  grep -v RXETEST "$out/console.log" | grep -E "$reports"
fi
