# tpl — make a libvirt VM into a template and stamp out clones.
# `make demo` runs the whole job on a tiny guest; `make test` runs every test.
# Both set up a fresh Debian 12 test machine first (packages, libvirtd), as does bench.
# build, install and refresh never do: on an administrator's host they only run cargo
# (and the refresh script) against the host's own packages and systemd's libvirtd.

PREFIX ?= /usr/local
# systemd finds units in /usr/local/lib/systemd/system too; a package uses /usr/lib/...
UNITDIR ?= $(PREFIX)/lib/systemd/system
CARGO  ?= cargo
URI    ?= qemu:///system
# This machine's KVM cannot run qemu's -cpu host (docs/ENVIRONMENT.md): libguestfs
# runs its appliance under TCG here. A host with working KVM can override both.
export LIBGUESTFS_BACKEND ?= direct
export LIBGUESTFS_BACKEND_SETTINGS ?= force_tcg

PKGS = qemu-utils/bookworm qemu-system-x86 libvirt-dev libvirt-daemon-system \
       libvirt-clients dnsmasq-base pkg-config libguestfs-tools linux-image-amd64 \
       busybox-static e2fsprogs btrfs-progs python3
# What each package leaves behind, to skip apt when everything is there.
CHECK = /usr/bin/qemu-system-x86_64 /usr/sbin/libvirtd /usr/bin/virsh /usr/bin/virt-sysprep \
        /usr/lib/x86_64-linux-gnu/pkgconfig/libvirt.pc /usr/bin/pkg-config /bin/busybox \
        /usr/sbin/dnsmasq /sbin/mkfs.btrfs /usr/bin/qemu-img /usr/bin/python3
# Ceph RBD (issue 12): the tools load librbd.so.1 (and librados.so.2) when a disk is on
# RBD; the -dev packages bring them and the headers tpl-ceph's layout test reads. The
# tests use strace, the benchmark time.
PKGS  += librbd-dev librados-dev strace time
CHECK += /usr/lib/x86_64-linux-gnu/librbd.so /usr/lib/x86_64-linux-gnu/librados.so \
         /usr/bin/strace /usr/bin/time
# The network rig of issue 20 (scripts/hvnet-up.sh, tests/guest/build-debian.sh): iptables for
# tplnet's NAT (inside hvnet's namespace), iproute2 and util-linux for the namespace,
# debootstrap and fdisk to build the Debian guest, xorriso for NoCloud seeds, ssh to log in.
PKGS  += debootstrap fdisk xorriso openssh-client iptables iproute2 util-linux
CHECK += /usr/sbin/debootstrap /sbin/sfdisk /usr/bin/xorriso /usr/bin/ssh /usr/sbin/iptables \
         /usr/bin/ip /usr/bin/nsenter

# The refresh's systemd units (issue 21) are checked with systemd-analyze verify.
PKGS  += systemd
CHECK += /usr/bin/systemd-analyze

# The cloud-init seed (issue 20): its tests read the built vfat image back with mtools and
# fsck.fat, fingerprint keys with ssh-keygen, and run cloud-init's own NoCloud code on it
# (its Python package unpacked, never installed: no services on the test host).
PKGS  += dosfstools mtools openssh-client python3-yaml python3-configobj python3-jinja2 \
         python3-jsonschema python3-jsonpatch python3-requests python3-netifaces \
         python3-oauthlib python3-serial
CHECK += /sbin/fsck.fat /usr/bin/mcopy /usr/bin/ssh-keygen /usr/lib/python3/dist-packages/yaml \
         /usr/lib/python3/dist-packages/configobj /usr/lib/python3/dist-packages/jinja2 \
         /usr/lib/python3/dist-packages/jsonschema /usr/lib/python3/dist-packages/jsonpatch.py \
         /usr/lib/python3/dist-packages/requests /usr/lib/python3/dist-packages/oauthlib \
         /usr/lib/python3/dist-packages/serial
CLOUD_INIT_DIR = /var/tmp/tpl-cloud-init

# The test cluster of scripts/ceph-up.sh (one mon, mgr and OSD on 127.0.0.1, no systemd):
# its state directory, shared with the scripts and the tests, and its configuration.
export TPL_CEPH_DIR ?= /var/lib/tpl-ceph
CEPH_TEST_CONF = $(TPL_CEPH_DIR)/ceph.conf

BINS = tpl-generalize tpl-lock tpl-rename tpl-clone tpl-list tpl-rm

.PHONY: all deps libvirtd build test demo install deb refresh bench clean
.PHONY: ceph hv2 hvnet hvnet-smoke debian-guest

all: build

