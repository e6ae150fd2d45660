#!/bin/bash
# Attach check with a real QEMU: starts roce-target, boots the guest twice (the second boot is a
# reconnect), saves stats after each boot in $D/stats{1,2}.json and a capture in $D/pcap.
# Every process it starts ends: QEMU by timeout, the target by SIGTERM. Run from the repo root.
set -u
D=${D:-$(mktemp -d)}
mkdir -p $D/pcap
BIN=${BIN:-target/debug/roce-target}
QEMU=${QEMU:-$(ls /root/.cache/p2prig/qemu/*/bin/qemu-system-x86_64 | head -1)}
KERNEL=${KERNEL:-$(ls /root/.cache/p2prig/kernel/*/bzImage | head -1)}
INITRD=${INITRD:-$(ls /root/.cache/p2prig/image/*/initramfs.cpio.gz | head -1)}
rm -f $D/net.sock $D/ctl.sock
ROCE_TARGET_TRACE_VHOST=1 $BIN --socket $D/net.sock --control $D/ctl.sock --pcap-dir $D/pcap --pcap boot.pcap > $D/target.log 2>&1 &
TPID=$!
echo $TPID > $D/target.pid
for i in $(seq 50); do [ -S $D/net.sock ] && break; sleep 0.1; done
boot() {
  local n=$1
  timeout ${2:-90} $QEMU -nodefaults -no-user-config -display none -nic none -no-reboot \
    -machine q35,accel=tcg,memory-backend=mem -cpu max -smp 2 -m 1024M \
    -object memory-backend-memfd,id=mem,size=1024M,share=on \
    -bios /usr/share/qemu/qboot.rom -L /usr/share/seabios -L /usr/share/qemu \
    -kernel $KERNEL \
    -append 'console=ttyS0 panic=-1 rdinit=/init' \
    -chardev file,id=console,path=$D/console$n.log -serial chardev:console \
    -device pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1 \
    -device x3130-upstream,id=sw0,bus=rp0 \
    -device xio3130-downstream,id=dp0,bus=sw0,chassis=2,slot=0 \
    -device xio3130-downstream,id=dp1,bus=sw0,chassis=3,slot=0 \
    -chardev socket,id=net0,path=$D/net.sock \
    -netdev vhost-user,id=n0,chardev=net0 \
    -device virtio-net-pci,netdev=n0,bus=dp1,mac=52:54:00:12:34:56,romfile= \
    -device virtio-serial-pci,id=vser0,bus=pcie.0 -initrd $INITRD \
    -chardev socket,id=agent,path=$D/agent$n.sock,server=on,wait=off \
    -device virtserialport,bus=vser0.0,chardev=agent,name=p2prig.agent \
    > $D/qemu$n.log 2>&1
  echo "qemu $n exit $?" >> $D/qemu$n.log
}
boot 1 ${BOOT_SECONDS:-60}
echo '{"id":1,"op":"stats"}' | timeout 5 python3 -c "
import socket,sys
s=socket.socket(socket.AF_UNIX); s.connect('$D/ctl.sock'); s.sendall(sys.stdin.read().encode()); print(s.recv(65536).decode())" > $D/stats1.json
boot 2 ${BOOT_SECONDS:-60}
printf '{"id":2,"op":"stats"}\n{"id":3,"op":"pcap_stop"}\n' | timeout 5 python3 -c "
import socket,sys,time
s=socket.socket(socket.AF_UNIX); s.connect('$D/ctl.sock'); s.sendall(sys.stdin.read().encode()); time.sleep(0.5); print(s.recv(65536).decode())" > $D/stats2.json
kill $TPID; wait $TPID; echo "target exit $?" >> $D/target.log
