// In-guest end-to-end check of the rxe dma-buf importer (kernel-patches/rxe-dmabuf-6.1).
// Runs as /init: binds the NVMe-CMB function to vfio-pci (noiommu), exports BAR slices as
// dma-bufs (seed uAPI, feature 9), brings up rxe0 on eth0 and drives RDMA WRITE/READ/atomics
// through two RC QPs on rxe0 looped back to each other (rxe loopback, so the responder path
// check_rkey/write_data_in/read_reply runs on the importer's MR). Prints one line per check.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <infiniband/verbs.h>
#include <linux/netlink.h>
#include <linux/pci_regs.h>
#include <linux/vfio.h>
#include <net/if.h>
#include <rdma/rdma_netlink.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define FEATURE_DMA_BUF 9
struct seed_dma_buf {
	uint32_t region_index;
	uint32_t open_flags;
	uint32_t offset;
	uint64_t length;
};

static int failures;
static void result(int ok, const char *name, const char *fmt, ...)
{
	va_list ap;
	printf("RXETEST %s %s: ", ok ? "PASS" : "FAIL", name);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	if (!ok)
		failures++;
}

static void msleep(int ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	nanosleep(&ts, NULL);
}

static int write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY);
	if (fd < 0)
		return -errno;
	int n = write(fd, text, strlen(text));
	int e = n < 0 ? -errno : 0;
	close(fd);
	return e;
}

static int read_file(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return -errno;
	int n = read(fd, buf, len - 1);
	close(fd);
	if (n < 0)
		return -errno;
	buf[n] = 0;
	return n;
}

/* ---- VFIO ---- */
static char bdf[32];
static int container = -1, group = -1, device = -1;
static uint64_t config_offset;

static int find_nvme(void)
{
	DIR *d = opendir("/sys/bus/pci/devices");
	struct dirent *e;
	char path[256], buf[64];
	while (d && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/class", e->d_name);
		if (read_file(path, buf, sizeof(buf)) > 0 && !strncmp(buf, "0x010802", 8)) {
			snprintf(bdf, sizeof(bdf), "%s", e->d_name);
			closedir(d);
			return 0;
		}
	}
	if (d)
		closedir(d);
	return -ENODEV;
}

static int vfio_open(void)
{
	char path[256], link[256];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", bdf);
	ssize_t n = readlink(path, link, sizeof(link) - 1);
	if (n < 0)
		return -errno;
	link[n] = 0;
	const char *g = strrchr(link, '/') + 1;
	container = open("/dev/vfio/vfio", O_RDWR);
	snprintf(path, sizeof(path), "/dev/vfio/noiommu-%s", g);
	group = open(path, O_RDWR);
	if (container < 0 || group < 0)
		return -errno;
	if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container))
		return -errno;
	if (ioctl(container, VFIO_SET_IOMMU, VFIO_NOIOMMU_IOMMU))
		return -errno;
	device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
	if (device < 0)
		return -errno;
	struct vfio_region_info ri = { .argsz = sizeof(ri), .index = VFIO_PCI_CONFIG_REGION_INDEX };
	if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &ri))
		return -errno;
	config_offset = ri.offset;
	return 0;
}

static void vfio_close(void)
{
	if (device >= 0)
		close(device);
	if (group >= 0)
		close(group);
	if (container >= 0)
		close(container);
	device = group = container = -1;
}

static int set_memory_decode(int on)
{
	uint16_t cmd;
	if (pread(device, &cmd, 2, config_offset + PCI_COMMAND) != 2)
		return -errno;
	cmd = on ? (cmd | PCI_COMMAND_MEMORY) : (cmd & ~PCI_COMMAND_MEMORY);
	if (pwrite(device, &cmd, 2, config_offset + PCI_COMMAND) != 2)
		return -errno;
	return 0;
}

static int export_dmabuf(uint32_t bar, uint32_t offset, uint64_t length)
{
	struct {
		struct vfio_device_feature f;
		struct seed_dma_buf d;
	} arg = { 0 };
	arg.f.argsz = sizeof(arg);
	arg.f.flags = VFIO_DEVICE_FEATURE_GET | FEATURE_DMA_BUF;
	arg.d.region_index = bar;
	arg.d.open_flags = O_RDWR | O_CLOEXEC;
	arg.d.offset = offset;
	arg.d.length = length;
	int fd = ioctl(device, VFIO_DEVICE_FEATURE, &arg);
	return fd < 0 ? -errno : fd;
}