deps:
	@missing=0; for f in $(CHECK); do [ -e $$f ] || missing=1; done; \
	ls /boot/vmlinuz-* >/dev/null 2>&1 || missing=1; \
	if [ $$missing = 1 ]; then \
	  echo "make deps: installing packages (2-3 minutes on a fresh machine)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends --allow-downgrades $(PKGS) >/dev/null; \
	else echo "make deps: all packages present"; fi
	@[ -d $(CLOUD_INIT_DIR)/root/usr/lib/python3/dist-packages/cloudinit ] || { \
	  mkdir -p $(CLOUD_INIT_DIR) && cd $(CLOUD_INIT_DIR) && \
	  { ls cloud-init_*.deb >/dev/null 2>&1 || apt-get download cloud-init >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get download cloud-init; }; } && \
	  dpkg-deb -x cloud-init_*.deb root && echo "make deps: cloud-init unpacked in $(CLOUD_INIT_DIR)"; }

libvirtd: deps
	@# /dev/kvm comes up owned by a group that is not the kvm group libvirt's qemu user is
	@# in (docs/ENVIRONMENT.md): libvirt then finds KVM when it probes qemu but not after,
	@# drops its capabilities and probes again at every lookup (7 s a define). The kvm group
	@# makes the two agree; test domains stay TCG (type='qemu').
	@if [ -c /dev/kvm ] && getent group kvm >/dev/null && [ "$$(stat -c %G /dev/kvm)" != kvm ]; then \
	  was=$$(stat -c %G /dev/kvm); chgrp kvm /dev/kvm && echo "make libvirtd: /dev/kvm now in group kvm (was $$was)"; fi
	@mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/images
	@pgrep -x virtlogd >/dev/null || virtlogd -d
	@pgrep -x libvirtd >/dev/null || libvirtd -d
	@for i in $$(seq 1 50); do \
	  virsh -c $(URI) list >/dev/null 2>&1 && { echo "make libvirtd: libvirtd answers on $(URI)"; exit 0; }; \
	  sleep 0.2; done; \
	echo "make libvirtd: libvirtd does not answer on $(URI)" >&2; exit 1

build:
	$(CARGO) build --workspace --all-targets

# The Ceph test cluster (ceph-up.sh installs the Ceph packages itself on a fresh machine)
# and the libvirt secret holding its admin key, for RBD disks; a no-op when it runs.
# Stop it with scripts/ceph-down.sh (--purge also deletes it).
ceph: libvirtd
	TPL_CEPH_LIBVIRT_URI=$(URI) scripts/ceph-up.sh

# The second hypervisor of the multi-host tests (scripts/hv2-up.sh): a libvirtd in its own
# mount namespace, with its own /var/lib/libvirt, at qemu+tcp://127.0.0.2/system (test
# only: no authentication). Stop it with scripts/hv2-down.sh.
hv2: libvirtd
	scripts/hv2-up.sh

# The hypervisor of the network tests (issue 20, scripts/hvnet-up.sh): a libvirtd in its own
# network + mount namespace with a NAT network tplnet (192.168.123.0/24, DHCP) that exists
# only in that namespace; reached through its unix socket only,
# qemu+unix:///system?socket=/var/lib/tpl-hvnet/run/libvirt/libvirt-sock, and its guests only
# from inside the namespace (scripts/hvnet-exec.sh CMD). Stop it with scripts/hvnet-down.sh.
hvnet: deps
	scripts/hvnet-up.sh

# The Debian 12 test guest (tests/guest/build-debian.sh): built once with debootstrap (about
# 1-2 minutes), then cached under /var/tmp/tpl-debian; prints the disk, kernel and initrd.
debian-guest: deps
	tests/guest/build-debian.sh --cached

# Check the rig by hand: the Debian guest booted on hvnet with a NoCloud seed, ssh from inside
# the namespace (scripts/hvnet-smoke.sh; about 1-2 minutes with the image cached).
hvnet-smoke: deps
	scripts/hvnet-smoke.sh

# Every test: unit tests and the workspace tests against the real libvirtd and Ceph.
# Prerequisites run in this order: packages, libvirtd, the build that needs them, then the
# Ceph cluster. The cluster is stopped at the end, the tests passing or not (an interrupt
# too), unless KEEP_CEPH=1; the exit status is the tests'. The output is kept in
# target/test.log, and why each failed test failed is printed again at the end.
test: deps libvirtd build deb ceph hv2 hvnet debian-guest
	@status=0; \
	trap 'echo "make test: interrupted; stopping the Ceph cluster, hv2 and hvnet" >&2; scripts/hv2-down.sh >&2; scripts/hvnet-down.sh >&2; scripts/ceph-down.sh >&2; exit 130' INT TERM HUP; \
	rm -f target/test.status; \
	{ CEPH_CONF=$(CEPH_TEST_CONF) $(CARGO) test --workspace --no-fail-fast 2>&1 || echo $$? > target/test.status; } | tee target/test.log; \
	if [ -s target/test.status ]; then status=$$(cat target/test.status); scripts/test-failures.sh target/test.log; fi; \
	rm -f target/test.status; \
	trap - INT TERM HUP; \
	scripts/hv2-down.sh >/dev/null || { echo "make test: hv2 did not stop" >&2; [ $$status != 0 ] || status=1; }; \
	scripts/hvnet-down.sh >/dev/null || { echo "make test: hvnet did not stop" >&2; [ $$status != 0 ] || status=1; }; \
	if [ "$(KEEP_CEPH)" = 1 ]; then \
	  echo "make test: the Ceph cluster keeps running (KEEP_CEPH=1): export CEPH_CONF=$(CEPH_TEST_CONF); stop it with scripts/ceph-down.sh"; \
	else \
	  scripts/ceph-down.sh || { echo "make test: the Ceph cluster did not stop" >&2; [ $$status != 0 ] || status=1; }; \
	fi; \
	exit $$status

demo: deps libvirtd build
	./scripts/demo.sh

# make demo STORAGE=rbd: the same demo with the guest on Ceph RBD, in the pool tpl-demo of
# the test cluster, which is started first and left running for the demo's domains.
ifeq ($(STORAGE),rbd)
demo: ceph
demo: export STORAGE = rbd
demo: export CEPH_CONF = $(CEPH_TEST_CONF)
endif

# The refresh's systemd units (dist/systemd) into directory $(2), running tpl-refresh from
# directory $(1): make install's and make deb's.
units = install -d $(2) && for u in service timer; do \
	  sed 's|@BINDIR@|$(1)|' dist/systemd/tpl-refresh@.$$u > $(2)/tpl-refresh@.$$u && \
	  chmod 644 $(2)/tpl-refresh@.$$u || exit 1; done

# Binaries, man pages, bash/zsh/fish completions (generated from the clap definitions), the
# refresh script and its systemd units (dist/systemd: a timer per template).
install:
	$(CARGO) build --release --workspace --bins
	$(CARGO) run -q --release -p xtask -- docs target/docs
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man1 \
	  $(DESTDIR)$(PREFIX)/share/bash-completion/completions \
	  $(DESTDIR)$(PREFIX)/share/zsh/site-functions $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
	for b in $(BINS); do \
	  install -m 755 target/release/$$b $(DESTDIR)$(PREFIX)/bin/$$b; \
	  install -m 644 target/docs/man/man1/$$b.1 $(DESTDIR)$(PREFIX)/share/man/man1/$$b.1; \
	  install -m 644 target/docs/completions/bash/$$b $(DESTDIR)$(PREFIX)/share/bash-completion/completions/$$b; \
	  install -m 644 target/docs/completions/zsh/_$$b $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_$$b; \
	  install -m 644 target/docs/completions/fish/$$b.fish $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/$$b.fish; \
	done
	install -m 755 scripts/tpl-refresh $(DESTDIR)$(PREFIX)/bin/tpl-refresh
	$(call units,$(PREFIX)/bin,$(DESTDIR)$(UNITDIR))
	install -D -m 644 target/docs/tpl-record.schema.json $(DESTDIR)$(PREFIX)/share/tpl/tpl-record.schema.json

# A Debian package of everything make install installs (cargo-deb; LICENSE-MIT as its
# copyright file): target/debian/tpl_VERSION_amd64.deb.
deb:
	@command -v cargo-deb >/dev/null || $(CARGO) install --locked cargo-deb
	$(CARGO) build --release --workspace --bins
	$(CARGO) run -q --release -p xtask -- docs target/docs
	$(call units,/usr/bin,target/deb-units)
	$(CARGO) deb -p tpl-clone --no-build -o target/debian/

# A fresh template from a maintained VM, e.g. from cron (README: "Template refresh").
refresh: build
	@[ -n "$(SOURCE)" ] && [ -n "$(TEMPLATE)" ] || { echo "usage: make refresh SOURCE=vm TEMPLATE=Tpl" >&2; exit 2; }
	./scripts/tpl-refresh -c $(URI) $(SOURCE) $(TEMPLATE)

# A benchmark, not a test: tpl-clone against virt-clone, cp, qemu-img and a shell loop on a
# generated 10 GiB template (scripts/bench.py says how); a table on stdout, about 5 minutes.
bench: deps libvirtd
	@command -v virt-clone >/dev/null && [ -x /usr/bin/time ] || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  virtinst time >/dev/null
	@$(CARGO) build --release --workspace --bins
	@TPL_BIN_DIR=$(CURDIR)/target/release URI=$(URI) python3 scripts/bench.py
	@TPL_CEPH_LIBVIRT_URI=$(URI) scripts/ceph-up.sh >&2 && CEPH_CONF=$(CEPH_TEST_CONF) TPL_BIN_DIR=$(CURDIR)/target/release URI=$(URI) python3 scripts/bench_rbd.py
	@# Issue 20: clones ready for an ssh login, against virt-clone + virt-customize and
	@# virt-install --cloud-init, on hvnet and the Debian guest (about 15 minutes under TCG).
	@scripts/hvnet-up.sh >/dev/null && tests/guest/build-debian.sh --cached >/dev/null && \
	  TPL_BIN_DIR=$(CURDIR)/target/release python3 scripts/bench_ready.py

clean:
	$(CARGO) clean