/* ---- net / rxe link ---- */
static int eth_up(const char *ifname, const char *ip)
{
	int s = socket(AF_INET, SOCK_DGRAM, 0);
	struct ifreq ifr = { 0 };
	struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
	sin->sin_family = AF_INET;
	inet_pton(AF_INET, ip, &sin->sin_addr);
	if (ioctl(s, SIOCSIFADDR, &ifr))
		return -errno;
	inet_pton(AF_INET, "255.255.255.0", &sin->sin_addr);
	if (ioctl(s, SIOCSIFNETMASK, &ifr))
		return -errno;
	if (ioctl(s, SIOCGIFFLAGS, &ifr))
		return -errno;
	ifr.ifr_flags |= IFF_UP;
	if (ioctl(s, SIOCSIFFLAGS, &ifr))
		return -errno;
	close(s);
	return 0;
}

static int nl_attr(char *buf, int off, int type, const char *str)
{
	struct nlattr *a = (struct nlattr *)(buf + off);
	int len = strlen(str) + 1;
	a->nla_type = type;
	a->nla_len = NLA_HDRLEN + len;
	memcpy(buf + off + NLA_HDRLEN, str, len);
	return off + NLA_ALIGN(a->nla_len);
}

static int rxe_newlink(const char *name, const char *netdev)
{
	char buf[512] = { 0 };
	struct nlmsghdr *h = (struct nlmsghdr *)buf;
	int off = NLMSG_HDRLEN;
	off = nl_attr(buf, off, RDMA_NLDEV_ATTR_DEV_NAME, name);
	off = nl_attr(buf, off, RDMA_NLDEV_ATTR_LINK_TYPE, "rxe");
	off = nl_attr(buf, off, RDMA_NLDEV_ATTR_NDEV_NAME, netdev);
	h->nlmsg_len = off;
	h->nlmsg_type = RDMA_NL_GET_TYPE(RDMA_NL_NLDEV, RDMA_NLDEV_CMD_NEWLINK);
	h->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
	h->nlmsg_seq = 1;
	int s = socket(AF_NETLINK, SOCK_RAW, NETLINK_RDMA);
	if (s < 0)
		return -errno;
	struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
	if (sendto(s, buf, off, 0, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		return -errno;
	char reply[4096];
	int n = recv(s, reply, sizeof(reply), 0);
	close(s);
	if (n < 0)
		return -errno;
	struct nlmsghdr *r = (struct nlmsghdr *)reply;
	if (r->nlmsg_type == NLMSG_ERROR)
		return ((struct nlmsgerr *)NLMSG_DATA(r))->error;
	return 0;
}

/* ---- verbs ---- */
static struct ibv_context *ctx;
static struct ibv_pd *pd;
static struct ibv_cq *cq;
static int gid_index = -1;
static union ibv_gid gid;

struct qp_pair {
	struct ibv_qp *a, *b;
};

static int qp_connect(struct ibv_qp *qp, uint32_t dest)
{
	struct ibv_qp_attr at = { 0 };
	at.qp_state = IBV_QPS_INIT;
	at.port_num = 1;
	at.qp_access_flags = IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE |
			     IBV_ACCESS_REMOTE_ATOMIC;
	if (ibv_modify_qp(qp, &at, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT |
				       IBV_QP_ACCESS_FLAGS))
		return -errno;
	memset(&at, 0, sizeof(at));
	at.qp_state = IBV_QPS_RTR;
	at.path_mtu = IBV_MTU_1024;
	at.dest_qp_num = dest;
	at.rq_psn = 0;
	at.max_dest_rd_atomic = 4;
	at.min_rnr_timer = 12;
	at.ah_attr.is_global = 1;
	at.ah_attr.grh.dgid = gid;
	at.ah_attr.grh.sgid_index = gid_index;
	at.ah_attr.grh.hop_limit = 64;
	at.ah_attr.port_num = 1;
	if (ibv_modify_qp(qp, &at, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU |
				       IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
				       IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER))
		return -errno;
	memset(&at, 0, sizeof(at));
	at.qp_state = IBV_QPS_RTS;
	/* ~0.5 s: a 1 KiB packet into a trapped CMB is 128 vfio-user writes under TCG */
	at.timeout = 17;
	at.retry_cnt = 7;
	at.rnr_retry = 7;
	at.sq_psn = 0;
	at.max_rd_atomic = 4;
	if (ibv_modify_qp(qp, &at, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
				       IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
				       IBV_QP_MAX_QP_RD_ATOMIC))
		return -errno;
	return 0;
}

static int qp_pair_new(struct qp_pair *p)
{
	struct ibv_qp_init_attr ia = { 0 };
	ia.send_cq = cq;
	ia.recv_cq = cq;
	ia.qp_type = IBV_QPT_RC;
	ia.cap.max_send_wr = 16;
	ia.cap.max_recv_wr = 16;
	ia.cap.max_send_sge = 1;
	ia.cap.max_recv_sge = 1;
	p->a = ibv_create_qp(pd, &ia);
	p->b = ibv_create_qp(pd, &ia);
	if (!p->a || !p->b)
		return -errno;
	int e = qp_connect(p->a, p->b->qp_num);
	if (!e)
		e = qp_connect(p->b, p->a->qp_num);
	return e;
}

static void qp_pair_free(struct qp_pair *p)
{
	if (p->a)
		ibv_destroy_qp(p->a);
	if (p->b)
		ibv_destroy_qp(p->b);
	p->a = p->b = NULL;
}

/* post one op on p->a and wait for its completion: returns the WC status or -errno */
static int rdma_op(struct qp_pair *p, enum ibv_wr_opcode op, struct ibv_mr *local, void *laddr,
		   uint32_t len, uint64_t raddr, uint32_t rkey)
{
	struct ibv_sge sge = { (uintptr_t)laddr, len, local->lkey };
	struct ibv_send_wr wr = { 0 }, *bad;
	wr.wr_id = 42;
	wr.sg_list = &sge;
	wr.num_sge = 1;
	wr.opcode = op;
	wr.send_flags = IBV_SEND_SIGNALED;
	if (op == IBV_WR_ATOMIC_FETCH_AND_ADD) {
		wr.wr.atomic.remote_addr = raddr;
		wr.wr.atomic.rkey = rkey;
		wr.wr.atomic.compare_add = 1;
	} else {
		wr.wr.rdma.remote_addr = raddr;
		wr.wr.rdma.rkey = rkey;
	}
	if (ibv_post_send(p->a, &wr, &bad))
		return -errno;
	struct ibv_wc wc;
	for (int i = 0; i < 5000; i++) {
		int n = ibv_poll_cq(cq, 1, &wc);
		if (n < 0)
			return -EIO;
		if (n == 1 && wc.wr_id == 42)
			return wc.status;
		msleep(1);
	}
	return -ETIMEDOUT;
}

static void drain_cq(void)
{
	struct ibv_wc wc;
	while (ibv_poll_cq(cq, 1, &wc) > 0)
		;
}

static int verbs_open(void)
{
	int n;
	struct ibv_device **list = ibv_get_device_list(&n);
	if (!list || n < 1)
		return -ENODEV;
	ctx = ibv_open_device(list[0]);
	if (!ctx)
		return -errno;
	pd = ibv_alloc_pd(ctx);
	cq = ibv_create_cq(ctx, 64, NULL, NULL, 0);
	if (!pd || !cq)
		return -errno;
	for (int i = 0; i < 16; i++) {
		struct ibv_gid_entry ge;
		if (ibv_query_gid_ex(ctx, 1, i, &ge, 0))
			continue;
		if (ge.gid_type == IBV_GID_TYPE_ROCE_V2 &&
		    ge.gid.raw[10] == 0xff && ge.gid.raw[11] == 0xff) {
			gid_index = i;
			gid = ge.gid;
			return 0;
		}
	}
	return -ENOENT;
}

static const char *wcs(int s)
{
	static char buf[64];
	if (s < 0)
		snprintf(buf, sizeof(buf), "errno %d (%s)", -s, strerror(-s));
	else
		snprintf(buf, sizeof(buf), "%s", ibv_wc_status_str(s));
	return buf;
}

#define IOVA 0x7f0000000000ull
#define ACCESS (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ)

int main(int argc, char **argv)
{
	int e;
	const char *mode = "full";

	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	mount("debugfs", "/sys/kernel/debug", "debugfs", 0, NULL);
	setvbuf(stdout, NULL, _IOLBF, 0);
	char cmdline[512] = "";
	read_file("/proc/cmdline", cmdline, sizeof(cmdline));
	if (strstr(cmdline, "rxetest=v1"))
		mode = "v1";
	printf("RXETEST start mode=%s\n", mode);

	e = find_nvme();
	result(!e, "find-nvme", "%s", bdf);
	char path[256];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver_override", bdf);
	write_file(path, "vfio-pci");
	e = write_file("/sys/bus/pci/drivers_probe", bdf);
	result(!e, "bind-vfio", "drivers_probe: %d", e);
	e = vfio_open();
	result(!e, "vfio-open", "%d", e);
	if (e)
		goto out;

	int db_fd = export_dmabuf(0, 0x1000, 0x1000);
	result(db_fd >= 0, "export-doorbells", "fd %d", db_fd);
	int cmb_fd = export_dmabuf(2, 0, 0);
	result(cmb_fd >= 0, "export-cmb", "fd %d", cmb_fd);

	e = eth_up("eth0", "10.11.12.1");
	result(!e, "eth0-up", "%d", e);
	e = rxe_newlink("rxe0", "eth0");
	result(!e, "rxe-newlink", "%d", e);
	msleep(500);
	e = verbs_open();
	result(!e, "verbs-open", "%d gid index %d", e, gid_index);
	if (e)
		goto out;

	char *local = aligned_alloc(4096, 1 << 16);
	memset(local, 0, 1 << 16);
	struct ibv_mr *lmr = ibv_reg_mr(pd, local, 1 << 16, ACCESS);
	result(!!lmr, "reg-local-mr", "%s", lmr ? "ok" : strerror(errno));

	/* registration errors */
	struct ibv_mr *mr = ibv_reg_dmabuf_mr(pd, 0, 0x1000, IOVA, db_fd,
					      ACCESS | IBV_ACCESS_REMOTE_ATOMIC);
	result(!mr && errno == EOPNOTSUPP, "reg-atomic-refused", "%s",
	       mr ? "registered" : strerror(errno));
	if (mr)
		ibv_dereg_mr(mr);
	mr = ibv_reg_dmabuf_mr(pd, 0, 0x2000, IOVA, db_fd, ACCESS);
	result(!mr && errno == EINVAL, "reg-too-long-refused", "%s",
	       mr ? "registered" : strerror(errno));
	if (mr)
		ibv_dereg_mr(mr);

	struct ibv_mr *dbmr = ibv_reg_dmabuf_mr(pd, 0, 0x1000, IOVA, db_fd, ACCESS);
	result(!!dbmr, "reg-doorbells", "%s lkey %#x rkey %#x",
	       dbmr ? "ok" : strerror(errno), dbmr ? dbmr->lkey : 0, dbmr ? dbmr->rkey : 0);
	if (!dbmr)
		goto out;

	struct qp_pair qp = { 0 };
	e = qp_pair_new(&qp);
	result(!e, "qp-pair", "%d", e);
	if (e)
		goto out;

	/* SQ0TDBL (BAR0 0x1000 = MR offset 0) <- 5 */
	*(uint32_t *)local = 5;
	e = rdma_op(&qp, IBV_WR_RDMA_WRITE, lmr, local, 4, IOVA + 0, dbmr->rkey);
	result(e == IBV_WC_SUCCESS, "write-sq0-tail-5", "%s", wcs(e));
	/* CQ1HDBL (0x100c = MR offset 0xc) <- 0x1234 */
	*(uint32_t *)local = 0x1234;
	e = rdma_op(&qp, IBV_WR_RDMA_WRITE, lmr, local, 4, IOVA + 0xc, dbmr->rkey);
	result(e == IBV_WC_SUCCESS, "write-cq1-head", "%s", wcs(e));

	/* atomics on MMIO: remote access error, QP goes to error */
	e = rdma_op(&qp, IBV_WR_ATOMIC_FETCH_AND_ADD, lmr, local, 8, IOVA + 0x10, dbmr->rkey);
	result(e == IBV_WC_REM_ACCESS_ERR, "atomic-refused", "%s", wcs(e));
	drain_cq();
	qp_pair_free(&qp);

	struct ibv_mr *cmbmr = NULL;
	if (cmb_fd >= 0 && strcmp(mode, "v1")) {
		cmbmr = ibv_reg_dmabuf_mr(pd, 0, 1 << 20, IOVA, cmb_fd, ACCESS);
		result(!!cmbmr, "reg-cmb", "%s", cmbmr ? "ok" : strerror(errno));
	}
	if (cmbmr) {
		qp_pair_new(&qp);
		for (int i = 0; i < 8192; i++)
			local[i] = (char)(i * 7 + 3);
		e = rdma_op(&qp, IBV_WR_RDMA_WRITE, lmr, local, 8192, IOVA + 0x3000 + 2,
			    cmbmr->rkey);
		result(e == IBV_WC_SUCCESS, "cmb-write-8k", "%s", wcs(e));
		e = rdma_op(&qp, IBV_WR_RDMA_READ, lmr, local + 16384, 8192, IOVA + 0x3000 + 2,
			    cmbmr->rkey);
		result(e == IBV_WC_SUCCESS && !memcmp(local, local + 16384, 8192), "cmb-read-back",
		       "%s, %s", wcs(e),
		       memcmp(local, local + 16384, 8192) ? "differs" : "byte-exact");
		qp_pair_free(&qp);
	}

	/* revoke by memory decode off; remote writes NAKed; restore re-maps */
	e = set_memory_decode(0);
	result(!e, "memory-decode-off", "%d", e);
	msleep(100);
	qp_pair_new(&qp);
	*(uint32_t *)local = 6;
	e = rdma_op(&qp, IBV_WR_RDMA_WRITE, lmr, local, 4, IOVA + 0, dbmr->rkey);
	result(e == IBV_WC_REM_ACCESS_ERR, "write-while-revoked-naked", "%s", wcs(e));
	drain_cq();
	qp_pair_free(&qp);
	/* a local access to the revoked MR: send from it */
	qp_pair_new(&qp);
	e = rdma_op(&qp, IBV_WR_RDMA_WRITE, dbmr, (void *)(uintptr_t)IOVA, 4,
		    (uintptr_t)local, lmr->rkey);
	result(e != IBV_WC_SUCCESS && e >= 0, "local-read-while-revoked", "%s", wcs(e));
	drain_cq();
	qp_pair_free(&qp);

	e = set_memory_decode(1);
	result(!e, "memory-decode-on", "%d", e);
	msleep(200);
	qp_pair_new(&qp);
	*(uint32_t *)local = 7;
	e = rdma_op(&qp, IBV_WR_RDMA_WRITE, lmr, local, 4, IOVA + 0, dbmr->rkey);
	result(e == IBV_WC_SUCCESS, "write-after-restore-7", "%s", wcs(e));
	drain_cq();
	qp_pair_free(&qp);

	/* VFIO_DEVICE_RESET: revoke during, re-map after */
	e = ioctl(device, VFIO_DEVICE_RESET);
	result(!e, "vfio-reset", "%d", e ? -errno : 0);
	msleep(200);
	qp_pair_new(&qp);
	*(uint32_t *)local = 8;
	e = rdma_op(&qp, IBV_WR_RDMA_WRITE, lmr, local, 4, IOVA + 0, dbmr->rkey);
	result(e == IBV_WC_SUCCESS, "write-after-reset-8", "%s", wcs(e));
	drain_cq();
	qp_pair_free(&qp);

	/* local access through the MR (send from doorbell MR as source): works when mapped */
	qp_pair_new(&qp);
	e = rdma_op(&qp, IBV_WR_RDMA_WRITE, dbmr, (void *)(uintptr_t)IOVA, 4,
		    (uintptr_t)local + 100, lmr->rkey);
	result(e == IBV_WC_SUCCESS, "local-read-from-mmio-mr", "%s", wcs(e));
	drain_cq();
	qp_pair_free(&qp);

	/* close VFIO with the MRs registered, then write, then deregister */
	close(db_fd);
	close(cmb_fd);
	vfio_close();
	msleep(300);
	qp_pair_new(&qp);
	*(uint32_t *)local = 9;
	e = rdma_op(&qp, IBV_WR_RDMA_WRITE, lmr, local, 4, IOVA + 0, dbmr->rkey);
	result(e == IBV_WC_REM_ACCESS_ERR, "write-after-close-naked", "%s", wcs(e));
	drain_cq();
	qp_pair_free(&qp);
	e = ibv_dereg_mr(dbmr);
	result(!e, "dereg-after-close", "%d", e);
	if (cmbmr) {
		e = ibv_dereg_mr(cmbmr);
		result(!e, "dereg-cmb-after-close", "%d", e);
	}

out:
	/* debug kernels: leaks of the test's objects (kmemleak ignores the young ones) */
	if (!access("/sys/kernel/debug/kmemleak", F_OK)) {
		static char report[65536];
		msleep(6000);
		write_file("/sys/kernel/debug/kmemleak", "scan");
		write_file("/sys/kernel/debug/kmemleak", "scan");
		int n = read_file("/sys/kernel/debug/kmemleak", report, sizeof(report));
		result(n == 0, "kmemleak", "%d bytes of report", n);
		if (n > 0)
			printf("%s\n", report);
	}
	printf("RXETEST done failures=%d\n", failures);
	fflush(stdout);
	sync();
	reboot(RB_POWER_OFF);
	return 0;
}
